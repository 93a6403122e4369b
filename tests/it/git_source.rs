//! `run --git`: the daemon pulls desired state from a real Git remote (a
//! bare repository, pushed to from a working clone) and applies only
//! fast-forwards of the last applied commit whose tip carries an SSH
//! signature (a real ed25519 key) the allowed-signers file accepts. Signed
//! commits converge with no trigger; an unsigned commit, a commit signed by
//! an unknown key and a forced push that is not a fast-forward are each
//! refused with nothing activated (the ledger says so), logged at ERROR
//! with the commit, recorded as events and counted; the branch restored
//! with a signed fast-forward of the applied commit is accepted. After a
//! restart the base is still the applied commit, and `converge fetch`
//! and SIGHUP apply at once; a tip refused for its signer is accepted once the
//! allowed-signers file names the signer.

use serde_json::Value;
use testbed::git::{GitRemote, Signer, allowed_signers};

use super::support::{Daemon, Fleet, WAIT_LIMIT, wait_for};
use crate::support::Converge as _;

/// The fleet's working clone is its desired-state directory `d/`; desired
/// state lives in `d/fleet/`, with the fleet's build script beside it.
fn repository(fleet: &Fleet) -> GitRemote {
    std::fs::create_dir_all(fleet.dir().join("fleet")).expect("mkdir fleet");
    std::fs::copy(
        fleet.dir().join("build.sh"),
        fleet.dir().join("fleet/build.sh"),
    )
    .expect("copy build.sh");
    GitRemote::new(&fleet.path("remote.git"), &fleet.dir())
}

fn web(fleet: &Fleet, variant: &str) {
    fleet.write("fleet/web.yaml", &fleet.machine("web", &[], &[variant], ""));
}

fn source(fleet: &Fleet) -> Value {
    fleet.read_json(&["status", "--source"])
}

/// Waits until the source says `commit` was refused; returns the reason.
fn wait_refused(fleet: &Fleet, daemon: &mut Daemon, commit: &str) -> String {
    wait_for(&format!("{commit} to be refused"), WAIT_LIMIT, || {
        daemon.assert_running();
        let source = source(fleet);
        (source["refused"]["commit"] == commit).then(|| {
            source["refused"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
    })
}

/// Waits until machine web's ledger shows an activation of `variant` ended.
fn wait_activated(fleet: &Fleet, daemon: &mut Daemon, variant: &str) {
    wait_for(&format!("web to activate {variant}"), WAIT_LIMIT, || {
        daemon.assert_running();
        fleet
            .ledger_with("web", "end")
            .iter()
            .any(|l| l.ends_with(&format!(" {variant}")))
            .then_some(())
    });
}

fn variants_activated(fleet: &Fleet) -> Vec<String> {
    fleet
        .ledger_with("web", "start")
        .iter()
        .filter_map(|l| l.rsplit(' ').next().map(str::to_owned))
        .collect()
}

fn error_line_names(daemon: &Daemon, commit: &str) -> bool {
    daemon.log_lines().iter().any(|l| {
        l["level"] == "ERROR"
            && l["commit"] == commit
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains(&commit[..12]))
    })
}

#[test]
fn signed_fast_forwards_converge_and_everything_else_is_refused_with_nothing_applied() {
    let fleet = Fleet::new();
    let repo = repository(&fleet);
    std::fs::create_dir_all(fleet.path("keys")).expect("mkdir keys");
    let alice = Signer::new(&fleet.path("keys"), "alice@example.com");
    let mallory = Signer::new(&fleet.path("keys"), "mallory@example.com");
    let allowed = fleet.path("keys/allowed_signers");
    allowed_signers(&allowed, &[&alice]);

    web(&fleet, "v1");
    let c1 = repo.commit("v1", Some(&alice));
    repo.push();
    let url = repo.url();
    let allowed_arg = allowed.to_str().expect("utf-8");
    let args = [
        "--git",
        url.as_str(),
        "--branch",
        "main",
        "--dir",
        "fleet",
        "--poll",
        "1s",
        "--allowed-signers",
        allowed_arg,
    ];
    let mut daemon = fleet.start_daemon_without_dir(&args);
    fleet.wait_api(&mut daemon);
    let view = fleet.wait_ready("machine/web", WAIT_LIMIT);
    assert_eq!(
        view["status"]["last_applied"]["revision"],
        c1[..8],
        "the applied revision is the commit's first 8 hex digits: {view}"
    );
    assert_eq!(source(&fleet)["applied"], c1);

    // A signed fast-forward converges with no trigger.
    web(&fleet, "v2");
    let c2 = repo.commit("v2", Some(&alice));
    repo.push();
    wait_activated(&fleet, &mut daemon, "v2");
    let view = wait_for("v2's revision in status", WAIT_LIMIT, || {
        let view = fleet.status("machine/web");
        (view["status"]["last_applied"]["revision"] == c2[..8]).then_some(view)
    });
    assert!(super::support::is_ready(&view), "{view}");

    // Unsigned.
    web(&fleet, "v3-unsigned");
    let c3 = repo.commit("unsigned", None);
    repo.push();
    let reason = wait_refused(&fleet, &mut daemon, &c3);
    assert!(reason.contains("not signed"), "{reason}");
    assert!(error_line_names(&daemon, &c3), "{}", daemon.log());

    // Signed by a key the allowed-signers file does not name.
    web(&fleet, "v4-mallory");
    let c4 = repo.commit("mallory", Some(&mallory));
    repo.push();
    let reason = wait_refused(&fleet, &mut daemon, &c4);
    assert!(reason.contains("not accepted"), "{reason}");
    assert!(error_line_names(&daemon, &c4), "{}", daemon.log());

    // A forced push that is not a fast-forward of the applied c2, signed.
    repo.reset_hard(&c1);
    web(&fleet, "v5-rewritten");
    let c5 = repo.commit("rewritten history", Some(&alice));
    repo.force_push();
    let reason = wait_refused(&fleet, &mut daemon, &c5);
    assert!(reason.contains("not a fast-forward"), "{reason}");
    assert!(error_line_names(&daemon, &c5), "{}", daemon.log());

    assert_eq!(
        variants_activated(&fleet),
        ["v1", "v2"],
        "nothing refused was activated"
    );
    assert_eq!(
        fleet.status("machine/web")["status"]["last_applied"]["revision"],
        c2[..8],
        "the last applied revision stays in force"
    );
    let events: Value =
        serde_json::from_str(&fleet.api_get("/v1/events?limit=100").body).expect("events as JSON");
    for commit in [&c3, &c4, &c5] {
        assert!(
            events
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["key"] == "source"
                    && e["reason"] == "SourceRefused"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&commit[..12]))),
            "an event for {commit}: {events}"
        );
    }
    let metrics = fleet.api_get("/metrics").body;
    for cause in ["unsigned", "unknown-signer", "not-fast-forward"] {
        assert!(
            metrics.contains(&format!(
                "converge_source_refusals_total{{reason=\"{cause}\"}} 1"
            )),
            "{cause}:\n{metrics}"
        );
    }

    // Restore the branch; a signed fast-forward of c2 is accepted.
    repo.reset_hard(&c2);
    web(&fleet, "v6");
    let c6 = repo.commit("v6 on top of the applied commit", Some(&alice));
    repo.force_push();
    wait_activated(&fleet, &mut daemon, "v6");
    wait_for("c6 to be applied", WAIT_LIMIT, || {
        (source(&fleet)["applied"] == c6).then_some(())
    });
    assert_eq!(variants_activated(&fleet), ["v1", "v2", "v6"]);
    drop(daemon);

    // A restart keeps the base: with no poll to speak of, `converge fetch`
    // refuses a rewrite at once, then applies a signed fast-forward.
    let mut slow = args.to_vec();
    slow[7] = "1h";
    let mut daemon = fleet.start_daemon_without_dir(&slow);
    fleet.wait_api(&mut daemon);
    repo.reset_hard(&c1);
    let c7 = repo.commit("rewrite after the restart", Some(&alice));
    repo.force_push();
    let state = fleet.state();
    let fetch = ["fetch", "--state", state.to_str().expect("utf-8")];
    let run = fleet.converge(&fetch);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&c7[..12]) && run.stderr.contains("not a fast-forward"),
        "{}",
        run.stderr
    );
    repo.reset_hard(&c6);
    web(&fleet, "v8");
    let c8 = repo.commit("v8", Some(&alice));
    repo.force_push();
    let run = fleet.converge(&fetch);
    run.assert_code(0);
    assert!(run.stdout.contains(&c8[..12]), "{}", run.stdout);
    wait_activated(&fleet, &mut daemon, "v8");
    assert_eq!(variants_activated(&fleet), ["v1", "v2", "v6", "v8"]);

    // A tip refused for its signer is accepted once the signer is allowed.
    web(&fleet, "v9");
    let c9 = repo.commit("v9 by mallory", Some(&mallory));
    repo.push();
    let run = fleet.converge(&fetch);
    run.assert_code(1);
    assert!(run.stderr.contains(&c9[..12]), "{}", run.stderr);
    allowed_signers(&allowed, &[&alice, &mallory]);
    let run = fleet.converge(&fetch);
    run.assert_code(0);
    assert!(run.stdout.contains(&c9[..12]), "{}", run.stdout);
    wait_activated(&fleet, &mut daemon, "v9");

    // SIGHUP fetches too (`systemctl reload`).
    web(&fleet, "v10");
    let c10 = repo.commit("v10", Some(&alice));
    repo.push();
    daemon.signal("HUP");
    wait_activated(&fleet, &mut daemon, "v10");

    let text = fleet.converge(&["status", "--state", state.to_str().expect("utf-8")]);
    text.assert_code(0);
    assert!(
        text.stdout.contains("SOURCE") && text.stdout.contains(&c10[..12]),
        "status shows the source:\n{}",
        text.stdout
    );
}
