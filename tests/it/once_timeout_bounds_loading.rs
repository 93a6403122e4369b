//! `reconcile --once --timeout` bounds loading the directory too: a FIFO
//! nobody writes to (hashing the build inputs opens it and waits, as a read
//! from a hung mount would) ends the run at the timeout with exit 4 and a
//! message saying loading did not end, and nothing is applied.

use std::process::Command;
use std::time::Duration;

use super::support::Fleet;
use crate::support::Converge as _;

#[test]
fn a_directory_that_never_finishes_loading_times_out_with_exit_4() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let fifo = fleet.dir().join("templates.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());

    let dir = fleet.dir();
    let state = fleet.state();
    let run = fleet.converge_within(
        &[
            "reconcile",
            "--once",
            "--dir",
            dir.to_str().expect("utf-8"),
            "--state",
            state.to_str().expect("utf-8"),
            "--timeout",
            "2s",
        ],
        Duration::from_secs(60),
    );
    run.assert_code(4);
    assert!(
        run.elapsed < Duration::from_secs(20),
        "ended near its 2 s timeout, not {:?}",
        run.elapsed
    );
    assert!(
        run.stderr.contains("timed out after 2s while loading")
            && run.stderr.contains("nothing was applied"),
        "the error says loading did not end:\n{}",
        run.stderr
    );
    assert!(fleet.ledger("web").is_empty(), "nothing was activated");
    assert_eq!(fleet.builds("web"), 0, "nothing was built");
}
