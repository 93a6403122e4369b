//! `reconcile --once`: run the loop until every object is Ready or has used
//! up its attempts for this run, then stop.
//!
//! Each object gets at most `attempts` tries (transient failures are retried
//! with the usual per-key backoff); a terminal error ends it at once. A
//! machine waiting for dependencies that failed ends failed too, saying so.
//! Over the whole run stands one timeout: past it, running steps are aborted
//! and the report says the run timed out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::applier::{Config as ApplierConfig, Outcome, Phase, Request};
use super::context::Context;
use super::lifecycle::{self, Loop};
use crate::driver::capability::Drivers;
use crate::spec::ObjectKey;
use crate::store::records::{ConditionKind, now_ms};

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
    pub reason: String,
    pub message: String,
    pub attempts: u32,
    pub generation: Option<String>,
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
    let mut attempts: BTreeMap<ObjectKey, u32> = BTreeMap::new();
    let mut failed: BTreeSet<ObjectKey> = BTreeSet::new();
    for key in &keys {
        let _ = requests.send(Request::Now(key.clone()));
    }

    let deadline = options.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut timed_out = false;
    while progress.values().any(|p| *p == Progress::Running) {
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
        let count = attempts.entry(key.clone()).or_insert(0);
        match done.outcome {
            Outcome::Succeeded(_) if lifecycle::is_waiting(&ctx, &key) => {
                // Waiting on dependencies is not an attempt.
            }
            Outcome::Succeeded(_) => {
                *count += 1;
                progress.insert(key.clone(), Progress::Done);
                for dependent in lifecycle::dependents_of(&ctx, &key) {
                    let _ = requests.send(Request::Now(dependent));
                }
            }
            Outcome::Failed { transient, .. } => {
                *count += 1;
                if !transient || *count >= attempts_allowed {
                    progress.insert(key.clone(), Progress::Done);
                    failed.insert(key.clone());
                }
            }
            Outcome::Panicked { message, .. } => {
                *count += 1;
                tracing::error!(object = %key, %message, "reconcile panicked");
                if *count >= attempts_allowed {
                    progress.insert(key.clone(), Progress::Done);
                    failed.insert(key.clone());
                }
            }
            Outcome::Aborted => {
                progress.insert(key.clone(), Progress::Done);
                failed.insert(key.clone());
            }
        }
        fail_dependents_of_failed(&ctx, &mut progress, &failed);
    }

    // Everything ended (or the clock ran out): stop the loop.
    let _ = phase.send(if timed_out {
        Phase::Abort
    } else {
        Phase::Graceful
    });
    drop(requests);
    let summary = handle.await.ok();
    if let Some(summary) = &summary {
        for key in &summary.aborted {
            tracing::warn!(object = %key, "aborted by the run's timeout");
        }
    }
    // Drain reports that raced with the shutdown.
    while let Ok(done) = finished.try_recv() {
        if matches!(done.outcome, Outcome::Aborted) {
            failed.insert(done.key);
        }
    }

    let rows = keys
        .iter()
        .filter(|key| !forgotten.contains(key))
        .map(|key| row(&ctx, key, attempts.get(key).copied().unwrap_or(0)))
        .collect();
    OnceReport {
        rows,
        timed_out,
        forgotten,
        revision: snapshot.revision.short(),
    }
}

/// Machines still waiting for a machine that has failed for good end failed.
fn fail_dependents_of_failed<D>(
    ctx: &Context<D>,
    progress: &mut BTreeMap<ObjectKey, Progress>,
    failed: &BTreeSet<ObjectKey>,
) {
    if failed.is_empty() {
        return;
    }
    let snapshot = ctx.snapshot();
    // Iterate to a fixed point: a failure can cascade through several roles.
    loop {
        let mut changed = false;
        for (name, roles) in &snapshot.desired.roles {
            let key = ObjectKey::machine(name.clone());
            if progress.get(&key) != Some(&Progress::Running) {
                continue;
            }
            let blocked: Vec<String> = roles
                .after
                .iter()
                .map(|d| ObjectKey::machine(d.clone()))
                .filter(|d| {
                    failed.contains(d)
                        || progress.get(d) == Some(&Progress::Done) && !is_ready(ctx, d)
                })
                .map(|d| d.to_string())
                .collect();
            if blocked.is_empty() {
                continue;
            }
            let mut status = ctx.store.status(&key).ok().flatten().unwrap_or_default();
            let now = now_ms();
            let message = format!("not converged: {} failed", blocked.join(", "));
            status.set_condition(
                ConditionKind::Ready,
                false,
                "DependencyFailed",
                &message,
                now,
            );
            status.set_condition(ConditionKind::Reconciling, false, "", "", now);
            if let Err(e) = ctx.store.put_status(&key, &status) {
                tracing::error!(object = %key, error = %e, "failed to record status");
            }
            tracing::warn!(object = %key, "{message}");
            progress.insert(key, Progress::Done);
            changed = true;
        }
        if !changed {
            break;
        }
    }
}

fn is_ready<D>(ctx: &Context<D>, key: &ObjectKey) -> bool {
    ctx.store
        .status(key)
        .ok()
        .flatten()
        .is_some_and(|s| s.is_ready())
}

fn row<D>(ctx: &Context<D>, key: &ObjectKey, attempts: u32) -> Row {
    let status = ctx.store.status(key).ok().flatten().unwrap_or_default();
    let ready = status.condition(ConditionKind::Ready);
    Row {
        key: key.clone(),
        ready: status.is_ready(),
        reason: ready
            .map(|c| c.reason.clone())
            .unwrap_or_else(|| "NotReconciled".to_owned()),
        message: ready.map(|c| c.message.clone()).unwrap_or_default(),
        attempts,
        generation: status.last_applied.as_ref().map(|a| {
            format!(
                "{}-{}",
                a.generation,
                &a.artifact[..a.artifact.len().min(12)]
            )
        }),
    }
}
