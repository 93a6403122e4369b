//! The capabilities the controller uses, as traits, and their one error type.
//!
//! The controller is generic over [`MachineDriver`]: the real one
//! ([`super::host::HostDriver`]) builds with the command builder and runs the
//! machine protocol on a local (or, later, SSH) target; tests use fakes.
//! Errors keep their source and answer `is_transient()`; the controller's
//! error policy decides what to do with that.

use std::future::Future;
use std::time::Duration;

use std::path::Path;

use super::build::{Artifact, BuildError, BuildRequest};
use super::hypervisor_error::HypervisorError;
use super::protocol::{
    ActivationResult, ConfirmOutcome, Confirmation, GenerationId, InstallOutcome, MachineError,
    MachineFacts,
};
use super::qemu::{DiskGrowth, SnapshotInfo, Started, StopOutcome, VmError, VmFacts};
use super::target::{CommandOutput, TargetError};
use crate::spec::{ByteSize, Disk, Name, OnDelete, Target as TargetSpec, VmSpec};

/// Why a driver step failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("use {what}: not supported by this converge yet")]
    Unsupported { what: String },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

impl DriverError {
    /// Whether trying again later can succeed without a spec change.
    pub fn is_transient(&self) -> bool {
        match self {
            DriverError::Target(e) => e.is_transient(),
            DriverError::Build(e) => e.is_transient(),
            DriverError::Machine(e) => e.is_transient(),
            DriverError::Vm(e) => e.is_transient(),
            DriverError::Unsupported { .. } => false,
            DriverError::Hypervisor(e) => e.is_transient(),
        }
    }

    /// A health check that failed or timed out (as opposed to a transport error).
    pub fn is_health_failure(&self) -> bool {
        matches!(self, DriverError::Machine(e) if e.is_health_failure())
    }

    /// The build's output, when a build failed.
    pub fn build_output(&self) -> Option<&str> {
        match self {
            DriverError::Build(e) => e.output(),
            _ => None,
        }
    }
}

/// Everything the controller does to a machine.
pub trait MachineDriver: Send + Sync + 'static {
    /// Reads the machine's facts (one round trip).
    fn observe(
        &self,
        target: &TargetSpec,
        timeout: Duration,
    ) -> impl Future<Output = Result<MachineFacts, DriverError>> + Send;

    /// Builds (or finds in the cache) the machine's artifact.
    fn build(
        &self,
        request: &BuildRequest,
    ) -> impl Future<Output = Result<Artifact, DriverError>> + Send;

    /// Writes a generation to the target (uploading only what it lacks).
    fn install(
        &self,
        target: &TargetSpec,
        artifact: &Artifact,
        roles_json: &[u8],
        generation: &GenerationId,
        timeout: Duration,
    ) -> impl Future<Output = Result<InstallOutcome, DriverError>> + Send;

    /// Points `current` at a generation, atomically.
    fn switch(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Runs the generation's `activate MODE`, detached on the target, and waits for its result.
    fn activate(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        mode: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<ActivationResult, DriverError>> + Send;

    /// Starts `activate MODE` detached and waits for its result. With
    /// `watchdog`, arms a confirmation watchdog on the target right after
    /// the start: unless confirmed within that long after the activation
    /// ends, the target rolls back to `previous` by itself.
    fn activate_watched(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        previous: Option<&GenerationId>,
        mode: &str,
        timeout: Duration,
        watchdog: Option<Duration>,
    ) -> impl Future<Output = Result<(ActivationResult, Option<Confirmation>), DriverError>> + Send;

    /// Claims an armed confirmation over a NEW connection: proves the machine
    /// is still reachable after activation. Also the claim to make before
    /// rolling back oneself, so the watchdog and converge never both act.
    fn confirm(
        &self,
        target: &TargetSpec,
        confirmation: &Confirmation,
        timeout: Duration,
    ) -> impl Future<Output = Result<ConfirmOutcome, DriverError>> + Send;

    /// Removes old generations: keeps the `keep` newest complete ones, those
    /// in `protect` and the one `current` points at. Returns what it removed.
    fn prune(
        &self,
        target: &TargetSpec,
        keep: usize,
        protect: &[GenerationId],
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<GenerationId>, DriverError>> + Send;

    /// Runs one health check; Ok only for exit code 0.
    fn health_check(
        &self,
        target: &TargetSpec,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<CommandOutput, DriverError>> + Send;
}

/// Where a VM's QEMU runs, as the controller resolved its `host:`.
#[derive(Debug, Clone, PartialEq)]
pub enum Hypervisor {
    /// The controller's own host.
    Local,
    /// A hypervisor Machine, reached through its target like any machine;
    /// converge's agent runs the VM operations there.
    Machine { name: Name, target: Box<TargetSpec> },
}

impl Hypervisor {
    pub fn is_local(&self) -> bool {
        matches!(self, Hypervisor::Local)
    }

    /// The VM's directory on its host: under the controller's `vm_root`
    /// locally, under `<stateDir>/vms/` of a hypervisor Machine.
    pub fn vm_dir(&self, vm_root: &Path, vm: &str) -> std::path::PathBuf {
        match self {
            Hypervisor::Local => vm_root.join(vm),
            Hypervisor::Machine { target, .. } => {
                Path::new(target.state_dir()).join("vms").join(vm)
            }
        }
    }
}

/// Everything the controller does to a QEMU VM. `dir` is the VM's directory
/// on its host (disks, pidfile, QMP socket, serial log, launch record).
pub trait VmDriver: Send + Sync + 'static {
    /// What runs and which disks exist; never fails for a VM that is simply absent.
    fn vm_observe(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disks: &[Disk],
    ) -> impl Future<Output = Result<VmFacts, DriverError>> + Send;

    /// The identity of what `vm_start` would launch (a hash of qemu's argv):
    /// a running VM whose launch identity differs must be restarted.
    fn vm_launch_identity(&self, name: &str, spec: &VmSpec, dir: &Path, root: &Path) -> String;

    fn vm_create_disk(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disk: &Disk,
        backing: Option<&Path>,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Grows a disk (online through QMP when `running`); never shrinks.
    fn vm_grow_disk(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disk: &str,
        size: ByteSize,
        running: bool,
    ) -> impl Future<Output = Result<DiskGrowth, DriverError>> + Send;

    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors qemu::start; each argument is one input of the launch"
    )]
    fn vm_start(
        &self,
        host: &Hypervisor,
        dir: &Path,
        name: &str,
        spec: &VmSpec,
        launch_identity: &str,
        root: &Path,
        timeout: Duration,
    ) -> impl Future<Output = Result<Started, DriverError>> + Send;

    /// Powers down (ACPI), then quits, then kills, each bounded.
    fn vm_stop(
        &self,
        host: &Hypervisor,
        dir: &Path,
        graceful: Duration,
    ) -> impl Future<Output = Result<StopOutcome, DriverError>> + Send;

    /// Stops, then removes the directory (keeping `disks/` unless `Delete`).
    fn vm_delete(
        &self,
        host: &Hypervisor,
        dir: &Path,
        on_delete: OnDelete,
        graceful: Duration,
    ) -> impl Future<Output = Result<StopOutcome, DriverError>> + Send;

    /// The pid of the VM's live QEMU, if one runs.
    fn vm_running_pid(
        &self,
        host: &Hypervisor,
        dir: &Path,
    ) -> impl Future<Output = Result<Option<u32>, DriverError>> + Send;

    /// The VM's internal snapshots, merged over its disks.
    fn vm_snapshots(
        &self,
        host: &Hypervisor,
        dir: &Path,
    ) -> impl Future<Output = Result<Vec<SnapshotInfo>, DriverError>> + Send;

    /// Takes snapshot `snap` (with RAM and devices when running).
    fn vm_snapshot(
        &self,
        host: &Hypervisor,
        dir: &Path,
        snap: &str,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Reverts to snapshot `snap` (RAM too when running).
    fn vm_revert(
        &self,
        host: &Hypervisor,
        dir: &Path,
        snap: &str,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Completes when the VM's process `pid` has exited.
    fn vm_watch_exit(&self, pid: u32) -> impl Future<Output = ()> + Send + 'static;
}

/// All capabilities the controller needs.
pub trait Drivers: MachineDriver + VmDriver {}

impl<T: MachineDriver + VmDriver> Drivers for T {}
