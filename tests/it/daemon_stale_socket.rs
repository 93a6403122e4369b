//! A daemon killed with SIGKILL leaves its socket behind. The next daemon
//! replaces it, saying so, and answers on it; meanwhile read commands,
//! finding nobody listening, read the store themselves.

use std::time::Duration;

use super::support::{Fleet, WAIT_LIMIT};
use crate::support::Converge as _;

#[test]
fn a_socket_left_by_a_killed_daemon_is_replaced_on_start() {
    let fleet = Fleet::new();
    fleet.write("web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    let mut first = fleet.start_daemon(&[]);
    fleet.wait_api(&mut first);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    first.kill();
    let socket = fleet.state().join("converge.sock");
    assert!(socket.exists(), "SIGKILL leaves the socket behind");

    // Nobody answers on it: status reads the store itself.
    let status = fleet.status("machine/web");
    assert_eq!(status["key"], "machine/web");

    let mut second = fleet.start_daemon(&[]);
    fleet.wait_api(&mut second);
    let replaced = second.log_lines().into_iter().find(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("replacing a stale socket nobody answers on"))
    });
    let replaced = replaced.unwrap_or_else(|| {
        panic!(
            "the daemon says it replaced the stale socket:\n{}",
            second.log()
        )
    });
    assert_eq!(replaced["level"], "WARN", "{replaced}");
    assert_eq!(
        replaced["socket"].as_str(),
        socket.to_str(),
        "the line names the socket: {replaced}"
    );
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    second.signal("TERM");
    let exit = second
        .wait_exit(Duration::from_secs(30))
        .expect("the daemon stops after SIGTERM");
    assert_eq!(exit.code(), Some(0), "{}", second.log());
    assert!(!socket.exists(), "a clean stop removes the socket");
}
