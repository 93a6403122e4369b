//! A failing health check rolls back like a failing activation. The
//! rolled-back artifact is held: the next run does not activate it again
//! (exit 3, nothing built or activated), until the operator asks with
//! `--retry`; once the fault is lifted, that converges.

use super::support::{Fleet, generation_number, ready_of, result_kind};
use crate::support::Converge as _;

#[test]
fn failed_health_check_rolls_back_and_the_change_converges_once_the_fault_is_lifted() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");

    let healthy = fleet.path("healthy");
    let check = format!(
        "  activation:\n    healthChecks:\n      - exec: [\"test\", \"-f\", {:?}]\n        timeout: 10s\n",
        healthy.to_str().expect("utf-8")
    );
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], &check));
    fleet.reconcile_once(&["--attempts", "1"]).assert_code(3);

    assert_eq!(
        fleet.current("web").as_deref(),
        Some(format!("generations/{v1}").as_str()),
        "current is back at v1's generation"
    );
    let history = fleet.history("machine/web");
    let failed = &history[0];
    assert_eq!(result_kind(failed), "RolledBack", "{failed}");
    assert_eq!(failed["result"]["reason"], "HealthCheckFailed", "{failed}");
    assert_eq!(
        failed["result"]["to_generation"].as_u64(),
        Some(generation_number(&v1))
    );
    let (ready, reason) = ready_of(&fleet.status("machine/web"));
    assert_eq!((ready, reason.as_str()), (false, "RolledBack"));

    // Held: the same broken artifact is not activated again.
    let activations = fleet.ledger_with("web", "start").len();
    let held = fleet.reconcile_once(&["--attempts", "3"]);
    held.assert_code(3);
    assert_eq!(
        fleet.ledger_with("web", "start").len(),
        activations,
        "a held artifact is not activated again"
    );
    let (ready, reason) = ready_of(&fleet.status("machine/web"));
    assert_eq!((ready, reason.as_str()), (false, "RolledBack"));
    assert!(held.stdout.contains("--retry"), "{}", held.stdout);

    // Lift the fault, and ask for a retry.
    std::fs::write(&healthy, "ok\n").expect("create the health file");
    fleet
        .reconcile_once(&["--attempts", "1", "--retry"])
        .assert_code(0);

    let now = fleet.assert_current_complete("web");
    assert!(
        generation_number(&now) > generation_number(&v1),
        "a new generation is current: {now} after {v1}"
    );
    let artifact = failed["artifact"]
        .as_str()
        .expect("the failed attempt built an artifact");
    assert!(
        now.ends_with(artifact),
        "the current generation is v2's artifact {artifact}: {now}"
    );
    let (ready, reason) = ready_of(&fleet.status("machine/web"));
    assert!(ready, "Ready after the fault was lifted, reason {reason}");
    assert_eq!(result_kind(&fleet.history("machine/web")[0]), "Succeeded");
}
