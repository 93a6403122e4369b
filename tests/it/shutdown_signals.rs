//! Stopping the daemon: the first SIGTERM lets a running activation finish
//! within the grace period and exits 0; a second one aborts at once.

use std::time::{Duration, Instant};

use super::support::{Fleet, WAIT_LIMIT, result_kind, wait_for};
use crate::support::Converge as _;

#[test]
fn first_sigterm_lets_the_running_activation_finish_and_exits_0() {
    let fleet = Fleet::new();
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v1", "sleep=2"], ""),
    );
    let mut daemon = fleet.start_daemon(&["--grace", "20s"]);
    wait_for("the activation to start", WAIT_LIMIT, || {
        (!fleet.ledger_with("web", "start").is_empty()).then_some(())
    });
    assert!(
        fleet.ledger_with("web", "end").is_empty(),
        "the activation is still running"
    );

    let signalled = Instant::now();
    daemon.signal("TERM");
    let exit = daemon
        .wait_exit(Duration::from_secs(25))
        .unwrap_or_else(|| panic!("no exit within the grace period:\n{}", daemon.log()));
    let took = signalled.elapsed();
    eprintln!("exited {took:?} after SIGTERM");
    let ended_at_exit = fleet.ledger_with("web", "end");
    assert_eq!(exit.code(), Some(0), "{}", daemon.log());
    assert_eq!(
        ended_at_exit.len(),
        1,
        "the activation had completed when the daemon exited (after {took:?})"
    );
    let history = fleet.history("machine/web");
    assert_eq!(
        result_kind(&history[0]),
        "Succeeded",
        "the attempt was recorded as finished: {:?}",
        history[0]
    );
    let generation = fleet.assert_current_complete("web");
    assert_eq!(ended_at_exit, [format!("end {generation} switch v1")]);
}

#[test]
fn second_sigterm_aborts_at_once() {
    let fleet = Fleet::new();
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v1", "sleep=60"], ""),
    );
    let mut daemon = fleet.start_daemon(&["--grace", "120s"]);
    wait_for("the activation to start", WAIT_LIMIT, || {
        (!fleet.ledger_with("web", "start").is_empty()).then_some(())
    });

    daemon.signal("TERM");
    wait_for(
        "the daemon to acknowledge the first signal",
        WAIT_LIMIT,
        || {
            daemon
                .log_lines()
                .iter()
                .any(|l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("stopping"))
                })
                .then_some(())
        },
    );
    daemon.assert_running();
    let signalled = Instant::now();
    daemon.signal("TERM");
    let exit = daemon.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "still running 10 s after the second SIGTERM (the activation sleeps 60 s, grace 120 s):\n{}",
            daemon.log()
        )
    });
    eprintln!("exited {:?} after the second SIGTERM", signalled.elapsed());
    assert_eq!(exit.code(), Some(0), "{}", daemon.log());
    assert!(
        fleet.ledger_with("web", "end").is_empty(),
        "the daemon did not wait for the activation"
    );
    assert!(
        daemon
            .log_lines()
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains("abort"))),
        "the log says it aborted:\n{}",
        daemon.log()
    );
}
