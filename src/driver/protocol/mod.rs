//! The machine protocol, written once over any [`Target`]: observe facts,
//! install a generation (uploading only what the target lacks), switch
//! `current`, activate detached and wait for the result, run health checks,
//! roll back, prune. Each step is one small function with a timeout and at
//! most a few round trips (each a constant embedded script from `scripts/`,
//! inputs as positional arguments). It must not decide anything: sequencing,
//! retries and what a failed activation or health check means are the
//! controller's. It must not time steps either; the controller does.
//!
//! Layout under a state directory (default [`DEFAULT_STATE_DIR`]):
//!
//! ```text
//! generations/<n>-<hash>/artifact/          the artifact tree, as built
//! generations/<n>-<hash>/roles.json         the roles document
//! generations/<n>-<hash>/.complete          written last at install; holds the hash
//! generations/<n>-<hash>/activations/<attempt>.{pid,log,status}
//! generations/<n>-<hash>/activate.{log,status} -> the latest attempt's files
//! current -> generations/<n>-<hash>         replaced by rename only
//! confirm/<id>                              canary of an armed confirmation
//! confirm/<id>.pid                          its watchdog: "<pid> <boot id>"
//! confirm/<id>.confirmed | <id>.fired       who claimed the canary (by rename)
//! confirm/<id>.result                       what the watchdog did, written last
//! ```
//!
//! Magic rollback: after activating a mode that changes the running system,
//! [`arm_confirmation`] leaves a watchdog on the target. Unless [`confirm`]
//! claims the canary within the window (counted from the activation's end),
//! the watchdog claims it, puts `current` back and re-activates the previous
//! generation, all on the target, so it works when the controller cannot
//! reach the machine any more. Both claims are renames of the same file, so
//! exactly one wins.
//!
//! A generation directory without `.complete` is an install that was cut
//! short; observe reports it, install starts it over, prune removes it.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::command::{argv_summary, exit_text, io_is_transient, unique_suffix};
use super::target::{CommandOutput, Target, TargetError};

/// Where generations live when a machine's spec does not say.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/converge";

/// Roles documents up to this size travel as a command argument (one round
/// trip); larger ones are uploaded. Kept well under Linux's 128 KiB limit on
/// one argument, which also bounds a whole command line sent over SSH.
const INLINE_ROLES_LIMIT: usize = 64 * 1024;
/// The longest a single wait-for-activation round trip blocks on the target.
const MAX_POLL_WINDOW: Duration = Duration::from_secs(10);
/// The unit in which the wait script counts its time (see the script).
const POLL_TICK_MS: u128 = 10;

const OBSERVE_SCRIPT: &str = include_str!("scripts/observe.sh");
const INSTALL_SCRIPT: &str = include_str!("scripts/install.sh");
const SWITCH_SCRIPT: &str = include_str!("scripts/switch.sh");
const ACTIVATE_SCRIPT: &str = include_str!("scripts/activate.sh");
const WAIT_ACTIVATION_SCRIPT: &str = include_str!("scripts/wait_activation.sh");
const PRUNE_SCRIPT: &str = include_str!("scripts/prune.sh");
const ARM_CONFIRMATION_SCRIPT: &str = include_str!("scripts/arm_confirmation.sh");
const CONFIRM_WATCHDOG_SCRIPT: &str = include_str!("scripts/confirm_watchdog.sh");
const CONFIRM_SCRIPT: &str = include_str!("scripts/confirm.sh");
/// The confirmation watchdog counts its window in ticks of this length.
const CONFIRM_TICK_MS: u128 = 100;
/// Exit code of the arm script for "current does not point at the generation".
const EXIT_NOT_CURRENT: i32 = 4;

/// Exit code of the switch and activate scripts for "generation not complete".
const EXIT_NOT_INSTALLED: i32 = 3;

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
    /// Controller clock, Unix milliseconds, when the answer arrived.
    pub observed_ms: u64,
}

impl MachineFacts {
    /// The generation `current` points at, only when that link is healthy.
    pub fn current_generation(&self) -> Option<&GenerationId> {
        match &self.current {
            CurrentLink::Generation { generation } => Some(generation),
            CurrentLink::Absent | CurrentLink::Broken { .. } => None,
        }
    }
}

/// How [`install`] got the generation's files onto the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallOutcome {
    /// The generation was already complete; nothing was done.
    AlreadyPresent,
    /// Copied on the target from a complete generation with the same hash.
    CopiedOnTarget,
    /// The artifact was uploaded.
    Uploaded,
}

/// One run of a generation's `activate`, which [`wait_activation`] can wait
/// for again later (after a timeout, or a controller restart: it serializes).
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
    #[error("stage the roles document at {path}")]
    Stage {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
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
            Self::Stage { source, .. } => io_is_transient(source),
            Self::Script { .. }
            | Self::NotInstalled { .. }
            | Self::ActivationTimedOut { .. }
            | Self::ActivationLost { .. }
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

/// One time budget shared by the round trips of a step.
struct Deadline {
    end: Instant,
    total: Duration,
}

impl Deadline {
    fn new(total: Duration) -> Self {
        Self {
            end: Instant::now() + total,
            total,
        }
    }

    /// Time left, or the timeout error for `step` when none is.
    fn left<T: Target>(&self, t: &T, step: &str) -> Result<Duration, MachineError> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(MachineError::Target {
                step: step.to_owned(),
                target: t.describe(),
                source: TargetError::Timeout {
                    target: t.describe(),
                    what: step.to_owned(),
                    after: self.total,
                },
            })
        } else {
            Ok(left)
        }
    }
}

/// The state directory without trailing slashes, when it is usable.
fn checked_state_dir(state_dir: &str) -> Result<&str, MachineError> {
    let trimmed = state_dir.trim_end_matches('/');
    let valid = trimmed.starts_with('/') && !trimmed.contains(['\n', '\0']);
    if valid {
        Ok(trimmed)
    } else {
        Err(MachineError::InvalidStateDir {
            state_dir: state_dir.to_owned(),
        })
    }
}

fn generation_dir(state_dir: &str, generation: &GenerationId) -> String {
    format!("{state_dir}/generations/{generation}")
}

/// Runs a constant script on the target with `args` as `$1...`; any exit
/// code is returned for the caller to judge.
async fn run_script<T: Target>(
    t: &T,
    step: &str,
    script: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<CommandOutput, MachineError> {
    let mut argv = Vec::with_capacity(args.len() + 4);
    argv.extend(["sh", "-c", script, "converge"].map(str::to_owned));
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    t.run(&argv, &[], timeout)
        .await
        .map_err(|source| MachineError::Target {
            step: step.to_owned(),
            target: t.describe(),
            source,
        })
}

/// Turns a non-zero exit into [`MachineError::Script`] (or `NotInstalled`).
fn require_success<T: Target>(
    t: &T,
    step: &str,
    generation: Option<&GenerationId>,
    output: CommandOutput,
) -> Result<CommandOutput, MachineError> {
    match (output.code, generation) {
        (Some(0), _) => Ok(output),
        (Some(EXIT_NOT_INSTALLED), Some(generation)) => Err(MachineError::NotInstalled {
            target: t.describe(),
            generation: generation.clone(),
        }),
        (code, _) => Err(MachineError::Script {
            step: step.to_owned(),
            target: t.describe(),
            code,
            stderr: output.stderr.trim_end().to_owned(),
        }),
    }
}

fn parse_error<T: Target>(t: &T, step: &str, output: &str) -> MachineError {
    MachineError::Parse {
        step: step.to_owned(),
        target: t.describe(),
        output: output.chars().take(2000).collect(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Reads the machine's facts in one round trip. A state directory that does
/// not exist yet is an empty one (`current` absent, no generations).
pub async fn observe<T: Target>(
    t: &T,
    state_dir: &str,
    timeout: Duration,
) -> Result<MachineFacts, MachineError> {
    const STEP: &str = "observe facts";
    let state_dir = checked_state_dir(state_dir)?;
    let output = run_script(t, STEP, OBSERVE_SCRIPT, &[state_dir], timeout).await?;
    let output = require_success(t, STEP, None, output)?;
    RawFacts::parse(&output.stdout)
        .into_facts(state_dir, now_ms())
        .ok_or_else(|| parse_error(t, STEP, &output.stdout))
}

/// [`observe`] for a state directory on the controller's own host, without
/// a process: the same facts `observe.sh` prints, read in-process (a few
/// small files and one directory listing, tens of microseconds instead of
/// a `sh` spawn of milliseconds). The reads run on tokio's blocking pool
/// within `timeout`, so a hung filesystem cannot stall the runtime.
pub async fn observe_local(
    state_dir: &str,
    timeout: Duration,
) -> Result<MachineFacts, MachineError> {
    const STEP: &str = "observe facts";
    const TARGET: &str = "local";
    let state_dir = checked_state_dir(state_dir)?.to_owned();
    let dir = state_dir.clone();
    let read = tokio::task::spawn_blocking(move || RawFacts::read_local(Path::new(&dir)));
    let raw = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(join_error)) => {
            return Err(MachineError::Target {
                step: STEP.to_owned(),
                target: TARGET.to_owned(),
                source: TargetError::Io {
                    target: TARGET.to_owned(),
                    action: "read facts under",
                    path: state_dir.into(),
                    source: std::io::Error::other(join_error),
                },
            });
        }
        Err(_elapsed) => {
            return Err(MachineError::Target {
                step: STEP.to_owned(),
                target: TARGET.to_owned(),
                source: TargetError::Timeout {
                    target: TARGET.to_owned(),
                    what: STEP.to_owned(),
                    after: timeout,
                },
            });
        }
    };
    // A host fact that could not be read fails as the script's output would.
    let unreadable = |what: String| MachineError::Parse {
        step: STEP.to_owned(),
        target: TARGET.to_owned(),
        output: what,
    };
    let missing: Vec<&str> = [
        ("hostname", raw.hostname.is_none()),
        ("boot_id", raw.boot_id.is_none()),
        ("uptime", raw.uptime_secs.is_none()),
        ("kernel", raw.kernel.is_none()),
    ]
    .into_iter()
    .filter_map(|(name, missing)| missing.then_some(name))
    .collect();
    if !missing.is_empty() {
        return Err(unreadable(format!("could not read {}", missing.join(", "))));
    }
    raw.into_facts(&state_dir, now_ms())
        .ok_or_else(|| unreadable("incomplete facts".to_owned()))
}

/// What `observe.sh` reports, before it is judged: one field per key of its
/// output. Filled either by parsing the script's output or, on the
/// controller's own host, by reading the same files in-process; both end in
/// [`RawFacts::into_facts`], so they cannot judge differently.
#[derive(Debug, Default)]
struct RawFacts {
    hostname: Option<String>,
    boot_id: Option<String>,
    uptime_secs: Option<u64>,
    kernel: Option<String>,
    /// The link text of `current`, when it is a symlink.
    current_text: Option<String>,
    /// `current/.complete` exists (through the link).
    current_complete: bool,
    /// `current` exists and is not a symlink.
    current_not_link: bool,
    /// Directory names under `generations/` with `.complete`, and without.
    generations: Vec<String>,
    incomplete: Vec<String>,
}

/// "12345.67": whole seconds are enough.
fn uptime_secs(text: &str) -> Option<u64> {
    text.split('.').next().and_then(|s| s.parse().ok())
}

impl RawFacts {
    /// Reads `observe.sh`'s `key=value` lines; unknown keys are ignored.
    fn parse(stdout: &str) -> RawFacts {
        let mut raw = RawFacts::default();
        for line in stdout.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "hostname" => raw.hostname = Some(value.to_owned()),
                "boot_id" => raw.boot_id = Some(value.to_owned()),
                "uptime" => raw.uptime_secs = uptime_secs(value),
                "kernel" => raw.kernel = Some(value.to_owned()),
                "current" => raw.current_text = Some(value.to_owned()),
                "current_complete" => raw.current_complete = value == "1",
                "current_not_link" => raw.current_not_link = value == "1",
                "generation" => raw.generations.push(value.to_owned()),
                "incomplete" => raw.incomplete.push(value.to_owned()),
                _ => {}
            }
        }
        raw
    }

    /// What `observe.sh` would print for `state_dir` on this host, read
    /// in-process. Mirrors the script line by line: a file it cannot read
    /// leaves its field empty (and the facts unparseable), an unreadable
    /// `generations/` lists nothing, names are whole directory entries.
    fn read_local(state_dir: &Path) -> RawFacts {
        use std::fs;
        // `read -r` and `$(...)` drop surrounding blanks and trailing newlines.
        let first_line = |path: &str| {
            fs::read_to_string(path)
                .ok()
                .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
        };
        let mut raw = RawFacts {
            // `uname -n` and `uname -r` read the UTS namespace these files show.
            hostname: first_line("/proc/sys/kernel/hostname"),
            boot_id: first_line("/proc/sys/kernel/random/boot_id"),
            uptime_secs: first_line("/proc/uptime")
                .and_then(|l| l.split_whitespace().next().and_then(uptime_secs)),
            kernel: first_line("/proc/sys/kernel/osrelease"),
            ..RawFacts::default()
        };
        let current = state_dir.join("current");
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let text = fs::read_link(&current)
                    .map(|t| t.to_string_lossy().trim_end_matches('\n').to_owned())
                    .unwrap_or_default();
                raw.current_text = Some(text);
                raw.current_complete = current.join(".complete").exists();
            }
            Ok(_) => raw.current_not_link = true,
            Err(_) => {}
        }
        let Ok(entries) = fs::read_dir(state_dir.join("generations")) else {
            return raw;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            // The glob `*` skips hidden entries; `[ -d ] && [ ! -L ]` keeps real directories.
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || name.contains('\n') {
                continue;
            }
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir {
                continue;
            }
            if entry.path().join(".complete").exists() {
                raw.generations.push(name.to_owned());
            } else {
                raw.incomplete.push(name.to_owned());
            }
        }
        raw
    }

    /// Judges the raw report: generations named `<n>-<hash>` only (other
    /// directories are not converge's), `current` healthy only when it links
    /// to a complete generation. `None` when a host fact is missing.
    fn into_facts(self, state_dir: &str, observed_ms: u64) -> Option<MachineFacts> {
        let mut generations: Vec<GenerationId> = self
            .generations
            .iter()
            .filter_map(|n| GenerationId::from_dir_name(n))
            .collect();
        let mut incomplete: Vec<GenerationId> = self
            .incomplete
            .iter()
            .filter_map(|n| GenerationId::from_dir_name(n))
            .collect();
        generations.sort();
        incomplete.sort();
        let current = match self.current_text {
            None if self.current_not_link => CurrentLink::Broken {
                target: "<not a symlink>".to_owned(),
                generation: None,
            },
            None => CurrentLink::Absent,
            Some(text) => {
                let absolute_prefix = format!("{state_dir}/generations/");
                let generation = text
                    .strip_prefix("generations/")
                    .or_else(|| text.strip_prefix(absolute_prefix.as_str()))
                    .and_then(|name| GenerationId::from_dir_name(name.trim_end_matches('/')));
                match generation {
                    Some(generation) if self.current_complete => {
                        CurrentLink::Generation { generation }
                    }
                    generation => CurrentLink::Broken {
                        target: text,
                        generation,
                    },
                }
            }
        };
        Some(MachineFacts {
            hostname: self.hostname?,
            boot_id: self.boot_id?,
            uptime_secs: self.uptime_secs?,
            kernel: self.kernel?,
            current,
            generations,
            incomplete,
            observed_ms,
        })
    }
}

/// Puts `generation` on the target: its artifact (the local tree `artifact`,
/// whose tree hash the caller vouches is `generation.hash()`) and the roles
/// document, then the `.complete` marker last. Never touches `current`.
///
/// Nothing happens when the generation is already complete. When another
/// complete generation with the same hash exists, its artifact is copied on
/// the target instead of uploading. An incomplete directory left by an
/// earlier attempt is removed first. One round trip when nothing needs
/// uploading; otherwise two plus the upload (three for a roles document over
/// 64 KiB, which is uploaded too).
pub async fn install<T: Target>(
    t: &T,
    state_dir: &str,
    artifact: &Path,
    roles_json: &[u8],
    generation: &GenerationId,
    timeout: Duration,
) -> Result<InstallOutcome, MachineError> {
    let step = format!("install generation {generation}");
    let state_dir = checked_state_dir(state_dir)?;
    let roles = std::str::from_utf8(roles_json).map_err(|source| MachineError::InvalidRoles {
        generation: generation.clone(),
        source,
    })?;
    let deadline = Deadline::new(timeout);
    let name = generation.to_string();
    let dir = generation_dir(state_dir, generation);
    let inline = roles.len() <= INLINE_ROLES_LIMIT;
    let mut args = vec![
        "prepare",
        state_dir,
        name.as_str(),
        generation.hash(),
        if inline { "inline" } else { "staged" },
    ];
    if inline {
        args.push(roles);
    }

    let prepared = run_script(t, &step, INSTALL_SCRIPT, &args, deadline.left(t, &step)?).await?;
    let prepared = require_success(t, &step, None, prepared)?;
    let outcome = match prepared.stdout.trim() {
        "present" => return Ok(InstallOutcome::AlreadyPresent),
        "installed" => return Ok(InstallOutcome::CopiedOnTarget),
        "copied" => InstallOutcome::CopiedOnTarget,
        "upload" => {
            let dest = format!("{dir}/artifact");
            t.upload_dir(artifact, &dest, deadline.left(t, &step)?)
                .await
                .map_err(|source| MachineError::Target {
                    step: step.clone(),
                    target: t.describe(),
                    source,
                })?;
            InstallOutcome::Uploaded
        }
        _ => return Err(parse_error(t, &step, &prepared.stdout)),
    };
    if !inline {
        upload_roles(t, &step, roles_json, &dir, &deadline).await?;
    }
    args[0] = "finish";
    let finished = run_script(t, &step, INSTALL_SCRIPT, &args, deadline.left(t, &step)?).await?;
    require_success(t, &step, None, finished)?;
    Ok(outcome)
}

/// Uploads a large roles document as `<dir>/.roles-staged/roles.json`.
async fn upload_roles<T: Target>(
    t: &T,
    step: &str,
    roles_json: &[u8],
    dir: &str,
    deadline: &Deadline,
) -> Result<(), MachineError> {
    let staging = std::env::temp_dir().join(format!("converge-roles-{}", unique_suffix()));
    let stage = async {
        tokio::fs::create_dir(&staging).await?;
        tokio::fs::write(staging.join("roles.json"), roles_json).await
    };
    let staged = stage.await.map_err(|source| MachineError::Stage {
        path: staging.clone(),
        source,
    });
    let uploaded = match staged {
        Ok(()) => {
            let dest = format!("{dir}/.roles-staged");
            match deadline.left(t, step) {
                Ok(left) => t.upload_dir(&staging, &dest, left).await.map_err(|source| {
                    MachineError::Target {
                        step: step.to_owned(),
                        target: t.describe(),
                        source,
                    }
                }),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };
    if let Err(error) = tokio::fs::remove_dir_all(&staging).await {
        tracing::warn!(path = %staging.display(), %error, "could not remove a staged roles document");
    }
    uploaded
}

/// Points `current` at `generation` by one rename: a reader sees the old link
/// or the new one, never none. Fails with [`MachineError::NotInstalled`] when
/// the generation is not complete.
pub async fn switch<T: Target>(
    t: &T,
    state_dir: &str,
    generation: &GenerationId,
    timeout: Duration,
) -> Result<(), MachineError> {
    let step = format!("switch to generation {generation}");
    let state_dir = checked_state_dir(state_dir)?;
    let name = generation.to_string();
    let suffix = unique_suffix();
    let output = run_script(
        t,
        &step,
        SWITCH_SCRIPT,
        &[state_dir, &name, &suffix],
        timeout,
    )
    .await?;
    require_success(t, &step, Some(generation), output)?;
    Ok(())
}

fn checked_mode(mode: &str) -> Result<&str, MachineError> {
    let valid = !mode.is_empty()
        && mode.len() <= 32
        && mode
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(mode)
    } else {
        Err(MachineError::InvalidMode {
            mode: mode.to_owned(),
        })
    }
}

/// Starts `<generation>/artifact/activate <mode>` detached on the target and
/// returns at once. It runs in its own session with cwd `artifact/` and env
/// `CONVERGE_ROLES` (path of the generation's roles.json), `CONVERGE_MODE`,
/// `CONVERGE_GENERATION` (`<n>-<hash>`), so it survives the command (and, over
/// SSH, the connection) that started it.
///
/// Every call is a new attempt with its own log and status, so activating a
/// generation again (a rollback) runs it again and never reads an older
/// attempt's result. Does not look at `current`.
pub async fn start_activation<T: Target>(
    t: &T,
    state_dir: &str,
    generation: &GenerationId,
    mode: &str,
    timeout: Duration,
) -> Result<ActivationAttempt, MachineError> {
    let step = format!("start activation of generation {generation}");
    let state_dir = checked_state_dir(state_dir)?;
    let mode = checked_mode(mode)?;
    let attempt = ActivationAttempt {
        generation: generation.clone(),
        id: unique_suffix(),
    };
    let dir = generation_dir(state_dir, generation);
    let name = generation.to_string();
    let output = run_script(
        t,
        &step,
        ACTIVATE_SCRIPT,
        &[&dir, &name, mode, &attempt.id],
        timeout,
    )
    .await?;
    let output = require_success(t, &step, Some(generation), output)?;
    if output.stdout.trim() != "started" {
        return Err(parse_error(t, &step, &output.stdout));
    }
    Ok(attempt)
}

/// Waits until `attempt` has ended and returns its exit code and log.
///
/// Each round trip blocks on the target for up to 10 s, checking every 10 ms
/// for the first 200 ms and every 50 ms after, so a finished activation is
/// seen within about 50 ms at a cost of one round trip per 10 s. At the timeout: [`MachineError::ActivationTimedOut`], and the
/// activation keeps running; call again to keep waiting. When its runner is
/// gone without a status: [`MachineError::ActivationLost`].
pub async fn wait_activation<T: Target>(
    t: &T,
    state_dir: &str,
    attempt: &ActivationAttempt,
    timeout: Duration,
) -> Result<ActivationResult, MachineError> {
    let step = format!("wait for activation of generation {}", attempt.generation);
    let state_dir = checked_state_dir(state_dir)?;
    let valid_id = !attempt.id.is_empty()
        && attempt
            .id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-');
    if !valid_id {
        return Err(MachineError::InvalidAttempt {
            id: attempt.id.clone(),
        });
    }
    let dir = generation_dir(state_dir, &attempt.generation);
    let timed_out = || MachineError::ActivationTimedOut {
        target: t.describe(),
        attempt: attempt.clone(),
        after: timeout,
    };
    let deadline = Deadline::new(timeout);
    loop {
        let Ok(left) = deadline.left(t, &step) else {
            return Err(timed_out());
        };
        let window = (left * 3 / 4).min(MAX_POLL_WINDOW);
        let ticks = (window.as_millis() / POLL_TICK_MS).max(1).to_string();
        let output = match run_script(
            t,
            &step,
            WAIT_ACTIVATION_SCRIPT,
            &[&dir, &attempt.id, &ticks],
            left,
        )
        .await
        {
            Ok(output) => output,
            Err(MachineError::Target { source, .. }) if source.is_timeout() => {
                return Err(timed_out());
            }
            Err(error) => return Err(error),
        };
        let output = require_success(t, &step, None, output)?;
        let Some((log, status)) = split_status(&output.stdout) else {
            return Err(parse_error(t, &step, &output.stdout));
        };
        match status {
            "running" => continue,
            "lost" => {
                return Err(MachineError::ActivationLost {
                    target: t.describe(),
                    attempt: attempt.clone(),
                });
            }
            code => match code.parse() {
                Ok(code) => {
                    return Ok(ActivationResult {
                        code,
                        log: log.to_owned(),
                    });
                }
                Err(_) => return Err(parse_error(t, &step, &output.stdout)),
            },
        }
    }
}

/// Splits the wait script's output into (log, status word).
fn split_status(stdout: &str) -> Option<(&str, &str)> {
    const MARK: &str = "converge-status=";
    let body = stdout.strip_suffix('\n').unwrap_or(stdout);
    let (log, line) = match body.rfind(&format!("\n{MARK}")) {
        Some(at) => (&body[..at], &body[at + 1..]),
        None => ("", body),
    };
    line.strip_prefix(MARK).map(|status| (log, status))
}

/// Activates `generation` ([`start_activation`]) and waits for it
/// ([`wait_activation`]) within one timeout.
pub async fn activate<T: Target>(
    t: &T,
    state_dir: &str,
    generation: &GenerationId,
    mode: &str,
    timeout: Duration,
) -> Result<ActivationResult, MachineError> {
    let step = format!("activate generation {generation}");
    let deadline = Deadline::new(timeout);
    let attempt = start_activation(t, state_dir, generation, mode, timeout).await?;
    wait_activation(t, state_dir, &attempt, deadline.left(t, &step)?).await
}

/// Runs a health check command on the target. `Ok` only for exit code 0; a
/// non-zero exit is [`MachineError::HealthCheckFailed`] (with the output), a
/// timeout [`MachineError::HealthCheckTimedOut`]; both answer
/// [`MachineError::is_health_failure`].
pub async fn health_check<T: Target>(
    t: &T,
    argv: &[String],
    timeout: Duration,
) -> Result<CommandOutput, MachineError> {
    match t.run(argv, &[], timeout).await {
        Ok(output) if output.succeeded() => Ok(output),
        Ok(output) => Err(MachineError::HealthCheckFailed {
            target: t.describe(),
            argv: argv.to_vec(),
            output,
        }),
        Err(source) if source.is_timeout() => Err(MachineError::HealthCheckTimedOut {
            target: t.describe(),
            argv: argv.to_vec(),
            after: timeout,
        }),
        Err(source) => Err(MachineError::Target {
            step: format!("run health check `{}`", argv_summary(argv)),
            target: t.describe(),
            source,
        }),
    }
}

/// Switches back to `to` and activates it again (a new attempt), within one
/// timeout. The activation's exit code is in the result.
pub async fn rollback<T: Target>(
    t: &T,
    state_dir: &str,
    to: &GenerationId,
    mode: &str,
    timeout: Duration,
) -> Result<ActivationResult, MachineError> {
    let step = format!("roll back to generation {to}");
    let deadline = Deadline::new(timeout);
    switch(t, state_dir, to, timeout).await?;
    activate(t, state_dir, to, mode, deadline.left(t, &step)?).await
}

/// Whether activating in `mode` changes what runs now, so that a lost
/// machine must be rolled back (switch and test; not boot or dry-activate).
pub fn needs_confirmation(mode: &str) -> bool {
    matches!(mode, "switch" | "test")
}

/// An armed confirmation: what the watchdog on the target watches. Store it
/// (it serializes) to ask [`confirmation_state`] again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// Names the canary `confirm/<id>`; `[0-9a-f-]` only.
    pub id: String,
    /// The activation being confirmed.
    pub attempt: ActivationAttempt,
    /// What the watchdog goes back to; `None`: it removes `current`.
    pub previous: Option<GenerationId>,
    /// The mode the previous generation is re-activated in.
    pub mode: String,
    /// The window, counted from the end of the activation.
    pub timeout: Duration,
    /// The id the watchdog's re-activation of `previous` gets.
    pub rollback_id: String,
}

impl Confirmation {
    /// The watchdog's re-activation of `previous`, for [`wait_activation`]
    /// (it exists only once the watchdog fired).
    pub fn rollback_attempt(&self) -> Option<ActivationAttempt> {
        self.previous.as_ref().map(|generation| ActivationAttempt {
            generation: generation.clone(),
            id: self.rollback_id.clone(),
        })
    }
}

/// What [`confirm`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfirmOutcome {
    /// The canary was claimed in time (now or by an earlier call): the
    /// watchdog will not fire.
    Confirmed,
    /// Too late: the watchdog fired first. The deploy failed; report it.
    AlreadyRolledBack { rollback: Rollback },
}

/// Where an armed confirmation stands, read without changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfirmationState {
    /// Not claimed yet; the watchdog runs.
    Pending,
    /// Not claimed, and the watchdog is gone (killed, or the host rebooted):
    /// nothing will roll back on its own. The controller decides.
    WatchdogLost,
    Confirmed,
    /// The watchdog fired.
    Fired {
        rollback: Rollback,
    },
}

/// What a watchdog that fired did (or is doing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    pub action: RollbackAction,
    /// How the confirmed activation ended, as the watchdog saw it; `None`
    /// when its runner was lost, or while the record is not written yet.
    pub activation_code: Option<i32>,
    /// Target clock, Unix seconds, when the watchdog fired; `None` while in progress.
    pub fired_unix: Option<u64>,
}

/// The watchdog's action once it fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackAction {
    /// Fired; switching back and re-activating is still under way.
    InProgress,
    /// `current` points at `to` again and `to` was re-activated as
    /// `attempt`; `code` is its exit code (`None`: its runner was lost).
    RolledBack {
        to: GenerationId,
        attempt: ActivationAttempt,
        code: Option<i32>,
    },
    /// There was no previous generation: `current` was removed.
    CurrentRemoved,
    /// `current` had already moved to `current` (another deploy or a manual
    /// switch), so nothing was changed.
    Superseded { current: String },
    /// Rolling back failed on the target.
    Failed { reason: String },
}

fn checked_id(id: &str) -> Result<&str, MachineError> {
    let valid =
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if valid {
        Ok(id)
    } else {
        Err(MachineError::InvalidAttempt { id: id.to_owned() })
    }
}

/// Arms magic rollback for `attempt` (a [`start_activation`] of the
/// generation `current` points at, in a mode that [`needs_confirmation`]).
/// One round trip; returns once the watchdog runs on the target, detached
/// from this connection.
///
/// The watchdog waits for the activation to end, then `confirm_timeout` for
/// [`confirm`]. Unclaimed by then, it switches `current` back to `previous`
/// and re-activates it in `mode` (or removes `current` when `previous` is
/// `None`), unless `current` has moved on meanwhile. Arming right after
/// [`start_activation`], before waiting for it, covers an activation that
/// cuts the controller off. The controller must claim the canary either way:
/// with [`confirm`] once satisfied, or with [`confirm`] before rolling back
/// by itself, so that two rollbacks never race.
pub async fn arm_confirmation<T: Target>(
    t: &T,
    state_dir: &str,
    attempt: &ActivationAttempt,
    previous: Option<&GenerationId>,
    mode: &str,
    confirm_timeout: Duration,
    timeout: Duration,
) -> Result<Confirmation, MachineError> {
    let step = format!("arm confirmation of generation {}", attempt.generation);
    let state_dir = checked_state_dir(state_dir)?;
    let mode = checked_mode(mode)?;
    checked_id(&attempt.id)?;
    if !needs_confirmation(mode) {
        return Err(MachineError::NothingToConfirm {
            mode: mode.to_owned(),
        });
    }
    let confirmation = Confirmation {
        id: unique_suffix(),
        attempt: attempt.clone(),
        previous: previous.cloned(),
        mode: mode.to_owned(),
        timeout: confirm_timeout,
        rollback_id: unique_suffix(),
    };
    let ticks = confirm_timeout
        .as_millis()
        .div_ceil(CONFIRM_TICK_MS)
        .max(1)
        .to_string();
    let generation = attempt.generation.to_string();
    let previous_name = previous.map(ToString::to_string).unwrap_or_default();
    let output = run_script(
        t,
        &step,
        ARM_CONFIRMATION_SCRIPT,
        &[
            state_dir,
            &confirmation.id,
            &generation,
            &attempt.id,
            &previous_name,
            mode,
            &ticks,
            &confirmation.rollback_id,
            CONFIRM_WATCHDOG_SCRIPT,
            ACTIVATE_SCRIPT,
        ],
        timeout,
    )
    .await?;
    if output.code == Some(EXIT_NOT_CURRENT) {
        return Err(MachineError::NotCurrent {
            target: t.describe(),
            generation: attempt.generation.clone(),
        });
    }
    let not_installed = previous
        .filter(|_| {
            output.code == Some(EXIT_NOT_INSTALLED) && output.stderr.contains(&previous_name)
        })
        .unwrap_or(&attempt.generation);
    let output = require_success(t, &step, Some(not_installed), output)?;
    if output.stdout.trim() != "armed" {
        return Err(parse_error(t, &step, &output.stdout));
    }
    Ok(confirmation)
}

/// Claims the canary of `confirmation`, so the watchdog never fires. One
/// round trip; safe to repeat (a confirmation already claimed by an earlier
/// call, whose answer was lost, is [`ConfirmOutcome::Confirmed`] again).
/// When the watchdog fired first: [`ConfirmOutcome::AlreadyRolledBack`].
/// Call it over a new connection to prove the machine still accepts them.
pub async fn confirm<T: Target>(
    t: &T,
    state_dir: &str,
    confirmation: &Confirmation,
    timeout: Duration,
) -> Result<ConfirmOutcome, MachineError> {
    let step = format!("confirm generation {}", confirmation.attempt.generation);
    match read_confirmation(t, &step, state_dir, confirmation, "confirm", timeout).await? {
        ConfirmationState::Confirmed => Ok(ConfirmOutcome::Confirmed),
        ConfirmationState::Fired { rollback } => Ok(ConfirmOutcome::AlreadyRolledBack { rollback }),
        // The canary is still there although the rename was tried.
        ConfirmationState::Pending | ConfirmationState::WatchdogLost => Err(MachineError::Script {
            step,
            target: t.describe(),
            code: Some(1),
            stderr: "could not rename the canary".to_owned(),
        }),
    }
}

/// Reads where `confirmation` stands, changing nothing (one round trip):
/// after a restart, or to learn how a rollback ended.
pub async fn confirmation_state<T: Target>(
    t: &T,
    state_dir: &str,
    confirmation: &Confirmation,
    timeout: Duration,
) -> Result<ConfirmationState, MachineError> {
    let step = format!(
        "read the confirmation of generation {}",
        confirmation.attempt.generation
    );
    read_confirmation(t, &step, state_dir, confirmation, "state", timeout).await
}

async fn read_confirmation<T: Target>(
    t: &T,
    step: &str,
    state_dir: &str,
    confirmation: &Confirmation,
    phase: &str,
    timeout: Duration,
) -> Result<ConfirmationState, MachineError> {
    let state_dir = checked_state_dir(state_dir)?;
    let id = checked_id(&confirmation.id)?;
    let output = run_script(t, step, CONFIRM_SCRIPT, &[state_dir, id, phase], timeout).await?;
    let output = require_success(t, step, None, output)?;
    let fields: Vec<(&str, &str)> = output
        .stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let field = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let state = match field("state") {
        Some("pending") => ConfirmationState::Pending,
        Some("watchdog-lost") => ConfirmationState::WatchdogLost,
        Some("confirmed") => ConfirmationState::Confirmed,
        Some("firing") => ConfirmationState::Fired {
            rollback: Rollback {
                action: RollbackAction::InProgress,
                activation_code: None,
                fired_unix: None,
            },
        },
        Some("fired") => {
            let action = match field("action") {
                Some("rolled-back") => {
                    let to = field("previous").and_then(GenerationId::from_dir_name);
                    let attempt_id = field("rollback_attempt").unwrap_or_default();
                    match to {
                        Some(to) => RollbackAction::RolledBack {
                            attempt: ActivationAttempt {
                                generation: to.clone(),
                                id: attempt_id.to_owned(),
                            },
                            to,
                            code: field("rollback_status").and_then(|c| c.parse().ok()),
                        },
                        None => return Err(parse_error(t, step, &output.stdout)),
                    }
                }
                Some("current-removed") => RollbackAction::CurrentRemoved,
                Some("superseded") => RollbackAction::Superseded {
                    current: field("current").unwrap_or_default().to_owned(),
                },
                Some("failed") => RollbackAction::Failed {
                    reason: field("reason").unwrap_or_default().to_owned(),
                },
                _ => return Err(parse_error(t, step, &output.stdout)),
            };
            ConfirmationState::Fired {
                rollback: Rollback {
                    action,
                    activation_code: field("activation").and_then(|c| c.parse().ok()),
                    fired_unix: field("fired").and_then(|f| f.parse().ok()),
                },
            }
        }
        Some("missing") => {
            return Err(MachineError::ConfirmationMissing {
                target: t.describe(),
                id: id.to_owned(),
            });
        }
        _ => return Err(parse_error(t, step, &output.stdout)),
    };
    Ok(state)
}

/// Removes old generations and returns the ones removed: keeps the `keep`
/// newest complete generations, every generation in `protect` and the one
/// `current` points at (even through a broken link); removes the other
/// complete ones and every incomplete one. Two round trips (observe, remove).
/// Must not run while an install on the same state directory runs.
pub async fn prune<T: Target>(
    t: &T,
    state_dir: &str,
    keep: usize,
    protect: &[GenerationId],
    timeout: Duration,
) -> Result<Vec<GenerationId>, MachineError> {
    const STEP: &str = "prune generations";
    let deadline = Deadline::new(timeout);
    let facts = observe(t, state_dir, timeout).await?;
    let state_dir = checked_state_dir(state_dir)?;
    let current = match &facts.current {
        CurrentLink::Generation { generation } => Some(generation),
        CurrentLink::Broken { generation, .. } => generation.as_ref(),
        CurrentLink::Absent => None,
    };
    let mut complete = facts.generations.clone();
    complete.sort_by(|a, b| b.cmp(a));
    let removed: Vec<GenerationId> = complete
        .into_iter()
        .skip(keep)
        .chain(facts.incomplete.iter().cloned())
        .filter(|generation| Some(generation) != current && !protect.contains(generation))
        .collect();
    if removed.is_empty() {
        return Ok(removed);
    }
    let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
    let mut args = vec![state_dir];
    args.extend(names.iter().map(String::as_str));
    let output = run_script(t, STEP, PRUNE_SCRIPT, &args, deadline.left(t, STEP)?).await?;
    require_success(t, STEP, None, output)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::build::tree_hash;
    use crate::driver::local::LocalTarget;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const T: Duration = Duration::from_secs(20);

    /// Records its arguments, environment and cwd, counts its runs in the
    /// state directory, and exits with the code in the artifact's `exit-code`.
    const ACTIVATE: &str = r#"#!/bin/sh
echo "mode=$1 env_mode=$CONVERGE_MODE generation=$CONVERGE_GENERATION"
echo "roles=$(cat "$CONVERGE_ROLES")"
echo "cwd=$(pwd)"
echo "$CONVERGE_GENERATION" >> "${CONVERGE_ROLES%/generations/*}/activation-runs"
read -r code < exit-code
echo "exiting with $code" >&2
exit "$code"
"#;

    struct Machine {
        dir: tempfile::TempDir,
        state_dir: String,
        target: LocalTarget,
    }

    impl Machine {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let state_dir = dir.path().join("state").to_str().expect("utf-8").to_owned();
            Self {
                target: LocalTarget::new(state_dir.clone()),
                state_dir,
                dir,
            }
        }

        fn state(&self) -> PathBuf {
            PathBuf::from(&self.state_dir)
        }

        /// A local artifact tree whose activate exits with `code`; `version`
        /// makes its hash differ from other artifacts.
        fn artifact(&self, name: &str, version: &str, code: i32) -> (PathBuf, String) {
            let root = self.dir.path().join("artifacts").join(name);
            fs::create_dir_all(root.join("share")).expect("mkdir");
            fs::write(root.join("activate"), ACTIVATE).expect("write");
            fs::set_permissions(root.join("activate"), fs::Permissions::from_mode(0o755))
                .expect("chmod");
            fs::write(root.join("exit-code"), code.to_string()).expect("write");
            fs::write(root.join("share/version"), version).expect("write");
            std::os::unix::fs::symlink("share/version", root.join("version-link"))
                .expect("symlink");
            let hash = tree_hash(&root).expect("hash");
            (root, hash)
        }

        async fn installed(&self, number: u64, version: &str, code: i32) -> GenerationId {
            let (root, hash) = self.artifact(&format!("a{number}"), version, code);
            let generation = GenerationId::new(number, hash).expect("generation");
            install(
                &self.target,
                &self.state_dir,
                &root,
                b"{\"r\":1}",
                &generation,
                T,
            )
            .await
            .expect("install");
            generation
        }

        fn runs(&self) -> Vec<String> {
            fs::read_to_string(self.state().join("activation-runs"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    #[tokio::test]
    async fn observe_on_an_empty_state_dir_finds_no_generations() {
        let m = Machine::new();
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.current, CurrentLink::Absent);
        assert!(facts.generations.is_empty() && facts.incomplete.is_empty());
        assert!(!facts.hostname.is_empty());
        assert_eq!(facts.boot_id.len(), 36, "{}", facts.boot_id);
        let uname = std::process::Command::new("uname")
            .arg("-r")
            .output()
            .expect("uname");
        assert_eq!(facts.kernel, String::from_utf8_lossy(&uname.stdout).trim());
        assert!(facts.observed_ms > 1_600_000_000_000);
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
        assert_eq!(facts.boot_id, boot_id.trim());
    }

    /// Observes `m` through the script and in-process and asserts both
    /// report the same facts (uptime may tick between the two reads).
    async fn assert_observers_agree(m: &Machine, case: &str) -> MachineFacts {
        let script = observe(&m.target, &m.state_dir, T)
            .await
            .unwrap_or_else(|e| panic!("{case}: script observe: {e}"));
        let native = observe_local(&m.state_dir, T)
            .await
            .unwrap_or_else(|e| panic!("{case}: in-process observe: {e}"));
        assert!(
            native.uptime_secs.abs_diff(script.uptime_secs) <= 1,
            "{case}: uptime {} vs {}",
            native.uptime_secs,
            script.uptime_secs
        );
        let normalized = MachineFacts {
            observed_ms: script.observed_ms,
            uptime_secs: script.uptime_secs,
            ..native
        };
        assert_eq!(normalized, script, "{case}");
        normalized
    }

    #[tokio::test]
    async fn observe_local_reports_exactly_what_the_observe_script_reports() {
        let m = Machine::new();
        let state = m.state();
        let facts = assert_observers_agree(&m, "state dir missing").await;
        assert_eq!(facts.current, CurrentLink::Absent);
        fs::create_dir_all(state.join("generations")).expect("mkdir");
        assert_observers_agree(&m, "empty").await;

        let good = m.installed(1, "v1", 0).await;
        switch(&m.target, &m.state_dir, &good, T)
            .await
            .expect("switch");
        let facts = assert_observers_agree(&m, "healthy").await;
        assert_eq!(facts.current_generation(), Some(&good));

        // Entries neither observer may count, and one incomplete generation.
        let generations = state.join("generations");
        fs::create_dir_all(generations.join("2-abc/artifact")).expect("mkdir");
        fs::create_dir_all(generations.join("not-ours")).expect("mkdir");
        fs::create_dir_all(generations.join(".5-hidden")).expect("mkdir");
        fs::write(generations.join("3-def"), "a file").expect("write");
        std::os::unix::fs::symlink(good.to_string(), generations.join("4-aaa")).expect("symlink");
        let facts = assert_observers_agree(&m, "incomplete and foreign entries").await;
        assert_eq!(facts.generations, std::slice::from_ref(&good));
        assert_eq!(facts.incomplete.len(), 1);

        let current = state.join("current");
        let relink = |target: &str| {
            fs::remove_file(&current).expect("rm current");
            std::os::unix::fs::symlink(target, &current).expect("symlink");
        };
        relink("generations/2-abc");
        assert_observers_agree(&m, "current -> incomplete").await;
        relink("generations/9-gone");
        assert_observers_agree(&m, "current -> missing").await;
        relink("/tmp");
        assert_observers_agree(&m, "current -> foreign").await;
        let absolute = format!("{}/generations/{good}/", m.state_dir);
        relink(&absolute);
        let facts = assert_observers_agree(&m, "current -> absolute path").await;
        assert_eq!(facts.current_generation(), Some(&good));
        fs::remove_file(&current).expect("rm current");
        fs::create_dir(&current).expect("mkdir current");
        let facts = assert_observers_agree(&m, "current is a directory").await;
        assert!(matches!(
            facts.current,
            CurrentLink::Broken {
                generation: None,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn install_switch_activate_runs_the_generation_and_records_it() {
        let m = Machine::new();
        let (root, hash) = m.artifact("a1", "v1", 0);
        let generation = GenerationId::new(1, hash).expect("generation");
        let outcome = install(
            &m.target,
            &m.state_dir,
            &root,
            b"{\"role\":\"peer\"}",
            &generation,
            T,
        )
        .await
        .expect("install");
        assert_eq!(outcome, InstallOutcome::Uploaded);
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.generations, std::slice::from_ref(&generation));
        assert_eq!(facts.current, CurrentLink::Absent, "install never switches");

        switch(&m.target, &m.state_dir, &generation, T)
            .await
            .expect("switch");
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.current_generation(), Some(&generation));

        let result = activate(&m.target, &m.state_dir, &generation, "switch", T)
            .await
            .expect("activate");
        assert_eq!(result.code, 0);
        let dir = m.state().join("generations").join(generation.to_string());
        assert_eq!(
            result.log,
            format!(
                "mode=switch env_mode=switch generation={generation}\nroles={{\"role\":\"peer\"}}\ncwd={}\nexiting with 0\n",
                dir.join("artifact").display()
            )
        );
        let current = m.state().join("current");
        assert_eq!(
            fs::read_link(&current).expect("link"),
            PathBuf::from(format!("generations/{generation}"))
        );
        assert_eq!(
            fs::read_to_string(current.join("activate.log")).expect("log"),
            result.log
        );
        assert_eq!(
            fs::read_to_string(current.join("activate.status")).expect("status"),
            "0\n"
        );
        assert_eq!(
            fs::read_to_string(current.join("roles.json")).expect("roles"),
            "{\"role\":\"peer\"}"
        );
        assert_eq!(
            tree_hash(&current.join("artifact")).expect("hash"),
            generation.hash()
        );
        assert_eq!(m.runs(), [generation.to_string()]);
    }

    #[tokio::test]
    async fn a_failed_activation_is_a_result_with_its_code_and_log() {
        let m = Machine::new();
        let generation = m.installed(1, "v1", 4).await;
        let result = activate(&m.target, &m.state_dir, &generation, "test", T)
            .await
            .expect("activation ran");
        assert_eq!(result.code, 4);
        assert!(!result.succeeded());
        assert!(result.log.ends_with("exiting with 4\n"), "{}", result.log);
    }

    #[tokio::test]
    async fn rollback_reactivates_an_older_generation_as_a_new_attempt() {
        let m = Machine::new();
        let good = m.installed(1, "v1", 0).await;
        let bad = m.installed(2, "v2", 1).await;
        switch(&m.target, &m.state_dir, &good, T)
            .await
            .expect("switch");
        assert_eq!(
            activate(&m.target, &m.state_dir, &good, "switch", T)
                .await
                .expect("activate")
                .code,
            0
        );
        switch(&m.target, &m.state_dir, &bad, T)
            .await
            .expect("switch");
        assert_eq!(
            activate(&m.target, &m.state_dir, &bad, "switch", T)
                .await
                .expect("activate")
                .code,
            1
        );

        let result = rollback(&m.target, &m.state_dir, &good, "switch", T)
            .await
            .expect("rollback");
        assert_eq!(result.code, 0);
        assert_eq!(
            m.runs(),
            [good.to_string(), bad.to_string(), good.to_string()]
        );
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.current_generation(), Some(&good));
        let attempts = fs::read_dir(
            m.state()
                .join("generations")
                .join(good.to_string())
                .join("activations"),
        )
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".status"))
        .count();
        assert_eq!(attempts, 2, "each activation is its own attempt");
    }

    #[tokio::test]
    async fn an_activation_can_be_waited_for_again_after_a_timeout() {
        let m = Machine::new();
        let generation = m.installed(1, "v1", 0).await;
        let artifact = m
            .state()
            .join("generations")
            .join(generation.to_string())
            .join("artifact");
        // Slow the activation down on the target itself.
        fs::write(artifact.join("exit-code"), "0").expect("write");
        let slow = format!(
            "#!/bin/sh\nsleep 0.6\n{}",
            ACTIVATE.trim_start_matches("#!/bin/sh\n")
        );
        fs::write(artifact.join("activate"), slow).expect("write");
        let started = Instant::now();
        let attempt = start_activation(&m.target, &m.state_dir, &generation, "switch", T)
            .await
            .expect("start");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "start must not wait"
        );
        let error = wait_activation(
            &m.target,
            &m.state_dir,
            &attempt,
            Duration::from_millis(150),
        )
        .await
        .expect_err("still running");
        assert!(
            matches!(error, MachineError::ActivationTimedOut { .. }),
            "{error:?}"
        );
        assert!(error.is_transient() && error.is_timeout());
        // The attempt survives serialization, as when the controller restarts.
        let stored = serde_json::to_string(&attempt).expect("serialize");
        let attempt: ActivationAttempt = serde_json::from_str(&stored).expect("deserialize");
        let result = wait_activation(&m.target, &m.state_dir, &attempt, T)
            .await
            .expect("wait");
        assert_eq!(result.code, 0);
    }

    #[tokio::test]
    async fn an_activation_runs_in_its_own_session_so_it_outlives_its_starter() {
        let m = Machine::new();
        let generation = m.installed(1, "v1", 0).await;
        let artifact = m
            .state()
            .join("generations")
            .join(generation.to_string())
            .join("artifact");
        fs::write(
            artifact.join("activate"),
            "#!/bin/sh\nread -r _ _ _ _ _ sid _ < /proc/$$/stat\necho \"$sid\" > session\n",
        )
        .expect("write");
        let result = activate(&m.target, &m.state_dir, &generation, "switch", T)
            .await
            .expect("activate");
        assert_eq!(result.code, 0, "{}", result.log);
        let theirs = fs::read_to_string(artifact.join("session")).expect("session");
        let ours = fs::read_to_string("/proc/self/stat").expect("stat");
        let ours = ours
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(3))
            .expect("sid");
        assert_ne!(
            theirs.trim(),
            ours,
            "activate must not share the controller's session"
        );
    }

    #[test]
    fn every_step_is_send_so_the_controller_can_spawn_it() {
        fn assert_send<F: std::future::Future + Send>(_: F) {}
        let t = LocalTarget::default();
        let generation = GenerationId::new(1, "ab").expect("generation");
        let attempt = ActivationAttempt {
            generation: generation.clone(),
            id: "1".to_owned(),
        };
        let path = Path::new("/x");
        assert_send(observe(&t, "/x", T));
        assert_send(install(&t, "/x", path, b"", &generation, T));
        assert_send(switch(&t, "/x", &generation, T));
        assert_send(start_activation(&t, "/x", &generation, "switch", T));
        assert_send(wait_activation(&t, "/x", &attempt, T));
        assert_send(activate(&t, "/x", &generation, "switch", T));
        assert_send(health_check(&t, &[], T));
        assert_send(rollback(&t, "/x", &generation, "switch", T));
        assert_send(prune(&t, "/x", 1, &[], T));
        let confirmation = Confirmation {
            id: "1".to_owned(),
            attempt: attempt.clone(),
            previous: None,
            mode: "switch".to_owned(),
            timeout: T,
            rollback_id: "2".to_owned(),
        };
        assert_send(arm_confirmation(&t, "/x", &attempt, None, "switch", T, T));
        assert_send(confirm(&t, "/x", &confirmation, T));
        assert_send(confirmation_state(&t, "/x", &confirmation, T));
    }

    #[tokio::test]
    async fn an_activation_whose_runner_dies_is_reported_lost() {
        let m = Machine::new();
        let generation = m.installed(1, "v1", 0).await;
        let artifact = m
            .state()
            .join("generations")
            .join(generation.to_string())
            .join("artifact");
        // Kill the runner (this script's parent) before it can write a status.
        fs::write(
            artifact.join("activate"),
            "#!/bin/sh\nkill -9 $PPID\nsleep 0.2\n",
        )
        .expect("write");
        let error = activate(&m.target, &m.state_dir, &generation, "switch", T)
            .await
            .expect_err("lost");
        assert!(
            matches!(error, MachineError::ActivationLost { .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn current_flips_atomically_under_a_concurrent_reader() {
        let m = Machine::new();
        let a = m.installed(1, "v1", 0).await;
        let b = m.installed(2, "v2", 0).await;
        switch(&m.target, &m.state_dir, &a, T)
            .await
            .expect("switch");
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let current = m.state().join("current");
        let reader = {
            let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
            std::thread::spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::SeqCst) {
                    let link = fs::read_link(&current).map_err(|e| format!("read_link: {e}"))?;
                    let text = link.to_string_lossy().into_owned();
                    if !text.starts_with("generations/") {
                        return Err(format!("odd link {text}"));
                    }
                    fs::metadata(current.join(".complete"))
                        .map_err(|e| format!("marker via link: {e}"))?;
                    reads.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            })
        };
        for i in 0..200 {
            let to = if i % 2 == 0 { &b } else { &a };
            switch(&m.target, &m.state_dir, to, T)
                .await
                .expect("switch");
        }
        stop.store(true, Ordering::SeqCst);
        reader
            .join()
            .expect("reader thread")
            .expect("current was always a valid link");
        assert!(
            reads.load(Ordering::SeqCst) > 200,
            "the reader must have raced the flips"
        );
        let leftovers = fs::read_dir(m.state())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("current.tmp"))
            .count();
        assert_eq!(leftovers, 0);
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.current_generation(), Some(&a));
    }

    #[tokio::test]
    async fn observe_reports_current_pointing_at_an_incomplete_or_missing_generation() {
        let m = Machine::new();
        let good = m.installed(1, "v1", 0).await;
        let half = GenerationId::new(2, "abc").expect("generation");
        fs::create_dir_all(m.state().join("generations/2-abc/artifact")).expect("mkdir");
        fs::create_dir_all(m.state().join("generations/not-ours")).expect("mkdir");
        std::os::unix::fs::symlink("generations/2-abc", m.state().join("current"))
            .expect("symlink");
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(
            facts.current,
            CurrentLink::Broken {
                target: "generations/2-abc".to_owned(),
                generation: Some(half.clone())
            }
        );
        assert_eq!(facts.current_generation(), None);
        assert_eq!(facts.generations, [good]);
        assert_eq!(facts.incomplete, std::slice::from_ref(&half));

        let error = switch(&m.target, &m.state_dir, &half, T)
            .await
            .expect_err("not installed");
        assert!(
            matches!(error, MachineError::NotInstalled { .. }),
            "{error:?}"
        );

        fs::remove_file(m.state().join("current")).expect("rm");
        std::os::unix::fs::symlink("generations/9-gone", m.state().join("current"))
            .expect("symlink");
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert!(
            matches!(&facts.current, CurrentLink::Broken { generation: Some(g), .. } if g.number() == 9),
            "{:?}",
            facts.current
        );
    }

    #[tokio::test]
    async fn installing_a_hash_already_on_the_target_copies_instead_of_uploading() {
        let m = Machine::new();
        let (root, hash) = m.artifact("shared", "v1", 0);
        let first = GenerationId::new(1, hash.clone()).expect("generation");
        let outcome = install(&m.target, &m.state_dir, &root, b"{}", &first, T)
            .await
            .expect("install");
        assert_eq!(outcome, InstallOutcome::Uploaded);
        // Running as root, permissions cannot make the source unreadable:
        // remove it, so an upload attempt could only fail.
        fs::remove_dir_all(&root).expect("rm artifact");
        let second = GenerationId::new(2, hash).expect("generation");
        let outcome = install(
            &m.target,
            &m.state_dir,
            &root,
            b"{\"second\":true}",
            &second,
            T,
        )
        .await
        .expect("install without the local artifact");
        assert_eq!(outcome, InstallOutcome::CopiedOnTarget);
        let dir = m.state().join("generations").join(second.to_string());
        assert_eq!(
            tree_hash(&dir.join("artifact")).expect("hash"),
            second.hash()
        );
        assert_eq!(
            fs::read_to_string(dir.join("roles.json")).expect("roles"),
            "{\"second\":true}"
        );
        let mode = fs::metadata(dir.join("artifact/activate"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let outcome = install(&m.target, &m.state_dir, &root, b"{}", &second, T)
            .await
            .expect("install");
        assert_eq!(outcome, InstallOutcome::AlreadyPresent);
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.generations, [first, second]);
    }

    #[tokio::test]
    async fn an_install_cut_short_is_started_over() {
        let m = Machine::new();
        let (root, hash) = m.artifact("a1", "v1", 0);
        let generation = GenerationId::new(1, hash).expect("generation");
        let dir = m.state().join("generations").join(generation.to_string());
        fs::create_dir_all(dir.join("artifact")).expect("mkdir");
        fs::write(dir.join("artifact/junk"), "half").expect("write");
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.incomplete, std::slice::from_ref(&generation));
        let outcome = install(&m.target, &m.state_dir, &root, b"{}", &generation, T)
            .await
            .expect("install");
        assert_eq!(outcome, InstallOutcome::Uploaded);
        assert!(!dir.join("artifact/junk").exists());
        assert_eq!(
            tree_hash(&dir.join("artifact")).expect("hash"),
            generation.hash()
        );
        assert_eq!(
            fs::read_to_string(dir.join(".complete"))
                .expect("marker")
                .trim(),
            generation.hash()
        );
    }

    #[tokio::test]
    async fn a_large_roles_document_is_uploaded_whole() {
        let m = Machine::new();
        let roles = format!("{{\"pad\":\"{}\"}}", "x".repeat(200_000));
        let (root, hash) = m.artifact("a1", "v1", 0);
        let first = GenerationId::new(1, hash.clone()).expect("generation");
        install(&m.target, &m.state_dir, &root, roles.as_bytes(), &first, T)
            .await
            .expect("install");
        let second = GenerationId::new(2, hash).expect("generation");
        let outcome = install(&m.target, &m.state_dir, &root, roles.as_bytes(), &second, T)
            .await
            .expect("install");
        assert_eq!(outcome, InstallOutcome::CopiedOnTarget);
        for generation in [&first, &second] {
            let dir = m.state().join("generations").join(generation.to_string());
            assert_eq!(
                fs::read_to_string(dir.join("roles.json")).expect("roles"),
                roles
            );
            assert!(!dir.join(".roles-staged").exists());
        }
    }

    #[tokio::test]
    async fn health_checks_pass_fail_and_time_out() {
        let m = Machine::new();
        let argv = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        let ok = health_check(&m.target, &argv(&["sh", "-c", "echo healthy"]), T)
            .await
            .expect("pass");
        assert_eq!(ok.stdout, "healthy\n");

        let error = health_check(&m.target, &argv(&["sh", "-c", "echo down >&2; exit 2"]), T)
            .await
            .expect_err("fail");
        match &error {
            MachineError::HealthCheckFailed { output, .. } => {
                assert_eq!(output.code, Some(2));
                assert_eq!(output.stderr, "down\n");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(error.is_health_failure() && !error.is_transient());

        let started = Instant::now();
        let error = health_check(
            &m.target,
            &argv(&["sleep", "30"]),
            Duration::from_millis(300),
        )
        .await
        .expect_err("time out");
        assert!(
            matches!(error, MachineError::HealthCheckTimedOut { .. }),
            "{error:?}"
        );
        assert!(error.is_health_failure() && error.is_timeout());
        assert!(started.elapsed() < Duration::from_secs(5));

        let error = health_check(&m.target, &argv(&["/nonexistent/check"]), T)
            .await
            .expect_err("cannot run");
        assert!(!error.is_health_failure(), "{error:?}");
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_current_and_protected_generations() {
        let m = Machine::new();
        let mut all = Vec::new();
        for n in 1..=5 {
            all.push(m.installed(n, &format!("v{n}"), 0).await);
        }
        switch(&m.target, &m.state_dir, &all[2], T)
            .await
            .expect("switch");
        fs::create_dir_all(m.state().join("generations/6-abc")).expect("mkdir");
        let removed = prune(&m.target, &m.state_dir, 2, &[all[0].clone()], T)
            .await
            .expect("prune");
        let half = GenerationId::new(6, "abc").expect("generation");
        assert_eq!(removed, [all[1].clone(), half]);
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(
            facts.generations,
            [
                all[0].clone(),
                all[2].clone(),
                all[3].clone(),
                all[4].clone()
            ]
        );
        assert!(facts.incomplete.is_empty());
        assert_eq!(facts.current_generation(), Some(&all[2]));
        let removed = prune(&m.target, &m.state_dir, 0, &[], T)
            .await
            .expect("prune");
        assert_eq!(removed, [all[4].clone(), all[3].clone(), all[0].clone()]);
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(
            facts.generations,
            [all[2].clone()],
            "current is never pruned"
        );
    }

    #[tokio::test]
    async fn invalid_inputs_are_refused_before_running_anything() {
        let m = Machine::new();
        for bad in ["relative/dir", "/", "", "/a\nb"] {
            let error = observe(&m.target, bad, T)
                .await
                .expect_err("invalid state dir");
            assert!(
                matches!(error, MachineError::InvalidStateDir { .. }),
                "{bad:?}"
            );
            assert!(!error.is_transient());
        }
        assert!(GenerationId::new(1, "ab/cd").is_err());
        assert!(GenerationId::new(1, "").is_err());
        let generation = m.installed(1, "v1", 0).await;
        let error = start_activation(&m.target, &m.state_dir, &generation, "switch; rm -rf /", T)
            .await
            .expect_err("invalid mode");
        assert!(matches!(error, MachineError::InvalidMode { .. }));
        let (root, _) = m.artifact("a9", "v9", 0);
        let error = install(
            &m.target,
            &m.state_dir,
            &root,
            &[0xff, 0xfe],
            &generation,
            T,
        )
        .await
        .expect_err("roles not utf-8");
        assert!(matches!(error, MachineError::InvalidRoles { .. }));
    }

    #[test]
    fn generation_ids_and_facts_round_trip_through_json() {
        let generation = GenerationId::new(12, "abc123").expect("generation");
        let json = serde_json::to_string(&generation).expect("serialize");
        assert_eq!(json, r#"{"number":12,"hash":"abc123"}"#);
        assert_eq!(
            serde_json::from_str::<GenerationId>(&json).expect("deserialize"),
            generation
        );
        assert!(serde_json::from_str::<GenerationId>(r#"{"number":1,"hash":"../x"}"#).is_err());
        assert_eq!(
            GenerationId::from_dir_name("12-abc123"),
            Some(generation.clone())
        );
        for foreign in ["012-abc", "+1-abc", "1-", "abc", "1-a.b"] {
            assert_eq!(GenerationId::from_dir_name(foreign), None, "{foreign}");
        }
        let facts = MachineFacts {
            hostname: "web1".to_owned(),
            boot_id: "b".to_owned(),
            uptime_secs: 5,
            kernel: "6.1.0".to_owned(),
            current: CurrentLink::Broken {
                target: "generations/12-abc123".to_owned(),
                generation: Some(generation.clone()),
            },
            generations: vec![generation.clone()],
            incomplete: vec![],
            observed_ms: 1,
        };
        let json = serde_json::to_string(&facts).expect("serialize");
        assert_eq!(
            serde_json::from_str::<MachineFacts>(&json).expect("deserialize"),
            facts
        );
        let current =
            serde_json::to_string(&CurrentLink::Generation { generation }).expect("serialize");
        assert_eq!(
            current,
            r#"{"kind":"generation","generation":{"number":12,"hash":"abc123"}}"#
        );
    }

    #[test]
    fn the_wait_output_splits_into_log_and_status() {
        assert_eq!(
            split_status("a\nb\n\nconverge-status=0\n"),
            Some(("a\nb\n", "0"))
        );
        assert_eq!(
            split_status("no newline\nconverge-status=3\n"),
            Some(("no newline", "3"))
        );
        assert_eq!(split_status("\nconverge-status=0\n"), Some(("", "0")));
        assert_eq!(
            split_status("converge-status=running\n"),
            Some(("", "running"))
        );
        assert_eq!(split_status("garbage\n"), None);
    }

    /// Polls until the watchdog has finished (fired and recorded), or panics.
    async fn wait_fired<T: Target>(t: &T, state_dir: &str, c: &Confirmation) -> Rollback {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match confirmation_state(t, state_dir, c, T).await.expect("state") {
                ConfirmationState::Fired { rollback }
                    if rollback.action != RollbackAction::InProgress =>
                {
                    return rollback;
                }
                other => assert!(Instant::now() < deadline, "never fired: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// g1 active and current; g2 installed, switched to and activated (its
    /// activation started, not waited for).
    async fn deployed_pair(m: &Machine) -> (GenerationId, GenerationId, ActivationAttempt) {
        let g1 = m.installed(1, "v1", 0).await;
        let g2 = m.installed(2, "v2", 0).await;
        switch(&m.target, &m.state_dir, &g1, T)
            .await
            .expect("switch");
        activate(&m.target, &m.state_dir, &g1, "switch", T)
            .await
            .expect("activate");
        switch(&m.target, &m.state_dir, &g2, T)
            .await
            .expect("switch");
        let attempt = start_activation(&m.target, &m.state_dir, &g2, "switch", T)
            .await
            .expect("start");
        (g1, g2, attempt)
    }

    fn confirm_files(m: &Machine, c: &Confirmation) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(m.state().join("confirm"))
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&c.id))
            .map(|n| n[c.id.len()..].to_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_confirmation_in_time_means_no_rollback() {
        let m = Machine::new();
        let (g1, g2, attempt) = deployed_pair(&m).await;
        let c = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "switch",
            Duration::from_millis(700),
            T,
        )
        .await
        .expect("arm");
        assert_eq!(
            wait_activation(&m.target, &m.state_dir, &attempt, T)
                .await
                .expect("wait")
                .code,
            0
        );
        assert_eq!(
            confirmation_state(&m.target, &m.state_dir, &c, T)
                .await
                .expect("state"),
            ConfirmationState::Pending
        );
        assert_eq!(
            confirm(&m.target, &m.state_dir, &c, T)
                .await
                .expect("confirm"),
            ConfirmOutcome::Confirmed
        );
        // Repeating a confirm whose answer was lost is harmless.
        assert_eq!(
            confirm(&m.target, &m.state_dir, &c, T)
                .await
                .expect("confirm"),
            ConfirmOutcome::Confirmed
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            confirmation_state(&m.target, &m.state_dir, &c, T)
                .await
                .expect("state"),
            ConfirmationState::Confirmed
        );
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.current_generation(), Some(&g2));
        assert_eq!(m.runs(), [g1.to_string(), g2.to_string()]);
        assert_eq!(confirm_files(&m, &c), [".confirmed", ".pid"]);
    }

    #[tokio::test]
    async fn an_unconfirmed_activation_rolls_back_to_the_previous_generation() {
        let m = Machine::new();
        let (g1, g2, attempt) = deployed_pair(&m).await;
        let c = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "switch",
            Duration::from_millis(300),
            T,
        )
        .await
        .expect("arm");
        // The controller restarts: the confirmation comes back from the store.
        let c: Confirmation =
            serde_json::from_str(&serde_json::to_string(&c).expect("ser")).expect("de");
        let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
        let expected_attempt = c.rollback_attempt().expect("a previous generation");
        assert_eq!(
            rollback.action,
            RollbackAction::RolledBack {
                to: g1.clone(),
                attempt: expected_attempt.clone(),
                code: Some(0)
            }
        );
        assert_eq!(rollback.activation_code, Some(0));
        assert!(rollback.fired_unix.is_some());
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(
            facts.current_generation(),
            Some(&g1),
            "current is back at the previous generation"
        );
        assert_eq!(
            m.runs(),
            [g1.to_string(), g2.to_string(), g1.to_string()],
            "previous re-activated"
        );
        let result = wait_activation(&m.target, &m.state_dir, &expected_attempt, T)
            .await
            .expect("wait");
        assert!(
            result.log.contains(&format!("generation={g1}")),
            "{}",
            result.log
        );
        // A late confirm learns it lost: the deploy failed.
        match confirm(&m.target, &m.state_dir, &c, T)
            .await
            .expect("confirm")
        {
            ConfirmOutcome::AlreadyRolledBack { rollback: late } => assert_eq!(late, rollback),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(confirm_files(&m, &c), [".fired", ".pid", ".result"]);
    }

    #[tokio::test]
    async fn confirm_and_the_watchdog_racing_have_exactly_one_winner() {
        let m = Machine::new();
        let (g1, g2, first) = deployed_pair(&m).await;
        wait_activation(&m.target, &m.state_dir, &first, T)
            .await
            .expect("wait");
        let (mut confirmed, mut rolled_back) = (0, 0);
        for round in 0..16u64 {
            // current must point at g2 again for each round.
            switch(&m.target, &m.state_dir, &g2, T)
                .await
                .expect("switch");
            let attempt = start_activation(&m.target, &m.state_dir, &g2, "switch", T)
                .await
                .expect("start");
            wait_activation(&m.target, &m.state_dir, &attempt, T)
                .await
                .expect("wait");
            let runs_before = m.runs().len();
            let c = arm_confirmation(
                &m.target,
                &m.state_dir,
                &attempt,
                Some(&g1),
                "switch",
                Duration::from_millis(200),
                T,
            )
            .await
            .expect("arm");
            // Aim at the watchdog's deadline from both sides of it.
            tokio::time::sleep(Duration::from_millis(150 + round * 8)).await;
            let outcome = confirm(&m.target, &m.state_dir, &c, T)
                .await
                .expect("confirm");
            // Let a watchdog that might (wrongly) act as well do so.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let files = confirm_files(&m, &c);
            let current = observe(&m.target, &m.state_dir, T)
                .await
                .expect("observe")
                .current;
            match outcome {
                ConfirmOutcome::Confirmed => {
                    confirmed += 1;
                    assert_eq!(files, [".confirmed", ".pid"], "round {round}");
                    assert_eq!(
                        current,
                        CurrentLink::Generation {
                            generation: g2.clone()
                        },
                        "round {round}"
                    );
                    assert_eq!(
                        m.runs().len(),
                        runs_before,
                        "round {round}: nothing re-activated"
                    );
                }
                ConfirmOutcome::AlreadyRolledBack { .. } => {
                    rolled_back += 1;
                    let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
                    assert!(
                        matches!(rollback.action, RollbackAction::RolledBack { .. }),
                        "round {round}"
                    );
                    assert_eq!(
                        confirm_files(&m, &c),
                        [".fired", ".pid", ".result"],
                        "round {round}"
                    );
                    let current = observe(&m.target, &m.state_dir, T)
                        .await
                        .expect("observe")
                        .current;
                    assert_eq!(
                        current,
                        CurrentLink::Generation {
                            generation: g1.clone()
                        },
                        "round {round}"
                    );
                    assert_eq!(
                        m.runs().len(),
                        runs_before + 1,
                        "round {round}: re-activated once"
                    );
                }
            }
        }
        println!("race: {confirmed} confirmed, {rolled_back} rolled back");
        assert_eq!(confirmed + rolled_back, 16);
    }

    #[tokio::test]
    async fn without_a_previous_generation_the_watchdog_removes_current() {
        let m = Machine::new();
        let g1 = m.installed(1, "v1", 0).await;
        switch(&m.target, &m.state_dir, &g1, T)
            .await
            .expect("switch");
        let attempt = start_activation(&m.target, &m.state_dir, &g1, "test", T)
            .await
            .expect("start");
        let c = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            None,
            "test",
            Duration::from_millis(200),
            T,
        )
        .await
        .expect("arm");
        assert_eq!(c.rollback_attempt(), None);
        let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
        assert_eq!(rollback.action, RollbackAction::CurrentRemoved);
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.current, CurrentLink::Absent);
    }

    #[tokio::test]
    async fn the_watchdog_leaves_a_current_that_moved_on_alone() {
        let m = Machine::new();
        let (g1, _g2, attempt) = deployed_pair(&m).await;
        let g3 = m.installed(3, "v3", 0).await;
        let c = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "switch",
            Duration::from_millis(400),
            T,
        )
        .await
        .expect("arm");
        switch(&m.target, &m.state_dir, &g3, T)
            .await
            .expect("switch");
        let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
        assert_eq!(
            rollback.action,
            RollbackAction::Superseded {
                current: format!("generations/{g3}")
            }
        );
        let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
        assert_eq!(facts.current_generation(), Some(&g3));
    }

    #[tokio::test]
    async fn the_confirmation_window_starts_when_the_activation_ends() {
        let m = Machine::new();
        let (g1, g2, _) = deployed_pair(&m).await;
        let artifact = m
            .state()
            .join("generations")
            .join(g2.to_string())
            .join("artifact");
        let slow = format!(
            "#!/bin/sh\nsleep 1\n{}",
            ACTIVATE.trim_start_matches("#!/bin/sh\n")
        );
        fs::write(artifact.join("activate"), slow).expect("write");
        let attempt = start_activation(&m.target, &m.state_dir, &g2, "switch", T)
            .await
            .expect("start");
        let armed = Instant::now();
        let c = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "switch",
            Duration::from_millis(300),
            T,
        )
        .await
        .expect("arm");
        tokio::time::sleep(Duration::from_millis(900).saturating_sub(armed.elapsed())).await;
        assert_eq!(
            confirmation_state(&m.target, &m.state_dir, &c, T)
                .await
                .expect("state"),
            ConfirmationState::Pending,
            "the window must not run while the activation does"
        );
        wait_fired(&m.target, &m.state_dir, &c).await;
        assert!(
            armed.elapsed() >= Duration::from_millis(1300),
            "{:?}",
            armed.elapsed()
        );
    }

    #[tokio::test]
    async fn a_killed_watchdog_is_reported_lost() {
        let m = Machine::new();
        let (g1, _g2, attempt) = deployed_pair(&m).await;
        let c = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "switch",
            Duration::from_secs(60),
            T,
        )
        .await
        .expect("arm");
        let pid = fs::read_to_string(m.state().join("confirm").join(format!("{}.pid", c.id)))
            .expect("pid");
        let pid = pid.split_whitespace().next().expect("pid").to_owned();
        std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = confirmation_state(&m.target, &m.state_dir, &c, T)
                .await
                .expect("state");
            if state == ConfirmationState::WatchdogLost {
                break;
            }
            assert!(Instant::now() < deadline, "{state:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Claiming still works, so the controller can roll back by itself.
        assert_eq!(
            confirm(&m.target, &m.state_dir, &c, T)
                .await
                .expect("confirm"),
            ConfirmOutcome::Confirmed
        );
    }

    #[tokio::test]
    async fn arming_refuses_what_it_cannot_watch() {
        let m = Machine::new();
        let (g1, g2, attempt) = deployed_pair(&m).await;
        let window = Duration::from_secs(1);
        let error = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "boot",
            window,
            T,
        )
        .await
        .expect_err("boot changes nothing now");
        assert!(matches!(error, MachineError::NothingToConfirm { .. }) && !error.is_transient());
        switch(&m.target, &m.state_dir, &g1, T)
            .await
            .expect("switch");
        let error = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "switch",
            window,
            T,
        )
        .await
        .expect_err("current moved");
        assert!(
            matches!(error, MachineError::NotCurrent { .. }),
            "{error:?}"
        );
        switch(&m.target, &m.state_dir, &g2, T)
            .await
            .expect("switch");
        let missing = GenerationId::new(9, "abc").expect("generation");
        let error = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&missing),
            "switch",
            window,
            T,
        )
        .await
        .expect_err("previous not installed");
        assert!(
            matches!(&error, MachineError::NotInstalled { generation, .. } if *generation == missing),
            "{error:?}"
        );
        let bogus = Confirmation {
            id: "abc".to_owned(),
            attempt: attempt.clone(),
            previous: None,
            mode: "switch".to_owned(),
            timeout: window,
            rollback_id: "def".to_owned(),
        };
        let error = confirm(&m.target, &m.state_dir, &bogus, T)
            .await
            .expect_err("never armed");
        assert!(matches!(error, MachineError::ConfirmationMissing { .. }) && !error.is_transient());
        assert!(!m.state().join("confirm").exists(), "nothing was armed");
    }

    /// Step timings on this host: `cargo test --release -- --ignored --nocapture timings`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "measurement, not a check"]
    async fn timings_of_steps_on_a_local_target() {
        let m = Machine::new();
        let rounds = 20;
        let mut observe_t = Vec::new();
        let mut install_t = Vec::new();
        let mut copy_t = Vec::new();
        let mut present_t = Vec::new();
        let mut switch_t = Vec::new();
        let mut activate_t = Vec::new();
        for n in 0..rounds {
            let (root, hash) = m.artifact(&format!("t{n}"), &format!("v{n}"), 0);
            let generation = GenerationId::new(2 * n + 1, hash.clone()).expect("generation");
            let copy = GenerationId::new(2 * n + 2, hash).expect("generation");
            let s = Instant::now();
            observe(&m.target, &m.state_dir, T).await.expect("observe");
            observe_t.push(s.elapsed());
            let s = Instant::now();
            install(&m.target, &m.state_dir, &root, b"{}", &generation, T)
                .await
                .expect("install");
            install_t.push(s.elapsed());
            let s = Instant::now();
            install(&m.target, &m.state_dir, &root, b"{}", &copy, T)
                .await
                .expect("install");
            copy_t.push(s.elapsed());
            let s = Instant::now();
            install(&m.target, &m.state_dir, &root, b"{}", &copy, T)
                .await
                .expect("install");
            present_t.push(s.elapsed());
            let s = Instant::now();
            switch(&m.target, &m.state_dir, &generation, T)
                .await
                .expect("switch");
            switch_t.push(s.elapsed());
            let s = Instant::now();
            activate(&m.target, &m.state_dir, &generation, "switch", T)
                .await
                .expect("activate");
            activate_t.push(s.elapsed());
        }
        for (name, mut times) in [
            ("observe", observe_t),
            ("install (upload)", install_t),
            ("install (copy on target)", copy_t),
            ("install (already present)", present_t),
            ("switch", switch_t),
            ("activate (start + wait)", activate_t),
        ] {
            times.sort();
            println!(
                "{name:28} median {:>7.2?}  min {:>7.2?}  max {:>7.2?}",
                times[times.len() / 2],
                times[0],
                times[times.len() - 1]
            );
        }
    }
}
