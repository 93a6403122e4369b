//! `converge vm stop|start|restart|delete` with a real QEMU, through a
//! running daemon: `stop` keeps the VM stopped (its object is suspended, so
//! the daemon's resyncs do not start it again), `start` resumes and starts
//! it, `restart` is planned and recorded as a `restart-vm` step, `delete`
//! removes it as removing its YAML would and keeps it gone; each verb is an
//! event. Without a daemon, `restart` is refused with what to do instead.

use std::time::Duration;

use super::support::{Fleet, wait_for};
use super::vm_quickstart::{QemuGuard, require};
use crate::support::Converge as _;

fn vm_yaml() -> String {
    "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: box}
spec:
  host: local
  state: running
  cpus: 1
  memory: 64MiB
  disks: [{name: root, size: 64MiB}]
  network: {mode: user}
  onDelete: delete
  stopTimeout: 1s
"
    .to_owned()
}

#[test]
fn stop_start_restart_and_delete_hold_against_the_loop() {
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
    fleet.write("box.yaml", &vm_yaml());
    fleet.reconcile_once(&["--timeout", "60s"]).assert_code(0);
    let first = guard.pid().expect("the VM runs");

    // Without a daemon a restart cannot be planned: refused, nothing done.
    let refused = vm(&["restart", "box"]);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains("no daemon runs"),
        "{}",
        refused.stderr
    );
    assert_eq!(guard.pid(), Some(first));

    // A short re-read interval: the daemon looks again and again while the
    // VM is stopped, and must not start it.
    let mut daemon = fleet.start_daemon(&["--reread-interval", "1s"]);
    fleet.wait_api(&mut daemon);

    let stop = vm(&["stop", "box"]);
    stop.assert_code(0);
    assert!(stop.stdout.contains("suspended"), "{}", stop.stdout);
    assert_eq!(guard.pid(), None, "stopped");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        guard.pid(),
        None,
        "still stopped after the daemon looked again"
    );
    let status = fleet.status("vm/box");
    assert_eq!(status["suspended"]["by"], "vm stop", "{status}");
    let ready = status["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["kind"] == "Ready"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ready["reason"], "Suspended", "{status}");
    assert!(
        ready["message"].as_str().unwrap_or("").contains("start-vm"),
        "the waiting step is named: {status}"
    );

    vm(&["start", "box"]).assert_code(0);
    wait_for("the daemon starts the VM", Duration::from_secs(60), || {
        guard.pid().is_some().then_some(())
    });
    let second = guard.pid().expect("runs");
    assert_ne!(second, first);

    let restart = vm(&["restart", "box"]);
    restart.assert_code(0);
    wait_for("the VM restarts", Duration::from_secs(60), || {
        guard.pid().is_some_and(|p| p != second).then_some(())
    });
    wait_for("the restart is recorded", Duration::from_secs(30), || {
        let history = vm(&["history", "box", "--output", "json"]);
        history.json()[0]["steps"]
            .as_array()
            .is_some_and(|steps| steps.iter().any(|s| s["name"] == "restart-vm"))
            .then_some(())
    });

    let deleted = vm(&["delete", "box"]);
    deleted.assert_code(0);
    assert!(
        deleted.stdout.contains("disks deleted"),
        "{}",
        deleted.stdout
    );
    assert_eq!(guard.pid(), None);
    assert!(
        !fleet.state().join("vms/box/disks").exists(),
        "its disks are gone (onDelete: delete)"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        guard.pid(),
        None,
        "not created again while its YAML remains"
    );

    // Each verb is an event, newest first.
    let events = fleet.converge(&["events", "--state", state, "--output", "json"]);
    events.assert_code(0);
    let messages: Vec<String> = events
        .json()
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["reason"] == "OperatorVerb")
        .map(|e| e["message"].as_str().unwrap_or("").to_owned())
        .collect();
    let order = ["deleted", "restart asked", "resumed", "stopped"];
    let found: Vec<&str> = messages
        .iter()
        .filter_map(|m| order.iter().copied().find(|w| m.contains(w)))
        .collect();
    assert_eq!(found, order, "{messages:?}");

    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)).is_some());

    // Without a daemon: start resumes and the next --once creates and starts
    // it again; stop says at once, in `vm list` and `status`, that it is
    // stopped (no reconcile follows to observe it).
    vm(&["start", "box"]).assert_code(0);
    fleet.reconcile_once(&["--timeout", "60s"]).assert_code(0);
    assert!(guard.pid().is_some(), "created and started again");
    vm(&["stop", "box"]).assert_code(0);
    assert_eq!(guard.pid(), None);
    let rows = vm(&["list", "--output", "json"]).json();
    assert_eq!(rows[0]["running"], false, "{rows}");
    assert_eq!(rows[0]["reason"], "Suspended", "{rows}");
}
