//! The reconcile loop: triggers, scheduler, runner, error policy, and the
//! reconcile of each kind.
//!
//! One stage per file, each usable alone: `scheduler` (one pending entry per
//! key, earliest deadline wins), `runner` (never two reconciles of one key at
//! once, a global concurrency limit), `backoff` (per-key exponential backoff
//! with jitter, reset on success), `applier` (the loop that ties them
//! together). The controller depends on driver traits, never on concrete
//! drivers.

pub mod applier;
pub mod backoff;
pub mod context;
pub mod daemon;
pub mod error;
pub mod git_source;
pub mod health;
pub mod lifecycle;
pub mod metrics;
pub mod notify;
pub mod once;
pub mod placement;
pub mod preview;
pub mod reconcile;
pub mod runner;
pub mod scheduler;
pub mod suspend;
pub mod triggers;
pub mod vmops;

#[cfg(test)]
mod tests;
