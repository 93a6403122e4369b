//! What a plan is made of: the [`Step`] vocabulary, one object's [`Change`],
//! [`Drift`], and the whole [`Plan`].
//!
//! [`Step`] is the only description of work in converge: `converge plan`
//! prints it, the executor runs exactly the steps of the change it is given
//! (it interprets them, it never recomputes them), and history records each
//! under [`Step::name`], in the same order, with the step's own fields as its
//! detail. Plain data: no IO, no tokio.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::ObjectKey;

/// What happens to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// `+`: never applied before.
    Create,
    /// `~`: applied before; its spec, roles or build inputs changed.
    Update,
    /// `-/+`: a field that identifies where the object lives changed.
    Replace,
    /// `-`: removed from the YAML and torn down (a VM is stopped).
    Destroy,
    /// `-`: removed from the YAML; converge stops managing it, nothing is uninstalled.
    Forget,
    /// `~`: nothing changed in the YAML, but the object differs from what
    /// was applied (drift) and its policy corrects it.
    Correct,
}

impl ChangeKind {
    pub fn symbol(self) -> &'static str {
        match self {
            ChangeKind::Create => "+",
            ChangeKind::Update | ChangeKind::Correct => "~",
            ChangeKind::Replace => "-/+",
            ChangeKind::Destroy | ChangeKind::Forget => "-",
        }
    }

    /// Counts for Terraform's summary line: (add, change, destroy).
    pub fn counts(self) -> (usize, usize, usize) {
        match self {
            ChangeKind::Create => (1, 0, 0),
            ChangeKind::Update | ChangeKind::Correct => (0, 1, 0),
            ChangeKind::Replace => (1, 0, 1),
            ChangeKind::Destroy | ChangeKind::Forget => (0, 0, 1),
        }
    }
}

/// One field that differs between the applied spec and the desired one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    /// Dotted path, like `spec.activation.mode`, `roles` or `revision`.
    pub path: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    /// Changing this field replaces the object (`-/+`).
    pub forces_replacement: bool,
    /// This field is why the plan restarts a running VM.
    pub forces_restart: bool,
}

/// One action of a plan. The executor runs exactly these, in order; history
/// records each under [`Step::name`] with its fields as the detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Run the machine's build (nothing runs when the cache has the same inputs).
    Build,
    /// Write the artifact to the target as a new generation.
    Install,
    /// Point the target's `current` at a generation: the one this attempt
    /// installs, or `generation` (`N-hash`) when it names one.
    Switch {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<String>,
    },
    /// Run the generation's `activate MODE`, detached on the target.
    Activate { mode: String },
    /// Run one health check on the target; exit 0 passes.
    HealthCheck {
        command: Vec<String>,
        timeout: String,
    },
    /// Record the generation as confirmed on the target: what a later failure
    /// rolls back to. With `timeout` (an SSH target whose mode changes the
    /// running system), over a new connection, which also disarms the
    /// target's rollback watchdog: unconfirmed within `timeout` after the
    /// activation ended, the target rolls itself back.
    Confirm {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<String>,
    },
    /// Remove old generations from the target, keeping the `keep` newest,
    /// the current one and the one before it.
    Prune { keep: usize },
    /// Create a VM disk (qcow2).
    CreateDisk { disk: String, size: String },
    /// Grow a VM disk to `size` (online when the VM runs); never shrinks.
    GrowDisk { disk: String, size: String },
    /// Start the VM's QEMU and wait for QMP.
    StartVm,
    /// Power the VM down (ACPI), then quit, then kill.
    StopVm,
    /// Stop the VM and start it with what its spec launches now.
    RestartVm,
    /// Remove the VM's directory; its disks too only when `disks`.
    DeleteVm { disks: bool },
    /// Resolve a service's roles into its members' roles documents.
    ResolveRoles,
    /// Drop the object from converge's records.
    Forget,
}

impl Step {
    /// The word `plan` prints and history records, as in `plan --output json`.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Build => "build",
            Step::Install => "install",
            Step::Switch { .. } => "switch",
            Step::Activate { .. } => "activate",
            Step::HealthCheck { .. } => "health-check",
            Step::Confirm { .. } => "confirm",
            Step::Prune { .. } => "prune",
            Step::CreateDisk { .. } => "create-disk",
            Step::GrowDisk { .. } => "grow-disk",
            Step::StartVm => "start-vm",
            Step::StopVm => "stop-vm",
            Step::RestartVm => "restart-vm",
            Step::DeleteVm { .. } => "delete-vm",
            Step::ResolveRoles => "resolve-roles",
            Step::Forget => "forget",
        }
    }

    /// The step's own fields as a JSON object (empty when it has none).
    pub fn detail(&self) -> Value {
        match serde_json::to_value(self) {
            Ok(Value::Object(mut map)) => {
                map.remove("step");
                Value::Object(map)
            }
            _ => Value::Object(serde_json::Map::new()),
        }
    }

    /// Whether the step can interrupt what runs on the target now.
    pub fn is_disruptive(&self) -> bool {
        matches!(
            self,
            Step::Switch { .. }
                | Step::Activate { .. }
                | Step::StopVm
                | Step::RestartVm
                | Step::DeleteVm { .. }
        )
    }

    /// A short phrase for the text plan.
    pub fn describe(&self) -> String {
        match self {
            Step::Build => "build".to_owned(),
            Step::Install => "install a new generation".to_owned(),
            Step::Switch {
                generation: Some(g),
            } => format!("switch to generation {g}"),
            Step::Switch { generation: None } => "switch to it".to_owned(),
            Step::Activate { mode } => format!("activate ({mode})"),
            Step::HealthCheck { command, timeout } => {
                format!("health check `{}` (timeout {timeout})", command.join(" "))
            }
            Step::Confirm {
                timeout: Some(timeout),
            } => {
                format!(
                    "confirm over a new connection (else the target rolls back after {timeout})"
                )
            }
            Step::Confirm { timeout: None } => "record it as confirmed".to_owned(),
            Step::Prune { keep } => format!("prune generations (keep {keep})"),
            Step::CreateDisk { disk, size } => format!("create disk {disk} ({size})"),
            Step::GrowDisk { disk, size } => format!("grow disk {disk} to {size}"),
            Step::StartVm => "start".to_owned(),
            Step::StopVm => "stop".to_owned(),
            Step::RestartVm => "restart".to_owned(),
            Step::DeleteVm { disks: true } => "delete its directory and disks".to_owned(),
            Step::DeleteVm { disks: false } => "delete its directory (disks kept)".to_owned(),
            Step::ResolveRoles => "resolve roles".to_owned(),
            Step::Forget => "forget".to_owned(),
        }
    }
}

/// The name history gives the re-activation of the previous generation after
/// a failed step: not a planned step, what happens when one fails (the
/// change's `rollback_to`).
pub const ROLLBACK_STEP: &str = "rollback";

/// The change planned for one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub key: ObjectKey,
    pub kind: ChangeKind,
    pub fields: Vec<FieldChange>,
    pub steps: Vec<Step>,
    /// Machines: the steps after `build` run only when the artifact differs
    /// from the one current and applied (only the directory's revision
    /// changed); otherwise they are recorded as skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_if_artifact_changed: bool,
    /// Machines: the generation (`N-hash`) re-activated if a step from
    /// `switch` on fails (`rollback: auto`): the last one the target
    /// recorded as confirmed (its current one, for a target that records
    /// none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<String>,
    /// One line of context, like "removed from the YAML; nothing is uninstalled".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// NixOS machines: the running and the next system (filled in by the
    /// planner from Nix; the diff leaves it empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nixos: Option<NixosChange>,
}

/// A NixOS machine's system before and after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixosChange {
    /// What runs now (`/run/current-system`), when observed.
    pub current: Option<String>,
    /// The toplevel the build gives, evaluated for the plan.
    pub new: String,
    /// `nix store diff-closures current new`, when both closures are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure: Option<Vec<String>>,
}

/// A fact that differs from what converge last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub key: ObjectKey,
    pub field: String,
    pub applied: String,
    pub observed: String,
    /// What the object's drift policy does about it: correct, warn.
    pub action: String,
}

/// A whole plan: changes in key order, and drift.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub revision: Option<String>,
    pub changes: Vec<Change>,
    pub drift: Vec<Drift>,
    /// Objects that could not be observed (unreachable): planned from records only.
    pub unobserved: Vec<(ObjectKey, String)>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// (to add, to change, to destroy), as in Terraform's summary line.
    pub fn summary(&self) -> (usize, usize, usize) {
        self.changes.iter().fold((0, 0, 0), |acc, c| {
            let (a, m, d) = c.kind.counts();
            (acc.0 + a, acc.1 + m, acc.2 + d)
        })
    }
}
