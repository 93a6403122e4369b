//! `scripts/bench-fleet`: converge against Ansible on 20 testbed hosts
//! (root). Runs the converge binary `CONVERGE_BIN` names (the script builds
//! it in release). Ansible runs when `ANSIBLE_PLAYBOOK` names an
//! `ansible-playbook` executable (the script installs ansible-core into a
//! virtualenv); otherwise only converge is measured. Prints numbers; asserts
//! only that every tool did the work.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use testbed::REMOTE_STATE_DIR;
use testbed::fleet::{COMMAND_LIMIT, SshFleet as Fleet, wait_for};
use testbed::run::Converge as _;

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
    let key = fleet.testbed.client(0).identity_file;
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

/// The converge binary to measure.
fn converge_bin() -> String {
    std::env::var("CONVERGE_BIN").unwrap_or_else(|_| "target/release/converge".to_owned())
}

fn main() {
    let fleet = Fleet::new(converge_bin(), N);
    fleet.write_all(N, &["v1"], "");
    let first = fleet.reconcile_once(&["--concurrency", "20"]);
    first.assert_code(0);
    let noop = fleet.reconcile_once(&["--concurrency", "20"]);
    noop.assert_code(0);
    for i in 0..N {
        assert_eq!(fleet.ledger(i).len(), 1, "host{i}");
    }
    let resync = daemon_resync(&fleet);
    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "daemon resync of {N} warm hosts (trigger -> last finished), {} rounds: median {:.3} s, max {:.3} s (goal <= 0.3 s {})",
        resync.len(),
        secs(resync[resync.len() / 2]),
        secs(resync[resync.len() - 1]),
        if resync[resync.len() / 2] <= Duration::from_millis(300) {
            "met"
        } else {
            "MISSED"
        }
    );
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

/// Milliseconds since the Unix epoch, the clock of attempt records.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Asks the daemon over its socket to reconcile `key` now.
fn post_reconcile(socket: &Path, key: &str) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect the API");
    write!(
        stream,
        "POST /v1/reconcile/{key} HTTP/1.1\r\nHost: converge\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

/// Starts `converge run` on the converged fleet and, in rounds, asks it to
/// reconcile all hosts at once (its masters are warm after the first
/// round). A no-op reconcile records no attempt, so its end is read from
/// the facts it observed (`lastSeenMs`; what follows is a store write):
/// from the trigger to the last host observed. Sorted.
fn daemon_resync(fleet: &Fleet) -> Vec<Duration> {
    let state = fleet.state();
    let log = fleet.root().join("logs/daemon.log");
    let mut daemon = Command::new(converge_bin())
        .args(["run", "--concurrency", "20", "--dir"])
        .arg(fleet.dir())
        .arg("--state")
        .arg(&state)
        .arg("--ssh-config")
        .arg(fleet.ssh_config())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("create the daemon's log"))
        .spawn()
        .expect("start converge run");
    let socket = state.join("converge.sock");
    let last_seen = || -> Vec<u64> {
        let run = fleet.converge_within(
            &[
                "status",
                "--state",
                state.to_str().expect("utf-8"),
                "--output",
                "json",
            ],
            COMMAND_LIMIT,
        );
        run.assert_code(0);
        let views = run.json();
        (0..N)
            .map(|i| {
                views
                    .as_array()
                    .and_then(|vs| vs.iter().find(|v| v["key"] == format!("machine/host{i}")))
                    .and_then(|v: &Value| v["lastSeenMs"].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    };
    wait_for("the daemon's API", COMMAND_LIMIT, || {
        std::os::unix::net::UnixStream::connect(&socket).ok()
    });
    // Let the daemon's own start-up pass (each host observed once) end.
    std::thread::sleep(Duration::from_secs(3));
    let mut rounds = Vec::new();
    for round in 0..6 {
        let triggered = now_ms();
        std::thread::scope(|s| {
            for i in 0..N {
                let socket = &socket;
                s.spawn(move || post_reconcile(socket, &format!("machine/host{i}")));
            }
        });
        // Polling runs `converge status`: let the resync run alone first.
        std::thread::sleep(Duration::from_secs(1));
        let seen = wait_for("all hosts observed again", COMMAND_LIMIT, || {
            let seen = last_seen();
            seen.iter().all(|&ms| ms >= triggered).then_some(seen)
        });
        let last = seen.iter().copied().max().unwrap_or(triggered);
        let took = Duration::from_millis(last.saturating_sub(triggered));
        println!("resync round {round}: {took:?}");
        // The first round may still find cold masters.
        if round > 0 {
            rounds.push(took);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    for i in 0..N {
        assert_eq!(
            fleet.ledger(i).len(),
            1,
            "host{i}: a resync activated again"
        );
    }
    rounds.sort();
    rounds
}
