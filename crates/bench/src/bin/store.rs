//! What the store's hot paths cost on this disk: 2,000 `put_status` (1,000
//! keys, each written twice; plain writes, flushed later by sled), and
//! `finish_attempt` (which flushes before it returns) 20 times on one key.
//! Works in a temporary directory; no prerequisites.
//!
//! Run in release: `cargo run --release -p converge-bench --bin bench-store`.
//! Prints numbers; asserts nothing about time.

use std::time::Instant;

use converge::spec::ObjectKey;
use converge::store::{AttemptRecord, AttemptResult, ConditionKind, Reason, StatusRecord, Store};

const KEYS: usize = 1000;
const FINISHES: usize = 20;

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = Store::open(tmp.path())?;
    let mut status = StatusRecord::default();
    status.set_condition(
        ConditionKind::Ready,
        true,
        Reason::Converged,
        "applied generation 7",
        1,
    );
    status.observed_spec_hash = Some("b3:0123456789abcdef0123456789abcdef".into());
    let keys = (0..KEYS)
        .map(|i| format!("machine/m{i}").parse())
        .collect::<Result<Vec<ObjectKey>, _>>()?;

    let started = Instant::now();
    for key in keys.iter().chain(&keys) {
        store.put_status(key, &status)?;
    }
    let puts = started.elapsed();

    let key = &keys[0];
    let mut finishes = Vec::with_capacity(FINISHES);
    for _ in 0..FINISHES {
        let id = store.begin_attempt(key, "h", None)?;
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
            result: AttemptResult::NoChange,
        };
        let started = Instant::now();
        store.finish_attempt(&record, &status)?;
        finishes.push(started.elapsed());
    }
    finishes.sort();
    println!(
        "{} put_status: {puts:?}; finish_attempt median {:?}, max {:?} (dir {})",
        2 * KEYS,
        finishes[finishes.len() / 2],
        finishes[finishes.len() - 1],
        tmp.path().display()
    );
    Ok(())
}
