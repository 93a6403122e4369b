//! A spec that names the wrong host key (another host's) fails that host
//! with a message about the host key, and nothing is uploaded to it.

use std::time::Duration;

#[test]
fn a_wrong_host_key_fails_the_host_and_uploads_nothing() {
    let fleet = crate::support::ssh::fleet(4);
    fleet.write_all(4, &["v1"], "  activation: {confirmTimeout: 5s}\n");
    fleet.write_machine(
        0,
        &fleet.machine_with_key(0, 1, &["v1"], "  activation: {confirmTimeout: 5s}\n"),
    );

    let run = fleet.reconcile_within(&["--attempts", "1"], Duration::from_secs(60));
    run.assert_code(3);
    let (ready, reason, message) = fleet.ready(0);
    assert!(!ready, "host0 is Ready with a wrong host key");
    assert!(
        message.to_lowercase().contains("host key"),
        "the message names the host key: {reason}: {message}"
    );
    assert!(
        fleet.generation_entries(0).is_empty(),
        "something was uploaded to host0: {:?}",
        fleet.generation_entries(0)
    );
    assert!(fleet.current(0).is_none());
    assert!(fleet.ledger(0).is_empty());
    fleet.assert_ready(1..4);
    fleet.finish();
}
