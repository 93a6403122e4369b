//! Running the `converge` binary the way a scenario or a benchmark does: with
//! an environment that cannot steer it, its output in log files, killed and
//! failing past a time bound; its exit code, output and JSON read back; and
//! the bounded polls and small file helpers the scenarios share. Every wait
//! is a poll of an observable condition with a limit; a limit that runs out
//! fails with what was seen.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `bin ARGS...` with an environment that cannot steer it (no RUST_LOG,
/// CONVERGE_LOG_FORMAT, CONVERGE_DIR or CONVERGE_STATE from the caller).
pub fn converge_command(bin: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(bin);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("CONVERGE_LOG_FORMAT")
        .env_remove("CONVERGE_DIR")
        .env_remove("CONVERGE_STATE");
    command
}

/// Runs `bin ARGS...` to its end with stdout and stderr in `out` and `err`;
/// kills it and fails past `limit`.
pub fn run_within(bin: &Path, args: &[&str], out: &Path, err: &Path, limit: Duration) -> Run {
    run_within_env(bin, args, &[], out, err, limit)
}

/// [`run_within`] with `env` added to the environment.
pub fn run_within_env(
    bin: &Path,
    args: &[&str],
    env: &[(String, String)],
    out: &Path,
    err: &Path,
    limit: Duration,
) -> Run {
    let mut child = converge_command(bin, args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(fs::File::create(out).expect("create a log file"))
        .stderr(fs::File::create(err).expect("create a log file"))
        .spawn()
        .expect("start converge");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for converge") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`converge {}` did not end within {limit:?}; it was killed.\nstdout:\n{}\nstderr:\n{}",
                args.join(" "),
                read_text(out),
                read_text(err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        code: status.code(),
        stdout: read_text(out),
        stderr: read_text(err),
        elapsed: started.elapsed(),
    }
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    /// `None` when it was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// Fails, showing the output, unless the command exited with `code`.
    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "`converge {}` exited with {:?}, expected {code}\nstdout:\n{}\nstderr:\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`converge {}` printed no JSON ({e}):\n{}\nstderr:\n{}",
                self.args.join(" "),
                self.stdout,
                self.stderr
            )
        })
    }

    /// stderr parsed as JSON log lines (lines that are not JSON are skipped).
    pub fn log_lines(&self) -> Vec<Value> {
        json_lines(&self.stderr)
    }
}

/// A world that runs `converge` (a local or an SSH fleet): what it must say
/// (how to run a command, where its controller state is), and the read
/// commands every scenario asks through it.
pub trait Converge {
    /// Runs `converge ARGS...` to its end, killed and failing past `limit`.
    fn converge_within(&self, args: &[&str], limit: Duration) -> Run;

    /// The controller's state directory.
    fn state(&self) -> PathBuf;

    /// `converge ARGS... --state S --output json`, which must exit 0, as JSON.
    fn read_json(&self, args: &[&str]) -> Value {
        let state = self.state();
        let mut all = args.to_vec();
        all.extend([
            "--state",
            state.to_str().expect("utf-8"),
            "--output",
            "json",
        ]);
        let run = self.converge_within(&all, READ_LIMIT);
        run.assert_code(0);
        run.json()
    }

    /// The status of `key` (`machine/web`), from `converge status KEY`.
    fn status(&self, key: &str) -> Value {
        self.read_json(&["status", key])
    }

    /// `converge status`: one entry per object.
    fn statuses(&self) -> Vec<Value> {
        match self.read_json(&["status"]) {
            Value::Array(rows) => rows,
            other => panic!("status --output json is not an array: {other}"),
        }
    }

    /// The attempts of `key`, newest first, from `converge history KEY`.
    fn history(&self, key: &str) -> Vec<Value> {
        match self.read_json(&["history", key, "--limit", "1000"]) {
            Value::Array(rows) => rows,
            other => panic!("history --output json is not an array: {other}"),
        }
    }
}

/// Bound on one read command.
const READ_LIMIT: Duration = Duration::from_secs(120);

/// Polls `check` every 10 ms until it returns `Some`, failing after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() <= limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The condition `kind` of a status view (`{"key", "status": {"conditions"}}`).
pub fn condition<'a>(view: &'a Value, kind: &str) -> Option<&'a Value> {
    view["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["kind"] == kind)
}

/// Whether a status view says Ready=True.
pub fn is_ready(view: &Value) -> bool {
    condition(view, "Ready").is_some_and(|c| c["status"] == true)
}

/// `(status, reason, message)` of the Ready condition of a status view.
pub fn ready_of(view: &Value) -> (bool, String, String) {
    let c = condition(view, "Ready")
        .unwrap_or_else(|| panic!("no Ready condition in {view}"))
        .clone();
    (
        c["status"].as_bool().unwrap_or(false),
        c["reason"].as_str().unwrap_or("").to_owned(),
        c["message"].as_str().unwrap_or("").to_owned(),
    )
}

/// The `kind` of an attempt's result.
pub fn result_kind(attempt: &Value) -> &str {
    attempt["result"]["kind"].as_str().unwrap_or("")
}

/// Lines of a file; none when it does not exist.
pub fn read_lines(path: &Path) -> Vec<String> {
    read_text(path).lines().map(str::to_owned).collect()
}

/// A file's text (lossy UTF-8); empty when it does not exist.
pub fn read_text(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The JSON objects among `text`'s lines.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

/// Writes a file whole: beside it, synced, then renamed into place, so a
/// watcher never reads half of it.
pub fn write_atomically(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create a directory");
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".writing");
    let tmp = PathBuf::from(tmp);
    let mut file = fs::File::create(&tmp).expect("create a file");
    file.write_all(contents.as_bytes()).expect("write a file");
    file.sync_all().expect("sync a file");
    fs::rename(&tmp, path).expect("rename a file into place");
}
