//! `converge events --follow`: new events are appended as they happen,
//! asked of a running daemon, and without one read from the store once a
//! `reconcile --once` that held it has finished (the follower never keeps
//! the run from the store).

use std::path::Path;
use std::process::{Child, Stdio};

use serde_json::Value;

use super::support::{BIN, Fleet, WAIT_LIMIT, read_text, wait_for};
use crate::support::Converge as _;

/// A `converge events --follow --output json` in the background; killed on drop.
struct Follower {
    child: Child,
    out: std::path::PathBuf,
}

impl Follower {
    fn start(fleet: &Fleet, name: &str) -> Follower {
        let out = fleet.path(name);
        let state = fleet.state();
        let child = testbed::run::converge_command(
            Path::new(BIN),
            &[
                "events",
                "--follow",
                "--poll",
                "200ms",
                "--output",
                "json",
                "--state",
                state.to_str().expect("utf-8"),
            ],
        )
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("create the output"))
        .stderr(std::fs::File::create(out.with_extension("err")).expect("create the log"))
        .spawn()
        .expect("start converge events --follow");
        Follower { child, out }
    }

    /// The events printed so far, in the order printed.
    fn events(&self) -> Vec<Value> {
        read_text(&self.out)
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }

    fn wait_reason(&mut self, reason: &str) -> Vec<Value> {
        wait_for(
            &format!("a {reason} event to be followed"),
            WAIT_LIMIT,
            || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "the follower exited ({status}): {}",
                        read_text(&self.out.with_extension("err"))
                    );
                }
                let events = self.events();
                events
                    .iter()
                    .any(|e| e["reason"] == reason)
                    .then_some(events)
            },
        )
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn follow_appends_new_events_from_the_daemon_and_from_the_store() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.reconcile_once(&[]).assert_code(0);

    // Without a daemon: a --once run's rollback appears after it ends.
    let mut follower = Follower::start(&fleet, "follow-store.jsonl");
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v2", "activate-exit=1"], ""),
    );
    fleet.reconcile_once(&["--attempts", "1"]).assert_code(3);
    let events = follower.wait_reason("RolledBack");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "appended in order: {seqs:?}"
    );
    drop(follower);

    // With a daemon: a build failure appears while it runs.
    let mut daemon = fleet.start_daemon(&["--retry-delay", "30s"]);
    fleet.wait_api(&mut daemon);
    let mut follower = Follower::start(&fleet, "follow-daemon.jsonl");
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v3", "build-exit=1"], ""),
    );
    let events = follower.wait_reason("BuildFailed");
    let newest = events.last().expect("an event");
    assert_eq!(newest["key"], "machine/web", "{newest}");
    assert_eq!(newest["severity"], "Error", "{newest}");
    daemon.assert_running();
}
