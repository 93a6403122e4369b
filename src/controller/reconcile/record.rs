//! What a reconcile writes besides its attempt: the conditions of an object
//! that needs nothing done, drift lines (one WARN per new drift) with their
//! events, and the requeue interval with jitter.

use std::time::Duration;

use crate::controller::context::Context;
use crate::controller::notify::{Event, Notification};
use crate::plan;
use crate::spec::{DriftPolicy, ObjectKey};
use crate::store::records::{ConditionKind, Reason, Severity, StatusRecord, now_ms};
use crate::telemetry::{DRIFT_TARGET, error_chain};

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

/// A suspended object whose plan has steps: nothing runs. Ready is false
/// (what the spec asks is not what runs), with reason `Suspended` naming the
/// steps that wait; one INFO line when the object first waits so, DEBUG at
/// every later look.
pub fn suspended(
    key: &ObjectKey,
    status: &mut StatusRecord,
    suspension: &crate::store::Suspension,
    change: &plan::Change,
) {
    let steps: Vec<&str> = change.steps.iter().map(plan::Step::name).collect();
    let message = format!(
        "suspended (by `converge {}`): not changed; waiting: {}; `converge resume {key}` lets it converge",
        suspension.by,
        steps.join(" ")
    );
    let was = status
        .condition(ConditionKind::Ready)
        .is_some_and(|c| c.reason == Reason::Suspended && c.message == message);
    if was {
        tracing::debug!(object = %key, "{message}");
    } else {
        tracing::info!(object = %key, "{message}");
    }
    let now = now_ms();
    status.set_condition(
        ConditionKind::Ready,
        false,
        Reason::Suspended,
        &message,
        now,
    );
    status.set_condition(ConditionKind::Reconciling, false, Reason::Unset, "", now);
    status.set_condition(ConditionKind::Stalled, false, Reason::Unset, "", now);
    status.next_attempt_ms = None;
}

/// Marks `status` Ready (nothing to do, or done): Reconciling and Stalled
/// cleared, failures reset.
pub fn set_ready(
    status: &mut StatusRecord,
    reason: Reason,
    message: impl Into<String>,
    spec_hash: &str,
) {
    let now = now_ms();
    status.set_condition(ConditionKind::Ready, true, reason, message, now);
    status.set_condition(ConditionKind::Reconciling, false, Reason::Unset, "", now);
    status.set_condition(ConditionKind::Stalled, false, Reason::Unset, "", now);
    status.observed_spec_hash = Some(spec_hash.to_owned());
    status.failures = 0;
    status.next_attempt_ms = None;
}

/// One WARN line (target `converge::drift`) and one event per drifted
/// field, and one notification, when it is first seen or changes; the Drifted condition remembers
/// what was reported, and is cleared when nothing drifts.
pub fn report_drift<D>(
    ctx: &Context<D>,
    key: &ObjectKey,
    status: &mut StatusRecord,
    drift: &[plan::Drift],
    policy: DriftPolicy,
) {
    let now = now_ms();
    if drift.is_empty() {
        if status
            .condition(ConditionKind::Drifted)
            .is_some_and(|c| c.status)
        {
            status.set_condition(ConditionKind::Drifted, false, Reason::NoDrift, "", now);
        }
        return;
    }
    let message: Vec<String> = drift
        .iter()
        .map(|d| {
            format!(
                "{}: applied {}, observed {}",
                d.field, d.applied, d.observed
            )
        })
        .collect();
    let message = message.join("; ");
    let already = status
        .condition(ConditionKind::Drifted)
        .is_some_and(|c| c.status && c.message == message);
    if !already {
        ctx.notifier.notify(&Notification::new(
            key.to_string(),
            Event::DriftDetected,
            Reason::DriftDetected,
            &message,
            Some(ctx.snapshot().revision.short()),
        ));
        for d in drift {
            tracing::warn!(
                target: DRIFT_TARGET,
                object = %key,
                field = %d.field,
                applied = %d.applied,
                observed = %d.observed,
                action = %d.action,
                "drift detected"
            );
            let event = format!(
                "{}: applied {}, observed {}; action: {}",
                d.field, d.applied, d.observed, d.action
            );
            if let Err(e) =
                ctx.store
                    .append_event(key, Severity::Warning, Reason::DriftDetected, &event)
            {
                tracing::error!(object = %key, error = %error_chain(&e), "failed to record event");
            }
        }
    }
    let reason = match policy {
        DriftPolicy::Correct => Reason::DriftDetected,
        DriftPolicy::Warn | DriftPolicy::Ignore => Reason::DriftReported,
    };
    status.set_condition(ConditionKind::Drifted, true, reason, message, now);
}
