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
//! and watched in [`process`], and a hypervisor Machine runs these operations
//! for a remote controller through [`agent`].
//!
//! The QMP socket lives in the VM directory, so that directory's path must
//! leave room for `/qmp.sock` within the 107 bytes of a Unix socket path; a
//! longer one is refused with [`VmError::SocketPathTooLong`] before anything
//! starts (pick a short state directory).
//!
//! The operations are split one concern per file: `error` (why an operation
//! failed, and whether retrying can help), `facts` (what is observed and
//! recorded), `observe`, `monitor` (the QMP status and connection every
//! operation shares), `preflight` (what would make a start fail),
//! `lifecycle` (start, stop, delete), `disk` (qemu-img create and grow) and
//! `snapshot`. This file only declares them and re-exports their public
//! items; they never import through it.

pub mod agent;
mod disk;
mod error;
mod facts;
pub mod launch;
mod lifecycle;
mod monitor;
mod observe;
mod preflight;
pub mod process;
pub mod qmp;
mod snapshot;

pub use disk::{create_disk, grow_disk, grow_disk_online};
pub use error::VmError;
pub use facts::{
    DiskFacts, DiskGrowth, LAUNCH_RECORD_VERSION, LaunchRecord, SnapshotInfo, Started, StopOutcome,
    VmFacts,
};
pub use launch::{QEMU_SYSTEM, VmPaths, argv, drive_id, restart_reasons};
pub use lifecycle::{delete, start, stop};
pub use observe::{observe, qcow2_virtual_size, running_pid};
pub use process::{ProcessError, watch_exit};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use snapshot::{check_snapshot_name, revert, snapshot, snapshots};

#[cfg(test)]
mod tests;
