//! Tests of the QEMU driver against a real `qemu-system-x86_64` (TCG) and
//! `qemu-img`. No guest OS is needed: a VM with an empty disk idles in its
//! firmware, which is enough for QMP. Each test works in its own short
//! directory under /tmp (Unix socket paths are limited to 107 bytes) and
//! kills its QEMUs when it ends, even by panic. A missing QEMU fails the tests
//! with the packages to install.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use super::disk::image_info;
use super::monitor::query_status;
use super::*;
use crate::spec::{OnDelete, VmSpec};

const START: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_millis(300);

/// A VM directory whose QEMUs are killed when it is dropped.
struct VmDir {
    tmp: tempfile::TempDir,
}

impl VmDir {
    fn new() -> VmDir {
        for (tool, package) in [
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("qemu-img", "qemu-utils"),
            ("qemu-io", "qemu-utils"),
        ] {
            let found = StdCommand::new(tool).arg("--version").output().is_ok();
            assert!(
                found,
                "{tool} is missing: apt-get install -y --no-install-recommends {package}"
            );
        }
        let tmp = tempfile::Builder::new()
            .prefix("cq")
            .tempdir_in("/tmp")
            .unwrap();
        VmDir { tmp }
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
        // By pidfile first, then any straggler that names the directory.
        let pidfile = self.dir().join("qemu.pid");
        let mut pids: Vec<u32> = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .into_iter()
            .collect();
        pids.extend(qemu_pids(&self.dir()));
        for pid in pids {
            if cmdline(pid).contains(&self.dir().to_string_lossy().into_owned()) {
                let _ = StdCommand::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Live (non-zombie) qemu-system processes whose command line names `dir`.
fn qemu_pids(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z'));
        let cmd = cmdline(pid);
        if !zombie && cmd.starts_with("qemu-system") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

fn spec(yaml: &str) -> VmSpec {
    serde_saphyr::from_str(yaml).unwrap()
}

const IDLE: &str = "memory: 128MiB\ndisks: [{name: root, size: 64MiB}]\n";

async fn create_disks(d: &VmDir, s: &VmSpec) {
    for disk in &s.disks {
        create_disk(&d.dir(), disk, None).await.unwrap();
    }
}

async fn started(d: &VmDir, yaml: &str, hash: &str) -> (VmSpec, Started) {
    let s = spec(yaml);
    create_disks(d, &s).await;
    let st = start(&d.dir(), "t", &s, hash, &d.root(), START)
        .await
        .unwrap();
    (s, st)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Nothing was started and nothing was written for a VM refused in preflight.
fn assert_nothing_started(d: &VmDir) {
    assert!(qemu_pids(&d.dir()).is_empty());
    assert!(!d.dir().join("launch.json").exists());
    assert!(!d.dir().join("qemu.pid").exists());
}

#[tokio::test]
async fn a_started_vm_is_running_over_qmp_and_observed_with_its_spec_hash() {
    let d = VmDir::new();
    let (s, st) = started(&d, IDLE, "hash-1").await;
    assert_eq!(st.status, "running");

    let mut qmp = Qmp::connect(&d.dir().join("qmp.sock"), Duration::from_secs(2))
        .await
        .unwrap();
    let status = qmp.execute("query-status", None).await.unwrap();
    assert_eq!(status["status"], "running");
    let mem = qmp
        .execute("query-memory-size-summary", None)
        .await
        .unwrap();
    assert_eq!(mem["base-memory"], 128 * 1024 * 1024);
    drop(qmp);

    let facts = observe(&d.dir(), &s.disks).await;
    assert!(facts.running);
    assert_eq!(facts.pid, Some(st.pid));
    assert_eq!(facts.qmp_status.as_deref(), Some("running"));
    assert_eq!(facts.started_spec_hash.as_deref(), Some("hash-1"));
    assert_eq!(
        facts.disks,
        [DiskFacts {
            name: "root".into(),
            exists: true,
            virtual_size: Some(64 << 20)
        }]
    );
    assert!(d.dir().join("serial.log").exists());
    let record: LaunchRecord =
        serde_json::from_slice(&std::fs::read(d.dir().join("launch.json")).unwrap()).unwrap();
    assert_eq!(record.argv, argv(&s, "t", &d.dir(), &d.root()));

    let bigger = spec("memory: 256MiB\ndisks: [{name: root, size: 64MiB}]\n");
    assert_eq!(restart_reasons(&s, &bigger), ["memory"]);

    // No guest OS answers ACPI, so the stop escalates to `quit`.
    let outcome = stop(&d.dir(), GRACE).await.unwrap();
    assert!(matches!(
        outcome,
        StopOutcome::Quit | StopOutcome::PoweredDown
    ));
    assert!(process::proc_info(st.pid).await.is_none());
    let facts = observe(&d.dir(), &s.disks).await;
    assert!(!facts.running);
    assert_eq!(facts.pid, None);
    assert_eq!(facts.started_spec_hash, None);
    assert!(!d.dir().join("qemu.pid").exists());
    assert_eq!(
        stop(&d.dir(), GRACE).await.unwrap(),
        StopOutcome::NotRunning
    );
}

#[tokio::test]
async fn disks_are_created_on_a_backing_image_and_only_ever_grow() {
    let d = VmDir::new();
    let base = d.root().join("base.qcow2");
    let made = StdCommand::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("32M")
        .status()
        .unwrap();
    assert!(made.success());
    let s = spec("memory: 64MiB\ndisks: [{name: root, size: 64MiB, backingImage: base.qcow2}]\n");
    let disk = &s.disks[0];
    create_disk(&d.dir(), disk, Some(&base)).await.unwrap();
    let path = d.dir().join("disks/root.qcow2");
    let info = image_info(&path).await.unwrap();
    assert_eq!(info["backing-filename"], base.to_string_lossy().as_ref());
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(qcow2_virtual_size(&path).await.unwrap(), 64 << 20);

    let again = create_disk(&d.dir(), disk, Some(&base)).await.unwrap_err();
    assert!(matches!(again, VmError::DiskExists { .. }), "{again}");

    let grown = grow_disk(&d.dir(), "root", "128MiB".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        grown,
        DiskGrowth {
            from: 64 << 20,
            to: 128 << 20,
            online: false
        }
    );
    assert_eq!(qcow2_virtual_size(&path).await.unwrap(), 128 << 20);
    let same = grow_disk(&d.dir(), "root", "128MiB".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(same.from, same.to);

    let shrink = grow_disk(&d.dir(), "root", "64MiB".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(shrink, VmError::ShrinkRefused { .. }), "{shrink}");
    assert!(!shrink.is_transient());
    assert!(shrink.to_string().contains("disks only grow"));
    assert_eq!(qcow2_virtual_size(&path).await.unwrap(), 128 << 20);
}

#[tokio::test]
async fn a_running_vm_grows_its_disk_online_without_restarting() {
    let d = VmDir::new();
    let (s, st) = started(&d, IDLE, "h").await;
    let grown = grow_disk(&d.dir(), "root", "96MiB".parse().unwrap())
        .await
        .unwrap();
    assert!(grown.online);
    let facts = observe(&d.dir(), &s.disks).await;
    assert_eq!(facts.pid, Some(st.pid));
    assert_eq!(facts.disks[0].virtual_size, Some(96 << 20));
    stop(&d.dir(), Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_taken_forward_port_is_terminal_and_starts_nothing() {
    let d = VmDir::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = spec(&format!(
        "memory: 64MiB\nnetwork: {{forwards: [{{host: {}, guest: 22}}, {{host: {port}, guest: 80}}]}}\n",
        free_port()
    ));
    let err = start(&d.dir(), "t", &s, "h", &d.root(), START)
        .await
        .unwrap_err();
    assert!(
        matches!(err, VmError::PortTaken { port: p, .. } if p == port),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains(&format!("host port {port}/tcp")));
    assert_nothing_started(&d);
}

#[tokio::test]
async fn misconfiguration_is_refused_with_terminal_errors_before_anything_starts() {
    let d = VmDir::new();
    let cases = [
        (
            "memory: 64MiB\nnetwork: {mode: bridge, bridge: nosuchbr0}\n",
            "bridge `nosuchbr0` does not exist",
        ),
        ("memory: 64MiB\nboot: {kernel: vmlinuz-missing}\n", "kernel"),
        (
            "memory: 64MiB\nboot: {kernel: /etc/hostname, initrd: /nonexistent/initrd}\n",
            "initrd /nonexistent/initrd does not exist",
        ),
        ("memory: 64TiB\n", "more than this host has"),
        (
            "memory: 64MiB\ndisks: [{name: root, size: 64MiB}]\n",
            "disk root",
        ),
    ];
    for (yaml, message) in cases {
        let err = start(&d.dir(), "t", &spec(yaml), "h", &d.root(), START)
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert!(err.to_string().contains(message), "{err} lacks {message}");
        assert_nothing_started(&d);
    }
    let missing = start(&d.dir(), "t", &spec(cases[1].0), "h", &d.root(), START)
        .await
        .unwrap_err();
    assert!(
        missing
            .to_string()
            .contains(&format!("{}/vmlinuz-missing", d.root().display()))
    );

    let s = spec("memory: 64MiB\ndisks: [{name: root, size: 64MiB, backingImage: nope.qcow2}]\n");
    let err = create_disk(&d.dir(), &s.disks[0], Some(&d.root().join("nope.qcow2")))
        .await
        .unwrap_err();
    assert!(matches!(err, VmError::BackingMissing { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("nope.qcow2 does not exist"));
    assert!(!d.dir().join("disks/root.qcow2").exists());

    let long = d.root().join("x".repeat(100));
    let err = start(&long, "t", &spec("memory: 64MiB\n"), "h", &d.root(), START)
        .await
        .unwrap_err();
    assert!(matches!(err, VmError::SocketPathTooLong { .. }), "{err}");
    assert!(!long.exists());
}

#[tokio::test]
async fn a_launch_failure_carries_qemus_stderr_and_leaves_no_process() {
    let d = VmDir::new();
    let s = spec("memory: 64MiB\nextraArgs: [-no-such-option]\n");
    let err = start(&d.dir(), "t", &s, "h", &d.root(), START)
        .await
        .unwrap_err();
    let VmError::Launch { source, .. } = &err else {
        panic!("{err}");
    };
    assert!(source.to_string().contains("-no-such-option"), "{source}");
    assert!(!err.is_transient());
    assert!(qemu_pids(&d.dir()).is_empty());
}

#[tokio::test]
async fn a_vm_killed_from_outside_is_noticed_at_once_and_can_be_started_again() {
    let d = VmDir::new();
    let (s, st) = started(&d, IDLE, "h").await;
    let mut watch = tokio::spawn(watch_exit(st.pid));
    // The window is the check: the watch stays pending while the VM runs.
    assert!(
        tokio::time::timeout(Duration::from_millis(150), &mut watch)
            .await
            .is_err(),
        "the watch ended while the VM runs"
    );
    let killed = Instant::now();
    process::kill9(st.pid).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), watch)
        .await
        .unwrap()
        .unwrap();
    assert!(killed.elapsed() < Duration::from_millis(500));
    let facts = observe(&d.dir(), &s.disks).await;
    assert!(!facts.running);
    assert_eq!(facts.qmp_status, None);

    let again = start(&d.dir(), "t", &s, "h", &d.root(), START)
        .await
        .unwrap();
    assert_ne!(again.pid, st.pid);
    assert_eq!(qemu_pids(&d.dir()), [again.pid]);
    stop(&d.dir(), Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_running_vm_is_adopted_from_its_directory_alone() {
    let d = VmDir::new();
    let (s, st) = started(&d, IDLE, "h-adopt").await;
    drop(st);
    let facts = observe(&d.dir(), &s.disks).await;
    assert!(facts.running);
    assert_eq!(facts.started_spec_hash.as_deref(), Some("h-adopt"));
    let err = start(&d.dir(), "t", &s, "h-adopt", &d.root(), START)
        .await
        .unwrap_err();
    assert!(matches!(err, VmError::AlreadyRunning { .. }), "{err}");
    assert_eq!(qemu_pids(&d.dir()), [facts.pid.unwrap()]);
    assert_eq!(
        stop(&d.dir(), Duration::ZERO).await.unwrap(),
        StopOutcome::Quit
    );
}

fn qemu_io(path: &Path, cmd: &str) -> bool {
    StdCommand::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(path)
        .output()
        .map(|o| {
            o.status.success()
                && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_stopped_vm_snapshots_and_reverts_its_disks_with_qemu_img() {
    let d = VmDir::new();
    let s = spec(IDLE);
    create_disks(&d, &s).await;
    let disk = d.dir().join("disks/root.qcow2");
    assert!(qemu_io(&disk, "write -P 0xaa 0 64k"));
    snapshot(&d.dir(), "before").await.unwrap();
    assert!(qemu_io(&disk, "write -P 0xbb 0 64k"));
    assert!(qemu_io(&disk, "read -P 0xbb 0 64k"));

    let listed = snapshots(&d.dir()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "before");
    assert_eq!(listed[0].disks, ["root"]);
    let dup = snapshot(&d.dir(), "before").await.unwrap_err();
    assert!(matches!(dup, VmError::SnapshotExists { .. }));

    revert(&d.dir(), "before").await.unwrap();
    assert!(qemu_io(&disk, "read -P 0xaa 0 64k"));
    let missing = revert(&d.dir(), "never").await.unwrap_err();
    assert!(
        matches!(missing, VmError::SnapshotMissing { .. }),
        "{missing}"
    );
    for bad in ["", "12", "a b", "x;quit"] {
        assert!(matches!(
            snapshot(&d.dir(), bad).await,
            Err(VmError::SnapshotName { .. })
        ));
    }
}

#[tokio::test]
async fn a_running_vm_snapshots_and_reverts_with_savevm_and_loadvm() {
    let d = VmDir::new();
    let (_, st) = started(&d, IDLE, "h").await;
    snapshot(&d.dir(), "live").await.unwrap();
    let listed = snapshots(&d.dir()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].vm_state_size > 0);
    revert(&d.dir(), "live").await.unwrap();
    assert_eq!(
        query_status(&VmPaths::new(&d.dir()), Duration::from_secs(2))
            .await
            .unwrap(),
        "running"
    );
    assert_eq!(running_pid(&d.dir()).await, Some(st.pid));
    stop(&d.dir(), Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn delete_keeps_or_removes_disks_as_asked() {
    let d = VmDir::new();
    started(&d, IDLE, "h").await;
    assert_eq!(
        delete(&d.dir(), OnDelete::KeepDisks, Duration::ZERO)
            .await
            .unwrap(),
        StopOutcome::Quit
    );
    assert!(d.dir().join("disks/root.qcow2").exists());
    assert!(!d.dir().join("launch.json").exists());
    delete(&d.dir(), OnDelete::Delete, Duration::ZERO)
        .await
        .unwrap();
    assert!(!d.dir().exists());
    delete(&d.dir(), OnDelete::Delete, Duration::ZERO)
        .await
        .unwrap();
}
