//! The capability seam every driver is written against: the [`Target`] trait
//! (run a command, upload a directory tree, each bounded by a timeout), its
//! error [`TargetError`] (which says whether a retry can help), and the
//! bounded [`CommandOutput`]. Concrete targets live in their own files
//! (`local.rs`, `ssh/`) and the machine protocol (`protocol/`) is written once
//! over [`Target`]. Nothing here may know about specs, plans or the store, or
//! name a concrete target other than the SSH error it carries; and nothing
//! here builds a shell string: commands are argv vectors.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::command::{argv_summary, io_is_transient};
use super::ssh::error::SshError;

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
        source: Box<SshError>,
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
