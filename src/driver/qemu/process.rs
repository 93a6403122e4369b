//! Host processes for the QEMU driver: running `qemu-img` and friends with a
//! time bound, reading `/proc` to tell whether a pid is still a given QEMU,
//! sending SIGKILL, and watching a pid until it exits.
//!
//! Commands are argv vectors handed straight to `execve`; nothing here builds
//! a shell string. This module does not know what a VM is: it must not read
//! specs, choose arguments or interpret a tool's output beyond its exit status.
//! It uses no `unsafe`: signals go through the `kill` binary and exits are
//! noticed by polling `/proc` (pidfds would need `unsafe` for a process that
//! is not our child, and a daemonized QEMU never is).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// How often [`watch_exit`] looks at `/proc`.
pub const EXIT_POLL: Duration = Duration::from_millis(100);

/// How much of a tool's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// Why running or signalling a process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("run `{program}`: it is not installed ({hint})")]
    NotInstalled { program: String, hint: &'static str },
    #[error("run `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("run `{}`: no exit within {after:?}", program(argv))]
    Timeout { argv: Vec<String>, after: Duration },
    #[error("run `{}`: {status}: {stderr}", program(argv))]
    Failed {
        argv: Vec<String>,
        status: ExitStatus,
        stderr: String,
    },
    #[error("wait for `{}`", program(argv))]
    Wait {
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("send SIGKILL to pid {pid}: {stderr}")]
    Kill { pid: u32, stderr: String },
}

/// The program of an argv, for messages; the full argv stays in the error.
fn program(argv: &[String]) -> &str {
    argv.first().map_or("", String::as_str)
}

impl ProcessError {
    /// Missing tools and failed commands are terminal (the caller looks at the
    /// stderr when it knows better); timeouts and OS hiccups are transient.
    pub fn is_transient(&self) -> bool {
        match self {
            ProcessError::NotInstalled { .. } | ProcessError::Failed { .. } => false,
            ProcessError::Spawn { source, .. } | ProcessError::Wait { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
            ),
            ProcessError::Timeout { .. } | ProcessError::Kill { .. } => true,
        }
    }

    /// The stderr a failed command printed, if it failed that way.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            ProcessError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// What an install hint says for the tools this driver runs.
fn install_hint(program: &str) -> &'static str {
    if program.starts_with("qemu-system") {
        "install qemu-system-x86"
    } else if program.starts_with("qemu-img") {
        "install qemu-utils"
    } else {
        "install it"
    }
}

/// Builds a command from an argv with stdin closed and output captured.
/// `argv` must not be empty.
fn command(argv: &[String]) -> Command {
    let (program, args) = argv
        .split_first()
        .map_or(("", &[][..]), |(p, a)| (p.as_str(), a));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn spawn_error(argv: &[String], source: std::io::Error) -> ProcessError {
    let program = argv.first().cloned().unwrap_or_default();
    if source.kind() == std::io::ErrorKind::NotFound {
        ProcessError::NotInstalled {
            hint: install_hint(&program),
            program,
        }
    } else {
        ProcessError::Spawn { program, source }
    }
}

/// Runs `argv` to completion within `timeout` and returns its stdout. A
/// non-zero exit becomes [`ProcessError::Failed`] with the tail of stderr; on
/// timeout the process is killed (it is our child).
pub async fn run(argv: &[String], timeout: Duration) -> Result<Vec<u8>, ProcessError> {
    let child = command(argv).spawn().map_err(|e| spawn_error(argv, e))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| ProcessError::Timeout {
            argv: argv.to_vec(),
            after: timeout,
        })?
        .map_err(|source| ProcessError::Wait {
            argv: argv.to_vec(),
            source,
        })?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(ProcessError::Failed {
            argv: argv.to_vec(),
            status: output.status,
            stderr: tail(&output.stderr),
        })
    }
}

/// Runs a program that daemonizes (its first process exits once the daemon
/// is ready) and waits for that first process within `timeout`. The daemon
/// is not our child: it survives this process, even SIGKILL of it. On
/// timeout the first process is killed; the caller cleans up any daemon.
pub async fn run_daemonizing(argv: &[String], timeout: Duration) -> Result<(), ProcessError> {
    let mut child = command(argv).spawn().map_err(|e| spawn_error(argv, e))?;
    let stderr = child.stderr.take();
    // Read stderr alongside: the daemon holds the pipe until it detaches, so
    // waiting for EOF first could outlast the exit we are waiting for.
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_end(&mut buf).await;
        }
        buf
    });
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let status = match waited {
        Err(_) => {
            let _ = child.start_kill();
            reader.abort();
            return Err(ProcessError::Timeout {
                argv: argv.to_vec(),
                after: timeout,
            });
        }
        Ok(Err(source)) => {
            reader.abort();
            return Err(ProcessError::Wait {
                argv: argv.to_vec(),
                source,
            });
        }
        Ok(Ok(status)) => status,
    };
    if status.success() {
        reader.abort();
        return Ok(());
    }
    let stderr = match tokio::time::timeout(Duration::from_secs(1), reader).await {
        Ok(Ok(buf)) => tail(&buf),
        _ => String::new(),
    };
    Err(ProcessError::Failed {
        argv: argv.to_vec(),
        status,
        stderr,
    })
}

/// The last few KiB of a tool's output, as text, trimmed.
fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

/// What `/proc/<pid>` says about a live (non-zombie) process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    /// Clock ticks after boot at which it started: with the pid, identifies
    /// the process across pid reuse.
    pub start_ticks: u64,
    pub argv: Vec<String>,
}

/// Reads `/proc/<pid>`; `None` when there is no such process or it is a
/// zombie (an exited daemon whose reaper does not reap still has a pid).
pub async fn proc_info(pid: u32) -> Option<ProcInfo> {
    let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .ok()?;
    let (state, start_ticks) = parse_stat(&stat)?;
    if matches!(state, 'Z' | 'X' | 'x') {
        return None;
    }
    let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    let argv = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(ProcInfo {
        pid,
        start_ticks,
        argv,
    })
}

/// The state letter and start time (field 22) of a `/proc/<pid>/stat` line.
/// The command name may contain spaces and parentheses, so fields are counted
/// after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), field 22 is the 19th further field.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Reads a pidfile; `None` when it is missing or does not hold a pid.
pub async fn read_pidfile(path: &Path) -> Option<u32> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    text.trim().parse().ok().filter(|pid| *pid > 1)
}

/// Whether `info` is a QEMU that was started with `pidfile` as its
/// `-pidfile`: that is how a VM directory recognizes its own process and
/// never mistakes a reused pid for it. Paths are compared canonicalized when
/// they exist, literally otherwise.
pub fn is_qemu_with_pidfile(info: &ProcInfo, pidfile: &Path) -> bool {
    let is_qemu = info
        .argv
        .first()
        .and_then(|p| Path::new(p).file_name())
        .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system"));
    let their = info
        .argv
        .windows(2)
        .find(|w| w[0] == "-pidfile")
        .map(|w| PathBuf::from(&w[1]));
    is_qemu && their.is_some_and(|their| same_path(&their, pidfile))
}

fn same_path(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    // The pidfile may be gone already (QEMU removes it while exiting): compare
    // the directories, which outlive it.
    let canon = |p: &Path| {
        let dir = p.parent()?.canonicalize().ok()?;
        Some(dir.join(p.file_name()?))
    };
    matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}

/// Sends SIGKILL through the `kill` binary. A pid that is already gone is
/// not an error.
pub async fn kill9(pid: u32) -> Result<(), ProcessError> {
    let argv = vec!["kill".to_owned(), "-KILL".to_owned(), pid.to_string()];
    match run(&argv, Duration::from_secs(5)).await {
        Ok(_) => Ok(()),
        Err(_) if proc_info(pid).await.is_none() => Ok(()),
        Err(ProcessError::Failed { stderr, .. }) => Err(ProcessError::Kill { pid, stderr }),
        Err(other) => Err(other),
    }
}

/// Completes when the process that has `pid` now is gone (exited, a zombie,
/// or the pid reused by another process). Polls every [`EXIT_POLL`]; if the
/// pid is already gone it completes at once. Cancel safe.
pub async fn watch_exit(pid: u32) {
    let Some(first) = proc_info(pid).await else {
        return;
    };
    loop {
        tokio::time::sleep(EXIT_POLL).await;
        match proc_info(pid).await {
            Some(now) if now.start_ticks == first.start_ticks => {}
            _ => return,
        }
    }
}

/// Waits up to `within` for `pid` to be gone; returns whether it is.
pub async fn wait_exit(pid: u32, within: Duration) -> bool {
    tokio::time::timeout(within, watch_exit(pid)).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let stat = "4242 (qemu (x) y) S 1 4240 4240 0 -1 4194624 100 0 0 0 5 3 0 0 20 0 3 0 987654 123 4 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 987_654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test]
    async fn a_failing_command_reports_status_and_stderr() {
        let err = run(
            &argv(&["sh", "-c", "echo boom >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(err.stderr(), Some("boom"));
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn a_missing_program_is_terminal_and_names_the_package() {
        let err = run(&argv(&["qemu-img-does-not-exist"]), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::NotInstalled { .. }), "{err}");
        assert!(err.to_string().contains("qemu-utils"));
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn a_slow_command_times_out_transiently() {
        let err = run(&argv(&["sleep", "5"]), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }));
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn watch_exit_completes_when_a_killed_process_is_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id().unwrap();
        let info = proc_info(pid).await.unwrap();
        assert_eq!(info.argv, argv(&["sleep", "30"]));
        assert!(!wait_exit(pid, Duration::from_millis(300)).await);
        kill9(pid).await.unwrap();
        // Our own child stays a zombie until reaped: watch_exit treats that as gone.
        assert!(wait_exit(pid, Duration::from_secs(2)).await);
        let _ = child.wait().await;
        kill9(pid).await.unwrap();
    }
}
