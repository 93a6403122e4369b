//! The testbed itself: a run that panics leaves nothing behind, and a crashed
//! run's leftovers are cleaned without touching live runs.

use std::fs;

use testbed::{PREFIX, Testbed, cleanup_stale, leftovers};

#[test]
fn a_testbed_that_panics_leaves_nothing_behind() {
    let mut id = String::new();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let testbed = Testbed::new(2);
        id = testbed.id().to_owned();
        assert!(!leftovers(&id).is_empty(), "a live testbed must be visible");
        // A detached process inside a host, as an activation would leave.
        let marker = format!("/tmp/{PREFIX}{id}");
        testbed.host(0).exec(&[
            "setsid",
            "-f",
            "sh",
            "-c",
            "exec </dev/null >/dev/null 2>&1; sleep 300; :",
            &marker,
        ]);
        panic!("deliberate failure inside a test");
    }));
    assert!(caught.is_err());
    assert!(!id.is_empty());
    let left = leftovers(&id);
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[test]
fn cleanup_stale_removes_a_crashed_run_and_spares_live_ones() {
    let live = Testbed::new(1);
    let crashed = Testbed::new(2);
    let crashed_id = crashed.id().to_owned();
    // Pretend its owner died: pid 1's identity with a start time that never matches.
    fs::write(crashed.dir().join("owner"), "1 0").expect("write owner");
    std::mem::forget(crashed);
    let cleaned = cleanup_stale(PREFIX);
    assert!(cleaned.contains(&crashed_id), "{cleaned:?}");
    assert!(!cleaned.contains(&live.id().to_owned()));
    let left = leftovers(&crashed_id);
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(leftovers(live.id()).iter().any(|l| l.starts_with("netns")));
    assert!(
        live.host(0)
            .exec(&["ip", "-br", "addr"])
            .contains(&live.host(0).address)
    );
}
