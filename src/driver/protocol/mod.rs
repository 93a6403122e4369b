//! The machine protocol, written once over any [`Target`](crate::driver::Target): observe facts,
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
//!
//! This file is the facade: it declares the files and re-exports the
//! protocol's API, and holds no code. The files import each other, never
//! this facade, and depend one way: `generation.rs` (the protocol's
//! vocabulary and [`MachineError`]) <- `script.rs` (running one embedded
//! script, shared by every step) <- the steps: `observe.rs`, `install.rs`,
//! `activation.rs` (switch, activate, health check, rollback), `confirm.rs`
//! (the confirmation watchdog, which arms `activate.sh` too) and `prune.rs`
//! (which observes first). The scripts stay in `scripts/`.

mod activation;
mod confirm;
mod generation;
mod install;
mod observe;
mod prune;
mod script;

pub use activation::{activate, health_check, rollback, start_activation, switch, wait_activation};
pub use confirm::{
    ConfirmOutcome, Confirmation, ConfirmationState, Rollback, RollbackAction, arm_confirmation,
    confirm, confirmation_state, needs_confirmation,
};
pub use generation::{
    ActivationAttempt, ActivationResult, CurrentLink, DEFAULT_STATE_DIR, GenerationId,
    InstallOutcome, MachineError, MachineFacts,
};
pub use install::install;
pub use observe::{observe, observe_local};
pub use prune::prune;

#[cfg(test)]
mod tests;
