//! What the driver reports and records about a VM: the facts observed in
//! its directory ([`VmFacts`], [`DiskFacts`]), the [`LaunchRecord`] written
//! before QEMU starts, and what start, stop, grow and snapshot listing
//! return. Plain data with serde, sent as JSON by the agent of a hypervisor
//! Machine; this file must not observe or change anything itself.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

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

/// A VM that [`start`](super::lifecycle::start) brought up to a responsive monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
    /// QMP `query-status` right after start (normally `running`).
    pub status: String,
    /// From the call to a negotiated QMP connection.
    pub ready_after: Duration,
}

/// How [`stop`](super::lifecycle::stop) ended the VM.
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

/// What [`grow_disk`](super::disk::grow_disk) did. `from == to` means nothing changed.
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

/// Now, in milliseconds since the Unix epoch, as the records count time.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
