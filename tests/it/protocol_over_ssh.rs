//! The machine protocol over a real SSH target on testbed hosts, with real
//! faults, through the driver's public API only.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use converge::driver::Target;
use converge::driver::build::tree_hash;
use converge::driver::protocol::{
    self, ConfirmOutcome, ConfirmationState, CurrentLink, GenerationId, InstallOutcome,
    RollbackAction,
};
use converge::driver::ssh::SshTarget;
use testbed::{REMOTE_STATE_DIR, Testbed, make_executable};

const T: Duration = Duration::from_secs(30);

/// An artifact whose `activate` is `body` (a sh script), in `dir/name`.
fn artifact(dir: &Path, name: &str, body: &str) -> (PathBuf, String) {
    let root = dir.join(name);
    fs::create_dir_all(root.join("share")).expect("mkdir");
    fs::write(root.join("activate"), format!("#!/bin/sh\n{body}\n")).expect("write");
    make_executable(&root.join("activate"));
    fs::write(root.join("share/name"), name).expect("write");
    std::os::unix::fs::symlink("share/name", root.join("name-link")).expect("symlink");
    let hash = tree_hash(&root).expect("hash");
    (root, hash)
}

async fn install(t: &SshTarget, n: u64, root: &Path, hash: &str) -> GenerationId {
    let generation = GenerationId::new(n, hash).expect("generation");
    protocol::install(
        t,
        REMOTE_STATE_DIR,
        root,
        b"{\"role\":\"peer\"}",
        &generation,
        T,
    )
    .await
    .expect("install");
    generation
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test]
async fn the_machine_protocol_runs_end_to_end_over_ssh() {
    let testbed = Testbed::new(1);
    let host = testbed.host(0);
    let t = SshTarget::new(crate::support::ssh::options(&testbed, 0)).expect("target");
    let local = tempfile::tempdir().expect("tempdir");

    let facts = protocol::observe(&t, REMOTE_STATE_DIR, T)
        .await
        .expect("observe");
    assert_eq!(facts.hostname, host.name);
    assert_eq!(facts.current, CurrentLink::Absent);
    assert_eq!(facts.boot_id.len(), 36);

    let (root, hash) = artifact(
        local.path(),
        "a1",
        "echo \"mode=$1 generation=$CONVERGE_GENERATION roles=$(cat \"$CONVERGE_ROLES\")\"; echo \"$CONVERGE_GENERATION\" >> \"$CONVERGE_STATE_DIR/ledger\"",
    );
    let g1 = GenerationId::new(1, hash.clone()).expect("generation");
    let outcome = protocol::install(&t, REMOTE_STATE_DIR, &root, b"{\"role\":\"peer\"}", &g1, T)
        .await
        .expect("install");
    assert!(
        matches!(outcome, InstallOutcome::Uploaded { .. }),
        "{outcome:?}"
    );
    let on_host = host.state_dir.join("generations").join(g1.to_string());
    assert_eq!(
        tree_hash(&on_host.join("artifact")).expect("hash"),
        hash,
        "uploaded tree is identical"
    );
    let g2 = GenerationId::new(2, hash).expect("generation");
    let outcome = protocol::install(&t, REMOTE_STATE_DIR, &root, b"{}", &g2, T)
        .await
        .expect("install");
    assert_eq!(outcome, InstallOutcome::CopiedOnTarget);

    protocol::switch(&t, REMOTE_STATE_DIR, &g1, T)
        .await
        .expect("switch");
    let result = protocol::activate(&t, REMOTE_STATE_DIR, &g1, "switch", T)
        .await
        .expect("activate");
    assert_eq!(result.code, 0, "{}", result.log);
    assert_eq!(
        result.log,
        format!("mode=switch generation={g1} roles={{\"role\":\"peer\"}}\n")
    );
    let facts = protocol::observe(&t, REMOTE_STATE_DIR, T)
        .await
        .expect("observe");
    assert_eq!(facts.current_generation(), Some(&g1));
    assert_eq!(facts.generations, [g1.clone(), g2.clone()]);
    let argv = ["test", "-e", "/var/lib/converge/current/.complete"].map(str::to_owned);
    protocol::health_check(&t, &argv, T)
        .await
        .expect("health check");

    // Magic rollback, confirmed over a new connection.
    protocol::switch(&t, REMOTE_STATE_DIR, &g2, T)
        .await
        .expect("switch");
    let attempt = protocol::start_activation(&t, REMOTE_STATE_DIR, &g2, "switch", T)
        .await
        .expect("start");
    let c = protocol::arm_confirmation(
        &t,
        REMOTE_STATE_DIR,
        &attempt,
        Some(&g1),
        "switch",
        Duration::from_secs(5),
        T,
    )
    .await
    .expect("arm");
    assert_eq!(
        protocol::wait_activation(&t, REMOTE_STATE_DIR, &attempt, T)
            .await
            .expect("wait")
            .code,
        0
    );
    let fresh = t.fresh();
    assert_eq!(
        protocol::confirm(&fresh, REMOTE_STATE_DIR, &c, T)
            .await
            .expect("confirm"),
        ConfirmOutcome::Confirmed
    );
    assert_ne!(
        fresh.master_socket().await,
        t.master_socket().await,
        "confirmed over its own connection"
    );
    let ledger = fs::read_to_string(host.state_dir.join("ledger")).expect("ledger");
    assert_eq!(ledger, format!("{g1}\n{g2}\n"));
    let removed = protocol::prune(&t, REMOTE_STATE_DIR, 0, &[], T)
        .await
        .expect("prune");
    assert_eq!(removed, [g1]);
}

#[tokio::test]
async fn an_activation_survives_a_dropped_connection() {
    let testbed = Testbed::new(1);
    let host = testbed.host(0);
    let mut options = crate::support::ssh::options(&testbed, 0);
    options.connect_timeout = Duration::from_secs(2);
    let t = SshTarget::new(options).expect("target");
    let local = tempfile::tempdir().expect("tempdir");
    let (root, hash) = artifact(local.path(), "slow", "sleep 3; echo finished; exit 4");
    let g1 = install(&t, 1, &root, &hash).await;
    protocol::switch(&t, REMOTE_STATE_DIR, &g1, T)
        .await
        .expect("switch");
    let attempt = protocol::start_activation(&t, REMOTE_STATE_DIR, &g1, "switch", T)
        .await
        .expect("start");
    // The link drops while the controller waits, and stays down until the
    // wait gives up (the master's ServerAlive bound): that wait fails.
    let waiting = protocol::wait_activation(&t, REMOTE_STATE_DIR, &attempt, T);
    let fault = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while host.processes_mentioning("converge-apply.sh").is_empty() {
            assert!(
                Instant::now() < deadline,
                "the wait script never ran on the host"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        host.link_down();
    };
    let (waited, ()) = tokio::join!(waiting, fault);
    host.link_up();
    match waited {
        Ok(result) => panic!("a wait over a dead link returned a result: {result:?}"),
        Err(error) => assert!(error.is_transient(), "{error:?}"),
    }
    // Over a new connection, the real result of the activation that kept running.
    let fresh = t.fresh();
    let deadline = Instant::now() + Duration::from_secs(15);
    let result = loop {
        match protocol::wait_activation(&fresh, REMOTE_STATE_DIR, &attempt, T).await {
            Ok(result) => break result,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("wait over a new connection: {}", chain(&e)),
        }
    };
    assert_eq!((result.code, result.log.as_str()), (4, "finished\n"));
}

/// deploy-rs #57/#214 done right: an activation that cuts the machine off
/// is rolled back by the machine itself, and the controller reads the
/// rollback afterwards and can report the deploy as failed.
#[tokio::test]
async fn an_activation_that_cuts_the_network_is_rolled_back_on_the_machine() {
    let testbed = Testbed::new(1);
    let mut options = crate::support::ssh::options(&testbed, 0);
    options.connect_timeout = Duration::from_secs(2);
    let t = SshTarget::new(options).expect("target");
    let local = tempfile::tempdir().expect("tempdir");
    let (good, good_hash) = artifact(local.path(), "good", "ip link set eth0 up; echo network up");
    let (bad, bad_hash) = artifact(
        local.path(),
        "bad",
        "sleep 0.5; ip link set eth0 down; echo network down",
    );
    let g1 = install(&t, 1, &good, &good_hash).await;
    let g2 = install(&t, 2, &bad, &bad_hash).await;
    protocol::switch(&t, REMOTE_STATE_DIR, &g1, T)
        .await
        .expect("switch");
    protocol::activate(&t, REMOTE_STATE_DIR, &g1, "switch", T)
        .await
        .expect("activate");

    protocol::switch(&t, REMOTE_STATE_DIR, &g2, T)
        .await
        .expect("switch");
    let attempt = protocol::start_activation(&t, REMOTE_STATE_DIR, &g2, "switch", T)
        .await
        .expect("start");
    // Armed before waiting: the activation may cut us off. The window is
    // longer than the dead-link bound (6 s), so the controller's connection
    // is surely dropped before the machine restores its network.
    let window = t.options().dead_link_bound() + Duration::from_secs(2);
    let c = protocol::arm_confirmation(
        &t,
        REMOTE_STATE_DIR,
        &attempt,
        Some(&g1),
        "switch",
        window,
        T,
    )
    .await
    .expect("arm");
    let started = Instant::now();
    let error = match protocol::wait_activation(&t, REMOTE_STATE_DIR, &attempt, T).await {
        Ok(result) => panic!("the activation must take the network down: {result:?}"),
        Err(error) => error,
    };
    println!(
        "wait failed after {:?}: {}",
        started.elapsed(),
        chain(&error)
    );
    assert!(error.is_transient());
    let error = protocol::confirm(&t.fresh(), REMOTE_STATE_DIR, &c, T)
        .await
        .expect_err("cannot confirm: unreachable");
    assert!(error.is_transient(), "{error:?}");

    // The machine rolls back on its own and comes back; the controller reads what happened.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rollback = loop {
        match protocol::confirmation_state(&t.fresh(), REMOTE_STATE_DIR, &c, T).await {
            Ok(ConfirmationState::Fired { rollback })
                if rollback.action != RollbackAction::InProgress =>
            {
                break rollback;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "machine never came back: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    println!(
        "rolled back and reachable again {:?} after the activation started",
        started.elapsed()
    );
    assert_eq!(
        rollback.activation_code,
        Some(0),
        "the bad activation itself exited 0"
    );
    assert!(
        matches!(&rollback.action, RollbackAction::RolledBack { to, code: Some(0), .. } if *to == g1),
        "{rollback:?}"
    );
    let facts = protocol::observe(&t, REMOTE_STATE_DIR, T)
        .await
        .expect("observe");
    assert_eq!(facts.current_generation(), Some(&g1));
    match protocol::confirm(&t, REMOTE_STATE_DIR, &c, T)
        .await
        .expect("confirm")
    {
        ConfirmOutcome::AlreadyRolledBack { .. } => {}
        other => panic!("a late confirm must report the rollback: {other:?}"),
    }
}

/// Regression: native-mux output was cut when the exit status overtook it.
#[tokio::test(flavor = "multi_thread")]
async fn command_output_is_never_truncated() {
    let testbed = Testbed::new(1);
    let t = SshTarget::new(crate::support::ssh::options(&testbed, 0)).expect("target");
    let argv: Vec<String> = [
        "sh",
        "-c",
        "head -c 3000 /dev/zero | tr '\\0' a; printf '\\nconverge-status=0\\n'",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut bad = 0;
    for round in 0..40 {
        let runs = (0..8).map(|_| t.run(&argv, &[], T));
        for out in futures::future::join_all(runs).await {
            let out = out.expect("run");
            if !out.stdout.ends_with("converge-status=0\n") {
                bad += 1;
                println!(
                    "round {round}: truncated to {} bytes, code {:?}",
                    out.stdout.len(),
                    out.code
                );
            }
        }
    }
    assert_eq!(bad, 0);
}
