//! Tests of the store against real sled databases in temporary directories.
//! The tests across processes (a held lock, SIGKILL mid-write) are in
//! tests/it/store_across_processes.rs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

fn key(s: &str) -> ObjectKey {
    s.parse().unwrap()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn attempt(key: &ObjectKey, id: u64, result: AttemptResult) -> AttemptRecord {
    AttemptRecord {
        id,
        key: key.clone(),
        started_ms: 1,
        finished_ms: 2,
        revision: None,
        spec_hash: "h".into(),
        generation: None,
        artifact: None,
        steps: vec![],
        result,
    }
}

/// Runs one attempt on `key` from begin to finish; returns its id.
fn run_attempt(store: &Store, key: &ObjectKey) -> u64 {
    let id = store.begin_attempt(key, "h", Some("rev")).unwrap();
    let status = store.status(key).unwrap().unwrap();
    store
        .finish_attempt(&attempt(key, id, AttemptResult::Succeeded), &status)
        .unwrap();
    id
}

/// Every file and directory under `dir` (itself included) with its mode.
fn modes(dir: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut out = vec![];
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        out.push((
            d.clone(),
            true,
            fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
        ));
        for entry in fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                out.push((entry.path(), false, meta.permissions().mode() & 0o7777));
            }
        }
    }
    out
}

fn assert_owner_only(dir: &Path) {
    let modes = modes(dir);
    assert!(
        modes.iter().any(|(_, is_dir, _)| !is_dir),
        "no files in {modes:?}"
    );
    for (path, is_dir, mode) in modes {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", path.display());
    }
}

#[test]
fn store_is_cheap_to_clone_and_shareable_between_threads() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<Store>();
    assert_eq!(size_of::<Store>(), size_of::<usize>());
}

#[test]
fn open_makes_directory_0700_and_every_file_0600_also_after_flush() {
    let tmp = tempdir();
    let dir = tmp.path().join("state");
    // An existing, looser directory with a world-readable file in it is
    // tightened, not trusted.
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("stray"), "x").unwrap();
    fs::set_permissions(dir.join("stray"), fs::Permissions::from_mode(0o644)).unwrap();

    let store = Store::open(&dir).unwrap();
    assert_owner_only(&dir);

    let k = key("machine/web1");
    for i in 0..200 {
        let facts = FactsRecord {
            observed_ms: i,
            facts: json!({"blob": "x".repeat(1000)}),
        };
        store.put_facts(&k, &facts).unwrap();
    }
    store.flush().unwrap();
    assert_owner_only(&dir);
    run_attempt(&store, &k);
    assert_owner_only(&dir);
    drop(store);

    let store = Store::open(&dir).unwrap();
    assert_owner_only(&dir);
    drop(store);
}

#[test]
fn open_creates_missing_parent_directories() {
    let tmp = tempdir();
    let dir = tmp.path().join("a/b/state");
    Store::open(&dir).unwrap();
    assert_owner_only(&dir);
}

#[test]
fn second_open_in_the_same_process_is_locked() {
    // sled takes an flock on its `db` file; flock locks belong to an open
    // file description, so a second open in the same process conflicts too.
    let tmp = tempdir();
    let first = Store::open(tmp.path()).unwrap();
    match Store::open(tmp.path()) {
        Err(e @ StoreError::Locked { .. }) => {
            let text = e.to_string();
            assert!(text.contains("daemon"), "{text}");
            assert!(text.contains(&tmp.path().display().to_string()), "{text}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(first);
    // Dropping the last handle releases the lock.
    Store::open(tmp.path()).unwrap();
}

/// A store with a few attempts recorded, closed, and `name` in it then
/// overwritten with as many bytes of garbage.
fn store_with_garbage_in(name: &str) -> tempfile::TempDir {
    let tmp = tempdir();
    {
        let store = Store::open(tmp.path()).unwrap();
        for i in 0..20 {
            run_attempt(&store, &key(&format!("machine/m{i}")));
        }
        store.flush().unwrap();
    }
    let file = tmp.path().join(name);
    let len = fs::metadata(&file).unwrap().len().max(64);
    let garbage: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8 ^ 0x5a).collect();
    fs::write(&file, garbage).unwrap();
    tmp
}

fn assert_damaged(tmp: &tempfile::TempDir) {
    match Store::open(tmp.path()) {
        Err(e @ StoreError::Damaged { .. }) => {
            let text = e.to_string();
            let path = tmp.path().display().to_string();
            assert!(
                text.contains(&format!("mv {path} {path}.damaged")),
                "{text}"
            );
            assert!(text.contains("history is lost"), "{text}");
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
}

#[test]
fn a_store_whose_config_is_garbage_is_damaged() {
    // sled reports this one itself (as `Unsupported` or `Corruption`).
    assert_damaged(&store_with_garbage_in("conf"));
}

#[test]
fn a_store_whose_log_is_garbage_is_damaged_not_silently_empty() {
    // sled opens this one without an error and with no records at all.
    let tmp = store_with_garbage_in("db");
    assert_damaged(&tmp);
    // Refusing wrote nothing: it is still refused.
    assert_damaged(&tmp);
}

#[test]
fn a_new_store_is_not_taken_for_a_damaged_one_when_opened_again() {
    let tmp = tempdir();
    drop(Store::open(tmp.path()).unwrap());
    assert!(tmp.path().join(CREATED_MARK).exists());
    // No write, no explicit flush: the layout version is on disk already.
    Store::open(tmp.path()).unwrap();
}

#[test]
fn a_store_cut_off_while_it_was_created_opens_as_a_new_one() {
    // sled's files exist, the layout version and the mark never got written.
    let tmp = tempdir();
    drop(sled::open(tmp.path()).unwrap());
    let store = Store::open(tmp.path()).unwrap();
    assert!(store.statuses().unwrap().is_empty());
    assert!(tmp.path().join(CREATED_MARK).exists());
}

#[test]
fn records_round_trip_through_the_store() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let k = key("vm/builder");
    assert_eq!(store.spec(&k).unwrap(), None);
    assert_eq!(store.facts(&k).unwrap(), None);
    assert_eq!(store.status(&k).unwrap(), None);

    let spec = SpecRecord {
        spec_hash: "h".into(),
        revision: Some("abc".into()),
        spec: json!({"cpus": 2}),
        seen_ms: 1,
    };
    let facts = FactsRecord {
        observed_ms: 2,
        facts: json!({"running": true}),
    };
    let mut status = StatusRecord::default();
    status.set_condition(ConditionKind::Ready, true, Reason::Running, "ok", 3);
    store.put_spec(&k, &spec).unwrap();
    store.put_facts(&k, &facts).unwrap();
    store.put_status(&k, &status).unwrap();
    drop(store);

    // Unflushed writes reach the disk when the store is closed.
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.spec(&k).unwrap(), Some(spec));
    assert_eq!(store.facts(&k).unwrap(), Some(facts));
    assert_eq!(store.status(&k).unwrap(), Some(status.clone()));
    assert_eq!(store.statuses().unwrap(), vec![(k, status)]);
}

#[test]
fn history_lists_newest_first_and_only_the_keys_own_attempts() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let (a, ab, b) = (key("machine/a"), key("machine/ab"), key("machine/b"));
    let mut ids = std::collections::HashMap::<ObjectKey, Vec<u64>>::new();
    for i in 0..30 {
        let k = [&a, &ab, &b][i % 3];
        ids.entry(k.clone())
            .or_default()
            .push(run_attempt(&store, k));
    }
    for k in [&a, &ab, &b] {
        let history = store.history(k, usize::MAX).unwrap();
        assert!(history.iter().all(|r| &r.key == k), "{k}: {history:?}");
        let got: Vec<u64> = history.iter().map(|r| r.id).collect();
        let mut want = ids[k].clone();
        want.reverse();
        assert_eq!(got, want, "{k}");
        assert_eq!(store.history(k, 3).unwrap().len(), 3);
    }
    let first_of_a = ids[&a][0];
    assert_eq!(
        store.attempt(&a, first_of_a).unwrap().unwrap().id,
        first_of_a
    );
    assert_eq!(store.attempt(&ab, first_of_a).unwrap(), None);
    assert_eq!(store.history(&key("machine/none"), 10).unwrap(), vec![]);
}

#[test]
fn history_keeps_the_newest_attempts_per_object() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let (a, b) = (key("machine/a"), key("machine/b"));
    let b_id = run_attempt(&store, &b);
    let ids: Vec<u64> = (0..HISTORY_PER_OBJECT + 5)
        .map(|_| run_attempt(&store, &a))
        .collect();
    let history = store.history(&a, usize::MAX).unwrap();
    assert_eq!(history.len(), HISTORY_PER_OBJECT);
    assert_eq!(history[0].id, ids[ids.len() - 1]);
    assert_eq!(history[HISTORY_PER_OBJECT - 1].id, ids[5]);
    assert_eq!(store.attempt(&a, ids[4]).unwrap(), None);
    // Trimming one object leaves the others alone.
    assert_eq!(store.history(&b, 10).unwrap()[0].id, b_id);
}

#[test]
fn events_keep_the_newest_ten_thousand_in_sequence_order() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let (a, b) = (key("machine/a"), key("vm/b"));
    let extra = 25;
    let total = EVENTS_KEPT + extra;
    for i in 1..=total {
        let (k, sev) = if i % 2 == 0 {
            (&a, Severity::Info)
        } else {
            (&b, Severity::Error)
        };
        assert_eq!(
            store
                .append_event(k, sev, Reason::DriftDetected, &format!("event {i}"))
                .unwrap(),
            i
        );
    }
    let all = store.events(usize::MAX).unwrap();
    assert_eq!(all.len() as u64, EVENTS_KEPT);
    assert_eq!(all[0].seq, total);
    assert_eq!(all[all.len() - 1].seq, extra + 1);
    assert!(all.windows(2).all(|w| w[0].seq == w[1].seq + 1));

    let newest_b = store.events_for(&b, 3).unwrap();
    assert_eq!(
        newest_b.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![total, total - 2, total - 4]
    );
    assert!(
        newest_b
            .iter()
            .all(|e| e.key == b && e.severity == Severity::Error)
    );
    assert_eq!(
        store.events(2).unwrap()[1].message,
        format!("event {}", total - 1)
    );
    let after = store.events_after(total - 3, 100, None).unwrap();
    assert_eq!(
        after.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![total, total - 1, total - 2],
        "only what a follower that saw {} has not seen, newest first",
        total - 3
    );
    assert_eq!(store.events_after(total, 100, None).unwrap(), vec![]);
    assert_eq!(store.events_after(0, 2, None).unwrap().len(), 2);
    assert_eq!(
        store
            .events_after(total - 3, 100, Some(&EventSubject::from(&b)))
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![total, total - 2]
    );
    drop(store);

    // Sequence numbers go on after a restart.
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(
        store
            .append_event(&a, Severity::Warning, Reason::OperatorVerb, "m")
            .unwrap(),
        total + 1
    );
}

#[test]
fn attempt_begun_and_never_finished_is_interrupted_after_reopen() {
    let tmp = tempdir();
    let (a, b) = (key("machine/a"), key("machine/b"));
    let store = Store::open(tmp.path()).unwrap();
    run_attempt(&store, &b);
    let mut status = StatusRecord::default();
    status.set_condition(ConditionKind::Ready, true, Reason::Converged, "ok", 1);
    store.put_status(&a, &status).unwrap();
    let id = store.begin_attempt(&a, "h2", Some("rev2")).unwrap();
    // begin_attempt keeps what the status said and adds the attempt.
    let begun = store.status(&a).unwrap().unwrap();
    assert!(begun.is_ready());
    assert_eq!(begun.last_attempt_id, Some(id));
    drop(store); // the crash: no finish_attempt

    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.interrupted().unwrap(), vec![a.clone()]);
    let status = store.status(&a).unwrap().unwrap();
    let in_progress = status.in_progress.clone().unwrap();
    assert_eq!(
        (
            in_progress.attempt_id,
            in_progress.spec_hash.as_str(),
            in_progress.revision.as_deref()
        ),
        (id, "h2", Some("rev2"))
    );
    let record = in_progress.interrupted(a.clone(), now_ms());
    store.finish_attempt(&record, &status).unwrap();
    assert_eq!(store.interrupted().unwrap(), vec![]);
    assert_eq!(store.status(&a).unwrap().unwrap().in_progress, None);
    assert_eq!(
        store.history(&a, 1).unwrap()[0].result,
        AttemptResult::Interrupted
    );
}

#[test]
fn attempt_ids_increase_across_reopen() {
    let tmp = tempdir();
    let k = key("service/vpn");
    let mut last = 0;
    for _ in 0..3 {
        let store = Store::open(tmp.path()).unwrap();
        for _ in 0..3 {
            let id = run_attempt(&store, &k);
            assert!(id > last, "{id} after {last}");
            last = id;
        }
    }
}

#[test]
fn forget_removes_everything_but_events() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let (a, ab) = (key("machine/a"), key("machine/ab"));
    for k in [&a, &ab] {
        store
            .put_spec(
                k,
                &SpecRecord {
                    spec_hash: "h".into(),
                    revision: None,
                    spec: json!({}),
                    seen_ms: 0,
                },
            )
            .unwrap();
        store
            .put_facts(
                k,
                &FactsRecord {
                    observed_ms: 0,
                    facts: json!({}),
                },
            )
            .unwrap();
        run_attempt(&store, k);
        store
            .append_event(k, Severity::Info, Reason::OperatorVerb, "ok")
            .unwrap();
    }
    assert_eq!(store.keys().unwrap(), vec![a.clone(), ab.clone()]);

    store.forget(&a).unwrap();
    assert_eq!(store.spec(&a).unwrap(), None);
    assert_eq!(store.facts(&a).unwrap(), None);
    assert_eq!(store.status(&a).unwrap(), None);
    assert_eq!(store.history(&a, 10).unwrap(), vec![]);
    assert_eq!(store.events_for(&a, 10).unwrap().len(), 1);
    assert_eq!(store.keys().unwrap(), vec![ab.clone()]);
    // The other object, whose key starts with the forgotten one, is intact.
    assert!(store.spec(&ab).unwrap().is_some());
    assert!(store.facts(&ab).unwrap().is_some());
    assert_eq!(store.history(&ab, 10).unwrap().len(), 1);
}

#[test]
fn keys_lists_objects_with_a_spec_or_a_status() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let (spec_only, status_only, facts_only) = (key("vm/s"), key("machine/t"), key("machine/f"));
    store
        .put_spec(
            &spec_only,
            &SpecRecord {
                spec_hash: "h".into(),
                revision: None,
                spec: json!(null),
                seen_ms: 0,
            },
        )
        .unwrap();
    store
        .put_status(&status_only, &StatusRecord::default())
        .unwrap();
    store
        .put_facts(
            &facts_only,
            &FactsRecord {
                observed_ms: 0,
                facts: json!(1),
            },
        )
        .unwrap();
    assert_eq!(store.keys().unwrap(), vec![status_only, spec_only]);
}

#[test]
fn corrupt_keys_and_values_are_skipped_in_scans_and_reported_on_reads() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let (good, bad) = (key("machine/good"), key("machine/bad"));
    store.put_status(&good, &StatusRecord::default()).unwrap();
    let raw = &store.inner.status.tree;
    raw.insert(b"machine/Not_A_Name", b"{}".as_slice()).unwrap();
    raw.insert(layout::object(&bad), b"{\"v\":1,\"data\":[]}".as_slice())
        .unwrap();
    store
        .inner
        .events
        .tree
        .insert(b"short", b"x".as_slice())
        .unwrap();
    store
        .inner
        .history
        .tree
        .insert(b"machine/good\0bad", b"x".as_slice())
        .unwrap();

    assert_eq!(
        store.statuses().unwrap(),
        vec![(good.clone(), StatusRecord::default())]
    );
    assert_eq!(store.interrupted().unwrap(), vec![]);
    assert_eq!(store.keys().unwrap(), vec![bad.clone(), good.clone()]);
    assert!(matches!(
        store.status(&bad),
        Err(StoreError::Decode { tree: "status", .. })
    ));
    assert_eq!(store.history(&good, 10).unwrap(), vec![]);
    assert_eq!(store.events(10).unwrap(), vec![]);
    // A corrupt key sorting after every valid event does not reset the
    // sequence.
    store
        .append_event(&good, Severity::Info, Reason::OperatorVerb, "m")
        .unwrap();
    let seq = store
        .append_event(&good, Severity::Info, Reason::OperatorVerb, "m")
        .unwrap();
    assert_eq!(seq, 2);
    assert_eq!(store.events(10).unwrap().len(), 2);
}

#[test]
fn a_newer_format_fails_reads_and_scans_with_unsupported_format() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    let k = key("machine/web1");
    store
        .inner
        .status
        .tree
        .insert(layout::object(&k), br#"{"v":3,"data":{}}"#.as_slice())
        .unwrap();
    for result in [store.status(&k).map(|_| ()), store.statuses().map(|_| ())] {
        match result {
            Err(
                e @ StoreError::UnsupportedFormat {
                    version: 3,
                    supported: 2,
                    ..
                },
            ) => {
                assert!(e.to_string().contains("machine/web1"), "{e}");
            }
            other => panic!("expected UnsupportedFormat, got {other:?}"),
        }
    }
}

#[test]
fn a_store_with_a_newer_key_layout_is_refused() {
    let tmp = tempdir();
    let store = Store::open(tmp.path()).unwrap();
    store
        .inner
        .meta
        .tree
        .insert(layout::LAYOUT, br#"{"v":1,"data":2}"#.as_slice())
        .unwrap();
    drop(store);
    assert!(matches!(
        Store::open(tmp.path()),
        Err(StoreError::UnsupportedFormat {
            tree: "meta",
            version: 2,
            ..
        })
    ));
}

#[test]
fn a_suspension_is_kept_across_opens_until_resumed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ObjectKey::machine(crate::spec::Name::new("web").expect("name"));
    {
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.suspension(&key).expect("read"), None);
        assert!(store.suspend(&key, "suspend").expect("suspend"));
        assert!(!store.suspend(&key, "vm stop").expect("again"), "kept");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let s = store.suspension(&key).expect("read").expect("suspended");
    assert_eq!(s.by, "suspend", "the first suspension is kept");
    assert!(store.resume(&key).expect("resume"));
    assert!(!store.resume(&key).expect("again"));
    assert_eq!(store.suspension(&key).expect("read"), None);
}

#[test]
fn forgetting_an_object_ends_its_suspension() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    let key = ObjectKey::machine(crate::spec::Name::new("web").expect("name"));
    store.suspend(&key, "suspend").expect("suspend");
    store.forget(&key).expect("forget");
    assert_eq!(store.suspension(&key).expect("read"), None);
}
