//! The plan is what runs: for a fresh fleet of local machines and after a
//! role change, the steps `plan --output json` lists for each object are
//! exactly the steps the next attempt records in `history --output json`,
//! name for name and in order. (The quickstart's machine, VM and service
//! are checked the same way in `vm_quickstart`.)

use super::support::Fleet;

const SERVICE: &str = "apiVersion: converge/v1\nkind: Service\nmetadata: {name: mesh}\nspec:\n  module: mesh\n  roles:\n    hub: {machines: [a]}\n    spoke: {tags: [spoke], after: [hub], settings: {port: PORT}}\n";

fn write_fleet(fleet: &Fleet, port: u16) {
    let checks = "  activation:\n    healthChecks:\n      - exec: [\"true\"]\n      - exec: [\"test\", \"-d\", \"/\"]\n        timeout: 5s\n";
    fleet.write("a.yaml", &fleet.machine("a", &["hub"], &["v1"], checks));
    fleet.write("b.yaml", &fleet.machine("b", &["spoke"], &["v1"], checks));
    fleet.write("c.yaml", &fleet.machine("c", &["spoke"], &["v1"], ""));
    fleet.write("mesh.yaml", &SERVICE.replace("PORT", &port.to_string()));
}

#[test]
fn the_steps_a_plan_lists_are_the_steps_the_next_attempt_records() {
    let fleet = Fleet::new();
    write_fleet(&fleet, 1);

    let plan = fleet.plan_json();
    let planned = super::support::planned_steps(&plan);
    assert_eq!(
        planned["machine/a"],
        [
            "build",
            "install",
            "switch",
            "activate",
            "health-check",
            "health-check",
            "confirm",
            "prune"
        ],
        "{plan}"
    );
    assert_eq!(planned["service/mesh"], ["resolve-roles"], "{plan}");
    fleet.reconcile_once(&[]).assert_code(0);
    fleet.assert_history_matches(&plan);

    // Nothing changed: the plan is empty and nothing runs.
    let plan = fleet.plan_json();
    assert!(super::support::planned_steps(&plan).is_empty(), "{plan}");

    // A role's settings change: only the spokes rebuild, as planned.
    write_fleet(&fleet, 2);
    let plan = fleet.plan_json();
    let planned = super::support::planned_steps(&plan);
    let keys: Vec<&str> = planned.keys().map(String::as_str).collect();
    assert_eq!(keys, ["machine/b", "machine/c", "service/mesh"], "{plan}");
    fleet.reconcile_once(&[]).assert_code(0);
    fleet.assert_history_matches(&plan);
}
