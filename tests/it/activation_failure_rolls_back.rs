//! A generation whose activation fails is rolled back: the previous one is
//! current and active again, and the run, history and status all say so.

use super::support::{Fleet, generation_number, ready_of, result_kind};
use crate::support::Converge as _;

#[test]
fn failed_activation_rolls_back_to_the_previous_generation_and_exits_3() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.reconcile_once(&[]).assert_code(0);
    let v1 = fleet.assert_current_complete("web");

    fleet.write(
        "web.yaml",
        &fleet.machine("web", &[], &["v2", "activate-exit=1"], ""),
    );
    let run = fleet.reconcile_once(&["--attempts", "1"]);
    run.assert_code(3);

    assert_eq!(
        fleet.current("web").as_deref(),
        Some(format!("generations/{v1}").as_str()),
        "current is back at v1's generation"
    );
    let ledger = fleet.ledger("web");
    assert_eq!(
        ledger.last().map(String::as_str),
        Some(format!("end {v1} switch v1").as_str()),
        "v1 was re-activated after v2 failed: {ledger:?}"
    );
    assert!(
        ledger
            .iter()
            .any(|l| l.starts_with("start ") && l.ends_with(" v2")),
        "v2's activate ran: {ledger:?}"
    );

    let history = fleet.history("machine/web");
    let newest = &history[0];
    assert_eq!(result_kind(newest), "RolledBack", "{newest}");
    assert_eq!(
        newest["result"]["to_generation"].as_u64(),
        Some(generation_number(&v1)),
        "the record names the generation it rolled back to: {newest}"
    );
    assert!(
        newest["result"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&v1)),
        "the message names the previous generation {v1}: {newest}"
    );

    let (ready, reason) = ready_of(&fleet.status("machine/web"));
    assert!(!ready, "a rolled-back machine is not Ready");
    assert_eq!(reason, "RolledBack");
}
