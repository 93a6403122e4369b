//! `--keep-generations N`: the prune step keeps the N newest complete
//! generations on the target, and never the ones `current` and `confirmed`
//! point at, whatever N; `plan` shows the same N the run uses.

use super::support::{Fleet, generation_number};
use crate::support::Converge as _;

#[test]
fn keep_generations_bounds_what_a_target_keeps_and_plan_shows_it() {
    let fleet = Fleet::new();
    let dir = fleet.dir();
    let state = fleet.state();
    for (round, variant) in ["v1", "v2", "v3", "v4", "v5"].into_iter().enumerate() {
        fleet.write("web.yaml", &fleet.machine("web", &[], &[variant], ""));
        let plan = fleet.converge(&[
            "plan",
            "--dir",
            dir.to_str().expect("utf-8"),
            "--state",
            state.to_str().expect("utf-8"),
            "--keep-generations",
            "2",
            "--output",
            "json",
        ]);
        plan.assert_code(0);
        let plan = plan.json();
        let prune = plan["changes"][0]["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|s| s["step"] == "prune"))
            .unwrap_or_else(|| panic!("a prune step: {plan}"));
        assert_eq!(prune["keep"], 2, "{plan}");

        fleet
            .reconcile_once(&["--keep-generations", "2"])
            .assert_code(0);
        let current = fleet.assert_current_complete("web");
        let kept = fleet.generations("web");
        assert!(kept.len() <= 2, "round {round}: {kept:?}");
        assert_eq!(kept.last(), Some(&current), "the newest is current");
        if round > 0 {
            assert_eq!(kept.len(), 2, "round {round}: {kept:?}");
        }
        let confirmed = std::fs::read_link(fleet.machine_dir("web").join("confirmed"))
            .expect("confirmed")
            .to_string_lossy()
            .into_owned();
        assert_eq!(confirmed, format!("generations/{current}"));
    }
    // Five rounds, numbers 1 to 5: the two newest are left.
    let numbers: Vec<u64> = fleet
        .generations("web")
        .iter()
        .map(|g| generation_number(g))
        .collect();
    assert_eq!(numbers, [4, 5]);
}
