//! A Service is Ready only when every machine it selects is Ready with its
//! current roles document, and its message counts the members by
//! condition: with the real daemon, one member whose build fails keeps the
//! service not Ready (counted by its reason, named), and fixing it makes
//! the service Ready; `reconcile --once` exits 3 while a member fails.

use super::support::{Fleet, WAIT_LIMIT, condition, ready_of, wait_for};
use crate::support::Converge as _;

const SERVICE: &str = "apiVersion: converge/v1
kind: Service
metadata: {name: web}
spec:
  module: nginx
  roles:
    server: {tags: [web]}
";

fn message(fleet: &Fleet) -> String {
    let status = fleet.status("service/web");
    condition(&status, "Ready")
        .and_then(|c| c["message"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn a_service_is_ready_only_when_every_member_is_and_counts_them() {
    let fleet = Fleet::new();
    fleet.write("service.yaml", SERVICE);
    fleet.write("a.yaml", &fleet.machine("a", &["web"], &["v1"], ""));
    fleet.write(
        "b.yaml",
        &fleet.machine("b", &["web"], &["v1", "build-exit=1"], ""),
    );

    let run = fleet.reconcile_once(&["--attempts", "1"]);
    run.assert_code(3);
    let (ready, reason) = ready_of(&fleet.status("service/web"));
    assert!(!ready, "a member failed: the service is not Ready");
    assert_eq!(reason, "DependencyFailed");

    let mut daemon = fleet.start_daemon(&["--retry-delay", "30s"]);
    fleet.wait_api(&mut daemon);
    let counted = wait_for("the service to count its members", WAIT_LIMIT, || {
        let m = message(&fleet);
        m.contains("BuildFailed").then_some(m)
    });
    assert!(
        counted.contains("1 roles, 2 members: 1 Ready, 1 BuildFailed (b)"),
        "{counted}"
    );
    let (ready, _) = ready_of(&fleet.status("service/web"));
    assert!(!ready, "{counted}");

    fleet.write("b.yaml", &fleet.machine("b", &["web"], &["v1"], ""));
    fleet.wait_ready("service/web", WAIT_LIMIT);
    assert!(
        message(&fleet).contains("2 members: 2 Ready"),
        "{}",
        message(&fleet)
    );
    let (a_ready, _) = ready_of(&fleet.status("machine/a"));
    let (b_ready, _) = ready_of(&fleet.status("machine/b"));
    assert!(a_ready && b_ready);
    daemon.assert_running();
}
