//! VirtualMachine specs that cannot work end in clear, terminal errors
//! through the whole loop (`reconcile --once` exits 3, the object is
//! Stalled with a message naming the cause), and no QEMU is started.

use super::support::{Fleet, condition, processes_mentioning};
use super::vm_quickstart::require;
use crate::support::Converge as _;

fn vm(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  host: local
  state: running
  cpus: 1
{extra}"
    )
}

#[test]
fn impossible_vm_specs_stall_with_clear_errors_and_start_nothing() {
    require("qemu-system-x86_64");
    require("qemu-img");
    let fleet = Fleet::new();
    // A port something else already listens on.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind a port");
    let port = taken.local_addr().expect("address").port();
    let cases = [
        (
            "backing",
            "  memory: 64MiB\n  disks: [{name: root, size: 64MiB, backingImage: images/missing.qcow2}]\n  network: {mode: user}\n",
            "images/missing.qcow2 does not exist",
        ),
        (
            "clash",
            &*format!(
                "  memory: 64MiB\n  disks: [{{name: root, size: 64MiB}}]\n  network: {{mode: user, forwards: [{{host: {port}, guest: 22}}]}}\n"
            ),
            &*format!("{port}"),
        ),
        (
            "huge",
            "  memory: 3TiB\n  disks: [{name: root, size: 64MiB}]\n  network: {mode: user}\n",
            "more than this host has",
        ),
        (
            "nokernel",
            "  memory: 64MiB\n  disks: [{name: root, size: 64MiB}]\n  network: {mode: user}\n  boot: {kernel: boot/vmlinuz-missing}\n",
            "vmlinuz-missing",
        ),
    ];
    for (name, extra, _) in &cases {
        fleet.write(&format!("{name}.yaml"), &vm(name, extra));
    }
    let run = fleet.reconcile_once(&["--timeout", "60s"]);
    run.assert_code(3);
    let statuses = fleet.statuses();
    for (name, _, expected) in &cases {
        let key = format!("vm/{name}");
        let view = statuses
            .iter()
            .find(|s| s["key"] == key)
            .unwrap_or_else(|| panic!("no {key} in {statuses:?}"));
        let ready = condition(view, "Ready").expect("a Ready condition");
        assert_eq!(ready["status"], false, "{view}");
        let message = ready["message"].as_str().unwrap_or("");
        assert!(
            message.contains(expected),
            "{key}: {message:?} lacks {expected:?}"
        );
        let stalled = condition(view, "Stalled").expect("a Stalled condition");
        assert_eq!(stalled["status"], true, "{key} is terminal: {view}");
        // The summary table names the failure too.
        assert!(run.stdout.contains(&key), "{}", run.stdout);
    }
    let qemus: Vec<_> = processes_mentioning(fleet.root())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .collect();
    assert!(qemus.is_empty(), "nothing started: {qemus:?}");
    drop(taken);
}
