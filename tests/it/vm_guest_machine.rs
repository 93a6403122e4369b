//! The end-to-end proof for VMs: a tiny guest (a Debian kernel, a busybox
//! initramfs with dropbear, built offline by `scripts/guest-image`) boots in
//! a real QEMU that converge starts, and the Machine living inside it
//! (`machine:`) converges over SSH through the VM's host forward: build,
//! upload, activate, health check, in one `reconcile --once`. Takes tens of
//! seconds under TCG.

use std::path::PathBuf;
use std::process::Command;

use super::support::{Fleet, ready_of};
use super::vm_quickstart::{QemuGuard, free_port, require};
use crate::support::Converge as _;

/// The guest image, built once per checkout into `target/guest-image`.
struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
    client_key: PathBuf,
    host_key: String,
}

fn image() -> Image {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/guest-image");
    let status = Command::new(root.join("scripts/guest-image"))
        .arg(&out)
        .status()
        .expect("run scripts/guest-image");
    assert!(
        status.success(),
        "scripts/guest-image failed (it needs root and apt)"
    );
    Image {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
        client_key: out.join("client_key"),
        host_key: std::fs::read_to_string(out.join("host_key.pub"))
            .expect("host_key.pub")
            .trim()
            .to_owned(),
    }
}

const BUILD: &str = r#"#!/bin/sh
# The inner machine's build: an activate that records the generation and
# what the roles document says, and a health check script.
set -eu
cat > "$CONVERGE_OUT/activate" <<'SH'
#!/bin/sh
set -eu
echo "$CONVERGE_GENERATION" >> "$CONVERGE_STATE_DIR/activated"
hostname > "$CONVERGE_STATE_DIR/activated-on"
SH
chmod +x "$CONVERGE_OUT/activate"
"#;

#[test]
fn a_machine_inside_a_tiny_guest_converges_over_ssh_through_the_forward() {
    require("qemu-system-x86_64");
    require("qemu-img");
    let image = image();
    let fleet = Fleet::new();
    let port = free_port();
    let ssh_config = fleet.path("ssh_config");
    std::fs::write(&ssh_config, "").expect("write an empty ssh_config");
    fleet.write_executable("build.sh", BUILD);
    fleet.write(
        "tiny.yaml",
        &format!(
            "apiVersion: converge/v1
kind: VirtualMachine
metadata: {{name: tiny}}
spec:
  host: local
  state: running
  cpus: 1
  memory: 256MiB
  disks: [{{name: scratch, size: 64MiB}}]
  network: {{mode: user, forwards: [{{host: {port}, guest: 22}}]}}
  boot: {{kernel: {kernel}, initrd: {initrd}, append: \"console=ttyS0 quiet panic=-1\"}}
  extraArgs: [\"-device\", \"virtio-rng-pci\"]
  machine: inside
  onDelete: delete
---
apiVersion: converge/v1
kind: Machine
metadata: {{name: inside}}
spec:
  target: {{host: 127.0.0.1, port: {port}, user: root, hostKey: \"{host_key}\", identityFile: {key}, stateDir: /var/lib/converge}}
  build: {{command: [./build.sh]}}
  activation:
    mode: switch
    healthChecks: [{{exec: [test, -s, /var/lib/converge/activated], timeout: 10s}}]
",
            kernel = image.kernel.display(),
            initrd = image.initrd.display(),
            host_key = image.host_key,
            key = image.client_key.display(),
        ),
    );
    let guard = QemuGuard {
        pidfile: fleet.state().join("vms/tiny/qemu.pid"),
    };
    let ssh_config = ssh_config.to_str().expect("utf-8").to_owned();
    let run = fleet.reconcile_once(&["--timeout", "4m", "--ssh-config", &ssh_config]);
    run.assert_code(0);
    let pid = guard.pid().expect("the guest's QEMU runs");
    let statuses = fleet.statuses();
    for key in ["vm/tiny", "machine/inside"] {
        let view = statuses
            .iter()
            .find(|s| s["key"] == key)
            .unwrap_or_else(|| panic!("no {key} in {statuses:?}"));
        assert!(ready_of(view).0, "{key} is not Ready: {view}");
    }
    // What converge observed is the guest, not the controller's host.
    let facts = fleet.converge(&[
        "facts",
        "machine/inside",
        "--output",
        "json",
        "--state",
        fleet.state().to_str().expect("utf-8"),
    ]);
    facts.assert_code(0);
    let facts = facts.json();
    assert_eq!(
        facts["facts"]["hostname"], "guest",
        "facts of the inner machine: {facts}"
    );
    // The activation ran inside the guest: ask its shell on the serial
    // console (`vm console` with stdin from a pipe).
    let console = Command::new(env!("CARGO_BIN_EXE_converge"))
        .args(["vm", "console", "tiny", "--quiet-for", "3s", "--state"])
        .arg(fleet.state())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(b"\necho marker-$(cat /var/lib/converge/activated-on)\n")?;
            }
            child.wait_with_output()
        })
        .expect("run vm console");
    let seen = String::from_utf8_lossy(&console.stdout).into_owned();
    assert!(console.status.success(), "vm console failed: {seen}");
    assert!(
        seen.contains("marker-guest"),
        "the guest's shell answered on its serial console: {seen:?}"
    );
    let log = fleet.converge(&[
        "vm",
        "console",
        "tiny",
        "--log",
        "--state",
        fleet.state().to_str().expect("utf-8"),
    ]);
    log.assert_code(0);
    assert!(
        log.stdout.contains("marker-guest"),
        "serial.log keeps the session"
    );

    // A second run changes nothing: no new generation.
    let again = fleet.reconcile_once(&["--timeout", "2m", "--ssh-config", &ssh_config]);
    again.assert_code(0);
    let history = fleet.history("machine/inside");
    let activations = history
        .iter()
        .filter(|a| a["generation"].as_u64().is_some())
        .count();
    assert_eq!(activations, 1, "{history:?}");
    assert_eq!(guard.pid(), Some(pid), "the VM was not restarted");

    // Stop everything through converge; onDelete: delete removes the disks.
    fleet.write("tiny.yaml", "");
    fleet.write(
        "spare.yaml",
        "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {name: spare}\nspec:\n  host: local\n  state: stopped\n  cpus: 1\n  memory: 64MiB\n  disks: [{name: d, size: 16MiB}]\n  network: {mode: user}\n",
    );
    fleet
        .reconcile_once(&["--timeout", "2m", "--ssh-config", &ssh_config])
        .assert_code(0);
    assert_eq!(guard.pid(), None, "the guest's QEMU stopped");
}
