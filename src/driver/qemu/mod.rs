//! The QEMU driver: observes, starts, stops, resizes, snapshots and deletes
//! VMs that run on the controller's own host, one directory per VM.
//!
//! A VM's directory (given by the caller, e.g. `<state>/vms/<name>/`) is the
//! whole truth about it: `disks/<disk>.qcow2`, `qemu.pid`, `qmp.sock`,
//! `serial.log` and `launch.json` (see [`VmPaths`]). Nothing is kept in memory
//! between calls, so a controller that restarts (even after SIGKILL) adopts
//! its running VMs by observing their directories. QEMU runs daemonized, in its
//! own session, and outlives the controller.
//!
//! This module turns specs into host effects and facts; it must not decide
//! *whether* to act (that is the plan's job), keep state outside the VM's
//! directory, or touch anything outside that directory except the paths the
//! spec names (read only) and the host ports it forwards (probed, released).
//! The argv is built in [`launch`], QMP is spoken in [`qmp`], processes are run
//! and watched in [`process`].
//!
//! The QMP socket lives in the VM directory, so that directory's path must
//! leave room for `/qmp.sock` within the 107 bytes of a Unix socket path; a
//! longer one is refused with [`VmError::SocketPathTooLong`] before anything
//! starts (pick a short state directory).

pub mod agent;
pub mod launch;
pub mod process;
pub mod qmp;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::spec::{ByteSize, Disk, NetworkMode, OnDelete, Protocol, VmHost, VmSpec};

pub use launch::{QEMU_SYSTEM, VmPaths, argv, drive_id, restart_reasons};
pub use process::{ProcessError, watch_exit};
pub use qmp::{Qmp, QmpError, QmpEvent};

const QEMU_IMG: &str = "qemu-img";
/// Bound on one `qemu-img` run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one QMP command of an operation (savevm of a large guest is the
/// slowest one we issue).
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the status query during observation, which must stay quick.
const OBSERVE_QMP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `quit`, then SIGKILL, may take to make QEMU exit.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How often start retries connecting to a new QEMU's monitor.
const READY_POLL: Duration = Duration::from_millis(5);

/// Why a VM operation failed. Messages read after "failed to".
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("start VM {vm}: its host is `{host}`, but this driver runs VMs on the local host only")]
    NotLocal { vm: String, host: String },
    #[error("use VM directory {dir}: {reason}")]
    UnusableDir { dir: PathBuf, reason: &'static str },
    #[error(
        "use QMP socket {path} ({len} bytes): Unix socket paths are limited to 107 bytes; use a shorter state directory"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("start VM {vm}: it is already running as pid {pid}")]
    AlreadyRunning { vm: String, pid: u32 },
    #[error(
        "start VM {vm}: memory {requested} is more than this host has ({host_total} in MemTotal)"
    )]
    MemoryTooLarge {
        vm: String,
        requested: ByteSize,
        host_total: ByteSize,
    },
    #[error("start VM {vm}: {what} {path} does not exist")]
    BootFileMissing {
        vm: String,
        what: &'static str,
        path: PathBuf,
    },
    #[error("use {what} `{path}`: it climbs out of the desired-state directory")]
    PathOutsideRoot { what: &'static str, path: String },
    #[error("start VM {vm}: disk {disk} ({path}) does not exist; create it first")]
    DiskMissing {
        vm: String,
        disk: String,
        path: PathBuf,
    },
    #[error("start VM {vm}: bridge `{bridge}` {problem}; create it, or use network mode `user`")]
    Bridge {
        vm: String,
        bridge: String,
        problem: &'static str,
    },
    #[error(
        "start VM {vm}: host port {port}/{protocol} of a forward is not free (another process or VM holds it)"
    )]
    PortTaken {
        vm: String,
        port: u16,
        protocol: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("start VM {vm}")]
    Launch {
        vm: String,
        #[source]
        source: ProcessError,
    },
    #[error("start VM {vm}: its QMP socket did not answer within {after:?}")]
    NotReady {
        vm: String,
        after: Duration,
        #[source]
        source: QmpError,
    },
    #[error("stop the QEMU of {dir}: pid {pid} is still alive after SIGKILL")]
    StillAlive { dir: PathBuf, pid: u32 },
    #[error("create disk {path}: it already exists and is never overwritten")]
    DiskExists { path: PathBuf },
    #[error("create disk {disk}: backing image {path} does not exist")]
    BackingMissing { disk: String, path: PathBuf },
    #[error("resize disk {path}: it does not exist")]
    NoSuchDisk { path: PathBuf },
    #[error("resize disk {path}: shrinking from {from} to {to} bytes is refused; disks only grow")]
    ShrinkRefused { path: PathBuf, from: u64, to: u64 },
    #[error("read image {path}: {detail}")]
    BadImage { path: PathBuf, detail: String },
    #[error(
        "use snapshot name `{snap}`: use 1 to 64 letters, digits, `.`, `_` or `-`, not only digits"
    )]
    SnapshotName { snap: String },
    #[error("create snapshot `{snap}`: it already exists")]
    SnapshotExists { snap: String },
    #[error("revert to snapshot `{snap}`: it is missing on disk(s) {missing:?}")]
    SnapshotMissing { snap: String, missing: Vec<String> },
    #[error("snapshot the VM in {dir}: it has no disks to hold snapshots")]
    NoDisks { dir: PathBuf },
    #[error("{op} {path}")]
    Tool {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: ProcessError,
    },
    #[error("{op} in {dir}")]
    Qmp {
        op: &'static str,
        dir: PathBuf,
        #[source]
        source: QmpError,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// Whether retrying the same operation later can succeed without a change
    /// to the spec or the host. Misconfiguration (a missing image, bridge or
    /// kernel, a taken port, too much memory, a refused shrink) is terminal;
    /// slow or busy QEMU, timeouts and image locks held by a VM are transient.
    pub fn is_transient(&self) -> bool {
        match self {
            VmError::NotReady { .. } | VmError::StillAlive { .. } => true,
            VmError::Launch { source, .. } => source.is_transient(),
            VmError::Qmp { source, .. } => source.is_transient(),
            VmError::Tool { source, .. } => {
                source.is_transient() || source.stderr().is_some_and(|e| e.contains(" lock"))
            }
            VmError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ),
            VmError::NotLocal { .. }
            | VmError::UnusableDir { .. }
            | VmError::SocketPathTooLong { .. }
            | VmError::AlreadyRunning { .. }
            | VmError::MemoryTooLarge { .. }
            | VmError::BootFileMissing { .. }
            | VmError::PathOutsideRoot { .. }
            | VmError::DiskMissing { .. }
            | VmError::Bridge { .. }
            | VmError::PortTaken { .. }
            | VmError::DiskExists { .. }
            | VmError::BackingMissing { .. }
            | VmError::NoSuchDisk { .. }
            | VmError::ShrinkRefused { .. }
            | VmError::BadImage { .. }
            | VmError::SnapshotName { .. }
            | VmError::SnapshotExists { .. }
            | VmError::SnapshotMissing { .. }
            | VmError::NoDisks { .. } => false,
        }
    }
}

/// What a VM directory says about its VM, observed at `observed_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmFacts {
    /// The pidfile names a live QEMU that was started for this directory.
    pub running: bool,
    /// That QEMU's pid, when running.
    pub pid: Option<u32>,
    /// QMP `query-status` (`running`, `paused`, `shutdown`, ...), when running
    /// and the monitor answered within a second.
    pub qmp_status: Option<String>,
    /// The spec hash the running process was started with (from
    /// `launch.json`), when running.
    pub started_spec_hash: Option<String>,
    /// When the running process was started (from `launch.json`),
    /// milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// How long the running process had run when observed, measured on the
    /// VM's host (so a hypervisor's clock skew does not matter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// The spec's disks in spec order, then any other disk in `disks/`.
    pub disks: Vec<DiskFacts>,
    /// Milliseconds since the Unix epoch.
    pub observed_ms: u64,
}

/// One disk's facts. The size comes from the qcow2 header (big-endian u64 at
/// offset 24), which is cheap and readable while QEMU holds the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskFacts {
    pub name: String,
    pub exists: bool,
    /// Virtual size in bytes; `None` when missing or not a qcow2 image.
    pub virtual_size: Option<u64>,
}

/// What `launch.json` records: written before QEMU is started, so that a
/// running process can always be traced to the spec it was started from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchRecord {
    /// Format version of this record.
    pub version: u32,
    pub spec_hash: String,
    pub argv: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub started_ms: u64,
}

/// The current [`LaunchRecord::version`].
pub const LAUNCH_RECORD_VERSION: u32 = 1;

/// A VM that [`start`] brought up to a responsive monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
    /// QMP `query-status` right after start (normally `running`).
    pub status: String,
    /// From the call to a negotiated QMP connection.
    pub ready_after: Duration,
}

/// How [`stop`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopOutcome {
    /// Nothing was running.
    NotRunning,
    /// The guest powered off after ACPI `system_powerdown`.
    PoweredDown,
    /// QEMU exited on QMP `quit`.
    Quit,
    /// QEMU had to be killed with SIGKILL.
    Killed,
}

/// What [`grow_disk`] did. `from == to` means nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskGrowth {
    pub from: u64,
    pub to: u64,
    /// Resized by the running QEMU (`block_resize`) rather than `qemu-img`.
    pub online: bool,
}

/// One internal snapshot, merged over the VM's disks by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub name: String,
    /// Disks holding it, in disk-name order.
    pub disks: Vec<String>,
    /// Bytes of saved VM state (0 for a disk-only snapshot taken while stopped).
    pub vm_state_size: u64,
    /// When it was taken, seconds since the Unix epoch.
    pub date_sec: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `dir` made absolute (lexically, without resolving symlinks).
fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_path_buf();
    move |source| VmError::Io { op, path, source }
}

fn argv_of(parts: &[&str], path: &Path) -> Vec<String> {
    let mut v: Vec<String> = parts.iter().map(|s| (*s).to_owned()).collect();
    v.push(path.to_string_lossy().into_owned());
    v
}

async fn remove_if_present(path: &Path) -> Result<(), VmError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------- observe

/// The pid of this directory's QEMU, when one is alive: the pidfile's pid
/// exists, is not a zombie, and is a `qemu-system-*` whose `-pidfile` is this
/// directory's (so a reused pid is never mistaken for the VM).
pub async fn running_pid(dir: &Path) -> Option<u32> {
    let paths = VmPaths::new(&absolute(dir));
    let pid = process::read_pidfile(&paths.pidfile).await?;
    let info = process::proc_info(pid).await?;
    process::is_qemu_with_pidfile(&info, &paths.pidfile).then_some(pid)
}

/// Observes the VM in `dir`; `disks` are the spec's disks, reported in order
/// whether or not they exist. Never fails: what cannot be read is `None`.
pub async fn observe(dir: &Path, disks: &[Disk]) -> VmFacts {
    let paths = VmPaths::new(&absolute(dir));
    let pid = running_pid(&paths.dir).await;
    let (qmp_status, launched) = if pid.is_some() {
        let status = match query_status(&paths, OBSERVE_QMP_TIMEOUT).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(target: "converge::qemu", dir = %paths.dir.display(), error = %e, "qmp status unknown");
                None
            }
        };
        (status, read_launch_record(&paths).await)
    } else {
        (None, None)
    };
    let mut facts = Vec::new();
    let mut named = BTreeSet::new();
    for disk in disks {
        let name = disk.name.as_str().to_owned();
        facts.push(disk_facts(&paths, &name).await);
        named.insert(name);
    }
    for name in disk_names(&paths).await {
        if !named.contains(&name) {
            facts.push(disk_facts(&paths, &name).await);
        }
    }
    VmFacts {
        running: pid.is_some(),
        pid,
        qmp_status,
        started_spec_hash: launched.as_ref().map(|r| r.spec_hash.clone()),
        started_ms: launched.as_ref().map(|r| r.started_ms),
        uptime_ms: launched.map(|r| now_ms().saturating_sub(r.started_ms)),
        disks: facts,
        observed_ms: now_ms(),
    }
}

async fn disk_facts(paths: &VmPaths, name: &str) -> DiskFacts {
    let path = paths.disk(name);
    let exists = tokio::fs::try_exists(&path).await.unwrap_or(false);
    let virtual_size = if exists {
        qcow2_virtual_size(&path).await.ok()
    } else {
        None
    };
    DiskFacts {
        name: name.to_owned(),
        exists,
        virtual_size,
    }
}

/// The disks present in `disks/`, by name, sorted. Files being created
/// (dot-prefixed) are skipped.
async fn disk_names(paths: &VmPaths) -> Vec<String> {
    let mut names = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(&paths.disks).await else {
        return names;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".qcow2")
            && !name.starts_with('.')
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    names
}

/// Reads a qcow2 image's virtual size from its header.
pub async fn qcow2_virtual_size(path: &Path) -> Result<u64, VmError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(io_err("open disk", path))?;
    let mut header = [0u8; 32];
    file.read_exact(&mut header)
        .await
        .map_err(io_err("read the header of", path))?;
    if header[..4] != *b"QFI\xfb" {
        return Err(VmError::BadImage {
            path: path.to_path_buf(),
            detail: "not a qcow2 image (bad magic)".to_owned(),
        });
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[24..32]);
    Ok(u64::from_be_bytes(size))
}

async fn read_launch_record(paths: &VmPaths) -> Option<LaunchRecord> {
    let bytes = tokio::fs::read(&paths.launch_record).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn write_launch_record(paths: &VmPaths, record: &LaunchRecord) -> Result<(), VmError> {
    let tmp = paths.dir.join(".launch.json.tmp");
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| VmError::Io {
        op: "encode",
        path: paths.launch_record.clone(),
        source: e.into(),
    })?;
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(io_err("write", &tmp))?;
    tokio::fs::rename(&tmp, &paths.launch_record)
        .await
        .map_err(io_err("write", &paths.launch_record))
}

async fn connect(paths: &VmPaths, timeout: Duration, op: &'static str) -> Result<Qmp, VmError> {
    Qmp::connect(&paths.qmp_socket, timeout)
        .await
        .map_err(|source| VmError::Qmp {
            op,
            dir: paths.dir.clone(),
            source,
        })
}

async fn query_status(paths: &VmPaths, timeout: Duration) -> Result<String, VmError> {
    let mut qmp = connect(paths, timeout, "query the status").await?;
    status_of(&mut qmp, paths).await
}

async fn status_of(qmp: &mut Qmp, paths: &VmPaths) -> Result<String, VmError> {
    let v = qmp
        .execute("query-status", None)
        .await
        .map_err(|source| VmError::Qmp {
            op: "query the status",
            dir: paths.dir.clone(),
            source,
        })?;
    Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
}

// ---------------------------------------------------------------- start

/// Checks everything that would make `start` fail for reasons of spec or
/// host, before anything is written or started.
async fn preflight(spec: &VmSpec, vm: &str, paths: &VmPaths, root: &Path) -> Result<(), VmError> {
    if let VmHost::Machine(host) = &spec.host.value {
        return Err(VmError::NotLocal {
            vm: vm.to_owned(),
            host: host.as_str().to_owned(),
        });
    }
    let Some(dir_text) = paths.dir.to_str() else {
        return Err(VmError::UnusableDir {
            dir: paths.dir.clone(),
            reason: "its path is not UTF-8",
        });
    };
    if dir_text.contains(',') {
        // QEMU option strings (`file=...,if=virtio`) separate with commas.
        return Err(VmError::UnusableDir {
            dir: paths.dir.clone(),
            reason: "its path contains a comma, which QEMU options cannot hold",
        });
    }
    let len = paths.qmp_socket.as_os_str().len();
    if len > qmp::MAX_SOCKET_PATH {
        return Err(VmError::SocketPathTooLong {
            path: paths.qmp_socket.clone(),
            len,
        });
    }
    if let Some(pid) = running_pid(&paths.dir).await {
        return Err(VmError::AlreadyRunning {
            vm: vm.to_owned(),
            pid,
        });
    }
    if let Some(total) = host_mem_total().await
        && spec.memory.bytes() > total
    {
        return Err(VmError::MemoryTooLarge {
            vm: vm.to_owned(),
            requested: spec.memory.value,
            host_total: ByteSize::from_bytes(total),
        });
    }
    if let Some(boot) = &spec.boot {
        let mut files = vec![("kernel", &boot.kernel)];
        if let Some(initrd) = &boot.initrd {
            files.push(("initrd", initrd));
        }
        for (what, file) in files {
            let Some(path) = file.resolve(root) else {
                return Err(VmError::PathOutsideRoot {
                    what,
                    path: file.as_str().to_owned(),
                });
            };
            if !tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()) {
                return Err(VmError::BootFileMissing {
                    vm: vm.to_owned(),
                    what,
                    path,
                });
            }
        }
    }
    for disk in &spec.disks {
        let path = paths.disk(disk.name.as_str());
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Err(VmError::DiskMissing {
                vm: vm.to_owned(),
                disk: disk.name.as_str().to_owned(),
                path,
            });
        }
    }
    match spec.network.mode.value {
        NetworkMode::Bridge => {
            let bridge = spec.network.bridge.as_ref().map_or("", |b| b.as_str());
            let problem = if bridge.is_empty() {
                Some("is not named")
            } else {
                let sys = Path::new("/sys/class/net").join(bridge);
                if !tokio::fs::try_exists(&sys).await.unwrap_or(false) {
                    Some("does not exist")
                } else if !tokio::fs::try_exists(sys.join("bridge"))
                    .await
                    .unwrap_or(false)
                {
                    Some("is a network interface but not a bridge")
                } else {
                    None
                }
            };
            if let Some(problem) = problem {
                return Err(VmError::Bridge {
                    vm: vm.to_owned(),
                    bridge: bridge.to_owned(),
                    problem,
                });
            }
        }
        NetworkMode::User => {
            for fwd in &spec.network.forwards {
                probe_port(vm, fwd.host.get(), fwd.protocol).await?;
            }
        }
    }
    Ok(())
}

/// Binds the port on all addresses as slirp will, then releases it.
async fn probe_port(vm: &str, port: u16, protocol: Protocol) -> Result<(), VmError> {
    let addr = (std::net::Ipv4Addr::UNSPECIFIED, port);
    let (bound, name) = match protocol {
        Protocol::Tcp => (tokio::net::TcpListener::bind(addr).await.map(drop), "tcp"),
        Protocol::Udp => (tokio::net::UdpSocket::bind(addr).await.map(drop), "udp"),
    };
    bound.map_err(|source| VmError::PortTaken {
        vm: vm.to_owned(),
        port,
        protocol: name,
        source,
    })
}

/// The host's MemTotal in bytes, when /proc/meminfo says.
async fn host_mem_total() -> Option<u64> {
    let text = tokio::fs::read_to_string("/proc/meminfo").await.ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Starts `spec` as VM `vm` in `dir` and waits, within `timeout`, until its
/// monitor answers. Preflight failures (a taken forward port, a missing
/// bridge, kernel, initrd or disk, memory beyond MemTotal, an unusable
/// directory) are terminal and leave nothing started or written. Then
/// `launch.json` is written, QEMU is spawned daemonized (it survives the
/// controller) and polled over QMP. On any later failure the new QEMU is
/// killed by its pidfile; a launch failure carries the tail of QEMU's stderr.
/// Existing disks are used as they are: create them first.
pub async fn start(
    dir: &Path,
    vm: &str,
    spec: &VmSpec,
    spec_hash: &str,
    root: &Path,
    timeout: Duration,
) -> Result<Started, VmError> {
    let began = Instant::now();
    let paths = VmPaths::new(&absolute(dir));
    preflight(spec, vm, &paths, root).await?;
    tokio::fs::create_dir_all(&paths.dir)
        .await
        .map_err(io_err("create directory", &paths.dir))?;
    remove_if_present(&paths.pidfile).await?;
    remove_if_present(&paths.qmp_socket).await?;
    let argv = launch::argv(spec, vm, &paths.dir, root);
    let record = LaunchRecord {
        version: LAUNCH_RECORD_VERSION,
        spec_hash: spec_hash.to_owned(),
        argv: argv.clone(),
        started_ms: now_ms(),
    };
    write_launch_record(&paths, &record).await?;
    tracing::info!(target: "converge::qemu", vm, dir = %paths.dir.display(), "starting qemu");
    if let Err(source) = process::run_daemonizing(&argv, timeout).await {
        kill_leftover(&paths).await;
        return Err(VmError::Launch {
            vm: vm.to_owned(),
            source,
        });
    }
    let deadline = began + timeout;
    let mut qmp = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match Qmp::connect(&paths.qmp_socket, left.max(Duration::from_millis(1))).await {
            Ok(qmp) => break qmp,
            Err(source) if Instant::now() >= deadline || !source.is_transient() => {
                kill_leftover(&paths).await;
                return Err(VmError::NotReady {
                    vm: vm.to_owned(),
                    after: timeout,
                    source,
                });
            }
            Err(_) => tokio::time::sleep(READY_POLL).await,
        }
    };
    // The VM is up at this point; a status that cannot be read must not turn
    // into an error that makes the caller start it a second time.
    let status = status_of(&mut qmp, &paths)
        .await
        .unwrap_or_else(|_| "unknown".to_owned());
    let ready_after = began.elapsed();
    let pid = match running_pid(&paths.dir).await {
        Some(pid) => pid,
        None => {
            return Err(VmError::NotReady {
                vm: vm.to_owned(),
                after: timeout,
                source: QmpError::Closed {
                    path: paths.qmp_socket.clone(),
                },
            });
        }
    };
    Ok(Started {
        pid,
        status,
        ready_after,
    })
}

/// Kills whatever QEMU this directory's pidfile names, if it is ours.
async fn kill_leftover(paths: &VmPaths) {
    if let Some(pid) = running_pid(&paths.dir).await {
        if let Err(e) = process::kill9(pid).await {
            tracing::warn!(target: "converge::qemu", pid, error = %e, "cannot kill leftover qemu");
        }
        process::wait_exit(pid, EXIT_WAIT).await;
    }
}

// ---------------------------------------------------------------- stop, delete

/// Stops the VM: ACPI `system_powerdown` and up to `graceful_timeout` for the
/// guest to power off (zero skips it), then QMP `quit`, then SIGKILL by pid
/// (checked to still be this directory's QEMU). Idempotent: nothing running
/// is [`StopOutcome::NotRunning`]. Leaves no pidfile or socket behind.
pub async fn stop(dir: &Path, graceful_timeout: Duration) -> Result<StopOutcome, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let Some(pid) = running_pid(&paths.dir).await else {
        remove_if_present(&paths.pidfile).await?;
        remove_if_present(&paths.qmp_socket).await?;
        return Ok(StopOutcome::NotRunning);
    };
    let outcome = stop_pid(&paths, pid, graceful_timeout).await?;
    remove_if_present(&paths.pidfile).await?;
    remove_if_present(&paths.qmp_socket).await?;
    Ok(outcome)
}

async fn stop_pid(paths: &VmPaths, pid: u32, graceful: Duration) -> Result<StopOutcome, VmError> {
    match Qmp::connect(&paths.qmp_socket, Duration::from_secs(2)).await {
        Ok(mut qmp) => {
            qmp.set_timeout(Duration::from_secs(2));
            if !graceful.is_zero()
                && qmp.execute("system_powerdown", None).await.is_ok()
                && process::wait_exit(pid, graceful).await
            {
                return Ok(StopOutcome::PoweredDown);
            }
            // QEMU may close the socket before or after replying to `quit`.
            let _ = qmp.execute("quit", None).await;
            if process::wait_exit(pid, EXIT_WAIT).await {
                return Ok(StopOutcome::Quit);
            }
        }
        Err(e) => {
            tracing::warn!(target: "converge::qemu", pid, error = %e, "no monitor: killing qemu");
        }
    }
    // Only kill what is still provably this directory's QEMU.
    if running_pid(&paths.dir).await != Some(pid) {
        return Ok(StopOutcome::Quit);
    }
    process::kill9(pid).await.map_err(|source| VmError::Tool {
        op: "kill the QEMU of",
        path: paths.dir.clone(),
        source,
    })?;
    if process::wait_exit(pid, EXIT_WAIT).await {
        Ok(StopOutcome::Killed)
    } else {
        Err(VmError::StillAlive {
            dir: paths.dir.clone(),
            pid,
        })
    }
}

/// Stops the VM, then removes its directory: all of it with
/// [`OnDelete::Delete`], everything but `disks/` with [`OnDelete::KeepDisks`].
/// Idempotent: a missing directory is already deleted.
pub async fn delete(
    dir: &Path,
    on_delete: OnDelete,
    graceful_timeout: Duration,
) -> Result<StopOutcome, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let outcome = stop(&paths.dir, graceful_timeout).await?;
    match on_delete {
        OnDelete::Delete => match tokio::fs::remove_dir_all(&paths.dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("remove", &paths.dir)(e));
            }
            _ => {}
        },
        OnDelete::KeepDisks => {
            let Ok(mut entries) = tokio::fs::read_dir(&paths.dir).await else {
                return Ok(outcome);
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(io_err("list", &paths.dir))?
            {
                let path = entry.path();
                if path == paths.disks {
                    continue;
                }
                let removed = if entry.file_type().await.is_ok_and(|t| t.is_dir()) {
                    tokio::fs::remove_dir_all(&path).await
                } else {
                    tokio::fs::remove_file(&path).await
                };
                removed.map_err(io_err("remove", &path))?;
            }
        }
    }
    Ok(outcome)
}

// ---------------------------------------------------------------- disks

async fn qemu_img(op: &'static str, path: &Path, argv: &[String]) -> Result<Vec<u8>, VmError> {
    process::run(argv, TOOL_TIMEOUT)
        .await
        .map_err(|source| VmError::Tool {
            op,
            path: path.to_path_buf(),
            source,
        })
}

/// `qemu-img info` of an image, as JSON. `-U` lets it read images that a
/// running QEMU holds.
async fn image_info(path: &Path) -> Result<Value, VmError> {
    let out = qemu_img(
        "inspect image",
        path,
        &argv_of(&[QEMU_IMG, "info", "-U", "--output=json"], path),
    )
    .await?;
    serde_json::from_slice(&out).map_err(|e| VmError::BadImage {
        path: path.to_path_buf(),
        detail: format!("qemu-img info printed invalid JSON ({e})"),
    })
}

/// Creates `disks/<disk>.qcow2` of the disk's size, copy-on-write on
/// `backing` when given (its format detected by `qemu-img info`, its path
/// recorded absolute). Never overwrites: an existing disk is
/// [`VmError::DiskExists`], also when another creator wins a race, because
/// the image is built under a temporary name and hard-linked into place.
pub async fn create_disk(dir: &Path, disk: &Disk, backing: Option<&Path>) -> Result<(), VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let name = disk.name.as_str();
    let path = paths.disk(name);
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Err(VmError::DiskExists { path });
    }
    tokio::fs::create_dir_all(&paths.disks)
        .await
        .map_err(io_err("create directory", &paths.disks))?;
    let tmp = paths.disks.join(format!(".{name}.qcow2.creating"));
    remove_if_present(&tmp).await?;
    let mut argv: Vec<String> = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        .map(str::to_owned)
        .to_vec();
    if let Some(backing) = backing {
        let backing = absolute(backing);
        if !tokio::fs::try_exists(&backing).await.unwrap_or(false) {
            return Err(VmError::BackingMissing {
                disk: name.to_owned(),
                path: backing,
            });
        }
        let info = image_info(&backing).await?;
        let Some(format) = info["format"].as_str() else {
            return Err(VmError::BadImage {
                path: backing,
                detail: "qemu-img info names no format".to_owned(),
            });
        };
        argv.extend([
            "-b".to_owned(),
            backing.to_string_lossy().into_owned(),
            "-F".to_owned(),
            format.to_owned(),
        ]);
    }
    argv.push(tmp.to_string_lossy().into_owned());
    argv.push(disk.size.bytes().to_string());
    let created = qemu_img("create disk", &path, &argv).await;
    let linked = match created {
        Ok(_) => tokio::fs::hard_link(&tmp, &path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                VmError::DiskExists { path: path.clone() }
            } else {
                io_err("create disk", &path)(e)
            }
        }),
        Err(e) => Err(e),
    };
    remove_if_present(&tmp).await?;
    linked
}

/// Grows `disks/<disk>.qcow2` to `new_size`: online with QMP `block_resize`
/// when the VM runs (no restart needed), else with `qemu-img resize`. The
/// same size is a no-op; a smaller one is [`VmError::ShrinkRefused`].
pub async fn grow_disk(dir: &Path, disk: &str, new_size: ByteSize) -> Result<DiskGrowth, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let path = paths.disk(disk);
    let from = current_size(&path).await?;
    let to = new_size.bytes();
    if to <= from {
        return refuse_shrink(path, from, to);
    }
    if running_pid(&paths.dir).await.is_some() {
        return grow_disk_online(&paths.dir, disk, new_size).await;
    }
    qemu_img(
        "resize disk",
        &path,
        &[
            QEMU_IMG.to_owned(),
            "resize".to_owned(),
            "-q".to_owned(),
            "-f".to_owned(),
            "qcow2".to_owned(),
            path.to_string_lossy().into_owned(),
            to.to_string(),
        ],
    )
    .await?;
    Ok(DiskGrowth {
        from,
        to,
        online: false,
    })
}

/// Grows a disk of the running VM through QMP `block_resize` on its drive
/// ([`drive_id`]); the guest sees the new size at once. Same rules as
/// [`grow_disk`] for equal and smaller sizes.
pub async fn grow_disk_online(
    dir: &Path,
    disk: &str,
    new_size: ByteSize,
) -> Result<DiskGrowth, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let path = paths.disk(disk);
    let from = current_size(&path).await?;
    let to = new_size.bytes();
    if to <= from {
        return refuse_shrink(path, from, to);
    }
    let op = "resize a disk online";
    let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
    qmp.execute(
        "block_resize",
        Some(json!({ "device": drive_id(disk), "size": to })),
    )
    .await
    .map_err(|source| VmError::Qmp {
        op,
        dir: paths.dir.clone(),
        source,
    })?;
    Ok(DiskGrowth {
        from,
        to,
        online: true,
    })
}

async fn current_size(path: &Path) -> Result<u64, VmError> {
    if !tokio::fs::try_exists(path).await.unwrap_or(false) {
        return Err(VmError::NoSuchDisk {
            path: path.to_path_buf(),
        });
    }
    qcow2_virtual_size(path).await
}

fn refuse_shrink(path: PathBuf, from: u64, to: u64) -> Result<DiskGrowth, VmError> {
    if to == from {
        Ok(DiskGrowth {
            from,
            to,
            online: false,
        })
    } else {
        Err(VmError::ShrinkRefused { path, from, to })
    }
}

// ---------------------------------------------------------------- snapshots

/// Snapshot names go into an HMP command line and must not be mistaken for
/// snapshot ids, which are numbers.
pub fn check_snapshot_name(snap: &str) -> Result<(), VmError> {
    let ok = !snap.is_empty()
        && snap.len() <= 64
        && snap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !snap.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(VmError::SnapshotName {
            snap: snap.to_owned(),
        })
    }
}

/// Lists internal snapshots, merged by name over the VM's disks: from QMP
/// `query-block` when running, from `qemu-img info` otherwise.
pub async fn snapshots(dir: &Path) -> Result<Vec<SnapshotInfo>, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let mut per_disk: Vec<(String, Value)> = Vec::new();
    if running_pid(&paths.dir).await.is_some() {
        let op = "list snapshots";
        let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
        let blocks = qmp
            .execute("query-block", None)
            .await
            .map_err(|source| VmError::Qmp {
                op,
                dir: paths.dir.clone(),
                source,
            })?;
        for block in blocks.as_array().into_iter().flatten() {
            let device = block["device"].as_str().unwrap_or_default();
            if let Some(disk) = device.strip_prefix("disk-") {
                per_disk.push((
                    disk.to_owned(),
                    block["inserted"]["image"]["snapshots"].clone(),
                ));
            }
        }
    } else {
        for disk in disk_names(&paths).await {
            let info = image_info(&paths.disk(&disk)).await?;
            per_disk.push((disk, info["snapshots"].clone()));
        }
    }
    per_disk.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<SnapshotInfo> = Vec::new();
    for (disk, list) in per_disk {
        for snap in list.as_array().into_iter().flatten() {
            let name = snap["name"].as_str().unwrap_or_default().to_owned();
            let vm_state_size = snap["vm-state-size"].as_u64().unwrap_or(0);
            let date_sec = snap["date-sec"].as_u64().unwrap_or(0);
            match merged.iter_mut().find(|s| s.name == name) {
                Some(seen) => {
                    seen.disks.push(disk.clone());
                    seen.vm_state_size = seen.vm_state_size.max(vm_state_size);
                }
                None => merged.push(SnapshotInfo {
                    name,
                    disks: vec![disk.clone()],
                    vm_state_size,
                    date_sec,
                }),
            }
        }
    }
    Ok(merged)
}

/// Takes snapshot `snap` of every disk: with RAM and device state via HMP
/// `savevm` when running, disk-only via `qemu-img snapshot -c` when stopped.
/// An existing name is refused rather than replaced.
pub async fn snapshot(dir: &Path, snap: &str) -> Result<(), VmError> {
    check_snapshot_name(snap)?;
    let paths = VmPaths::new(&absolute(dir));
    if snapshots(&paths.dir).await?.iter().any(|s| s.name == snap) {
        return Err(VmError::SnapshotExists {
            snap: snap.to_owned(),
        });
    }
    let disks = disk_names(&paths).await;
    if disks.is_empty() {
        return Err(VmError::NoDisks {
            dir: paths.dir.clone(),
        });
    }
    if running_pid(&paths.dir).await.is_some() {
        let op = "save a snapshot";
        let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
        qmp.human(&format!("savevm {snap}"))
            .await
            .map_err(|source| VmError::Qmp {
                op,
                dir: paths.dir.clone(),
                source,
            })?;
        return Ok(());
    }
    for disk in disks {
        let path = paths.disk(&disk);
        qemu_img(
            "snapshot disk",
            &path,
            &argv_of(&[QEMU_IMG, "snapshot", "-c", snap], &path),
        )
        .await?;
    }
    Ok(())
}

/// Reverts every disk (and, when running, RAM and devices via HMP `loadvm`)
/// to snapshot `snap`, which must exist on every disk. A running VM that
/// `loadvm` fails on is resumed rather than left paused.
pub async fn revert(dir: &Path, snap: &str) -> Result<(), VmError> {
    check_snapshot_name(snap)?;
    let paths = VmPaths::new(&absolute(dir));
    let disks = disk_names(&paths).await;
    let holding = snapshots(&paths.dir)
        .await?
        .into_iter()
        .find(|s| s.name == snap)
        .map(|s| s.disks)
        .unwrap_or_default();
    let missing: Vec<String> = disks
        .iter()
        .filter(|d| !holding.contains(d))
        .cloned()
        .collect();
    if disks.is_empty() || !missing.is_empty() {
        return Err(VmError::SnapshotMissing {
            snap: snap.to_owned(),
            missing,
        });
    }
    if running_pid(&paths.dir).await.is_some() {
        let op = "load a snapshot";
        let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
        let was = status_of(&mut qmp, &paths).await?;
        if let Err(source) = qmp.human(&format!("loadvm {snap}")).await {
            // loadvm stops the guest first and leaves it stopped on failure.
            if was == "running" {
                let _ = qmp.execute("cont", None).await;
            }
            return Err(VmError::Qmp {
                op,
                dir: paths.dir.clone(),
                source,
            });
        }
        return Ok(());
    }
    for disk in disks {
        let path = paths.disk(&disk);
        qemu_img(
            "revert disk",
            &path,
            &argv_of(&[QEMU_IMG, "snapshot", "-a", snap], &path),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
