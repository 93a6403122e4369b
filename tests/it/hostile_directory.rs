//! A hostile or odd desired-state directory, with the real binary: FIFOs,
//! sockets, symlinks out of the directory, dangling links, names that are
//! not UTF-8, a 2 GiB sparse file. None of them hangs a command or is
//! skipped silently; each is an error naming the entry, the directory is
//! invalid, the daemon keeps its last valid desired state and forgets
//! nothing, and nothing outside the directory is ever read or quoted.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::support::{Fleet, Run, WAIT_LIMIT, is_ready, wait_for};
use crate::support::Converge as _;

/// Well past what an invalid directory takes to report, well short of a
/// hang being mistaken for slowness.
const LIMIT: Duration = Duration::from_secs(60);

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo (coreutils)");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// `converge COMMAND --dir D` (and `--state S` where it takes one).
fn run(fleet: &Fleet, command: &[&str]) -> Run {
    let dir = fleet.dir();
    let state = fleet.state();
    let mut args = command.to_vec();
    args.extend(["--dir", dir.to_str().expect("utf-8")]);
    if command[0] != "validate" {
        args.extend(["--state", state.to_str().expect("utf-8")]);
    }
    fleet.converge_within(&args, LIMIT)
}

fn output(run: &Run) -> String {
    format!("{}{}", run.stdout, run.stderr)
}

fn assert_invalid_naming(run: &Run, fragments: &[&str]) {
    run.assert_code(1);
    let output = output(run);
    for fragment in fragments {
        assert!(
            output.contains(fragment),
            "`converge {}` does not say `{fragment}`:\n{output}",
            run.args.join(" ")
        );
    }
}

#[test]
fn a_fifo_or_socket_anywhere_fails_validate_plan_and_reconcile_naming_it_without_hanging() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    // Not a YAML name: only the build-input hash used to open it, and hung.
    mkfifo(&fleet.dir().join("pipe"));
    for command in [&["validate"][..], &["plan"], &["reconcile", "--once"]] {
        assert_invalid_naming(
            &run(&fleet, command),
            &["pipe", "is a FIFO (named pipe), not a regular file"],
        );
    }
    assert!(fleet.current("web").is_none(), "nothing was applied");
    std::fs::remove_file(fleet.dir().join("pipe")).expect("remove the FIFO");

    // A FIFO named like a document used to be skipped as if absent.
    mkfifo(&fleet.dir().join("db.yaml"));
    assert_invalid_naming(
        &run(&fleet, &["validate"]),
        &["db.yaml", "is a FIFO (named pipe)"],
    );
    std::fs::remove_file(fleet.dir().join("db.yaml")).expect("remove the FIFO");

    std::fs::create_dir(fleet.dir().join("sub")).expect("mkdir");
    let _socket = std::os::unix::net::UnixListener::bind(fleet.dir().join("sub/agent.sock"))
        .expect("bind a socket in the directory");
    assert_invalid_naming(
        &run(&fleet, &["reconcile", "--once"]),
        &["sub/agent.sock", "is a socket"],
    );
    assert!(fleet.current("web").is_none(), "nothing was applied");
}

#[test]
fn symlinks_are_followed_inside_the_directory_only() {
    let fleet = Fleet::new();
    let dir = fleet.dir();
    std::fs::create_dir_all(dir.join(".shared/machines")).expect("mkdir");
    std::fs::write(
        dir.join(".shared/machines/web.yaml"),
        fleet.machine("web", &[], &["v1"], ""),
    )
    .expect("write");
    // A symlinked subdirectory used to be skipped: its objects vanished.
    symlink(".shared/machines", dir.join("machines")).expect("symlink");
    let valid = run(&fleet, &["validate"]);
    valid.assert_code(0);
    assert!(
        valid.stdout.contains("valid: 1 machines"),
        "{}",
        valid.stdout
    );

    let outside = fleet.path("elsewhere");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(
        outside.join("db.yaml"),
        fleet.machine("db", &[], &["v1"], ""),
    )
    .expect("write");
    symlink(&outside, dir.join("more")).expect("symlink");
    symlink("nowhere.yaml", dir.join("gone.yaml")).expect("symlink");
    let invalid = run(&fleet, &["validate"]);
    assert_invalid_naming(
        &invalid,
        &[
            "symlink `more` points to",
            "outside the desired-state directory",
            "symlink `gone.yaml` points to `nowhere.yaml`, which does not exist",
        ],
    );
    assert!(
        !output(&invalid).contains("name: db"),
        "nothing outside was quoted"
    );
}

#[test]
fn a_name_that_is_not_utf8_is_an_error_shown_escaped() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let name = OsStr::from_bytes(b"db-\xe9t\xe9.yaml");
    std::fs::write(
        fleet.dir().join(name),
        fleet.machine("db", &[], &["v1"], ""),
    )
    .expect("write a file with a Latin-1 name");
    let text = run(&fleet, &["validate"]);
    assert_invalid_naming(&text, &["db-\\xe9t\\xe9.yaml", "is not UTF-8: rename it"]);
    let json = run(&fleet, &["validate", "--output", "json"]);
    json.assert_code(1);
    let files: Vec<Value> = json.json()["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .map(|d| d["file"].clone())
        .collect();
    assert_eq!(files, [Value::from("db-\\xe9t\\xe9.yaml")]);
}

#[test]
fn validate_never_reads_or_quotes_a_file_outside_the_directory() {
    let fleet = Fleet::new();
    // YAML-shaped, so a parse would fail on its second line and quote it.
    let secret = fleet.path("secret.txt");
    std::fs::write(&secret, "apiVersion: converge/v1\nTOP-SECRET-e1b2: [\n").expect("write");
    symlink(&secret, fleet.dir().join("leak.yaml")).expect("symlink");
    let shadow = Path::new("/etc/shadow");
    let shadow_text = std::fs::read_to_string(shadow).ok();
    if shadow.exists() {
        symlink(shadow, fleet.dir().join("shadow.yaml")).expect("symlink");
    }
    for output_format in ["text", "json"] {
        let run = run(&fleet, &["validate", "--output", output_format]);
        assert_invalid_naming(
            &run,
            &[
                "symlink `leak.yaml` points to",
                "outside the desired-state directory",
            ],
        );
        let output = output(&run);
        assert!(!output.contains("TOP-SECRET"), "{output}");
        if let Some(text) = &shadow_text {
            assert!(output.contains("symlink `shadow.yaml`"), "{output}");
            for line in text.lines().filter(|l| l.len() > 4) {
                assert!(!output.contains(line), "a line of /etc/shadow was printed");
            }
        }
    }
}

#[test]
fn a_2gib_sparse_file_is_refused_from_its_size() {
    let fleet = Fleet::new();
    std::fs::File::create(fleet.dir().join("huge.yaml"))
        .and_then(|f| f.set_len(2 << 30))
        .expect("create a sparse file");
    // The size is the file's, not what a bounded read saw (4 MiB + 1).
    assert_invalid_naming(
        &run(&fleet, &["validate"]),
        &[
            "huge.yaml",
            "file is 2147483648 bytes, more than the limit of 4194304 bytes",
        ],
    );
}

/// The ERROR line the daemon logs about `file`, once it logged that the
/// directory was not applied.
fn wait_for_rejection(daemon: &super::support::Daemon, file: &str) -> Value {
    wait_for(
        &format!("the daemon to reject the directory naming {file}"),
        WAIT_LIMIT,
        || {
            let lines = daemon.log_lines();
            let rejected = lines.iter().any(|l| {
                l["level"] == "ERROR"
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("not applied"))
            });
            rejected
                .then(|| {
                    lines
                        .into_iter()
                        .find(|l| l["level"] == "ERROR" && l["file"] == file)
                })
                .flatten()
        },
    )
}

fn assert_nothing_forgotten(fleet: &Fleet) {
    let statuses = fleet.statuses();
    let keys: Vec<&Value> = statuses.iter().map(|s| &s["key"]).collect();
    assert!(
        keys.contains(&&Value::from("machine/web")) && keys.contains(&&Value::from("machine/db")),
        "nothing was forgotten: {keys:?}"
    );
    for status in &statuses {
        assert!(is_ready(status), "still Ready: {status}");
    }
}

/// Points the symlink `link` at `target` in one step (a new link renamed
/// over it), so a watching daemon never sees the directory without it.
fn repoint(fleet: &Fleet, link: &Path, target: &Path) {
    let fresh = fleet.path("link.new");
    symlink(target, &fresh).expect("symlink");
    std::fs::rename(&fresh, link).expect("rename a link over a link");
}

#[test]
fn an_unreadable_entry_makes_the_daemon_keep_its_desired_state_and_forget_nothing() {
    let fleet = Fleet::new();
    let dir = fleet.dir();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    // db is read through a symlinked directory inside the directory.
    std::fs::create_dir(dir.join(".real-sub")).expect("mkdir");
    fleet.write(".real-sub/db.yaml", &fleet.machine("db", &[], &["v1"], ""));
    symlink(".real-sub", dir.join("sub")).expect("symlink");
    let mut daemon = fleet.start_daemon(&["--debounce", "100ms"]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    fleet.wait_ready("machine/db", WAIT_LIMIT);
    let db_generation = fleet.assert_current_complete("db");

    // The link now leaves the directory: skipped, db would be forgotten.
    let outside = fleet.path("moved-sub");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::copy(dir.join(".real-sub/db.yaml"), outside.join("db.yaml")).expect("copy");
    repoint(&fleet, &dir.join("sub"), &outside);
    let line = wait_for_rejection(&daemon, "sub");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("outside the desired-state directory")),
        "{line}"
    );
    daemon.assert_running();
    assert_nothing_forgotten(&fleet);

    // Back inside; then web's file gets a name that is not UTF-8.
    repoint(&fleet, &dir.join("sub"), Path::new(".real-sub"));
    let latin1 = dir.join(OsStr::from_bytes(b"web\xff.yaml"));
    std::fs::rename(dir.join("web.yaml"), &latin1).expect("rename");
    wait_for_rejection(&daemon, "web\\xff.yaml");
    daemon.assert_running();
    assert_nothing_forgotten(&fleet);

    // A FIFO beside the documents.
    std::fs::rename(&latin1, dir.join("web.yaml")).expect("rename back");
    mkfifo(&dir.join("pipe"));
    wait_for_rejection(&daemon, "pipe");
    daemon.assert_running();
    assert_nothing_forgotten(&fleet);
    assert_eq!(
        fleet.current("db"),
        Some(format!("generations/{db_generation}")),
        "db untouched"
    );
}
