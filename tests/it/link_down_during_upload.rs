//! The link of a host goes down while a big artifact is being uploaded to
//! it: the run ends in bounded time with that host failed and no complete
//! generation on it; the others converge; once the link is back, a rerun
//! converges it.

use std::time::Duration;

use crate::support::ssh::wait_for;

#[test]
fn a_link_that_goes_down_during_the_upload_fails_the_host_cleanly() {
    let fleet = crate::support::ssh::fleet(4);
    fleet.write_all(4, &["v1", "big=50"], "  activation: {confirmTimeout: 5s}\n");
    let testbed = &fleet.testbed;
    let generations = fleet.host_state(0).join("generations");
    let run = std::thread::scope(|scope| {
        let cutter = scope.spawn(|| {
            wait_for(
                "the upload to host0 to start",
                Duration::from_secs(60),
                || {
                    std::fs::read_dir(&generations)
                        .ok()
                        .and_then(|mut d| d.next())
                        .map(drop)
                },
            );
            testbed.host(0).link_down();
        });
        let run = fleet.reconcile_within(
            &["--attempts", "2", "--retry-delay", "300ms"],
            Duration::from_secs(90),
        );
        cutter.join().expect("the link cutter thread");
        run
    });
    eprintln!(
        "link down during upload: the run ended after {:.2?}",
        run.elapsed
    );
    run.assert_code(3);
    let (ready, reason, message) = fleet.ready(0);
    assert!(!ready, "host0 is Ready: {reason}: {message}");
    assert!(fleet.ledger(0).is_empty(), "host0 was activated");
    fleet.assert_ready(1..4);

    testbed.host(0).link_up();
    fleet
        .reconcile_within(&["--attempts", "2"], Duration::from_secs(90))
        .assert_code(0);
    fleet.assert_ready(0..4);
    assert_eq!(fleet.ledger(0).len(), 1, "{:?}", fleet.ledger(0));
    fleet.finish();
}
