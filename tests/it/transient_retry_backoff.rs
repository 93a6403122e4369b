//! Transient failures are retried with exponential backoff within one run,
//! and a success resets the failure count.

use std::os::unix::fs::PermissionsExt;

use super::support::{Fleet, result_kind};
use crate::support::Converge as _;

#[test]
fn transient_health_failures_are_retried_with_growing_delays_and_success_resets_failures() {
    let fleet = Fleet::new();
    // Fails the first two times it runs, then passes.
    let counter = fleet.path("checks/count");
    let check = fleet.path("checks/flaky.sh");
    std::fs::create_dir_all(fleet.path("checks")).expect("mkdir");
    std::fs::write(
        &check,
        format!(
            "#!/bin/sh\nn=$(cat {c:?} 2>/dev/null || echo 0)\nn=$((n + 1))\necho \"$n\" > {c:?}\n[ \"$n\" -gt 2 ]\n",
            c = counter.to_str().expect("utf-8")
        ),
    )
    .expect("write the check");
    std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let extra = format!(
        "  activation:\n    healthChecks:\n      - exec: [{:?}]\n        timeout: 10s\n",
        check.to_str().expect("utf-8")
    );
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], &extra));

    fleet
        .reconcile_once(&["--retry-delay", "300ms", "--attempts", "4"])
        .assert_code(0);

    assert_eq!(
        std::fs::read_to_string(&counter)
            .expect("the check ran")
            .trim(),
        "3",
        "the health check ran three times"
    );
    let mut history = fleet.history("machine/web");
    history.reverse();
    let kinds: Vec<&str> = history.iter().map(result_kind).collect();
    assert_eq!(kinds.len(), 3, "three attempts: {history:?}");
    assert!(
        kinds[..2]
            .iter()
            .all(|k| *k != "Succeeded" && *k != "NoChange"),
        "the first two attempts failed: {kinds:?}"
    );
    assert_eq!(kinds[2], "Succeeded");

    let ms = |a: &serde_json::Value, field: &str| a[field].as_u64().expect("a time in ms") as i64;
    let starts: Vec<i64> = history.iter().map(|a| ms(a, "started_ms")).collect();
    let gap1 = starts[1] - starts[0];
    let gap2 = starts[2] - starts[1];
    // The backoff itself: from the end of a failed attempt to the next start.
    let wait1 = starts[1] - ms(&history[0], "finished_ms");
    let wait2 = starts[2] - ms(&history[1], "finished_ms");
    eprintln!("gaps {gap1} ms, {gap2} ms; waits {wait1} ms, {wait2} ms");
    assert!(
        wait1 >= 300,
        "the first retry waits at least --retry-delay: {wait1} ms"
    );
    assert!(
        wait2 as f64 >= 1.5 * wait1 as f64,
        "the delay roughly doubles: {wait1} ms then {wait2} ms"
    );

    let status = fleet.status("machine/web");
    assert_eq!(
        status["status"]["failures"], 0,
        "failures reset on success: {status}"
    );
}
