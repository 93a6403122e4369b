//! A failing build installs nothing: the machine keeps what it had, is not
//! Ready, and its history keeps the build's output.

use super::support::{BUILD_FAILURE_MARKER as MARKER, Fleet, is_ready, result_kind};
use crate::support::Converge as _;

#[test]
fn failed_build_installs_no_generation_and_keeps_its_output_in_history() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");
    let ledger = fleet.ledger("web");

    // web's next build fails; fresh has never built successfully.
    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v2", "build-exit=2"], ""),
    );
    fleet.write(
        "fresh.yaml",
        &fleet.machine("fresh", &[], &["v1", "build-exit=2"], ""),
    );
    fleet
        .reconcile_once(&["--retry-delay", "100ms"])
        .assert_code(3);

    assert_eq!(
        fleet.generations("web"),
        std::slice::from_ref(&v1),
        "no generation was installed on web"
    );
    assert_eq!(fleet.current("web"), Some(format!("generations/{v1}")));
    assert_eq!(fleet.ledger("web"), ledger, "nothing was activated on web");
    assert!(
        fleet.generations("fresh").is_empty(),
        "no generation on fresh"
    );
    assert_eq!(fleet.current("fresh"), None, "fresh has no current");

    for key in ["machine/web", "machine/fresh"] {
        let status = fleet.status(key);
        assert!(!is_ready(&status), "{key} must not be Ready: {status}");
        let history = fleet.history(key);
        let newest = &history[0];
        assert_eq!(result_kind(newest), "Failed", "{key}: {newest}");
        assert_eq!(newest["result"]["reason"], "BuildFailed", "{key}: {newest}");
        assert_eq!(
            newest["generation"],
            serde_json::Value::Null,
            "{key}: {newest}"
        );
        let steps = newest["steps"].as_array().expect("steps");
        let build = steps
            .iter()
            .find(|s| s["name"] == "build")
            .unwrap_or_else(|| panic!("{key}: no build step in {newest}"));
        assert_eq!(build["status"], "failed", "{key}: {build}");
        assert!(
            build["output"].as_str().is_some_and(|o| o.contains(MARKER)),
            "{key}: the build step keeps the build's output: {build}"
        );
        assert!(
            steps
                .iter()
                .filter(|s| s["name"] != "build")
                .all(|s| s["status"] == "skipped"),
            "{key}: nothing ran after the failed build: {steps:?}"
        );
    }
}
