//! What changed in an object's Ready condition across one reconcile, and
//! who hears of it: failures, rollbacks and recoveries become events in the
//! store, and every transition becomes a notification when the daemon has
//! sinks. Drift is recorded and told where it is found (`record.rs`): a
//! corrected drift is gone from the conditions by the end of the reconcile.
//!
//! [`transitions`] is pure: the status before and after, and whether this
//! is the object's first reconcile since the daemon started (whose Ready
//! is told even when it did not change, so a restarted daemon says where
//! things stand). A failure is told once per new reason, not once per retry.

use crate::controller::context::Context;
use crate::controller::notify::{Event, Notification};
use crate::spec::ObjectKey;
use crate::store::records::{ConditionKind, Reason, StatusRecord};
use crate::telemetry::error_chain;

/// One transition: what happened, with the condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub event: Event,
    pub reason: Reason,
    pub message: String,
}

/// The transitions of Ready from `before` to `after`.
pub fn transitions(
    before: Option<&StatusRecord>,
    after: &StatusRecord,
    first_since_start: bool,
) -> Vec<Transition> {
    let mut out = Vec::new();
    let ready_before = before.and_then(|s| s.condition(ConditionKind::Ready));
    if let Some(ready) = after.condition(ConditionKind::Ready) {
        let changed =
            ready_before.is_none_or(|b| b.status != ready.status || b.reason != ready.reason);
        if ready.status && (changed || first_since_start) {
            let failed_before = ready_before.filter(|b| !b.status && b.reason.is_failure());
            out.push(match failed_before {
                Some(b) if changed => Transition {
                    event: Event::Recovered,
                    reason: ready.reason,
                    message: format!("recovered from {}: {}", b.reason, ready.message),
                },
                _ => Transition {
                    event: Event::Ready,
                    reason: ready.reason,
                    message: ready.message.clone(),
                },
            });
        } else if !ready.status && changed && ready.reason.is_failure() {
            out.push(Transition {
                event: if ready.reason == Reason::RolledBack {
                    Event::RolledBack
                } else {
                    Event::Failed
                },
                reason: ready.reason,
                message: ready.message.clone(),
            });
        }
    }
    out
}

/// Records and tells what `key`'s reconcile changed; `revision` is the one
/// it worked from.
pub fn after_reconcile<D>(
    ctx: &Context<D>,
    key: &ObjectKey,
    before: Option<&StatusRecord>,
    revision: &str,
) {
    let after = match ctx.store.status(key) {
        Ok(Some(after)) => after,
        // Forgotten (a removed VM that was stopped), or unreadable: nothing to tell.
        Ok(None) | Err(_) => return,
    };
    let first = ctx.notifier.first_since_start(key);
    for t in transitions(before, &after, first) {
        let stored = matches!(
            t.event,
            Event::Failed | Event::RolledBack | Event::Recovered
        );
        if stored {
            if let Err(e) = ctx
                .store
                .append_event(key, t.event.severity(), t.reason, &t.message)
            {
                tracing::error!(object = %key, error = %error_chain(&e), "failed to record event");
            }
        }
        ctx.notifier.notify(&Notification::new(
            key.to_string(),
            t.event,
            t.reason,
            t.message,
            Some(revision.to_owned()),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ready: Option<(bool, Reason)>, drift: Option<&str>) -> StatusRecord {
        let mut s = StatusRecord::default();
        if let Some((ok, reason)) = ready {
            s.set_condition(ConditionKind::Ready, ok, reason, format!("{reason}"), 1);
        }
        if let Some(message) = drift {
            s.set_condition(
                ConditionKind::Drifted,
                true,
                Reason::DriftDetected,
                message,
                1,
            );
        }
        s
    }

    fn events(ts: &[Transition]) -> Vec<Event> {
        ts.iter().map(|t| t.event).collect()
    }

    #[test]
    fn ready_is_told_when_it_becomes_true_or_first_since_start() {
        let ready = status(Some((true, Reason::Converged)), None);
        assert_eq!(events(&transitions(None, &ready, false)), [Event::Ready]);
        assert_eq!(events(&transitions(Some(&ready), &ready, false)), []);
        assert_eq!(
            events(&transitions(Some(&ready), &ready, true)),
            [Event::Ready],
            "the first converge after the daemon starts is told"
        );
        let waiting = status(Some((false, Reason::DependencyNotReady)), None);
        assert_eq!(
            events(&transitions(Some(&waiting), &ready, false)),
            [Event::Ready]
        );
    }

    #[test]
    fn failures_are_told_once_per_reason_and_recovery_names_the_failure() {
        let ok = status(Some((true, Reason::Converged)), None);
        let failed = status(Some((false, Reason::HealthCheckFailed)), None);
        let rolled = status(Some((false, Reason::RolledBack)), None);
        assert_eq!(
            events(&transitions(Some(&ok), &failed, false)),
            [Event::Failed]
        );
        assert_eq!(
            events(&transitions(Some(&failed), &failed, false)),
            [],
            "a retry that fails the same way is not news"
        );
        assert_eq!(
            events(&transitions(Some(&failed), &failed, true)),
            [],
            "nor is it at a restart"
        );
        assert_eq!(
            events(&transitions(Some(&failed), &rolled, false)),
            [Event::RolledBack]
        );
        let recovered = transitions(Some(&rolled), &ok, false);
        assert_eq!(events(&recovered), [Event::Recovered]);
        assert!(
            recovered[0]
                .message
                .starts_with("recovered from RolledBack")
        );
        let waiting = status(Some((false, Reason::DependencyNotReady)), None);
        assert_eq!(
            events(&transitions(Some(&ok), &waiting, false)),
            [],
            "waiting is not a failure"
        );
    }
}
