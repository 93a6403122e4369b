//! `converge suspend KEY` and `converge resume KEY`, with the real binary:
//! a suspended machine is still observed and its drift reported, but nothing
//! is activated or corrected on it, across runs and through a daemon, until
//! it is resumed. Each changes nothing but the store; bad keys are refused.

use std::time::Duration;

use super::support::{Converge as _, Fleet, repoint, wait_for};

fn starts_of(fleet: &Fleet, variant: &str) -> usize {
    fleet
        .ledger("web")
        .iter()
        .filter(|l| l.starts_with("start ") && l.ends_with(&format!(" {variant}")))
        .count()
}

fn ready(status: &serde_json::Value) -> serde_json::Value {
    status["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["kind"] == "Ready"))
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_suspended_machine_is_observed_but_never_changed_until_resumed() {
    let fleet = Fleet::new();
    let state = fleet.state();
    let state = state.to_str().expect("utf-8");
    let extra = "  drift: correct\n";
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], extra));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], extra));
    fleet.reconcile_once(&[]).assert_code(0);
    let v2 = fleet.assert_current_complete("web");

    // Refusals: a key converge never saw, a service.
    let unknown = fleet.converge(&["suspend", "machine/nope", "--state", state]);
    unknown.assert_code(1);
    assert!(
        unknown.stderr.contains("no record of it"),
        "{}",
        unknown.stderr
    );
    let service = fleet.converge(&["suspend", "service/x", "--state", state]);
    service.assert_code(1);
    assert!(
        service.stderr.contains("only machines and VMs"),
        "{}",
        service.stderr
    );

    let suspended = fleet.converge(&["suspend", "machine/web", "--state", state]);
    suspended.assert_code(0);
    assert!(
        suspended.stdout.contains("suspended"),
        "{}",
        suspended.stdout
    );

    // A new spec and drift by hand: reported, neither applied nor corrected.
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v3"], extra));
    repoint(&fleet.machine_dir("web"), &v1);
    let run = fleet.reconcile_once(&["--log-format", "json"]);
    run.assert_code(3);
    assert!(
        run.log_lines()
            .iter()
            .any(|l| l["target"] == "converge::drift" && l["object"] == "machine/web"),
        "the drift is still reported:\n{}",
        run.stderr
    );
    assert_eq!(starts_of(&fleet, "v3"), 0, "nothing was activated");
    assert_eq!(
        fleet.current("web").as_deref(),
        Some(format!("generations/{v1}").as_str()),
        "the drift was not corrected"
    );
    let status = fleet.status("machine/web");
    assert_eq!(status["suspended"]["by"], "suspend", "{status}");
    let r = ready(&status);
    assert_eq!(r["reason"], "Suspended", "{status}");
    assert!(
        r["message"].as_str().unwrap_or("").contains("build"),
        "the waiting steps are named: {status}"
    );

    // Through a daemon: still nothing changes; resume converges at once.
    let mut daemon = fleet.start_daemon(&[]);
    fleet.wait_api(&mut daemon);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(starts_of(&fleet, "v3"), 0, "the daemon changed nothing");
    let resumed = fleet.converge(&["resume", "machine/web", "--state", state]);
    resumed.assert_code(0);
    assert!(resumed.stdout.contains("resumed"), "{}", resumed.stdout);
    wait_for(
        "v3 to be activated after resume",
        Duration::from_secs(60),
        || (starts_of(&fleet, "v3") > 0).then_some(()),
    );
    let status = fleet.wait_ready("machine/web", Duration::from_secs(60));
    assert!(status["suspended"].is_null(), "{status}");
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)).is_some());
    let v3 = fleet.assert_current_complete("web");
    assert_ne!(v3, v2);
}
