//! The capabilities the controller uses, as traits, and their one error type.
//!
//! The controller is generic over [`MachineDriver`]: the real one
//! ([`super::host::HostDriver`]) builds with the command builder and runs the
//! machine protocol on a local (or, later, SSH) target; tests use fakes.
//! Errors keep their source and answer `is_transient()`; the controller's
//! error policy decides what to do with that.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use std::path::Path;

use super::build::{Artifact, BuildError, BuildRequest, CachePruned};
use super::hypervisor_error::HypervisorError;
use super::nix::{NixError, NixRequest};
use super::protocol::{
    ActivationResult, ActivationStarted, ConfirmOutcome, Confirmation, DeployPhase, GenerationId,
    InstallOutcome, MachineError, MachineFacts, Watchdog,
};
use super::qemu::{DiskGrowth, SnapshotInfo, Started, StopOutcome, VmError, VmFacts};
use super::target::{CommandOutput, TargetError};
use crate::spec::{ByteSize, Disk, Name, OnDelete, Target as TargetSpec, VmSpec};

/// Why a driver step failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("use {what}: not supported by this converge yet")]
    Unsupported { what: String },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("copy the closure of {path} to {target}")]
    Copy {
        path: String,
        target: String,
        #[source]
        source: Box<NixError>,
    },
}

impl DriverError {
    /// Whether trying again later can succeed without a spec change.
    pub fn is_transient(&self) -> bool {
        match self {
            DriverError::Target(e) => e.is_transient(),
            DriverError::Build(e) => e.is_transient(),
            DriverError::Machine(e) => e.is_transient(),
            DriverError::Vm(e) => e.is_transient(),
            DriverError::Unsupported { .. } => false,
            DriverError::Hypervisor(e) => e.is_transient(),
            DriverError::Copy { source, .. } => source.is_transient(),
        }
    }

    /// A health check that failed or timed out (as opposed to a transport error).
    pub fn is_health_failure(&self) -> bool {
        matches!(self, DriverError::Machine(e) if e.is_health_failure())
    }

    /// The build's output, when a build failed.
    pub fn build_output(&self) -> Option<&str> {
        match self {
            DriverError::Build(e) => e.output(),
            _ => None,
        }
    }
}

/// Consecutive deploy steps of a plan (install, switch, activate), done in
/// one round trip where the target allows it.
#[derive(Debug)]
pub struct Deploy<'a> {
    pub install: Option<Install<'a>>,
    /// Point `current` at the installed generation (`None`) or at this one.
    pub switch: Option<Option<GenerationId>>,
    /// Activate the generation switched to.
    pub activate: Option<Activate>,
}

/// What an install needs.
#[derive(Debug)]
pub struct Install<'a> {
    pub artifact: &'a Artifact,
    pub roles_json: &'a [u8],
    /// The name a new generation gets.
    pub generation: GenerationId,
    /// What the target had when observed: the driver sends only what it
    /// lacks, and reuses a complete generation with the same contents.
    pub facts: &'a MachineFacts,
}

/// What a plan shows of a NixOS machine's next system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixPreview {
    /// The toplevel store path the build would give.
    pub toplevel: String,
    /// `nix store diff-closures` from the current system, when both
    /// closures are known.
    pub closure: Option<Vec<String>>,
}

/// How to activate.
#[derive(Debug, Clone)]
pub struct Activate {
    pub mode: String,
    /// The most the activation may run; past it, its process group is
    /// ended (TERM, then KILL) and the step fails.
    pub timeout: Duration,
    /// Arm the target's confirmation watchdog right after the start.
    pub watchdog: Option<Watchdog>,
}

/// What a deploy did, step by step.
#[derive(Debug)]
pub struct DeployOutcome {
    pub install: Option<InstallOutcome>,
    /// The generation installed (a reused one keeps its name).
    pub generation: Option<GenerationId>,
    pub switched: bool,
    /// The activation started or attached to, and its confirmation.
    pub started: Option<ActivationStarted>,
    /// How the activation ended, when it did within its timeout.
    pub result: Option<ActivationResult>,
    /// The step that failed and why; the steps after it did not run.
    pub failure: Option<(DeployPhase, DriverError)>,
}

/// Everything the controller does to a machine.
pub trait MachineDriver: Send + Sync + 'static {
    /// Reads the machine's facts (one round trip).
    fn observe(
        &self,
        target: &TargetSpec,
        timeout: Duration,
    ) -> impl Future<Output = Result<MachineFacts, DriverError>> + Send;

    /// Builds (or finds in the cache) the machine's artifact.
    fn build(
        &self,
        request: &BuildRequest,
    ) -> impl Future<Output = Result<Artifact, DriverError>> + Send;

    /// Installs, switches and activates as asked, in one round trip, and
    /// waits for the activation to end (re-attaching after a dropped
    /// connection). A running activation of the same generation is attached
    /// to, never started twice. `Err` when nothing about the outcome is
    /// known (the target could not be reached at all).
    fn deploy(
        &self,
        target: &TargetSpec,
        deploy: Deploy<'_>,
        timeout: Duration,
    ) -> impl Future<Output = Result<DeployOutcome, DriverError>> + Send;

    /// Claims an armed confirmation over a NEW connection: proves the machine
    /// is still reachable after activation, and records the generation as
    /// confirmed there. Also the claim to make before rolling back oneself,
    /// so the watchdog and converge never both act.
    fn confirm(
        &self,
        target: &TargetSpec,
        confirmation: &Confirmation,
        timeout: Duration,
    ) -> impl Future<Output = Result<ConfirmOutcome, DriverError>> + Send;

    /// Records `generation` as confirmed on the target, for an activation no
    /// watchdog guards, once its health checks passed.
    fn record_confirmed(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Removes old generations: keeps the `keep` newest complete ones, those
    /// in `protect`, and the ones `current` and `confirmed` point at.
    /// Returns what it removed.
    fn prune(
        &self,
        target: &TargetSpec,
        keep: usize,
        protect: &[GenerationId],
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<GenerationId>, DriverError>> + Send;

    /// Runs one health check; Ok only for exit code 0. Past its timeout its
    /// process group gets TERM, then KILL.
    fn health_check(
        &self,
        target: &TargetSpec,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<CommandOutput, DriverError>> + Send;

    /// For a plan of a NixOS machine: the toplevel its build would give
    /// (evaluated, nothing built) and, when the controller's store holds
    /// both closures, how it differs from `current`. `None` when Nix could
    /// not say (the plan goes on without it).
    fn nix_preview(
        &self,
        request: &NixRequest,
        current: Option<&str>,
        timeout: Duration,
    ) -> impl Future<Output = Option<NixPreview>> + Send {
        let _ = (request, current, timeout);
        async { None }
    }

    /// Prunes the controller's build cache (see `CommandBuilder::prune`):
    /// artifacts whose tree hash is not in `used` go, then least recently
    /// used ones while the cache exceeds `max_bytes`; none used within
    /// `recent`.
    fn prune_builds(
        &self,
        used: HashSet<String>,
        max_bytes: u64,
        recent: Duration,
    ) -> impl Future<Output = Result<CachePruned, DriverError>> + Send;
}

/// Where a VM's QEMU runs, as the controller resolved its `host:`.
#[derive(Debug, Clone, PartialEq)]
pub enum Hypervisor {
    /// The controller's own host.
    Local,
    /// A hypervisor Machine, reached through its target like any machine;
    /// converge's agent runs the VM operations there.
    Machine { name: Name, target: Box<TargetSpec> },
}

impl Hypervisor {
    pub fn is_local(&self) -> bool {
        matches!(self, Hypervisor::Local)
    }

    /// The VM's directory on its host: under the controller's `vm_root`
    /// locally, under `<stateDir>/vms/` of a hypervisor Machine.
    pub fn vm_dir(&self, vm_root: &Path, vm: &str) -> std::path::PathBuf {
        match self {
            Hypervisor::Local => vm_root.join(vm),
            Hypervisor::Machine { target, .. } => {
                Path::new(target.state_dir()).join("vms").join(vm)
            }
        }
    }
}

/// Everything the controller does to a QEMU VM. `dir` is the VM's directory
/// on its host (disks, pidfile, QMP socket, serial log, launch record).
pub trait VmDriver: Send + Sync + 'static {
    /// What runs and which disks exist; never fails for a VM that is simply absent.
    fn vm_observe(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disks: &[Disk],
    ) -> impl Future<Output = Result<VmFacts, DriverError>> + Send;

    /// The identity of what `vm_start` would launch (a hash of qemu's argv):
    /// a running VM whose launch identity differs must be restarted.
    fn vm_launch_identity(&self, name: &str, spec: &VmSpec, dir: &Path, root: &Path) -> String;

    fn vm_create_disk(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disk: &Disk,
        backing: Option<&Path>,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Grows a disk (online through QMP when `running`); never shrinks.
    fn vm_grow_disk(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disk: &str,
        size: ByteSize,
        running: bool,
    ) -> impl Future<Output = Result<DiskGrowth, DriverError>> + Send;

    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors qemu::start; each argument is one input of the launch"
    )]
    fn vm_start(
        &self,
        host: &Hypervisor,
        dir: &Path,
        name: &str,
        spec: &VmSpec,
        launch_identity: &str,
        root: &Path,
        timeout: Duration,
    ) -> impl Future<Output = Result<Started, DriverError>> + Send;

    /// Powers down (ACPI), then quits, then kills, each bounded.
    fn vm_stop(
        &self,
        host: &Hypervisor,
        dir: &Path,
        graceful: Duration,
    ) -> impl Future<Output = Result<StopOutcome, DriverError>> + Send;

    /// Stops, then removes the directory (keeping `disks/` unless `Delete`).
    fn vm_delete(
        &self,
        host: &Hypervisor,
        dir: &Path,
        on_delete: OnDelete,
        graceful: Duration,
    ) -> impl Future<Output = Result<StopOutcome, DriverError>> + Send;

    /// The pid of the VM's live QEMU, if one runs.
    fn vm_running_pid(
        &self,
        host: &Hypervisor,
        dir: &Path,
    ) -> impl Future<Output = Result<Option<u32>, DriverError>> + Send;

    /// The VM's internal snapshots, merged over its disks.
    fn vm_snapshots(
        &self,
        host: &Hypervisor,
        dir: &Path,
    ) -> impl Future<Output = Result<Vec<SnapshotInfo>, DriverError>> + Send;

    /// Takes snapshot `snap` (with RAM and devices when running).
    fn vm_snapshot(
        &self,
        host: &Hypervisor,
        dir: &Path,
        snap: &str,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Reverts to snapshot `snap` (RAM too when running).
    fn vm_revert(
        &self,
        host: &Hypervisor,
        dir: &Path,
        snap: &str,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Completes when the VM's process `pid` has exited.
    fn vm_watch_exit(&self, pid: u32) -> impl Future<Output = ()> + Send + 'static;
}

/// All capabilities the controller needs.
pub trait Drivers: MachineDriver + VmDriver {}

impl<T: MachineDriver + VmDriver> Drivers for T {}
