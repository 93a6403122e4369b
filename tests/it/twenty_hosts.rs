//! Twenty fresh SSH hosts converge in one `reconcile --once`, and a second
//! run changes nothing: no activation, no new attempt in the history.

use crate::support::Converge as _;

#[test]
fn twenty_hosts_converge_from_nothing_and_the_second_run_is_a_noop() {
    const N: usize = 20;
    let fleet = crate::support::ssh::fleet(N);
    fleet.write_all(N, &["v1"], "");

    let first = fleet.reconcile_once(&["--concurrency", "20"]);
    first.assert_code(0);
    let mut generations = Vec::new();
    for i in 0..N {
        generations.push(fleet.assert_current_complete(i));
        let ledger = fleet.ledger(i);
        assert_eq!(ledger.len(), 1, "host{i} activated once: {ledger:?}");
        assert_eq!(
            ledger[0],
            format!("{} switch v1", generations[i]),
            "host{i}'s activation ran the current generation"
        );
    }
    let histories: Vec<usize> = (0..N)
        .map(|i| fleet.history(&format!("machine/host{i}")).len())
        .collect();
    assert!(histories.iter().all(|&n| n >= 1), "{histories:?}");

    let second = fleet.reconcile_once(&["--concurrency", "20"]);
    second.assert_code(0);
    for (i, generation) in generations.iter().enumerate() {
        assert_eq!(
            &fleet.assert_current_complete(i),
            generation,
            "host{i}: current moved on a no-op run"
        );
        assert_eq!(fleet.ledger(i).len(), 1, "host{i}: activated again");
    }
    let after: Vec<usize> = (0..N)
        .map(|i| fleet.history(&format!("machine/host{i}")).len())
        .collect();
    assert_eq!(histories, after, "a no-op run recorded new attempts");
    eprintln!(
        "twenty hosts: first run {:.2?}, no-op run {:.2?}",
        first.elapsed, second.elapsed
    );
    fleet.assert_ready(0..N);
    fleet.finish();
}
