//! The on-disk encoding of every value: a versioned JSON envelope.
//!
//! Each value is stored as `{"v":<format>,"data":<record>}`. JSON because it
//! is readable with any sled dump or hex viewer when something goes wrong,
//! because serde_json is already a dependency (no second serde format to
//! trust), and because the records are small and few (a thousand objects),
//! so its size and speed do not matter. The version is per record type: a v2
//! of one record implements [`Versioned::migrate`] for v1 and leaves the
//! others alone. This file only turns bytes into records and back: it must
//! not know about trees' key layout or touch sled.

use std::cmp::Ordering;
use std::fmt::Display;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::StoreError;
use super::records::{
    AttemptRecord, EventRecord, FactsRecord, SourceRecord, SpecRecord, StatusRecord, Suspension,
};

/// A record type with a format version.
pub(crate) trait Versioned: Serialize + DeserializeOwned {
    /// The version this build writes, and the newest it reads.
    const FORMAT: u32;

    /// Reads the envelope `bytes` of an older format `version`. `None` means
    /// that version is not readable (the default: there is only v1 so far).
    fn migrate(version: u32, bytes: &[u8]) -> Option<Result<Self, serde_json::Error>> {
        let _ = (version, bytes);
        None
    }
}

impl Versioned for SpecRecord {
    const FORMAT: u32 = SpecRecord::FORMAT;
}
impl Versioned for Suspension {
    const FORMAT: u32 = Suspension::FORMAT;
}
impl Versioned for FactsRecord {
    const FORMAT: u32 = FactsRecord::FORMAT;
}
impl Versioned for StatusRecord {
    const FORMAT: u32 = StatusRecord::FORMAT;

    /// v1 has the same shape: reasons were the same strings, and
    /// `in_progress` had no steps (read as none).
    fn migrate(version: u32, bytes: &[u8]) -> Option<Result<Self, serde_json::Error>> {
        (version == 1).then(|| serde_json::from_slice::<Envelope<Self>>(bytes).map(|e| e.data))
    }
}
impl Versioned for AttemptRecord {
    const FORMAT: u32 = AttemptRecord::FORMAT;

    /// v1 steps were `{name, ok, duration_ms, output}`: `ok` becomes
    /// succeeded or failed, with no detail.
    fn migrate(version: u32, bytes: &[u8]) -> Option<Result<Self, serde_json::Error>> {
        if version != 1 {
            return None;
        }
        Some((|| {
            let mut envelope: serde_json::Value = serde_json::from_slice(bytes)?;
            let steps = envelope
                .pointer_mut("/data/steps")
                .and_then(serde_json::Value::as_array_mut);
            for step in steps.into_iter().flatten() {
                if let Some(step) = step.as_object_mut() {
                    let ok = step.remove("ok").and_then(|v| v.as_bool()).unwrap_or(false);
                    step.insert(
                        "status".into(),
                        if ok { "succeeded" } else { "failed" }.into(),
                    );
                    step.insert("detail".into(), serde_json::json!({}));
                }
            }
            let data = envelope
                .get_mut("data")
                .map(serde_json::Value::take)
                .unwrap_or_default();
            serde_json::from_value(data)
        })())
    }
}
impl Versioned for EventRecord {
    const FORMAT: u32 = EventRecord::FORMAT;
}
impl Versioned for SourceRecord {
    const FORMAT: u32 = SourceRecord::FORMAT;
}

/// Counters and markers in the `meta` tree.
impl Versioned for u64 {
    const FORMAT: u32 = 1;
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u32,
    data: &'a T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<T> {
    v: u32,
    data: T,
}

/// Only the version, to explain a value that did not decode as the current one.
#[derive(Deserialize)]
struct Header {
    v: u32,
}

/// Encodes `value` in the current format of its type.
pub(crate) fn encode<T: Versioned>(
    tree: &'static str,
    key: &dyn Display,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&EnvelopeRef {
        v: T::FORMAT,
        data: value,
    })
    .map_err(|source| StoreError::Encode {
        tree,
        key: key.to_string(),
        source,
    })
}

/// Decodes a value written by [`encode`] of this or an older supported
/// version. A newer or unknown version is [`StoreError::UnsupportedFormat`];
/// bytes that are not a valid envelope of the type are [`StoreError::Decode`].
pub(crate) fn decode<T: Versioned>(
    tree: &'static str,
    key: &dyn Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    // The common case decodes in one pass; the header is parsed only to tell
    // an old or new version from corruption.
    let shape_error = match serde_json::from_slice::<Envelope<T>>(bytes) {
        Ok(env) if env.v == T::FORMAT => return Ok(env.data),
        Ok(_) => None,
        Err(e) => Some(e),
    };
    let decode_err = |source| StoreError::Decode {
        tree,
        key: key.to_string(),
        source,
    };
    let version = serde_json::from_slice::<Header>(bytes)
        .map_err(decode_err)?
        .v;
    match (version.cmp(&T::FORMAT), shape_error) {
        // Right version, wrong shape: corruption, or a format change that
        // forgot to bump the version.
        (Ordering::Equal, Some(source)) => return Err(decode_err(source)),
        (Ordering::Less, _) => {
            if let Some(migrated) = T::migrate(version, bytes) {
                return migrated.map_err(decode_err);
            }
        }
        _ => {}
    }
    Err(StoreError::UnsupportedFormat {
        tree,
        key: key.to_string(),
        version,
        supported: T::FORMAT,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::records::*;

    fn key() -> crate::spec::ObjectKey {
        "machine/web1".parse().unwrap()
    }

    fn status() -> StatusRecord {
        let mut s = StatusRecord {
            conditions: vec![],
            observed_spec_hash: Some("h1".into()),
            last_applied: Some(Applied {
                generation: 7,
                artifact: "b3:abc".into(),
                revision: Some("deadbeef".into()),
                spec_hash: "h1".into(),
                roles_hash: None,
                applied_ms: 1_700_000_000_000,
            }),
            failures: 2,
            next_attempt_ms: Some(1_700_000_060_000),
            in_progress: Some(InProgress {
                attempt_id: 9,
                started_ms: 5,
                spec_hash: "h2".into(),
                revision: None,
                steps: Vec::new(),
                pending: Vec::new(),
            }),
            last_attempt_id: Some(8),
            held: None,
        };
        s.set_condition(ConditionKind::Ready, true, Reason::Converged, "ok", 3);
        s.set_condition(ConditionKind::Drifted, false, Reason::NoDrift, "", 4);
        s
    }

    fn attempt(result: AttemptResult) -> AttemptRecord {
        AttemptRecord {
            id: 42,
            key: key(),
            started_ms: 1,
            finished_ms: 2,
            revision: Some("deadbeef-dirty".into()),
            spec_hash: "h1".into(),
            generation: Some(7),
            artifact: Some("b3:abc".into()),
            steps: vec![StepRecord {
                name: "build".into(),
                status: StepStatus::Succeeded,
                detail: json!({}),
                duration_ms: 1500,
                output: "built\n".into(),
            }],
            result,
        }
    }

    fn round_trip<T: Versioned + PartialEq + std::fmt::Debug>(value: T) {
        let bytes = encode("t", &"k", &value).unwrap();
        assert_eq!(decode::<T>("t", &"k", &bytes).unwrap(), value);
    }

    #[test]
    fn every_record_type_round_trips() {
        round_trip(SpecRecord {
            spec_hash: "h".into(),
            revision: None,
            spec: json!({"target": {"local": true}}),
            seen_ms: 12,
        });
        round_trip(FactsRecord {
            observed_ms: 3,
            facts: json!({"hostname": "web1", "bootId": "x"}),
        });
        round_trip(status());
        round_trip(StatusRecord::default());
        for result in [
            AttemptResult::Succeeded,
            AttemptResult::NoChange,
            AttemptResult::Interrupted,
            AttemptResult::Failed {
                reason: Reason::BuildFailed,
                message: "exit 1".into(),
            },
            AttemptResult::RolledBack {
                reason: Reason::HealthCheckFailed,
                message: "timeout".into(),
                to_generation: Some(6),
            },
        ] {
            round_trip(attempt(result));
        }
        round_trip(EventRecord {
            seq: 1,
            time_ms: 2,
            key: key().into(),
            severity: Severity::Warning,
            reason: Reason::DriftDetected,
            message: "generation 7 -> 6".into(),
        });
        round_trip(EventRecord {
            seq: 2,
            time_ms: 3,
            key: EventSubject::Source,
            severity: Severity::Error,
            reason: Reason::SourceRefused,
            message: "commit 1a2b3c4d5e6f: not signed".into(),
        });
        round_trip(SourceRecord {
            url: "ssh://git@example.com/fleet.git".into(),
            branch: "main".into(),
            dir: "hosts".into(),
            applied: Some("1a2b3c4d".repeat(5)),
            applied_ms: Some(1),
            tip: Some("5e6f7a8b".repeat(5)),
            fetched_ms: Some(2),
            succeeded_ms: Some(2),
            error: None,
            failures: 0,
            refused: Some(Refusal {
                commit: "5e6f7a8b".repeat(5),
                reason: "not signed".into(),
                since_ms: 2,
            }),
        });
        round_trip(u64::MAX);
    }

    /// Decodes a hand-written v1 literal and re-encodes it to the same JSON:
    /// a renamed, added or removed field fails here, and must come with a
    /// new format version and a migration.
    fn pinned<T: Versioned + PartialEq + std::fmt::Debug>(literal: serde_json::Value, want: T) {
        let bytes = serde_json::to_vec(&literal).unwrap();
        let got: T = decode("t", &"k", &bytes).unwrap();
        assert_eq!(got, want);
        let again: serde_json::Value =
            serde_json::from_slice(&encode("t", &"k", &got).unwrap()).unwrap();
        assert_eq!(again, literal);
    }

    /// Decodes a hand-written literal of an older format into the current
    /// record: what a store written by an older converge reads as.
    fn migrates<T: Versioned + PartialEq + std::fmt::Debug>(literal: serde_json::Value, want: T) {
        let bytes = serde_json::to_vec(&literal).unwrap();
        let got: T = decode("t", &"k", &bytes).unwrap();
        assert_eq!(got, want);
    }

    fn status_literal(v: u32, in_progress: serde_json::Value) -> serde_json::Value {
        json!({"v": v, "data": {
            "conditions": [
                {"kind": "Ready", "status": true, "reason": "Converged", "message": "ok", "last_transition_ms": 3},
                {"kind": "Drifted", "status": false, "reason": "NoDrift", "message": "", "last_transition_ms": 4}
            ],
            "observed_spec_hash": "h1",
            "last_applied": {"generation": 7, "artifact": "b3:abc", "revision": "deadbeef",
                             "spec_hash": "h1", "roles_hash": null, "applied_ms": 1_700_000_000_000u64},
            "failures": 2,
            "next_attempt_ms": 1_700_000_060_000u64,
            "in_progress": in_progress,
            "last_attempt_id": 8
        }})
    }

    fn attempt_literal(
        v: u32,
        step: serde_json::Value,
        result: serde_json::Value,
    ) -> serde_json::Value {
        json!({"v": v, "data": {
            "id": 42, "key": "machine/web1", "started_ms": 1, "finished_ms": 2,
            "revision": "deadbeef-dirty", "spec_hash": "h1", "generation": 7,
            "artifact": "b3:abc",
            "steps": [step],
            "result": result
        }})
    }

    fn results() -> Vec<(serde_json::Value, AttemptResult)> {
        vec![
            (json!({"kind": "Succeeded"}), AttemptResult::Succeeded),
            (json!({"kind": "NoChange"}), AttemptResult::NoChange),
            (json!({"kind": "Interrupted"}), AttemptResult::Interrupted),
            (
                json!({"kind": "Failed", "reason": "BuildFailed", "message": "exit 1"}),
                AttemptResult::Failed {
                    reason: Reason::BuildFailed,
                    message: "exit 1".into(),
                },
            ),
            (
                json!({"kind": "RolledBack", "reason": "HealthCheckFailed",
                       "message": "timeout", "to_generation": 6}),
                AttemptResult::RolledBack {
                    reason: Reason::HealthCheckFailed,
                    message: "timeout".into(),
                    to_generation: Some(6),
                },
            ),
        ]
    }

    #[test]
    fn current_literals_of_every_record_decode_and_reencode_identically() {
        pinned(
            json!({"v": 1, "data": {"spec_hash": "h", "revision": "abc", "spec": {"a": 1}, "seen_ms": 5}}),
            SpecRecord {
                spec_hash: "h".into(),
                revision: Some("abc".into()),
                spec: json!({"a": 1}),
                seen_ms: 5,
            },
        );
        pinned(
            json!({"v": 1, "data": {"observed_ms": 9, "facts": {"hostname": "web1"}}}),
            FactsRecord {
                observed_ms: 9,
                facts: json!({"hostname": "web1"}),
            },
        );
        pinned(
            status_literal(
                2,
                json!({"attempt_id": 9, "started_ms": 5, "spec_hash": "h2", "revision": null, "steps": []}),
            ),
            status(),
        );
        let step = json!({"name": "build", "status": "succeeded", "detail": {},
                          "duration_ms": 1500, "output": "built\n"});
        for (literal, result) in results() {
            pinned(attempt_literal(2, step.clone(), literal), attempt(result));
        }
        pinned(
            json!({"v": 1, "data": {"seq": 1, "time_ms": 2, "key": "vm/builder", "severity": "Error",
                                    "reason": "StartFailed", "message": "qemu exited"}}),
            EventRecord {
                seq: 1,
                time_ms: 2,
                key: EventSubject::Object("vm/builder".parse().unwrap()),
                severity: Severity::Error,
                reason: Reason::StartFailed,
                message: "qemu exited".into(),
            },
        );
        pinned(
            json!({"v": 1, "data": {"seq": 3, "time_ms": 4, "key": "source", "severity": "Error",
                                    "reason": "SourceRefused", "message": "not signed"}}),
            EventRecord {
                seq: 3,
                time_ms: 4,
                key: EventSubject::Source,
                severity: Severity::Error,
                reason: Reason::SourceRefused,
                message: "not signed".into(),
            },
        );
        pinned(json!({"v": 1, "data": 17}), 17u64);
    }

    #[test]
    fn v1_statuses_and_attempts_migrate() {
        migrates(
            status_literal(
                1,
                json!({"attempt_id": 9, "started_ms": 5, "spec_hash": "h2", "revision": null}),
            ),
            status(),
        );
        let v1_step =
            json!({"name": "build", "ok": true, "duration_ms": 1500, "output": "built\n"});
        for (literal, result) in results() {
            migrates(
                attempt_literal(1, v1_step.clone(), literal),
                attempt(result),
            );
        }
        let failed = json!({"name": "activate", "ok": false, "duration_ms": 3, "output": ""});
        let mut want = attempt(AttemptResult::Succeeded);
        want.steps = vec![StepRecord {
            name: "activate".into(),
            status: StepStatus::Failed,
            detail: json!({}),
            duration_ms: 3,
            output: String::new(),
        }];
        migrates(
            attempt_literal(1, failed, json!({"kind": "Succeeded"})),
            want,
        );
    }

    #[test]
    fn newer_or_unknown_version_is_unsupported_format() {
        for v in [0, 2, 99] {
            let bytes =
                serde_json::to_vec(&json!({"v": v, "data": {"observed_ms": 9, "facts": {}}}))
                    .unwrap();
            match decode::<FactsRecord>("facts", &"machine/web1", &bytes) {
                Err(StoreError::UnsupportedFormat {
                    tree: "facts",
                    key,
                    version,
                    supported: 1,
                }) => assert_eq!((key.as_str(), version), ("machine/web1", v)),
                other => panic!("v{v}: expected UnsupportedFormat, got {other:?}"),
            }
        }
        // A newer version whose data no longer fits the old shape is still
        // reported as a version problem, not as corruption.
        let bytes = br#"{"v": 2, "data": {"renamed": true}}"#;
        assert!(matches!(
            decode::<FactsRecord>("facts", &"k", bytes),
            Err(StoreError::UnsupportedFormat { version: 2, .. })
        ));
    }

    #[test]
    fn corrupt_values_are_decode_errors() {
        for bytes in [
            &b"not json"[..],
            br#"{"data": {"observed_ms": 9, "facts": {}}}"#,
            br#"{"v": 1, "data": {"observed_ms": "soon", "facts": {}}}"#,
            br#"{"v": 1, "data": {"observed_ms": 9, "facts": {}, "extra": 1}}"#,
            br#"{"v": 1}"#,
        ] {
            assert!(
                matches!(
                    decode::<FactsRecord>("facts", &"k", bytes),
                    Err(StoreError::Decode { tree: "facts", .. })
                ),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
