//! The daemon killed with SIGKILL at random moments, twenty times over, loses
//! nothing and breaks nothing: the store opens, every machine converges, no
//! `current` points at an incomplete generation, every attempt that began is
//! recorded (finished or interrupted) under its own id.

use std::collections::BTreeSet;
use std::time::Duration;

use super::support::{Fleet, Random, is_ready, wait_for};
use crate::support::Converge as _;

const MACHINES: usize = 20;
const KILLS: usize = 20;

#[test]
fn sigkill_at_random_moments_never_loses_an_attempt_or_leaves_current_incomplete() {
    let fleet = Fleet::new();
    let names: Vec<String> = (0..MACHINES).map(|i| format!("m{i:02}")).collect();
    for name in &names {
        fleet.write(
            &format!("{name}.yaml"),
            &fleet.machine(name, &["crash"], &["v1", "random-sleep"], ""),
        );
    }
    let mut random = Random::from_env_or_clock("crash_safety");
    let daemon_args = ["--debounce", "100ms", "--retry-delay", "200ms"];

    for round in 0..KILLS {
        let mut daemon = fleet.start_daemon(&daemon_args);
        // The fault: a kill at a random moment of the daemon's life.
        std::thread::sleep(Duration::from_millis(random.between(50, 700)));
        if let Some(status) = daemon.try_exit() {
            panic!(
                "round {round}: the daemon exited on its own ({status}):\n{}",
                daemon.log()
            );
        }
        daemon.kill();
    }

    let mut daemon = fleet.start_daemon(&daemon_args);
    fleet.wait_api(&mut daemon);
    wait_for(
        "every machine to be Ready",
        Duration::from_secs(120),
        || {
            daemon.assert_running();
            let statuses = fleet.statuses();
            let ready = statuses
                .iter()
                .filter(|s| s["key"].as_str().is_some_and(|k| k.starts_with("machine/")))
                .filter(|s| is_ready(s))
                .count();
            (ready == MACHINES).then_some(())
        },
    );
    daemon.signal("TERM");
    let exit = daemon
        .wait_exit(Duration::from_secs(60))
        .expect("the daemon stops after SIGTERM");
    assert_eq!(exit.code(), Some(0), "clean stop:\n{}", daemon.log());
    drop(daemon);

    // The store opens without the daemon, and says every machine is Ready.
    let statuses = fleet.statuses();
    assert_eq!(statuses.len(), MACHINES, "{statuses:?}");
    let mut ids = BTreeSet::new();
    let mut interrupted = 0;
    for status in &statuses {
        let key = status["key"].as_str().expect("a key");
        assert!(is_ready(status), "{key} is Ready: {status}");
        assert_eq!(
            status["status"]["in_progress"],
            serde_json::Value::Null,
            "{key}: every attempt begun was finished or recorded as interrupted: {status}"
        );
        let history = fleet.history(key);
        let last = status["status"]["last_attempt_id"].as_u64();
        assert!(
            history.iter().any(|a| a["id"].as_u64() == last),
            "{key}: the last attempt begun ({last:?}) is in the history"
        );
        for attempt in &history {
            let id = attempt["id"].as_u64().expect("an id");
            assert!(
                ids.insert(id),
                "{key}: attempt id {id} appears twice in the store"
            );
            interrupted += usize::from(super::support::result_kind(attempt) == "Interrupted");
            assert!(
                attempt["finished_ms"].as_u64() >= attempt["started_ms"].as_u64(),
                "{key}: {attempt}"
            );
        }
    }
    eprintln!(
        "{} attempts recorded, {interrupted} of them interrupted by a SIGKILL",
        ids.len()
    );
    for name in &names {
        fleet.assert_current_complete(name);
    }

    // Nothing is left running: no daemon, no build, no activation.
    let left = wait_for(
        "every process of the fleet to end",
        Duration::from_secs(10),
        || {
            let left = fleet.processes();
            left.is_empty().then_some(left)
        },
    );
    assert!(left.is_empty());
}
