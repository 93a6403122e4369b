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

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// What a command reads on its stdin: bytes and files, in order, streamed
/// (a file is read in chunks as it is sent, never held whole in memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Input {
    parts: Vec<InputPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum InputPart {
    Bytes(Vec<u8>),
    /// Exactly `len` bytes of the file at `path` (it must not shrink or grow
    /// while it is sent: that is an error, not a short read).
    File {
        path: PathBuf,
        len: u64,
    },
}

/// No input: stdin is empty.
pub static NO_INPUT: Input = Input { parts: Vec::new() };

/// Why writing an [`Input`] stopped.
#[derive(Debug)]
pub enum InputError {
    /// A file of the input could not be read as it was when listed.
    Source { path: PathBuf, source: io::Error },
    /// The command stopped reading (it exited, or the connection went):
    /// its exit status says what happened.
    Sink(io::Error),
}

impl Input {
    pub fn bytes(bytes: impl Into<Vec<u8>>) -> Input {
        Input {
            parts: vec![InputPart::Bytes(bytes.into())],
        }
    }

    pub fn push_bytes(&mut self, bytes: impl Into<Vec<u8>>) {
        let bytes = bytes.into();
        if let Some(InputPart::Bytes(last)) = self.parts.last_mut() {
            last.extend_from_slice(&bytes);
        } else {
            self.parts.push(InputPart::Bytes(bytes));
        }
    }

    /// Appends all of `other`.
    pub fn append(&mut self, other: &Input) {
        for part in &other.parts {
            match part {
                InputPart::Bytes(bytes) => self.push_bytes(bytes.clone()),
                InputPart::File { .. } => self.parts.push(part.clone()),
            }
        }
    }

    /// Appends `len` bytes read from the file at `path` when sent.
    pub fn push_file(&mut self, path: impl Into<PathBuf>, len: u64) {
        self.parts.push(InputPart::File {
            path: path.into(),
            len,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many bytes the input is.
    pub fn len(&self) -> u64 {
        self.parts
            .iter()
            .map(|part| match part {
                InputPart::Bytes(bytes) => bytes.len() as u64,
                InputPart::File { len, .. } => *len,
            })
            .sum()
    }

    /// Writes the whole input to `sink`, then shuts it down (the command
    /// sees end of file).
    pub async fn write_to<W: AsyncWrite + Unpin>(&self, sink: &mut W) -> Result<(), InputError> {
        let mut chunk = vec![0u8; 64 * 1024];
        for part in &self.parts {
            match part {
                InputPart::Bytes(bytes) => sink.write_all(bytes).await.map_err(InputError::Sink)?,
                InputPart::File { path, len } => {
                    let source = |source| InputError::Source {
                        path: path.clone(),
                        source,
                    };
                    let mut file = tokio::fs::File::open(path).await.map_err(source)?;
                    let mut left = *len;
                    while left > 0 {
                        let want =
                            usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
                        let n = file.read(&mut chunk[..want]).await.map_err(source)?;
                        if n == 0 {
                            return Err(source(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the file shrank while it was sent",
                            )));
                        }
                        sink.write_all(&chunk[..n])
                            .await
                            .map_err(InputError::Sink)?;
                        left -= n as u64;
                    }
                }
            }
        }
        sink.shutdown().await.map_err(InputError::Sink)
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
    ) -> impl Future<Output = Result<CommandOutput, TargetError>> + Send {
        self.run_input(argv, env, &NO_INPUT, timeout)
    }

    /// [`Target::run`] with `input` streamed to the command's stdin (then
    /// closed). A file of the input that cannot be read as listed is
    /// [`TargetError::Io`]; a command that stops reading early is judged by
    /// its exit status. At the timeout the command's process group gets
    /// SIGTERM, then SIGKILL after a short grace.
    fn run_input(
        &self,
        argv: &[String],
        env: &[(String, String)],
        input: &Input,
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
