//! The VM operator verbs through the real binary and a real QEMU: `vm list`,
//! `vm snapshot`, `vm snapshots`, `vm revert`, `vm console`, `vm history`,
//! first against the store directly, then through a running daemon; and
//! their refusals.

use super::support::Fleet;
use super::vm_quickstart::{QemuGuard, require};
use crate::support::Converge as _;

fn vm_yaml(state: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: VirtualMachine
metadata: {{name: box}}
spec:
  host: local
  state: {state}
  cpus: 1
  memory: 64MiB
  disks: [{{name: root, size: 64MiB}}]
  network: {{mode: user}}
  onDelete: delete
  stopTimeout: 1s
"
    )
}

#[test]
fn operator_verbs_snapshot_revert_list_and_refuse_what_fights_the_spec() {
    require("qemu-system-x86_64");
    require("qemu-img");
    let fleet = Fleet::new();
    let state = fleet.state();
    let state = state.to_str().expect("utf-8");
    let guard = QemuGuard {
        pidfile: fleet.state().join("vms/box/qemu.pid"),
    };
    let vm = |args: &[&str]| {
        let mut all = vec!["vm"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--state", state]);
        fleet.converge(&all)
    };

    // Before anything was reconciled: a clear refusal.
    let none = vm(&["snapshots", "box"]);
    none.assert_code(1);
    assert!(
        none.stderr.contains("nothing was reconciled"),
        "{}",
        none.stderr
    );

    fleet.write("box.yaml", &vm_yaml("stopped"));
    fleet.reconcile_once(&["--timeout", "60s"]).assert_code(0);
    // Stopped: a disk-only snapshot; the console is refused.
    let cold = vm(&["snapshot", "box", "cold"]);
    cold.assert_code(0);
    assert!(
        cold.stdout.contains("disks only (stopped)"),
        "{}",
        cold.stdout
    );
    let console = vm(&["console", "box"]);
    console.assert_code(1);
    assert!(console.stderr.contains("not running"), "{}", console.stderr);

    fleet.write("box.yaml", &vm_yaml("running"));
    fleet.reconcile_once(&["--timeout", "60s"]).assert_code(0);
    let pid = guard.pid().expect("the VM runs");
    let list = vm(&["list", "--output", "json"]);
    list.assert_code(0);
    let rows = list.json();
    let row = &rows[0];
    assert_eq!(row["name"], "box", "{rows}");
    assert_eq!(row["state"], "running", "{rows}");
    assert_eq!(row["running"], true, "{rows}");
    assert_eq!(row["pid"], pid, "{rows}");
    assert_eq!(row["ready"], true, "{rows}");

    let hot = vm(&["snapshot", "box", "hot"]);
    hot.assert_code(0);
    assert!(
        hot.stdout.contains("disks, RAM and devices"),
        "{}",
        hot.stdout
    );
    let again = vm(&["snapshot", "box", "hot"]);
    again.assert_code(1);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    let listed = vm(&["snapshots", "box", "--output", "json"]);
    listed.assert_code(0);
    let snaps = listed.json()["snapshots"].clone();
    let names: Vec<(&str, bool)> = snaps
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or(""), s["withRam"] == true))
        .collect();
    assert_eq!(names, [("cold", false), ("hot", true)], "{snaps}");

    // Reverting a running VM to a disk-only snapshot would pull its disks
    // from under the guest: refused, nothing changed.
    let refused = vm(&["revert", "box", "cold"]);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains("holds no RAM state"),
        "{}",
        refused.stderr
    );
    let missing = vm(&["revert", "box", "nope"]);
    missing.assert_code(1);
    assert!(missing.stderr.contains("missing"), "{}", missing.stderr);
    let unknown = vm(&["snapshot", "ghost", "x"]);
    unknown.assert_code(1);
    assert!(
        unknown.stderr.contains("has not reconciled"),
        "{}",
        unknown.stderr
    );
    vm(&["revert", "box", "hot"]).assert_code(0);
    assert_eq!(guard.pid(), Some(pid), "a revert keeps the same QEMU");

    // Through a running daemon (which holds the store): the same verbs work.
    let mut daemon = fleet.start_daemon(&[]);
    fleet.wait_api(&mut daemon);
    let via = vm(&["snapshot", "box", "via-daemon"]);
    via.assert_code(0);
    assert!(via.stdout.contains("via-daemon"), "{}", via.stdout);
    let list = vm(&["list", "--output", "json"]);
    list.assert_code(0);
    assert_eq!(list.json()[0]["running"], true);
    vm(&["revert", "box", "via-daemon"]).assert_code(0);
    let history = vm(&["history", "box", "--output", "json"]);
    history.assert_code(0);
    assert!(
        !history.json().as_array().expect("attempts").is_empty(),
        "{}",
        history.stdout
    );
    let log = vm(&["console", "box", "--log"]);
    log.assert_code(0);
    // The daemon did not restart the VM around the verbs.
    assert_eq!(guard.pid(), Some(pid));
    daemon.signal("TERM");
    assert!(
        daemon
            .wait_exit(std::time::Duration::from_secs(30))
            .is_some()
    );

    // `plan` previews VM changes, and which of them restart the VM.
    fleet.write(
        "box.yaml",
        &vm_yaml("running").replace("memory: 64MiB", "memory: 96MiB"),
    );
    let dir = fleet.dir();
    let plan = fleet.converge(&[
        "plan",
        "--detailed-exitcode",
        "--dir",
        dir.to_str().expect("utf-8"),
        "--state",
        state,
    ]);
    plan.assert_code(2);
    assert!(plan.stdout.contains("~ vm/box"), "{}", plan.stdout);
    assert!(
        plan.stdout
            .contains(r#"spec.memory: "64MiB" -> "96MiB"  # forces restart"#),
        "{}",
        plan.stdout
    );
    assert_eq!(guard.pid(), Some(pid), "plan changes nothing");

    // Clean up through converge: removed with onDelete: delete. (Another
    // object stays: a directory that came up empty is never applied.)
    std::fs::remove_file(fleet.dir().join("box.yaml")).expect("remove box.yaml");
    fleet.write(
        "spare.yaml",
        &vm_yaml("stopped").replace("name: box", "name: spare"),
    );
    fleet.reconcile_once(&["--timeout", "60s"]).assert_code(0);
    assert_eq!(guard.pid(), None, "the VM stopped on removal");
    assert!(
        !fleet.state().join("vms/box").exists(),
        "its directory is gone"
    );
}
