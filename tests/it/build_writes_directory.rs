//! A build that writes into the desired-state directory changes its own
//! inputs and would rebuild itself forever. It is a terminal error naming
//! the files it changed, and the machine is held: the next run neither
//! builds nor activates it. A machine built at the same time is not blamed
//! (the suspect is built again alone first). Once the build is fixed (its
//! inputs change), the machine converges.

use super::support::{Fleet, read_lines, ready_of};
use crate::support::Converge as _;

/// Writes `generated.txt` into its working directory: the desired-state
/// directory. `ROOT` is the fleet's root (where builds are counted).
const DIRTY: &str = r#"#!/bin/sh
set -eu
echo built >> 'ROOT/dirty-builds'
sleep 0.5
date +%s%N > generated.txt
printf '#!/bin/sh\necho activated >> "ROOT/dirty-activations"\n' > "$CONVERGE_OUT/activate"
chmod +x "$CONVERGE_OUT/activate"
"#;

#[test]
fn a_build_that_writes_into_the_directory_is_held_and_a_concurrent_one_is_not_blamed() {
    let fleet = Fleet::new();
    let root = fleet.root().to_str().expect("utf-8").to_owned();
    fleet.write_executable("dirty.sh", &DIRTY.replace("ROOT", &root));
    let dirty = fleet
        .machine("dirty", &[], &[], "")
        .replace("\"./build.sh\"", "\"./dirty.sh\"");
    fleet.write("dirty.yaml", &dirty);
    for name in ["clean1", "clean2"] {
        fleet.write(
            &format!("{name}.yaml"),
            &fleet.machine(name, &[], &["v1", "build-sleep=2"], ""),
        );
    }
    let builds = || read_lines(&fleet.root().join("dirty-builds")).len();

    let run = fleet.reconcile_once(&["--builds", "3", "--attempts", "3"]);
    run.assert_code(3);
    let status = fleet.status("machine/dirty");
    let (ready, reason) = ready_of(&status);
    assert_eq!(
        (ready, reason.as_str()),
        (false, "BuildChangedDirectory"),
        "{status}"
    );
    assert!(
        status["status"]["held"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("generated.txt")),
        "the error names the file: {status}"
    );
    // Built, seen changing the directory, built again alone: two builds, and
    // no retry after that (terminal).
    assert_eq!(builds(), 2, "{}", run.stderr);
    assert!(
        !fleet.root().join("dirty-activations").exists(),
        "a build that changed the directory is never activated"
    );
    for name in ["clean1", "clean2"] {
        let (ready, reason) = ready_of(&fleet.status(&format!("machine/{name}")));
        assert!(ready, "{name} built beside it is not blamed: {reason}");
        // It saw the directory change during its build (the sleeps are the
        // scenario: the write comes 0.5 s into its 2 s build) and was built
        // again alone, cleanly.
        assert_eq!(fleet.builds(name), 2, "{name}: {}", run.stderr);
    }

    // Held: the next run does not build it again (its own write changed the
    // directory, which is not a change of its inputs).
    let activations = fleet.ledger_with("clean1", "start").len();
    let held = fleet.reconcile_once(&[]);
    held.assert_code(3);
    assert_eq!(builds(), 2, "a held build is not run again");
    // The others' build input did change (the file it wrote is in the
    // directory): they may build again, but their artifact is the same.
    assert_eq!(
        fleet.ledger_with("clean1", "start").len(),
        activations,
        "the others' artifacts did not change: not activated again"
    );
    assert!(
        held.stdout.contains("BuildChangedDirectory"),
        "{}",
        held.stdout
    );

    // Fixed: the build writes nothing there; its inputs changed, so it runs.
    let fixed = DIRTY
        .replace("date +%s%N > generated.txt\n", "")
        .replace("ROOT", &root);
    fleet.write_executable("dirty.sh", &fixed);
    fleet.reconcile_once(&[]).assert_code(0);
    assert_eq!(builds(), 3);
    assert_eq!(
        read_lines(&fleet.root().join("dirty-activations")).len(),
        1,
        "activated once it is fixed"
    );
}
