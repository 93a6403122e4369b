//! A store whose files were overwritten with garbage: every command that
//! opens it exits 1 with a message that names the store and says how to
//! recover (move it aside), instead of sled's error; done as it says, the
//! next run observes every object again and converges.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::support::{Fleet, result_kind};
use crate::support::Converge as _;

/// Overwrites every file under `dir` with as many bytes of garbage.
fn overwrite_with_garbage(dir: &Path) {
    for entry in fs::read_dir(dir).expect("read the store directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            overwrite_with_garbage(&path);
            continue;
        }
        let len = fs::metadata(&path).expect("stat").len().max(64);
        let garbage: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8 ^ 0x5a).collect();
        fs::write(&path, garbage).expect("overwrite with garbage");
    }
}

#[test]
fn every_command_that_opens_a_damaged_store_says_how_to_recover() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    fleet.reconcile_once(&[]).assert_code(0);
    let store = fleet.state().join("store");
    overwrite_with_garbage(&store);

    let dir = fleet.dir();
    let dir = dir.to_str().expect("utf-8");
    let state = fleet.state();
    let state = state.to_str().expect("utf-8");
    let store = store.to_str().expect("utf-8");
    let commands: [&[&str]; 8] = [
        &["status", "--state", state],
        &["history", "machine/web", "--state", state],
        &["facts", "machine/web", "--state", state],
        &["vm", "list", "--state", state],
        &["plan", "--dir", dir, "--state", state],
        &["reconcile", "--once", "--dir", dir, "--state", state],
        &["run", "--dir", dir, "--state", state],
        &[
            "reconcile",
            "--once",
            "--dir",
            dir,
            "--state",
            state,
            "--output",
            "json",
        ],
    ];
    for args in commands {
        let run = fleet.converge_within(args, Duration::from_secs(60));
        run.assert_code(1);
        let expected = format!("open the store at {store}: it is damaged (");
        assert!(
            run.stderr.contains(&expected)
                && run.stderr.contains(&format!(
                    "move it aside (mv {store} {store}.damaged) and run again"
                ))
                && run.stderr.contains("its history is lost"),
            "`converge {}` names the store and how to recover:\n{}",
            args.join(" "),
            run.stderr
        );
    }
    assert_eq!(
        fleet.ledger_with("web", "end").len(),
        1,
        "nothing ran again"
    );

    // Recovery as the message says.
    fs::rename(store, format!("{store}.damaged")).expect("move the store aside");
    fleet.reconcile_once(&[]).assert_code(0);
    let history = fleet.history("machine/web");
    assert_eq!(history.len(), 1, "history starts again: {history:?}");
    assert!(
        matches!(result_kind(&history[0]), "Succeeded" | "NoChange"),
        "{}",
        history[0]
    );
}
