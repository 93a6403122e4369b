//! A rolled-back artifact is held by the daemon too: starting it, or asking
//! for the object (`converge reconcile KEY`), does not activate it again.
//! `converge reconcile KEY --retry` releases it: the daemon tries it again,
//! and once the fault is gone it converges.

use std::time::Duration;

use super::support::{Fleet, WAIT_LIMIT, ready_of, wait_for};
use crate::support::Converge as _;

#[test]
fn a_held_artifact_waits_for_reconcile_retry_through_the_daemon() {
    let fleet = Fleet::new();
    let healthy = fleet.path("healthy");
    let check = format!(
        "  activation:\n    healthChecks:\n      - exec: [\"test\", \"-f\", {:?}]\n        timeout: 10s\n",
        healthy.to_str().expect("utf-8")
    );
    std::fs::write(&healthy, "ok\n").expect("healthy at first");
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], &check));
    fleet.reconcile_once(&[]).assert_code(0);
    std::fs::remove_file(&healthy).expect("the fault");
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], &check));
    fleet.reconcile_once(&["--attempts", "1"]).assert_code(3);
    let (_, reason) = ready_of(&fleet.status("machine/web"));
    assert_eq!(reason, "RolledBack");
    let v2_starts = || {
        fleet
            .ledger_with("web", "start")
            .iter()
            .filter(|l| l.ends_with(" v2"))
            .count()
    };
    assert_eq!(v2_starts(), 1);

    let mut daemon = fleet.start_daemon(&["--debounce", "100ms"]);
    fleet.wait_api(&mut daemon);
    let state = fleet.state();
    let state = state.to_str().expect("utf-8");
    let held_lines = |daemon: &super::support::Daemon| {
        daemon
            .log_lines()
            .iter()
            .filter(|l| l.to_string().contains("is held until its inputs change"))
            .count()
    };
    // The daemon's first pass finds it held.
    wait_for("the daemon to find machine/web held", WAIT_LIMIT, || {
        daemon.assert_running();
        (held_lines(&daemon) >= 1).then_some(())
    });

    // Asked for without --retry: still held, not activated.
    let before = held_lines(&daemon);
    fleet
        .converge(&["reconcile", "machine/web", "--state", state])
        .assert_code(0);
    wait_for(
        "the requested reconcile to find it held",
        WAIT_LIMIT,
        || {
            daemon.assert_running();
            (held_lines(&daemon) > before).then_some(())
        },
    );
    assert_eq!(v2_starts(), 1, "a held artifact is not activated again");

    // The fault is lifted; --retry releases it and the daemon converges it.
    std::fs::write(&healthy, "ok\n").expect("lift the fault");
    let retry = fleet.converge(&["reconcile", "machine/web", "--retry", "--state", state]);
    retry.assert_code(0);
    assert!(retry.stdout.contains("released"), "{}", retry.stdout);
    fleet.wait_ready("machine/web", Duration::from_secs(60));
    assert_eq!(v2_starts(), 2, "tried exactly once more");
    let status = fleet.status("machine/web");
    assert_eq!(
        status["status"]["held"],
        serde_json::Value::Null,
        "{status}"
    );
    let current = fleet.assert_current_complete("web");
    assert_eq!(status["current"], current.as_str(), "{status}");
}
