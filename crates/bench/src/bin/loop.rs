//! Reconcile-loop benchmark: runs the real `converge` binary over generated
//! fleets of local machines and prints what it costs.
//!
//! 1. A no-op `converge reconcile --once` over N machines (default 1,000),
//!    after a first run converged them: wall time and peak RSS.
//! 2. With the daemon running over the N machines (debounce W), one machine's
//!    YAML is changed: time from the write to the reload (its reconcile
//!    starts) and to the first command its reconcile runs (the build), minus
//!    W, with the steps in between.
//! 3. The daemon idle with M machines (default 10,000), converged first:
//!    resident memory once it has settled.
//!
//! Run in release: `scripts/bench-loop` (builds, then runs this). Options:
//! `--converge PATH` (default: `converge` next to this binary),
//! `--machines N`, `--idle M`, `--changes K`, `--debounce-ms W`, `--runs R`,
//! `--skip-idle`, `--only-idle`, `--keep` (leave the generated directories
//! in /tmp), `--profile-memory DIR STATE` (in-process: the resident memory
//! the desired state and the store of a kept fleet add). It prints numbers
//! and asserts nothing about time.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

const BUILD_SCRIPT: &str = r#"#!/bin/sh
# bench-loop's build: an artifact whose activate does nothing. When
# BENCH_STAMPS is set, the build's start time (ns since the epoch) is appended
# to $BENCH_STAMPS/$CONVERGE_MACHINE.
set -eu
if [ -n "${BENCH_STAMPS:-}" ]; then date +%s%N >> "$BENCH_STAMPS/$CONVERGE_MACHINE"; fi
printf '#!/bin/sh\nexit 0\n' > "$CONVERGE_OUT/activate"
chmod +x "$CONVERGE_OUT/activate"
"#;

struct Options {
    converge: PathBuf,
    machines: usize,
    idle: usize,
    changes: usize,
    debounce: Duration,
    runs: usize,
    skip_idle: bool,
    only_idle: bool,
    keep: bool,
    /// `--profile-memory DIR STATE`: where the daemon's memory goes.
    profile: Option<(PathBuf, PathBuf)>,
}

fn parse_options() -> anyhow::Result<Options> {
    let exe = std::env::current_exe().context("find this binary")?;
    let mut options = Options {
        converge: exe.with_file_name("converge"),
        machines: 1_000,
        idle: 10_000,
        changes: 12,
        debounce: Duration::from_millis(100),
        runs: 3,
        skip_idle: false,
        only_idle: false,
        keep: false,
        profile: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--converge" => options.converge = PathBuf::from(value()?),
            "--machines" => options.machines = value()?.parse()?,
            "--idle" => options.idle = value()?.parse()?,
            "--changes" => options.changes = value()?.parse()?,
            "--debounce-ms" => options.debounce = Duration::from_millis(value()?.parse()?),
            "--runs" => options.runs = value()?.parse()?,
            "--skip-idle" => options.skip_idle = true,
            "--only-idle" => options.only_idle = true,
            "--keep" => options.keep = true,
            "--profile-memory" => {
                let dir = PathBuf::from(value()?);
                options.profile = Some((dir, PathBuf::from(value()?)));
            }
            other => bail!("unknown argument {other} (see the file's header)"),
        }
    }
    if !options.converge.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release --bins` or pass --converge",
            options.converge.display()
        );
    }
    Ok(options)
}

/// Removes the generated directories, also on error, unless `--keep`.
struct Scratch {
    root: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn machine_yaml(i: usize, state_root: &Path, interval: &str, build_arg: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: Machine
metadata: {{name: m{i:05}}}
spec:
  target: {{local: true, stateDir: {state}}}
  build: {{command: [\"./build.sh\", \"{build_arg}\"]}}
  activation: {{mode: switch, rollback: auto}}
  drift: correct
  interval: {interval}
",
        state = state_root.join(i.to_string()).display(),
    )
}

fn machine_file(dir: &Path, i: usize) -> PathBuf {
    dir.join("machines").join(format!("m{i:05}.yaml"))
}

/// A desired-state directory of `n` local machines, one file each; their
/// state directories are `state_root/<i>`.
fn generate(dir: &Path, state_root: &Path, n: usize, interval: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("machines"))?;
    std::fs::create_dir_all(state_root)?;
    let build = dir.join("build.sh");
    std::fs::write(&build, BUILD_SCRIPT)?;
    std::fs::set_permissions(&build, std::fs::Permissions::from_mode(0o755))?;
    for i in 0..n {
        std::fs::write(
            machine_file(dir, i),
            machine_yaml(i, state_root, interval, "v0"),
        )?;
    }
    Ok(())
}

/// Wall time, peak RSS (KiB) and exit code of one command.
struct Measured {
    wall: Duration,
    peak_kib: Option<u64>,
    code: Option<i32>,
}

const GNU_TIME: &str = "/usr/bin/time";

/// Runs `converge args...` to its end. Peak RSS comes from wait4's
/// `ru_maxrss` as GNU time reports it (`%M`), or, without GNU time, from
/// polling `VmHWM` in /proc every 5 ms (which can miss growth in the last
/// few milliseconds).
fn run_measured(converge: &Path, args: &[&str], scratch: &Path) -> anyhow::Result<Measured> {
    let started = Instant::now();
    if Path::new(GNU_TIME).is_file() {
        let out = scratch.join("time.out");
        let status = Command::new(GNU_TIME)
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&out)
            .arg(converge)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("run converge under GNU time")?;
        let wall = started.elapsed();
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let peak_kib = text.lines().last().and_then(|l| l.trim().parse().ok());
        return Ok(Measured {
            wall,
            peak_kib,
            code: status.code(),
        });
    }
    let mut child = Command::new(converge)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("run converge")?;
    let mut peak = None;
    let status = loop {
        if let Some(kib) = proc_status_kib(child.id(), "VmHWM") {
            peak = Some(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Measured {
        wall: started.elapsed(),
        peak_kib: peak,
        code: status.code(),
    })
}

fn rss_method() -> &'static str {
    if Path::new(GNU_TIME).is_file() {
        "wait4 ru_maxrss via /usr/bin/time %M"
    } else {
        "VmHWM polled from /proc every 5 ms"
    }
}

/// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn threads(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// One stderr line of the daemon and when it arrived.
struct Line {
    at: SystemTime,
    json: serde_json::Value,
}

/// A running `converge run` whose JSON log lines are collected as they arrive.
struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
}

impl Daemon {
    fn start(
        converge: &Path,
        dir: &Path,
        state: &Path,
        debounce: Duration,
        stamps: &Path,
    ) -> anyhow::Result<Daemon> {
        let mut child = Command::new(converge)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .arg("--dir")
            .arg(dir)
            .arg("--state")
            .arg(state)
            .arg("--debounce")
            .arg(format!("{}ms", debounce.as_millis()))
            .env("BENCH_STAMPS", stamps)
            // "files changed" and each command a reconcile runs are debug lines.
            .env(
                "RUST_LOG",
                "info,converge::controller::daemon=debug,converge::driver::local=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start the daemon")?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let at = SystemTime::now();
                let json = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::Value::String(line.clone()));
                if let Ok(mut lines) = sink.lock() {
                    lines.push(Line { at, json });
                }
            }
        });
        Ok(Daemon { child, lines })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The arrival time of the first line from index `from` on whose
    /// `message` is `message`, waiting up to `timeout`.
    fn wait_message(
        &self,
        from: usize,
        message: &str,
        timeout: Duration,
    ) -> anyhow::Result<SystemTime> {
        self.wait_line(from, message, None, timeout)
    }

    /// Like [`Daemon::wait_message`], for a line logged inside the
    /// reconcile span of `object` when one is given.
    fn wait_line(
        &self,
        from: usize,
        message: &str,
        object: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<SystemTime> {
        let matches = |l: &Line| {
            l.json.get("message").and_then(|m| m.as_str()) == Some(message)
                && object.is_none_or(|o| {
                    l.json.pointer("/span/object").and_then(|v| v.as_str()) == Some(o)
                })
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(lines) = self.lines.lock() {
                if let Some(line) = lines.iter().skip(from).find(|l| matches(l)) {
                    return Ok(line.at);
                }
            }
            if Instant::now() > deadline {
                bail!("the daemon did not log {message:?} ({object:?}) within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn line_count(&self) -> usize {
        self.lines.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Waits until the daemon has used (almost) no CPU for three 1 s windows
    /// in a row; returns how long that took.
    fn settle(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut quiet = 0;
        let mut last = cpu_ticks(self.pid()).context("read daemon CPU time")?;
        while quiet < 3 {
            if started.elapsed() > timeout {
                bail!("the daemon did not settle within {timeout:?}");
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the daemon exited: {status}");
            }
            std::thread::sleep(Duration::from_secs(1));
            let now = cpu_ticks(self.pid()).context("read daemon CPU time")?;
            // One tick is 10 ms: sled's background flusher alone stays under it.
            quiet = if now.saturating_sub(last) <= 1 {
                quiet + 1
            } else {
                0
            };
            last = now;
        }
        Ok(started.elapsed())
    }

    /// SIGTERM (through the `kill` binary: no unsafe code), then wait.
    fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("the daemon did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "?".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

fn median(sorted: &[Duration]) -> Duration {
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn epoch_ns(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// `after - before - window`, in signed milliseconds.
fn past_window_ms(before_ns: i128, after_ns: i128, window: Duration) -> f64 {
    (after_ns - before_ns - window.as_nanos() as i128) as f64 / 1e6
}

struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    fn row(&mut self, what: &str, value: String, goal: &str, note: String) {
        self.rows
            .push([what.to_owned(), value, goal.to_owned(), note]);
    }

    fn print(&self) {
        let header = ["measurement", "value", "goal", "notes"];
        let mut widths = header.map(str::len);
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        let mut line = |cells: [&str; 4]| {
            let _ = writeln!(
                out,
                "{:<w0$}  {:>w1$}  {:<w2$}  {}",
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
        };
        line(header);
        for row in &self.rows {
            line([&row[0], &row[1], &row[2], &row[3]]);
        }
        print!("{out}");
    }
}

fn converge_once(
    converge: &Path,
    dir: &Path,
    state: &Path,
    scratch: &Path,
    extra: &[&str],
) -> anyhow::Result<Measured> {
    let dir = dir.to_str().context("utf-8 path")?;
    let state = state.to_str().context("utf-8 path")?;
    let mut args = vec!["reconcile", "--once", "--dir", dir, "--state", state];
    args.extend_from_slice(extra);
    run_measured(converge, &args, scratch)
}

fn noop_runs(o: &Options, scratch: &Path, table: &mut Table) -> anyhow::Result<()> {
    let n = o.machines;
    let dir = scratch.join("d1");
    let state = scratch.join("s1");
    generate(&dir, &scratch.join("m1"), n, "5m")?;
    eprintln!("converging {n} local machines…");
    let first = converge_once(
        &o.converge,
        &dir,
        &state,
        scratch,
        &["--concurrency", "32", "--builds", "4"],
    )?;
    if first.code != Some(0) {
        bail!("the first run exited with {:?}", first.code);
    }
    table.row(
        &format!("first converge, {n} machines (--concurrency 32 --builds 4)"),
        format!("{:.1} s", first.wall.as_secs_f64()),
        "-",
        format!("peak RSS {}", mib(first.peak_kib)),
    );
    let mut walls = Vec::new();
    let mut peaks = Vec::new();
    for _ in 0..o.runs.max(1) {
        let run = converge_once(&o.converge, &dir, &state, scratch, &[])?;
        if run.code != Some(0) {
            bail!("a no-op run exited with {:?}", run.code);
        }
        walls.push(run.wall);
        peaks.extend(run.peak_kib);
    }
    walls.sort();
    let all: Vec<String> = walls
        .iter()
        .map(|w| format!("{:.2}", w.as_secs_f64()))
        .collect();
    table.row(
        &format!("no-op reconcile --once, {n} machines: wall"),
        format!("{:.2} s", median(&walls).as_secs_f64()),
        "<= 2 s",
        format!("median of {} runs: [{}] s", walls.len(), all.join(", ")),
    );
    table.row(
        &format!("no-op reconcile --once, {n} machines: peak RSS"),
        mib(peaks.iter().max().copied()),
        "<= 60 MB",
        format!("max of runs; {}", rss_method()),
    );
    Ok(())
}

fn file_changes(o: &Options, scratch: &Path, table: &mut Table) -> anyhow::Result<()> {
    let n = o.machines;
    let dir = scratch.join("d1");
    let state = scratch.join("s1");
    let stamps = scratch.join("stamps");
    std::fs::create_dir_all(&stamps)?;
    let mut daemon = Daemon::start(&o.converge, &dir, &state, o.debounce, &stamps)?;
    daemon.wait_message(0, "converge is running", Duration::from_secs(60))?;
    let settled = daemon.settle(Duration::from_secs(600))?;
    eprintln!(
        "daemon over {n} machines settled after {:.1} s; changing files…",
        settled.as_secs_f64()
    );
    // Per change, ms: [debounce delivery past W, reload, reload -> first
    // command of its reconcile, write -> reloaded - W, write -> first command - W,
    // write -> build script running - W].
    let mut samples: Vec<[f64; 6]> = Vec::new();
    let changes: Vec<usize> = (0..o.changes).map(|k| (k * 37) % n.max(1)).collect();
    for (round, i) in changes.into_iter().enumerate() {
        let object = format!("machine/m{i:05}");
        let stamp_file = stamps.join(format!("m{i:05}"));
        let stamps_before = std::fs::read_to_string(&stamp_file)
            .unwrap_or_default()
            .lines()
            .count();
        let from = daemon.line_count();
        let yaml = machine_yaml(i, &scratch.join("m1"), "5m", &format!("r{round}"));
        std::fs::write(machine_file(&dir, i), yaml)?;
        let written = SystemTime::now();
        let limit = Duration::from_secs(30);
        let noticed = daemon.wait_message(from, "files changed", limit)?;
        let reloaded = daemon.wait_message(from, "desired state reloaded", limit)?;
        let command = daemon.wait_line(from, "running command", Some(&object), limit)?;
        let deadline = Instant::now() + limit;
        let script_ns: i128 = loop {
            let text = std::fs::read_to_string(&stamp_file).unwrap_or_default();
            if let Some(ns) = text
                .lines()
                .nth(stamps_before)
                .and_then(|l| l.trim().parse().ok())
            {
                break ns;
            }
            if Instant::now() > deadline {
                bail!("{object} was not rebuilt within 30 s of its change");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        daemon.wait_line(from, "converged", Some(&object), limit)?;
        let w = epoch_ns(written);
        let between =
            |a: SystemTime, b: SystemTime| past_window_ms(epoch_ns(a), epoch_ns(b), Duration::ZERO);
        samples.push([
            past_window_ms(w, epoch_ns(noticed), o.debounce),
            between(noticed, reloaded),
            between(reloaded, command),
            past_window_ms(w, epoch_ns(reloaded), o.debounce),
            past_window_ms(w, epoch_ns(command), o.debounce),
            past_window_ms(w, script_ns, o.debounce),
        ]);
        // Let the watcher's quiet window pass before the next change.
        std::thread::sleep(o.debounce * 3);
    }
    daemon.stop()?;
    let rows = [
        (
            "  write -> watcher delivers the change ('files changed'), minus W",
            "-",
        ),
        (
            "  'files changed' -> 'desired state reloaded' (reload)",
            "-",
        ),
        ("  reloaded -> first command of its reconcile spawned", "-"),
        (
            "write -> reload done (its reconcile starts), minus W",
            "<= 50 ms",
        ),
        (
            "write -> first command of its reconcile (the build), minus W",
            "<= 50 ms",
        ),
        (
            "write -> build script running (sh + date started), minus W",
            "-",
        ),
    ];
    for (k, (what, goal)) in rows.iter().enumerate() {
        let mut values: Vec<f64> = samples.iter().map(|s| s[k]).collect();
        values.sort_by(f64::total_cmp);
        let max = values.last().copied().unwrap_or(0.0);
        let med = values.get(values.len() / 2).copied().unwrap_or(0.0);
        table.row(
            &format!("file change, {n} machines: {what}"),
            format!("{med:.1} ms"),
            goal,
            format!(
                "median of {}; max {max:.1} ms; W = {}",
                values.len(),
                ms(o.debounce)
            ),
        );
    }
    Ok(())
}

fn idle_daemon(o: &Options, scratch: &Path, table: &mut Table) -> anyhow::Result<()> {
    let m = o.idle;
    let dir = scratch.join("d2");
    let state = scratch.join("s2");
    generate(&dir, &scratch.join("m2"), m, "1h")?;
    eprintln!("converging {m} local machines for the idle daemon (this takes a while)…");
    let first = converge_once(
        &o.converge,
        &dir,
        &state,
        scratch,
        &["--concurrency", "32", "--builds", "4", "--timeout", "2h"],
    )?;
    if first.code != Some(0) {
        bail!("converging {m} machines exited with {:?}", first.code);
    }
    table.row(
        &format!("first converge, {m} machines"),
        format!("{:.1} s", first.wall.as_secs_f64()),
        "-",
        format!("peak RSS {}", mib(first.peak_kib)),
    );
    let noop = converge_once(&o.converge, &dir, &state, scratch, &[])?;
    table.row(
        &format!("no-op reconcile --once, {m} machines: wall"),
        format!("{:.2} s", noop.wall.as_secs_f64()),
        "-",
        format!("peak RSS {}", mib(noop.peak_kib)),
    );
    let stamps = scratch.join("stamps2");
    std::fs::create_dir_all(&stamps)?;
    let started = Instant::now();
    let mut daemon = Daemon::start(&o.converge, &dir, &state, o.debounce, &stamps)?;
    daemon.wait_message(0, "converge is running", Duration::from_secs(120))?;
    daemon.settle(Duration::from_secs(3600))?;
    let settled_after = started.elapsed();
    let pid = daemon.pid();
    let cpu_before = cpu_ticks(pid).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(10));
    let cpu_idle = cpu_ticks(pid).unwrap_or(0).saturating_sub(cpu_before);
    let rss = proc_status_kib(pid, "VmRSS");
    let hwm = proc_status_kib(pid, "VmHWM");
    let thread_count = threads(pid);
    daemon.stop()?;
    table.row(
        &format!("daemon idle, {m} machines: RSS"),
        mib(rss),
        "<= 50 MB",
        format!(
            "VmRSS 10 s after settling (settled {:.1} s after start); VmHWM {}; {} threads; {} CPU ticks (10 ms) in 10 s idle",
            settled_after.as_secs_f64(),
            mib(hwm),
            thread_count.map_or_else(|| "?".to_owned(), |t| t.to_string()),
            cpu_idle
        ),
    );
    Ok(())
}

/// VmRSS of this process, KiB.
fn own_rss() -> u64 {
    proc_status_kib(std::process::id(), "VmRSS").unwrap_or(0)
}

/// In this process, loads what the daemon keeps for a converged fleet (the
/// desired state with its parse cache, the store's records as one pass of
/// reconciles reads them) and prints the resident memory each part adds.
fn profile_memory(dir: &Path, state: &Path) -> anyhow::Result<()> {
    use converge::controller::lifecycle;
    use converge::store::Store;
    let base = own_rss();
    let report = |what: &str, before: u64| {
        let now = own_rss();
        println!(
            "{what:<58} +{:>7.1} MiB  (RSS {:.1} MiB)",
            now.saturating_sub(before) as f64 / 1024.0,
            now as f64 / 1024.0
        );
        now
    };
    println!(
        "sizes: Located {} B, Object<MachineSpec> {} B, MachineSpec {} B",
        std::mem::size_of::<converge::spec::parse::Located>(),
        std::mem::size_of::<converge::spec::Object<converge::spec::MachineSpec>>(),
        std::mem::size_of::<converge::spec::MachineSpec>()
    );
    println!(
        "{:<58}  {:>7.1} MiB",
        "process at start",
        base as f64 / 1024.0
    );
    let mut source = converge::source::Source::new(dir);
    let (assembled, stats, snapshot) = lifecycle::load(&mut source)?;
    let snapshot = snapshot.context("the directory is invalid")?;
    drop(assembled);
    let after_load = report(
        &format!("desired state + parse cache ({} files)", stats.files),
        base,
    );
    let keys = lifecycle::keys(&snapshot.desired);
    let store = Store::open(&converge::controller::context::store_dir(state))?;
    let after_open = report("store opened", after_load);
    for key in &keys {
        let _ = store.status(key)?;
        let _ = store.spec(key)?;
        let _ = store.facts(key)?;
    }
    let after_read = report(
        &format!("status, spec, facts of {} objects read once", keys.len()),
        after_open,
    );
    for key in &keys {
        if let Some(facts) = store.facts(key)? {
            store.put_facts(key, &facts)?;
        }
        if let Some(status) = store.status(key)? {
            store.put_status(key, &status)?;
        }
    }
    store.flush()?;
    let after_write = report("facts and status rewritten once, flushed", after_read);
    let _ = store.statuses()?;
    report("statuses() scan", after_write);
    drop(store);
    drop(snapshot);
    drop(source);
    report("all dropped", base);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let o = parse_options()?;
    if let Some((dir, state)) = &o.profile {
        return profile_memory(dir, state);
    }
    let scratch = Scratch {
        root: std::env::temp_dir().join(format!("cbl-{}", std::process::id())),
        keep: o.keep,
    };
    std::fs::create_dir_all(&scratch.root)?;
    let mut table = Table { rows: Vec::new() };
    if !o.only_idle {
        noop_runs(&o, &scratch.root, &mut table)?;
        file_changes(&o, &scratch.root, &mut table)?;
    }
    if !o.skip_idle {
        idle_daemon(&o, &scratch.root, &mut table)?;
    }
    println!(
        "converge: {}; {} cores",
        o.converge.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    table.print();
    Ok(())
}
