//! The [`HostDriver`]'s VMs: QEMU on the controller's own host, or on a
//! hypervisor Machine through converge's own binary as agent (requests
//! over the machine's SSH target, files it needs uploaded first). Which
//! place a VM lives in is the spec's `host`; what QEMU does is `qemu`'s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{AnyTarget, HostDriver};
use crate::driver::capability::{DriverError, Hypervisor, VmDriver};
use crate::driver::hypervisor::{self, HypervisorError};
use crate::driver::qemu::agent::{self as vm_agent, Request};
use crate::driver::qemu::{self, DiskGrowth, SnapshotInfo, Started, StopOutcome, VmError, VmFacts};
use crate::spec::fields::SpecPath;
use crate::spec::{ByteSize, Disk, Name, OnDelete, Target as TargetSpec, VmSpec};

/// A result the agent sent, as the type the caller expects.
fn decoded<T: serde::de::DeserializeOwned>(value: Value, machine: &Name) -> Result<T, DriverError> {
    serde_json::from_value(value).map_err(|source| {
        DriverError::Hypervisor(HypervisorError::Decode {
            machine: machine.to_string(),
            source,
        })
    })
}

impl HostDriver {
    /// Runs `request` on a hypervisor Machine: in this process for a
    /// `local: true` target, through converge's agent over SSH otherwise.
    async fn on_hypervisor<T: serde::de::DeserializeOwned>(
        &self,
        machine: &Name,
        target: &TargetSpec,
        request: Request,
    ) -> Result<T, DriverError> {
        let value = match self.target_for(target)? {
            AnyTarget::Local(_) => {
                hypervisor::into_result(vm_agent::execute(request).await, machine.as_str())?
            }
            AnyTarget::Ssh(t) => {
                let agent = self
                    .agents
                    .ensure_agent(&t, target.state_dir(), machine.as_str())
                    .await?;
                self.agents
                    .call(&t, &agent, machine.as_str(), &request)
                    .await?
            }
        };
        decoded(value, machine)
    }

    /// Where a hypervisor Machine finds a file a VM spec names: a relative
    /// path is a file of the desired-state directory (`local`, resolved),
    /// uploaded by content; an absolute one is the hypervisor's own.
    async fn hypervisor_file(
        &self,
        machine: &Name,
        target: &TargetSpec,
        spec_path: &SpecPath,
        local: &Path,
        missing: impl FnOnce() -> VmError,
    ) -> Result<PathBuf, DriverError> {
        if Path::new(spec_path.as_str()).is_absolute() {
            return Ok(PathBuf::from(spec_path.as_str()));
        }
        if tokio::fs::metadata(local).await.is_err() {
            return Err(missing().into());
        }
        match self.target_for(target)? {
            AnyTarget::Local(_) => Ok(local.to_path_buf()),
            AnyTarget::Ssh(t) => {
                self.agents
                    .ensure_file(&t, target.state_dir(), machine.as_str(), local)
                    .await
            }
        }
    }

    /// `spec` with its boot files replaced by their paths on the hypervisor.
    async fn spec_on_hypervisor(
        &self,
        machine: &Name,
        target: &TargetSpec,
        vm: &str,
        spec: &VmSpec,
        root: &Path,
    ) -> Result<VmSpec, DriverError> {
        let mut spec = spec.clone();
        if let Some(boot) = spec.boot.as_mut() {
            let mut files: Vec<(&'static str, &mut crate::spec::At<SpecPath>)> =
                vec![("kernel", &mut boot.kernel)];
            if let Some(initrd) = boot.initrd.as_mut() {
                files.push(("initrd", initrd));
            }
            for (what, file) in files {
                let local = qemu::launch::resolve(&file.value, root);
                let remote = self
                    .hypervisor_file(machine, target, &file.value, &local, || {
                        VmError::BootFileMissing {
                            vm: vm.to_owned(),
                            what,
                            path: local.clone(),
                        }
                    })
                    .await?;
                file.value = SpecPath::new(remote.to_string_lossy().as_ref()).map_err(|e| {
                    HypervisorError::Operation {
                        machine: machine.to_string(),
                        message: format!("use the uploaded {what} {}: {e}", remote.display()),
                        transient: false,
                    }
                })?;
            }
        }
        Ok(spec)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl VmDriver for HostDriver {
    async fn vm_observe(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disks: &[Disk],
    ) -> Result<VmFacts, DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::observe(dir, disks).await),
            Hypervisor::Machine { name, target } => {
                let request = Request::Observe {
                    dir: dir.to_path_buf(),
                    disks: disks.to_vec(),
                };
                let mut facts: VmFacts = self.on_hypervisor(name, target, request).await?;
                // Observed now on this host's clock; `uptime_ms` needs no clock.
                facts.observed_ms = crate::store::records::now_ms();
                Ok(facts)
            }
        }
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
        host: &Hypervisor,
        dir: &Path,
        disk: &Disk,
        backing: Option<&Path>,
    ) -> Result<(), DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::create_disk(dir, disk, backing).await?),
            Hypervisor::Machine { name, target } => {
                let backing = match (&disk.backing_image, backing) {
                    (Some(spec_path), Some(local)) => Some(
                        self.hypervisor_file(name, target, &spec_path.value, local, || {
                            VmError::BackingMissing {
                                disk: disk.name.value.to_string(),
                                path: local.to_path_buf(),
                            }
                        })
                        .await?,
                    ),
                    _ => None,
                };
                let request = Request::CreateDisk {
                    dir: dir.to_path_buf(),
                    disk: disk.clone(),
                    backing,
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    async fn vm_grow_disk(
        &self,
        host: &Hypervisor,
        dir: &Path,
        disk: &str,
        size: ByteSize,
        running: bool,
    ) -> Result<DiskGrowth, DriverError> {
        match host {
            Hypervisor::Local if running => Ok(qemu::grow_disk_online(dir, disk, size).await?),
            Hypervisor::Local => Ok(qemu::grow_disk(dir, disk, size).await?),
            Hypervisor::Machine { name, target } => {
                let request = Request::GrowDisk {
                    dir: dir.to_path_buf(),
                    disk: disk.to_owned(),
                    size,
                    online: running,
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    async fn vm_start(
        &self,
        host: &Hypervisor,
        dir: &Path,
        name: &str,
        spec: &VmSpec,
        launch_identity: &str,
        root: &Path,
        timeout: Duration,
    ) -> Result<Started, DriverError> {
        match host {
            Hypervisor::Local => {
                Ok(qemu::start(dir, name, spec, launch_identity, root, timeout).await?)
            }
            Hypervisor::Machine {
                name: machine,
                target,
            } => {
                let spec = self
                    .spec_on_hypervisor(machine, target, name, spec, root)
                    .await?;
                let request = Request::Start {
                    dir: dir.to_path_buf(),
                    name: name.to_owned(),
                    spec: Box::new(spec),
                    launch_identity: launch_identity.to_owned(),
                    timeout_ms: millis(timeout),
                };
                self.on_hypervisor(machine, target, request).await
            }
        }
    }

    async fn vm_stop(
        &self,
        host: &Hypervisor,
        dir: &Path,
        graceful: Duration,
    ) -> Result<StopOutcome, DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::stop(dir, graceful).await?),
            Hypervisor::Machine { name, target } => {
                let request = Request::Stop {
                    dir: dir.to_path_buf(),
                    graceful_ms: millis(graceful),
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    async fn vm_delete(
        &self,
        host: &Hypervisor,
        dir: &Path,
        on_delete: OnDelete,
        graceful: Duration,
    ) -> Result<StopOutcome, DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::delete(dir, on_delete, graceful).await?),
            Hypervisor::Machine { name, target } => {
                let request = Request::Delete {
                    dir: dir.to_path_buf(),
                    on_delete,
                    graceful_ms: millis(graceful),
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    async fn vm_running_pid(
        &self,
        host: &Hypervisor,
        dir: &Path,
    ) -> Result<Option<u32>, DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::running_pid(dir).await),
            Hypervisor::Machine { name, target } => {
                let request = Request::RunningPid {
                    dir: dir.to_path_buf(),
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    async fn vm_snapshots(
        &self,
        host: &Hypervisor,
        dir: &Path,
    ) -> Result<Vec<SnapshotInfo>, DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::snapshots(dir).await?),
            Hypervisor::Machine { name, target } => {
                let request = Request::Snapshots {
                    dir: dir.to_path_buf(),
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    async fn vm_snapshot(
        &self,
        host: &Hypervisor,
        dir: &Path,
        snap: &str,
    ) -> Result<(), DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::snapshot(dir, snap).await?),
            Hypervisor::Machine { name, target } => {
                let request = Request::Snapshot {
                    dir: dir.to_path_buf(),
                    snap: snap.to_owned(),
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    async fn vm_revert(
        &self,
        host: &Hypervisor,
        dir: &Path,
        snap: &str,
    ) -> Result<(), DriverError> {
        match host {
            Hypervisor::Local => Ok(qemu::revert(dir, snap).await?),
            Hypervisor::Machine { name, target } => {
                let request = Request::Revert {
                    dir: dir.to_path_buf(),
                    snap: snap.to_owned(),
                };
                self.on_hypervisor(name, target, request).await
            }
        }
    }

    fn vm_watch_exit(&self, pid: u32) -> impl std::future::Future<Output = ()> + Send + 'static {
        qemu::process::watch_exit(pid)
    }
}
