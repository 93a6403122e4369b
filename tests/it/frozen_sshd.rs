//! A host whose sshd freezes (SIGSTOP) in the middle of its activation fails
//! within a bounded time instead of hanging the run; the others converge;
//! once thawed, a rerun converges it.

use std::time::Duration;

use crate::support::ssh::wait_for;

#[test]
fn a_host_whose_sshd_freezes_during_the_run_fails_in_bounded_time() {
    frozen_during_activation("  activation: {confirmTimeout: 5s, timeout: 15s}\n");
}

/// The same with the default activation timeout (5m): waiting for the
/// activation's result gives up after a few lost connections in a row
/// rather than retrying until the activation timeout, long after the
/// target's watchdog (confirmTimeout 5s) has decided.
#[test]
fn a_frozen_host_fails_within_60s_with_the_default_activation_timeout() {
    frozen_during_activation("  activation: {confirmTimeout: 5s}\n");
}

fn frozen_during_activation(extra: &str) {
    let fleet = crate::support::ssh::fleet(4);
    fleet.write_all(4, &["v1", "sleep-on=host0:3"], extra);
    let testbed = &fleet.testbed;
    let starts = fleet.host_state(0).join("starts");
    let run = std::thread::scope(|scope| {
        let freezer = scope.spawn(|| {
            wait_for(
                "host0's activation to start",
                Duration::from_secs(60),
                || starts.exists().then_some(()),
            );
            // Freeze while converge waits for the activation's result
            // (activate sleeps 3 s on host0): its wait script runs there.
            wait_for(
                "converge to wait for host0's activation",
                Duration::from_secs(60),
                || {
                    let waiting = testbed.host(0).processes_mentioning("converge-apply.sh");
                    (!waiting.is_empty()).then_some(())
                },
            );
            testbed.host(0).freeze();
        });
        let run = fleet.reconcile_within(
            &["--attempts", "2", "--retry-delay", "300ms"],
            Duration::from_secs(60),
        );
        freezer.join().expect("the freezer thread");
        run
    });
    run.assert_code(3);
    eprintln!(
        "frozen sshd: the run ended after {:.2?}\n{}",
        run.elapsed, run.stderr
    );
    let (ready, reason, message) = fleet.ready(0);
    assert!(
        !ready,
        "host0 is Ready with a frozen sshd: {reason}: {message}"
    );
    fleet.assert_ready(1..4);

    fleet.testbed.host(0).thaw();
    fleet
        .reconcile_within(
            &["--attempts", "2", "--retry-delay", "300ms"],
            Duration::from_secs(60),
        )
        .assert_code(0);
    fleet.assert_ready(0..4);
    let ledger = fleet.ledger(0);
    assert!(
        ledger
            .last()
            .is_some_and(|l| l.starts_with(&fleet.assert_current_complete(0))),
        "host0's last activation is its current generation: {ledger:?}"
    );
    fleet.finish();
}
