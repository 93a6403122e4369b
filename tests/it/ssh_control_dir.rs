//! Where converge keeps ssh's control sockets and the ssh_config and
//! known_hosts it generates: under the state directory (`STATE/ssh`),
//! checked before use, never in a predictable place in /tmp. A directory
//! another user planted there (or a link in its place) is refused with a
//! message that says what to do, and nothing in it is run or written to;
//! `plan`, `reconcile --once` and `run` leave nothing in the temporary
//! directory; a state directory too long for socket paths gets a private
//! temporary directory that is gone, with its masters, when converge ends.
//!
//! Each converge process here runs with TMPDIR set to a private empty
//! directory of the scenario, so "nothing left in the temporary directory"
//! is exact even while other scenarios run beside it; the predictable name
//! the old code used in /tmp is checked too.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use testbed::run::{converge_command, run_within_env};

use crate::support::ssh::{COMMAND_LIMIT, Run, SshFleet, wait_for};
use crate::support::{BIN, Converge, processes_mentioning, read_text};

/// The uid planted directories get: `nobody`, a user other than converge's.
const OTHER_UID: u32 = 65534;

/// A private, empty directory for converge's TMPDIR.
fn private_tmpdir(fleet: &SshFleet) -> PathBuf {
    let dir = fleet.root().join("tmpdir");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("create TMPDIR");
    dir
}

/// `converge ARGS...` with TMPDIR=`tmpdir`, to its end within
/// [`COMMAND_LIMIT`]; `label` names its log files.
fn converge_in(fleet: &SshFleet, tmpdir: &Path, label: &str, args: &[&str]) -> Run {
    let logs = fleet.root().join("logs");
    let tmpdir = tmpdir.to_str().expect("utf-8 TMPDIR").to_owned();
    run_within_env(
        Path::new(BIN),
        args,
        &[("TMPDIR".to_owned(), tmpdir)],
        &logs.join(format!("{label}.out")),
        &logs.join(format!("{label}.err")),
        COMMAND_LIMIT,
    )
}

/// `reconcile --once` of the fleet, one attempt, with TMPDIR=`tmpdir`.
fn reconcile_in(fleet: &SshFleet, tmpdir: &Path, label: &str) -> Run {
    let args = fleet.reconcile_args(&["--attempts", "1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    converge_in(fleet, tmpdir, label, &args)
}

/// The control directory the old code used for `state`: predictable by
/// anyone who knows the state directory's path.
fn old_style_dir(tmp: &Path, state: &Path) -> PathBuf {
    let tag = blake3::hash(state.to_string_lossy().as_bytes()).to_hex();
    tmp.join(format!("cvssh-{}", &tag[..10]))
}

/// Names, kinds, owners and modes of everything under `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read_dir").flatten() {
            let meta = fs::symlink_metadata(entry.path()).expect("lstat");
            if meta.is_dir() {
                stack.push(entry.path());
            }
            let kind = if meta.is_dir() {
                "dir"
            } else if meta.file_type().is_symlink() {
                "link"
            } else {
                "other"
            };
            found.push(format!(
                "{} {kind} uid={} mode={:o}",
                entry.path().strip_prefix(dir).expect("under").display(),
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
    }
    found.sort();
    found
}

/// A directory as another user would plant it: owned by [`OTHER_UID`],
/// mode 0700, with an ssh_config whose ProxyCommand creates `marker`.
fn plant(dir: &Path, marker: &Path) {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .expect("plant a directory");
    let config = format!("Host *\n  ProxyCommand touch {}\n", marker.display());
    for name in ["config", "ssh_config", "cfg-planted"] {
        fs::write(dir.join(name), &config).expect("plant an ssh_config");
        std::os::unix::fs::chown(dir.join(name), Some(OTHER_UID), Some(OTHER_UID))
            .expect("chown (tests run as root)");
    }
    std::os::unix::fs::chown(dir, Some(OTHER_UID), Some(OTHER_UID))
        .expect("chown (tests run as root)");
}

/// The master sockets under `dir` (`.ssh-connection*/master`).
fn master_sockets(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join("master"))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()))
        .collect()
}

/// Everything converge left under `ssh_dir` is its own and private:
/// directories 0700, files and sockets 0600.
fn assert_private(ssh_dir: &Path) {
    let uid = fs::metadata("/proc/self").expect("/proc/self").uid();
    let top = fs::symlink_metadata(ssh_dir).expect("STATE/ssh");
    assert!(top.is_dir() && top.uid() == uid && top.mode() & 0o7777 == 0o700);
    for line in listing(ssh_dir) {
        let private = if line.contains(" dir ") {
            "mode=700"
        } else {
            "mode=600"
        };
        assert!(
            line.contains(&format!("uid={uid} ")) && line.ends_with(private),
            "not private: {line}"
        );
    }
}

#[test]
fn plan_reconcile_and_run_leave_nothing_in_tmp_and_keep_sockets_under_the_state_directory() {
    let fleet = crate::support::ssh::fleet(1);
    fleet.write_all(1, &["v1"], "");
    let tmpdir = private_tmpdir(&fleet);
    let state = fleet.state();
    let ssh_dir = state.join("ssh");
    let dir = fleet.dir();
    let config = fleet.ssh_config();
    let common = [
        "--dir",
        dir.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
        "--ssh-config",
        config.to_str().expect("utf-8"),
    ];
    let nothing_in_tmp = |after: &str| {
        assert_eq!(
            listing(&tmpdir),
            Vec::<String>::new(),
            "{after} left files in TMPDIR"
        );
        for tmp in [tmpdir.as_path(), Path::new("/tmp")] {
            let old = old_style_dir(tmp, &state);
            assert!(!old.exists(), "{after} made {}", old.display());
        }
    };

    let mut plan = vec!["plan"];
    plan.extend(common);
    converge_in(&fleet, &tmpdir, "plan", &plan).assert_code(0);
    nothing_in_tmp("plan");

    reconcile_in(&fleet, &tmpdir, "reconcile").assert_code(0);
    fleet.assert_ready([0]);
    nothing_in_tmp("reconcile --once");
    // The master kept for the next command (`--ssh-persist`) listens in
    // STATE/ssh, and still runs.
    let sockets = master_sockets(&ssh_dir);
    assert_eq!(sockets.len(), 1, "one kept master: {sockets:?}");
    assert!(
        !processes_mentioning(&sockets[0]).is_empty(),
        "the kept master runs"
    );
    assert_private(&ssh_dir);

    // The daemon deploys a change, then stops on SIGTERM.
    fleet.write_all(1, &["v2"], "");
    let mut run = vec!["run"];
    run.extend(common);
    let log = fleet.root().join("logs/daemon.err");
    let mut daemon = converge_command(Path::new(BIN), &run)
        .env("TMPDIR", &tmpdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("create a log file"))
        .spawn()
        .expect("start converge run");
    wait_for("the daemon to deploy v2", COMMAND_LIMIT, || {
        if let Ok(Some(status)) = daemon.try_wait() {
            panic!("the daemon exited ({status}):\n{}", read_text(&log));
        }
        fleet
            .ledger(0)
            .iter()
            .any(|line| line.ends_with(" v2"))
            .then_some(())
    });
    let status = std::process::Command::new("kill")
        .args(["-s", "TERM", &daemon.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for("the daemon to exit", COMMAND_LIMIT, || {
        daemon.try_wait().expect("wait").map(drop)
    });
    nothing_in_tmp("run");
    assert!(
        !master_sockets(&ssh_dir).is_empty(),
        "the daemon's kept master is under STATE/ssh"
    );
    assert_private(&ssh_dir);
    fleet.finish();
}

#[test]
fn a_control_dir_another_user_planted_is_refused_and_nothing_in_it_runs() {
    let fleet = crate::support::ssh::fleet(1);
    fleet.write_all(1, &["v1"], "");
    let tmpdir = private_tmpdir(&fleet);
    let state = fleet.state();
    let ssh_dir = state.join("ssh");
    let marker = fleet.root().join("proxy-command-ran");

    // Where the old code put it, predictable from the state directory's path.
    let old = old_style_dir(&tmpdir, &state);
    plant(&old, &marker);
    let old_before = listing(&old);
    // Where converge keeps it now.
    plant(&ssh_dir, &marker);
    let planted_before = listing(&ssh_dir);

    let run = reconcile_in(&fleet, &tmpdir, "planted");
    run.assert_code(3);
    let (ready, reason, message) = fleet.ready(0);
    assert!(!ready, "host0 is Ready with a planted control directory");
    println!("refused: {reason}: {message}");
    for words in [
        ssh_dir.to_str().expect("utf-8"),
        &format!("owned by uid {OTHER_UID}"),
        "remove it",
        "Nothing was run from it",
    ] {
        assert!(message.contains(words), "{words:?} in: {reason}: {message}");
    }
    assert!(!marker.exists(), "the planted ProxyCommand ran");
    assert_eq!(
        listing(&ssh_dir),
        planted_before,
        "the planted directory changed"
    );
    assert_eq!(
        listing(&old),
        old_before,
        "the old-style directory was used"
    );
    assert!(
        fleet.generation_entries(0).is_empty(),
        "something was uploaded"
    );

    // A link in its place, to a directory another user owns.
    fs::remove_dir_all(&ssh_dir).expect("remove the plant");
    let elsewhere = fleet.root().join("elsewhere");
    plant(&elsewhere, &marker);
    let elsewhere_before = listing(&elsewhere);
    symlink(&elsewhere, &ssh_dir).expect("plant a link");
    reconcile_in(&fleet, &tmpdir, "linked").assert_code(3);
    let (_, reason, message) = fleet.ready(0);
    assert!(
        message.contains("symbolic link"),
        "the link is named: {reason}: {message}"
    );
    assert!(!marker.exists(), "the planted ProxyCommand ran");
    assert_eq!(
        listing(&elsewhere),
        elsewhere_before,
        "the link was followed"
    );

    // Removed, as the message says: converge makes its own and converges.
    fs::remove_file(&ssh_dir).expect("remove the link");
    reconcile_in(&fleet, &tmpdir, "removed").assert_code(0);
    fleet.assert_ready([0]);
    assert!(!marker.exists(), "the planted ProxyCommand ran");
    assert_eq!(
        listing(&old),
        old_before,
        "the old-style directory was used"
    );
    assert_eq!(
        master_sockets(&ssh_dir).len(),
        1,
        "its master is under STATE/ssh"
    );
    assert_private(&ssh_dir);
    fleet.finish();
}

#[test]
fn a_state_directory_too_long_for_sockets_gets_a_temporary_dir_gone_at_exit() {
    let fleet = crate::support::ssh::fleet(1);
    fleet.write_all(1, &["v1"], "");
    let tmpdir = private_tmpdir(&fleet);
    let state = fleet.root().join("s".repeat(70));
    let dir = fleet.dir();
    let config = fleet.ssh_config();
    let args = [
        "reconcile",
        "--once",
        "--dir",
        dir.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
        "--ssh-config",
        config.to_str().expect("utf-8"),
    ];
    let run = converge_in(&fleet, &tmpdir, "long", &args);
    run.assert_code(0);
    assert!(
        run.stderr.contains("private temporary directory"),
        "it says it used one:\n{}",
        run.stderr
    );
    assert!(
        !state.join("ssh").exists(),
        "nothing made under the long path"
    );
    assert_eq!(listing(&tmpdir), Vec::<String>::new(), "left in TMPDIR");
    // No master outlives it: none names the temporary directory.
    let masters = wait_for("the masters to end", Duration::from_secs(10), || {
        let left = processes_mentioning(&tmpdir);
        left.is_empty().then_some(left)
    });
    assert!(masters.is_empty());
    fleet.finish();
}
