//! `scripts/bench-fleet`: converge beside its peers and the SSH floor on N
//! testbed hosts (root; N from `BENCH_HOSTS`, default 20), twice: once with
//! every sshd offering only curve25519-sha256 key exchange (every client
//! pays the same handshake, so the comparison is of orchestration), once
//! with sshd's defaults. Each time, on the same fresh hosts and the same
//! work (a directory, a 1 KB payload, an activate script run when
//! changed): converge `reconcile --once` (first run and no-op), pyinfra
//! (`--parallel N`) when `PYINFRA` names its executable, ansible-playbook
//! when `ANSIBLE_PLAYBOOK` does (the script installs both from PyPI into a
//! virtualenv), and the `xargs -P N ssh` floors, cold (a fresh connection
//! per host) and warm (over ControlMasters). Also converge's SSH round
//! trips per host (commands and new connections, from its debug log), its
//! peak RSS (`/usr/bin/time`), and, with `BENCH_RESYNC=1`, the daemon's
//! resync of warm hosts. Prints one table; asserts only that every tool did
//! the work. `BENCH_LOGS=DIR` keeps converge's logs there (`BENCH_RUST_LOG`
//! adds to what they hold: keep the SSH driver's debug lines, which are
//! counted). `BENCH_NOOPS=K` runs K more no-op runs and prints each. Runs the converge binary `CONVERGE_BIN` names.

mod peers;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use testbed::fleet::{COMMAND_LIMIT, SshFleet as Fleet, wait_for};
use testbed::run::Converge as _;
use testbed::{Options, Testbed};

/// The converge binary to measure.
fn converge_bin() -> String {
    std::env::var("CONVERGE_BIN").unwrap_or_else(|_| "target/release/converge".to_owned())
}

fn env_tool(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// One converge run: wall time, peak RSS in KiB, and per host the number
/// of commands run and of new SSH connections made.
struct ConvergeRun {
    elapsed: Duration,
    rss_kib: u64,
    commands: Vec<usize>,
    connects: Vec<usize>,
}

/// `reconcile --once` under `/usr/bin/time`, with the SSH driver's debug
/// lines on (one per command and per new connection).
fn converge_once(fleet: &Fleet, n: usize, name: &str) -> ConvergeRun {
    let logs = fleet.root().join("logs");
    let (out, err, rss) = (
        logs.join(format!("{name}.out")),
        logs.join(format!("{name}.err")),
        logs.join(format!("{name}.rss")),
    );
    let args = fleet.reconcile_args(&[]);
    let mut command = Command::new("/usr/bin/time");
    command
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(converge_bin())
        .args(&args)
        .env_remove("CONVERGE_LOG_FORMAT")
        .env_remove("CONVERGE_DIR")
        .env_remove("CONVERGE_STATE")
        .env(
            "RUST_LOG",
            env_tool("BENCH_RUST_LOG").unwrap_or_else(|| {
                "info,converge::driver::ssh::exec=debug,converge::driver::ssh::master=debug"
                    .to_owned()
            }),
        )
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).expect("create a log"))
        .stderr(fs::File::create(&err).expect("create a log"));
    let started = Instant::now();
    let status = command.status().expect("run converge under /usr/bin/time");
    let elapsed = started.elapsed();
    let log = fs::read_to_string(&err).unwrap_or_default();
    assert!(
        status.success(),
        "converge {name} failed:\n{}\n{log}",
        fs::read_to_string(&out).unwrap_or_default()
    );
    let rss_kib = fs::read_to_string(&rss)
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0);
    let per_host = |needle: &str| -> Vec<usize> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for line in log.lines().filter(|l| l.contains(needle)) {
            if let Some(at) = line.find("target_host=") {
                let host: String = line[at + 12..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                *counts.entry(host).or_default() += 1;
            }
        }
        let mut all: Vec<usize> = (0..n)
            .map(|i| {
                let address = &fleet.testbed.host(i).address;
                counts
                    .iter()
                    .filter(|(h, _)| {
                        h.contains(&format!("{address}:"))
                            || h.trim_matches('"') == address.as_str()
                    })
                    .map(|(_, c)| *c)
                    .sum()
            })
            .collect();
        all.sort_unstable();
        all
    };
    ConvergeRun {
        elapsed,
        rss_kib,
        commands: per_host("running command over ssh"),
        connects: per_host("ssh master connected"),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// `min–max` of per-host counts.
fn range(counts: &[usize]) -> String {
    match (counts.first(), counts.last()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}–{b}"),
        _ => "-".to_owned(),
    }
}

/// One pass on fresh hosts configured by `options`: prints its rows.
fn pass(n: usize, label: &str, options: Options) {
    let fleet = Fleet::on(converge_bin(), Testbed::with_options(n, options));
    fleet.write_all(n, &["v1"], "");
    let first = converge_once(&fleet, n, "first");
    let noop = converge_once(&fleet, n, "noop");
    // More no-op runs on request, to see their spread (`BENCH_NOOPS=5`).
    let more: usize = env_tool("BENCH_NOOPS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for k in 0..more {
        let again = converge_once(&fleet, n, &format!("noop{k}"));
        println!("no-op run {k}: {}", secs(again.elapsed));
    }
    for i in 0..n {
        assert_eq!(fleet.ledger(i).len(), 1, "host{i}");
    }
    let mut rows = vec![(
        "converge `reconcile --once`".to_owned(),
        first.elapsed,
        noop.elapsed,
    )];
    if let Some(bin) = env_tool("PYINFRA") {
        let (a, b) = peers::pyinfra(&fleet, n, &bin);
        rows.push((format!("pyinfra (`--parallel {n}`)"), a, b));
    }
    if let Some(bin) = env_tool("ANSIBLE_PLAYBOOK") {
        let (a, b) = peers::ansible(&fleet, n, &bin);
        rows.push((format!("ansible-playbook (forks {n})"), a, b));
    }
    let (cold, warm) = peers::floors(&fleet, n);
    rows.push((
        format!("floor: `xargs -P {n} ssh`, fresh connections / warm masters"),
        cold,
        warm,
    ));
    println!();
    println!("### {n} hosts, {label}");
    println!();
    println!("| tool | first run | no-op run |");
    println!("|---|---|---|");
    for (name, a, b) in &rows {
        println!("| {name} | {} | {} |", secs(*a), secs(*b));
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!();
    println!(
        "converge vs floor: first run {:.2}x the cold floor, no-op {:.2}x the warm floor",
        ratio(first.elapsed, cold),
        ratio(noop.elapsed, warm)
    );
    for (name, a, b) in rows.iter().skip(1).filter(|r| !r.0.starts_with("floor")) {
        println!(
            "converge vs {name}: first run {:.1}x faster, no-op {:.1}x faster",
            ratio(*a, first.elapsed),
            ratio(*b, noop.elapsed)
        );
    }
    println!(
        "converge per host: first run {} commands over {} new connections; no-op {} commands over {} new connections",
        range(&first.commands),
        range(&first.connects),
        range(&noop.commands),
        range(&noop.connects)
    );
    println!(
        "converge peak RSS: first run {:.1} MiB, no-op {:.1} MiB",
        first.rss_kib as f64 / 1024.0,
        noop.rss_kib as f64 / 1024.0
    );
    if std::env::var("BENCH_RESYNC").is_ok_and(|v| v == "1") {
        let resync = daemon_resync(&fleet, n);
        println!(
            "daemon resync of {n} warm hosts (trigger -> last observed), {} rounds: median {:.3} s, max {:.3} s",
            resync.len(),
            resync[resync.len() / 2].as_secs_f64(),
            resync[resync.len() - 1].as_secs_f64(),
        );
    }
    if let Some(keep) = env_tool("BENCH_LOGS") {
        // Converge's logs of this pass, for a look at where the time went.
        let to = Path::new(&keep).join(label.replace(' ', "-"));
        fs::create_dir_all(&to).expect("create BENCH_LOGS");
        for entry in fs::read_dir(fleet.root().join("logs"))
            .expect("list logs")
            .flatten()
        {
            fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a log");
        }
    }
    fleet.finish();
}

fn main() {
    let n: usize = std::env::var("BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    println!("bench-fleet: {n} hosts, {cores} cores");
    pass(
        n,
        "sshd offering only curve25519-sha256",
        Options {
            curve25519_only: true,
            ..Options::default()
        },
    );
    pass(n, "sshd defaults", Options::default());
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
fn daemon_resync(fleet: &Fleet, n: usize) -> Vec<Duration> {
    let state = fleet.state();
    let log = fleet.root().join("logs/daemon.log");
    let mut daemon = Command::new(converge_bin())
        .args(["run", "--dir"])
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
        (0..n)
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
            for i in 0..n {
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
    for i in 0..n {
        assert_eq!(
            fleet.ledger(i).len(),
            1,
            "host{i}: a resync activated again"
        );
    }
    rounds.sort();
    rounds
}
