//! The soak: `converge run` SIGKILLed 20 times at random moments during
//! activations of a 10-machine local fleet whose activations sleep a random
//! 0-2 s and record any overlap. Every round changes every machine, so there
//! is always an activation to cut, and a controller that comes back finds
//! activations of generations it no longer wants still running. Afterwards,
//! for every machine: `status` names the generation the target's `current`
//! points at, which is the one the target recorded as confirmed; no two
//! activations of a machine ever overlapped; every attempt is closed, with
//! its steps (one cut during a deploy records what it had sent).
//!
//! The seed of the random moments is printed; `CONVERGE_TEST_SEED=N` replays
//! it. The figures it prints are in BENCHMARKS.md.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::support::{Fleet, Random, is_ready, result_kind, wait_for};
use crate::support::Converge as _;

const MACHINES: usize = 10;
const KILLS: usize = 20;

fn write_round(fleet: &Fleet, names: &[String], round: usize) {
    let variant = format!("v{round}");
    for name in names {
        fleet.write(
            &format!("{name}.yaml"),
            &fleet.machine(
                name,
                &["soak"],
                &[&variant, "random-sleep-ms=2000", "overlap-check"],
                "",
            ),
        );
    }
}

/// Whether some activation of the fleet runs now (its overlap lock exists).
fn activation_running(fleet: &Fleet, names: &[String]) -> bool {
    names.iter().any(|n| {
        fleet
            .root()
            .join("ledger")
            .join(format!("{n}.running"))
            .exists()
    })
}

#[test]
fn sigkills_during_activations_never_overlap_them_and_leave_the_truth_recorded() {
    let fleet = Fleet::new();
    let names: Vec<String> = (0..MACHINES).map(|i| format!("m{i:02}")).collect();
    std::fs::create_dir_all(fleet.root().join("ledger")).expect("ledger dir");
    let mut random = Random::from_env_or_clock("soak_kills_during_activations");
    let daemon_args = ["--debounce", "100ms", "--retry-delay", "200ms"];
    let started = Instant::now();
    let mut during = 0;

    for round in 0..KILLS {
        write_round(&fleet, &names, round);
        let mut daemon = fleet.start_daemon(&daemon_args);
        wait_for(
            &format!("round {round}: an activation to run"),
            Duration::from_secs(60),
            || {
                daemon.assert_running();
                activation_running(&fleet, &names).then_some(())
            },
        );
        // The fault: SIGKILL at a random moment of the activations.
        std::thread::sleep(Duration::from_millis(random.between(0, 1500)));
        during += usize::from(activation_running(&fleet, &names));
        daemon.kill();
    }

    // The last round's desired state, converged by a controller left alone.
    let mut daemon = fleet.start_daemon(&daemon_args);
    fleet.wait_api(&mut daemon);
    wait_for(
        "every machine to be Ready",
        Duration::from_secs(180),
        || {
            daemon.assert_running();
            let ready = fleet.statuses().iter().filter(|s| is_ready(s)).count();
            (ready == MACHINES).then_some(())
        },
    );
    daemon.signal("TERM");
    let exit = daemon
        .wait_exit(Duration::from_secs(60))
        .expect("the daemon stops after SIGTERM");
    assert_eq!(exit.code(), Some(0), "clean stop:\n{}", daemon.log());
    drop(daemon);

    let mut attempts = 0;
    let mut interrupted = 0;
    let mut cut_sent = 0;
    let mut activations = 0;
    let mut ids = BTreeSet::new();
    let last = format!("v{}", KILLS - 1);
    for name in &names {
        let key = format!("machine/{name}");
        let current = fleet.assert_current_complete(name);
        let confirmed = std::fs::read_link(fleet.machine_dir(name).join("confirmed"))
            .expect("a confirmed generation")
            .to_string_lossy()
            .into_owned();
        assert_eq!(confirmed, format!("generations/{current}"), "{key}");
        let status = fleet.status(&key);
        assert!(is_ready(&status), "{key}: {status}");
        assert_eq!(status["current"], current.as_str(), "{key}: {status}");
        assert_eq!(status["confirmed"], current.as_str(), "{key}: {status}");
        assert_eq!(
            status["status"]["in_progress"],
            serde_json::Value::Null,
            "{key}: {status}"
        );
        // The generation current is the last round's.
        let variant = std::fs::read_to_string(
            fleet
                .machine_dir(name)
                .join("generations")
                .join(&current)
                .join("artifact/variant"),
        )
        .expect("variant");
        assert_eq!(variant.trim(), last, "{key}");

        let ledger = fleet.ledger(name);
        let overlaps: Vec<&String> = ledger.iter().filter(|l| l.starts_with("overlap")).collect();
        assert!(
            overlaps.is_empty(),
            "{key}: overlapping activations: {ledger:?}"
        );
        activations += fleet.ledger_with(name, "start").len();

        for attempt in fleet.history(&key) {
            attempts += 1;
            let id = attempt["id"].as_u64().expect("an id");
            assert!(ids.insert(id), "{key}: attempt {id} twice");
            let steps = attempt["steps"].as_array().cloned().unwrap_or_default();
            if result_kind(&attempt) == "Interrupted" {
                interrupted += 1;
                // Cut during a deploy: what it had sent is recorded as such.
                cut_sent += usize::from(steps.iter().any(|s| s["status"] == "interrupted"));
            } else {
                assert!(
                    !steps.is_empty(),
                    "{key}: an attempt without steps: {attempt}"
                );
            }
        }
    }
    eprintln!(
        "soak: {KILLS} SIGKILLs ({during} of them while an activation ran), {MACHINES} machines, \
         {activations} activations, {attempts} attempts ({interrupted} interrupted, {cut_sent} of them \
         during a deploy, recorded as sent), 0 overlaps, \
         {:.1?} in all",
        started.elapsed()
    );

    let left = wait_for(
        "every process of the fleet to end",
        Duration::from_secs(10),
        || {
            let left = fleet.processes();
            left.is_empty().then_some(left)
        },
    );
    assert!(left.is_empty());
}
