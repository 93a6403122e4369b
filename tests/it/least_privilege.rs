//! Least privilege on real sshd hosts: a non-root login with `sudo: true`
//! runs converge's commands as root through `sudo -n` (its activation runs
//! as uid 0, its generation files belong to root); a non-root login without
//! sudo runs them as itself, in its default state directory
//! `~/.local/state/converge`; a sudo that wants a password fails that
//! machine alone, with a message naming it and saying what to do, while the
//! rest of the fleet converges (exit 3).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use testbed::{Options, Sudo};

use crate::support::Converge as _;
use crate::support::ssh::fleet_with;

fn owner(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .uid()
}

#[test]
fn a_sudo_login_converges_and_its_activation_runs_as_root() {
    let fleet = fleet_with(
        1,
        Options {
            deny_root: true,
            ..Options::default()
        },
    );
    let user = fleet.testbed.add_user(Sudo::NoPassword);
    let doc = fleet
        .machine(0, &["v1"], "")
        .replace("user: root", &format!("user: {}, sudo: true", user.name));
    fleet.write_machine(0, &doc);

    fleet.reconcile_once(&[]).assert_code(0);
    let generation = fleet.assert_current_complete(0);
    assert_eq!(fleet.ledger(0), [format!("{generation} switch v1")]);
    let state = fleet.host_state(0);
    assert_eq!(owner(&state.join("ledger")), 0, "activate ran as root");
    let dir = state.join("generations").join(&generation);
    for path in [
        dir.clone(),
        dir.join("artifact/activate"),
        dir.join("roles.json"),
    ] {
        assert_eq!(owner(&path), 0, "{} belongs to root", path.display());
    }
    // A no-op run stays one.
    fleet.reconcile_once(&[]).assert_code(0);
    assert_eq!(fleet.ledger(0).len(), 1);
    fleet.assert_ready([0]);
    fleet.finish();
}

#[test]
fn a_login_without_sudo_converges_as_itself_in_its_home() {
    let fleet = fleet_with(1, Options::default());
    let user = fleet.testbed.add_user(Sudo::None);
    let doc = fleet
        .machine(0, &["v1"], "")
        .replace("user: root", &format!("user: {}", user.name))
        .replace(", stateDir: /var/lib/converge", "");
    assert!(!doc.contains("stateDir"), "{doc}");
    fleet.write_machine(0, &doc);

    fleet.reconcile_once(&[]).assert_code(0);
    let state = user.home.join(".local/state/converge");
    let current = fs::read_link(state.join("current")).expect("current in the default state dir");
    let generation = current
        .to_str()
        .and_then(|c| c.strip_prefix("generations/"))
        .expect("current -> generations/…")
        .to_owned();
    assert!(
        state
            .join("generations")
            .join(&generation)
            .join(".complete")
            .exists()
    );
    let ledger = fs::read_to_string(state.join("ledger")).expect("ledger");
    assert_eq!(ledger.trim(), format!("{generation} switch v1"));
    assert_eq!(
        owner(&state.join("ledger")),
        user.uid,
        "activate ran as the login"
    );
    assert_eq!(
        owner(&state.join("generations").join(&generation)),
        user.uid
    );
    assert!(
        fs::read_dir(fleet.host_state(0))
            .expect("list")
            .next()
            .is_none(),
        "nothing was written in /var/lib/converge"
    );
    fleet.reconcile_once(&[]).assert_code(0);
    assert_eq!(
        fs::read_to_string(state.join("ledger")).expect("ledger"),
        ledger
    );
    let (ready, reason, message) = fleet.ready(0);
    assert!(ready, "{reason}: {message}");
    fleet.finish();
}

#[test]
fn a_sudo_that_wants_a_password_fails_its_machine_alone_and_says_so() {
    let fleet = fleet_with(2, Options::default());
    let user = fleet.testbed.add_user(Sudo::Password);
    let doc = fleet
        .machine(0, &["v1"], "")
        .replace("user: root", &format!("user: {}, sudo: true", user.name));
    fleet.write_machine(0, &doc);
    fleet.write_machine(1, &fleet.machine(1, &["v1"], ""));

    let run = fleet.reconcile_once(&[]);
    run.assert_code(3);
    fleet.assert_ready([1]);
    let (ready, reason, message) = fleet.ready(0);
    println!("host0: {reason}: {message}");
    assert!(!ready);
    assert!(
        message.contains("sudo -n") && message.contains("password") && message.contains("NOPASSWD"),
        "the message says sudo wants a password and what to do: {message}"
    );
    let view = fleet.status("machine/host0");
    let stalled = view["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["kind"] == "Stalled"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        stalled["status"].as_bool(),
        Some(true),
        "a refused sudo is terminal, not retried: {view}"
    );
    let output = format!("{}{}", run.stdout, run.stderr);
    assert!(
        output
            .lines()
            .any(|l| l.contains("host0") && l.contains("sudo")),
        "the run's output names the machine with the refusal:\n{output}"
    );
    assert!(fleet.current(0).is_none(), "nothing was installed on host0");
    fleet.finish();
}
