//! `reconcile --once --git` applies a signed tip once, for CI, and exits 1
//! with the commit and the reason when the tip is refused (unsigned, or
//! signed with invalid desired state), applying nothing. Bad input gets a clear error: a missing allowed-signers file
//! and a branch the remote does not have stop `run` and `--once` (exit 1);
//! an unreachable remote stops `--once` after retries, but not the daemon,
//! which says so, shows it in `status`, and converges once the remote
//! answers.

use testbed::git::{GitRemote, Signer, allowed_signers};

use super::support::{Fleet, WAIT_LIMIT, wait_for};
use crate::support::Converge as _;

struct World {
    fleet: Fleet,
    repo: GitRemote,
    alice: Signer,
    allowed: String,
}

fn world() -> World {
    let fleet = Fleet::new();
    std::fs::create_dir_all(fleet.dir().join("fleet")).expect("mkdir fleet");
    std::fs::copy(
        fleet.dir().join("build.sh"),
        fleet.dir().join("fleet/build.sh"),
    )
    .expect("copy build.sh");
    let repo = GitRemote::new(&fleet.path("remote.git"), &fleet.dir());
    std::fs::create_dir_all(fleet.path("keys")).expect("mkdir keys");
    let alice = Signer::new(&fleet.path("keys"), "alice@example.com");
    let allowed = fleet.path("keys/allowed_signers");
    allowed_signers(&allowed, &[&alice]);
    World {
        allowed: allowed.to_str().expect("utf-8").to_owned(),
        fleet,
        repo,
        alice,
    }
}

impl World {
    fn web(&self, variant: &str) {
        self.fleet.write(
            "fleet/web.yaml",
            &self.fleet.machine("web", &[], &[variant], ""),
        );
    }

    /// `converge reconcile --once --git URL --dir fleet --state S EXTRA...`.
    fn once(&self, url: &str, extra: &[&str]) -> testbed::run::Run {
        let state = self.fleet.state();
        let mut args = vec![
            "reconcile",
            "--once",
            "--git",
            url,
            "--dir",
            "fleet",
            "--state",
            state.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        self.fleet.converge(&args)
    }

    fn ends(&self) -> Vec<String> {
        self.fleet
            .ledger_with("web", "end")
            .iter()
            .filter_map(|l| l.rsplit(' ').next().map(str::to_owned))
            .collect()
    }
}

#[test]
fn reconcile_once_with_git_applies_a_signed_tip_and_refuses_an_unsigned_or_invalid_one() {
    let w = world();
    let url = w.repo.url();
    let signers = ["--allowed-signers", w.allowed.as_str()];
    w.web("v1");
    let c1 = w.repo.commit("v1", Some(&w.alice));
    w.repo.push();
    w.once(&url, &signers).assert_code(0);
    assert_eq!(w.ends(), ["v1"]);
    let view = w.fleet.status("machine/web");
    assert_eq!(
        view["status"]["last_applied"]["revision"],
        c1[..8],
        "{view}"
    );

    w.web("v2-unsigned");
    let c2 = w.repo.commit("unsigned", None);
    w.repo.push();
    let run = w.once(&url, &signers);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&c2) && run.stderr.contains("not signed"),
        "{}",
        run.stderr
    );
    assert_eq!(w.ends(), ["v1"], "nothing of the refused tip was applied");

    // Signed, but the desired state does not load.
    w.fleet.write(
        "fleet/broken.yaml",
        "apiVersion: converge/v1\nkind: Machine\nmetadata: {name: Bad_Name}\n",
    );
    let c_bad = w.repo.commit("broken", Some(&w.alice));
    w.repo.push();
    let run = w.once(&url, &signers);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&c_bad) && run.stderr.contains("invalid desired state"),
        "{}",
        run.stderr
    );
    assert_eq!(w.ends(), ["v1"], "nothing of the invalid tip was applied");
    std::fs::remove_file(w.fleet.dir().join("fleet/broken.yaml")).expect("remove broken.yaml");

    w.web("v3");
    let c3 = w.repo.commit("v3", Some(&w.alice));
    w.repo.push();
    w.once(&url, &signers).assert_code(0);
    assert_eq!(w.ends(), ["v1", "v3"]);
    let source = w.fleet.read_json(&["status", "--source"]);
    assert_eq!(source["applied"], c3, "{source}");
}

#[test]
fn bad_git_inputs_get_clear_errors() {
    let w = world();
    let url = w.repo.url();
    w.web("v1");
    w.repo.commit("v1", Some(&w.alice));
    w.repo.push();
    let state = w.fleet.state();
    let state = state.to_str().expect("utf-8");
    let missing = w.fleet.path("keys/no-such-file");
    let missing = missing.to_str().expect("utf-8");

    // A missing allowed-signers file: both commands stop, naming it.
    let run = w.once(&url, &["--allowed-signers", missing]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("allowed-signers file") && run.stderr.contains(missing),
        "{}",
        run.stderr
    );
    let run = w.fleet.converge(&[
        "run",
        "--git",
        &url,
        "--dir",
        "fleet",
        "--state",
        state,
        "--allowed-signers",
        missing,
    ]);
    run.assert_code(1);
    assert!(run.stderr.contains(missing), "{}", run.stderr);

    // --dir outside the repository.
    let run = w.fleet.converge(&[
        "reconcile",
        "--once",
        "--git",
        &url,
        "--dir",
        "/etc",
        "--state",
        state,
    ]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("must be a path inside the repository"),
        "{}",
        run.stderr
    );

    // A branch the remote does not have.
    let run = w.once(&url, &["--branch", "nope"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("branch `nope` does not exist"),
        "{}",
        run.stderr
    );
    let run = w.fleet.converge(&[
        "run", "--git", &url, "--branch", "nope", "--dir", "fleet", "--state", state,
    ]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("branch `nope` does not exist"),
        "{}",
        run.stderr
    );

    // An unreachable remote: --once gives up after its retries...
    let later = w.fleet.path("later.git");
    let later_url = later.to_str().expect("utf-8");
    let run = w.once(later_url, &[]);
    run.assert_code(1);
    assert!(run.stderr.contains("cannot be reached"), "{}", run.stderr);

    // ...the daemon keeps running, says so, shows it, and converges once
    // the remote answers.
    let mut daemon = w.fleet.start_daemon_without_dir(&[
        "--git",
        later_url,
        "--dir",
        "fleet",
        "--poll",
        "1s",
        "--allowed-signers",
        &w.allowed,
    ]);
    w.fleet.wait_api(&mut daemon);
    let source = wait_for("the failed fetch in status", WAIT_LIMIT, || {
        let source = w.fleet.read_json(&["status", "--source"]);
        source["error"].is_string().then_some(source)
    });
    assert!(source["failures"].as_u64() >= Some(1), "{source}");
    assert!(
        daemon.log_lines().iter().any(|l| l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot fetch the Git source"))),
        "{}",
        daemon.log()
    );
    let status = w.fleet.converge(&["status", "--state", state]);
    assert!(status.stdout.contains("FAILING"), "{}", status.stdout);
    std::fs::rename(w.fleet.path("remote.git"), &later).expect("move the remote");
    w.fleet.wait_ready("machine/web", WAIT_LIMIT);
    daemon.assert_running();
}
