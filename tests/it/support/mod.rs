//! Helpers shared by the scenarios. This file: a temporary local fleet (a
//! desired-state directory, a controller state directory, one state directory
//! per local machine, ledgers that activations append to), the real
//! `converge` binary run with a time bound, its JSON output parsed, a daemon
//! guard that stops `converge run` on drop, and bounded polls.
//!
//! Nothing here sleeps and hopes: every wait is a poll of an observable
//! condition with a generous limit, and every limit that runs out fails the
//! test with what was seen. `desired` loads desired-state directories
//! through the library; `ssh` gives fleets of real sshd hosts.

pub mod desired;
pub mod ssh;

pub use testbed::run::{
    Converge, Run, condition, is_ready, json_lines, read_lines, read_text, result_kind, wait_for,
    write_atomically,
};
use testbed::run::{converge_command, run_within};

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_converge");

/// Bound on one short CLI command (status, history, a small --once run).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// Generous bound for conditions that normally hold within a second or two.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// The line a build that fails on purpose prints (`build-exit=N`).
pub const BUILD_FAILURE_MARKER: &str = "DISTINCTIVE-BUILD-FAILURE-7f3a";

/// The build script every fleet uses. `ROOT` is replaced by the fleet's root,
/// `MARKER` by [`BUILD_FAILURE_MARKER`].
///
/// `./build.sh VARIANT [OPTION...]`: the variant is written into the artifact
/// (so a new variant is a new artifact); options shape the artifact's
/// `activate`: `activate-exit=N` (exit N after the start line),
/// `sleep=SECS` (sleep between the start and end lines),
/// `random-sleep` (sleep 0-50 ms), `random-sleep-ms=N` (sleep 0-N ms),
/// `overlap-check` (append `overlap <generation>` when another activation of
/// the machine runs at the same time), `leave-child` (start a background
/// `sh` that sleeps 1000 s, its command line naming `ROOT/leftover`); and
/// the build itself: `build-exit=N`
/// (print a marker line and exit N without an artifact), `build-sleep=SECS`.
///
/// Every build appends one line to `ROOT/builds/<machine>`; every activation
/// appends `start <generation> <mode> <variant>` to `ROOT/ledger/<machine>`
/// and, when it succeeds, `end <generation> <mode> <variant>` (and
/// `mode-mismatch` if its argument and `CONVERGE_MODE` disagree).
const BUILD_SCRIPT: &str = r#"#!/bin/sh
set -eu
root='ROOT'
name=$CONVERGE_MACHINE
variant=${1:-v1}
[ $# -gt 0 ] && shift
exit_code=0
sleep_line=:
overlap=0
child_line=:
for opt in "$@"; do
  case $opt in
    activate-exit=*) exit_code=${opt#*=} ;;
    sleep=*) sleep_line="sleep ${opt#*=}" ;;
    random-sleep) sleep_line='sleep "$(printf 0.%03d $(( $(od -An -N2 -tu2 /dev/urandom) % 51 )))"' ;;
    build-sleep=*) sleep "${opt#*=}" ;;
    random-sleep-ms=*) sleep_line='ms=$(( $(od -An -N2 -tu2 /dev/urandom) % ('"${opt#*=}"' + 1) )); sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))"' ;;
    overlap-check) overlap=1 ;;
    leave-child) child_line="sh -c 'sleep 1000; :' '$root/leftover' &" ;;
    build-exit=*)
      echo "build of $name: MARKER"
      exit "${opt#*=}"
      ;;
  esac
done
mkdir -p "$root/builds"
echo "$variant $*" >> "$root/builds/$name"
echo "$variant" > "$CONVERGE_OUT/variant"
cp "$CONVERGE_ROLES" "$CONVERGE_OUT/roles-at-build.json"
cat > "$CONVERGE_OUT/activate" <<EOF
#!/bin/sh
ledger='$root/ledger/$name'
echo "start \$CONVERGE_GENERATION \$1 $variant" >> "\$ledger"
[ "\$1" = "\$CONVERGE_MODE" ] || echo "mode-mismatch \$1 \$CONVERGE_MODE" >> "\$ledger"
if [ $overlap = 1 ] && ! mkdir "\$ledger.running" 2>/dev/null; then
  echo "overlap \$CONVERGE_GENERATION" >> "\$ledger"
fi
$child_line
$sleep_line
[ $overlap = 0 ] || rmdir "\$ledger.running" 2>/dev/null || true
if [ $exit_code -ne 0 ]; then echo "activate of $variant fails on purpose" >&2; exit $exit_code; fi
echo "end \$CONVERGE_GENERATION \$1 $variant" >> "\$ledger"
EOF
chmod +x "$CONVERGE_OUT/activate"
echo "built $name $variant"
"#;

/// One scenario's world, in a temporary directory:
/// `d/` the desired-state directory, `s/` the controller's state,
/// `m/<name>/` each machine's state directory, `ledger/<name>` and
/// `builds/<name>` what activations and builds left, `logs/` the output of
/// every command run.
pub struct Fleet {
    root: tempfile::TempDir,
    runs: std::cell::Cell<u32>,
}

impl Fleet {
    /// An empty fleet with the standard `build.sh` in its desired-state directory.
    pub fn new() -> Fleet {
        Fleet::with_prefix("converge-loop-")
    }

    /// A fleet whose directories all lie under a hidden one (its root's
    /// name starts with a dot), like a desired state in `~/.config/gitops`.
    pub fn under_a_hidden_directory() -> Fleet {
        Fleet::with_prefix(".converge-loop-")
    }

    fn with_prefix(prefix: &str) -> Fleet {
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create a temporary directory");
        for dir in ["d", "s", "m", "ledger", "builds", "logs"] {
            fs::create_dir_all(root.path().join(dir)).expect("create a fleet directory");
        }
        let fleet = Fleet {
            root,
            runs: std::cell::Cell::new(0),
        };
        let script = BUILD_SCRIPT
            .replace("ROOT", fleet.root().to_str().expect("utf-8 tempdir"))
            .replace("MARKER", BUILD_FAILURE_MARKER);
        fleet.write_executable("build.sh", &script);
        fleet
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The desired-state directory.
    pub fn dir(&self) -> PathBuf {
        self.root().join("d")
    }

    /// The state directory of machine `name` (its `target.stateDir`).
    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.root().join("m").join(name)
    }

    /// A path outside the desired-state directory, for test files
    /// (anything inside it would change every build's inputs).
    pub fn path(&self, relative: &str) -> PathBuf {
        self.root().join(relative)
    }

    /// Writes a file of the desired-state directory whole: written beside it
    /// and renamed, so a watching daemon never reads half of it.
    pub fn write(&self, relative: &str, contents: &str) {
        write_atomically(&self.dir().join(relative), contents);
    }

    /// Writes an executable file of the desired-state directory.
    pub fn write_executable(&self, relative: &str, contents: &str) {
        let path = self.dir().join(relative);
        write_atomically(&path, contents);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod +x");
    }

    /// A Machine document: local target in its own state directory, built by
    /// `./build.sh ARGS...`; `extra` is more YAML at the level of `target`
    /// (each line indented by two spaces).
    pub fn machine(&self, name: &str, tags: &[&str], build_args: &[&str], extra: &str) -> String {
        let argv: Vec<String> = std::iter::once("./build.sh")
            .chain(build_args.iter().copied())
            .map(|a| format!("{a:?}"))
            .collect();
        let mut doc = format!(
            "apiVersion: converge/v1\nkind: Machine\nmetadata:\n  name: {name}\n  tags: [{tags}]\nspec:\n  target: {{local: true, stateDir: {state:?}}}\n  build: {{command: [{argv}], timeout: 1m}}\n",
            tags = tags.join(", "),
            state = self.machine_dir(name).to_str().expect("utf-8 tempdir"),
            argv = argv.join(", "),
        );
        doc.push_str(extra);
        if !doc.ends_with('\n') {
            doc.push('\n');
        }
        doc
    }

    /// Lines an activation appended to machine `name`'s ledger.
    pub fn ledger(&self, name: &str) -> Vec<String> {
        read_lines(&self.root().join("ledger").join(name))
    }

    /// Ledger lines of `name` that start with `word ` (`start`, `end`, `fault`).
    pub fn ledger_with(&self, name: &str, word: &str) -> Vec<String> {
        let prefix = format!("{word} ");
        self.ledger(name)
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    /// How many times the build of machine `name` ran.
    pub fn builds(&self, name: &str) -> usize {
        read_lines(&self.root().join("builds").join(name)).len()
    }

    /// Where machine `name`'s `current` points (`generations/<n>-<hash>`).
    pub fn current(&self, name: &str) -> Option<String> {
        fs::read_link(self.machine_dir(name).join("current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// The generation directory names of machine `name`, sorted by number.
    pub fn generations(&self, name: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.machine_dir(name).join("generations"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.contains(".partial"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort_by_key(|n| generation_number(n));
        names
    }

    /// Whether generation directory `generation` of `name` has its `.complete` marker.
    pub fn is_complete(&self, name: &str, generation: &str) -> bool {
        self.machine_dir(name)
            .join("generations")
            .join(generation)
            .join(".complete")
            .exists()
    }

    /// Asserts that `current` of `name` points at a complete generation and
    /// returns that generation's directory name.
    pub fn assert_current_complete(&self, name: &str) -> String {
        let current = self
            .current(name)
            .unwrap_or_else(|| panic!("machine {name} has no `current` link"));
        let generation = current
            .strip_prefix("generations/")
            .unwrap_or_else(|| panic!("machine {name}: current -> {current}, not generations/…"))
            .to_owned();
        assert!(
            self.is_complete(name, &generation),
            "machine {name}: current -> {current}, which has no .complete marker"
        );
        generation
    }

    /// Runs `converge ARGS...` within [`COMMAND_LIMIT`].
    pub fn converge(&self, args: &[&str]) -> Run {
        self.converge_within(args, COMMAND_LIMIT)
    }

    /// `converge reconcile --once --dir D --state S EXTRA...`.
    pub fn reconcile_once(&self, extra: &[&str]) -> Run {
        let dir = self.dir();
        let state = self.state();
        let mut args = vec![
            "reconcile",
            "--once",
            "--dir",
            dir.to_str().expect("utf-8"),
            "--state",
            state.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        self.converge(&args)
    }

    /// `converge plan --output json` of the fleet.
    pub fn plan_json(&self) -> Value {
        let dir = self.dir();
        let state = self.state();
        let run = self.converge(&[
            "plan",
            "--dir",
            dir.to_str().expect("utf-8"),
            "--state",
            state.to_str().expect("utf-8"),
            "--output",
            "json",
        ]);
        run.assert_code(0);
        run.json()
    }

    /// Asserts that the newest attempt of every key `plan` listed recorded
    /// exactly the planned steps, name for name and in order, all succeeded.
    pub fn assert_history_matches(&self, plan: &Value) {
        let planned = planned_steps(plan);
        assert!(!planned.is_empty(), "the plan lists no change: {plan}");
        for (key, steps) in &planned {
            let history = self.history(key);
            let newest = history
                .first()
                .unwrap_or_else(|| panic!("{key}: no attempt recorded"));
            assert_eq!(
                &recorded_steps(newest),
                steps,
                "{key}: the attempt recorded other steps than the plan listed\nplan: {plan}\nattempt: {newest}"
            );
            for step in newest["steps"].as_array().into_iter().flatten() {
                assert_eq!(step["status"], "succeeded", "{key}: {step}");
            }
        }
    }

    /// Starts `converge run --dir D --state S EXTRA...` with JSON logs.
    pub fn start_daemon(&self, extra: &[&str]) -> Daemon {
        self.start_daemon_env(extra, &[])
    }

    /// [`Fleet::start_daemon`] with `env` added to its environment.
    pub fn start_daemon_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = self.dir();
        let mut args = vec!["--dir", dir.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        self.start_daemon_inner(&args, env)
    }

    /// Starts `converge run --state S EXTRA...` with JSON logs (EXTRA says
    /// where desired state comes from: `--git URL --dir SUBDIR`).
    pub fn start_daemon_without_dir(&self, extra: &[&str]) -> Daemon {
        self.start_daemon_inner(extra, &[])
    }

    fn start_daemon_inner(&self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let log = self.root().join("logs").join(format!("daemon-{n}.log"));
        let state = self.state();
        let mut args = vec![
            "--log-format",
            "json",
            "run",
            "--state",
            state.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let child = converge_command(Path::new(BIN), &args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("create the daemon's log"))
            .spawn()
            .expect("start converge run");
        Daemon {
            child,
            log,
            exited: None,
        }
    }

    /// Waits until `daemon` answers on its socket: from then on, read
    /// commands ask it instead of opening the store it holds.
    pub fn wait_api(&self, daemon: &mut Daemon) {
        let socket = self.state().join("converge.sock");
        wait_for("the daemon's API to answer", WAIT_LIMIT, || {
            daemon.assert_running();
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(drop)
        });
    }

    /// `GET path` on the daemon's socket, as curl would send it.
    pub fn api_get(&self, path: &str) -> ApiAnswer {
        api_get(&self.state().join("converge.sock"), path)
    }

    /// Waits until `key` reports Ready=True; returns its status view.
    pub fn wait_ready(&self, key: &str, limit: Duration) -> Value {
        wait_for(&format!("{key} to be Ready"), limit, || {
            self.statuses()
                .into_iter()
                .find(|s| s["key"] == key)
                .filter(is_ready)
        })
    }

    /// Processes (pid, command line) whose command line names this fleet's
    /// directory: daemons, builds and detached activations it started.
    pub fn processes(&self) -> Vec<(u32, String)> {
        processes_mentioning(self.root())
    }

    /// Kills what this fleet left running, by pid: detached activations
    /// (found through their pidfiles, killed with their process group).
    fn kill_leftovers(&self) {
        for (pid, _) in self.processes() {
            if pid == std::process::id() {
                continue;
            }
            // Activations run in their own session: kill the whole group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Fleet {
    /// Runs `converge ARGS...` with `env` added to its environment.
    pub fn converge_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let logs = self.root().join("logs");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        testbed::run::run_within_env(
            Path::new(BIN),
            args,
            &env,
            &logs.join(format!("run-{n}.out")),
            &logs.join(format!("run-{n}.err")),
            COMMAND_LIMIT,
        )
    }
}

impl Converge for Fleet {
    /// Runs `converge ARGS...` to its end (killed and failing past `limit`).
    fn converge_within(&self, args: &[&str], limit: Duration) -> Run {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let logs = self.root().join("logs");
        run_within(
            Path::new(BIN),
            args,
            &logs.join(format!("run-{n}.out")),
            &logs.join(format!("run-{n}.err")),
            limit,
        )
    }

    fn state(&self) -> PathBuf {
        self.root().join("s")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_leftovers();
    }
}

/// A running `converge run`. On drop: SIGTERM, then SIGKILL if it lingers.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `KILL`, `INT`) to the daemon's pid.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("wait for the daemon");
        }
        self.exited
    }

    /// Waits up to `limit` for it to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if started.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exited = Some(self.child.wait().expect("reap the daemon"));
        }
    }

    /// Its log so far (JSON lines on stderr).
    pub fn log(&self) -> String {
        read_text(&self.log)
    }

    /// Its log so far, parsed.
    pub fn log_lines(&self) -> Vec<Value> {
        json_lines(&self.log())
    }

    /// Fails with its log when it is no longer running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_exit() {
            panic!("the daemon exited ({status}); its log:\n{}", self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.pid().to_string()])
            .status();
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `(status, reason)` of the Ready condition of a status view.
pub fn ready_of(view: &Value) -> (bool, String) {
    let (ready, reason, _) = testbed::run::ready_of(view);
    (ready, reason)
}

/// The generation number in `<n>-<hash>` (or `generations/<n>-<hash>`).
pub fn generation_number(name: &str) -> u64 {
    let name = name.strip_prefix("generations/").unwrap_or(name);
    name.split('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a generation name: {name}"))
}

/// Live processes whose command line contains `needle`, except this one.
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy();
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        // Zombies are dead already; their parent just has not reaped them.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle.as_ref()) {
            out.push((pid, cmdline));
        }
    }
    out
}

/// A small deterministic generator (SplitMix64) for random delays; the seed
/// is printed so a failing run can be replayed with `LOOP_SEED`.
pub struct Random(u64);

impl Random {
    pub fn from_env_or_clock(label: &str) -> Random {
        let seed = std::env::var("LOOP_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{label}: LOOP_SEED={seed}");
        Random(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]` (inclusive).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// The step names `plan --output json` lists for each key, in order.
pub fn planned_steps(plan: &Value) -> std::collections::BTreeMap<String, Vec<String>> {
    plan["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|change| {
            let key = change["key"].as_str().unwrap_or_default().to_owned();
            let steps = change["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| s["step"].as_str().unwrap_or_default().to_owned())
                .collect();
            (key, steps)
        })
        .collect()
}

/// The step names of an attempt as `history --output json` records them, in order.
pub fn recorded_steps(attempt: &Value) -> Vec<String> {
    attempt["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// What the daemon's API answered: status code, head (status line and
/// headers) and body.
pub struct ApiAnswer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// `GET path` on the API socket `socket` (HTTP/1.1, connection closed).
pub fn api_get(socket: &Path, path: &str) -> ApiAnswer {
    use std::io::{Read, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: converge\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the answer");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head: {response}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    ApiAnswer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Points machine state directory `state_dir`'s `current` at `generation`
/// the way an operator would by hand (a new link renamed over it): drift.
pub fn repoint(state_dir: &Path, generation: &str) {
    let tmp = state_dir.join("current.by-hand");
    std::os::unix::fs::symlink(format!("generations/{generation}"), &tmp).expect("symlink");
    fs::rename(&tmp, state_dir.join("current")).expect("rename over current");
}
