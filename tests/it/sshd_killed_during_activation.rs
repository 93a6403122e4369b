//! The listening sshd of a host is killed while its activation runs: the
//! established master waits for the activation, but no new connection can
//! confirm it, so converge cannot either, and the host's watchdog rolls it
//! back. The run ends in bounded
//! time with a clean failure of that host only (exit 3); after sshd is
//! back, a rerun converges.

use std::time::Duration;

use crate::support::ssh::wait_for;

#[test]
fn a_listener_killed_during_activation_fails_cleanly_and_a_rerun_converges() {
    let fleet = crate::support::ssh::fleet(4);
    fleet.write_all(
        4,
        &["v1", "sleep-on=host0:3"],
        "  activation: {confirmTimeout: 5s}\n",
    );
    let testbed = &fleet.testbed;
    let starts = fleet.host_state(0).join("starts");
    let run = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            wait_for(
                "host0's activation to start",
                Duration::from_secs(60),
                || starts.exists().then_some(()),
            );
            testbed.host(0).kill_sshd();
        });
        let run = fleet.reconcile_within(
            &["--attempts", "2", "--retry-delay", "300ms"],
            Duration::from_secs(60),
        );
        killer.join().expect("the killer thread");
        run
    });
    eprintln!(
        "sshd killed during activation: exit {:?} after {:.2?}",
        run.code, run.elapsed
    );
    run.assert_code(3);
    let (ready, reason, message) = fleet.ready(0);
    assert!(
        !ready,
        "host0 is Ready though nothing could confirm it: {reason}: {message}"
    );

    fleet.assert_ready(1..4);

    testbed.host(0).restart_sshd();
    fleet
        .reconcile_within(&["--attempts", "2"], Duration::from_secs(60))
        .assert_code(0);
    fleet.assert_ready(0..4);
    let current = fleet.assert_current_complete(0);
    let ledger = fleet.ledger(0);
    assert!(
        ledger.last().is_some_and(|l| l.starts_with(&current)),
        "host0's last activation is its current generation {current}: {ledger:?}"
    );
    fleet.finish();
}
