//! A new version whose activation fails on one host only: that host is
//! rolled back to its previous generation, the others move on.

use std::time::Duration;

use crate::support::Converge as _;
use crate::support::ssh::result_kind;

const EXTRA: &str = "  activation: {confirmTimeout: 5s}\n";

#[test]
fn an_activation_failure_on_one_host_rolls_it_back_and_exits_3() {
    let fleet = crate::support::ssh::fleet(4);
    fleet.write_all(4, &["v1"], EXTRA);
    fleet.reconcile_once(&[]).assert_code(0);
    let v1: Vec<String> = (0..4).map(|i| fleet.assert_current_complete(i)).collect();

    fleet.write_all(4, &["v2", "fail-on=host0"], EXTRA);
    let run = fleet.reconcile_within(&["--attempts", "1"], Duration::from_secs(60));
    run.assert_code(3);

    assert_eq!(
        fleet.assert_current_complete(0),
        v1[0],
        "host0 is back at v1's generation"
    );
    let ledger = fleet.ledger(0);
    assert!(
        ledger.last().is_some_and(|l| l.ends_with(" v1")),
        "v1 is the last successful activation on host0: {ledger:?}"
    );
    assert!(
        fleet.starts(0).iter().any(|l| l.ends_with(" v2")),
        "v2's activate ran on host0"
    );
    let history = fleet.history("machine/host0");
    assert_eq!(result_kind(&history[0]), "RolledBack", "{}", history[0]);
    let (ready, reason, message) = fleet.ready(0);
    assert!(!ready);
    assert_eq!(reason, "RolledBack", "{message}");

    fleet.assert_ready(1..4);
    for (i, previous) in v1.iter().enumerate().skip(1) {
        assert_ne!(
            &fleet.assert_current_complete(i),
            previous,
            "host{i} moved to v2"
        );
        assert!(fleet.ledger(i).last().is_some_and(|l| l.ends_with(" v2")));
    }
    fleet.finish();
}
