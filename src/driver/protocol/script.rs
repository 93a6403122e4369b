//! What every protocol step shares: the checked state directory and the
//! paths under it, one time budget for a step's round trips ([`Deadline`]),
//! running one embedded script with its inputs as positional arguments, and
//! judging its exit code and output. It must not know any particular step
//! or script, and must never build a shell string: the script is a constant
//! and every input is an argument.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::generation::{GenerationId, MachineError};
use crate::driver::target::{CommandOutput, Target, TargetError};

/// Exit code of the switch and activate scripts for "generation not complete".
pub(super) const EXIT_NOT_INSTALLED: i32 = 3;

/// One time budget shared by the round trips of a step.
pub(super) struct Deadline {
    end: Instant,
    total: Duration,
}

impl Deadline {
    pub(super) fn new(total: Duration) -> Self {
        Self {
            end: Instant::now() + total,
            total,
        }
    }

    /// Time left, or the timeout error for `step` when none is.
    pub(super) fn left<T: Target>(&self, t: &T, step: &str) -> Result<Duration, MachineError> {
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
pub(super) fn checked_state_dir(state_dir: &str) -> Result<&str, MachineError> {
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

pub(super) fn generation_dir(state_dir: &str, generation: &GenerationId) -> String {
    format!("{state_dir}/generations/{generation}")
}

/// Runs a constant script on the target with `args` as `$1...`; any exit
/// code is returned for the caller to judge.
pub(super) async fn run_script<T: Target>(
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
pub(super) fn require_success<T: Target>(
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

pub(super) fn parse_error<T: Target>(t: &T, step: &str, output: &str) -> MachineError {
    MachineError::Parse {
        step: step.to_owned(),
        target: t.describe(),
        output: output.chars().take(2000).collect(),
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
