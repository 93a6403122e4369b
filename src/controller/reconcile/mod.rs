//! `reconcile(key)`: observe, plan, execute, record, for one object.
//!
//! Gets the key, never the reason it was triggered. Dispatches on the kind
//! (`machine`, `vm`, `service`); each kind's reconcile reads the spec from
//! the snapshot and the records from the store, observes afresh, plans with
//! `plan::diff`, executes exactly the plan's steps (`deploy` for machines),
//! records the attempt (`attempt`), and returns an [`Action`] (when to look
//! again) or a [`ReconcileError`] that says whether retrying can help.
//! What changed in the object's conditions is then recorded as events and
//! told to the notifier (`transition`).

mod attempt;
mod deploy;
mod hold;
pub mod machine;
mod record;
mod rollback;
mod service;
pub mod transition;
pub mod vm;

pub use service::document as service_document;

use std::sync::Arc;

use crate::controller::applier::Action;
use crate::controller::context::Context;
use crate::controller::error::ReconcileError;
use crate::driver::capability::Drivers;
use crate::spec::{Kind, ObjectKey};
use crate::store::records::{ConditionKind, Reason, now_ms};
use crate::telemetry::error_chain;

/// Reconciles one object.
pub async fn reconcile<D: Drivers>(
    ctx: Arc<Context<D>>,
    key: ObjectKey,
) -> Result<Action, ReconcileError> {
    let before = ctx.store.status(&key).ok().flatten();
    let revision = ctx.snapshot().revision.short();
    let result = match key.kind {
        Kind::Machine => machine::reconcile(&ctx, &key).await,
        Kind::Service => service::reconcile(&ctx, &key),
        Kind::VirtualMachine => vm::reconcile(&ctx, &key).await,
    };
    if let Err(e) = &result {
        if matches!(e, ReconcileError::Held { .. }) {
            // Nothing ran, so no step logged it: say why at every look.
            tracing::warn!(object = %key, reason = %e.reason(), "{}", e.message());
        }
        record_failure(&ctx, &key, e);
    }
    transition::after_reconcile(&ctx, &key, before.as_ref(), &revision);
    result
}

/// Marks the status of a failed reconcile (the attempt record, if any, was
/// written by the kind's reconcile).
fn record_failure<D>(ctx: &Context<D>, key: &ObjectKey, e: &ReconcileError) {
    let mut status = ctx.store.status(key).ok().flatten().unwrap_or_default();
    let now = now_ms();
    let message = e.message();
    status.set_condition(ConditionKind::Ready, false, e.reason(), &message, now);
    if e.is_transient() {
        status.set_condition(
            ConditionKind::Reconciling,
            true,
            Reason::ProgressingWithRetry,
            &message,
            now,
        );
        status.set_condition(ConditionKind::Stalled, false, Reason::Unset, "", now);
    } else {
        status.set_condition(ConditionKind::Reconciling, false, Reason::Unset, "", now);
        status.set_condition(ConditionKind::Stalled, true, e.reason(), &message, now);
    }
    status.failures = status.failures.saturating_add(1);
    if let Err(store_error) = ctx.store.put_status(key, &status) {
        tracing::error!(object = %key, error = %error_chain(&store_error), "failed to record status");
    }
}
