//! The protocol's vocabulary: a generation's identity ([`GenerationId`],
//! valid by construction), where `current` points ([`CurrentLink`]), what an
//! observation found ([`MachineFacts`]), how an install went, one activation
//! attempt and its result, and why a step failed ([`MachineError`], which
//! answers `is_transient()`). [`MachineError`] lives here rather than in a
//! file of its own because [`GenerationId::new`] fails with it and its
//! variants carry generations and attempts: apart, the two files would
//! import each other. Plain data: nothing here may run anything on a target.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::driver::command::{argv_summary, exit_text, io_is_transient};
use crate::driver::target::{CommandOutput, TargetError};

/// Where generations live when a machine's spec does not say.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/converge";

/// A generation on a machine: its per-machine number and its artifact's hash.
///
/// Valid by construction: the hash is 1-128 ASCII letters and digits, so
/// `<number>-<hash>` is a safe directory name. Deserializing checks the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawGenerationId")]
pub struct GenerationId {
    number: u64,
    hash: String,
}

#[derive(Deserialize)]
struct RawGenerationId {
    number: u64,
    hash: String,
}

impl TryFrom<RawGenerationId> for GenerationId {
    type Error = MachineError;

    fn try_from(raw: RawGenerationId) -> Result<Self, Self::Error> {
        Self::new(raw.number, raw.hash)
    }
}

impl GenerationId {
    /// Fails with [`MachineError::InvalidGeneration`] unless `hash` is 1-128
    /// ASCII letters and digits.
    pub fn new(number: u64, hash: impl Into<String>) -> Result<Self, MachineError> {
        let hash = hash.into();
        let valid = !hash.is_empty()
            && hash.len() <= 128
            && hash.bytes().all(|b| b.is_ascii_alphanumeric());
        if valid {
            Ok(Self { number, hash })
        } else {
            Err(MachineError::InvalidGeneration {
                name: format!("{number}-{hash}"),
            })
        }
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Parses a directory name `<n>-<hash>` (canonical decimal `n`); `None`
    /// for anything else, so foreign directories are ignored.
    pub fn from_dir_name(name: &str) -> Option<Self> {
        let (number, hash) = name.split_once('-')?;
        let parsed: u64 = number.parse().ok()?;
        if parsed.to_string() != number {
            return None;
        }
        Self::new(parsed, hash).ok()
    }
}

impl fmt::Display for GenerationId {
    /// The directory name, `<n>-<hash>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.number, self.hash)
    }
}

/// What the `current` link of a machine points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CurrentLink {
    /// No `current`: nothing was ever switched to on this state directory.
    Absent,
    /// `current` points at a complete generation.
    Generation { generation: GenerationId },
    /// `current` exists but is not a link to a complete generation: it points
    /// at an incomplete or missing generation, somewhere foreign, or is not a
    /// symlink. Crash or tampering evidence; drift, never to be hidden.
    Broken {
        /// The link text, or `<not a symlink>`.
        target: String,
        /// The generation the link names, when it names one.
        generation: Option<GenerationId>,
    },
}

/// What one observation found on a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFacts {
    pub hostname: String,
    /// Changes at every boot (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    pub uptime_secs: u64,
    /// `uname -r`.
    pub kernel: String,
    pub current: CurrentLink,
    /// Complete generations, by number.
    pub generations: Vec<GenerationId>,
    /// Generation directories without `.complete` (installs cut short), by number.
    pub incomplete: Vec<GenerationId>,
    /// The generation `confirmed` points at: the last one whose activation
    /// the target recorded as confirmed (health checks passed, reached
    /// afresh). What a failed activation rolls back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<GenerationId>,
    /// The activation the target records as in progress, if any: a
    /// controller that finds one running re-attaches to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationInProgress>,
    /// Controller clock, Unix milliseconds, when the answer arrived.
    pub observed_ms: u64,
    /// The running NixOS system, when `/run/current-system` names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nixos: Option<NixosFacts>,
}

/// What a NixOS host runs, from `/run/current-system` and
/// `/run/booted-system` (no /etc/NIXOS or systemd needed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NixosFacts {
    /// `readlink -f /run/current-system`: a store path.
    pub current_system: String,
    /// The system converge's current generation names (its artifact's
    /// `nixos-toplevel`), when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_system: Option<String>,
    /// `readlink -f /run/booted-system`, when it names a store path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_system: Option<String>,
    /// The booted system's kernel, initrd or kernel modules differ from
    /// the current system's: a reboot is needed to run all of it.
    #[serde(default)]
    pub needs_reboot: bool,
}

/// An activation recorded in the target's state directory
/// (`activation/record`) from its start until its runner wrote its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationInProgress {
    pub generation: GenerationId,
    /// The attempt's id (names its files under `activations/`).
    pub attempt: String,
    pub state: ActivationState,
}

/// Whether an activation in progress still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationState {
    /// Its runner is alive.
    Running,
    /// It wrote its status; the record is being released.
    Ended,
    /// Its runner is gone without a status (killed, or the host rebooted).
    Lost,
}

impl MachineFacts {
    /// The generation `current` points at, only when that link is healthy.
    pub fn current_generation(&self) -> Option<&GenerationId> {
        match &self.current {
            CurrentLink::Generation { generation } => Some(generation),
            CurrentLink::Absent | CurrentLink::Broken { .. } => None,
        }
    }

    /// What `current` is, in words: `N-hash`, `none`, or `broken (…)`.
    pub fn current_name(&self) -> String {
        match &self.current {
            CurrentLink::Absent => "none".to_owned(),
            CurrentLink::Generation { generation } => generation.to_string(),
            CurrentLink::Broken { target, .. } => format!("broken ({target})"),
        }
    }

    /// The facts a store's facts record holds, when they are a machine's.
    pub fn from_record(facts: &serde_json::Value) -> Option<MachineFacts> {
        serde_json::from_value(facts.clone()).ok()
    }
}

/// How a deploy's install phase got the generation onto the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// The generation was already complete; nothing was done.
    AlreadyPresent,
    /// A complete generation with the same artifact and roles document was
    /// used as it is: no new generation.
    Reused { generation: GenerationId },
    /// Copied on the target from a complete generation with the same hash.
    CopiedOnTarget,
    /// The artifact's files came on stdin: `files` of them (`bytes` bytes),
    /// and `kept` taken from the target's base generation.
    Uploaded {
        files: usize,
        kept: usize,
        bytes: u64,
    },
}

/// One run of a generation's `activate`, which [`wait_activation`] can wait
/// for again later (after a timeout, or a controller restart: it serializes).
///
/// [`wait_activation`]: super::activation::wait_activation
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationAttempt {
    pub generation: GenerationId,
    /// Unique per attempt; names the attempt's files under `activations/`.
    pub id: String,
}

/// How an activation ended. A non-zero `code` is a result, not an error: the
/// controller decides what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationResult {
    /// `activate`'s exit code (128 + signal number when killed by a signal,
    /// 126 when its directory could not be entered).
    pub code: i32,
    /// The last 60 KiB of its stdout and stderr, lossy UTF-8.
    pub log: String,
}

impl ActivationResult {
    pub fn succeeded(&self) -> bool {
        self.code == 0
    }
}

/// Why a machine step did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(
        "use state directory {state_dir:?}: it must be an absolute path other than /, without newlines"
    )]
    InvalidStateDir { state_dir: String },
    #[error("use generation {name:?}: the hash must be 1-128 ASCII letters and digits")]
    InvalidGeneration { name: String },
    #[error("use activation mode {mode:?}: it must be 1-32 characters of [A-Za-z0-9_-]")]
    InvalidMode { mode: String },
    #[error("use activation attempt {id:?}: not an id converge made")]
    InvalidAttempt { id: String },
    #[error("install generation {generation}: the roles document is not UTF-8")]
    InvalidRoles {
        generation: GenerationId,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("{step} on {target}")]
    Target {
        step: String,
        target: String,
        #[source]
        source: TargetError,
    },
    #[error("{step} on {target}: {}: {stderr}", exit_text(*.code))]
    Script {
        step: String,
        target: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("{step} on {target}: unexpected output: {output:?}")]
    Parse {
        step: String,
        target: String,
        output: String,
    },
    #[error("use generation {generation} on {target}: it is not installed")]
    NotInstalled {
        target: String,
        generation: GenerationId,
    },
    #[error("read artifact {path} to send it")]
    Artifact {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "activate generation {wanted} on {target}: generation {running} is being activated (attempt {attempt})"
    )]
    ActivationBusy {
        target: String,
        wanted: GenerationId,
        running: String,
        attempt: String,
    },
    #[error("see activation {} of generation {} on {target} end within {after:?}", .attempt.id, .attempt.generation)]
    ActivationTimedOut {
        target: String,
        attempt: ActivationAttempt,
        after: Duration,
    },
    #[error("see activation {} of generation {} on {target} end: its runner is gone without a status (killed, or the host rebooted)", .attempt.id, .attempt.generation)]
    ActivationLost {
        target: String,
        attempt: ActivationAttempt,
    },
    #[error("pass health check `{}` on {target}: {}", argv_summary(.argv), exit_text(.output.code))]
    HealthCheckFailed {
        target: String,
        argv: Vec<String>,
        output: CommandOutput,
    },
    #[error("pass health check `{}` on {target} within {after:?}", argv_summary(.argv))]
    HealthCheckTimedOut {
        target: String,
        argv: Vec<String>,
        after: Duration,
    },
    #[error(
        "arm a confirmation for activation mode {mode:?}: only switch and test change the running system"
    )]
    NothingToConfirm { mode: String },
    #[error(
        "arm a confirmation for generation {generation} on {target}: current does not point at it"
    )]
    NotCurrent {
        target: String,
        generation: GenerationId,
    },
    #[error(
        "find confirmation {id} on {target}: it was never armed there, or its files were removed"
    )]
    ConfirmationMissing { target: String, id: String },
}

impl MachineError {
    /// True when trying the step again later may succeed.
    ///
    /// Terminal: invalid inputs, output the protocol cannot parse (not a
    /// Linux host with sh?), and failed or timed-out health checks (the
    /// generation is judged bad; the controller rolls back and waits for a
    /// spec change). Transient: transport failures per [`TargetError`], a
    /// script failing on the target (full disk, permissions being fixed), a
    /// generation missing at switch (a new reconcile installs it), an
    /// activation timed out or lost (observe again, then decide).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::InvalidStateDir { .. }
            | Self::InvalidGeneration { .. }
            | Self::InvalidMode { .. }
            | Self::InvalidAttempt { .. }
            | Self::InvalidRoles { .. }
            | Self::Parse { .. }
            | Self::HealthCheckFailed { .. }
            | Self::HealthCheckTimedOut { .. }
            | Self::NothingToConfirm { .. }
            | Self::ConfirmationMissing { .. } => false,
            Self::Target { source, .. } => source.is_transient(),
            Self::Artifact { source, .. } => io_is_transient(source),
            Self::Script { .. }
            | Self::NotInstalled { .. }
            | Self::ActivationTimedOut { .. }
            | Self::ActivationLost { .. }
            | Self::ActivationBusy { .. }
            | Self::NotCurrent { .. } => true,
        }
    }

    /// True when a step ran out of time (transport, activation, health check).
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Target { source, .. } => source.is_timeout(),
            Self::ActivationTimedOut { .. } | Self::HealthCheckTimedOut { .. } => true,
            _ => false,
        }
    }

    /// True when a health check ran and said no (failed or timed out), as
    /// opposed to not being able to run it.
    pub fn is_health_failure(&self) -> bool {
        matches!(
            self,
            Self::HealthCheckFailed { .. } | Self::HealthCheckTimedOut { .. }
        )
    }
}
