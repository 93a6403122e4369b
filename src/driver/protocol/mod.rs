//! The machine protocol, written once over any [`Target`](crate::driver::Target): observe facts
//! (one round trip), deploy (install a generation with only the files the
//! target lacks on stdin, switch `current`, start its activation detached or
//! attach to the running one, arm the confirmation watchdog, wait a first
//! window: one round trip), wait for an activation, end one that ran too
//! long, run health checks, confirm, prune. Each is a constant embedded
//! script from `scripts/` (after `scripts/lib.sh`), inputs as positional
//! arguments and documents on stdin; everything it writes on a target is
//! private (umask 077). It must not decide anything: sequencing, retries
//! and what a failed activation or health check means are the
//! controller's.
//!
//! Layout under a state directory (default [`DEFAULT_STATE_DIR`]):
//!
//! ```text
//! generations/<n>-<hash>/artifact/          the artifact tree, as built
//! generations/<n>-<hash>/roles.json         the roles document
//! generations/<n>-<hash>/.complete          written last at install; holds the hash
//! generations/<n>-<hash>/activations/<attempt>.{pid,pgid,log,status}
//! generations/<n>-<hash>/activate.{log,status} -> the latest attempt's files
//! generations/<n>-<hash>.partial-<pid>/     an install in progress
//! current -> generations/<n>-<hash>         replaced by rename only
//! confirmed -> generations/<n>-<hash>       the last generation confirmed
//! activation/record                         the activation in progress (a lock:
//!                                           "<generation> <attempt> <pid> <boot> <started>")
//! confirm/<id>                              canary of an armed confirmation
//! confirm/<id>.pid                          its watchdog: "<pid> <boot id>"
//! confirm/<id>.confirmed | <id>.fired       who claimed the canary (by rename)
//! confirm/<id>.result                       what the watchdog did, written last
//! confirm/<id>.rollback                     the id its re-activation gets
//! ```
//!
//! Magic rollback: after activating a mode that changes the running system,
//! the deploy's `arm` phase leaves a watchdog on the target. Unless [`confirm`]
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
//! script, shared by every step) <- the steps: `observe.rs`, `confirm.rs`
//! (claiming, reading and recording confirmations; the watchdog's script),
//! `apply.rs` (the deploy), `activation.rs` (waiting, ending, health checks),
//! `prune.rs` (which observes first) and `upload.rs` (a tree or a file sent
//! on stdin, for uploads that are not generations: no SFTP needed). The scripts stay in `scripts/`;
//! the stream reader they share with other uploads is `driver/stream.sh`.

mod activation;
mod apply;
mod confirm;
mod generation;
mod observe;
mod prune;
mod script;
mod upload;

pub use activation::{activate, health_check, kill_activation, wait_activation};
pub use apply::{
    ActivateRequest, ActivationStarted, DeployPhase, DeployReport, DeployRequest, InstallRequest,
    InstallSource, WaitOutcome, Watchdog, arm_confirmation, deploy, install, start_activation,
    switch,
};
pub use confirm::{
    ConfirmOutcome, Confirmation, ConfirmationState, Rollback, RollbackAction, confirm,
    confirmation_state, needs_confirmation, record_confirmed,
};
pub use generation::{
    ActivationAttempt, ActivationInProgress, ActivationResult, ActivationState, CurrentLink,
    DEFAULT_STATE_DIR, GenerationId, InstallOutcome, MachineError, MachineFacts, NixosFacts,
};
pub use observe::{observe, observe_local};
pub use prune::prune;
pub use upload::upload;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_v2;
