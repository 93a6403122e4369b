//! An invalid desired-state directory is never applied by the daemon: the
//! error is logged with file:line:col, the last valid desired state stays in
//! force, nothing is forgotten, and a fix is picked up.

use serde_json::Value;

use super::support::{Fleet, WAIT_LIMIT, is_ready, wait_for};
use crate::support::Converge as _;

#[test]
fn broken_yaml_is_logged_with_its_location_and_never_applied_and_a_fix_converges() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.write("db.yaml", &fleet.machine("db", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&["--debounce", "100ms"]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    fleet.wait_ready("machine/db", WAIT_LIMIT);
    let web = fleet.assert_current_complete("web");
    let db = fleet.assert_current_complete("db");
    let web_ledger = fleet.ledger("web");
    let web_attempts = fleet.history("machine/web").len();

    // The machine's own file, broken: applied, it would make web vanish.
    fleet.write("web.yaml", "# broken on purpose\ngarbage: [\n");
    let diagnostic = wait_for("the daemon to log the invalid file", WAIT_LIMIT, || {
        let lines = daemon.log_lines();
        let rejected = lines.iter().any(|l| {
            l["level"] == "ERROR"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("not applied"))
        });
        rejected
            .then(|| {
                lines.into_iter().find(|l| {
                    l["level"] == "ERROR"
                        && l["file"].as_str().is_some_and(|f| f.ends_with("web.yaml"))
                })
            })
            .flatten()
    });
    // `garbage: [` is line 2; its unclosed `[` is column 10.
    assert_eq!(
        (diagnostic["line"].as_u64(), diagnostic["column"].as_u64()),
        (Some(2), Some(10)),
        "the error names file:line:col of the broken YAML: {diagnostic}"
    );
    daemon.assert_running();

    let keys: Vec<Value> = fleet.statuses().iter().map(|s| s["key"].clone()).collect();
    assert!(
        keys.contains(&Value::from("machine/web")) && keys.contains(&Value::from("machine/db")),
        "nothing was forgotten: {keys:?}"
    );
    for status in fleet.statuses() {
        assert!(is_ready(&status), "still Ready: {status}");
    }
    assert_eq!(fleet.current("web"), Some(format!("generations/{web}")));
    assert_eq!(fleet.current("db"), Some(format!("generations/{db}")));
    assert_eq!(fleet.ledger("web"), web_ledger, "nothing was activated");
    assert_eq!(fleet.history("machine/web").len(), web_attempts);

    // A fix that is also a change.
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], ""));
    let converged = wait_for("the daemon to converge the fixed file", WAIT_LIMIT, || {
        let generation = fleet.current("web")?;
        let generation = generation.strip_prefix("generations/")?.to_owned();
        (generation != web
            && fleet
                .ledger("web")
                .contains(&format!("end {generation} switch v2")))
        .then_some(generation)
    });
    assert!(fleet.is_complete("web", &converged));
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    daemon.assert_running();
    assert_eq!(
        fleet.current("db"),
        Some(format!("generations/{db}")),
        "db untouched"
    );
}
