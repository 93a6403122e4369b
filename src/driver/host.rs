//! The real [`MachineDriver`]: the command builder plus the machine protocol
//! on the target a spec names.
//!
//! `target: {local: true}` runs on the controller's own host through
//! [`LocalTarget`]. SSH targets plug in here (a later release); until then
//! they are refused with a terminal error rather than guessed at.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CommandOutput;
use super::build::{Artifact, BuildRequest, CommandBuilder};
use super::capability::{DriverError, MachineDriver, VmDriver};
use super::local::LocalTarget;
use super::machine::{self, ActivationResult, GenerationId, InstallOutcome, MachineFacts};
use super::qemu::{self, DiskGrowth, Started, StopOutcome, VmFacts};
use crate::spec::{ByteSize, Disk, OnDelete, Target as TargetSpec, VmHost, VmSpec};

/// VMs run on the controller's host only, for now.
fn local_hypervisor(host: &VmHost) -> Result<(), DriverError> {
    match host {
        VmHost::Local => Ok(()),
        VmHost::Machine(name) => Err(DriverError::Unsupported {
            what: format!("VMs on a remote hypervisor (host: {name})"),
        }),
    }
}

/// Builds in `cache_dir`; reaches targets as their spec says.
#[derive(Debug, Clone)]
pub struct HostDriver {
    builder: CommandBuilder,
    local: LocalTarget,
}

impl HostDriver {
    pub fn new(cache_dir: impl Into<PathBuf>) -> HostDriver {
        HostDriver {
            builder: CommandBuilder::new(cache_dir),
            local: LocalTarget::new("local"),
        }
    }

    fn local_for(&self, target: &TargetSpec) -> Result<&LocalTarget, DriverError> {
        if target.is_local() {
            Ok(&self.local)
        } else {
            Err(DriverError::Unsupported {
                what: "SSH targets (target.host)".to_owned(),
            })
        }
    }
}

impl MachineDriver for HostDriver {
    async fn observe(
        &self,
        target: &TargetSpec,
        timeout: Duration,
    ) -> Result<MachineFacts, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::observe(t, target.state_dir(), timeout).await?)
    }

    async fn build(&self, request: &BuildRequest) -> Result<Artifact, DriverError> {
        Ok(self.builder.build(request).await?)
    }

    async fn install(
        &self,
        target: &TargetSpec,
        artifact: &Artifact,
        roles_json: &[u8],
        generation: &GenerationId,
        timeout: Duration,
    ) -> Result<InstallOutcome, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::install(
            t,
            target.state_dir(),
            &artifact.path,
            roles_json,
            generation,
            timeout,
        )
        .await?)
    }

    async fn switch(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::switch(t, target.state_dir(), generation, timeout).await?)
    }

    async fn activate(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        mode: &str,
        timeout: Duration,
    ) -> Result<ActivationResult, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::activate(t, target.state_dir(), generation, mode, timeout).await?)
    }

    async fn health_check(
        &self,
        target: &TargetSpec,
        argv: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::health_check(t, argv, timeout).await?)
    }
}

impl VmDriver for HostDriver {
    async fn vm_observe(
        &self,
        host: &VmHost,
        dir: &Path,
        disks: &[Disk],
    ) -> Result<VmFacts, DriverError> {
        local_hypervisor(host)?;
        Ok(qemu::observe(dir, disks).await)
    }

    fn vm_launch_identity(&self, name: &str, spec: &VmSpec, dir: &Path, root: &Path) -> String {
        let argv = qemu::launch::argv(spec, name, dir, root);
        let mut hasher = blake3::Hasher::new();
        for arg in &argv {
            hasher.update(arg.as_bytes());
            hasher.update(&[0]);
        }
        hasher.finalize().to_hex().to_string()
    }

    async fn vm_create_disk(
        &self,
        host: &VmHost,
        dir: &Path,
        disk: &Disk,
        backing: Option<&Path>,
    ) -> Result<(), DriverError> {
        local_hypervisor(host)?;
        Ok(qemu::create_disk(dir, disk, backing).await?)
    }

    async fn vm_grow_disk(
        &self,
        host: &VmHost,
        dir: &Path,
        disk: &str,
        size: ByteSize,
        running: bool,
    ) -> Result<DiskGrowth, DriverError> {
        local_hypervisor(host)?;
        if running {
            Ok(qemu::grow_disk_online(dir, disk, size).await?)
        } else {
            Ok(qemu::grow_disk(dir, disk, size).await?)
        }
    }

    async fn vm_start(
        &self,
        host: &VmHost,
        dir: &Path,
        name: &str,
        spec: &VmSpec,
        launch_identity: &str,
        root: &Path,
        timeout: Duration,
    ) -> Result<Started, DriverError> {
        local_hypervisor(host)?;
        Ok(qemu::start(dir, name, spec, launch_identity, root, timeout).await?)
    }

    async fn vm_stop(
        &self,
        host: &VmHost,
        dir: &Path,
        graceful: Duration,
    ) -> Result<StopOutcome, DriverError> {
        local_hypervisor(host)?;
        Ok(qemu::stop(dir, graceful).await?)
    }

    async fn vm_delete(
        &self,
        host: &VmHost,
        dir: &Path,
        on_delete: OnDelete,
        graceful: Duration,
    ) -> Result<StopOutcome, DriverError> {
        local_hypervisor(host)?;
        Ok(qemu::delete(dir, on_delete, graceful).await?)
    }

    fn vm_watch_exit(&self, pid: u32) -> impl std::future::Future<Output = ()> + Send + 'static {
        qemu::process::watch_exit(pid)
    }
}
