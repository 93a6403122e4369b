//! `reconcile --once --timeout` that cuts an attempt: the run exits 4, the
//! cut object is not ready in the report even though it was Ready before
//! (its attempt is recorded as Interrupted and its status says Ready=False),
//! and an object that ended in time is ready.

use super::support::{Fleet, ready_of, result_kind};
use crate::support::Converge as _;

#[test]
fn an_attempt_cut_by_the_timeout_is_not_ready_and_the_run_exits_4() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.write("db.yaml", &fleet.machine("db", &[], &["v1"], ""));
    fleet.reconcile_once(&[]).assert_code(0);

    // web's next activation outlasts the run.
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v2", "sleep=60"], ""),
    );
    let run = fleet.reconcile_once(&["--timeout", "5s"]);
    run.assert_code(4);
    assert!(
        fleet
            .ledger_with("web", "start")
            .iter()
            .any(|l| l.ends_with(" v2")),
        "v2's activation started: {:?}",
        fleet.ledger("web")
    );
    let line = |key: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no row for {key}:\n{}", run.stdout))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let web = line("machine/web");
    assert_eq!(
        (web[1].as_str(), web[2].as_str()),
        ("False", "Interrupted"),
        "the cut object is not ready:\n{}",
        run.stdout
    );
    let db = line("machine/db");
    assert_eq!(db[1], "True", "db ended in time:\n{}", run.stdout);
    let summary = run.stdout.lines().last().unwrap_or_default();
    assert!(
        summary.ends_with("1 ready, 1 not ready; timed out"),
        "{}",
        run.stdout
    );

    // What the store says afterwards agrees.
    let status = fleet.status("machine/web");
    let (ready, reason) = ready_of(&status);
    assert!(!ready, "{status}");
    assert_eq!(reason, "Interrupted", "{status}");
    let history = fleet.history("machine/web");
    assert_eq!(result_kind(&history[0]), "Interrupted", "{}", history[0]);
}
