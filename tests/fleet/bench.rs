//! `scripts/bench-fleet`: converge against Ansible on 20 testbed hosts.
//! Ignored by default: `cargo test --release --test fleet -- --ignored
//! --nocapture bench_`. Ansible runs when `ANSIBLE_PLAYBOOK` names an
//! `ansible-playbook` executable (the script installs ansible-core into a
//! virtualenv); otherwise only converge is measured.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::support::Fleet;
use crate::testbed::REMOTE_STATE_DIR;

const N: usize = 20;

const PLAYBOOK: &str = r#"- hosts: all
  gather_facts: false
  tasks:
    - name: upload the artifact
      copy: {src: "@ARTIFACT@/", dest: "@STATE@/ansible/artifact/", mode: preserve}
    - name: activate it
      shell: "./artifact/activate switch && touch .activated"
      args: {chdir: "@STATE@/ansible", creates: "@STATE@/ansible/.activated"}
      environment: {CONVERGE_STATE_DIR: "@STATE@/ansible", CONVERGE_GENERATION: ansible}
"#;

/// Runs one `ansible-playbook`, returning its wall time; panics on failure.
fn ansible_run(playbook_bin: &str, dir: &Path) -> Duration {
    let started = Instant::now();
    let output = Command::new(playbook_bin)
        .args(["-i", "inventory.ini", "-f", "20", "site.yml"])
        .current_dir(dir)
        .env("ANSIBLE_CONFIG", dir.join("ansible.cfg"))
        .env("ANSIBLE_LOCAL_TEMP", dir.join("tmp"))
        .stdin(Stdio::null())
        .output()
        .expect("run ansible-playbook");
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "ansible-playbook failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

fn ansible(fleet: &Fleet, playbook_bin: &str) -> (Duration, Duration) {
    let dir = fleet.root().join("ansible");
    let artifact = dir.join("artifact");
    fs::create_dir_all(&artifact).expect("mkdir");
    fs::create_dir_all(dir.join("tmp")).expect("mkdir");
    let status = Command::new(fleet.dir().join("build.sh"))
        .arg("v1")
        .env("CONVERGE_MACHINE", "ansible")
        .env("CONVERGE_OUT", &artifact)
        .status()
        .expect("run build.sh");
    assert!(status.success());
    let options = fleet.testbed.ssh_options(0);
    let key = options.identity_file.expect("client key");
    let mut inventory = String::from("[all]\n");
    let mut known_hosts = String::new();
    for i in 0..N {
        let host = fleet.testbed.host(i);
        inventory.push_str(&format!(
            "host{i} ansible_host={} ansible_user=root ansible_ssh_private_key_file={} ansible_python_interpreter=/usr/bin/python3\n",
            host.address,
            key.display()
        ));
        known_hosts.push_str(&format!("{} {}\n", host.address, host.host_key));
    }
    fs::write(dir.join("inventory.ini"), inventory).expect("write inventory");
    fs::write(dir.join("known_hosts"), known_hosts).expect("write known_hosts");
    fs::write(
        dir.join("ansible.cfg"),
        format!(
            "[defaults]\nhost_key_checking = True\nforks = 20\ngathering = explicit\n\n[ssh_connection]\nssh_args = -F {cfg} -o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes -o ControlMaster=auto -o ControlPersist=60s\ncontrol_path_dir = {cp}\n",
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
    let first = ansible_run(playbook_bin, &dir);
    let noop = ansible_run(playbook_bin, &dir);
    for i in 0..N {
        let ledger = fleet.host_state(i).join("ansible/ledger");
        let lines = fs::read_to_string(&ledger).unwrap_or_default();
        assert_eq!(lines.lines().count(), 1, "host{i}: {lines:?}");
    }
    (first, noop)
}

#[test]
#[ignore = "benchmark: scripts/bench-fleet"]
fn bench_fleet_twenty_hosts_converge_vs_ansible() {
    let fleet = Fleet::new(N);
    fleet.write_all(N, &["v1"], "");
    let first = fleet.reconcile_once(&["--concurrency", "20"]);
    first.assert_code(0);
    let noop = fleet.reconcile_once(&["--concurrency", "20"]);
    noop.assert_code(0);
    for i in 0..N {
        assert_eq!(fleet.ledger(i).len(), 1, "host{i}");
    }
    let secs = |d: Duration| d.as_secs_f64();
    println!("| run | converge | ansible-playbook | ratio | goal |");
    println!("|---|---|---|---|---|");
    match std::env::var("ANSIBLE_PLAYBOOK") {
        Ok(bin) if !bin.is_empty() => {
            let (a_first, a_noop) = ansible(&fleet, &bin);
            for (name, c, a, goal) in [
                ("first run", first.elapsed, a_first, 10.0),
                ("no-op run", noop.elapsed, a_noop, 15.0),
            ] {
                let ratio = secs(a) / secs(c);
                println!(
                    "| {name} | {:.2} s | {:.2} s | {ratio:.1}x | >= {goal}x {} |",
                    secs(c),
                    secs(a),
                    if ratio >= goal { "met" } else { "MISSED" }
                );
            }
        }
        _ => {
            println!("| first run | {:.2} s | skipped | | |", secs(first.elapsed));
            println!("| no-op run | {:.2} s | skipped | | |", secs(noop.elapsed));
        }
    }
    fleet.finish();
}
