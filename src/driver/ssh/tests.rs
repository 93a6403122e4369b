//! The SSH target's own tests, against real sshd hosts in network
//! namespaces (the testbed): commands, output bounds, timeouts, shared and
//! kept masters (under the state directory, or ended with a temporary
//! control directory), control directories another user planted, uploads,
//! host keys, dropped links, frozen and killed sshd, and the effective
//! client options. Test code only.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use testbed::{REMOTE_STATE_DIR, Testbed};

use super::config::{default_kex_is_costly_hybrid, known_hosts_line};
use super::control_dir::ControlDir;
use super::error::SshError;
use super::master::{SshTarget, effective_client_config};
use super::options::{SshOptions, testbed_options};
use crate::driver::target::{OUTPUT_LIMIT, Target, TargetError};

const T: Duration = Duration::from_secs(30);

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| (*p).to_owned()).collect()
}

fn target(testbed: &Testbed, i: usize) -> SshTarget {
    SshTarget::new(testbed_options(&testbed.client(i))).expect("ssh target")
}

fn remote(path: &str) -> String {
    format!("{REMOTE_STATE_DIR}/{path}")
}

fn is_alive(pid: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Polls every 20 ms until process `pid` is gone (exited, or a zombie);
/// fails after 5 s saying `what` should have happened and what /proc still
/// shows of the process.
async fn wait_gone(pid: &str, what: &str) {
    let deadline = StdInstant::now() + Duration::from_secs(5);
    while is_alive(pid) {
        assert!(
            StdInstant::now() < deadline,
            "{what}: process {pid} still runs after 5 s: {}",
            fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn run_returns_output_env_exit_codes_and_keeps_arguments_verbatim() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    let out = t
        .run(
            &argv(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
            &[],
            T,
        )
        .await
        .expect("run");
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (Some(7), "out\n", "err\n")
    );

    let tricky = ["a b", "it's", "$HOME", "`id`", "x\ny", "", "--", "*", "\\"];
    let mut command = argv(&["printf", "[%s]\\n"]);
    command.extend(tricky.iter().map(|s| (*s).to_owned()));
    let out = t.run(&command, &[], T).await.expect("run printf");
    let expected: String = tricky.iter().map(|s| format!("[{s}]\n")).collect();
    assert_eq!(out.stdout, expected);
    assert_eq!(out.stderr, "");

    let out = t
        .run(
            &argv(&["sh", "-c", "printf '%s|%s' \"$CONVERGE_A\" \"$CONVERGE_B\""]),
            &[
                ("CONVERGE_A".to_owned(), "a b'c $x".to_owned()),
                ("CONVERGE_B".to_owned(), "line1\nline2".to_owned()),
            ],
            T,
        )
        .await
        .expect("run with env");
    assert_eq!(out.stdout, "a b'c $x|line1\nline2");

    let out = t
        .run(&argv(&["sh", "-c", "kill -9 $$"]), &[], T)
        .await
        .expect("run");
    assert_eq!(out.code, None, "a signal death has no exit code");
    let out = t
        .run(&argv(&["sh", "-c", "echo x >&2; exit 127"]), &[], T)
        .await
        .expect("run");
    assert_eq!((out.code, out.stderr.as_str()), (Some(127), "x\n"));

    let error = t
        .run(&argv(&["/nonexistent/converge-test"]), &[], T)
        .await
        .expect_err("missing program");
    assert!(
        matches!(error, TargetError::Spawn { .. }) && !error.is_transient(),
        "{error:?}"
    );
    let error = t
        .run(
            &argv(&["true"]),
            &[("BAD NAME".to_owned(), "x".to_owned())],
            T,
        )
        .await
        .expect_err("invalid env name");
    assert!(!error.is_transient(), "{error:?}");

    let out = t.run(&argv(&["uname", "-n"]), &[], T).await.expect("run");
    assert_eq!(out.stdout.trim(), testbed.host(0).name);
    assert_eq!(t.describe(), format!("root@{}:22", testbed.host(0).address));
}

#[tokio::test]
async fn run_keeps_only_the_last_64_kib_of_each_stream() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    let out = t
        .run(
            &argv(&["sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo \"line $i\"; i=$((i+1)); done; head -c 200000 /dev/zero | tr '\\0' e >&2"]),
            &[],
            T,
        )
        .await
        .expect("run");
    assert_eq!(out.stdout.len(), OUTPUT_LIMIT);
    assert!(out.stdout.ends_with("line 19999\n"));
    assert_eq!(out.stderr.len(), OUTPUT_LIMIT);
    assert!(out.stderr.bytes().all(|b| b == b'e'));
}

#[tokio::test]
async fn run_timeout_kills_the_remote_process_group() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    let started = StdInstant::now();
    let error = t
        .run(
            &argv(&[
                "sh",
                "-c",
                "sleep 300 & echo $! > \"$1\"; wait",
                "converge-test",
                &remote("sleep.pid"),
            ]),
            &[],
            Duration::from_secs(2),
        )
        .await
        .expect_err("must time out");
    assert!(error.is_timeout() && error.is_transient(), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let pid = fs::read_to_string(testbed.host(0).state_dir.join("sleep.pid")).expect("pid written");
    let pid = pid.trim();
    let deadline = StdInstant::now() + Duration::from_secs(3);
    while is_alive(pid) && StdInstant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_alive(pid), "remote sleep {pid} survived the timeout");
    // The master is still usable after a timeout.
    assert!(
        t.run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
}

#[tokio::test]
async fn sudo_runs_commands_as_root_a_timeout_still_ends_them_and_a_refusal_is_terminal() {
    let testbed = Testbed::new(1);
    let allowed = testbed.add_user(testbed::Sudo::NoPassword);
    let mut options = testbed_options(&testbed.client(0));
    options.user = allowed.name.clone();
    let plain = SshTarget::new(options.clone()).expect("target");
    let whoami = plain.run(&argv(&["id", "-u"]), &[], T).await.expect("run");
    assert_eq!(whoami.stdout.trim(), allowed.uid.to_string(), "{whoami:?}");
    options.sudo = true;
    let root = SshTarget::new(options).expect("target");
    let id = root
        .run(
            &argv(&["sh", "-c", "id -u; echo \"$GREETING\""]),
            &[("GREETING".to_owned(), "hi".to_owned())],
            T,
        )
        .await
        .expect("run");
    assert_eq!(id.stdout, "0\nhi\n", "{id:?}");
    // A command that exits non-zero is its own failure, not sudo's.
    let failed = root.run(&argv(&["false"]), &[], T).await.expect("run");
    assert_eq!(failed.code, Some(1));

    let error = root
        .run(
            &argv(&[
                "sh",
                "-c",
                "sleep 300 & echo $! > \"$1\"; wait",
                "converge-test",
                &remote("sleep.pid"),
            ]),
            &[],
            Duration::from_secs(2),
        )
        .await
        .expect_err("must time out");
    assert!(error.is_timeout(), "{error:?}");
    let pid = fs::read_to_string(testbed.host(0).state_dir.join("sleep.pid")).expect("pid written");
    let pid = pid.trim();
    let deadline = StdInstant::now() + Duration::from_secs(5);
    while is_alive(pid) && StdInstant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !is_alive(pid),
        "remote sleep {pid} (as root) survived the timeout"
    );

    let refused = testbed.add_user(testbed::Sudo::Password);
    let mut options = testbed_options(&testbed.client(0));
    options.user = refused.name.clone();
    options.sudo = true;
    let t = SshTarget::new(options).expect("target");
    let error = t
        .run(&argv(&["touch", &remote("ran")]), &[], T)
        .await
        .expect_err("sudo wants a password");
    let message = error_chain(&error);
    assert!(!error.is_transient(), "{message}");
    assert!(
        message.contains("password is required") && message.contains(&refused.name),
        "{message}"
    );
    assert!(!testbed.host(0).state_dir.join("ran").exists());
}

#[tokio::test]
async fn commands_share_one_master_and_a_dead_master_is_rebuilt() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    let started = StdInstant::now();
    t.run(&argv(&["true"]), &[], T).await.expect("first run");
    let first = started.elapsed();
    let socket = t.master_socket().await.expect("a master exists");
    let started = StdInstant::now();
    t.run(&argv(&["true"]), &[], T).await.expect("second run");
    let second = started.elapsed();
    println!("first command (connects) {first:?}, second (over the master) {second:?}");
    assert_eq!(
        t.master_socket().await.as_ref(),
        Some(&socket),
        "the same master is reused"
    );
    // Many at once, more than sshd's MaxSessions (10): the semaphore queues them.
    let nap = argv(&["sleep", "0.2"]);
    let runs = (0..30).map(|_| t.run(&nap, &[], T));
    for result in futures::future::join_all(runs).await {
        assert!(result.expect("concurrent run").succeeded());
    }
    assert_eq!(t.master_socket().await.as_ref(), Some(&socket));
    // Kill the master process itself: the next call builds a new one.
    let master_pid = fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .find(|p| {
            fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*socket.to_string_lossy()))
        })
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .expect("master process");
    std::process::Command::new("kill")
        .args(["-KILL", &master_pid])
        .status()
        .expect("kill");
    wait_gone(&master_pid, "the killed master exits").await;
    assert!(
        t.run(&argv(&["true"]), &[], T)
            .await
            .expect("run after master death")
            .succeeded()
    );
    let rebuilt = t.master_socket().await.expect("a master exists");
    assert_ne!(rebuilt, socket, "a dead master is replaced");
}

#[tokio::test]
async fn a_kept_master_outlives_its_target_and_the_next_one_resumes_it() {
    let testbed = Testbed::new(1);
    let mut options = testbed_options(&testbed.client(0));
    options.keep_master = true;
    options.master_idle_exit = Duration::from_secs(30);
    let first = SshTarget::new(options.clone()).expect("target");
    assert!(
        first
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let socket = first.master_socket().await.expect("a master");
    drop(first); // as when a `reconcile --once` process ends
    let pid_of = |socket: &Path| {
        fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .find_map(|p| {
                let cmdline = fs::read(p.path().join("cmdline")).ok()?;
                String::from_utf8_lossy(&cmdline)
                    .contains(&*socket.to_string_lossy())
                    .then(|| p.file_name().to_string_lossy().into_owned())
            })
    };
    let master_pid = pid_of(&socket).expect("the kept master still runs");
    let control_mode = fs::metadata(&options.control_dir)
        .expect("control dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(control_mode, 0o700);

    let second = SshTarget::new(options.clone()).expect("target");
    assert!(
        second
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    assert_eq!(
        second.master_socket().await.as_ref(),
        Some(&socket),
        "the next target resumes the kept master"
    );
    // A fresh target still proves a new connection.
    let fresh = second.fresh();
    assert!(
        fresh
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let fresh_socket = fresh.master_socket().await.expect("a master");
    assert_ne!(fresh_socket, socket);
    drop(fresh);
    if let Some(pid) = pid_of(&fresh_socket) {
        wait_gone(&pid, "a fresh master is not kept").await;
    }
    assert!(
        pid_of(&fresh_socket).is_none(),
        "a fresh master is not kept"
    );

    // A kept master that died is cleaned up and replaced.
    drop(second);
    std::process::Command::new("kill")
        .args(["-KILL", &master_pid])
        .status()
        .expect("kill");
    wait_gone(&master_pid, "the killed kept master exits").await;
    let third = SshTarget::new(options).expect("target");
    assert!(
        third
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let replaced = third.master_socket().await.expect("a master");
    assert_ne!(replaced, socket);
    assert!(
        !socket.parent().expect("dir").exists(),
        "the dead master's directory is removed"
    );
    third.disconnect().await;
    if let Some(pid) = pid_of(&replaced) {
        wait_gone(&pid, "disconnect stops a kept master").await;
    }
    assert!(
        pid_of(&replaced).is_none(),
        "disconnect stops a kept master"
    );
}

/// The pid of the ssh master listening on `socket` (its argv names it).
fn master_pid(socket: &Path) -> Option<String> {
    fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .find_map(|p| {
            let cmdline = fs::read(p.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&*socket.to_string_lossy())
                .then(|| p.file_name().to_string_lossy().into_owned())
        })
}

/// Every entry under `dir` with its permission bits, sorted, as `name mode`.
fn modes_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read_dir").flatten() {
            let meta = fs::symlink_metadata(entry.path()).expect("lstat");
            if meta.is_dir() {
                stack.push(entry.path());
            }
            let name = entry.path().strip_prefix(dir).expect("under").to_owned();
            found.push(format!(
                "{} {:o}",
                name.display(),
                meta.permissions().mode() & 0o7777
            ));
        }
    }
    found.sort();
    found
}

#[tokio::test]
async fn a_kept_master_under_the_state_directory_is_resumed_by_the_next_process() {
    let testbed = Testbed::new(1);
    let state = tempfile::tempdir().expect("tempdir");
    let mut options = testbed_options(&testbed.client(0));
    options.keep_master = true;
    options.master_idle_exit = Duration::from_secs(30);

    // One process: its control directory, a target, a command, then its end.
    let dir = Arc::new(ControlDir::for_state(state.path()).expect("control dir"));
    assert!(!dir.is_temporary());
    let first = SshTarget::in_control_dir(options.clone(), Arc::clone(&dir)).expect("target");
    assert!(first.options().keep_master);
    assert!(
        first
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let socket = first.master_socket().await.expect("a master");
    let ssh_dir = fs::canonicalize(state.path()).expect("state").join("ssh");
    assert!(
        socket.starts_with(&ssh_dir),
        "{} is under STATE/ssh",
        socket.display()
    );
    drop(first);
    drop(dir);
    let pid = master_pid(&socket).expect("the kept master still runs");
    // What converge leaves in STATE/ssh is private: directories 0700, the
    // rest (client files, pointers, the master's log and socket) 0600.
    for line in modes_under(&ssh_dir) {
        let (name, mode) = line.rsplit_once(' ').expect("name mode");
        let is_dir = fs::symlink_metadata(ssh_dir.join(name))
            .expect("lstat")
            .is_dir();
        assert_eq!(mode, if is_dir { "700" } else { "600" }, "{line}");
    }

    // The next process finds it there.
    let dir = Arc::new(ControlDir::for_state(state.path()).expect("control dir"));
    let second = SshTarget::in_control_dir(options, dir).expect("target");
    assert!(
        second
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    assert_eq!(
        second.master_socket().await.as_ref(),
        Some(&socket),
        "the next process resumes the master kept under STATE/ssh"
    );
    second.disconnect().await;
    wait_gone(&pid, "disconnect stops a kept master").await;
}

#[tokio::test]
async fn a_temporary_control_dir_ends_its_masters_and_goes_with_its_last_target() {
    let testbed = Testbed::new(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("TMPDIR");
    // Socket paths under STATE/ssh would be too long.
    let state = tmp.path().join("s".repeat(70));
    let dir = Arc::new(ControlDir::for_state_in(&state, scratch.path()).expect("control dir"));
    assert!(dir.is_temporary());
    let mut options = testbed_options(&testbed.client(0));
    options.keep_master = true;
    options.master_idle_exit = Duration::from_secs(30);
    let t = SshTarget::in_control_dir(options.clone(), Arc::clone(&dir)).expect("target");
    assert!(
        !t.options().keep_master,
        "nothing is kept in a temporary directory"
    );
    assert!(
        t.run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let socket = t.master_socket().await.expect("a master");
    assert!(socket.starts_with(dir.path()));
    let pid = master_pid(&socket).expect("the master runs");
    let fresh = t.fresh();
    assert!(
        fresh
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let fresh_pid = master_pid(&fresh.master_socket().await.expect("a master")).expect("runs");

    let path = dir.path().to_path_buf();
    drop(dir);
    assert!(path.is_dir(), "kept while targets use it");
    drop(t);
    assert!(path.is_dir(), "kept while the fresh copy uses it");
    drop(fresh);
    assert!(!path.exists(), "removed with the last target");
    wait_gone(&pid, "the master ends with its temporary directory").await;
    wait_gone(&fresh_pid, "the fresh master ends too").await;
    assert_eq!(
        fs::read_dir(scratch.path()).expect("read").count(),
        0,
        "nothing left in TMPDIR"
    );

    // A master left listening there (here: one kept on purpose, as a leaked
    // handle would leave it) is told to exit when the directory goes.
    let dir = ControlDir::for_state_in(&state, scratch.path()).expect("control dir");
    options.control_dir = dir.path().to_path_buf();
    let kept = SshTarget::new(options).expect("target");
    assert!(
        kept.run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let socket = kept.master_socket().await.expect("a master");
    drop(kept);
    let pid = master_pid(&socket).expect("the kept master still runs");
    drop(dir);
    wait_gone(
        &pid,
        "a master still listening in a temporary directory is ended",
    )
    .await;
    assert_eq!(
        fs::read_dir(scratch.path()).expect("read").count(),
        0,
        "nothing left in TMPDIR"
    );
}

#[test]
fn a_target_refuses_a_control_dir_another_user_planted_and_uses_nothing_in_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let marker = tmp.path().join("marker");
    let planted = tmp.path().join("ssh");
    fs::create_dir(&planted).expect("mkdir");
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o700)).expect("chmod");
    let config = format!("Host *\n  ProxyCommand touch {}\n", marker.display());
    fs::write(planted.join("config"), &config).expect("plant");
    std::os::unix::fs::chown(&planted, Some(65534), Some(65534))
        .expect("chown (tests run as root)");
    let before = modes_under(&planted);

    let mut options = SshOptions::new("10.0.0.5", &planted);
    options.host_key = Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA".to_owned());
    let error = SshTarget::new(options).expect_err("refused");
    assert!(
        matches!(error, SshError::UnsafeControlDir { .. }) && !error.is_transient(),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("owned by uid 65534"), "{message}");
    assert_eq!(modes_under(&planted), before, "nothing written into it");
    assert!(!marker.exists());

    // A link to it in place of the directory is refused too.
    let link = tmp.path().join("link");
    symlink(&planted, &link).expect("symlink");
    let error = SshTarget::new(SshOptions::new("10.0.0.5", &link)).expect_err("refused");
    assert!(error.to_string().contains("symbolic link"), "{error}");
    assert_eq!(modes_under(&planted), before, "nothing written into it");
}

#[tokio::test]
async fn sessions_sshd_refuses_past_max_sessions_are_opened_again() {
    let testbed = Testbed::new(1);
    // A limit above sshd's MaxSessions (10): sshd itself refuses the
    // extra channels, and each refused one must be opened again.
    let mut options = testbed_options(&testbed.client(0));
    options.max_sessions = 24;
    let t = SshTarget::new(options).expect("ssh target");
    let nap = argv(&["sleep", "0.3"]);
    let runs = (0..24).map(|_| t.run(&nap, &[], T));
    for result in futures::future::join_all(runs).await {
        assert!(result.expect("run past MaxSessions").succeeded());
    }
    let trees = tempfile::tempdir().expect("tempdir");
    let src = trees.path().join("src");
    sample_tree(&src);
    let uploads = (0..12).map(|i| {
        let dest = remote(&format!("refused-{i}"));
        let (t, src) = (&t, &src);
        async move { t.upload_dir(src, &dest, T).await }
    });
    for result in futures::future::join_all(uploads).await {
        result.expect("upload past MaxSessions");
    }
}

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("bin")).expect("mkdir");
    fs::write(root.join("bin/tool"), "#!/bin/sh\necho tool\n").expect("write");
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(root.join("data.txt"), "plain").expect("write");
    fs::set_permissions(root.join("data.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    symlink("bin/tool", root.join("tool-link")).expect("symlink");
    symlink("/nonexistent/dangling", root.join("dangling")).expect("symlink");
    fs::create_dir(root.join("empty")).expect("mkdir");
    fs::create_dir(root.join("ro")).expect("mkdir");
    fs::write(root.join("ro/inside"), "x").expect("write");
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).expect("chmod");
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(root.join("big.bin"), big).expect("write");
}

#[tokio::test]
async fn upload_dir_copies_contents_private_modes_and_symlinks_then_renames() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    let local = tempfile::tempdir().expect("tempdir");
    let src = local.path().join("src");
    sample_tree(&src);
    t.upload_dir(&src, &remote("dest"), T)
        .await
        .expect("upload");
    let dest = testbed.host(0).state_dir.join("dest");
    let mode = |p: &str| {
        fs::symlink_metadata(dest.join(p))
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    // Private to the login, as everything converge writes on a target.
    assert_eq!(mode("bin/tool"), 0o700);
    assert_eq!(mode("data.txt"), 0o600);
    assert_eq!(mode("ro"), 0o700);
    assert_eq!(
        fs::read_to_string(dest.join("data.txt")).expect("read"),
        "plain"
    );
    assert_eq!(
        fs::read_to_string(dest.join("ro/inside")).expect("read"),
        "x"
    );
    assert_eq!(
        fs::read(dest.join("big.bin")).expect("read"),
        fs::read(src.join("big.bin")).expect("read")
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
    let names: Vec<_> = fs::read_dir(&testbed.host(0).state_dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["dest"], "no partial copy is left");

    let error = t
        .upload_dir(&src, &remote("dest"), T)
        .await
        .expect_err("dest exists");
    assert!(
        matches!(&error, TargetError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
        "{error:?}"
    );
    assert!(!error.is_transient());
    let _socket = std::os::unix::net::UnixListener::bind(src.join("socket")).expect("bind");
    let error = t
        .upload_dir(&src, &remote("other"), T)
        .await
        .expect_err("a socket cannot be uploaded");
    assert!(!error.is_transient(), "{error:?}");
    assert!(!testbed.host(0).state_dir.join("other").exists());
}

#[tokio::test]
async fn an_upload_cut_by_a_dead_link_fails_and_leaves_no_dest() {
    let testbed = Testbed::new(1);
    let mut options = testbed_options(&testbed.client(0));
    options.connect_timeout = Duration::from_secs(2);
    let t = SshTarget::new(options).expect("target");
    t.connect().await.expect("connect");
    let local = tempfile::tempdir().expect("tempdir");
    let src = local.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    for i in 0..8 {
        let chunk: Vec<u8> = (0..16_000_000u32).map(|b| (b ^ i) as u8).collect();
        fs::write(src.join(format!("part{i}")), chunk).expect("write");
    }
    let state = testbed.host(0).state_dir.clone();
    let watcher = tokio::task::spawn_blocking(move || {
        // Wait until the partial copy holds some bytes, then cut the link.
        let deadline = StdInstant::now() + Duration::from_secs(20);
        loop {
            let partial = fs::read_dir(&state).ok().and_then(|mut d| {
                d.find_map(|e| {
                    e.ok()
                        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
                })
            });
            let bytes: u64 = partial
                .and_then(|p| fs::read_dir(p.path()).ok())
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            if bytes > 1_000_000 || StdInstant::now() > deadline {
                return bytes;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let dest = remote("dest");
    let upload = t.upload_dir(&src, &dest, Duration::from_secs(60));
    let cut = async {
        let bytes = watcher.await.expect("watcher");
        testbed.host(0).link_down();
        (bytes, StdInstant::now())
    };
    let (result, (bytes, cut_at)) = tokio::join!(upload, cut);
    let noticed = cut_at.elapsed();
    assert!(bytes > 1_000_000, "the upload never got going");
    let error = result.expect_err("the upload must fail");
    println!(
        "upload cut after {bytes} bytes; failed {noticed:?} after the link went down: {error}"
    );
    assert!(error.is_transient(), "{error:?}");
    testbed.host(0).link_up();
    let left: Vec<_> = fs::read_dir(&testbed.host(0).state_dir)
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!left.iter().any(|n| n == "dest"), "{left:?}");
    // Once the link is back the same target works again (neighbour
    // discovery may need a moment after the link flapped: retry briefly).
    runs_again_soon(&t).await;
}

#[tokio::test]
async fn a_wrong_host_key_is_refused_before_anything_runs_or_uploads() {
    let testbed = Testbed::new(2);
    let mut options = testbed_options(&testbed.client(0));
    options.host_key = Some(testbed.host(1).host_key.clone());
    let t = SshTarget::new(options).expect("target");
    let error = t
        .run(&argv(&["touch", &remote("ran")]), &[], T)
        .await
        .expect_err("wrong key");
    let message = error_chain(&error);
    println!("{message}");
    assert!(!error.is_transient(), "{error:?}");
    assert!(
        matches!(&error, TargetError::Ssh { source, .. } if source.is_host_key_error()),
        "{error:?}"
    );
    assert!(
        message.contains("does not match") && message.contains("hostKey"),
        "{message}"
    );
    let local = tempfile::tempdir().expect("tempdir");
    let error = t
        .upload_dir(local.path(), &remote("dest"), T)
        .await
        .expect_err("wrong key");
    assert!(!error.is_transient());
    let state = &testbed.host(0).state_dir;
    assert!(!state.join("ran").exists() && !state.join("dest").exists());

    // No key known at all: refused too, unless the user opted in to accept-new.
    let known_hosts = testbed.dir().join("empty_known_hosts");
    fs::write(&known_hosts, "").expect("write");
    let mut options = testbed_options(&testbed.client(0));
    options.host_key = None;
    options.known_hosts = Some(known_hosts.clone());
    let t = SshTarget::new(options.clone()).expect("target");
    let error = t
        .run(&argv(&["true"]), &[], T)
        .await
        .expect_err("unknown key");
    assert!(!error.is_transient(), "{error:?}");
    assert!(
        error_chain(&error).contains("no key is known"),
        "{}",
        error_chain(&error)
    );
    options.accept_new_host_keys = true;
    let t = SshTarget::new(options).expect("target");
    assert!(
        t.run(&argv(&["true"]), &[], T)
            .await
            .expect("accept-new")
            .succeeded()
    );
    let learned = fs::read_to_string(&known_hosts).expect("read");
    assert!(
        learned.contains(
            testbed
                .host(0)
                .host_key
                .split_whitespace()
                .nth(1)
                .expect("blob")
        ),
        "{learned}"
    );
}

#[tokio::test]
async fn a_host_whose_link_is_down_fails_within_the_connect_timeout() {
    let testbed = Testbed::new(1);
    testbed.host(0).link_down();
    let mut options = testbed_options(&testbed.client(0));
    options.connect_timeout = Duration::from_secs(2);
    let t = SshTarget::new(options).expect("target");
    let started = StdInstant::now();
    let error = t
        .run(&argv(&["true"]), &[], T)
        .await
        .expect_err("unreachable");
    let took = started.elapsed();
    println!(
        "connect to a host with its link down failed after {took:?}: {}",
        error_chain(&error)
    );
    assert!(error.is_transient() && !error.is_timeout(), "{error:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    testbed.host(0).link_up();
    assert!(
        t.run(&argv(&["true"]), &[], T)
            .await
            .expect("after link up")
            .succeeded()
    );
}

/// Starts a long command on testbed host 0, whose state directory is
/// `host_state` here, injects `fault` once the command runs there, and
/// returns how long after the fault the command failed, and its error.
async fn fault_during_command(
    t: &SshTarget,
    host_state: &Path,
    fault: impl FnOnce(),
) -> (Duration, TargetError) {
    t.connect().await.expect("connect");
    let long = argv(&[
        "sh",
        "-c",
        "echo running > \"$1\"; exec sleep 60",
        "converge-test",
        &remote("long-command"),
    ]);
    let running = host_state.join("long-command");
    let command = t.run(&long, &[], Duration::from_secs(90));
    let inject = async {
        let deadline = StdInstant::now() + Duration::from_secs(20);
        while fs::read_to_string(&running).unwrap_or_default() != "running\n" {
            assert!(
                StdInstant::now() < deadline,
                "the long command did not start on the host within 20 s: {} holds {:?}",
                running.display(),
                fs::read_to_string(&running)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fault();
        StdInstant::now()
    };
    let (result, at) = tokio::join!(command, inject);
    (at.elapsed(), result.expect_err("the command must fail"))
}

#[tokio::test]
async fn a_link_that_drops_during_a_command_fails_within_the_server_alive_bound() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    let bound = t.options().dead_link_bound();
    let (took, error) = fault_during_command(&t, &testbed.host(0).state_dir, || {
        testbed.host(0).link_down();
    })
    .await;
    println!(
        "link down mid-command: failed after {took:?} (bound {bound:?}): {}",
        error_chain(&error)
    );
    assert!(error.is_transient() && !error.is_timeout(), "{error:?}");
    assert!(
        matches!(&error, TargetError::Ssh { source, .. }
            if matches!(**source, SshError::ConnectionLost { .. })),
        "{error:?}"
    );
    assert!(took < bound + Duration::from_millis(2500), "{took:?}");
    testbed.host(0).link_up();
    runs_again_soon(&t).await;
}

#[tokio::test]
async fn a_frozen_sshd_is_noticed_within_the_server_alive_bound() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    let bound = t.options().dead_link_bound();
    let (took, error) = fault_during_command(&t, &testbed.host(0).state_dir, || {
        testbed.host(0).freeze();
    })
    .await;
    println!(
        "sshd frozen mid-command: failed after {took:?} (bound {bound:?}): {}",
        error_chain(&error)
    );
    assert!(error.is_transient() && !error.is_timeout(), "{error:?}");
    assert!(took < bound + Duration::from_millis(2500), "{took:?}");
    testbed.host(0).thaw();
}

#[tokio::test]
async fn killing_the_listener_keeps_the_master_but_refuses_new_connections() {
    let testbed = Testbed::new(1);
    let t = target(&testbed, 0);
    t.connect().await.expect("connect");
    testbed.host(0).kill_sshd();
    assert!(
        t.run(&argv(&["true"]), &[], T)
            .await
            .expect("over the existing master")
            .succeeded()
    );
    let started = StdInstant::now();
    let error = t
        .fresh()
        .run(&argv(&["true"]), &[], T)
        .await
        .expect_err("no listener");
    assert!(error.is_transient(), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused, not timed out"
    );
    testbed.host(0).restart_sshd();
    assert!(
        t.fresh()
            .run(&argv(&["true"]), &[], T)
            .await
            .expect("listener back")
            .succeeded()
    );
}

#[tokio::test]
async fn the_effective_client_options_are_strict_and_bounded() {
    let testbed = Testbed::new(1);
    // A user config that tries to loosen things, and sets one harmless option.
    let user_config = testbed.dir().join("user_config");
    fs::write(
        &user_config,
        "Host *\n  ServerAliveCountMax 9\n  StrictHostKeyChecking no\n  ConnectTimeout 99\n  Compression yes\n",
    )
    .expect("write");
    let mut options = testbed_options(&testbed.client(0));
    options.ssh_config = Some(user_config);
    let t = SshTarget::new(options).expect("target");
    let config = effective_client_config(&t).await.expect("ssh -G");
    for expected in [
        "serveralivecountmax 2",
        "serveraliveinterval 2",
        "connecttimeout 10",
        "stricthostkeychecking true",
        "batchmode yes",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        "globalknownhostsfile /dev/null",
        "updatehostkeys false",
        "compression yes",
    ] {
        assert!(
            config.lines().any(|l| l == expected),
            "missing `{expected}` in:\n{config}"
        );
    }
    let kex = config
        .lines()
        .find_map(|l| l.strip_prefix("kexalgorithms "))
        .expect("kexalgorithms");
    // Debian 12's OpenSSH 9.2 defaults to the costly sntrup761 hybrid.
    assert!(
        default_kex_is_costly_hybrid(),
        "expected OpenSSH 9.0-9.8 here"
    );
    assert!(
        kex.starts_with("curve25519-sha256,curve25519-sha256@libssh.org,"),
        "the cheap key exchange comes first: {kex}"
    );
    // A user who sets KexAlgorithms keeps it.
    let pq_config = testbed.dir().join("pq_config");
    fs::write(
        &pq_config,
        "Host *\n  KexAlgorithms sntrup761x25519-sha512@openssh.com\n",
    )
    .expect("write");
    let mut pq = testbed_options(&testbed.client(0));
    pq.ssh_config = Some(pq_config);
    let pq = SshTarget::new(pq).expect("target");
    let pq_effective = effective_client_config(&pq).await.expect("ssh -G");
    assert!(
        pq_effective
            .lines()
            .any(|l| l == "kexalgorithms sntrup761x25519-sha512@openssh.com"),
        "the user's KexAlgorithms wins:\n{pq_effective}"
    );
    assert!(
        pq.run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
    let known_hosts = config
        .lines()
        .find_map(|l| l.strip_prefix("userknownhostsfile "))
        .expect("userknownhostsfile");
    let file = fs::read_to_string(known_hosts).expect("read generated known_hosts");
    assert_eq!(
        file,
        format!("{} {}\n", testbed.host(0).address, testbed.host(0).host_key)
    );
    let mode = fs::metadata(known_hosts)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // And the real master uses them: it connects.
    assert!(
        t.run(&argv(&["true"]), &[], T)
            .await
            .expect("run")
            .succeeded()
    );
}

#[test]
fn options_that_could_break_ssh_are_refused() {
    let long = PathBuf::from(format!("/tmp/{}", "d".repeat(60)));
    let error = SshTarget::new(SshOptions::new("10.0.0.5", long)).expect_err("too long");
    assert!(matches!(error, SshError::ControlPathTooLong { .. }) && !error.is_transient());
    for host in ["-oProxyCommand=x", "a b", "", "u@h"] {
        assert!(
            SshTarget::new(SshOptions::new(host, "/tmp/cv")).is_err(),
            "{host:?}"
        );
    }
    let mut options = SshOptions::new("h", "/tmp/cv-opt-test");
    options.host_key = Some("ssh-ed25519".to_owned());
    assert!(SshTarget::new(options.clone()).is_err());
    options.host_key = Some("ssh-ed25519 AAAA$(id)".to_owned());
    assert!(SshTarget::new(options).is_err());
    assert_eq!(
        known_hosts_line("h", 2222, "ssh-ed25519 AAAA comment").expect("line"),
        "[h]:2222 ssh-ed25519 AAAA\n"
    );
    let _ = fs::remove_dir_all("/tmp/cv-opt-test");
}

/// Retries `true` for up to 10 s, as the controller's backoff would.
async fn runs_again_soon(t: &SshTarget) {
    let deadline = StdInstant::now() + Duration::from_secs(10);
    loop {
        match t.run(&argv(&["true"]), &[], T).await {
            Ok(out) => {
                assert!(out.succeeded());
                return;
            }
            Err(e) if StdInstant::now() < deadline && e.is_transient() => {
                println!("not yet: {}", error_chain(&e));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("did not run again: {}", error_chain(&e)),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
