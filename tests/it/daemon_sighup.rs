//! SIGHUP re-reads the desired-state directory, as a file change does: the
//! daemon keeps running, says it re-read, and converges what changed, here
//! with the file watch held off (a debounce of an hour) so that only the
//! signal can have noticed the change. A SIGHUP with nothing changed
//! reconciles nothing.

use serde_json::Value;

use super::support::{Fleet, WAIT_LIMIT, result_kind, wait_for};
use crate::support::Converge as _;

fn says(line: &Value, text: &str) -> bool {
    line["message"].as_str().is_some_and(|m| m.contains(text))
}

#[test]
fn sighup_rereads_the_directory_and_converges_what_changed() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.write("db.yaml", &fleet.machine("db", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&["--debounce", "1h", "--reread-interval", "0s"]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    fleet.wait_ready("machine/db", WAIT_LIMIT);
    let db_attempts = fleet.history("machine/db").len();

    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], ""));
    daemon.signal("HUP");
    let generation = wait_for("web to converge to v2 after SIGHUP", WAIT_LIMIT, || {
        daemon.assert_running();
        let current = fleet.current("web")?;
        let generation = current.strip_prefix("generations/")?.to_owned();
        fleet
            .ledger("web")
            .contains(&format!("end {generation} switch v2"))
            .then_some(generation)
    });
    assert!(fleet.is_complete("web", &generation));
    let web_attempts = wait_for("v2's attempt to be recorded", WAIT_LIMIT, || {
        let history = fleet.history("machine/web");
        (history.len() == 2 && result_kind(&history[0]) == "Succeeded").then_some(history.len())
    });
    let lines = daemon.log_lines();
    assert!(
        lines
            .iter()
            .any(|l| says(l, "SIGHUP: re-reading the desired-state directory")),
        "the daemon says it re-read on SIGHUP:\n{}",
        daemon.log()
    );
    assert!(
        lines.iter().any(|l| says(l, "desired state reloaded")
            && l["cause"] == "SIGHUP"
            && l["changed"] == 1),
        "the reload names its cause and the one object that changed:\n{}",
        daemon.log()
    );

    // Nothing changed: a second SIGHUP re-reads and reconciles nothing.
    daemon.signal("HUP");
    wait_for("the second re-read", WAIT_LIMIT, || {
        let reloads = daemon
            .log_lines()
            .iter()
            .filter(|l| says(l, "desired state reloaded") && l["cause"] == "SIGHUP")
            .count();
        (reloads == 2).then_some(())
    });
    let second = daemon
        .log_lines()
        .into_iter()
        .rfind(|l| says(l, "desired state reloaded"))
        .expect("a reload line");
    assert_eq!(second["changed"], 0, "{second}");
    daemon.assert_running();
    assert_eq!(fleet.history("machine/web").len(), web_attempts);
    assert_eq!(
        fleet.history("machine/db").len(),
        db_attempts,
        "db untouched"
    );
}
