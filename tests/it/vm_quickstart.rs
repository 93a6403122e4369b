//! The quickstart, for real: `examples/quickstart` (a local machine, a
//! service and a QEMU VM) converges with `reconcile --once`, and the VM stops
//! when its spec says stopped.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::support::{Fleet, processes_mentioning, ready_of};
use crate::support::Converge as _;

/// Kills the VM's QEMU by its pidfile, if it is still that QEMU, on drop.
pub struct QemuGuard {
    pub pidfile: PathBuf,
}

impl QemuGuard {
    pub fn pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive_with(pid, &self.pidfile).then_some(pid)
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Whether `pid` is a live process whose command line names `pidfile`.
pub fn alive_with(pid: u32, pidfile: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains(pidfile.to_string_lossy().as_ref())
}

pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    assert!(
        found,
        "{tool} is not installed: this test runs a real VM. Run scripts/setup (as root) to install QEMU."
    );
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

#[test]
fn quickstart_converges_with_a_running_vm_that_stops_when_its_spec_says_stopped() {
    require("qemu-system-x86_64");
    require("qemu-img");
    let fleet = Fleet::new();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart");
    let quickstart_state = fleet.path("quickstart");
    let port = free_port();
    let mut vm_yaml = String::new();
    for entry in std::fs::read_dir(&example).expect("examples/quickstart") {
        let path = entry.expect("an entry").path();
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("read an example file");
        let text = text.replace(
            "/tmp/converge-quickstart",
            quickstart_state.to_str().expect("utf-8"),
        );
        let text = if name == "vm.yaml" {
            assert!(
                text.contains("host: 22022"),
                "the example forwards 22022: {text}"
            );
            vm_yaml = text.replace("host: 22022", &format!("host: {port}"));
            vm_yaml.clone()
        } else {
            text
        };
        if name.ends_with(".sh") {
            fleet.write_executable(&name, &text);
        } else {
            fleet.write(&name, &text);
        }
    }
    let guard = QemuGuard {
        pidfile: fleet.state().join("vms/sandbox/qemu.pid"),
    };

    let plan = fleet.plan_json();
    let planned = super::support::planned_steps(&plan);
    let keys: Vec<&str> = planned.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["machine/web", "service/hello", "vm/sandbox"],
        "{plan}"
    );
    let run = fleet.reconcile_once(&["--timeout", "90s"]);
    run.assert_code(0);
    // The plan is what ran: each object's attempt recorded exactly its steps.
    fleet.assert_history_matches(&plan);
    let statuses = fleet.statuses();
    let vm = statuses
        .iter()
        .find(|s| s["key"] == "vm/sandbox")
        .unwrap_or_else(|| panic!("no vm/sandbox in {statuses:?}"));
    assert_eq!(ready_of(vm), (true, "Running".to_owned()), "{vm}");
    for key in ["machine/web", "service/hello"] {
        let status = statuses
            .iter()
            .find(|s| s["key"] == key)
            .unwrap_or_else(|| panic!("no {key} in {statuses:?}"));
        assert!(ready_of(status).0, "{status}");
    }
    let pid = guard
        .pid()
        .expect("the VM's QEMU runs, named by its pidfile");

    // Clean up through converge itself.
    assert!(vm_yaml.contains("state: running"));
    fleet.write(
        "vm.yaml",
        &vm_yaml.replace("state: running", "state: stopped"),
    );
    let plan = fleet.plan_json();
    assert_eq!(
        super::support::planned_steps(&plan)["vm/sandbox"],
        ["stop-vm"],
        "{plan}"
    );
    fleet.reconcile_once(&["--timeout", "90s"]).assert_code(0);
    fleet.assert_history_matches(&plan);
    assert!(
        !alive_with(pid, &guard.pidfile),
        "QEMU (pid {pid}) is gone after state: stopped"
    );
    let qemus: Vec<_> = processes_mentioning(fleet.root())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .collect();
    assert!(qemus.is_empty(), "no QEMU of this test is left: {qemus:?}");
}
