//! `reconcile --once`: run the loop until every object is Ready or has used
//! up its attempts for this run, then stop.
//!
//! Each object gets at most `attempts` tries (transient failures are retried
//! with the usual per-key backoff); a terminal error ends it at once. A
//! machine waiting for dependencies that failed ends failed too, saying so.
//! Over the whole run stands one timeout: past it, running steps are aborted
//! and the report says the run timed out. An object that had not ended by
//! then is not ready in the report, whatever its last status said; one whose
//! attempt was cut has that attempt recorded as `Interrupted` and Ready=False
//! (what it changed is unknown until the next run observes it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::applier::{Config as ApplierConfig, Outcome, Phase, Request};
use super::context::Context;
use super::lifecycle::{self, Loop};
use crate::driver::capability::Drivers;
use crate::driver::protocol::MachineFacts;
use crate::spec::{HumanDuration, ObjectKey};
use crate::store::records::{ConditionKind, Reason, now_ms};

/// Options of one `--once` run.
#[derive(Debug, Clone)]
pub struct OnceOptions {
    /// Tries per object in this run (at least 1).
    pub attempts: u32,
    /// Bound on the whole run.
    pub timeout: Option<Duration>,
    pub applier: ApplierConfig,
}

/// How one object ended the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub key: ObjectKey,
    pub ready: bool,
    pub reason: Reason,
    pub message: String,
    pub attempts: u32,
    /// `N-hash` of the generation last applied.
    pub generation: Option<String>,
    /// Machines: what the target's `current` pointed at when last observed
    /// (after every change), `N-hash`, `none` or `broken (…)`.
    pub current: Option<String>,
}

/// What the run did.
#[derive(Debug, Clone, Serialize)]
pub struct OnceReport {
    pub rows: Vec<Row>,
    pub timed_out: bool,
    pub forgotten: Vec<ObjectKey>,
    pub revision: String,
}

impl OnceReport {
    pub fn all_ready(&self) -> bool {
        !self.timed_out && self.rows.iter().all(|r| r.ready)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Running,
    Done,
}

/// Runs every object of the snapshot in `ctx` to an end.
pub async fn run<D: Drivers>(ctx: Arc<Context<D>>, options: OnceOptions) -> OnceReport {
    let snapshot = ctx.snapshot();
    let forgotten = lifecycle::forget_removed(&ctx, &snapshot.desired);
    lifecycle::recover_interrupted(&ctx);
    let mut keys = lifecycle::keys(&snapshot.desired);
    // Removed VMs are reconciled once more: stopped (and deleted per onDelete), then forgotten.
    keys.extend(
        forgotten
            .iter()
            .filter(|k| k.kind == crate::spec::Kind::VirtualMachine)
            .cloned(),
    );
    let attempts_allowed = options.attempts.max(1);

    let Loop {
        requests,
        mut finished,
        phase,
        handle,
    } = lifecycle::start(
        ctx.clone(),
        options.applier.clone(),
        Arc::new(super::metrics::Metrics::new()),
    );
    let mut progress: BTreeMap<ObjectKey, Progress> = keys
        .iter()
        .map(|k| (k.clone(), Progress::Running))
        .collect();
    let mut running = progress.len();
    let mut attempts: BTreeMap<ObjectKey, u32> = BTreeMap::new();
    // Machine -> the machines that wait for it (role `after`), built once.
    let dependents = lifecycle::dependents_index(&snapshot.desired);
    // Dependents ended because a machine they wait for failed, with why.
    let mut blocked: BTreeMap<ObjectKey, String> = BTreeMap::new();
    for key in &keys {
        let _ = requests.send(Request::Now(key.clone()));
    }

    let deadline = options.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut timed_out = false;
    let limit = options.timeout.unwrap_or_default();
    while running > 0 {
        let next = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, finished.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    timed_out = true;
                    break;
                }
            },
            None => finished.recv().await,
        };
        let Some(done) = next else {
            break;
        };
        let key = done.key;
        // A key already ended in this run (e.g. blocked by a failed
        // dependency) may still be polled by the loop: its reports no
        // longer count.
        if progress.get(&key) != Some(&Progress::Running) {
            continue;
        }
        let count = attempts.entry(key.clone()).or_insert(0);
        let failed = match done.outcome {
            Outcome::Succeeded(_) if lifecycle::is_waiting(&ctx, &key) => {
                // Waiting on dependencies is not an attempt.
                continue;
            }
            Outcome::Succeeded(_) => {
                *count += 1;
                progress.insert(key.clone(), Progress::Done);
                running -= 1;
                for dependent in dependents.get(&key).into_iter().flatten() {
                    let _ = requests.send(Request::Now(dependent.clone()));
                }
                false
            }
            Outcome::Failed { transient, .. } => {
                *count += 1;
                !transient || *count >= attempts_allowed
            }
            Outcome::Panicked { message, .. } => {
                *count += 1;
                tracing::error!(object = %key, %message, "reconcile panicked");
                *count >= attempts_allowed
            }
            Outcome::Aborted => true,
        };
        if failed {
            progress.insert(key.clone(), Progress::Done);
            running -= 1;
            // Everything waiting on it, directly or through others, ends too.
            let mut stack = vec![(key.clone(), key.clone())];
            while let Some((failed_key, root)) = stack.pop() {
                for dependent in dependents.get(&failed_key).into_iter().flatten() {
                    if progress.get(dependent) == Some(&Progress::Running) {
                        progress.insert(dependent.clone(), Progress::Done);
                        running -= 1;
                        blocked.insert(dependent.clone(), format!("not converged: {root} failed"));
                        stack.push((dependent.clone(), root.clone()));
                    }
                }
            }
        }
    }

    // Everything ended (or the clock ran out): stop the loop.
    let _ = phase.send(if timed_out {
        Phase::Abort
    } else {
        Phase::Graceful
    });
    drop(requests);
    let aborted = match handle.await {
        Ok(summary) => summary.aborted,
        Err(e) => {
            tracing::error!(error = %e, "the reconcile loop failed");
            Vec::new()
        }
    };
    for key in &aborted {
        if timed_out {
            tracing::warn!(object = %key, "aborted by the run's timeout");
            record_cut(&ctx, key, limit);
        } else {
            // Past the grace of the stop after every object ended (a
            // dependency poll, say): found interrupted at the next start.
            tracing::warn!(object = %key, "aborted when the run stopped; it is observed again on the next run");
        }
    }
    if !timed_out {
        lifecycle::prune_build_cache(&ctx).await;
    }
    // Written after the loop stopped, so no late dependency poll overwrites them.
    for (key, message) in &blocked {
        let mut status = ctx.store.status(key).ok().flatten().unwrap_or_default();
        let now = now_ms();
        status.set_condition(
            ConditionKind::Ready,
            false,
            Reason::DependencyFailed,
            message,
            now,
        );
        status.set_condition(ConditionKind::Reconciling, false, Reason::Unset, "", now);
        if let Err(e) = ctx.store.put_status(key, &status) {
            tracing::error!(object = %key, error = %e, "failed to record status");
        }
        tracing::warn!(object = %key, "{message}");
    }

    let rows = keys
        .iter()
        .filter(|key| !forgotten.contains(key))
        .map(|key| {
            let mut row = row(&ctx, key, attempts.get(key).copied().unwrap_or(0));
            // Only an object that ended this run Ready is ready: one the
            // clock cut off shows its last status's reason, never Ready.
            if progress.get(key) == Some(&Progress::Running) && row.ready {
                row.ready = false;
                row.reason = Reason::NotReconciled;
                row.message = format!(
                    "the run timed out after {} before this object's reconcile ended",
                    HumanDuration::from_millis(limit_ms(limit))
                );
            }
            row
        })
        .collect();
    OnceReport {
        rows,
        timed_out,
        forgotten,
        revision: snapshot.revision.short(),
    }
}

fn limit_ms(limit: Duration) -> u64 {
    u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)
}

/// Records the attempt the run's timeout cut on `key` as `Interrupted`,
/// with Ready=False: its steps may have changed the object halfway. An
/// abort before the attempt began changed nothing and leaves the status.
fn record_cut<D>(ctx: &Context<D>, key: &ObjectKey, limit: Duration) {
    let Ok(Some(mut status)) = ctx.store.status(key) else {
        return;
    };
    let Some(in_progress) = status.in_progress.take() else {
        return;
    };
    let now = now_ms();
    let message = format!(
        "the attempt was cut by the run's timeout ({}); the next run observes what it changed",
        HumanDuration::from_millis(limit_ms(limit))
    );
    status.set_condition(
        ConditionKind::Ready,
        false,
        Reason::Interrupted,
        &message,
        now,
    );
    status.set_condition(ConditionKind::Reconciling, false, Reason::Unset, "", now);
    let record = in_progress.interrupted(key.clone(), now);
    if let Err(e) = ctx.store.finish_attempt(&record, &status) {
        tracing::error!(object = %key, error = %e, "failed to record the attempt cut by the timeout");
    }
}

fn row<D>(ctx: &Context<D>, key: &ObjectKey, attempts: u32) -> Row {
    let status = ctx.store.status(key).ok().flatten().unwrap_or_default();
    let ready = status.condition(ConditionKind::Ready);
    Row {
        key: key.clone(),
        ready: status.is_ready(),
        reason: ready.map(|c| c.reason).unwrap_or(Reason::NotReconciled),
        message: ready.map(|c| c.message.clone()).unwrap_or_default(),
        attempts,
        generation: status
            .last_applied
            .as_ref()
            .map(|a| format!("{}-{}", a.generation, a.artifact)),
        current: ctx
            .store
            .facts(key)
            .ok()
            .flatten()
            .filter(|_| key.kind == crate::spec::Kind::Machine)
            .and_then(|f| MachineFacts::from_record(&f.facts))
            .map(|m| m.current_name()),
    }
}
