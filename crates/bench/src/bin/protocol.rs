//! The machine protocol's steps on a local target (`LocalTarget`, real files
//! and processes in a temporary directory): observe, install (upload, copy
//! of a tree the target already holds, already present), switch, and
//! activate (start and wait). Each step runs 20 times; prints median, min
//! and max per step. No prerequisites.
//!
//! Run in release: `cargo run --release -p converge-bench --bin bench-protocol`.
//! Prints numbers; asserts nothing about time.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use converge::driver::build::tree_hash;
use converge::driver::local::LocalTarget;
use converge::driver::protocol::InstallOutcome::{AlreadyPresent, CopiedOnTarget, Uploaded};
use converge::driver::protocol::{GenerationId, activate, install, observe, switch};

const ROUNDS: u64 = 20;
const T: Duration = Duration::from_secs(20);

/// What the protocol's own tests activate: reads the roles document and the
/// artifact, exits 0.
const ACTIVATE: &str = r#"#!/bin/sh
echo "mode=$1 env_mode=$CONVERGE_MODE generation=$CONVERGE_GENERATION"
echo "roles=$(cat "$CONVERGE_ROLES")"
echo "cwd=$(pwd)"
read -r code < exit-code
exit "$code"
"#;

/// A small artifact tree in `dir/name` (activate, a file, a symlink);
/// `version` makes its hash differ from the others'. Returns it and its hash.
fn artifact(dir: &Path, name: &str, version: &str) -> anyhow::Result<(PathBuf, String)> {
    let root = dir.join(name);
    fs::create_dir_all(root.join("share"))?;
    fs::write(root.join("activate"), ACTIVATE)?;
    fs::set_permissions(root.join("activate"), fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("exit-code"), "0")?;
    fs::write(root.join("share/version"), version)?;
    std::os::unix::fs::symlink("share/version", root.join("version-link"))?;
    let hash = tree_hash(&root).with_context(|| format!("hash {}", root.display()))?;
    Ok((root, hash))
}

/// Runs `step` once and adds its wall time to `times`.
async fn timed<F: Future<Output = Result<O, E>>, O, E>(
    times: &mut Vec<Duration>,
    step: F,
) -> Result<O, E> {
    let started = Instant::now();
    let out = step.await;
    times.push(started.elapsed());
    out
}

fn print_times(name: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{name:28} median {:>7.2?}  min {:>7.2?}  max {:>7.2?}",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state_dir = dir.path().join("state").display().to_string();
    let target = LocalTarget::new(state_dir.clone());
    let artifacts = dir.path().join("artifacts");
    let (mut observe_t, mut install_t, mut copy_t, mut present_t, mut switch_t, mut activate_t) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for n in 0..ROUNDS {
        let (root, hash) = artifact(&artifacts, &format!("t{n}"), &format!("v{n}"))?;
        let generation = GenerationId::new(2 * n + 1, hash.clone())?;
        let copy = GenerationId::new(2 * n + 2, hash)?;
        timed(&mut observe_t, observe(&target, &state_dir, T)).await?;
        let upload = install(&target, &state_dir, &root, b"{}", &generation, T);
        // Other roles: the same artifact is copied on the target, not reused.
        let copy_on_target = install(&target, &state_dir, &root, b"{\"copy\":1}", &copy, T);
        let already_present = install(&target, &state_dir, &root, b"{\"copy\":1}", &copy, T);
        let outcomes = [
            timed(&mut install_t, upload).await?,
            timed(&mut copy_t, copy_on_target).await?,
            timed(&mut present_t, already_present).await?,
        ];
        // Each row measures what its label says.
        anyhow::ensure!(
            matches!(outcomes, [Uploaded { .. }, CopiedOnTarget, AlreadyPresent]),
            "round {n}: installs did {outcomes:?}"
        );
        timed(&mut switch_t, switch(&target, &state_dir, &generation, T)).await?;
        let result = timed(
            &mut activate_t,
            activate(&target, &state_dir, &generation, "switch", T),
        )
        .await?;
        anyhow::ensure!(result.code == 0, "activation failed: {}", result.log);
    }
    println!("machine protocol on a local target, {ROUNDS} rounds");
    print_times("observe", observe_t);
    print_times("install (upload)", install_t);
    print_times("install (copy on target)", copy_t);
    print_times("install (already present)", present_t);
    print_times("switch", switch_t);
    print_times("activate (start + wait)", activate_t);
    Ok(())
}
