//! A controller killed during an activation: the activation goes on on the
//! machine (its runner is detached), and the next controller re-attaches to
//! it instead of activating the generation a second time, then health-checks
//! and confirms it. The attempt the kill cut is closed as Interrupted with the
//! steps it finished and the ones it had sent (as interrupted); `status` names
//! the generation `current` points at; the target records it as confirmed.

use std::time::Duration;

use super::support::{Fleet, WAIT_LIMIT, is_ready, result_kind, wait_for};
use crate::support::Converge as _;

/// An activation that runs long enough to kill the controller during it.
const SLOW: &str = "sleep=3";

#[test]
fn a_controller_killed_during_an_activation_is_followed_by_one_that_reattaches() {
    let fleet = Fleet::new();
    let check = "  activation:\n    healthChecks:\n      - exec: [\"true\"]\n";
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], check));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");

    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2", SLOW], check));
    let mut daemon = fleet.start_daemon(&["--debounce", "100ms"]);
    // The fault: SIGKILL once v2's activation started, well before it ends.
    wait_for("v2's activation to start", WAIT_LIMIT, || {
        daemon.assert_running();
        fleet
            .ledger_with("web", "start")
            .iter()
            .any(|l| l.ends_with(" v2"))
            .then_some(())
    });
    daemon.kill();
    assert!(
        !fleet
            .ledger_with("web", "end")
            .iter()
            .any(|l| l.ends_with(" v2")),
        "v2's activation was still running when the controller died"
    );

    let run = fleet.reconcile_once(&["--attempts", "1"]);
    run.assert_code(0);

    // One activation of v2, whole: started once, ended once.
    let starts: Vec<String> = fleet
        .ledger_with("web", "start")
        .into_iter()
        .filter(|l| l.ends_with(" v2"))
        .collect();
    let ends: Vec<String> = fleet
        .ledger_with("web", "end")
        .into_iter()
        .filter(|l| l.ends_with(" v2"))
        .collect();
    assert_eq!(
        starts.len(),
        1,
        "v2 activated once: {:?}",
        fleet.ledger("web")
    );
    assert_eq!(ends.len(), 1, "{:?}", fleet.ledger("web"));

    // The target: current and confirmed are v2's generation.
    let v2 = fleet.assert_current_complete("web");
    assert_ne!(v2, v1);
    let confirmed = std::fs::read_link(fleet.machine_dir("web").join("confirmed"))
        .expect("the target records a confirmed generation");
    assert_eq!(confirmed.to_string_lossy(), format!("generations/{v2}"));

    // status names it, Ready.
    let status = fleet.status("machine/web");
    assert!(is_ready(&status), "{status}");
    assert_eq!(status["current"], v2.as_str(), "{status}");
    assert_eq!(status["confirmed"], v2.as_str(), "{status}");

    // History: the new attempt attached and checked; the cut one is closed
    // as Interrupted with the steps it finished (its build).
    let history = fleet.history("machine/web");
    let newest = &history[0];
    assert_eq!(result_kind(newest), "Succeeded", "{newest}");
    let steps = newest["steps"].as_array().expect("steps");
    let activate = steps
        .iter()
        .find(|s| s["name"] == "activate")
        .unwrap_or_else(|| panic!("an activate step: {newest}"));
    assert!(
        activate["output"]
            .as_str()
            .is_some_and(|o| o.contains("attached to the activation")),
        "{activate}"
    );
    for name in ["health-check", "confirm"] {
        assert!(
            steps
                .iter()
                .any(|s| s["name"] == name && s["status"] == "succeeded"),
            "{name} ran after re-attaching: {newest}"
        );
    }
    let cut = history
        .iter()
        .find(|a| result_kind(a) == "Interrupted")
        .unwrap_or_else(|| panic!("the killed attempt is recorded: {history:?}"));
    let finished: Vec<&str> = cut["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(finished.contains(&"build"), "{cut}");
    // What it had sent and never heard back about is there, as interrupted.
    let sent = cut["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "activate")
        .unwrap_or_else(|| panic!("the activation it asked for: {cut}"));
    assert_eq!(sent["status"], "interrupted", "{cut}");

    // Nothing of the fleet is left running.
    wait_for(
        "the fleet's processes to end",
        Duration::from_secs(10),
        || fleet.processes().is_empty().then_some(()),
    );
}
