//! Running one command over the master: argv wrapped for a constant script
//! (`run.sh`, under `sudo -n --` when the target asks for root) that
//! reports the remote process group, exports the
//! environment and execs argv; stdout and stderr read to their last 64 KiB,
//! the wrapper's marker lines taken out of stderr; the remote process group
//! killed at the timeout; a dead master told apart from a failed command.
//! It must not build a shell string with `format!`: every word travels as
//! an argument of the constant script.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openssh::{Session, Stdio};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Instant, timeout_at};

use super::error::SshError;
use super::master::{SshTarget, open_again_if_refused};
use crate::driver::command::{argv_summary, read_tail};
use crate::driver::target::{CommandOutput, Input, InputError, OUTPUT_LIMIT, Target, TargetError};

/// Runs every command: reports its process group, exports env, execs argv.
const RUN_SCRIPT: &str = include_str!("run.sh");
/// How long ending a timed-out remote command may take (its grace included).
const KILL_TIMEOUT: Duration = Duration::from_secs(8);
/// SIGTERM to process group $1, then SIGKILL if any of it is left 2 s later.
const KILL_GROUP_SCRIPT: &str = "# converge: end process group $1 (TERM, then KILL after 2 s)
kill -TERM -\"$1\" 2>/dev/null || exit 0
i=0
while kill -0 -\"$1\" 2>/dev/null; do
	[ \"$i\" -ge 20 ] && { kill -KILL -\"$1\" 2>/dev/null; exit 0; }
	sleep 0.1
	i=$((i + 1))
done";

impl SshTarget {
    /// Ends a timed-out command's process group on the target, best effort:
    /// SIGTERM, then SIGKILL when any of the group is left after a grace.
    async fn kill_group(&self, session: &Arc<Session>, pgid: u32) {
        let mut command = Session::to_command(Arc::clone(session), self.program());
        command
            .args(self.sudo_args())
            .arg("-c")
            .arg(KILL_GROUP_SCRIPT)
            .arg("converge-kill")
            .arg(pgid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match tokio::time::timeout(KILL_TIMEOUT, command.status()).await {
            Ok(Ok(status)) if status.success() => {}
            other => {
                tracing::debug!(target_host = %self.describe(), pgid, ?other, "ending a timed-out remote command did not succeed")
            }
        }
    }

    /// The remote program every command starts with: `sh`, or `sudo` when
    /// commands run as root (then [`Self::sudo_args`] come first).
    fn program(&self) -> &'static str {
        if self.options.sudo { "sudo" } else { "sh" }
    }

    /// `-n -- sh` when commands run as root through sudo: never a prompt.
    fn sudo_args(&self) -> &'static [&'static str] {
        if self.options.sudo {
            &["-n", "--", "sh"]
        } else {
            &[]
        }
    }

    /// Runs `argv` until `deadline` ([`Target::run`] without the deadline
    /// arithmetic); `timeout` is what a timeout error reports.
    pub(super) async fn run_inner(
        &self,
        argv: &[String],
        env: &[(String, String)],
        input: &Input,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        let target = self.describe();
        let timed_out = || TargetError::Timeout {
            target: target.clone(),
            what: argv_summary(argv),
            after: timeout,
        };
        let wrapped = wrap_argv(argv, env).map_err(|source| TargetError::Spawn {
            target: target.clone(),
            argv: argv.to_vec(),
            source,
        })?;
        let _permit = timeout_at(deadline, self.sessions.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_closed| TargetError::Spawn {
                target: target.clone(),
                argv: argv.to_vec(),
                source: io::Error::other("session limit closed"),
            })?;
        let session = timeout_at(deadline, self.master())
            .await
            .map_err(|_| timed_out())??;
        tracing::debug!(target_host = %target, argv = %argv_summary(argv), "running command over ssh");
        let spawn = open_again_if_refused(&target, || {
            let mut command = Session::to_command(Arc::clone(&session), self.program());
            command
                .args(self.sudo_args())
                .args(&wrapped)
                .stdin(if input.is_empty() {
                    Stdio::null()
                } else {
                    Stdio::piped()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            async move { command.spawn().await }
        });
        let mut child = match timeout_at(deadline, spawn).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(source)) => {
                self.lost_connection(&session, clone_error(&source)).await?;
                return Err(self.ssh_error(SshError::Session {
                    destination: self.destination(),
                    source,
                }));
            }
            Ok(Ok(child)) => child,
        };
        let mut stdout = child.stdout().take();
        let mut stderr = child.stderr().take();
        let mut stdin = child.stdin().take();
        let mut out_buf = Vec::new();
        let mut err_buf = Vec::new();
        let mut pgid = None;
        let mut not_found = false;
        let mut wrapper_started = false;
        let mut fed = None;
        let waited = timeout_at(deadline, async {
            let feed = async {
                // Dropping stdin at the end closes it: the command sees EOF.
                if let Some(mut sink) = stdin.take() {
                    fed = input.write_to(&mut sink).await.err();
                }
            };
            let ((), out, err) = tokio::join!(
                feed,
                read_optional(stdout.as_mut(), &mut out_buf),
                read_marked_stderr(
                    stderr.as_mut(),
                    &mut err_buf,
                    &mut pgid,
                    &mut not_found,
                    &mut wrapper_started,
                ),
            );
            // Wait only after both streams ended: `wait` returns at the
            // master's exit message and then drops the mux connection, and
            // the master discards output it has not written yet when that
            // connection goes (seen as truncated output in ~3% of runs;
            // same family as openssh-rust/openssh#103).
            let status = child.wait().await;
            (out.and(err), status)
        })
        .await;
        let (read, status) = match waited {
            Ok(result) => result,
            Err(_elapsed) => {
                // The child (and with it the channel) is gone; the remote
                // processes may not be: end their group.
                if let Some(pgid) = pgid {
                    self.kill_group(&session, pgid).await;
                }
                return Err(timed_out());
            }
        };
        if let Some(InputError::Source { path, source }) = fed {
            return Err(TargetError::Io {
                target,
                action: "read, to send it,",
                path,
                source,
            });
        }
        let code = match status {
            Ok(status) => status.code(),
            Err(openssh::Error::Remote(e)) if e.kind() == io::ErrorKind::NotFound => {
                if not_found {
                    return Err(TargetError::Spawn {
                        target,
                        argv: argv.to_vec(),
                        source: io::Error::new(
                            io::ErrorKind::NotFound,
                            "program not found on the target",
                        ),
                    });
                }
                // A command that exited 127 on its own.
                Some(127)
            }
            Err(openssh::Error::RemoteProcessTerminated) => {
                // Killed by a signal, or the connection died: ask the master.
                self.lost_connection(&session, openssh::Error::RemoteProcessTerminated)
                    .await?;
                None
            }
            Err(source) => {
                self.lost_connection(&session, clone_error(&source)).await?;
                return Err(TargetError::Wait {
                    target,
                    argv: argv.to_vec(),
                    source: io::Error::other(source),
                });
            }
        };
        if let Err(source) = read {
            self.lost_connection(
                &session,
                openssh::Error::ChildIo(io::Error::new(source.kind(), source.to_string())),
            )
            .await?;
            return Err(TargetError::Wait {
                target,
                argv: argv.to_vec(),
                source,
            });
        }
        if self.options.sudo && !wrapper_started && matches!(code, Some(1 | 127)) {
            // sudo stopped (1), or is missing (127), before the wrapper ran:
            // nothing of argv ran.
            let stderr = lossy(err_buf);
            return Err(self.ssh_error(SshError::SudoRefused {
                destination: self.destination(),
                message: stderr
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or("no message")
                    .to_owned(),
            }));
        }
        Ok(CommandOutput {
            code,
            stdout: lossy(out_buf),
            stderr: lossy(err_buf),
        })
    }
}

/// openssh errors are not Clone; this keeps what matters for classifying.
fn clone_error(error: &openssh::Error) -> openssh::Error {
    match error {
        openssh::Error::Disconnected => openssh::Error::Disconnected,
        openssh::Error::RemoteProcessTerminated => openssh::Error::RemoteProcessTerminated,
        other => openssh::Error::ChildIo(io::Error::other(other.to_string())),
    }
}

/// argv for `sh -c RUN_SCRIPT converge N NAME=VALUE... argv...`, after
/// checking the inputs the wrapper relies on.
fn wrap_argv(argv: &[String], env: &[(String, String)]) -> io::Result<Vec<String>> {
    if argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"));
    }
    let mut wrapped = Vec::with_capacity(argv.len() + env.len() + 4);
    wrapped.extend(["-c", RUN_SCRIPT, "converge"].map(str::to_owned));
    wrapped.push(env.len().to_string());
    for (name, value) in env {
        let valid = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("environment variable name {name:?} is not [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        wrapped.push(format!("{name}={value}"));
    }
    if argv.iter().any(|a| a.contains('\0')) || env.iter().any(|(_, v)| v.contains('\0')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument contains a NUL byte",
        ));
    }
    wrapped.extend(argv.iter().cloned());
    Ok(wrapped)
}

async fn read_optional<R: AsyncRead + Unpin>(
    reader: Option<&mut R>,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    match reader {
        Some(reader) => read_tail(reader, buf, OUTPUT_LIMIT).await,
        None => Ok(()),
    }
}

/// Reads stderr, taking out the wrapper's marker lines (`converge-pgid=`,
/// `converge-not-found=`) from its first 4 KiB; the rest is kept like stdout.
async fn read_marked_stderr<R: AsyncRead + Unpin>(
    reader: Option<&mut R>,
    buf: &mut Vec<u8>,
    pgid: &mut Option<u32>,
    not_found: &mut bool,
    wrapper_started: &mut bool,
) -> io::Result<()> {
    const HEAD: usize = 4096;
    let Some(reader) = reader else {
        return Ok(());
    };
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut marker_seen = false;
    // Until the pgid marker: lines before it (a login script's chatter) are output.
    while !marker_seen && head.len() < HEAD {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
        while let Some(end) = head.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = head.drain(..=end).collect();
            if let Some(value) = line.strip_prefix(b"converge-pgid=") {
                *pgid = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
                marker_seen = true;
                break;
            }
            buf.extend_from_slice(&line);
        }
    }
    *wrapper_started = marker_seen;
    buf.append(&mut head);
    read_tail(reader, buf, OUTPUT_LIMIT).await?;
    // The not-found marker is the last line the wrapper writes before exit 127.
    let text = String::from_utf8_lossy(buf);
    if let Some(at) = text.rfind("converge-not-found=") {
        if text[at..].lines().count() <= 1 && (at == 0 || text.as_bytes()[at - 1] == b'\n') {
            *not_found = true;
        }
    }
    Ok(())
}

fn lossy(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
    }
}
