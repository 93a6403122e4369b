//! The peers and floors `bench-fleet` runs beside converge on the same
//! hosts, doing the same work (a directory, a 1 KB payload and an activate
//! script run when changed): pyinfra (`--parallel N`), ansible-playbook,
//! and the two `xargs -P N ssh` floors (a fresh connection per host; over
//! warm ControlMasters). Each returns its wall times; each panics when the
//! tool failed or did not do the work.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::REMOTE_STATE_DIR;
use testbed::fleet::SshFleet as Fleet;

/// Builds the artifact the peers install (the fleet's own build, variant v1).
fn artifact(fleet: &Fleet, dir: &Path) -> PathBuf {
    let artifact = dir.join("artifact");
    fs::create_dir_all(&artifact).expect("mkdir");
    let status = Command::new(fleet.dir().join("build.sh"))
        .arg("v1")
        .env("CONVERGE_MACHINE", "peer")
        .env("CONVERGE_OUT", &artifact)
        .status()
        .expect("run build.sh");
    assert!(status.success());
    artifact
}

fn known_hosts(fleet: &Fleet, n: usize, path: &Path) {
    let mut text = String::new();
    for i in 0..n {
        let host = fleet.testbed.host(i);
        text.push_str(&format!("{} {}\n", host.address, host.host_key));
    }
    fs::write(path, text).expect("write known_hosts");
}

/// Runs `command` to its end; panics with its output unless it succeeded.
fn timed(what: &str, command: &mut Command) -> Duration {
    let started = Instant::now();
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

/// Asserts that every host's ledger under `sub` has exactly one activation.
fn activated_once(fleet: &Fleet, n: usize, sub: &str) {
    for i in 0..n {
        let ledger = fleet.host_state(i).join(sub).join("ledger");
        let lines = fs::read_to_string(&ledger).unwrap_or_default();
        assert_eq!(lines.lines().count(), 1, "{sub} on host{i}: {lines:?}");
    }
}

const FLOOR_WORK: &str = "mkdir -p @D@ && printf %1024s > @D@/payload";

/// The `xargs -P N ssh` floors: one command per host doing a directory and
/// a 1 KB payload, first each over a fresh connection (cold), then over
/// masters opened beforehand (warm).
pub fn floors(fleet: &Fleet, n: usize) -> (Duration, Duration) {
    let dir = fleet.root().join("floor");
    fs::create_dir_all(&dir).expect("mkdir");
    known_hosts(fleet, n, &dir.join("known_hosts"));
    let addresses: String = (0..n)
        .map(|i| format!("{}\n", fleet.testbed.host(i).address))
        .collect();
    fs::write(dir.join("hosts"), addresses).expect("write hosts");
    let control = fleet.testbed.dir().join("f");
    fs::create_dir_all(&control).expect("mkdir");
    let key = fleet.testbed.client(0).identity_file;
    let ssh = |master: &str| {
        format!(
            "ssh -n -F {cfg} -i {key} -o BatchMode=yes -o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes {master} -l root",
            cfg = fleet.ssh_config().display(),
            key = key.display(),
            kh = dir.join("known_hosts").display(),
        )
    };
    let work = FLOOR_WORK.replace("@D@", &format!("{REMOTE_STATE_DIR}/floor"));
    let xargs = |ssh: String| {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!(
            "xargs -P {n} -I@ {ssh} @ '{work}' < {hosts}",
            hosts = dir.join("hosts").display()
        ));
        command
    };
    let cold = timed(
        "the cold floor",
        &mut xargs(ssh("-o ControlMaster=no -o ControlPath=none")),
    );
    let warm_opts = format!(
        "-o ControlMaster=auto -o ControlPersist=60 -o ControlPath={}/%C",
        control.display()
    );
    // Open the masters, then measure commands over them.
    timed("opening masters", &mut xargs(ssh(&warm_opts)));
    let warm = timed("the warm floor", &mut xargs(ssh(&warm_opts)));
    let mut close = Command::new("sh");
    close.arg("-c").arg(format!(
        "xargs -P {n} -I@ {ssh} -O exit @ < {hosts} 2>/dev/null; true",
        ssh = ssh(&warm_opts),
        hosts = dir.join("hosts").display()
    ));
    timed("closing masters", &mut close);
    (cold, warm)
}

const DEPLOY: &str = r#"from pyinfra.operations import files, server
from pyinfra.operations.util import any_changed

d = "@STATE@/pyinfra"
files.directory(name="state dir", path=d + "/artifact", mode="700")
payload = files.put(name="payload", src="@ARTIFACT@/payload", dest=d + "/artifact/payload", mode="600")
variant = files.put(name="variant", src="@ARTIFACT@/variant", dest=d + "/artifact/variant", mode="600")
activate = files.put(name="activate script", src="@ARTIFACT@/activate", dest=d + "/artifact/activate", mode="700")
server.shell(
    name="activate",
    commands=["cd " + d + " && CONVERGE_STATE_DIR=" + d + " CONVERGE_GENERATION=pyinfra ./artifact/activate switch"],
    _if=any_changed(payload, variant, activate),
)
"#;

/// pyinfra (`--parallel n`, paramiko, strict host keys): first and no-op run.
pub fn pyinfra(fleet: &Fleet, n: usize, bin: &str) -> (Duration, Duration) {
    let dir = fleet.root().join("pyinfra");
    fs::create_dir_all(&dir).expect("mkdir");
    let artifact = artifact(fleet, &dir);
    known_hosts(fleet, n, &dir.join("known_hosts"));
    let key = fleet.testbed.client(0).identity_file;
    let mut inventory = String::from("hosts = [\n");
    for i in 0..n {
        inventory.push_str(&format!(
            "    ({:?}, {{\"ssh_user\": \"root\", \"ssh_key\": {:?}, \"ssh_known_hosts_file\": {:?}, \"ssh_strict_host_key_checking\": \"yes\", \"ssh_config_file\": {:?}}}),\n",
            fleet.testbed.host(i).address,
            key.display().to_string(),
            dir.join("known_hosts").display().to_string(),
            fleet.ssh_config().display().to_string(),
        ));
    }
    inventory.push_str("]\n");
    fs::write(dir.join("inventory.py"), inventory).expect("write inventory");
    fs::write(
        dir.join("deploy.py"),
        DEPLOY
            .replace("@ARTIFACT@", artifact.to_str().expect("utf-8"))
            .replace("@STATE@", REMOTE_STATE_DIR),
    )
    .expect("write deploy.py");
    let run = || {
        timed(
            "pyinfra",
            Command::new(bin)
                .args([
                    "-y",
                    "--parallel",
                    &n.to_string(),
                    "inventory.py",
                    "deploy.py",
                ])
                .current_dir(&dir),
        )
    };
    let first = run();
    let noop = run();
    activated_once(fleet, n, "pyinfra");
    (first, noop)
}

const PLAYBOOK: &str = r#"- hosts: all
  gather_facts: false
  tasks:
    - name: upload the artifact
      copy: {src: "@ARTIFACT@/", dest: "@STATE@/ansible/artifact/", mode: preserve}
      register: artifact
    - name: activate it
      shell: "./artifact/activate switch"
      args: {chdir: "@STATE@/ansible"}
      environment: {CONVERGE_STATE_DIR: "@STATE@/ansible", CONVERGE_GENERATION: ansible}
      when: artifact.changed
"#;

/// ansible-playbook (forks n, no fact gathering, strict host keys,
/// ControlPersist): first and no-op run.
pub fn ansible(fleet: &Fleet, n: usize, bin: &str) -> (Duration, Duration) {
    let dir = fleet.root().join("ansible");
    fs::create_dir_all(dir.join("tmp")).expect("mkdir");
    let artifact = artifact(fleet, &dir);
    known_hosts(fleet, n, &dir.join("known_hosts"));
    let key = fleet.testbed.client(0).identity_file;
    let mut inventory = String::from("[all]\n");
    for i in 0..n {
        inventory.push_str(&format!(
            "host{i} ansible_host={} ansible_user=root ansible_ssh_private_key_file={} ansible_python_interpreter=/usr/bin/python3\n",
            fleet.testbed.host(i).address,
            key.display()
        ));
    }
    fs::write(dir.join("inventory.ini"), inventory).expect("write inventory");
    fs::write(
        dir.join("ansible.cfg"),
        format!(
            "[defaults]\nhost_key_checking = True\nforks = {n}\ngathering = explicit\n\n[ssh_connection]\nssh_args = -F {cfg} -o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes -o ControlMaster=auto -o ControlPersist=60s\ncontrol_path_dir = {cp}\n",
            cfg = fleet.ssh_config().display(),
            kh = dir.join("known_hosts").display(),
            cp = fleet.testbed.dir().join("a").display(),
        ),
    )
    .expect("write ansible.cfg");
    fs::write(
        dir.join("site.yml"),
        PLAYBOOK
            .replace("@ARTIFACT@", artifact.to_str().expect("utf-8"))
            .replace("@STATE@", REMOTE_STATE_DIR),
    )
    .expect("write playbook");
    let run = || {
        timed(
            "ansible-playbook",
            Command::new(bin)
                .args(["-i", "inventory.ini", "-f", &n.to_string(), "site.yml"])
                .current_dir(&dir)
                .env("ANSIBLE_CONFIG", dir.join("ansible.cfg"))
                .env("ANSIBLE_LOCAL_TEMP", dir.join("tmp")),
        )
    };
    let first = run();
    let noop = run();
    activated_once(fleet, n, "ansible");
    (first, noop)
}
