//! The records the store keeps, one type per tree, and their format versions.
//!
//! These types are what other modules read and write through [`super::Store`];
//! their serde form *is* the on-disk format (inside the versioned envelope of
//! `store::codec`), so a change to a field is a format change: bump the
//! record's `FORMAT` constant and teach `Versioned::migrate`
//! to read the old version. This file holds plain data and small predicates
//! only: it must not touch sled, the clock (other than [`now_ms`]) or any IO.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::spec::ObjectKey;

/// Milliseconds since the Unix epoch, the unit of every time in a record.
///
/// A clock set before 1970 reads as 0 and one past the year 584 million as
/// `u64::MAX`: a wrong clock skews times, it never fails a write.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The spec last seen for one object key (tree `specs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecRecord {
    /// Hash of the spec document; equal hashes mean nothing to re-apply.
    pub spec_hash: String,
    /// Git revision of the desired-state directory the spec came from.
    pub revision: Option<String>,
    /// The spec as loaded, in its JSON form.
    pub spec: serde_json::Value,
    /// When this spec was first seen with this hash.
    pub seen_ms: u64,
}

impl SpecRecord {
    pub const FORMAT: u32 = 1;
}

/// What was last observed on the real machine or VM (tree `facts`).
///
/// The store does not interpret `facts`: each driver defines its own shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactsRecord {
    /// When the facts were observed.
    pub observed_ms: u64,
    pub facts: serde_json::Value,
}

impl FactsRecord {
    pub const FORMAT: u32 = 1;
}

/// The kstatus-style conditions an object reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionKind {
    /// The object matches its spec and passed its health checks.
    Ready,
    /// A reconcile is under way or pending.
    Reconciling,
    /// Progress needs a spec change (terminal error); no retry until then.
    Stalled,
    /// Facts differ from what was last applied, without a spec change.
    Drifted,
}

/// One condition with kstatus semantics: `last_transition_ms` is when
/// `status` last flipped, not when the condition was last written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub kind: ConditionKind,
    pub status: bool,
    /// A CamelCase word a program can match on (`HealthCheckFailed`).
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
    pub last_transition_ms: u64,
}

/// What was last activated on an object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Applied {
    /// The generation number on the machine.
    pub generation: u64,
    /// Content hash of the artifact that was activated.
    pub artifact: String,
    pub revision: Option<String>,
    pub spec_hash: String,
    /// Hash of the roles document that went into the build, if any.
    pub roles_hash: Option<String>,
    pub applied_ms: u64,
}

/// A reconcile that started and has not yet been recorded as finished.
///
/// Found set after a restart, it means the previous process died mid-reconcile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InProgress {
    pub attempt_id: u64,
    pub started_ms: u64,
    pub spec_hash: String,
    /// The revision the attempt was working from.
    pub revision: Option<String>,
}

impl InProgress {
    /// The history record of this attempt when it was cut short by a crash:
    /// what to pass to [`super::Store::finish_attempt`] after a restart.
    pub fn interrupted(&self, key: ObjectKey, now_ms: u64) -> AttemptRecord {
        AttemptRecord {
            id: self.attempt_id,
            key,
            started_ms: self.started_ms,
            finished_ms: now_ms,
            revision: self.revision.clone(),
            spec_hash: self.spec_hash.clone(),
            generation: None,
            artifact: None,
            steps: Vec::new(),
            result: AttemptResult::Interrupted,
        }
    }
}

/// The status of one object (tree `status`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRecord {
    /// At most one condition per [`ConditionKind`]; keep it so through
    /// [`StatusRecord::set_condition`].
    pub conditions: Vec<Condition>,
    /// Spec hash of the last reconcile that ran to an end (kstatus's
    /// observedGeneration).
    pub observed_spec_hash: Option<String>,
    pub last_applied: Option<Applied>,
    /// Consecutive failed attempts; 0 after a success.
    pub failures: u32,
    /// When the next attempt is due, if one is scheduled.
    pub next_attempt_ms: Option<u64>,
    /// Set by [`super::Store::begin_attempt`], cleared by
    /// [`super::Store::finish_attempt`].
    pub in_progress: Option<InProgress>,
    pub last_attempt_id: Option<u64>,
}

impl StatusRecord {
    pub const FORMAT: u32 = 1;

    /// The condition of this kind, if it was ever set.
    pub fn condition(&self, kind: ConditionKind) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }

    /// Sets a condition. `last_transition_ms` becomes `now_ms` only when the
    /// condition is new or its `status` flips; a changed reason or message
    /// alone keeps the old transition time (kstatus semantics).
    pub fn set_condition(
        &mut self,
        kind: ConditionKind,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
        now_ms: u64,
    ) {
        let reason = reason.into();
        let message = message.into();
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(c) => {
                if c.status != status {
                    c.status = status;
                    c.last_transition_ms = now_ms;
                }
                c.reason = reason;
                c.message = message;
            }
            None => self.conditions.push(Condition {
                kind,
                status,
                reason,
                message,
                last_transition_ms: now_ms,
            }),
        }
    }

    /// True when the `Ready` condition is set and true.
    pub fn is_ready(&self) -> bool {
        self.condition(ConditionKind::Ready)
            .is_some_and(|c| c.status)
    }
}

/// One step of an attempt, as it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    pub name: String,
    pub ok: bool,
    pub duration_ms: u64,
    /// The tail of the step's output kept for `converge history`.
    pub output: String,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum AttemptResult {
    /// Changes were applied and verified.
    Succeeded,
    /// Facts already matched the spec: nothing was executed.
    NoChange,
    Failed {
        reason: String,
        message: String,
    },
    /// The attempt failed after activation and the previous generation was
    /// re-activated (`to_generation`, if known).
    RolledBack {
        reason: String,
        message: String,
        to_generation: Option<u64>,
    },
    /// The process died mid-attempt; recorded after the restart.
    Interrupted,
}

impl AttemptResult {
    /// True for the results that leave the object as its spec asks.
    pub fn is_success(&self) -> bool {
        matches!(self, AttemptResult::Succeeded | AttemptResult::NoChange)
    }
}

/// One reconcile attempt of one object (tree `history`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptRecord {
    /// From [`super::Store::begin_attempt`]; unique across the store and
    /// increasing, also across restarts.
    pub id: u64,
    pub key: ObjectKey,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub revision: Option<String>,
    pub spec_hash: String,
    /// The generation activated by this attempt, if it activated one.
    pub generation: Option<u64>,
    /// Content hash of the artifact built, if one was built.
    pub artifact: Option<String>,
    pub steps: Vec<StepRecord>,
    pub result: AttemptResult,
}

impl AttemptRecord {
    pub const FORMAT: u32 = 1;
}

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// One event (tree `events`): something an operator may want to see later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRecord {
    /// Increasing across the store's life; the newest event has the highest.
    pub seq: u64,
    pub time_ms: u64,
    pub key: ObjectKey,
    pub severity: Severity,
    pub reason: String,
    pub message: String,
}

impl EventRecord {
    pub const FORMAT: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_moves_transition_time_only_when_status_flips() {
        let mut s = StatusRecord::default();
        s.set_condition(ConditionKind::Ready, false, "Pending", "first", 10);
        s.set_condition(ConditionKind::Ready, false, "Building", "second", 20);
        let c = s.condition(ConditionKind::Ready).unwrap();
        assert_eq!((c.last_transition_ms, c.reason.as_str()), (10, "Building"));
        assert!(!s.is_ready());

        s.set_condition(ConditionKind::Ready, true, "Succeeded", "done", 30);
        assert_eq!(
            s.condition(ConditionKind::Ready)
                .unwrap()
                .last_transition_ms,
            30
        );
        assert!(s.is_ready());
        assert_eq!(s.conditions.len(), 1, "one condition per kind");
    }

    #[test]
    fn status_without_ready_condition_is_not_ready() {
        let mut s = StatusRecord::default();
        assert!(!s.is_ready());
        s.set_condition(ConditionKind::Drifted, true, "Drift", "x", 1);
        assert!(!s.is_ready());
        assert!(s.condition(ConditionKind::Stalled).is_none());
    }
}
