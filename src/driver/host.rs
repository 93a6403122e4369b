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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::build::{Artifact, BuildError, BuildRequest, CachePruned, CommandBuilder};
use super::capability::{Deploy, DeployOutcome, DriverError, Install, MachineDriver};
use super::hypervisor::Agents;
use super::local::LocalTarget;
use super::nix;
use super::protocol::{
    self, ActivateRequest, ActivationAttempt, ActivationResult, ConfirmOutcome, Confirmation,
    DeployPhase, DeployRequest, GenerationId, InstallRequest, InstallSource, MachineError,
    MachineFacts, WaitOutcome,
};
use super::ssh::{ControlDir, SshError, SshOptions, SshTarget};
use super::stream::Manifest;
use super::target::{CommandOutput, Input, Target, TargetError};
use crate::spec::Target as TargetSpec;

mod vm;

/// How converge uses OpenSSH, from the command line.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// The controller's state directory. Master sockets and the client
    /// files converge generates for ssh live in its `ssh/` subdirectory,
    /// checked private before each use, or in a fresh temporary directory
    /// removed when converge ends if socket paths there would be too long
    /// ([`ControlDir`]).
    pub state_dir: PathBuf,
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
    /// Defaults, with sockets and client files under `state`.
    pub fn for_state(state: &Path) -> SshSettings {
        SshSettings {
            state_dir: state.to_path_buf(),
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

    async fn run_input(
        &self,
        argv: &[String],
        env: &[(String, String)],
        input: &Input,
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        match self {
            AnyTarget::Local(t) => t.run_input(argv, env, input, timeout).await,
            AnyTarget::Ssh(t) => t.run_input(argv, env, input, timeout).await,
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
    /// Made on first use by an SSH target, so a fleet without one creates
    /// nothing; a refusal is not kept (it is checked again next time).
    control_dir: Arc<Mutex<Option<Arc<ControlDir>>>>,
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
            control_dir: Arc::new(Mutex::new(None)),
            pool: Arc::new(Mutex::new(HashMap::new())),
            agents: Arc::new(Agents::default()),
        }
    }

    /// The control directory of this process's SSH targets (see
    /// [`SshSettings::state_dir`]), made on first use.
    fn control_dir(&self) -> Result<Arc<ControlDir>, SshError> {
        let mut slot = match self.control_dir.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(dir) = slot.as_ref() {
            return Ok(Arc::clone(dir));
        }
        let dir = Arc::new(ControlDir::for_state(&self.ssh.state_dir)?);
        if dir.is_temporary() {
            tracing::info!(state = %self.ssh.state_dir.display(), control_dir = %dir.path().display(), "ssh socket paths under the state directory would be too long; using a private temporary directory, removed at exit (masters are not kept for the next command)");
        }
        *slot = Some(Arc::clone(&dir));
        Ok(dir)
    }

    fn ssh_options(
        &self,
        spec: &TargetSpec,
        control_dir: &ControlDir,
    ) -> Result<SshOptions, DriverError> {
        let Some(host) = &spec.host else {
            return Err(DriverError::Unsupported {
                what: "a target with neither `host` nor `local: true`".to_owned(),
            });
        };
        let mut options = SshOptions::new(host.value.as_str(), control_dir.path());
        options.port = spec.port.as_ref().map_or(22, |p| p.value.get());
        options.user = spec
            .user
            .as_ref()
            .map_or_else(|| "root".to_owned(), |u| u.value.to_string());
        options.sudo = spec.sudo();
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
        options.keep_master = self.ssh.keep_masters
            && !self.ssh.master_idle_exit.is_zero()
            && !control_dir.is_temporary();
        Ok(options)
    }

    /// The target a spec names: local, or the pooled SSH target for its settings.
    fn target_for(&self, spec: &TargetSpec) -> Result<AnyTarget, DriverError> {
        if spec.is_local() {
            return Ok(AnyTarget::Local(self.local.clone()));
        }
        let ssh_error = |e: SshError| {
            DriverError::Target(TargetError::Ssh {
                target: spec
                    .host
                    .as_ref()
                    .map(|h| h.value.to_string())
                    .unwrap_or_default(),
                source: Box::new(e),
            })
        };
        let control_dir = self.control_dir().map_err(ssh_error)?;
        let options = self.ssh_options(spec, &control_dir)?;
        let key = format!("{options:?}");
        let mut pool = match self.pool.lock() {
            Ok(pool) => pool,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(t) = pool.get(&key) {
            return Ok(AnyTarget::Ssh(t.clone()));
        }
        let target = Arc::new(SshTarget::in_control_dir(options, control_dir).map_err(ssh_error)?);
        pool.insert(key, target.clone());
        Ok(AnyTarget::Ssh(target))
    }
}

/// How long a deploy's own round trip waits for the activation before it
/// returns; longer activations are waited for in further round trips.
const FIRST_WAIT: Duration = Duration::from_secs(10);

/// How long copying a NixOS system's closure may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(3600);

/// For a NixOS system's artifact on an SSH target: copies the toplevel's
/// closure over the machine's master first (Nix sends only the paths the
/// target lacks). A local target shares this host's store: nothing to copy.
async fn copy_closure(t: &AnyTarget, artifact: &Artifact) -> Result<(), DriverError> {
    let AnyTarget::Ssh(ssh) = t else {
        return Ok(());
    };
    let Some(toplevel) = nix::artifact_toplevel(&artifact.path) else {
        return Ok(());
    };
    let (destination, options) = ssh.reuse_options().await?;
    let copy_started = Instant::now();
    nix::copy_closure(
        &format!("ssh://{destination}"),
        &options,
        &toplevel,
        COPY_TIMEOUT,
    )
    .await
    .map_err(|source| DriverError::Copy {
        path: toplevel.clone(),
        target: ssh.describe(),
        source: Box::new(source),
    })?;
    tracing::debug!(target_host = %ssh.describe(), %toplevel, elapsed_ms = copy_started.elapsed().as_millis() as u64, "copied the closure");
    Ok(())
}

/// A complete generation on the target with the install's artifact: the
/// current one first, else the newest.
fn same_artifact(install: &Install<'_>) -> Option<GenerationId> {
    let hash = install.artifact.hash.as_str();
    install
        .facts
        .current_generation()
        .filter(|g| g.hash() == hash)
        .cloned()
        .or_else(|| {
            install
                .facts
                .generations
                .iter()
                .rev()
                .find(|g| g.hash() == hash)
                .cloned()
        })
}

impl HostDriver {
    /// The current generation of `facts` and the manifest of its artifact,
    /// when this controller's build cache still holds that artifact.
    async fn base_manifest(&self, facts: &MachineFacts) -> Option<(GenerationId, Manifest)> {
        let current = facts.current_generation()?.clone();
        let builder = self.builder.clone();
        let hash = current.hash().to_owned();
        let manifest = tokio::task::spawn_blocking(move || {
            builder.find(&hash).and_then(|dir| Manifest::of(&dir).ok())
        })
        .await
        .ok()
        .flatten()?;
        Some((current, manifest))
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

    async fn prune_builds(
        &self,
        used: HashSet<String>,
        max_bytes: u64,
        recent: Duration,
    ) -> Result<CachePruned, DriverError> {
        let builder = self.builder.clone();
        tokio::task::spawn_blocking(move || builder.prune(&used, max_bytes, recent))
            .await
            .unwrap_or_else(|e| {
                Err(BuildError::Io {
                    action: "prune the build cache",
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
            .map_err(DriverError::from)
    }

    async fn nix_preview(
        &self,
        request: &nix::NixRequest,
        current: Option<&str>,
        timeout: Duration,
    ) -> Option<super::capability::NixPreview> {
        let toplevel = match nix::evaluate_toplevel(request, timeout).await {
            Ok(toplevel) => toplevel,
            Err(error) => {
                tracing::info!(error = %crate::telemetry::error_chain(&error), "could not evaluate the NixOS system for the plan");
                return None;
            }
        };
        let closure = match current {
            Some(current) if current != toplevel => {
                nix::diff_closures(current, &toplevel, timeout).await
            }
            _ => None,
        };
        Some(super::capability::NixPreview { toplevel, closure })
    }

    async fn deploy(
        &self,
        target: &TargetSpec,
        deploy: Deploy<'_>,
        timeout: Duration,
    ) -> Result<DeployOutcome, DriverError> {
        let t = self.target_for(target)?;
        let state_dir = target.state_dir();
        let started_at = Instant::now();
        if let Some(install) = &deploy.install {
            if let Err(error) = copy_closure(&t, install.artifact).await {
                return Ok(DeployOutcome {
                    install: None,
                    generation: None,
                    switched: false,
                    started: None,
                    result: None,
                    failure: Some((DeployPhase::Install, error)),
                });
            }
        }
        // What must travel: nothing when the target has the artifact, only
        // what differs from its current generation when this controller
        // still has that one's files, else everything.
        let manifest = match &deploy.install {
            Some(install) => {
                let path = install.artifact.path.clone();
                Some(
                    tokio::task::spawn_blocking(move || Manifest::of(&path))
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|m| m)
                        .map_err(|source| {
                            DriverError::Machine(MachineError::Artifact {
                                path: install.artifact.path.clone(),
                                source,
                            })
                        })?,
                )
            }
            None => None,
        };
        let base = match &deploy.install {
            Some(install) if same_artifact(install).is_none() => {
                self.base_manifest(install.facts).await
            }
            _ => None,
        };
        let install = match (&deploy.install, &manifest) {
            (Some(install), Some(manifest)) => Some(InstallRequest {
                generation: install.generation.clone(),
                artifact: &install.artifact.path,
                manifest,
                roles_json: install.roles_json,
                source: match (same_artifact(install), &base) {
                    (Some(same), _) => InstallSource::Same(same),
                    (None, Some((generation, base))) => InstallSource::Base {
                        generation: generation.clone(),
                        manifest: base,
                    },
                    (None, None) => InstallSource::Stream,
                },
            }),
            _ => None,
        };
        let activation_timeout = deploy.activate.as_ref().map(|a| a.timeout);
        let request = DeployRequest {
            install,
            switch: deploy.switch.clone(),
            activate: deploy.activate.as_ref().map(|a| {
                (
                    None,
                    ActivateRequest {
                        mode: a.mode.clone(),
                        timeout: a.timeout,
                        watchdog: a.watchdog.clone(),
                    },
                )
            }),
            wait: activation_timeout.map(|t| t.min(FIRST_WAIT)),
        };
        let report = protocol::deploy(
            &t,
            state_dir,
            &request,
            timeout + activation_timeout.map_or(Duration::ZERO, |t| t.min(FIRST_WAIT)),
        )
        .await?;
        let mut outcome = DeployOutcome {
            install: report.install,
            generation: report.generation,
            switched: report.switched,
            started: report.started,
            result: None,
            failure: report
                .failure
                .map(|(phase, error)| (phase, DriverError::from(error))),
        };
        let (Some(started), Some(limit)) = (&outcome.started, activation_timeout) else {
            return Ok(outcome);
        };
        let attempt = started.attempt.clone();
        let waited = match report.waited {
            Some(WaitOutcome::Ended(result)) => Ok(result),
            Some(WaitOutcome::Lost) => Err(MachineError::ActivationLost {
                target: t.describe(),
                attempt: attempt.clone(),
            }),
            _ => {
                let left = limit.saturating_sub(started_at.elapsed());
                wait_reattaching(&t, state_dir, &attempt, left).await
            }
        };
        match waited {
            Ok(result) => outcome.result = Some(result),
            Err(error) => {
                if error.is_timeout() {
                    // Past its timeout the activation is ended, with its children.
                    match protocol::kill_activation(&t, state_dir, &attempt).await {
                        Ok(_) => {
                            tracing::warn!(target_host = %t.describe(), attempt = %attempt.id, "the activation ran past its timeout; its process group was ended")
                        }
                        Err(e) => {
                            tracing::warn!(target_host = %t.describe(), error = %e, "could not end an activation that ran past its timeout")
                        }
                    }
                }
                outcome.failure = Some((DeployPhase::Activate, error.into()));
            }
        }
        Ok(outcome)
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

    async fn record_confirmed(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let t = self.target_for(target)?;
        Ok(protocol::record_confirmed(&t, target.state_dir(), generation, timeout).await?)
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
