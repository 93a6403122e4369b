//! Waiting for an activation that runs detached on the target (its result
//! read back in bounded round trips, after a lost connection too), ending
//! one that ran past its timeout (its process group TERMed, then KILLed),
//! and health checks. Starting an activation is a phase of a deploy
//! (`apply.rs`). It must not decide what a failed activation or health
//! check means; the controller does.

use std::time::Duration;

use super::apply::{APPLY_SCRIPT, WAIT_TICK_MS, split_status};
use super::generation::{ActivationAttempt, ActivationResult, GenerationId, MachineError};
use super::script::{Deadline, checked_state_dir, parse_error, require_success, run_script};
use crate::driver::command::argv_summary;
use crate::driver::target::{CommandOutput, Target};

/// The longest a single wait-for-activation round trip blocks on the target.
const MAX_POLL_WINDOW: Duration = Duration::from_secs(10);
/// How long ending an activation may take: TERM, 5 s grace, KILL, status.
const KILL_TIMEOUT: Duration = Duration::from_secs(15);

fn checked_attempt(attempt: &ActivationAttempt) -> Result<(), MachineError> {
    let valid = !attempt.id.is_empty()
        && attempt.id.len() <= 128
        && attempt
            .id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(MachineError::InvalidAttempt {
            id: attempt.id.clone(),
        })
    }
}

/// Waits until `attempt` has ended and returns its exit code and log.
///
/// Each round trip blocks on the target for up to 10 s, checking every 10 ms
/// for the first 200 ms and every 50 ms after, so a finished activation is
/// seen within about 50 ms at a cost of one round trip per 10 s. At the
/// timeout: [`MachineError::ActivationTimedOut`], and the activation keeps
/// running (end it with [`kill_activation`], or wait again). When its runner
/// is gone without a status: [`MachineError::ActivationLost`].
pub async fn wait_activation<T: Target>(
    t: &T,
    state_dir: &str,
    attempt: &ActivationAttempt,
    timeout: Duration,
) -> Result<ActivationResult, MachineError> {
    let step = format!("wait for activation of generation {}", attempt.generation);
    let state_dir = checked_state_dir(state_dir)?;
    checked_attempt(attempt)?;
    let name = attempt.generation.to_string();
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
        let ticks = (window.as_millis() / WAIT_TICK_MS).max(1).to_string();
        let output = match run_script(
            t,
            &step,
            APPLY_SCRIPT,
            &[state_dir, "attach", &name, &attempt.id, "wait", &ticks],
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

/// Ends `attempt` when it still runs: SIGTERM to its process group (it runs
/// in its own session on the target), SIGKILL to what is left 5 s later;
/// returns once its runner recorded the status (or after a bound). Returns
/// whether anything was running.
pub async fn kill_activation<T: Target>(
    t: &T,
    state_dir: &str,
    attempt: &ActivationAttempt,
) -> Result<bool, MachineError> {
    let step = format!(
        "end activation {} of generation {}",
        attempt.id, attempt.generation
    );
    let state_dir = checked_state_dir(state_dir)?;
    checked_attempt(attempt)?;
    let name = attempt.generation.to_string();
    let output = run_script(
        t,
        &step,
        APPLY_SCRIPT,
        &[state_dir, "kill", &attempt.id, &name],
        KILL_TIMEOUT,
    )
    .await?;
    let output = require_success(t, &step, None, output)?;
    match output.stdout.trim() {
        "converge-step kill ended" => Ok(true),
        "converge-step kill none" => Ok(false),
        other => Err(parse_error(t, &step, other)),
    }
}

/// Activates `generation` and waits for its end, within one timeout.
pub async fn activate<T: Target>(
    t: &T,
    state_dir: &str,
    generation: &GenerationId,
    mode: &str,
    timeout: Duration,
) -> Result<ActivationResult, MachineError> {
    let started = std::time::Instant::now();
    let attempt = super::apply::start_activation(t, state_dir, generation, mode, timeout).await?;
    wait_activation(
        t,
        state_dir,
        &attempt,
        timeout.saturating_sub(started.elapsed()),
    )
    .await
}

/// Runs a health check command on the target. `Ok` only for exit code 0; a
/// non-zero exit is [`MachineError::HealthCheckFailed`] (with the output), a
/// timeout [`MachineError::HealthCheckTimedOut`] (its process group was
/// TERMed, then KILLed); both answer [`MachineError::is_health_failure`].
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
