//! The QEMU driver on this host, against a real `qemu-system-x86_64` (TCG)
//! with an idle VM (128 MiB, one empty 64 MiB disk, no guest OS: it idles
//! in its firmware, which is enough for QMP). Measures, 5 runs each: spec →
//! QMP ready for one VM; 10 VMs started at once (total); a VM killed with
//! SIGKILL → its exit noticed by `watch_exit`, and → running again. Works in
//! short directories under /tmp (Unix socket paths are limited to 107
//! bytes) and kills its QEMUs when it ends, even by panic. Needs
//! `qemu-system-x86_64` and `qemu-img` (packages `qemu-system-x86`,
//! `qemu-utils`).
//!
//! Run in release: `cargo run --release -p converge-bench --bin bench-qemu`.
//! Prints numbers; asserts nothing about time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use converge::driver::qemu::{create_disk, process, start, stop, watch_exit};
use converge::spec::VmSpec;
use converge::spec::parse::{ParsedObject, parse_file};

const RUNS: usize = 5;
const PARALLEL: usize = 10;
const START: Duration = Duration::from_secs(10);
const PARALLEL_START: Duration = Duration::from_secs(30);

const IDLE: &str = "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {name: t}\nspec:\n  memory: 128MiB\n  disks: [{name: root, size: 64MiB}]\n";

/// A VM directory under /tmp whose QEMU is killed when it is dropped.
struct VmDir {
    tmp: tempfile::TempDir,
}

impl VmDir {
    fn new() -> anyhow::Result<VmDir> {
        let tmp = tempfile::Builder::new().prefix("cq").tempdir_in("/tmp")?;
        Ok(VmDir { tmp })
    }

    /// The VM directory itself (created by the driver).
    fn dir(&self) -> PathBuf {
        self.tmp.path().join("vm")
    }

    /// The desired-state directory paths resolve against.
    fn root(&self) -> PathBuf {
        self.tmp.path().to_path_buf()
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        let Ok(pid) = std::fs::read_to_string(self.dir().join("qemu.pid")) else {
            return;
        };
        let pid = pid.trim();
        // Only if the pid is still this VM's QEMU, not a reused one.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&*self.dir().to_string_lossy()) {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

fn require_qemu() -> anyhow::Result<()> {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
    ] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: apt-get install -y --no-install-recommends {package}");
        }
    }
    Ok(())
}

fn idle_spec() -> anyhow::Result<VmSpec> {
    let parsed = parse_file(Path::new("idle.yaml"), IDLE.as_bytes());
    match parsed.objects.into_iter().next().map(|o| o.object) {
        Some(ParsedObject::VirtualMachine(document)) => Ok(document.spec),
        _ => bail!("the idle VM does not parse: {:?}", parsed.diagnostics),
    }
}

async fn with_disks(spec: &VmSpec) -> anyhow::Result<VmDir> {
    let d = VmDir::new()?;
    for disk in &spec.disks {
        create_disk(&d.dir(), disk, None).await?;
    }
    Ok(d)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    require_qemu()?;
    let s = idle_spec()?;
    let d = with_disks(&s).await?;

    let mut singles = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        start(&d.dir(), "t", &s, "h", &d.root(), START).await?;
        singles.push(t.elapsed());
        stop(&d.dir(), Duration::ZERO).await?;
    }
    println!("spec -> QMP ready, one idle VM: {singles:?}");

    let mut many = Vec::new();
    for _ in 0..PARALLEL {
        many.push(with_disks(&s).await?);
    }
    let t = Instant::now();
    let starts = many.iter().map(|m| {
        let (dir, root, s) = (m.dir(), m.root(), s.clone());
        tokio::spawn(async move { start(&dir, "t", &s, "h", &root, PARALLEL_START).await })
    });
    for started in futures::future::join_all(starts).await {
        started.context("a start panicked")??;
    }
    println!("{PARALLEL} idle VMs in parallel: {:?}", t.elapsed());
    for m in &many {
        stop(&m.dir(), Duration::ZERO).await?;
    }

    let mut recoveries = Vec::new();
    for _ in 0..RUNS {
        let st = start(&d.dir(), "t", &s, "h", &d.root(), START).await?;
        let watch = tokio::spawn(watch_exit(st.pid));
        // Lets the watcher take its first look at the live QEMU, so that
        // "noticed" is its poll noticing the death, not a pid already gone.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        process::kill9(st.pid).await?;
        watch.await.context("the watcher panicked")?;
        let noticed = t.elapsed();
        start(&d.dir(), "t", &s, "h", &d.root(), START).await?;
        recoveries.push((noticed, t.elapsed()));
        stop(&d.dir(), Duration::ZERO).await?;
    }
    println!("kill -9 -> noticed, -> running again: {recoveries:?}");
    Ok(())
}
