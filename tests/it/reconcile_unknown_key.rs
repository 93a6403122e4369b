//! `converge reconcile KEY` for an object the daemon's desired state does
//! not have is an error naming the key (exit 1), not "queued"; a key it has
//! is queued and reconciled.

use super::support::{Fleet, WAIT_LIMIT, wait_for};
use crate::support::Converge as _;

#[test]
fn reconcile_of_an_unknown_key_is_refused_and_of_a_known_one_queued() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&[]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    let state = fleet.state();
    let state = state.to_str().expect("utf-8");

    for key in ["machine/nope", "vm/web", "service/web"] {
        let run = fleet.converge(&["reconcile", key, "--state", state]);
        run.assert_code(1);
        assert!(
            run.stderr
                .contains(&format!("{key} is not in the desired state")),
            "the error names {key}:\n{}",
            run.stderr
        );
        assert!(!run.stdout.contains("queued"), "{}", run.stdout);
    }

    let seen = fleet.status("machine/web")["lastSeenMs"].as_u64();
    let run = fleet.converge(&["reconcile", "machine/web", "--state", state]);
    run.assert_code(0);
    assert_eq!(run.stdout.trim(), "queued machine/web");
    // Nothing changed, so nothing is recorded but what it observed anew.
    wait_for("the requested reconcile to observe web", WAIT_LIMIT, || {
        (fleet.status("machine/web")["lastSeenMs"].as_u64() > seen).then_some(())
    });
    daemon.assert_running();
}
