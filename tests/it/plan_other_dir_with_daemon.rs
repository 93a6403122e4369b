//! `converge plan` while a daemon holds the store: it plans the directory
//! the daemon watches, reached through any path (here a symlink), and
//! refuses any other directory with exit 1, naming the one the daemon
//! watches, instead of printing the daemon's plan for its own.

use super::support::{Fleet, WAIT_LIMIT, planned_steps};
use crate::support::Converge as _;

#[test]
fn plan_of_another_directory_than_the_daemon_watches_is_refused_and_of_its_own_answered() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&[]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);

    // Another directory, with another machine, on the same --state.
    let other = fleet.path("other");
    std::fs::create_dir(&other).expect("create another directory");
    std::fs::write(
        other.join("api.yaml"),
        fleet.machine("api", &[], &["v1"], ""),
    )
    .expect("write api.yaml");
    let state = fleet.state();
    let run = fleet.converge(&[
        "plan",
        "--dir",
        other.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
        "--output",
        "json",
    ]);
    run.assert_code(1);
    assert!(
        run.stdout.trim().is_empty(),
        "no plan printed: {}",
        run.stdout
    );
    let watched = std::fs::canonicalize(fleet.dir()).expect("canonical dir");
    let watched = watched.to_str().expect("utf-8");
    assert!(
        run.stderr.contains(&format!(
            "holds the store of this state directory for {watched}"
        )) && run.stderr.contains(other.to_str().expect("utf-8"))
            && run.stderr.contains("stop the daemon"),
        "the error names both directories and what to do:\n{}",
        run.stderr
    );

    // The daemon's own directory through a symlink: planned by the daemon.
    let link = fleet.path("link");
    std::os::unix::fs::symlink(fleet.dir(), &link).expect("symlink");
    let run = fleet.converge(&[
        "plan",
        "--dir",
        link.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
        "--output",
        "json",
    ]);
    run.assert_code(0);
    let plan = run.json();
    let keys: Vec<String> = planned_steps(&plan).into_keys().collect();
    assert!(
        !keys.iter().any(|k| k == "machine/api"),
        "the other directory's machine is not in the plan: {plan}"
    );
    daemon.assert_running();
}
