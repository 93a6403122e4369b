//! `reconcile --once --timeout` bounds loading the directory too: a Git
//! checkout whose `core.fsmonitor` hook hangs (as a wedged fsmonitor daemon
//! does; reading the revision runs `git status`, which waits for it) ends
//! the run at the timeout with exit 4 and a message saying loading did not
//! end, and nothing is applied. (A FIFO no longer hangs loading: it is an
//! error at once, see `hostile_directory.rs`.)

use std::process::Command;
use std::time::Duration;

use super::support::Fleet;
use crate::support::Converge as _;

#[test]
fn a_directory_that_never_finishes_loading_times_out_with_exit_4() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let hook = fleet.state().with_extension("fsmonitor");
    std::fs::write(&hook, "#!/bin/sh\nexec sleep 30\n").expect("write the hook");
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the hook");
    let git = |args: &[&str]| {
        let ok = Command::new("git")
            .arg("-C")
            .arg(fleet.dir())
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .status()
            .expect("run git")
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "desired state"]);
    git(&["config", "core.fsmonitor", hook.to_str().expect("utf-8")]);

    let dir = fleet.dir();
    let state = fleet.state();
    let run = fleet.converge_within(
        &[
            "reconcile",
            "--once",
            "--dir",
            dir.to_str().expect("utf-8"),
            "--state",
            state.to_str().expect("utf-8"),
            "--timeout",
            "2s",
        ],
        Duration::from_secs(60),
    );
    run.assert_code(4);
    assert!(
        run.elapsed < Duration::from_secs(20),
        "ended near its 2 s timeout, not {:?}",
        run.elapsed
    );
    assert!(
        run.stderr.contains("timed out after 2s while loading")
            && run.stderr.contains("nothing was applied"),
        "the error says loading did not end:\n{}",
        run.stderr
    );
    assert!(fleet.ledger("web").is_empty(), "nothing was activated");
    assert_eq!(fleet.builds("web"), 0, "nothing was built");
}
