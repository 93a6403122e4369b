//! Magic rollback's confirmation: claiming the canary of an activation's
//! watchdog (armed by a deploy's `arm` phase, `apply.rs`) to confirm it,
//! reading where a confirmation stands (pending, confirmed, fired and what
//! the rollback did), and recording a generation as confirmed on the
//! target (`confirmed`: what a later failure rolls back to). Both claims
//! are renames of one file, so exactly one of converge and the watchdog
//! wins. It must not roll back by itself: on the target only the watchdog
//! does.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::generation::{ActivationAttempt, GenerationId, MachineError};
use super::script::{Script, checked_state_dir, parse_error, require_success, run_script};
use crate::driver::target::Target;

const CONFIRM_SCRIPT: Script = Script {
    name: "converge-confirm.sh",
    text: concat!(
        include_str!("scripts/lib.sh"),
        include_str!("scripts/confirm.sh")
    ),
};
/// The confirmation watchdog counts its windows in ticks of this length.
pub(super) const CONFIRM_TICK_MS: u128 = 100;

/// Whether activating in `mode` changes what runs now, so that a lost
/// machine must be rolled back (switch and test; not boot or dry-activate).
pub fn needs_confirmation(mode: &str) -> bool {
    matches!(mode, "switch" | "test")
}

/// An armed confirmation: what the watchdog on the target watches. Store it
/// (it serializes) to ask [`confirmation_state`] again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// Names the canary `confirm/<id>`: the activation attempt's id, so a
    /// controller that re-attaches to the attempt finds the same canary.
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
    ///
    /// [`wait_activation`]: super::activation::wait_activation
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

/// Claims the canary of `confirmation`, so the watchdog never fires, and
/// records its generation as confirmed on the target. One round trip; safe
/// to repeat (a confirmation already claimed by an earlier call, whose
/// answer was lost, is [`ConfirmOutcome::Confirmed`] again). When the
/// watchdog fired first: [`ConfirmOutcome::AlreadyRolledBack`]. Call it over
/// a new connection to prove the machine still accepts them.
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
    let generation = confirmation.attempt.generation.to_string();
    let output = run_script(
        t,
        step,
        CONFIRM_SCRIPT,
        &[state_dir, phase, id, &generation],
        timeout,
    )
    .await?;
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

/// Records `generation` as confirmed on the target (`confirmed` points at
/// it) for an activation no watchdog guards, once its health checks passed;
/// unless `current` moved on meanwhile. One round trip.
pub async fn record_confirmed<T: Target>(
    t: &T,
    state_dir: &str,
    generation: &GenerationId,
    timeout: Duration,
) -> Result<(), MachineError> {
    let step = format!("record generation {generation} as confirmed");
    let state_dir = checked_state_dir(state_dir)?;
    let name = generation.to_string();
    let output = run_script(
        t,
        &step,
        CONFIRM_SCRIPT,
        &[state_dir, "record", "-", &name],
        timeout,
    )
    .await?;
    require_success(t, &step, None, output)?;
    Ok(())
}
