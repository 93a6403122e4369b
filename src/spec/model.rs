//! The three kinds of object, as written in YAML: Machine, VirtualMachine and
//! Service.
//!
//! These types are the schema: serde reads them (unknown fields are errors)
//! and schemars turns them into the JSON Schemas in `schemas/`. Defaults live
//! here, as serde defaults, so that a spec read back always says what will
//! happen. Rules that need more than one field, or more than one object, live
//! in `validate`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::at::At;
use super::fields::{AbsPath, BridgeName, HostAddr, HostKey, SpecPath, UserName};
use super::names::Name;
use super::quantity::{ByteSize, HumanDuration, Port};

/// The only `apiVersion` this release reads.
pub const API_VERSION: &str = "converge/v1";

/// `metadata:` of every document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// The object's name, unique per kind: a DNS label.
    pub name: At<Name>,
    /// Tags select machines for service roles (`all` is implied for every machine).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<At<Name>>,
}

/// One YAML document: envelope and spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document<S> {
    pub api_version: At<String>,
    pub kind: At<String>,
    pub metadata: Metadata,
    pub spec: S,
}

// ---------------------------------------------------------------- Machine

/// The desired state of one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MachineSpec {
    /// Where the machine is: an SSH host, or `local: true` for the controller's own host.
    pub target: Target,
    /// How its artifact is built.
    pub build: Build,
    /// How an artifact is activated, checked and rolled back.
    #[serde(default)]
    pub activation: Activation,
    /// What to do when the machine no longer runs what was applied.
    #[serde(default)]
    pub drift: DriftPolicy,
    /// How often the machine is observed again (with ±10% jitter).
    #[serde(default = "default_interval")]
    pub interval: At<HumanDuration>,
}

fn default_interval() -> At<HumanDuration> {
    At::unplaced(HumanDuration::from_secs(300))
}

/// The default state directory on a target reached as root (or through sudo).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/converge";

/// The default state directory of a non-root SSH login without sudo:
/// relative to its home directory, resolved on the target.
pub const DEFAULT_USER_STATE_DIR: &str = "~/.local/state/converge";

/// Where a machine is reached. Either `host` (SSH) or `local: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Target {
    /// The controller's own host: no SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<At<bool>>,
    /// Host name or address for SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<At<HostAddr>>,
    /// SSH user (default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<At<UserName>>,
    /// Log in as `user` and run converge's commands on the target as root
    /// through `sudo -n` (never a prompt: the login needs a NOPASSWD rule).
    /// Default false: commands run as `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo: Option<At<bool>>,
    /// SSH port (default 22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<At<Port>>,
    /// The host's public key; checked strictly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<At<HostKey>>,
    /// A known_hosts file to check the host key against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<At<SpecPath>>,
    /// A private key file to log in with (otherwise ssh_config and the agent decide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<At<SpecPath>>,
    /// Where generations live on the target (default /var/lib/converge; for
    /// a non-root `user` without `sudo`, ~/.local/state/converge). It must
    /// be writable by whoever runs the commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<At<AbsPath>>,
}

impl Target {
    pub fn is_local(&self) -> bool {
        self.local.as_ref().is_some_and(|l| l.value)
    }

    /// Whether commands run as root through `sudo -n`.
    pub fn sudo(&self) -> bool {
        self.sudo.as_ref().is_some_and(|s| s.value)
    }

    /// Whether commands on the target run as root: an SSH login as root (the
    /// default user), through sudo, or the controller's own host.
    pub fn runs_as_root(&self) -> bool {
        self.is_local()
            || self.sudo()
            || self
                .user
                .as_ref()
                .is_none_or(|u| u.value.as_str() == "root")
    }

    /// The state directory: as written, else [`DEFAULT_STATE_DIR`] when
    /// commands run as root, else [`DEFAULT_USER_STATE_DIR`] (`~/` is
    /// resolved on the target, in the login's home).
    pub fn state_dir(&self) -> &str {
        match &self.state_dir {
            Some(dir) => dir.value.as_str(),
            None if self.runs_as_root() => DEFAULT_STATE_DIR,
            None => DEFAULT_USER_STATE_DIR,
        }
    }
}

/// How a machine's artifact is built: exactly one of `command` or `nix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Build {
    /// An argv run in the desired-state directory with CONVERGE_MACHINE,
    /// CONVERGE_ROLES and CONVERGE_OUT set; it fills CONVERGE_OUT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<At<Vec<String>>>,
    /// A Nix flake output to build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nix: Option<At<NixBuild>>,
    /// How long a build may take (default 30m).
    #[serde(default = "default_build_timeout")]
    pub timeout: At<HumanDuration>,
}

fn default_build_timeout() -> At<HumanDuration> {
    At::unplaced(HumanDuration::from_secs(30 * 60))
}

/// A Nix build of a NixOS system (see `spec::flake` for how `flake` reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NixBuild {
    /// A flake reference with an optional fragment, like `.#web1`: a
    /// relative path is resolved against the desired-state directory;
    /// `#name` means `nixosConfigurations.name.config.system.build.toplevel`;
    /// a fragment starting with `nixosConfigurations.` is the full attribute
    /// path; no fragment means the machine's name.
    pub flake: String,
    /// Where the system is built (default: the controller).
    #[serde(default)]
    pub build_on: BuildOn,
}

/// Where a Nix system is built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BuildOn {
    /// Evaluate and build on the controller, then copy the closure.
    #[default]
    Controller,
    /// Copy the derivation and build on the target (not supported yet).
    Target,
}

/// Activation, health checks and rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Activation {
    #[serde(default)]
    pub mode: ActivationMode,
    /// Run in order after activation; any failure rolls back (with `rollback: auto`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_checks: Vec<HealthCheck>,
    #[serde(default)]
    pub rollback: RollbackPolicy,
    /// How long the activate executable may run (default 5m).
    #[serde(default = "default_activation_timeout")]
    pub timeout: At<HumanDuration>,
    /// How long the controller has to reach the machine again after activation
    /// before the target rolls itself back (default 30s).
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout: At<HumanDuration>,
}

impl Default for Activation {
    fn default() -> Self {
        Activation {
            mode: ActivationMode::default(),
            health_checks: Vec::new(),
            rollback: RollbackPolicy::default(),
            timeout: default_activation_timeout(),
            confirm_timeout: default_confirm_timeout(),
        }
    }
}

fn default_activation_timeout() -> At<HumanDuration> {
    At::unplaced(HumanDuration::from_secs(300))
}

fn default_confirm_timeout() -> At<HumanDuration> {
    At::unplaced(HumanDuration::from_secs(30))
}

/// What activation does, as in nixos-rebuild.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationMode {
    /// Activate now and make it the boot default.
    #[default]
    Switch,
    /// Make it the boot default only.
    Boot,
    /// Activate now, not for the next boot.
    Test,
    /// Report what activation would do.
    DryActivate,
}

impl ActivationMode {
    /// The argument given to the artifact's `activate` executable.
    pub fn as_arg(self) -> &'static str {
        match self {
            ActivationMode::Switch => "switch",
            ActivationMode::Boot => "boot",
            ActivationMode::Test => "test",
            ActivationMode::DryActivate => "dry-activate",
        }
    }

    /// Whether this mode changes what runs now (and so can break it).
    pub fn changes_running_system(self) -> bool {
        matches!(self, ActivationMode::Switch | ActivationMode::Test)
    }
}

/// A command run on the target after activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// argv; exit 0 means healthy.
    pub exec: At<Vec<String>>,
    /// Default 30s.
    #[serde(default = "default_check_timeout")]
    pub timeout: At<HumanDuration>,
}

fn default_check_timeout() -> At<HumanDuration> {
    At::unplaced(HumanDuration::from_secs(30))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackPolicy {
    /// Re-activate the previous generation when activation or a health check fails.
    #[default]
    Auto,
    /// Leave the failed generation in place.
    Never,
}

/// What to do when a machine or VM no longer matches what was applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DriftPolicy {
    /// Log it and converge back.
    #[default]
    Correct,
    /// Log it only.
    Warn,
    /// Do not check.
    Ignore,
}

impl DriftPolicy {
    /// The word as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftPolicy::Correct => "correct",
            DriftPolicy::Warn => "warn",
            DriftPolicy::Ignore => "ignore",
        }
    }
}

// ---------------------------------------------------------------- VirtualMachine

/// The desired state of one QEMU virtual machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmSpec {
    /// `local` (the controller's host) or the name of a Machine acting as hypervisor.
    #[serde(default = "default_vm_host")]
    pub host: At<VmHost>,
    #[serde(default)]
    pub state: VmPowerState,
    #[serde(default = "default_cpus")]
    pub cpus: At<u16>,
    pub memory: At<ByteSize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub network: Network,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    /// Extra arguments appended to qemu-system's argv.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<At<String>>,
    /// A Machine living inside this VM, reconciled once the guest answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<At<Name>>,
    #[serde(default)]
    pub on_delete: OnDelete,
    /// How long a stop waits for the guest to power off after ACPI
    /// `system_powerdown` before QEMU is told to quit (default 30s; `0s`
    /// quits at once, for VMs whose guest ignores ACPI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<At<HumanDuration>>,
}

fn default_vm_host() -> At<VmHost> {
    At::unplaced(VmHost::Local)
}

fn default_cpus() -> At<u16> {
    At::unplaced(1)
}

/// Where a VM runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VmHost {
    Local,
    Machine(Name),
}

impl Serialize for VmHost {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            VmHost::Local => s.serialize_str("local"),
            VmHost::Machine(name) => s.serialize_str(name.as_str()),
        }
    }
}

impl<'de> Deserialize<'de> for VmHost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "local" {
            return Ok(VmHost::Local);
        }
        Name::new(&s)
            .map(VmHost::Machine)
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for VmHost {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "VmHost".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "'local', or the name of a Machine that runs the VM.",
            "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmPowerState {
    #[default]
    Running,
    Stopped,
}

/// A qcow2 disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Disk {
    pub name: At<Name>,
    /// Virtual size; disks grow, never shrink.
    pub size: At<ByteSize>,
    /// A qcow2 or raw image the disk is created on (copy-on-write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<At<SpecPath>>,
}

/// A VM's network: user mode (slirp) with host forwards, or a bridge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    #[serde(default)]
    pub mode: At<NetworkMode>,
    /// Host ports forwarded to the guest (user mode only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<Forward>,
    /// The bridge to attach to (bridge mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<At<BridgeName>>,
}

impl<T: Default> Default for At<T> {
    fn default() -> Self {
        At::unplaced(T::default())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    #[default]
    User,
    Bridge,
}

/// A host port forwarded to a guest port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Forward {
    pub host: At<Port>,
    pub guest: At<Port>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Boot {
    pub kernel: At<SpecPath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<At<SpecPath>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<At<String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnDelete {
    /// Stop the VM and keep its disks when the object is removed.
    #[default]
    KeepDisks,
    /// Stop the VM and delete its disks.
    Delete,
}

// ---------------------------------------------------------------- Service

/// Free-form settings, merged instance < role < per-machine.
pub type Settings = serde_json::Map<String, serde_json::Value>;

/// A service instance and the roles machines play in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// What the machines' builds implement for this service (e.g. `wireguard`).
    pub module: At<Name>,
    /// Instance-wide settings.
    #[serde(default, skip_serializing_if = "Settings::is_empty")]
    pub settings: Settings,
    /// Roles by name.
    pub roles: BTreeMap<At<Name>, Role>,
}

/// Which machines play a role, after which other roles, with what settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Role {
    /// Machines by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<At<Name>>,
    /// Machines by tag (`all` selects every machine).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<At<Name>>,
    /// Roles of this service whose machines must be Ready first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<At<Name>>,
    /// Role-wide settings, over the instance's.
    #[serde(default, skip_serializing_if = "Settings::is_empty")]
    pub settings: Settings,
    /// Settings for single machines of this role, over the role's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_machine: BTreeMap<At<Name>, Settings>,
}
