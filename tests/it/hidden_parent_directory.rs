//! A daemon whose desired-state directory lies under a hidden directory
//! (`~/.config/gitops`) reloads on a change like any other: only the part of
//! a changed path below the watched directory decides whether it is ignored.

use super::support::{Fleet, WAIT_LIMIT, wait_for};

#[test]
fn a_daemon_under_a_hidden_directory_reloads_and_converges_a_change() {
    let fleet = Fleet::under_a_hidden_directory();
    assert!(
        fleet
            .root()
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.')),
        "the fleet lies under a hidden directory: {}",
        fleet.root().display()
    );
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&["--debounce", "100ms"]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    let first = fleet.assert_current_complete("web");

    fleet.write("web.yaml", &fleet.machine("web", &[], &["v2"], ""));
    let second = wait_for("the daemon to converge the change", WAIT_LIMIT, || {
        let generation = fleet.current("web")?;
        let generation = generation.strip_prefix("generations/")?.to_owned();
        (generation != first
            && fleet
                .ledger("web")
                .contains(&format!("end {generation} switch v2")))
        .then_some(generation)
    });
    assert!(fleet.is_complete("web", &second));
    daemon.assert_running();
}
