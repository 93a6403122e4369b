//! An activation that hangs past its timeout is ended with every process it
//! started (its process group gets TERM, then KILL), the machine is rolled
//! back to the generation it had confirmed, and the hung artifact is held:
//! the next run does not activate it again.

use std::time::{Duration, Instant};

use super::support::{Fleet, ready_of};
use crate::support::Converge as _;

/// Processes of this fleet's activations still alive: the activate script
/// and the child it left in the background.
fn activation_processes(fleet: &Fleet) -> Vec<(u32, String)> {
    fleet
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("/activate") || cmd.contains("/leftover"))
        .collect()
}

#[test]
fn a_hung_activation_is_killed_with_its_children_rolled_back_and_held() {
    let fleet = Fleet::new();
    let timeout = "  activation: {timeout: 2s}\n";
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], timeout));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");

    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v2", "leave-child", "sleep=1000"], timeout),
    );
    let run = fleet.reconcile_once(&["--attempts", "3"]);
    run.assert_code(3);

    // The run waited for its rollback, so the group was signalled before it
    // ended; KILL follows TERM after a grace period, so poll briefly.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut left = activation_processes(&fleet);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = activation_processes(&fleet);
    }
    assert!(
        left.is_empty(),
        "the hung activate and its child are gone: {left:?}"
    );
    assert_eq!(
        fleet.current("web").as_deref(),
        Some(format!("generations/{v1}").as_str()),
        "rolled back to the confirmed generation"
    );
    let starts = |fleet: &Fleet| {
        fleet
            .ledger("web")
            .iter()
            .filter(|l| l.starts_with("start ") && l.ends_with(" v2"))
            .count()
    };
    assert_eq!(
        starts(&fleet),
        1,
        "v2 was activated once, not once per attempt"
    );
    let (ready, reason) = ready_of(&fleet.status("machine/web"));
    assert!(!ready);
    assert_eq!(reason, "RolledBack");

    // Held: a later run does not activate the same artifact again.
    fleet.reconcile_once(&[]).assert_code(3);
    assert_eq!(
        starts(&fleet),
        1,
        "the held artifact was not activated again"
    );
    assert!(activation_processes(&fleet).is_empty());
}
