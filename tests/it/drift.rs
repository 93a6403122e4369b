//! Drift: `current` repointed by hand is reported with exactly one
//! structured WARN line per change, then corrected or left alone per policy,
//! and silence follows when nothing changes.

use serde_json::Value;

use super::support::{Converge as _, Fleet, Run, condition, is_ready, repoint};

const DRIFT_TARGET: &str = "converge::drift";

fn drift_lines(run: &Run) -> Vec<Value> {
    run.log_lines()
        .into_iter()
        .filter(|l| l["target"] == DRIFT_TARGET)
        .collect()
}

/// Converges `web` twice (v1, then v2) and returns both generations.
fn two_generations(fleet: &Fleet, policy: &str) -> (String, String) {
    let extra = format!("  drift: {policy}\n");
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], &extra));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], &extra));
    fleet.reconcile_once(&[]).assert_code(0);
    let v2 = fleet.assert_current_complete("web");
    assert_ne!(v1, v2);
    (v1, v2)
}

fn assert_drift_line(line: &Value, applied: &str, observed: &str, action: &str) {
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["object"], "machine/web", "{line}");
    assert!(
        line["field"].as_str().is_some_and(|f| !f.is_empty()),
        "the line names the drifted field: {line}"
    );
    assert_eq!(line["applied"], applied, "{line}");
    assert_eq!(line["observed"], observed, "{line}");
    assert_eq!(line["action"], action, "{line}");
}

#[test]
fn drift_correct_logs_one_line_restores_current_and_then_stays_silent() {
    let fleet = Fleet::new();
    let (v1, v2) = two_generations(&fleet, "correct");
    repoint(&fleet.machine_dir("web"), &v1);

    let run = fleet.reconcile_once(&["--log-format", "json"]);
    run.assert_code(0);
    let lines = drift_lines(&run);
    assert_eq!(
        lines.len(),
        1,
        "exactly one drift line: {lines:?}\n{}",
        run.stderr
    );
    assert_drift_line(&lines[0], &v2, &v1, "correct");
    assert_eq!(
        fleet.current("web"),
        Some(format!("generations/{v2}")),
        "current is back at the applied generation"
    );
    assert!(is_ready(&fleet.status("machine/web")));

    let again = fleet.reconcile_once(&["--log-format", "json"]);
    again.assert_code(0);
    assert_eq!(
        drift_lines(&again),
        Vec::<Value>::new(),
        "no drift, no line"
    );
}

#[test]
fn drift_warn_logs_one_line_leaves_current_alone_and_does_not_repeat_itself() {
    let fleet = Fleet::new();
    let (v1, v2) = two_generations(&fleet, "warn");
    let ledger = fleet.ledger("web");
    repoint(&fleet.machine_dir("web"), &v1);

    let run = fleet.reconcile_once(&["--log-format", "json"]);
    run.assert_code(0);
    let lines = drift_lines(&run);
    assert_eq!(
        lines.len(),
        1,
        "exactly one drift line: {lines:?}\n{}",
        run.stderr
    );
    assert_drift_line(&lines[0], &v2, &v1, "warn");
    assert_eq!(
        fleet.current("web"),
        Some(format!("generations/{v1}")),
        "warn leaves current as the user set it"
    );
    assert_eq!(fleet.ledger("web"), ledger, "nothing was activated");
    let status = fleet.status("machine/web");
    let drifted = condition(&status, "Drifted").expect("a Drifted condition");
    assert_eq!(drifted["status"], true, "{status}");

    let again = fleet.reconcile_once(&["--log-format", "json"]);
    again.assert_code(0);
    assert_eq!(
        drift_lines(&again),
        Vec::<Value>::new(),
        "the same drift is not reported twice"
    );
    assert_eq!(fleet.current("web"), Some(format!("generations/{v1}")));
    let status = fleet.status("machine/web");
    assert_eq!(
        condition(&status, "Drifted").expect("Drifted")["status"],
        true
    );
}
