//! `reconcile(key)`: observe, plan, execute, record, for one object.
//!
//! Gets the key, never the reason it was triggered. Dispatches on the kind;
//! each kind's reconcile reads the spec from the snapshot and the records
//! from the store, observes afresh, and returns an [`Action`] (when to look
//! again) or a [`ReconcileError`] that says whether retrying can help.

pub mod machine;
pub mod vm;

use std::sync::Arc;
use std::time::Duration;

use crate::controller::applier::{Action, ReconcileError as ApplierError};
use crate::controller::context::Context;
use crate::driver::capability::Drivers;
use crate::spec::{Kind, ObjectKey};
use crate::store::records::{ConditionKind, StatusRecord, now_ms};

/// Why a reconcile did not converge its object.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ReconcileError {
    /// CamelCase, as in status conditions: `BuildFailed`, `RolledBack`, …
    pub reason: String,
    pub message: String,
    pub transient: bool,
}

impl ReconcileError {
    pub fn transient(reason: &str, message: impl Into<String>) -> ReconcileError {
        ReconcileError {
            reason: reason.to_owned(),
            message: message.into(),
            transient: true,
        }
    }

    pub fn terminal(reason: &str, message: impl Into<String>) -> ReconcileError {
        ReconcileError {
            reason: reason.to_owned(),
            message: message.into(),
            transient: false,
        }
    }
}

impl ApplierError for ReconcileError {
    fn is_transient(&self) -> bool {
        self.transient
    }
}

/// The interval with ±10% jitter, so a fleet's resyncs spread out.
pub fn jittered(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A cheap per-call fraction in [-0.1, 0.1]; cryptographic quality is not needed.
    let mixed = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    let fraction = (mixed as f64 / (1u64 << 53) as f64) * 0.2 - 0.1;
    interval.mul_f64(1.0 + fraction)
}

/// Reconciles one object.
pub async fn reconcile<D: Drivers>(
    ctx: Arc<Context<D>>,
    key: ObjectKey,
) -> Result<Action, ReconcileError> {
    let result = match key.kind {
        Kind::Machine => machine::reconcile(&ctx, &key).await,
        Kind::Service => reconcile_service(&ctx, &key),
        Kind::VirtualMachine => vm::reconcile(&ctx, &key).await,
    };
    if let Err(e) = &result {
        record_failure(&ctx, &key, e);
    }
    result
}

/// Marks the status of a failed reconcile (the attempt record, if any, was
/// written by the kind's reconcile).
fn record_failure<D>(ctx: &Context<D>, key: &ObjectKey, e: &ReconcileError) {
    let mut status = ctx.store.status(key).ok().flatten().unwrap_or_default();
    let now = now_ms();
    status.set_condition(ConditionKind::Ready, false, &e.reason, &e.message, now);
    if e.transient {
        status.set_condition(
            ConditionKind::Reconciling,
            true,
            "ProgressingWithRetry",
            &e.message,
            now,
        );
        status.set_condition(ConditionKind::Stalled, false, "", "", now);
    } else {
        status.set_condition(ConditionKind::Reconciling, false, "", "", now);
        status.set_condition(ConditionKind::Stalled, true, &e.reason, &e.message, now);
    }
    status.failures = status.failures.saturating_add(1);
    if let Err(store_error) = ctx.store.put_status(key, &status) {
        tracing::error!(object = %key, error = %store_error, "failed to record status");
    }
}

/// Services have no process of their own: their effect is each member
/// machine's roles document. A service is Ready once resolved.
fn reconcile_service<D>(ctx: &Context<D>, key: &ObjectKey) -> Result<Action, ReconcileError> {
    let snapshot = ctx.snapshot();
    let Some(service) = snapshot.desired.services.get(&key.name) else {
        return Ok(Action::AwaitChange);
    };
    let members: usize = snapshot
        .desired
        .roles
        .values()
        .filter(|r| r.services.contains(&key.name))
        .count();
    let mut status: StatusRecord = ctx.store.status(key).ok().flatten().unwrap_or_default();
    let now = now_ms();
    let message = format!(
        "{} roles resolved for {members} machines",
        service.spec.roles.len()
    );
    status.set_condition(ConditionKind::Ready, true, "Resolved", message, now);
    status.set_condition(ConditionKind::Reconciling, false, "", "", now);
    status.set_condition(ConditionKind::Stalled, false, "", "", now);
    status.observed_spec_hash = Some(service.spec_hash.clone());
    status.failures = 0;
    ctx.store
        .put_status(key, &status)
        .map_err(|e| ReconcileError::transient("StoreFailed", e.to_string()))?;
    Ok(Action::AwaitChange)
}
