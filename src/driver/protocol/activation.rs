//! Switching `current` (one rename) and activating a generation: started
//! detached on the target so it survives the connection, waited for in
//! bounded round trips, and its result read back; health checks; and a
//! rollback as switch plus activate. It must not decide what a failed
//! activation or health check means; the controller does.

use std::time::Duration;

use super::generation::{ActivationAttempt, ActivationResult, GenerationId, MachineError};
use super::script::{
    Deadline, checked_state_dir, generation_dir, parse_error, require_success, run_script,
};
use crate::driver::command::{argv_summary, unique_suffix};
use crate::driver::target::{CommandOutput, Target};

/// The longest a single wait-for-activation round trip blocks on the target.
const MAX_POLL_WINDOW: Duration = Duration::from_secs(10);
/// The unit in which the wait script counts its time (see the script).
const POLL_TICK_MS: u128 = 10;

const SWITCH_SCRIPT: &str = include_str!("scripts/switch.sh");
pub(super) const ACTIVATE_SCRIPT: &str = include_str!("scripts/activate.sh");
const WAIT_ACTIVATION_SCRIPT: &str = include_str!("scripts/wait_activation.sh");

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

pub(super) fn checked_mode(mode: &str) -> Result<&str, MachineError> {
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
pub(super) fn split_status(stdout: &str) -> Option<(&str, &str)> {
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
