//! [`VmError`]: why a VM operation failed, one variant per cause with what
//! it was about, and [`VmError::is_transient`], which sorts them into
//! misconfiguration (terminal) and a slow, busy or locked host (retried).
//! It must not decide what to do about an error: the controller's error
//! policy does, on `is_transient`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::process::ProcessError;
use super::qmp::QmpError;
use crate::spec::ByteSize;

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

pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_path_buf();
    move |source| VmError::Io { op, path, source }
}
