//! `GET /healthz` on the daemon's socket: 200 while the loop runs and the
//! desired-state directory was read within three re-read intervals; 503
//! with the reason once it cannot be read (moved away) for longer; 200
//! again when it is back.

use std::path::Path;

use super::support::{Fleet, WAIT_LIMIT, api_get, wait_for};
use crate::support::Converge as _;

/// `(status, body)` of `GET /healthz` on `socket`.
fn healthz(socket: &Path) -> (u16, String) {
    let answer = api_get(socket, "/healthz");
    (answer.status, answer.body)
}

#[test]
fn healthz_is_200_while_running_and_503_with_a_reason_when_the_directory_cannot_be_read() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let mut daemon = fleet.start_daemon(&["--reread-interval", "1s"]);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    let socket = fleet.state().join("converge.sock");
    let (status, body) = healthz(&socket);
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok:"), "{body}");

    // Root reads any directory whatever its mode, so "cannot be read" is a
    // directory that is no longer there.
    let away = fleet.path("d.away");
    std::fs::rename(fleet.dir(), &away).expect("move the directory away");
    let body = wait_for("/healthz to answer 503", WAIT_LIMIT, || {
        let (status, body) = healthz(&socket);
        (status == 503).then_some(body)
    });
    assert!(body.starts_with("unhealthy:"), "{body}");
    assert!(body.contains("three read intervals"), "{body}");
    assert!(
        body.contains("No such file or directory"),
        "the read's error: {body}"
    );
    daemon.assert_running();

    std::fs::rename(&away, fleet.dir()).expect("move it back");
    wait_for("/healthz to answer 200 again", WAIT_LIMIT, || {
        (healthz(&socket).0 == 200).then_some(())
    });
    daemon.assert_running();
}
