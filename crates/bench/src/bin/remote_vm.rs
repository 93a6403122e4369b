//! `scripts/bench-fleet` also runs this: ten idle VMs on one hypervisor
//! Machine (a testbed host reached over SSH). Prints the first converge (it
//! installs the agent), each VM's start step and QMP-ready time, a no-op
//! run, and a killed VM back to running. Runs the converge binary
//! `CONVERGE_BIN` names (the script builds it in release).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use testbed::fleet::SshFleet as Fleet;
use testbed::run::Converge as _;

const VMS: usize = 10;
const LIMIT: Duration = Duration::from_secs(300);

fn vm_yaml(i: usize) -> String {
    format!(
        "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {{name: rvm{i}}}\nspec:\n  host: host0\n  memory: 64MiB\n  disks: [{{name: root, size: 64MiB}}]\n  network: {{mode: user}}\n  onDelete: delete\n  stopTimeout: 1s\n"
    )
}

/// The newest attempt's `start` step of `vm/NAME`: (duration ms, output).
fn start_step(fleet: &Fleet, name: &str) -> (u64, String) {
    let history = fleet.history(&format!("vm/{name}"));
    let steps = history
        .first()
        .and_then(|a| a["steps"].as_array().cloned())
        .unwrap_or_default();
    let start: &Value = steps
        .iter()
        .find(|s| s["name"] == "start-vm")
        .unwrap_or_else(|| panic!("vm/{name} has no start step: {history:?}"));
    (
        start["duration_ms"].as_u64().unwrap_or(0),
        start["output"].as_str().unwrap_or("").to_owned(),
    )
}

/// "QMP ready after N ms" → N.
fn qmp_ready_ms(output: &str) -> u64 {
    output
        .rsplit_once("QMP ready after ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no QMP-ready time in {output:?}"))
}

fn median(mut xs: Vec<u64>) -> u64 {
    xs.sort_unstable();
    xs[xs.len() / 2]
}

fn main() {
    let bin =
        std::env::var("CONVERGE_BIN").unwrap_or_else(|_| "target/release/converge".to_owned());
    let fleet = Fleet::new(&bin, 1);
    fleet.write_all(1, &["v1"], "");
    for i in 0..VMS {
        std::fs::write(fleet.dir().join(format!("rvm{i}.yaml")), vm_yaml(i)).expect("write");
    }
    let exe = std::fs::metadata(&bin).map_or(0, |m| m.len());

    let first = fleet.reconcile_within(&[], LIMIT);
    first.assert_code(0);
    let steps: Vec<(u64, String)> = (0..VMS)
        .map(|i| start_step(&fleet, &format!("rvm{i}")))
        .collect();
    let start_ms: Vec<u64> = steps.iter().map(|s| s.0).collect();
    let ready_ms: Vec<u64> = steps.iter().map(|s| qmp_ready_ms(&s.1)).collect();

    let noop = fleet.reconcile_within(&[], LIMIT);
    noop.assert_code(0);
    let noop_again = fleet.reconcile_within(&[], LIMIT);
    noop_again.assert_code(0);

    let pidfile = fleet.host_state(0).join("vms/rvm0/qemu.pid");
    let pid = std::fs::read_to_string(&pidfile).expect("rvm0's pidfile");
    let killed = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(200));
    let back = fleet.reconcile_within(&[], LIMIT);
    back.assert_code(0);
    let (back_start, back_output) = start_step(&fleet, "rvm0");

    println!();
    println!("ten idle VMs on one hypervisor Machine over SSH (converge binary {exe} bytes)");
    println!(
        "first reconcile --once (agent upload, 10 disks, 10 starts): {:.2} s",
        first.elapsed.as_secs_f64()
    );
    println!(
        "start step per VM (agent over SSH, QEMU, QMP): median {} ms, max {} ms",
        median(start_ms.clone()),
        start_ms.iter().max().copied().unwrap_or(0)
    );
    println!(
        "spec to QMP ready on the hypervisor: median {} ms, max {} ms",
        median(ready_ms.clone()),
        ready_ms.iter().max().copied().unwrap_or(0)
    );
    println!(
        "no-op reconcile --once (observe 10 VMs + the machine): {:.2} s, {:.2} s",
        noop.elapsed.as_secs_f64(),
        noop_again.elapsed.as_secs_f64()
    );
    println!(
        "killed VM back to running: reconcile --once {:.2} s; its start step {} ms (QMP ready {} ms)",
        back.elapsed.as_secs_f64(),
        back_start,
        qmp_ready_ms(&back_output)
    );
    for i in 0..VMS {
        std::fs::remove_file(fleet.dir().join(format!("rvm{i}.yaml"))).expect("remove");
    }
    fleet.reconcile_within(&[], LIMIT).assert_code(0);
    fleet.finish();
}
