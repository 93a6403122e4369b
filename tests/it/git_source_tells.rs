//! The Git source tells the rest of the daemon what its fetches found: a
//! refused tip is notified (once, through `--notify-exec`, event
//! `sourceRefused`), and `/healthz` counts a fetch that reached the remote
//! as a source read and says why when the remote cannot be read.

use std::time::Duration;

use testbed::git::{GitRemote, Signer, allowed_signers};

use super::support::{Fleet, WAIT_LIMIT, wait_for};
use crate::support::Converge as _;

#[test]
fn a_refused_tip_is_notified_once_and_healthz_follows_the_remote() {
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
    fleet.write("fleet/web.yaml", &fleet.machine("web", &[], &["v1"], ""));
    repo.commit("v1", Some(&alice));
    repo.push();

    let told = fleet.path("told.jsonl");
    let hook = format!("cat >> {}; echo >> {}", told.display(), told.display());
    let url = repo.url();
    let args = [
        "--git",
        url.as_str(),
        "--dir",
        "fleet",
        "--poll",
        "1s",
        "--allowed-signers",
        allowed.to_str().expect("utf-8"),
        "--notify-exec",
        hook.as_str(),
    ];
    let mut daemon = fleet.start_daemon_without_dir(&args);
    fleet.wait_api(&mut daemon);
    fleet.wait_ready("machine/web", WAIT_LIMIT);
    let answer = fleet.api_get("/healthz");
    let (code, body) = (answer.status, answer.body);
    assert_eq!(code, 200, "{body}");

    // An unsigned tip: refused, and told once although every poll sees it.
    fleet.write("fleet/web.yaml", &fleet.machine("web", &[], &["v2"], ""));
    let unsigned = repo.commit("v2 unsigned", None);
    repo.push();
    let refused = |text: &str| {
        text.lines()
            .filter(|l| l.contains("\"sourceRefused\""))
            .count()
    };
    wait_for("the refusal to be told", WAIT_LIMIT, || {
        daemon.assert_running();
        let text = std::fs::read_to_string(&told).unwrap_or_default();
        (refused(&text) > 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let text = std::fs::read_to_string(&told).expect("read what the hook got");
    assert_eq!(refused(&text), 1, "told once, not at every poll:\n{text}");
    let line = text
        .lines()
        .find(|l| l.contains("\"sourceRefused\""))
        .expect("the refusal");
    assert!(line.contains(&unsigned[..8]), "names the commit: {line}");
    assert!(line.contains("SourceRefused"), "{line}");
    let answer = fleet.api_get("/healthz");
    let (code, body) = (answer.status, answer.body);
    assert_eq!(code, 200, "a refused tip is still a source read: {body}");
    // `converge events source` lists the Git source's events alone.
    let events = fleet.read_json(&["events", "source"]);
    let events = events.as_array().expect("an array");
    assert!(!events.is_empty(), "the refusal is an event");
    assert!(
        events.iter().all(|e| e["key"] == "source"),
        "only the source's: {events:?}"
    );

    // The remote gone: fetches fail; /healthz says why once three polls passed.
    std::fs::rename(fleet.path("remote.git"), fleet.path("remote.gone"))
        .expect("move the remote away");
    let body = wait_for("/healthz to turn 503", WAIT_LIMIT, || {
        daemon.assert_running();
        let answer = fleet.api_get("/healthz");
        let (code, body) = (answer.status, answer.body);
        (code == 503).then_some(body)
    });
    assert!(body.contains("the last read failed"), "{body}");
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)).is_some());
}
