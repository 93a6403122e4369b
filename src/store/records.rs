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

/// Why a condition is what it is, or why an attempt ended as it did: the
/// CamelCase words users and programs match on (`HealthCheckFailed`),
/// stored and shown as those strings. The one vocabulary of reasons: every
/// condition, attempt result and event names one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Reason {
    /// A condition that is false for no particular reason (stored as "").
    #[serde(rename = "")]
    Unset,
    // Ready=True.
    /// A machine's generation is current and healthy.
    Converged,
    /// A VM runs as its spec says.
    Running,
    /// A VM is stopped as its spec says.
    Stopped,
    /// A service's roles are resolved.
    Resolved,
    /// Drifted, and the drift policy only reports it.
    DriftReported,
    // Progress.
    /// A machine waits for the machines of an earlier role, or for its VM.
    DependencyNotReady,
    /// The last attempt failed transiently; it is retried with backoff.
    ProgressingWithRetry,
    // Failures.
    BuildFailed,
    InstallFailed,
    SwitchFailed,
    ActivationFailed,
    HealthCheckFailed,
    /// The target was not reached over a new connection after activating.
    NotConfirmed,
    /// The activated generation failed and the previous one was re-activated.
    RolledBack,
    Unreachable,
    StoreFailed,
    RolesMissing,
    /// The VM a machine lives in is declared stopped.
    HostVmStopped,
    /// A machine this one waits for failed in this run.
    DependencyFailed,
    /// A build wrote into the desired-state directory.
    BuildChangedDirectory,
    /// Another activation runs on the target's state directory.
    ActivationBusy,
    Unsupported,
    /// A VM's `host` changed while it exists where it ran.
    HostChanged,
    HypervisorUnknown,
    DiskFailed,
    StopFailed,
    StartFailed,
    DeleteFailed,
    /// An attempt was cut short: the process died, or a timeout aborted it.
    Interrupted,
    /// Never reconciled yet.
    NotReconciled,
    // Drift.
    NoDrift,
    DriftDetected,
    /// An operator suspended the object: observed, never changed.
    Suspended,
    // Events.
    /// An operator ran a VM verb.
    OperatorVerb,
    /// An operator suspended or resumed an object.
    Suspension,
    /// The Git source's new tip was not applied (unsigned, unknown signer,
    /// not a fast-forward, invalid desired state).
    SourceRefused,
}

impl Reason {
    /// The word as users see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unset => "",
            Reason::Converged => "Converged",
            Reason::Running => "Running",
            Reason::Stopped => "Stopped",
            Reason::Resolved => "Resolved",
            Reason::DriftReported => "DriftReported",
            Reason::DependencyNotReady => "DependencyNotReady",
            Reason::ProgressingWithRetry => "ProgressingWithRetry",
            Reason::BuildFailed => "BuildFailed",
            Reason::InstallFailed => "InstallFailed",
            Reason::SwitchFailed => "SwitchFailed",
            Reason::ActivationFailed => "ActivationFailed",
            Reason::HealthCheckFailed => "HealthCheckFailed",
            Reason::NotConfirmed => "NotConfirmed",
            Reason::RolledBack => "RolledBack",
            Reason::Unreachable => "Unreachable",
            Reason::StoreFailed => "StoreFailed",
            Reason::RolesMissing => "RolesMissing",
            Reason::HostVmStopped => "HostVmStopped",
            Reason::DependencyFailed => "DependencyFailed",
            Reason::BuildChangedDirectory => "BuildChangedDirectory",
            Reason::ActivationBusy => "ActivationBusy",
            Reason::Unsupported => "Unsupported",
            Reason::HostChanged => "HostChanged",
            Reason::HypervisorUnknown => "HypervisorUnknown",
            Reason::DiskFailed => "DiskFailed",
            Reason::StopFailed => "StopFailed",
            Reason::StartFailed => "StartFailed",
            Reason::DeleteFailed => "DeleteFailed",
            Reason::Interrupted => "Interrupted",
            Reason::NotReconciled => "NotReconciled",
            Reason::NoDrift => "NoDrift",
            Reason::DriftDetected => "DriftDetected",
            Reason::Suspended => "Suspended",
            Reason::OperatorVerb => "OperatorVerb",
            Reason::Suspension => "Suspension",
            Reason::SourceRefused => "SourceRefused",
        }
    }
}

impl Reason {
    /// True for the reasons a Ready=False condition gives when something
    /// went wrong (a failed step, an unreachable target, a rollback, a
    /// refusal), as opposed to waiting or progressing: what is recorded as
    /// an event and notified as a failure.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Reason::BuildFailed
                | Reason::InstallFailed
                | Reason::SwitchFailed
                | Reason::ActivationFailed
                | Reason::HealthCheckFailed
                | Reason::NotConfirmed
                | Reason::RolledBack
                | Reason::Unreachable
                | Reason::StoreFailed
                | Reason::RolesMissing
                | Reason::HostVmStopped
                | Reason::DependencyFailed
                | Reason::BuildChangedDirectory
                | Reason::ActivationBusy
                | Reason::Unsupported
                | Reason::HostChanged
                | Reason::HypervisorUnknown
                | Reason::DiskFailed
                | Reason::StopFailed
                | Reason::StartFailed
                | Reason::DeleteFailed
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One condition with kstatus semantics: `last_transition_ms` is when
/// `status` last flipped, not when the condition was last written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub kind: ConditionKind,
    pub status: bool,
    pub reason: Reason,
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
    /// The steps that ended so far, each recorded when it ended, so an
    /// attempt cut by a crash keeps them.
    #[serde(default)]
    pub steps: Vec<StepRecord>,
    /// Steps sent to the target and not yet reported (a deploy's round
    /// trip): an attempt cut by a crash records them as interrupted, so
    /// history says what the target may have done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<StepRecord>,
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
            steps: self.steps.iter().chain(&self.pending).cloned().collect(),
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
    /// What converge will not do again until the object's inputs change or
    /// an operator asks (`converge reconcile KEY --retry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
}

/// An artifact converge holds back: it was rolled back from, or its build
/// changed the desired-state directory. Held while the inputs it came from
/// are the same (`inputs`), or until an operator asks for a retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    /// `RolledBack`, or `BuildChangedDirectory`.
    pub reason: Reason,
    /// A sentence for `status`, naming the generation or the files.
    pub message: String,
    /// The generation (`N-hash`) rolled back from, when there is one.
    pub generation: Option<String>,
    /// Identity of the inputs the held artifact came from.
    pub inputs: String,
    /// Files of the desired-state directory left out of `inputs` (those a
    /// build wrote there itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<String>,
    pub since_ms: u64,
}

impl StatusRecord {
    /// v2: conditions' reasons are [`Reason`]s (the same strings), and
    /// `in_progress` keeps the steps that ended.
    pub const FORMAT: u32 = 2;

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
        reason: Reason,
        message: impl Into<String>,
        now_ms: u64,
    ) {
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

/// How one step of an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    Succeeded,
    Failed,
    /// Planned, but not run: an earlier step failed, or what it would do
    /// was already so (an unchanged artifact).
    Skipped,
    /// Sent to the target, and the controller stopped before it answered:
    /// it may have run (the target's own records say).
    Interrupted,
}

/// One step of an attempt, as it ran. `name` and `detail` are the plan's
/// step (`plan::Step`): the same word `converge plan` prints, in the same
/// order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    pub name: String,
    pub status: StepStatus,
    /// The step's own fields (a health check's command, a disk's size);
    /// an empty object when it has none.
    pub detail: serde_json::Value,
    pub duration_ms: u64,
    /// The tail of the step's output kept for `converge history`.
    pub output: String,
}

impl StepRecord {
    /// True unless the step failed.
    pub fn ok(&self) -> bool {
        self.status != StepStatus::Failed
    }
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
        reason: Reason,
        message: String,
    },
    /// The attempt failed after activation and the previous generation was
    /// re-activated (`to_generation`, if known).
    RolledBack {
        reason: Reason,
        message: String,
        to_generation: Option<u64>,
    },
    /// Cut short: the process died mid-attempt (recorded after the
    /// restart), or a `--once` run's timeout aborted it.
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
    /// v2: steps say succeeded, failed or skipped and carry their detail;
    /// results' reasons are [`Reason`]s (the same strings).
    pub const FORMAT: u32 = 2;
}

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// What an event is about: an object, or the daemon's Git source (which is
/// no object). Stored as the object key's text or `source`, so events
/// written before sources existed read unchanged; an older converge skips a
/// `source` event as a record it cannot read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventSubject {
    Object(ObjectKey),
    /// The Git remote `run --git` pulls from.
    Source,
}

impl EventSubject {
    /// The text form of [`EventSubject::Source`].
    pub const SOURCE: &'static str = "source";
}

impl std::fmt::Display for EventSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventSubject::Object(key) => key.fmt(f),
            EventSubject::Source => f.write_str(EventSubject::SOURCE),
        }
    }
}

impl From<&ObjectKey> for EventSubject {
    fn from(key: &ObjectKey) -> Self {
        EventSubject::Object(key.clone())
    }
}

impl From<ObjectKey> for EventSubject {
    fn from(key: ObjectKey) -> Self {
        EventSubject::Object(key)
    }
}

impl PartialEq<ObjectKey> for EventSubject {
    fn eq(&self, other: &ObjectKey) -> bool {
        matches!(self, EventSubject::Object(key) if key == other)
    }
}

impl Serialize for EventSubject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventSubject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `source`, or an object key (`machine/web`).
impl std::str::FromStr for EventSubject {
    type Err = crate::spec::KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == EventSubject::SOURCE {
            return Ok(EventSubject::Source);
        }
        text.parse().map(EventSubject::Object)
    }
}

/// One event (tree `events`): something an operator may want to see later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRecord {
    /// Increasing across the store's life; the newest event has the highest.
    pub seq: u64,
    pub time_ms: u64,
    pub key: EventSubject,
    pub severity: Severity,
    pub reason: Reason,
    pub message: String,
}

impl EventRecord {
    pub const FORMAT: u32 = 1;
}

/// Why and since when an object is suspended (`converge suspend`, `vm
/// stop`, `vm delete`): it is observed, never changed. Kept in a tree of its
/// own, so no reconcile writing the object's status can drop it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suspension {
    pub since_ms: u64,
    /// The verb that suspended it: `suspend`, `vm stop`, `vm delete`.
    pub by: String,
}

impl Suspension {
    pub const FORMAT: u32 = 1;
}

/// The Git source of `run --git` (tree `meta`, key `source`): what was
/// applied, fetched and refused, for `status` and for the next start (the
/// applied commit is the base every new tip must fast-forward from).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRecord {
    /// The remote, any password hidden.
    pub url: String,
    pub branch: String,
    /// The directory inside the repository desired state is read from.
    pub dir: String,
    /// The commit in force (full hex), once one was accepted.
    pub applied: Option<String>,
    pub applied_ms: Option<u64>,
    /// The branch's tip at the last successful fetch.
    pub tip: Option<String>,
    /// When the last fetch ended, and when the last successful one did.
    pub fetched_ms: Option<u64>,
    pub succeeded_ms: Option<u64>,
    /// Why the last fetch failed; `None` after a success.
    pub error: Option<String>,
    /// Fetches failed in a row.
    pub failures: u32,
    /// The newest tip that was refused, while it is the branch's tip.
    pub refused: Option<Refusal>,
}

/// A tip that was not applied, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub commit: String,
    /// A sentence naming the cause (unsigned, unknown signer, not a
    /// fast-forward, invalid desired state).
    pub reason: String,
    pub since_ms: u64,
}

impl SourceRecord {
    pub const FORMAT: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_condition_moves_transition_time_only_when_status_flips() {
        let mut s = StatusRecord::default();
        s.set_condition(
            ConditionKind::Ready,
            false,
            Reason::NotReconciled,
            "first",
            10,
        );
        s.set_condition(
            ConditionKind::Ready,
            false,
            Reason::BuildFailed,
            "second",
            20,
        );
        let c = s.condition(ConditionKind::Ready).unwrap();
        assert_eq!((c.last_transition_ms, c.reason), (10, Reason::BuildFailed));
        assert!(!s.is_ready());

        s.set_condition(ConditionKind::Ready, true, Reason::Converged, "done", 30);
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
        s.set_condition(ConditionKind::Drifted, true, Reason::DriftDetected, "x", 1);
        assert!(!s.is_ready());
        assert!(s.condition(ConditionKind::Stalled).is_none());
    }
}
