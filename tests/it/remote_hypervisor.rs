//! A VM on a hypervisor Machine (`host: host0`), end to end: converge
//! reaches the testbed host over SSH, installs its agent there, uploads the
//! backing image the spec names, and runs QEMU in that host's namespaces.
//! The VM restarts when its memory changes, comes back after a kill -9, and
//! is deleted with its disks when removed from the YAML.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::Converge as _;
use crate::support::ssh::{SshFleet, ready_of};

const RUN_LIMIT: Duration = Duration::from_secs(180);

fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    assert!(
        found,
        "{tool} is not installed: this test runs a real VM. Run scripts/setup (as root) to install QEMU."
    );
}

fn vm_yaml(memory: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: VirtualMachine
metadata: {{name: rvm}}
spec:
  host: host0
  cpus: 1
  memory: {memory}
  disks: [{{name: root, size: 64MiB, backingImage: images/base.qcow2}}]
  network: {{mode: user, forwards: [{{host: 2222, guest: 22}}]}}
  onDelete: delete
  stopTimeout: 1s
"
    )
}

/// The pid in `pidfile` when it is a live QEMU started with that pidfile.
fn live_qemu(pidfile: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (!zombie && cmdline.contains("qemu.pid")).then_some(pid)
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn memory_arg(pid: u32) -> Option<String> {
    let argv = cmdline(pid);
    argv.iter()
        .position(|a| a == "-m")
        .and_then(|i| argv.get(i + 1).cloned())
}

fn net_ns(pid: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("read a network namespace link")
}

/// Kills the VM's QEMU if a failed assertion left it running.
struct Guard(PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(pid) = live_qemu(&self.0) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn vm_facts(fleet: &SshFleet) -> Value {
    let state = fleet.state();
    let run = fleet.converge_within(
        &[
            "facts",
            "vm/rvm",
            "--output",
            "json",
            "--state",
            state.to_str().expect("utf-8"),
        ],
        RUN_LIMIT,
    );
    run.assert_code(0);
    run.json()
}

#[test]
fn a_vm_on_a_hypervisor_machine_runs_there_restarts_on_change_and_kill_and_is_deleted() {
    require("qemu-system-x86_64");
    require("qemu-img");
    // host1 only keeps the directory from becoming empty in step 6 (an
    // empty directory is never applied).
    let fleet = crate::support::ssh::fleet(2);
    fleet.write_all(2, &["v1"], "");
    let images = fleet.dir().join("images");
    std::fs::create_dir_all(&images).expect("create images/");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(images.join("base.qcow2"))
        .arg("32M")
        .status()
        .expect("run qemu-img");
    assert!(made.success(), "qemu-img create failed");
    std::fs::write(fleet.dir().join("vm.yaml"), vm_yaml("64MiB")).expect("write vm.yaml");
    // Two more VMs on the same backing image, declared at once with rvm.
    let more = ["rvm-b", "rvm-c"].map(|name| {
        vm_yaml("64MiB")
            .replace("name: rvm}", &format!("name: {name}}}"))
            .replace(", forwards: [{host: 2222, guest: 22}]", "")
    });
    std::fs::write(fleet.dir().join("more.yaml"), more.join("---\n")).expect("write more.yaml");

    let hyper = fleet.host_state(0);
    let vm_dir = hyper.join("vms/rvm");
    let pidfile = vm_dir.join("qemu.pid");
    let _guard = Guard(pidfile.clone());
    let more_pidfiles = ["rvm-b", "rvm-c"].map(|n| hyper.join(format!("vms/{n}/qemu.pid")));
    let _more_guards = more_pidfiles.clone().map(Guard);

    // 1. Declared, then running on host0: in its network namespace, with its
    // directory under host0's stateDir, and the backing image uploaded there.
    let first = fleet.reconcile_within(&[], RUN_LIMIT);
    first.assert_code(0);
    assert!(
        first.stderr.contains("uploading converge's agent"),
        "the first run installs the agent:\n{}",
        first.stderr
    );
    let pid = live_qemu(&pidfile)
        .unwrap_or_else(|| panic!("no QEMU runs from {}:\n{}", pidfile.display(), first.stderr));
    for more in &more_pidfiles {
        assert!(
            live_qemu(more).is_some(),
            "no QEMU runs from {}",
            more.display()
        );
    }
    assert_eq!(
        first
            .stderr
            .matches("uploading a file the VM spec names")
            .count(),
        1,
        "three VMs on one new backing image upload it once:\n{}",
        first.stderr
    );
    let sshd_pid = std::fs::read_to_string(fleet.testbed.host(0).dir().join("sshd.pid"))
        .expect("read sshd.pid");
    assert_eq!(
        net_ns(&pid.to_string()),
        net_ns(sshd_pid.trim()),
        "QEMU runs in host0's network namespace"
    );
    assert_ne!(net_ns(&pid.to_string()), net_ns("self"));
    assert_eq!(memory_arg(pid).as_deref(), Some("64"));
    let agents: Vec<_> = std::fs::read_dir(hyper.join("agent"))
        .expect("host0 has an agent directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(agents.len(), 1, "one agent: {agents:?}");
    assert!(agents[0].starts_with("converge-"), "{agents:?}");
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output", "json"])
        .arg(vm_dir.join("disks/root.qcow2"))
        .output()
        .expect("run qemu-img info");
    let info: Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    let backing = info["backing-filename"].as_str().unwrap_or_default();
    assert!(
        backing.starts_with("/var/lib/converge/vm-files/") && backing.ends_with("-base.qcow2"),
        "the disk is backed by the uploaded image, seen from host0: {info}"
    );
    let listening = fleet
        .testbed
        .host(0)
        .exec(&["ss", "-Hltn", "sport = :2222"]);
    assert!(
        listening.contains(":2222"),
        "the forward listens in host0's namespace: {listening:?}"
    );
    let facts = vm_facts(&fleet);
    assert_eq!(facts["facts"]["running"], true, "{facts}");
    assert_eq!(facts["facts"]["qmpStatus"], "running", "{facts}");
    assert_eq!(facts["facts"]["pid"], pid, "{facts}");
    let (ready, reason, message) = ready_of(&fleet.status("vm/rvm"));
    assert!(ready, "vm/rvm is not Ready: {reason}: {message}");

    // 2. A second run changes nothing and uploads nothing.
    let second = fleet.reconcile_within(&[], RUN_LIMIT);
    second.assert_code(0);
    assert_eq!(
        live_qemu(&pidfile),
        Some(pid),
        "a no-op run restarted the VM"
    );
    assert!(
        !second.stderr.contains("uploading"),
        "a second run uploads nothing:\n{}",
        second.stderr
    );

    // Operator verbs reach the VM on host0 too (here without a daemon).
    let verb = |args: &[&str]| {
        let state = fleet.state();
        let dir = fleet.dir();
        let ssh_config = fleet.ssh_config();
        let mut all: Vec<&str> = vec!["vm"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--state",
            state.to_str().expect("utf-8"),
            "--dir",
            dir.to_str().expect("utf-8"),
            "--ssh-config",
            ssh_config.to_str().expect("utf-8"),
        ]);
        fleet.converge_within(&all, RUN_LIMIT)
    };
    let taken = verb(&["snapshot", "rvm", "s1"]);
    taken.assert_code(0);
    assert!(
        taken
            .stdout
            .contains("snapshot s1 taken: disks, RAM and devices (running)"),
        "{}",
        taken.stdout
    );
    let listed = verb(&["snapshots", "rvm", "--output", "json"]);
    listed.assert_code(0);
    let listed = listed.json();
    assert_eq!(listed["snapshots"][0]["name"], "s1", "{listed}");
    assert_eq!(listed["snapshots"][0]["withRam"], true, "{listed}");
    verb(&["revert", "rvm", "s1"]).assert_code(0);
    assert_eq!(live_qemu(&pidfile), Some(pid), "a revert keeps the process");
    let state = fleet.state();
    let console = fleet.converge_within(
        &[
            "vm",
            "console",
            "rvm",
            "--log",
            "--state",
            state.to_str().expect("utf-8"),
        ],
        RUN_LIMIT,
    );
    console.assert_code(1);
    assert!(
        console.stderr.contains("runs on hypervisor machine host0"),
        "{}",
        console.stderr
    );

    // 3. Memory changed: `plan` (observing through the agent) says it
    // forces a restart and changes nothing; the next run restarts the VM
    // with the new size.
    let plan = |fleet: &SshFleet| {
        let (dir, state, ssh_config) = (fleet.dir(), fleet.state(), fleet.ssh_config());
        fleet.converge_within(
            &[
                "plan",
                "--detailed-exitcode",
                "--dir",
                dir.to_str().expect("utf-8"),
                "--state",
                state.to_str().expect("utf-8"),
                "--ssh-config",
                ssh_config.to_str().expect("utf-8"),
            ],
            RUN_LIMIT,
        )
    };
    plan(&fleet).assert_code(0);
    std::fs::write(fleet.dir().join("vm.yaml"), vm_yaml("96MiB")).expect("write vm.yaml");
    let planned = plan(&fleet);
    planned.assert_code(2);
    assert!(
        planned
            .stdout
            .contains(r#"spec.memory: "64MiB" -> "96MiB"  # forces restart"#),
        "{}",
        planned.stdout
    );
    assert_eq!(live_qemu(&pidfile), Some(pid), "plan restarted the VM");
    fleet.reconcile_within(&[], RUN_LIMIT).assert_code(0);
    let resized = live_qemu(&pidfile).expect("the VM runs after the memory change");
    assert_ne!(resized, pid, "the VM was restarted");
    assert_eq!(memory_arg(resized).as_deref(), Some("96"));

    // 4. Killed from outside: drift, and started again; the agent, removed
    // from host0 meanwhile, is uploaded again.
    std::fs::remove_dir_all(hyper.join("agent")).expect("remove host0's agent");
    let killed = Command::new("kill")
        .args(["-KILL", &resized.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    crate::support::ssh::wait_for(
        "the killed QEMU to be gone",
        Duration::from_secs(10),
        || live_qemu(&pidfile).is_none().then_some(()),
    );
    let after_kill = fleet.reconcile_within(&[], RUN_LIMIT);
    after_kill.assert_code(0);
    assert!(
        after_kill.stderr.contains("drift detected") && after_kill.stderr.contains("restart"),
        "the dead VM is reported as drift:\n{}",
        after_kill.stderr
    );
    assert!(
        after_kill.stderr.contains("uploading converge's agent"),
        "a removed agent is uploaded again:\n{}",
        after_kill.stderr
    );
    let restarted = live_qemu(&pidfile).expect("the VM runs again after kill -9");
    assert_ne!(restarted, resized);

    // 5. Its host changed to `local`: refused (converge does not move VMs),
    // the VM on host0 untouched, nothing started here.
    let local_vm = fleet.state().join("vms/rvm");
    std::fs::write(
        fleet.dir().join("vm.yaml"),
        vm_yaml("96MiB").replace("host: host0", "host: local"),
    )
    .expect("write vm.yaml");
    let planned = plan(&fleet);
    planned.assert_code(2);
    assert!(
        planned.stdout.contains("-/+ vm/rvm")
            && planned.stdout.contains("converge does not move VMs"),
        "{}",
        planned.stdout
    );
    let moved = fleet.reconcile_within(&["--attempts", "1"], RUN_LIMIT);
    moved.assert_code(3);
    let (ready, reason, message) = ready_of(&fleet.status("vm/rvm"));
    assert!(!ready);
    assert_eq!(reason, "HostChanged", "{message}");
    assert!(message.contains("hypervisor machine host0"), "{message}");
    assert_eq!(
        live_qemu(&pidfile),
        Some(restarted),
        "the VM on host0 was touched"
    );
    assert!(!local_vm.exists(), "a VM directory appeared on this host");

    // 6. The hypervisor Machine removed together with its VMs (onDelete:
    // delete): they are stopped and deleted on host0 all the same, reached
    // at the target they were last seen at.
    for file in ["vm.yaml", "more.yaml", "host0.yaml"] {
        std::fs::remove_file(fleet.dir().join(file)).expect("remove a file");
    }
    let removed = fleet.reconcile_within(&[], RUN_LIMIT);
    removed.assert_code(0);
    assert!(
        live_qemu(&pidfile).is_none(),
        "the removed VM still runs:\n{}\n{}",
        removed.stdout,
        removed.stderr
    );
    for more in &more_pidfiles {
        assert!(live_qemu(more).is_none(), "{} still runs", more.display());
    }
    for name in ["rvm", "rvm-b", "rvm-c"] {
        assert!(
            !hyper.join("vms").join(name).exists(),
            "{name}'s directory (with its disks) is still on host0"
        );
    }
    fleet.write_machine(0, &fleet.machine(0, &["v1"], ""));

    // 7. A backing image missing from the desired-state directory: a clear
    // terminal error, nothing uploaded or started.
    std::fs::write(
        fleet.dir().join("vm.yaml"),
        vm_yaml("64MiB").replace("images/base.qcow2", "images/missing.qcow2"),
    )
    .expect("write vm.yaml");
    fleet
        .reconcile_within(&["--attempts", "1"], RUN_LIMIT)
        .assert_code(3);
    let (ready, reason, message) = ready_of(&fleet.status("vm/rvm"));
    assert!(!ready);
    assert!(
        message.contains("backing image") && message.contains("missing.qcow2"),
        "{reason}: {message}"
    );
    assert!(
        live_qemu(&pidfile).is_none(),
        "a VM started without its disk"
    );
    fleet.finish();
}
