//! Drivers: the only code in converge that spawns processes or touches a
//! machine. This file holds the capability seam the rest of the crate depends
//! on: the [`Target`] trait (run a command, upload a directory tree), its
//! error type, and the bounded [`CommandOutput`]. Concrete targets live in
//! their own files (`local.rs`, `ssh.rs`) and the machine protocol in
//! `machine.rs` is written once over [`Target`]. Nothing here may know about
//! specs, plans or the store, and nothing here builds a shell string: commands
//! are argv vectors, and where a shell is needed it runs a constant script with
//! its inputs as positional arguments.

pub mod build;
pub mod capability;
pub mod console;
pub mod git;
pub mod host;
pub mod hypervisor;
pub mod local;
pub mod protocol;
pub mod qemu;
pub mod ssh;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt};

/// How many bytes of each output stream a driver keeps: the last 64 KiB.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// What a finished command left behind.
///
/// `stdout` and `stderr` each hold at most the last [`OUTPUT_LIMIT`] bytes of
/// their stream, decoded as lossy UTF-8 (a character cut at the start of the
/// kept window shows as U+FFFD). Earlier output is dropped, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code; `None` when the process was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// True only for a normal exit with code 0.
    pub fn succeeded(&self) -> bool {
        self.code == Some(0)
    }
}

/// A host that commands run on and files are uploaded to.
///
/// Implementations must make every operation end by its timeout, and must not
/// leave anything behind that a later call could mistake for a finished
/// result (see [`Target::upload_dir`]).
pub trait Target: Send + Sync {
    /// Human description for logs ("local:/var/lib/x" or "root@10.0.0.5:22").
    fn describe(&self) -> String;

    /// Runs `argv` on the target with extra env vars added to its environment,
    /// killing it (its whole process group) at the timeout.
    ///
    /// Returns once the process has exited and closed its stdout and stderr: a
    /// command that leaves a process holding them open counts as still running.
    /// A non-zero exit is `Ok` (look at [`CommandOutput::code`]); a timeout is
    /// [`TargetError::Timeout`]. Stdin is empty. Processes that detach into
    /// their own session on purpose (`setsid`) are not killed.
    fn run(
        &self,
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> impl Future<Output = Result<CommandOutput, TargetError>> + Send;

    /// Copies a local directory tree to `dest` on the target: first into a
    /// temporary sibling, renamed to `dest` only when complete, so an
    /// interrupted copy is never mistaken for a complete one. Keeps the
    /// executable bit and symlinks.
    ///
    /// `dest` must not exist and its parent must. Regular files, directories
    /// and symlinks are copied; any other file type is an error.
    fn upload_dir(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;
}

/// Why a [`Target`] operation failed. Says nothing about a command's own exit
/// code: that is in [`CommandOutput`].
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("spawn `{}` on {target}", argv_summary(.argv))]
    Spawn {
        target: String,
        argv: Vec<String>,
        #[source]
        source: io::Error,
    },
    #[error("wait for `{}` on {target}", argv_summary(.argv))]
    Wait {
        target: String,
        argv: Vec<String>,
        #[source]
        source: io::Error,
    },
    #[error("finish {what} on {target} within {after:?}")]
    Timeout {
        target: String,
        what: String,
        after: Duration,
    },
    #[error("{action} {path} on {target}")]
    Io {
        target: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Connecting to or talking with an SSH target failed; the source says
    /// whether a retry can help (a wrong host key cannot, a dropped link can).
    #[error("reach {target} over ssh")]
    Ssh {
        target: String,
        #[source]
        source: Box<ssh::SshError>,
    },
    #[error("reach {target}")]
    Unreachable {
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl TargetError {
    /// True when trying again later may succeed (a timeout, a lost
    /// connection, a busy system); false for a missing program, a missing or
    /// unreadable file, an unsupported file type.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unreachable { .. } => true,
            Self::Ssh { source, .. } => source.is_transient(),
            Self::Spawn { source, .. } | Self::Wait { source, .. } | Self::Io { source, .. } => {
                io_is_transient(source)
            }
        }
    }

    /// True for [`TargetError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }
}

/// Sorts an IO error by whether a retry can help: errors about the request
/// itself (not found, permission, bad input, wrong type) cannot.
pub(crate) fn io_is_transient(error: &io::Error) -> bool {
    !matches!(
        error.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidData
            | io::ErrorKind::AlreadyExists
            | io::ErrorKind::Unsupported
    )
}

/// Reads `reader` to its end into `buf`, keeping only the last `limit` bytes.
///
/// Appends to `buf` as it goes, so a caller that abandons this future (at a
/// timeout) still has everything read so far.
pub(crate) async fn read_tail<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<()> {
    let mut chunk = [0u8; 8192];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            trim_front(buf, limit);
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        // Trimming only past twice the limit keeps the copying amortised.
        if buf.len() > limit.saturating_mul(2) {
            trim_front(buf, limit);
        }
    }
}

/// Drops all but the last `limit` bytes of `buf`.
pub(crate) fn trim_front(buf: &mut Vec<u8>, limit: usize) {
    if buf.len() > limit {
        let excess = buf.len() - limit;
        buf.drain(..excess);
    }
}

/// Renders argv for messages and logs: arguments joined by spaces, each cut
/// to 60 characters, and an `sh -c` script shown by its first line only (the
/// scripts converge embeds open with a comment naming them).
pub(crate) fn argv_summary(argv: &[String]) -> String {
    fn cut(arg: &str) -> String {
        match arg.char_indices().nth(60) {
            Some((at, _)) => format!("{}...", &arg[..at]),
            None => arg.to_owned(),
        }
    }
    let mut parts = Vec::with_capacity(argv.len());
    let mut script_next = false;
    for (i, arg) in argv.iter().enumerate() {
        if script_next {
            parts.push(cut(arg.lines().next().unwrap_or_default()));
            script_next = false;
        } else {
            script_next = i == 1 && arg == "-c" && argv[0].ends_with("sh");
            parts.push(cut(arg));
        }
    }
    parts.join(" ")
}

/// "exit code N", or "killed by a signal" for a process without one.
pub(crate) fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_owned(),
    }
}

/// A name component unique within this host for the life of the process and
/// across processes (pid, clock, counter), made of `[0-9a-f-]` only, for
/// temporary files and activation attempts.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}-{:x}", std::process::id(), nanos, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_tail_keeps_only_the_last_bytes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut buf = Vec::new();
        read_tail(&mut data.as_slice(), &mut buf, 1000)
            .await
            .expect("read from a slice");
        assert_eq!(buf, data[data.len() - 1000..]);
    }

    #[test]
    fn unique_suffixes_differ() {
        let a = unique_suffix();
        let b = unique_suffix();
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
    }
}
