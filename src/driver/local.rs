//! The controller's own host as a [`Target`]: commands run as child processes
//! in their own process group (killed as a group at the timeout, or when the
//! caller drops the future), and uploads are recursive copies in Rust that
//! appear at their destination by one rename. Also home of the process runner
//! the builder shares. It must not interpret what it runs (no shell unless the
//! argv asks for one) and must not leave a half-copied tree at a destination.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::process::Command;

use super::command::{argv_summary, read_tail, unique_suffix};
use super::target::{CommandOutput, Input, InputError, OUTPUT_LIMIT, Target, TargetError};

/// How long a killed command's pipes are drained for its last output.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// How long the `kill` binary may take to signal a process group.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a timed-out command's group has between SIGTERM and SIGKILL.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);

/// This host. Holds only a label for logs; paths are given per call, so many
/// local machines (each with its own state directory) can share one host.
#[derive(Debug, Clone)]
pub struct LocalTarget {
    label: String,
}

impl LocalTarget {
    /// A local target described as `local:<label>` (use the state directory).
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
        }
    }
}

impl Default for LocalTarget {
    /// A local target described as `local`.
    fn default() -> Self {
        Self::new("")
    }
}

impl Target for LocalTarget {
    fn describe(&self) -> String {
        if self.label.is_empty() {
            "local".to_owned()
        } else {
            format!("local:{}", self.label)
        }
    }

    async fn run_input(
        &self,
        argv: &[String],
        env: &[(String, String)],
        input: &Input,
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        let target = self.describe();
        let finished = run_process(&target, argv, env, input, None, timeout).await?;
        if finished.timed_out {
            return Err(TargetError::Timeout {
                target,
                what: argv_summary(argv),
                after: timeout,
            });
        }
        Ok(finished.output)
    }

    async fn upload_dir(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        let target = self.describe();
        let src = src.to_path_buf();
        let dest = PathBuf::from(dest);
        let mut partial = dest.clone().into_os_string();
        partial.push(format!(".partial-{}", unique_suffix()));
        let partial = PathBuf::from(partial);

        let phase = Arc::new(AtomicU8::new(RUNNING));
        // Dropping the upload future cancels the copy the same way a timeout does.
        let _cancel_on_drop = CancelOnDrop(Arc::clone(&phase));
        let job_phase = Arc::clone(&phase);
        let job_dest = dest.clone();
        let mut job = tokio::task::spawn_blocking(move || {
            copy_then_rename(&src, &partial, &job_dest, &job_phase)
        });
        let joined = match tokio::time::timeout(timeout, &mut job).await {
            Ok(joined) => joined,
            Err(_elapsed) => {
                if cancel(&phase) {
                    return Err(TargetError::Timeout {
                        target,
                        what: format!("upload to {}", dest.display()),
                        after: timeout,
                    });
                }
                // The copy was complete and is being renamed: its result stands.
                job.await
            }
        };
        let copied = joined.map_err(|join_error| TargetError::Io {
            target: target.clone(),
            action: "copy a tree to",
            path: dest.clone(),
            source: io::Error::other(join_error),
        })?;
        copied.map_err(|failure| TargetError::Io {
            target,
            action: failure.action,
            path: failure.path,
            source: failure.source,
        })
    }
}

/// A process that ran to its end or was killed at its timeout.
pub(crate) struct Finished {
    /// On a timeout, `code` is `None` and the streams hold what was read
    /// before the kill (and during a short drain after it).
    pub output: CommandOutput,
    pub timed_out: bool,
}

/// Runs `argv` as a child of this process in a new process group, with `env`
/// added to the inherited environment, `input` on stdin, and `cwd` when
/// given.
///
/// At the timeout the whole process group gets SIGTERM, then SIGKILL after
/// [`TERM_GRACE`]; when the returned future is dropped, SIGKILL at once
/// (through the `kill` binary: converge forbids unsafe code). Output is
/// bounded per stream by [`OUTPUT_LIMIT`].
pub(crate) async fn run_process(
    target: &str,
    argv: &[String],
    env: &[(String, String)],
    input: &Input,
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<Finished, TargetError> {
    let spawn_error = |source: io::Error| TargetError::Spawn {
        target: target.to_owned(),
        argv: argv.to_vec(),
        source,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(spawn_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "argv is empty",
        )));
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .stdin(if input.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    tracing::debug!(target_host = target, argv = %argv_summary(argv), "running command");
    let mut child = command.spawn().map_err(spawn_error)?;
    // With process_group(0) the group id is the child's pid.
    let mut group = GroupGuard { pgid: child.id() };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut stdin = child.stdin.take();
    let mut out_buf = Vec::new();
    let mut err_buf = Vec::new();

    let waited: Result<io::Result<(ExitStatus, Option<InputError>)>, _> =
        tokio::time::timeout(timeout, async {
            let feed = async {
                // Dropping stdin at the end closes it: the command sees EOF.
                match stdin.take() {
                    Some(mut sink) => input.write_to(&mut sink).await.err(),
                    None => None,
                }
            };
            let (fed, out, err, status) = tokio::join!(
                feed,
                read_optional(stdout.as_mut(), &mut out_buf),
                read_optional(stderr.as_mut(), &mut err_buf),
                child.wait(),
            );
            out?;
            err?;
            Ok((status?, fed))
        })
        .await;

    match waited {
        Ok(Ok((_, Some(InputError::Source { path, source })))) => {
            group.kill().await;
            Err(TargetError::Io {
                target: target.to_owned(),
                action: "read, to send it,",
                path,
                source,
            })
        }
        Ok(Ok((status, _))) => {
            group.disarm();
            Ok(Finished {
                output: CommandOutput {
                    code: status.code(),
                    stdout: lossy(out_buf),
                    stderr: lossy(err_buf),
                },
                timed_out: false,
            })
        }
        Ok(Err(source)) => {
            group.kill().await;
            // Reaps the child; its own error says nothing more than `source`.
            let _ = child.kill().await;
            Err(TargetError::Wait {
                target: target.to_owned(),
                argv: argv.to_vec(),
                source,
            })
        }
        Err(_elapsed) => {
            // TERM first, so the command can clean up; KILL if it lingers.
            group
                .terminate(async {
                    let _ = child.wait().await;
                })
                .await;
            let _ = child.kill().await;
            // A process that escaped the group can hold the pipes open: drain briefly only.
            let _ = tokio::time::timeout(DRAIN_GRACE, async {
                tokio::join!(
                    read_optional(stdout.as_mut(), &mut out_buf),
                    read_optional(stderr.as_mut(), &mut err_buf),
                )
            })
            .await;
            Ok(Finished {
                output: CommandOutput {
                    code: None,
                    stdout: lossy(out_buf),
                    stderr: lossy(err_buf),
                },
                timed_out: true,
            })
        }
    }
}

async fn read_optional<R: tokio::io::AsyncRead + Unpin>(
    reader: Option<&mut R>,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    match reader {
        Some(reader) => read_tail(reader, buf, OUTPUT_LIMIT).await,
        None => Ok(()),
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
    }
}

/// Kills a process group unless disarmed: explicitly at a timeout, or from
/// `Drop` when the future running the command is abandoned.
struct GroupGuard {
    pgid: Option<u32>,
}

impl GroupGuard {
    fn disarm(&mut self) {
        self.pgid = None;
    }

    /// SIGKILL to the group at once.
    async fn kill(&mut self) {
        let Some(pgid) = self.pgid.take() else {
            return;
        };
        signal_group(pgid, "-KILL").await;
    }

    /// SIGTERM to the group, then SIGKILL once `exited` has not completed
    /// within [`TERM_GRACE`].
    async fn terminate(&mut self, exited: impl std::future::Future<Output = ()>) {
        let Some(pgid) = self.pgid.take() else {
            return;
        };
        signal_group(pgid, "-TERM").await;
        if tokio::time::timeout(TERM_GRACE, exited).await.is_err() {
            signal_group(pgid, "-KILL").await;
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // Drop cannot await; a short-lived thread waits for `kill` so it is reaped.
            let spawned = std::thread::Builder::new()
                .name("converge-kill".to_owned())
                .spawn(move || {
                    let _ = std::process::Command::new("kill")
                        .args(kill_args(pgid))
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                });
            if let Err(error) = spawned {
                tracing::warn!(pgid, %error, "could not kill an abandoned process group");
            }
        }
    }
}

fn kill_args(pgid: u32) -> [String; 3] {
    ["-KILL".to_owned(), "--".to_owned(), format!("-{pgid}")]
}

/// Sends `signal` (`-TERM`, `-KILL`) to process group `pgid`, best effort.
async fn signal_group(pgid: u32, signal: &str) {
    let mut command = Command::new("kill");
    command
        .args([signal, "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = tokio::time::timeout(KILL_TIMEOUT, command.status()).await;
    if !matches!(status, Ok(Ok(ref s)) if s.success()) {
        tracing::debug!(
            pgid,
            signal,
            ?status,
            "signalling a process group did not succeed"
        );
    }
}

const RUNNING: u8 = 0;
const COMMITTING: u8 = 1;
const CANCELLED: u8 = 2;

/// Moves a copy from running to cancelled; false when it is already renaming.
fn cancel(phase: &AtomicU8) -> bool {
    phase
        .compare_exchange(RUNNING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

struct CancelOnDrop(Arc<AtomicU8>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        cancel(&self.0);
    }
}

/// A failed filesystem operation during a copy, before the target is known.
struct CopyFailure {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn at(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CopyFailure {
    move |source| CopyFailure {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `src` into the new directory `partial`, then renames it to `dest`
/// unless cancelled first. Removes `partial` on any failure.
fn copy_then_rename(
    src: &Path,
    partial: &Path,
    dest: &Path,
    phase: &AtomicU8,
) -> Result<(), CopyFailure> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(CopyFailure {
            action: "upload to",
            path: dest.to_path_buf(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "destination exists"),
        });
    }
    let root = fs::metadata(src).map_err(at("read", src))?;
    if !root.is_dir() {
        return Err(CopyFailure {
            action: "upload",
            path: src.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    fs::create_dir(partial).map_err(at("create", partial))?;
    let copied = copy_tree(src, partial, phase)
        .and_then(|()| {
            fs::set_permissions(partial, root.permissions())
                .map_err(at("set permissions of", partial))
        })
        .and_then(|()| {
            if phase
                .compare_exchange(RUNNING, COMMITTING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                fs::rename(partial, dest).map_err(at("rename into place", dest))
            } else {
                Err(cancelled(dest))
            }
        });
    if copied.is_err() {
        if let Err(error) = fs::remove_dir_all(partial) {
            tracing::warn!(path = %partial.display(), %error, "could not remove a partial upload");
        }
    }
    copied
}

fn cancelled(path: &Path) -> CopyFailure {
    CopyFailure {
        action: "upload to",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::Interrupted, "upload cancelled"),
    }
}

fn copy_tree(src: &Path, dst: &Path, phase: &AtomicU8) -> Result<(), CopyFailure> {
    for entry in fs::read_dir(src).map_err(at("list", src))? {
        if phase.load(Ordering::SeqCst) != RUNNING {
            return Err(cancelled(dst));
        }
        let entry = entry.map_err(at("list", src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).map_err(at("read", &from))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let link = fs::read_link(&from).map_err(at("read link", &from))?;
            symlink(&link, &to).map_err(at("create link", &to))?;
        } else if kind.is_dir() {
            fs::create_dir(&to).map_err(at("create", &to))?;
            copy_tree(&from, &to, phase)?;
            // Set last so a read-only directory can still be filled.
            fs::set_permissions(&to, meta.permissions()).map_err(at("set permissions of", &to))?;
        } else if kind.is_file() {
            // fs::copy carries the permission bits, the executable bit included.
            fs::copy(&from, &to).map_err(at("copy", &from))?;
        } else {
            return Err(CopyFailure {
                action: "copy",
                path: from,
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    "not a regular file, directory or symlink",
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    fn argv(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|p| (*p).to_owned()).collect()
    }

    fn is_alive(pid: &str) -> bool {
        std::process::Command::new("kill")
            .args(["-0", pid])
            .stderr(Stdio::null())
            .status()
            .expect("run kill -0")
            .success()
    }

    #[tokio::test]
    async fn run_captures_stdout_stderr_and_exit_code() {
        let out = LocalTarget::default()
            .run(
                &argv(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
                &[],
                Duration::from_secs(10),
            )
            .await
            .expect("run sh");
        assert_eq!(out.code, Some(7));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert!(!out.succeeded());
    }

    #[tokio::test]
    async fn run_passes_extra_env_vars() {
        let out = LocalTarget::default()
            .run(
                &argv(&["sh", "-c", "printf %s \"$CONVERGE_TEST_VAR\""]),
                &[("CONVERGE_TEST_VAR".to_owned(), "a b'c".to_owned())],
                Duration::from_secs(10),
            )
            .await
            .expect("run sh");
        assert_eq!(out.stdout, "a b'c");
        assert!(out.succeeded());
    }

    #[tokio::test]
    async fn run_reports_a_signal_death_as_no_code() {
        let out = LocalTarget::default()
            .run(
                &argv(&["sh", "-c", "kill -9 $$"]),
                &[],
                Duration::from_secs(10),
            )
            .await
            .expect("run sh");
        assert_eq!(out.code, None);
    }

    #[tokio::test]
    async fn run_of_a_missing_program_is_a_terminal_spawn_error() {
        let error = LocalTarget::default()
            .run(
                &argv(&["/nonexistent/converge-test"]),
                &[],
                Duration::from_secs(5),
            )
            .await
            .expect_err("spawn must fail");
        assert!(matches!(error, TargetError::Spawn { .. }), "{error:?}");
        assert!(!error.is_transient());
    }

    #[tokio::test]
    async fn run_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("child.pid");
        let started = Instant::now();
        let error = LocalTarget::default()
            .run(
                &argv(&[
                    "sh",
                    "-c",
                    "sleep 300 & echo $! > \"$1\"; wait",
                    "converge-test",
                    pid_file.to_str().expect("utf-8 path"),
                ]),
                &[],
                Duration::from_millis(500),
            )
            .await
            .expect_err("must time out");
        assert!(error.is_timeout() && error.is_transient(), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid = fs::read_to_string(&pid_file).expect("pid file written");
        let pid = pid.trim();
        // SIGKILL delivery is asynchronous; give the kernel a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        while is_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !is_alive(pid),
            "grandchild sleep {pid} survived the timeout"
        );
    }

    #[tokio::test]
    async fn dropping_a_run_kills_its_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("child.pid");
        let target = LocalTarget::default();
        let command = argv(&[
            "sh",
            "-c",
            "sleep 300 & echo $! > \"$1\"; wait",
            "converge-test",
            pid_file.to_str().expect("utf-8 path"),
        ]);
        // The run is dropped (select! drops the branch that lost) once its
        // grandchild runs and has written its pid.
        let written = async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let pid = fs::read_to_string(&pid_file).unwrap_or_default();
                if pid.ends_with('\n') {
                    return pid;
                }
                assert!(
                    Instant::now() < deadline,
                    "the grandchild's pid file holds {pid:?} after 10 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let pid = tokio::select! {
            out = target.run(&command, &[], Duration::from_secs(300)) => {
                panic!("the run ended by itself: {out:?}")
            }
            pid = written => pid,
        };
        let pid = pid.trim();
        let deadline = Instant::now() + Duration::from_secs(3);
        while is_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_alive(pid), "grandchild sleep {pid} survived the drop");
    }

    #[tokio::test]
    async fn run_keeps_only_the_last_64_kib_of_each_stream() {
        // About 220 KB of numbered lines on stdout and 200 KB on stderr.
        let out = LocalTarget::default()
            .run(
                &argv(&[
                    "sh",
                    "-c",
                    "i=0; while [ $i -lt 20000 ]; do echo \"line $i\"; i=$((i+1)); done; \
                     head -c 200000 /dev/zero | tr '\\0' e >&2",
                ]),
                &[],
                Duration::from_secs(60),
            )
            .await
            .expect("run sh");
        assert_eq!(out.stdout.len(), OUTPUT_LIMIT);
        assert!(out.stdout.ends_with("line 19999\n"));
        assert!(!out.stdout.contains("line 0\n"));
        assert_eq!(out.stderr.len(), OUTPUT_LIMIT);
    }

    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).expect("mkdir");
        fs::write(root.join("bin/tool"), "#!/bin/sh\necho tool\n").expect("write");
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        fs::write(root.join("data.txt"), "plain").expect("write");
        fs::set_permissions(root.join("data.txt"), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        symlink("bin/tool", root.join("tool-link")).expect("symlink");
        symlink("/nonexistent/dangling", root.join("dangling")).expect("symlink");
        fs::create_dir(root.join("empty")).expect("mkdir");
    }

    #[tokio::test]
    async fn upload_dir_keeps_exec_bits_and_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        sample_tree(&src);
        let dest = dir.path().join("dest");
        LocalTarget::default()
            .upload_dir(&src, dest.to_str().expect("utf-8"), Duration::from_secs(10))
            .await
            .expect("upload");
        let mode = |p: &str| {
            fs::metadata(dest.join(p))
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("data.txt"), 0o644);
        assert_eq!(
            fs::read_to_string(dest.join("data.txt")).expect("read"),
            "plain"
        );
        assert_eq!(
            fs::read_link(dest.join("tool-link")).expect("link"),
            PathBuf::from("bin/tool")
        );
        assert_eq!(
            fs::read_link(dest.join("dangling")).expect("link"),
            PathBuf::from("/nonexistent/dangling")
        );
        assert!(dest.join("empty").is_dir());
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn upload_dir_that_fails_midway_leaves_no_dest_and_no_partial() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        sample_tree(&src);
        // Tests run as root, where mode 000 does not stop reads; a socket is
        // a file type no upload can copy, found after the other entries.
        fs::create_dir(src.join("zz")).expect("mkdir");
        let _socket =
            std::os::unix::net::UnixListener::bind(src.join("zz/socket")).expect("bind socket");
        let dest = dir.path().join("dest");
        let error = LocalTarget::default()
            .upload_dir(&src, dest.to_str().expect("utf-8"), Duration::from_secs(10))
            .await
            .expect_err("a socket cannot be uploaded");
        assert!(!error.is_transient(), "{error:?}");
        assert!(fs::symlink_metadata(&dest).is_err(), "dest must not exist");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("src")]);
    }

    #[tokio::test]
    async fn upload_dir_timeout_leaves_no_dest_and_removes_its_partial_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        fs::create_dir(&src).expect("mkdir");
        for i in 0..2000 {
            fs::write(src.join(format!("f{i}")), "content").expect("write");
        }
        let dest = dir.path().join("dest");
        let error = LocalTarget::default()
            .upload_dir(&src, dest.to_str().expect("utf-8"), Duration::ZERO)
            .await
            .expect_err("no time to copy");
        assert!(error.is_timeout(), "{error:?}");
        // The copy notices the cancellation between files and cleans up after itself.
        let deadline = Instant::now() + Duration::from_secs(5);
        let only_src = || fs::read_dir(dir.path()).expect("list").count() == 1;
        while !only_src() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(only_src(), "a partial copy or dest was left behind");
        assert!(fs::symlink_metadata(&dest).is_err());
    }

    #[test]
    fn run_and_upload_futures_are_send() {
        fn assert_send<F: std::future::Future + Send>(_: F) {}
        let t = LocalTarget::default();
        assert_send(t.run(&[], &[], Duration::ZERO));
        assert_send(t.upload_dir(Path::new("/x"), "/y", Duration::ZERO));
    }

    #[tokio::test]
    async fn upload_dir_refuses_an_existing_dest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        sample_tree(&src);
        let dest = dir.path().join("dest");
        fs::create_dir(&dest).expect("mkdir");
        fs::write(dest.join("keep"), "x").expect("write");
        let error = LocalTarget::default()
            .upload_dir(&src, dest.to_str().expect("utf-8"), Duration::from_secs(10))
            .await
            .expect_err("dest exists");
        assert!(matches!(error, TargetError::Io { .. }), "{error:?}");
        assert_eq!(fs::read_to_string(dest.join("keep")).expect("read"), "x");
    }
}
