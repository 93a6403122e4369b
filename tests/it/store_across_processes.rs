//! The store across processes: another process (this test binary run
//! again as a helper) holds its lock, or is killed with SIGKILL while it
//! writes; what it reported finished is never lost, and an attempt it began
//! is found interrupted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use converge::spec::ObjectKey;
use converge::store::records::{AttemptRecord, AttemptResult};
use converge::store::{Store, StoreError};

fn key(s: &str) -> ObjectKey {
    s.parse().expect("an object key")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// Runs one attempt on `key` from begin to finish; returns its id.
fn run_attempt(store: &Store, key: &ObjectKey) -> u64 {
    let id = store.begin_attempt(key, "h", Some("rev")).expect("begin");
    let status = store.status(key).expect("read").expect("a status");
    let record = AttemptRecord {
        id,
        key: key.clone(),
        started_ms: 1,
        finished_ms: 2,
        revision: None,
        spec_hash: "h".into(),
        generation: None,
        artifact: None,
        steps: vec![],
        result: AttemptResult::Succeeded,
    };
    store.finish_attempt(&record, &status).expect("finish");
    id
}

/// Environment variable that turns this test binary into a helper process
/// for the test named in it.
const CHILD_ENV: &str = "CONVERGE_STORE_TEST_CHILD";
/// The store directory of a helper process.
const CHILD_DIR_ENV: &str = "CONVERGE_STORE_TEST_DIR";

/// This test's directory, if this process is the helper for `test`.
fn child_dir(test: &str) -> Option<PathBuf> {
    if std::env::var(CHILD_ENV).ok()? == test {
        Some(std::env::var_os(CHILD_DIR_ENV)?.into())
    } else {
        None
    }
}

/// Runs this test binary again, running only `test` (a function of this
/// module) as the helper process, with its stdout piped.
fn spawn_helper(test: &str, dir: &Path) -> Child {
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest);
    Command::new(std::env::current_exe().expect("this test binary"))
        .args([&format!("{module}::{test}"), "--exact", "--nocapture"])
        .env(CHILD_ENV, test)
        .env(CHILD_DIR_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ok")
}

#[test]
fn open_while_another_process_holds_the_store_is_locked() {
    const TEST: &str = "open_while_another_process_holds_the_store_is_locked";
    if let Some(dir) = child_dir(TEST) {
        let _store = Store::open(&dir).expect("ok");
        println!("holding");
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let tmp = tempdir();
    let mut child = spawn_helper(TEST, tmp.path());
    let mut lines = BufReader::new(child.stdout.take().expect("ok")).lines();
    assert!(
        lines.any(|l| l.expect("ok") == "holding"),
        "helper exited before opening the store"
    );
    let result = Store::open(tmp.path());
    child.kill().expect("ok");
    child.wait().expect("ok");
    assert!(
        matches!(result, Err(StoreError::Locked { .. })),
        "expected Locked, got {result:?}"
    );
    // The lock dies with its process.
    Store::open(tmp.path()).expect("ok");
}

#[test]
fn finished_attempts_survive_sigkill() {
    const TEST: &str = "finished_attempts_survive_sigkill";
    if let Some(dir) = child_dir(TEST) {
        let store = Store::open(&dir).expect("ok");
        for i in 0u64.. {
            // Spread attempts over keys so that trimming keeps them all.
            let k = key(&format!("machine/c{}", i / 50));
            let id = run_attempt(&store, &k);
            println!("finished {k} {id}");
            // Most kills land here, after finish_attempt and before the next
            // begin_attempt flushes: only finish_attempt's own flush keeps the
            // attempt just printed.
            std::thread::sleep(Duration::from_millis(3));
        }
        return;
    }
    let tmp = tempdir();
    let mut child = spawn_helper(TEST, tmp.path());
    let stdout = child.stdout.take().expect("ok");
    let (lines, finished_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Some((k, id)) = line
                .strip_prefix("finished ")
                .and_then(|rest| rest.split_once(' '))
            else {
                continue;
            };
            let _ = lines.send((key(k), id.parse::<u64>().expect("ok")));
        }
    });
    // The kill comes once the helper is finishing attempts (a loaded machine
    // may take a while to start it), 300 ms into that.
    let mut finished = Vec::new();
    while finished.len() < 2 {
        let next = finished_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the helper finishes attempts");
        finished.push(next);
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().expect("ok"); // SIGKILL on Unix
    child.wait().expect("ok");
    reader.join().expect("ok");
    finished.extend(finished_rx.try_iter());

    let store = Store::open(tmp.path()).expect("ok");
    for (k, id) in &finished {
        let record = store.attempt(k, *id).expect("ok");
        assert!(
            record.is_some(),
            "attempt {k}#{id} was reported finished but is lost"
        );
    }
    // At most the one attempt that had begun and not finished is left
    // in progress, and it is newer than every finished one.
    let interrupted = store.interrupted().expect("ok");
    assert!(interrupted.len() <= 1, "{interrupted:?}");
    let newest = finished.iter().map(|(_, id)| *id).max().expect("ok");
    for k in interrupted {
        let in_progress = store
            .status(&k)
            .expect("ok")
            .expect("ok")
            .in_progress
            .expect("ok");
        assert!(in_progress.attempt_id > newest);
    }
    // Ids go on increasing after the crash.
    assert!(
        store
            .begin_attempt(&key("machine/after"), "h", None)
            .expect("ok")
            > newest
    );
}

#[test]
fn begun_attempt_survives_sigkill_as_interrupted() {
    const TEST: &str = "begun_attempt_survives_sigkill_as_interrupted";
    let k = key("machine/web1");
    if let Some(dir) = child_dir(TEST) {
        let store = Store::open(&dir).expect("ok");
        let id = store.begin_attempt(&k, "h", None).expect("ok");
        println!("begun {id}");
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let tmp = tempdir();
    let mut child = spawn_helper(TEST, tmp.path());
    let begun = BufReader::new(child.stdout.take().expect("ok"))
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("begun ")?.parse::<u64>().ok());
    child.kill().expect("ok");
    child.wait().expect("ok");
    let id = begun.expect("the helper exited before beginning an attempt");

    let store = Store::open(tmp.path()).expect("ok");
    assert_eq!(store.interrupted().expect("ok"), vec![k.clone()]);
    let in_progress = store
        .status(&k)
        .expect("ok")
        .expect("ok")
        .in_progress
        .expect("ok");
    assert_eq!(in_progress.attempt_id, id);
}
