//! bench-git-source: what one poll of the Git source costs (`run --git`),
//! against a real bare repository on the same disk, with signature checks
//! (a real ed25519 key) and a desired state of 200 machines in 20 files.
//! Prints a table of medians; asserts no time, only that each poll ended
//! the way the scenario needs (applied, unchanged, refused).

use std::time::{Duration, Instant};

use converge::controller::git_source::{GitConfig, Outcome, Tracker};
use converge::store::Store;
use testbed::git::{GitRemote, Signer, allowed_signers};

const FILES: usize = 20;
const PER_FILE: usize = 10;

fn machines(dir: &std::path::Path, file: usize, variant: &str) -> String {
    (0..PER_FILE)
        .map(|i| {
            format!(
                "apiVersion: converge/v1\nkind: Machine\nmetadata: {{name: m{file}-{i}, tags: [bench]}}\nspec:\n  target: {{local: true, stateDir: {state:?}}}\n  build: {{command: [\"./build.sh\", {variant:?}]}}\n",
                state = dir.join(format!("m{file}-{i}")).to_str().unwrap_or_default(),
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("work");
    let fleet = work.join("fleet");
    std::fs::create_dir_all(&fleet)?;
    std::fs::write(fleet.join("build.sh"), "#!/bin/sh\n")?;
    for file in 0..FILES {
        std::fs::write(
            fleet.join(format!("f{file}.yaml")),
            machines(tmp.path(), file, "v0"),
        )?;
    }
    let repo = GitRemote::new(&tmp.path().join("remote.git"), &work);
    let alice = Signer::new(tmp.path(), "alice@example.com");
    let allowed = tmp.path().join("allowed_signers");
    allowed_signers(&allowed, &[&alice]);
    repo.commit("v0", Some(&alice));
    repo.push();

    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state)?;
    let store = Store::open(&state.join("store"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let config = GitConfig {
        url: repo.url(),
        branch: "main".into(),
        dir: "fleet".into(),
        allowed_signers: Some(allowed),
        poll: Duration::from_secs(60),
    };
    let mut tracker = runtime.block_on(Tracker::open(config, &state, store, None))?;
    let timed = |tracker: &mut Tracker| {
        let started = Instant::now();
        let outcome = runtime.block_on(tracker.poll());
        (started.elapsed(), outcome)
    };

    let (first, outcome) = timed(&mut tracker);
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");

    let mut unchanged = Vec::new();
    for _ in 0..20 {
        let (took, outcome) = timed(&mut tracker);
        assert!(matches!(outcome, Outcome::Unchanged { .. }), "{outcome:?}");
        unchanged.push(took);
    }

    let mut applied = Vec::new();
    for n in 1..=10 {
        std::fs::write(
            fleet.join("f0.yaml"),
            machines(tmp.path(), 0, &format!("v{n}")),
        )?;
        repo.commit(&format!("v{n}"), Some(&alice));
        repo.push();
        let (took, outcome) = timed(&mut tracker);
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
        applied.push(took);
    }

    repo.commit("unsigned", None);
    repo.push();
    let (refused, outcome) = timed(&mut tracker);
    assert!(matches!(outcome, Outcome::Refused { .. }), "{outcome:?}");
    let mut still = Vec::new();
    for _ in 0..10 {
        let (took, outcome) = timed(&mut tracker);
        assert!(matches!(outcome, Outcome::Refused { .. }), "{outcome:?}");
        still.push(took);
    }

    println!(
        "Git source poll, {} machines in {FILES} files, signed tips (median)",
        FILES * PER_FILE
    );
    println!("| poll | time |");
    println!("|---|---|");
    println!("| first (fetch all, verify, check out, load) | {first:.1?} |");
    println!(
        "| unchanged tip (fetch only), median of 20 | {:.1?} |",
        median(unchanged)
    );
    println!(
        "| new signed tip, one file changed, median of 10 | {:.1?} |",
        median(applied)
    );
    println!("| new unsigned tip, refused | {refused:.1?} |");
    println!(
        "| the same refused tip again, median of 10 | {:.1?} |",
        median(still)
    );
    Ok(())
}
