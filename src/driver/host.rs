//! The real [`MachineDriver`]: the command builder plus the machine protocol
//! on the target a spec names.
//!
//! `target: {local: true}` runs on the controller's own host through
//! [`LocalTarget`], except observing, which reads the state directory
//! in-process ([`protocol::observe_local`]). `target: {host: …}` runs over
//! OpenSSH through one pooled [`SshTarget`] (one master connection) per
//! machine, rebuilt when the spec's SSH settings change. Waiting for an
//! activation survives a dropped connection: the wait reconnects and reads
//! the result the target wrote. Activations that change the running system
//! are confirmed over a NEW connection, or the target rolls itself back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::build::{Artifact, BuildRequest, CommandBuilder};
use super::capability::{DriverError, Hypervisor, MachineDriver, VmDriver};
use super::hypervisor::{self, Agents, HypervisorError};
use super::local::LocalTarget;
use super::protocol::{
    self, ActivationAttempt, ActivationResult, ConfirmOutcome, Confirmation, GenerationId,
    InstallOutcome, MachineError, MachineFacts,
};
use super::qemu::agent::{self as vm_agent, Request};
use super::qemu::{self, DiskGrowth, SnapshotInfo, Started, StopOutcome, VmError, VmFacts};
use super::ssh::{SshOptions, SshTarget};
use super::target::{CommandOutput, Target, TargetError};
use crate::spec::fields::SpecPath;
use crate::spec::{ByteSize, Disk, Name, OnDelete, Target as TargetSpec, VmSpec};

/// How converge uses OpenSSH, from the command line.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// Where master sockets and generated configs live; kept short (socket paths ≤ 107 bytes).
    pub control_dir: PathBuf,
    /// An ssh_config to use instead of the user's (`--ssh-config`).
    pub ssh_config: Option<PathBuf>,
    /// A known_hosts file for targets without `hostKey`/`knownHosts` (`--known-hosts`).
    pub known_hosts: Option<PathBuf>,
    /// Accept and remember unknown host keys (never changed ones).
    pub accept_new_host_keys: bool,
    /// Sessions at once per host.
    pub max_sessions: usize,
    pub connect_timeout: Duration,
    /// How long an idle master stays up; when `keep_masters`, also after
    /// this process ends, for the next converge process to resume.
    pub master_idle_exit: Duration,
    /// Leave masters running for the next process (`--ssh-persist`).
    pub keep_masters: bool,
}

impl SshSettings {
    /// Defaults, with the control directory derived from the state directory.
    pub fn for_state(state: &Path) -> SshSettings {
        let tag = blake3::hash(state.to_string_lossy().as_bytes()).to_hex();
        SshSettings {
            control_dir: std::env::temp_dir().join(format!("cvssh-{}", &tag[..10])),
            ssh_config: None,
            known_hosts: None,
            accept_new_host_keys: false,
            max_sessions: 8,
            connect_timeout: Duration::from_secs(10),
            master_idle_exit: Duration::from_secs(600),
            keep_masters: false,
        }
    }
}

/// A target of either kind, so the machine protocol runs unchanged on both.
#[derive(Debug, Clone)]
enum AnyTarget {
    Local(LocalTarget),
    Ssh(Arc<SshTarget>),
}

impl Target for AnyTarget {
    fn describe(&self) -> String {
        match self {
            AnyTarget::Local(t) => t.describe(),
            AnyTarget::Ssh(t) => t.describe(),
        }
    }

    async fn run(
        &self,
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        match self {
            AnyTarget::Local(t) => t.run(argv, env, timeout).await,
            AnyTarget::Ssh(t) => t.run(argv, env, timeout).await,
        }
    }

    async fn upload_dir(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        match self {
            AnyTarget::Local(t) => t.upload_dir(src, dest, timeout).await,
            AnyTarget::Ssh(t) => t.upload_dir(src, dest, timeout).await,
        }
    }
}

impl AnyTarget {
    /// The same target over a new connection (confirmation must prove the
    /// machine is reachable afresh, not over the master that activated it).
    fn fresh(&self) -> AnyTarget {
        match self {
            AnyTarget::Local(t) => AnyTarget::Local(t.clone()),
            AnyTarget::Ssh(t) => AnyTarget::Ssh(Arc::new(t.fresh())),
        }
    }
}

/// Builds in `cache_dir`; reaches targets as their spec says.
#[derive(Debug, Clone)]
pub struct HostDriver {
    builder: CommandBuilder,
    local: LocalTarget,
    /// The desired-state directory: relative `knownHosts`/`identityFile` resolve against it.
    root: PathBuf,
    ssh: SshSettings,
    pool: Arc<Mutex<HashMap<String, Arc<SshTarget>>>>,
    /// converge's agent on hypervisor Machines.
    agents: Arc<Agents>,
}

impl HostDriver {
    pub fn new(
        cache_dir: impl Into<PathBuf>,
        root: impl Into<PathBuf>,
        ssh: SshSettings,
    ) -> HostDriver {
        HostDriver {
            builder: CommandBuilder::new(cache_dir),
            local: LocalTarget::new("local"),
            root: root.into(),
            ssh,
            pool: Arc::new(Mutex::new(HashMap::new())),
            agents: Arc::new(Agents::default()),
        }
    }

    fn ssh_options(&self, spec: &TargetSpec) -> Result<SshOptions, DriverError> {
        let Some(host) = &spec.host else {
            return Err(DriverError::Unsupported {
                what: "a target with neither `host` nor `local: true`".to_owned(),
            });
        };
        let mut options = SshOptions::new(host.value.as_str(), &self.ssh.control_dir);
        options.port = spec.port.as_ref().map_or(22, |p| p.value.get());
        options.user = spec
            .user
            .as_ref()
            .map_or_else(|| "root".to_owned(), |u| u.value.to_string());
        options.host_key = spec.host_key.as_ref().map(|k| k.value.to_string());
        options.known_hosts = spec
            .known_hosts
            .as_ref()
            .and_then(|p| p.value.resolve(&self.root))
            .or_else(|| self.ssh.known_hosts.clone());
        options.identity_file = spec
            .identity_file
            .as_ref()
            .and_then(|p| p.value.resolve(&self.root));
        options.ssh_config = self.ssh.ssh_config.clone();
        options.accept_new_host_keys = self.ssh.accept_new_host_keys;
        options.max_sessions = self.ssh.max_sessions.max(1);
        options.connect_timeout = self.ssh.connect_timeout;
        options.master_idle_exit = self.ssh.master_idle_exit;
        options.keep_master = self.ssh.keep_masters && !self.ssh.master_idle_exit.is_zero();
        Ok(options)
    }

    /// The target a spec names: local, or the pooled SSH target for its settings.
    fn target_for(&self, spec: &TargetSpec) -> Result<AnyTarget, DriverError> {
        if spec.is_local() {
            return Ok(AnyTarget::Local(self.local.clone()));
        }
        let options = self.ssh_options(spec)?;
        let key = format!("{options:?}");
        let mut pool = match self.pool.lock() {
            Ok(pool) => pool,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(t) = pool.get(&key) {
            return Ok(AnyTarget::Ssh(t.clone()));
        }
        let target = Arc::new(SshTarget::new(options).map_err(|e| {
            DriverError::Target(TargetError::Ssh {
                target: spec
                    .host
                    .as_ref()
                    .map(|h| h.value.to_string())
                    .unwrap_or_default(),
                source: Box::new(e),
            })
        })?);
        pool.insert(key, target.clone());
        Ok(AnyTarget::Ssh(target))
    }
}

/// How many times in a row waiting for an activation may lose the
/// connection before the target counts as unreachable. Each loss takes at
/// most a ConnectTimeout or the ServerAlive bound, so a frozen or vanished
/// host fails in tens of seconds, not after the whole activation timeout
/// (its watchdog rolls it back meanwhile if it was armed).
const MAX_RECONNECTS: u32 = 2;

/// Waits for an activation's result, reconnecting when the connection drops:
/// the activation runs detached on the target and writes its result there,
/// so converge reads it rather than guessing.
async fn wait_reattaching(
    t: &AnyTarget,
    state_dir: &str,
    attempt: &ActivationAttempt,
    timeout: Duration,
) -> Result<ActivationResult, MachineError> {
    let deadline = Instant::now() + timeout;
    let mut lost = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match protocol::wait_activation(t, state_dir, attempt, left.max(Duration::from_millis(1)))
            .await
        {
            Ok(result) => return Ok(result),
            Err(e)
                if e.is_transient()
                    && !e.is_timeout()
                    && lost < MAX_RECONNECTS
                    && Instant::now() + Duration::from_secs(1) < deadline =>
            {
                lost += 1;
                tracing::warn!(target = %t.describe(), error = %e, lost, "lost the connection while waiting for the activation; reconnecting to read its result");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl MachineDriver for HostDriver {
    async fn observe(
        &self,
        target: &TargetSpec,
        timeout: Duration,
    ) -> Result<MachineFacts, DriverError> {
        match self.target_for(target)? {
            // Local targets are read in-process: the same facts as the
            // observe script, without a `sh` spawn per machine per reconcile.
            AnyTarget::Local(_) => Ok(protocol::observe_local(target.state_dir(), timeout).await?),
            t => Ok(protocol::observe(&t, target.state_dir(), timeout).await?),
        }
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
        let t = self.target_for(target)?;
        Ok(protocol::install(
            &t,
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
        let t = self.target_for(target)?;
        Ok(protocol::switch(&t, target.state_dir(), generation, timeout).await?)
    }

    async fn activate(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        mode: &str,
        timeout: Duration,
    ) -> Result<ActivationResult, DriverError> {
        let t = self.target_for(target)?;
        let attempt =
            protocol::start_activation(&t, target.state_dir(), generation, mode, timeout).await?;
        Ok(wait_reattaching(&t, target.state_dir(), &attempt, timeout).await?)
    }

    async fn activate_watched(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        previous: Option<&GenerationId>,
        mode: &str,
        timeout: Duration,
        watchdog: Option<Duration>,
    ) -> Result<(ActivationResult, Option<Confirmation>), DriverError> {
        let t = self.target_for(target)?;
        let state_dir = target.state_dir();
        let attempt = protocol::start_activation(&t, state_dir, generation, mode, timeout).await?;
        // Armed right after the start: an activation that cuts the network is
        // exactly what the watchdog is for, so arming must not wait for it.
        let confirmation = match watchdog {
            Some(confirm_timeout) => Some(
                protocol::arm_confirmation(
                    &t,
                    state_dir,
                    &attempt,
                    previous,
                    mode,
                    confirm_timeout,
                    timeout,
                )
                .await?,
            ),
            None => None,
        };
        let result = wait_reattaching(&t, state_dir, &attempt, timeout).await?;
        Ok((result, confirmation))
    }

    async fn confirm(
        &self,
        target: &TargetSpec,
        confirmation: &Confirmation,
        timeout: Duration,
    ) -> Result<ConfirmOutcome, DriverError> {
        let t = self.target_for(target)?.fresh();
        Ok(protocol::confirm(&t, target.state_dir(), confirmation, timeout).await?)
    }

    async fn prune(
        &self,
        target: &TargetSpec,
        keep: usize,
        protect: &[GenerationId],
        timeout: Duration,
    ) -> Result<Vec<GenerationId>, DriverError> {
        let t = self.target_for(target)?;
        Ok(protocol::prune(&t, target.state_dir(), keep, protect, timeout).await?)
    }

    async fn health_check(
        &self,
        target: &TargetSpec,
        argv: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, DriverError> {
        let t = self.target_for(target)?;
        Ok(protocol::health_check(&t, argv, timeout).await?)
    }
}

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
