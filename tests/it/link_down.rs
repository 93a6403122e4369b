//! A host whose link is down before the run fails as Unreachable; the others
//! converge; once the link is back, a rerun converges everything.

use std::time::Duration;

use crate::support::Converge as _;
use crate::support::ssh::result_kind;

#[test]
fn a_host_with_its_link_down_is_unreachable_and_converges_once_it_is_back() {
    let fleet = crate::support::ssh::fleet(4);
    fleet.write_all(4, &["v1"], "  activation: {confirmTimeout: 5s}\n");
    fleet.testbed.host(0).link_down();

    let run = fleet.reconcile_within(&["--attempts", "1"], Duration::from_secs(60));
    run.assert_code(3);
    let (ready, reason, message) = fleet.ready(0);
    assert!(!ready, "host0 is Ready with its link down");
    assert_eq!(reason, "Unreachable", "{message}");
    assert!(fleet.generation_entries(0).is_empty());
    let history = fleet.history("machine/host0");
    assert!(
        history.iter().all(|a| result_kind(a) != "Succeeded"),
        "{history:?}"
    );
    fleet.assert_ready(1..4);

    fleet.testbed.host(0).link_up();
    fleet
        .reconcile_within(&["--attempts", "1"], Duration::from_secs(60))
        .assert_code(0);
    fleet.assert_ready(0..4);
    assert_eq!(fleet.ledger(0).len(), 1);
    for i in 1..4 {
        assert_eq!(fleet.ledger(i).len(), 1, "host{i} activated again");
    }
    fleet.finish();
}
