//! A converged fleet stays put: a second run is a no-op, and a change to one
//! machine touches that machine only.

use super::support::{Fleet, result_kind};
use crate::support::Converge as _;

const MACHINES: [&str; 3] = ["alpha", "beta", "gamma"];

/// Writes the three machines; `gamma` activates with `gamma_mode`.
fn write_fleet(fleet: &Fleet, gamma_mode: &str) {
    for name in MACHINES {
        let mode = if name == "gamma" {
            gamma_mode
        } else {
            "switch"
        };
        let extra = format!("  activation: {{mode: {mode}}}\n");
        fleet.write(
            &format!("{name}.yaml"),
            &fleet.machine(name, &["web"], &["v1"], &extra),
        );
    }
}

/// What a run may change, per machine: current, ledger, builds, attempts.
fn footprint(fleet: &Fleet) -> Vec<(Option<String>, Vec<String>, usize, usize)> {
    MACHINES
        .iter()
        .map(|name| {
            (
                fleet.current(name),
                fleet.ledger(name),
                fleet.builds(name),
                fleet.history(&format!("machine/{name}")).len(),
            )
        })
        .collect()
}

#[test]
fn three_machines_converge_once_and_a_second_run_changes_nothing() {
    let fleet = Fleet::new();
    write_fleet(&fleet, "switch");

    fleet.reconcile_once(&[]).assert_code(0);
    for name in MACHINES {
        let generation = fleet.assert_current_complete(name);
        assert_eq!(
            fleet.ledger(name),
            [
                format!("start {generation} switch v1"),
                format!("end {generation} switch v1")
            ],
            "machine {name} was activated exactly once, with its current generation"
        );
        assert_eq!(fleet.builds(name), 1, "machine {name} was built once");
        let history = fleet.history(&format!("machine/{name}"));
        assert_eq!(history.len(), 1, "one attempt for {name}: {history:?}");
        assert_eq!(result_kind(&history[0]), "Succeeded");
    }
    let before = footprint(&fleet);

    let second = fleet.reconcile_once(&[]);
    second.assert_code(0);
    assert_eq!(
        footprint(&fleet),
        before,
        "a second run over a converged fleet must not build, activate or record an attempt"
    );
}

#[test]
fn changing_one_machines_activation_mode_reactivates_only_that_machine() {
    let fleet = Fleet::new();
    write_fleet(&fleet, "switch");
    fleet.reconcile_once(&[]).assert_code(0);
    let before = footprint(&fleet);

    write_fleet(&fleet, "test");
    fleet.reconcile_once(&[]).assert_code(0);

    let after = footprint(&fleet);
    for (i, name) in MACHINES.iter().enumerate() {
        if *name == "gamma" {
            continue;
        }
        assert_eq!(
            after[i], before[i],
            "machine {name} was not changed and must not be touched"
        );
    }
    let generation = fleet.assert_current_complete("gamma");
    let new_lines = &fleet.ledger("gamma")[before[2].1.len()..];
    assert_eq!(
        new_lines,
        [
            format!("start {generation} test v1"),
            format!("end {generation} test v1")
        ],
        "gamma's activation mode changed from switch to test: its generation must be activated again in mode test"
    );
    let history = fleet.history("machine/gamma");
    assert_eq!(
        result_kind(&history[0]),
        "Succeeded",
        "the mode change is applied, not recorded as NoChange: {:?}",
        history[0]
    );
}
