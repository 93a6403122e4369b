//! The periodic re-read catches a change the file watch did not report:
//! with the watch held off (a debounce of an hour), a changed machine
//! converges within a few re-read intervals, and the daemon says the
//! re-read found it.

use super::support::{Fleet, WAIT_LIMIT, wait_for};

#[test]
fn a_change_the_file_watch_missed_converges_at_the_next_periodic_reread() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&["--debounce", "1h", "--reread-interval", "1s"]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);

    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], ""));
    let generation = wait_for("web to converge to v2", WAIT_LIMIT, || {
        daemon.assert_running();
        let current = fleet.current("web")?;
        let generation = current.strip_prefix("generations/")?.to_owned();
        fleet
            .ledger("web")
            .contains(&format!("end {generation} switch v2"))
            .then_some(generation)
    });
    assert!(fleet.is_complete("web", &generation));
    assert!(
        daemon.log_lines().iter().any(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("periodic re-read found changes"))
        }),
        "the daemon says the periodic re-read found the change:\n{}",
        daemon.log()
    );
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    daemon.assert_running();
}
