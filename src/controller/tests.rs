//! Controller tests: the whole loop (`once::run`, or `lifecycle::start` for
//! what happens after a run would have ended) over an in-memory fake of the
//! driver traits, on tokio's paused clock. The store is a real sled store in
//! a temporary directory and the desired state is real YAML loaded through
//! `Source`; only the world the drivers touch is fake. The fake records every
//! call with its paused-clock time, so tests assert on order and delays
//! without real waiting. These tests must not spawn processes or depend on
//! wall-clock speed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::applier::{Config as ApplierConfig, Outcome, Phase, Request};
use super::context::{Config, Context};
use super::lifecycle;
use super::metrics::Metrics;
use super::once::{self, OnceOptions, OnceReport, Row};
use crate::driver::CommandOutput;
use crate::driver::TargetError;
use crate::driver::build::{Artifact, BuildError, BuildRequest, CachePruned};
use crate::driver::capability::{
    Deploy, DeployOutcome, DriverError, Hypervisor, MachineDriver, VmDriver,
};
use crate::driver::protocol::{
    ActivationAttempt, ActivationResult, ActivationStarted, ConfirmOutcome, Confirmation,
    CurrentLink, DeployPhase, GenerationId, InstallOutcome, MachineError, MachineFacts,
};
use crate::driver::qemu::{DiskFacts, DiskGrowth, Started, StopOutcome, VmFacts};
use crate::source::Source;
use crate::spec::{ByteSize, Disk, ObjectKey, OnDelete, Target as TargetSpec, VmSpec};
use crate::store::Store;
use crate::store::records::{AttemptRecord, AttemptResult, ConditionKind, Reason, StatusRecord};

// ------------------------------------------------------------------ fake driver

/// A driver operation, as the fake records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Observe,
    Build,
    Install,
    Switch,
    Activate,
    Confirm,
    HealthCheck,
}

/// One recorded driver call. Times are paused-clock offsets from the fake's
/// creation.
#[derive(Debug, Clone)]
struct Call {
    op: Op,
    /// The machine: the last component of its state directory, or the
    /// build request's machine name.
    machine: String,
    generation: Option<u64>,
    started: Duration,
    ended: Duration,
}

/// A failure the fake injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Retrying may help (a timeout).
    Transient,
    /// Retrying cannot help (unsupported).
    Terminal,
}

/// What goes wrong on one machine, and how slow it is.
#[derive(Debug, Clone, Default)]
struct Faults {
    /// Activations of generations numbered at least `.0` exit with code `.1`.
    activation_exit: Option<(u64, i32)>,
    /// Health checks fail while `current` is numbered at least this.
    unhealthy_from: Option<u64>,
    /// The next builds fail, in this order.
    builds: VecDeque<Failure>,
    /// The next observations fail, in this order.
    observes: VecDeque<Failure>,
    /// How long each activation takes on the paused clock.
    activation_delay: Duration,
}

/// One machine's state directory, in memory.
#[derive(Debug, Clone, Default)]
struct FakeMachine {
    current: Option<GenerationId>,
    /// The generation recorded as confirmed.
    confirmed: Option<GenerationId>,
    /// Complete generations, sorted.
    generations: Vec<GenerationId>,
}

#[derive(Debug, Clone, Default)]
struct FakeVm {
    pid: Option<u32>,
    launch: Option<String>,
    started_ms: u64,
    disks: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct World {
    machines: HashMap<String, FakeMachine>,
    faults: HashMap<String, Faults>,
    vms: HashMap<PathBuf, FakeVm>,
    /// The power-off grace of each VM stop or delete, in call order.
    stop_graces: Vec<Duration>,
    calls: Vec<Call>,
    next_pid: u32,
    /// The `used` set of each build-cache prune, in call order.
    cache_used: Vec<HashSet<String>>,
}

/// Implements every driver capability in memory, keyed by state directory.
#[derive(Debug)]
struct FakeDriver {
    t0: Instant,
    world: Mutex<World>,
}

fn machine_of(state_dir: &str) -> String {
    state_dir
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn injected(failure: Failure, what: &str) -> DriverError {
    match failure {
        Failure::Transient => DriverError::Target(TargetError::Timeout {
            target: "fake".to_owned(),
            what: what.to_owned(),
            after: Duration::from_secs(30),
        }),
        Failure::Terminal => DriverError::Unsupported {
            what: format!("{what} (injected)"),
        },
    }
}

impl FakeDriver {
    fn new() -> FakeDriver {
        FakeDriver {
            t0: Instant::now(),
            world: Mutex::new(World::default()),
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Duration {
        Instant::now() - self.t0
    }

    fn record(&self, op: Op, machine: &str, generation: Option<u64>, started: Duration) {
        let ended = self.now();
        self.world().calls.push(Call {
            op,
            machine: machine.to_owned(),
            generation,
            started,
            ended,
        });
    }

    fn faults(&self, machine: &str, faults: Faults) {
        self.world().faults.insert(machine.to_owned(), faults);
    }

    fn calls(&self) -> Vec<Call> {
        self.world().calls.clone()
    }

    fn machine(&self, name: &str) -> FakeMachine {
        self.world().machines.get(name).cloned().unwrap_or_default()
    }

    /// Someone outside converge installs and switches to another generation.
    fn tamper(&self, name: &str) -> GenerationId {
        let mut world = self.world();
        let m = world.machines.entry(name.to_owned()).or_default();
        let number = m.generations.iter().map(GenerationId::number).max();
        let foreign = GenerationId::new(number.unwrap_or(0) + 1, "f0reign").expect("valid id");
        m.generations.push(foreign.clone());
        m.generations.sort();
        m.current = Some(foreign.clone());
        foreign
    }
}

impl MachineDriver for FakeDriver {
    async fn observe(
        &self,
        target: &TargetSpec,
        _timeout: Duration,
    ) -> Result<MachineFacts, DriverError> {
        let started = self.now();
        let name = machine_of(target.state_dir());
        let (failure, machine) = {
            let mut world = self.world();
            let failure = world
                .faults
                .get_mut(&name)
                .and_then(|f| f.observes.pop_front());
            (
                failure,
                world.machines.get(&name).cloned().unwrap_or_default(),
            )
        };
        self.record(Op::Observe, &name, None, started);
        if let Some(failure) = failure {
            return Err(injected(failure, "observe facts"));
        }
        Ok(MachineFacts {
            hostname: "fake".to_owned(),
            boot_id: "00000000-0000-0000-0000-000000000000".to_owned(),
            uptime_secs: 1,
            kernel: "6.0.0-fake".to_owned(),
            current: match machine.current {
                Some(generation) => CurrentLink::Generation { generation },
                None => CurrentLink::Absent,
            },
            generations: machine.generations,
            incomplete: Vec::new(),
            confirmed: machine.confirmed,
            activation: None,
            nixos: None,
            observed_ms: crate::store::records::now_ms(),
        })
    }

    async fn build(&self, request: &BuildRequest) -> Result<Artifact, DriverError> {
        let started = self.now();
        let failure = self
            .world()
            .faults
            .get_mut(&request.machine)
            .and_then(|f| f.builds.pop_front());
        self.record(Op::Build, &request.machine, None, started);
        match failure {
            Some(Failure::Transient) => {
                return Err(DriverError::Build(BuildError::Failed {
                    argv: request.argv.clone(),
                    code: Some(1),
                    output: "injected build failure".to_owned(),
                }));
            }
            Some(Failure::Terminal) => return Err(DriverError::Build(BuildError::EmptyCommand)),
            None => {}
        }
        // Same inputs, same artifact: the hash follows the cache key.
        let hash = blake3::hash(request.cache_key.as_bytes()).to_hex()[..16].to_owned();
        Ok(Artifact {
            path: PathBuf::from("/fake/artifacts").join(&hash),
            hash,
            output: String::new(),
            cached: false,
        })
    }

    async fn deploy(
        &self,
        target: &TargetSpec,
        deploy: Deploy<'_>,
        _timeout: Duration,
    ) -> Result<DeployOutcome, DriverError> {
        let name = machine_of(target.state_dir());
        let mut outcome = DeployOutcome {
            install: None,
            generation: None,
            switched: false,
            started: None,
            result: None,
            failure: None,
        };
        if let Some(install) = &deploy.install {
            let started = self.now();
            let generation = install.generation.clone();
            let present = {
                let mut world = self.world();
                let m = world.machines.entry(name.clone()).or_default();
                let present = m.generations.contains(&generation);
                if !present {
                    m.generations.push(generation.clone());
                    m.generations.sort();
                }
                present
            };
            self.record(Op::Install, &name, Some(generation.number()), started);
            outcome.install = Some(if present {
                InstallOutcome::AlreadyPresent
            } else {
                InstallOutcome::Uploaded {
                    files: 1,
                    kept: 0,
                    bytes: 1,
                }
            });
            outcome.generation = Some(generation);
        }
        let mut target_generation = outcome.generation.clone();
        if let Some(switch) = &deploy.switch {
            let started = self.now();
            let Some(generation) = switch.clone().or_else(|| outcome.generation.clone()) else {
                outcome.failure = Some((
                    DeployPhase::Switch,
                    DriverError::Unsupported {
                        what: "a switch to nothing".to_owned(),
                    },
                ));
                return Ok(outcome);
            };
            let installed = {
                let mut world = self.world();
                let m = world.machines.entry(name.clone()).or_default();
                let installed = m.generations.contains(&generation);
                if installed {
                    m.current = Some(generation.clone());
                }
                installed
            };
            self.record(Op::Switch, &name, Some(generation.number()), started);
            if !installed {
                outcome.failure = Some((
                    DeployPhase::Switch,
                    DriverError::Machine(MachineError::NotInstalled {
                        target: name,
                        generation,
                    }),
                ));
                return Ok(outcome);
            }
            outcome.switched = true;
            target_generation = Some(generation);
        }
        if deploy.activate.is_some() {
            let started = self.now();
            let Some(generation) = target_generation else {
                outcome.failure = Some((
                    DeployPhase::Activate,
                    DriverError::Unsupported {
                        what: "an activation of nothing".to_owned(),
                    },
                ));
                return Ok(outcome);
            };
            let faults = self.world().faults.get(&name).cloned().unwrap_or_default();
            tokio::time::sleep(faults.activation_delay).await;
            let code = match faults.activation_exit {
                Some((from, code)) if generation.number() >= from => code,
                _ => 0,
            };
            self.record(Op::Activate, &name, Some(generation.number()), started);
            // The fake arms no watchdog: there is nothing to claim.
            outcome.started = Some(ActivationStarted {
                attempt: ActivationAttempt {
                    generation: generation.clone(),
                    id: "fake".to_owned(),
                },
                attached: false,
                confirmation: None,
            });
            outcome.result = Some(ActivationResult {
                code,
                log: format!("activated {generation}"),
            });
        }
        Ok(outcome)
    }

    async fn record_confirmed(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        _timeout: Duration,
    ) -> Result<(), DriverError> {
        let started = self.now();
        let name = machine_of(target.state_dir());
        {
            let mut world = self.world();
            let m = world.machines.entry(name.clone()).or_default();
            if m.current.as_ref() == Some(generation) {
                m.confirmed = Some(generation.clone());
            }
        }
        self.record(Op::Confirm, &name, Some(generation.number()), started);
        Ok(())
    }

    async fn confirm(
        &self,
        target: &TargetSpec,
        confirmation: &Confirmation,
        _timeout: Duration,
    ) -> Result<ConfirmOutcome, DriverError> {
        let started = self.now();
        let name = machine_of(target.state_dir());
        let generation = confirmation.attempt.generation.number();
        self.record(Op::Confirm, &name, Some(generation), started);
        Ok(ConfirmOutcome::Confirmed)
    }

    /// Keeps every generation: pruning is the driver's business and is
    /// tested against real state directories in driver::protocol.
    async fn prune(
        &self,
        _target: &TargetSpec,
        _keep: usize,
        _protect: &[GenerationId],
        _timeout: Duration,
    ) -> Result<Vec<GenerationId>, DriverError> {
        Ok(Vec::new())
    }

    async fn health_check(
        &self,
        target: &TargetSpec,
        argv: &[String],
        _timeout: Duration,
    ) -> Result<CommandOutput, DriverError> {
        let started = self.now();
        let name = machine_of(target.state_dir());
        let (current, unhealthy_from) = {
            let world = self.world();
            let current = world
                .machines
                .get(&name)
                .and_then(|m| m.current.as_ref().map(GenerationId::number));
            let unhealthy_from = world.faults.get(&name).and_then(|f| f.unhealthy_from);
            (current, unhealthy_from)
        };
        self.record(Op::HealthCheck, &name, current, started);
        let unhealthy = matches!((current, unhealthy_from), (Some(c), Some(from)) if c >= from);
        let output = CommandOutput {
            code: Some(if unhealthy { 1 } else { 0 }),
            stdout: String::new(),
            stderr: if unhealthy {
                "unhealthy\n".into()
            } else {
                "".into()
            },
        };
        if unhealthy {
            Err(DriverError::Machine(MachineError::HealthCheckFailed {
                target: name,
                argv: argv.to_vec(),
                output,
            }))
        } else {
            Ok(output)
        }
    }

    async fn prune_builds(
        &self,
        used: HashSet<String>,
        _max_bytes: u64,
        _recent: Duration,
    ) -> Result<CachePruned, DriverError> {
        self.world().cache_used.push(used);
        Ok(CachePruned::default())
    }
}

impl VmDriver for FakeDriver {
    async fn vm_observe(
        &self,
        _host: &Hypervisor,
        dir: &Path,
        disks: &[Disk],
    ) -> Result<VmFacts, DriverError> {
        let vm = self.world().vms.get(dir).cloned().unwrap_or_default();
        let mut facts: Vec<DiskFacts> = disks
            .iter()
            .map(|d| {
                let size = vm.disks.get(d.name.value.as_str()).copied();
                DiskFacts {
                    name: d.name.value.as_str().to_owned(),
                    exists: size.is_some(),
                    virtual_size: size,
                }
            })
            .collect();
        for (name, size) in &vm.disks {
            if !facts.iter().any(|f| &f.name == name) {
                facts.push(DiskFacts {
                    name: name.clone(),
                    exists: true,
                    virtual_size: Some(*size),
                });
            }
        }
        Ok(VmFacts {
            running: vm.pid.is_some(),
            pid: vm.pid,
            qmp_status: vm.pid.map(|_| "running".to_owned()),
            started_spec_hash: vm.pid.and(vm.launch),
            started_ms: vm.pid.map(|_| vm.started_ms),
            uptime_ms: vm
                .pid
                .map(|_| crate::store::records::now_ms().saturating_sub(vm.started_ms)),
            disks: facts,
            observed_ms: crate::store::records::now_ms(),
        })
    }

    fn vm_launch_identity(&self, name: &str, spec: &VmSpec, _dir: &Path, _root: &Path) -> String {
        let json = serde_json::to_vec(spec).unwrap_or_default();
        let mut hasher = blake3::Hasher::new();
        hasher.update(name.as_bytes());
        hasher.update(&json);
        hasher.finalize().to_hex().to_string()
    }

    async fn vm_create_disk(
        &self,
        _host: &Hypervisor,
        dir: &Path,
        disk: &Disk,
        _backing: Option<&Path>,
    ) -> Result<(), DriverError> {
        let mut world = self.world();
        let vm = world.vms.entry(dir.to_path_buf()).or_default();
        vm.disks
            .insert(disk.name.value.as_str().to_owned(), disk.size.value.bytes());
        Ok(())
    }

    async fn vm_grow_disk(
        &self,
        _host: &Hypervisor,
        dir: &Path,
        disk: &str,
        size: ByteSize,
        running: bool,
    ) -> Result<DiskGrowth, DriverError> {
        let mut world = self.world();
        let vm = world.vms.entry(dir.to_path_buf()).or_default();
        let from = vm.disks.get(disk).copied().unwrap_or(0);
        let to = from.max(size.bytes());
        vm.disks.insert(disk.to_owned(), to);
        Ok(DiskGrowth {
            from,
            to,
            online: running,
        })
    }

    async fn vm_start(
        &self,
        _host: &Hypervisor,
        dir: &Path,
        _name: &str,
        _spec: &VmSpec,
        launch_identity: &str,
        _root: &Path,
        _timeout: Duration,
    ) -> Result<Started, DriverError> {
        let mut world = self.world();
        world.next_pid += 1;
        let pid = 10_000 + world.next_pid;
        let vm = world.vms.entry(dir.to_path_buf()).or_default();
        vm.pid = Some(pid);
        vm.started_ms = crate::store::records::now_ms();
        vm.launch = Some(launch_identity.to_owned());
        Ok(Started {
            pid,
            status: "running".to_owned(),
            ready_after: Duration::ZERO,
        })
    }

    async fn vm_stop(
        &self,
        _host: &Hypervisor,
        dir: &Path,
        graceful: Duration,
    ) -> Result<StopOutcome, DriverError> {
        let mut world = self.world();
        world.stop_graces.push(graceful);
        let vm = world.vms.entry(dir.to_path_buf()).or_default();
        Ok(match vm.pid.take() {
            Some(_) => StopOutcome::PoweredDown,
            None => StopOutcome::NotRunning,
        })
    }

    async fn vm_delete(
        &self,
        _host: &Hypervisor,
        dir: &Path,
        on_delete: OnDelete,
        graceful: Duration,
    ) -> Result<StopOutcome, DriverError> {
        let mut world = self.world();
        world.stop_graces.push(graceful);
        let stopped = match world.vms.get_mut(dir).and_then(|vm| vm.pid.take()) {
            Some(_) => StopOutcome::PoweredDown,
            None => StopOutcome::NotRunning,
        };
        if on_delete == OnDelete::Delete {
            world.vms.remove(dir);
        }
        Ok(stopped)
    }

    async fn vm_running_pid(
        &self,
        _host: &Hypervisor,
        dir: &Path,
    ) -> Result<Option<u32>, DriverError> {
        Ok(self.world().vms.get(dir).and_then(|vm| vm.pid))
    }

    // Operator verbs are tested against real QEMU (tests/loop/vm_verbs.rs,
    // tests/fleet/remote_hypervisor.rs); the fake has no snapshots.
    async fn vm_snapshots(
        &self,
        _host: &Hypervisor,
        _dir: &Path,
    ) -> Result<Vec<crate::driver::qemu::SnapshotInfo>, DriverError> {
        Ok(Vec::new())
    }

    async fn vm_snapshot(
        &self,
        _host: &Hypervisor,
        _dir: &Path,
        _snap: &str,
    ) -> Result<(), DriverError> {
        Err(DriverError::Unsupported {
            what: "snapshots on the fake driver".into(),
        })
    }

    async fn vm_revert(
        &self,
        _host: &Hypervisor,
        _dir: &Path,
        _snap: &str,
    ) -> Result<(), DriverError> {
        Err(DriverError::Unsupported {
            what: "snapshots on the fake driver".into(),
        })
    }

    fn vm_watch_exit(&self, _pid: u32) -> impl std::future::Future<Output = ()> + Send + 'static {
        // Fake VMs never exit on their own.
        std::future::pending()
    }
}

// ------------------------------------------------------------------ harness

/// A machine document. Its state directory is `/fake/NAME`, which the fake
/// maps back to NAME.
struct M<'a> {
    name: &'a str,
    version: &'a str,
    rollback: &'a str,
    drift: &'a str,
    health_check: bool,
}

impl<'a> M<'a> {
    fn new(name: &'a str) -> M<'a> {
        M {
            name,
            version: "v1",
            rollback: "auto",
            drift: "correct",
            health_check: false,
        }
    }

    fn yaml(&self) -> String {
        let build = format!("{{command: [\"./build.sh\", \"{}\"]}}", self.version);
        let checks = if self.health_check {
            "\n    healthChecks: [{exec: [\"check\"], timeout: 10s}]"
        } else {
            ""
        };
        format!(
            "apiVersion: converge/v1\nkind: Machine\nmetadata: {{name: {name}}}\nspec:\n  \
             target: {{local: true, stateDir: /fake/{name}}}\n  build: {build}\n  \
             activation:\n    mode: switch\n    rollback: {rollback}{checks}\n  \
             drift: {drift}\n  interval: 5m\n",
            name = self.name,
            rollback = self.rollback,
            drift = self.drift,
        )
    }
}

fn fleet(machines: &[M<'_>], extra: &str) -> String {
    let mut docs: Vec<String> = machines.iter().map(M::yaml).collect();
    if !extra.is_empty() {
        docs.push(extra.to_owned());
    }
    docs.join("---\n")
}

/// gw1 and gw2 are controllers; p1 and p2 are peers, `after: [controller]`.
const VPN: &str = "apiVersion: converge/v1\nkind: Service\nmetadata: {name: vpn}\nspec:\n  \
                   module: wireguard\n  roles:\n    controller: {machines: [gw1, gw2]}\n    \
                   peer: {machines: [p1, p2], after: [controller]}\n";

struct Harness {
    _dir: tempfile::TempDir,
    desired: PathBuf,
    ctx: Arc<Context<FakeDriver>>,
}

impl Harness {
    fn new(yaml: &str) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let desired = dir.path().join("desired");
        std::fs::create_dir(&desired).expect("mkdir desired");
        std::fs::write(desired.join("build.sh"), "#!/bin/sh\n").expect("write build.sh");
        std::fs::write(desired.join("fleet.yaml"), yaml).expect("write yaml");
        let snapshot = load(&desired);
        let state = dir.path().join("state");
        let store = Store::open(&state.join("store")).expect("open store");
        let config = Config {
            dependency_poll: Duration::from_secs(5),
            ..Config::default()
        };
        let ctx = Arc::new(Context::new(
            store,
            FakeDriver::new(),
            config,
            &state,
            snapshot,
        ));
        Harness {
            _dir: dir,
            desired,
            ctx,
        }
    }

    fn fake(&self) -> &FakeDriver {
        &self.ctx.driver
    }

    /// Rewrites the YAML and puts the new desired state in force.
    fn change(&self, yaml: &str) {
        std::fs::write(self.desired.join("fleet.yaml"), yaml).expect("write yaml");
        self.ctx.replace_snapshot(load(&self.desired));
    }

    async fn once(&self, attempts: u32) -> OnceReport {
        let report = once::run(self.ctx.clone(), once_options(attempts)).await;
        assert!(!report.timed_out, "the run timed out: {report:?}");
        report
    }

    fn status(&self, key: &str) -> StatusRecord {
        self.ctx
            .store
            .status(&object(key))
            .expect("read status")
            .unwrap_or_default()
    }

    fn history(&self, key: &str) -> Vec<AttemptRecord> {
        self.ctx.store.history(&object(key), 100).expect("history")
    }

    /// The calls made for `machine`, as (op, generation), from call `from` on.
    fn ops(&self, machine: &str, from: usize) -> Vec<(Op, Option<u64>)> {
        self.fake().calls()[from..]
            .iter()
            .filter(|c| c.machine == machine)
            .map(|c| (c.op, c.generation))
            .collect()
    }
}

fn load(desired: &Path) -> super::context::Snapshot {
    let mut source = Source::new(desired);
    let (assembled, _, snapshot) = lifecycle::load(&mut source).expect("read desired state");
    match snapshot {
        Some(snapshot) => snapshot,
        None => panic!("invalid desired state: {:?}", assembled.diagnostics),
    }
}

fn object(key: &str) -> ObjectKey {
    key.parse().expect("object key")
}

fn applier_config() -> ApplierConfig {
    let mut config = ApplierConfig {
        concurrency: 16,
        ..ApplierConfig::default()
    };
    // Exact delays, so the paused clock shows the backoff sequence itself.
    config.backoff.jitter = 0.0;
    config
}

fn once_options(attempts: u32) -> OnceOptions {
    OnceOptions {
        attempts,
        timeout: Some(Duration::from_secs(6 * 3600)),
        applier: applier_config(),
    }
}

fn row<'r>(report: &'r OnceReport, key: &str) -> &'r Row {
    let key = object(key);
    report
        .rows
        .iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| panic!("no row for {key} in {report:?}"))
}

fn generation(h: &Harness, machine: &str) -> Option<u64> {
    h.fake()
        .machine(machine)
        .current
        .as_ref()
        .map(GenerationId::number)
}

// ------------------------------------------------------------------ tests

#[tokio::test(start_paused = true)]
async fn machines_of_a_role_with_after_are_not_touched_until_every_earlier_role_machine_is_ready() {
    let machines = ["gw1", "gw2", "p1", "p2"].map(M::new);
    let h = Harness::new(&fleet(&machines, VPN));
    // gw2's activation takes a minute: the peers must wait for it, not just for gw1.
    h.fake().faults(
        "gw2",
        Faults {
            activation_delay: Duration::from_secs(60),
            ..Faults::default()
        },
    );

    let report = h.once(3).await;

    assert!(report.all_ready(), "{report:?}");
    let calls = h.fake().calls();
    let controllers_ready = calls
        .iter()
        .filter(|c| c.op == Op::Activate && c.machine.starts_with("gw"))
        .map(|c| c.ended)
        .max()
        .expect("controllers were activated");
    assert_eq!(controllers_ready, Duration::from_secs(60));
    for peer in ["p1", "p2"] {
        let first = calls
            .iter()
            .find(|c| c.machine == peer)
            .unwrap_or_else(|| panic!("{peer} was never touched"));
        assert!(
            first.started >= controllers_ready,
            "{peer} was touched at {:?} ({:?}), before the controllers were Ready at {controllers_ready:?}",
            first.started,
            first.op
        );
        assert!(
            calls
                .iter()
                .any(|c| c.machine == peer && c.op == Op::Activate),
            "{peer} was never activated"
        );
    }
    // Waiting for dependencies is not an attempt.
    assert_eq!(row(&report, "machine/p1").attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn dependents_of_a_failed_machine_end_dependency_failed_without_being_activated() {
    let machines = ["gw1", "gw2", "p1", "p2", "slow"].map(M::new);
    let h = Harness::new(&fleet(&machines, VPN));
    h.fake().faults(
        "gw1",
        Faults {
            builds: VecDeque::from([Failure::Terminal]),
            ..Faults::default()
        },
    );
    // An unrelated machine keeps the run going well past the dependents'
    // dependency poll (5 s), so they are looked at again after being failed.
    h.fake().faults(
        "slow",
        Faults {
            activation_delay: Duration::from_secs(60),
            ..Faults::default()
        },
    );

    let report = h.once(3).await;

    let gw1 = row(&report, "machine/gw1");
    assert!(!gw1.ready);
    assert_eq!(gw1.reason, Reason::BuildFailed);
    assert!(row(&report, "machine/gw2").ready);
    assert!(row(&report, "machine/slow").ready);
    for peer in ["machine/p1", "machine/p2"] {
        let r = row(&report, peer);
        assert!(!r.ready, "{r:?}");
        // Fails today: once.rs marks the dependent DependencyFailed, but the
        // applier still has it queued (dependency poll) and its wait check
        // overwrites Ready with DependencyNotReady; and a wait that finishes
        // after the failure is read back as a success and counted as an attempt.
        assert_eq!(r.reason, Reason::DependencyFailed, "{r:?}");
        assert!(r.message.contains("machine/gw1"), "{r:?}");
        assert_eq!(r.attempts, 0, "waiting is not an attempt: {r:?}");
    }
    for peer in ["p1", "p2"] {
        assert_eq!(h.ops(peer, 0), vec![], "{peer} must not be touched");
    }
}

/// Converges `web` at generation 1, then changes its spec so the next run
/// builds generation 2 under `faults`; returns the report of that run and
/// the index of its first call.
async fn second_generation(h: &Harness, v2: M<'_>, faults: Faults) -> (OnceReport, usize) {
    let first = h.once(1).await;
    assert!(first.all_ready(), "{first:?}");
    assert_eq!(generation(h, "web"), Some(1));
    h.fake().faults("web", faults);
    h.change(&v2.yaml());
    let from = h.fake().calls().len();
    (h.once(1).await, from)
}

#[tokio::test(start_paused = true)]
async fn failed_activation_with_rollback_auto_reactivates_the_previous_generation() {
    let h = Harness::new(&M::new("web").yaml());
    let v2 = M {
        version: "v2",
        ..M::new("web")
    };
    let faults = Faults {
        activation_exit: Some((2, 1)),
        ..Faults::default()
    };
    let (report, from) = second_generation(&h, v2, faults).await;

    assert_eq!(
        h.ops("web", from),
        vec![
            (Op::Observe, None),
            (Op::Build, None),
            (Op::Install, Some(2)),
            (Op::Switch, Some(2)),
            (Op::Activate, Some(2)),
            (Op::Switch, Some(1)),
            (Op::Activate, Some(1)),
            (Op::Observe, None),
        ]
    );
    assert_eq!(generation(&h, "web"), Some(1));
    let r = row(&report, "machine/web");
    assert!(!r.ready);
    assert_eq!(r.reason, Reason::RolledBack);
    match &h.history("machine/web")[0].result {
        AttemptResult::RolledBack {
            reason,
            to_generation,
            ..
        } => {
            assert_eq!(*reason, Reason::ActivationFailed);
            assert_eq!(*to_generation, Some(1));
        }
        other => panic!("expected a rollback, got {other:?}"),
    }
    let status = h.status("machine/web");
    assert_eq!(status.last_applied.map(|a| a.generation), Some(1));
}

#[tokio::test(start_paused = true)]
async fn failed_activation_with_rollback_never_stays_on_the_new_generation_and_fails() {
    let h = Harness::new(&M::new("web").yaml());
    let v2 = M {
        version: "v2",
        rollback: "never",
        ..M::new("web")
    };
    let faults = Faults {
        activation_exit: Some((2, 1)),
        ..Faults::default()
    };
    let (report, from) = second_generation(&h, v2, faults).await;

    assert_eq!(
        h.ops("web", from),
        vec![
            (Op::Observe, None),
            (Op::Build, None),
            (Op::Install, Some(2)),
            (Op::Switch, Some(2)),
            (Op::Activate, Some(2)),
            (Op::Observe, None),
        ]
    );
    assert_eq!(generation(&h, "web"), Some(2));
    let r = row(&report, "machine/web");
    assert!(!r.ready);
    assert_eq!(r.reason, Reason::ActivationFailed);
    assert!(r.message.contains("rollback: never"), "{r:?}");
    match &h.history("machine/web")[0].result {
        AttemptResult::Failed { reason, .. } => assert_eq!(*reason, Reason::ActivationFailed),
        other => panic!("expected a plain failure, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn failed_health_check_rolls_back_to_the_previous_generation() {
    let h = Harness::new(
        &M {
            health_check: true,
            ..M::new("web")
        }
        .yaml(),
    );
    let v2 = M {
        version: "v2",
        health_check: true,
        ..M::new("web")
    };
    let faults = Faults {
        unhealthy_from: Some(2),
        ..Faults::default()
    };
    let (report, from) = second_generation(&h, v2, faults).await;

    assert_eq!(
        h.ops("web", from),
        vec![
            (Op::Observe, None),
            (Op::Build, None),
            (Op::Install, Some(2)),
            (Op::Switch, Some(2)),
            (Op::Activate, Some(2)),
            (Op::HealthCheck, Some(2)),
            (Op::Switch, Some(1)),
            (Op::Activate, Some(1)),
            (Op::Observe, None),
        ]
    );
    assert_eq!(generation(&h, "web"), Some(1));
    assert_eq!(row(&report, "machine/web").reason, Reason::RolledBack);
    match &h.history("machine/web")[0].result {
        AttemptResult::RolledBack {
            reason,
            to_generation,
            ..
        } => {
            assert_eq!(*reason, Reason::HealthCheckFailed);
            assert_eq!(*to_generation, Some(1));
        }
        other => panic!("expected a rollback, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_terminal_error_stalls_the_object_and_is_never_retried() {
    let h = Harness::new(&M::new("web").yaml());
    h.fake().faults(
        "web",
        Faults {
            builds: VecDeque::from([Failure::Terminal]),
            ..Faults::default()
        },
    );
    let lifecycle::Loop {
        requests,
        mut finished,
        phase,
        handle,
    } = lifecycle::start(h.ctx.clone(), applier_config(), Arc::new(Metrics::new()));
    requests
        .send(Request::Now(object("machine/web")))
        .expect("send");
    let done = finished.recv().await.expect("a finished reconcile");
    match done.outcome {
        Outcome::Failed {
            transient,
            retry_in,
            error,
            ..
        } => {
            assert!(!transient);
            assert_eq!(retry_in, None);
            assert_eq!(error.reason(), Reason::BuildFailed);
        }
        other => panic!("expected a terminal failure, got {other:?}"),
    }
    let calls = h.fake().calls().len();

    // A day later nothing has run again.
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    assert!(finished.try_recv().is_err(), "reconciled again");
    assert_eq!(h.fake().calls().len(), calls);
    assert_eq!(h.history("machine/web").len(), 1);
    assert!(
        h.ops("web", 0)
            .iter()
            .all(|(op, _)| matches!(op, Op::Observe | Op::Build))
    );

    let status = h.status("machine/web");
    let stalled = status
        .condition(ConditionKind::Stalled)
        .expect("Stalled set");
    assert!(stalled.status);
    assert_eq!(stalled.reason, Reason::BuildFailed);
    assert!(!status.is_ready());
    assert!(
        !status
            .condition(ConditionKind::Reconciling)
            .is_some_and(|c| c.status)
    );

    phase.send(Phase::Abort).expect("phase");
    drop(requests);
    handle.await.expect("loop ends");
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_growing_delays_and_success_resets_failures() {
    let h = Harness::new(&M::new("web").yaml());
    h.fake().faults(
        "web",
        Faults {
            observes: VecDeque::from([Failure::Transient, Failure::Transient]),
            ..Faults::default()
        },
    );
    let t0 = Instant::now();
    let run = tokio::spawn(once::run(h.ctx.clone(), once_options(3)));

    tokio::time::sleep_until(t0 + Duration::from_secs(1)).await;
    let status = h.status("machine/web");
    assert_eq!(status.failures, 1);
    let reconciling = status.condition(ConditionKind::Reconciling).expect("set");
    assert!(reconciling.status);
    assert_eq!(reconciling.reason, Reason::ProgressingWithRetry);
    tokio::time::sleep_until(t0 + Duration::from_secs(3)).await;
    assert_eq!(h.status("machine/web").failures, 2);

    let report = run.await.expect("run");
    let r = row(&report, "machine/web");
    assert!(r.ready, "{r:?}");
    assert_eq!(r.attempts, 3);
    // Attempts at 0 s, 2 s (first delay) and 6 s (twice the first delay);
    // the last observe is the one after the change.
    let observes: Vec<Duration> = h
        .fake()
        .calls()
        .iter()
        .filter(|c| c.op == Op::Observe)
        .map(|c| c.started)
        .collect();
    assert_eq!(
        observes,
        [0, 2, 6, 6].map(Duration::from_secs),
        "retry delays must be 2 s then 4 s"
    );
    let status = h.status("machine/web");
    assert_eq!(status.failures, 0);
    assert!(status.is_ready());
    assert_eq!(generation(&h, "web"), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_second_run_with_nothing_changed_only_observes_and_begins_no_attempt() {
    let machines = ["gw1", "gw2", "p1", "p2"].map(M::new);
    let h = Harness::new(&fleet(&machines, VPN));
    let first = h.once(3).await;
    assert!(first.all_ready(), "{first:?}");
    let keys = ["machine/gw1", "machine/gw2", "machine/p1", "machine/p2"];
    let histories: Vec<_> = keys.iter().map(|k| h.history(k)).collect();
    assert!(
        histories.iter().all(|hist| hist.len() == 1),
        "{histories:?}"
    );
    let from = h.fake().calls().len();

    let second = h.once(3).await;

    assert!(second.all_ready(), "{second:?}");
    let again: Vec<_> = keys.iter().map(|k| h.history(k)).collect();
    assert_eq!(again, histories, "a no-op run must not record attempts");
    let ops: Vec<Op> = h.fake().calls()[from..].iter().map(|c| c.op).collect();
    assert_eq!(ops, vec![Op::Observe; 4], "only observations");
    for key in keys {
        assert_eq!(row(&second, key).reason, Reason::Converged);
        assert_eq!(h.status(key).in_progress, None);
    }
}

#[tokio::test(start_paused = true)]
async fn drift_with_policy_correct_reactivates_the_applied_generation_without_building() {
    let h = Harness::new(&M::new("web").yaml());
    assert!(h.once(1).await.all_ready());
    let foreign = h.fake().tamper("web");
    assert_eq!(foreign.number(), 2);
    let from = h.fake().calls().len();

    let report = h.once(1).await;

    assert_eq!(
        h.ops("web", from),
        vec![
            (Op::Observe, None),
            (Op::Switch, Some(1)),
            (Op::Activate, Some(1)),
            (Op::Confirm, Some(1)),
            (Op::Observe, None),
        ]
    );
    assert_eq!(generation(&h, "web"), Some(1));
    assert!(row(&report, "machine/web").ready);
    let history = h.history("machine/web");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].result, AttemptResult::Succeeded);
    assert_eq!(history[0].generation, Some(1));
    let status = h.status("machine/web");
    assert!(
        !status
            .condition(ConditionKind::Drifted)
            .is_some_and(|c| c.status),
        "corrected drift is not Drifted"
    );
    let events = h
        .ctx
        .store
        .events_for(&object("machine/web"), 10)
        .expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, Reason::DriftDetected);
}

#[tokio::test(start_paused = true)]
async fn drift_with_policy_warn_only_sets_drifted_and_reports_it_once() {
    let h = Harness::new(
        &M {
            drift: "warn",
            ..M::new("web")
        }
        .yaml(),
    );
    assert!(h.once(1).await.all_ready());
    h.fake().tamper("web");
    let from = h.fake().calls().len();

    let report = h.once(1).await;
    let again = h.once(1).await;

    let ops: Vec<Op> = h.ops("web", from).into_iter().map(|(op, _)| op).collect();
    assert_eq!(ops, vec![Op::Observe; 2], "warn never changes the machine");
    assert_eq!(generation(&h, "web"), Some(2));
    assert_eq!(h.history("machine/web").len(), 1);
    for report in [report, again] {
        let r = row(&report, "machine/web");
        assert!(r.ready, "{r:?}");
        assert_eq!(r.reason, Reason::DriftReported);
    }
    let drifted = h
        .status("machine/web")
        .condition(ConditionKind::Drifted)
        .cloned()
        .expect("Drifted set");
    assert!(drifted.status);
    assert_eq!(drifted.reason, Reason::DriftReported);
    let events = h
        .ctx
        .store
        .events_for(&object("machine/web"), 10)
        .expect("events");
    assert_eq!(events.len(), 1, "one report per change: {events:?}");
}

fn vm_hosting(name: &str, machine: &str, state: &str) -> String {
    format!(
        "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\nspec:\n  \
         host: local\n  state: {state}\n  cpus: 1\n  memory: 64MiB\n  \
         disks: [{{name: root, size: 64MiB}}]\n  network: {{mode: user}}\n  machine: {machine}\n"
    )
}

#[tokio::test(start_paused = true)]
async fn a_machine_in_a_vm_waits_for_it_then_for_its_guest_within_one_attempt() {
    let h = Harness::new(&fleet(
        &[M::new("inner")],
        &vm_hosting("box", "inner", "running"),
    ));
    // The guest boots: its SSH does not answer the first five tries.
    h.fake().faults(
        "inner",
        Faults {
            observes: VecDeque::from([Failure::Transient; 5]),
            ..Faults::default()
        },
    );

    let report = h.once(3).await;

    assert!(report.all_ready(), "{report:?}");
    // The observations before anything else was done to it (after its
    // activation it is observed once more).
    let observes: Vec<_> = h
        .fake()
        .calls()
        .into_iter()
        .filter(|c| c.machine == "inner")
        .take_while(|c| c.op == Op::Observe)
        .collect();
    assert_eq!(
        observes.len(),
        6,
        "five refused tries, then the answer: {observes:?}"
    );
    let gaps: Vec<Duration> = observes
        .windows(2)
        .map(|w| w[1].started - w[0].started)
        .collect();
    assert!(
        gaps.iter().all(|g| *g == Duration::from_secs(2)),
        "polled every guest_poll (2 s): {gaps:?}"
    );
    // Waiting for the guest is part of one attempt, not five failures.
    assert_eq!(row(&report, "machine/inner").attempts, 1);
    assert_eq!(h.status("machine/inner").failures, 0);
    assert!(generation(&h, "inner").is_some(), "inner was activated");
}

#[tokio::test(start_paused = true)]
async fn a_vm_is_stopped_and_deleted_with_the_power_off_grace_its_spec_gives() {
    let vm = |state: &str, extra: &str| {
        format!(
            "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {{name: box}}\nspec:\n  \
             state: {state}\n  memory: 64MiB\n{extra}"
        )
    };
    let h = Harness::new(&fleet(
        &[M::new("m")],
        &vm("running", "  stopTimeout: 3s\n"),
    ));
    assert!(h.once(1).await.all_ready());
    // Stopped by a spec that gives no grace: the default, 30 s (not the
    // 3 s of the spec it was started with).
    h.change(&fleet(&[M::new("m")], &vm("stopped", "")));
    assert!(h.once(1).await.all_ready());
    h.change(&fleet(
        &[M::new("m")],
        &vm("running", "  stopTimeout: 7s\n"),
    ));
    assert!(h.once(1).await.all_ready());
    // Removed: the grace of the spec it was last converged with, for its
    // `stop-vm` and for the stop its `delete-vm` makes sure of.
    h.change(&fleet(&[M::new("m")], ""));
    h.once(1).await;
    assert_eq!(
        h.fake().world().stop_graces,
        vec![
            Duration::from_secs(30),
            Duration::from_secs(7),
            Duration::from_secs(7)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_never_answers_fails_its_machine_after_the_boot_window() {
    let h = Harness::new(&fleet(
        &[M::new("inner")],
        &vm_hosting("box", "inner", "running"),
    ));
    h.fake().faults(
        "inner",
        Faults {
            observes: VecDeque::from([Failure::Transient; 500]),
            ..Faults::default()
        },
    );
    let started = tokio::time::Instant::now();

    let report = h.once(1).await;

    let inner = row(&report, "machine/inner");
    assert!(!inner.ready, "{inner:?}");
    assert_eq!(inner.reason, Reason::Unreachable, "{inner:?}");
    assert!(
        inner.message.contains("vm/box") && inner.message.contains("did not answer within 180s"),
        "{inner:?}"
    );
    let observes = h
        .fake()
        .calls()
        .into_iter()
        .filter(|c| c.machine == "inner" && c.op == Op::Observe)
        .count();
    // Every 2 s for 180 s from the VM's start (the VM started at once).
    assert!((90..=92).contains(&observes), "{observes} observations");
    assert!(
        started.elapsed() >= Duration::from_secs(180),
        "{:?}",
        started.elapsed()
    );
    assert!(row(&report, "vm/box").ready, "the VM itself runs");
    assert!(generation(&h, "inner").is_none(), "nothing was activated");
}

#[tokio::test(start_paused = true)]
async fn a_machine_in_a_stopped_vm_is_stalled_with_that_reason_and_never_contacted() {
    let h = Harness::new(&fleet(
        &[M::new("inner")],
        &vm_hosting("box", "inner", "stopped"),
    ));

    let report = h.once(3).await;

    let inner = row(&report, "machine/inner");
    assert!(!inner.ready);
    assert_eq!(inner.reason, Reason::HostVmStopped, "{inner:?}");
    assert!(inner.message.contains("vm/box"), "{inner:?}");
    assert!(
        h.fake().calls().iter().all(|c| c.machine != "inner"),
        "a machine whose VM is stopped is never contacted"
    );
    assert!(
        row(&report, "vm/box").ready,
        "the VM itself is stopped as asked"
    );
}

#[tokio::test(start_paused = true)]
async fn a_service_is_ready_only_when_every_member_is_ready_on_its_current_roles_document() {
    let machines = ["gw1", "gw2", "p1", "p2"].map(M::new);
    let h = Harness::new(&fleet(&machines, VPN));
    assert!(h.once(3).await.all_ready());
    let ready = h.status("service/vpn");
    let c = ready.condition(ConditionKind::Ready).expect("Ready");
    assert!(c.status, "{c:?}");
    assert_eq!(c.message, "2 roles, 4 members: 4 Ready");

    // Instance-wide settings change every member's roles document: until
    // the members are deployed with it, the service is not Ready.
    let changed = VPN.replace(
        "module: wireguard\n",
        "module: wireguard\n  settings: {port: 51821}\n",
    );
    h.change(&fleet(&machines, &changed));
    let action = super::reconcile::reconcile(h.ctx.clone(), object("service/vpn"))
        .await
        .expect("a service reconcile");
    assert!(
        matches!(action, super::applier::Action::Requeue(_)),
        "it waits for its members: {action:?}"
    );
    let waiting = h.status("service/vpn");
    let c = waiting.condition(ConditionKind::Ready).expect("Ready");
    assert!(!c.status);
    assert_eq!(c.reason, Reason::DependencyNotReady);
    assert_eq!(
        c.message,
        "2 roles, 4 members: 0 Ready, 4 OlderRolesDocument (gw1, gw2, p1, …)"
    );

    assert!(h.once(3).await.all_ready());
    let c = h.status("service/vpn");
    let c = c.condition(ConditionKind::Ready).expect("Ready");
    assert!(c.status, "{c:?}");
    assert_eq!(c.message, "2 roles, 4 members: 4 Ready");
}

#[tokio::test(start_paused = true)]
async fn a_rollback_and_the_recovery_after_it_are_events() {
    let h = Harness::new(&M::new("web").yaml());
    let v2 = M {
        version: "v2",
        ..M::new("web")
    };
    let faults = Faults {
        activation_exit: Some((2, 1)),
        ..Faults::default()
    };
    let (report, _) = second_generation(&h, v2, faults).await;
    assert!(!row(&report, "machine/web").ready);
    let v3 = M {
        version: "v3",
        ..M::new("web")
    };
    h.fake().faults("web", Faults::default());
    h.change(&v3.yaml());
    let report = h.once(1).await;
    assert!(report.all_ready(), "{report:?}");
    let events = h
        .ctx
        .store
        .events_for(&object("machine/web"), 10)
        .expect("events");
    let reasons: Vec<(Reason, crate::store::records::Severity)> =
        events.iter().map(|e| (e.reason, e.severity)).collect();
    assert_eq!(
        reasons,
        vec![
            (Reason::Converged, crate::store::records::Severity::Info),
            (Reason::RolledBack, crate::store::records::Severity::Error),
        ],
        "newest first: {events:?}"
    );
    assert!(
        events[0].message.starts_with("recovered from RolledBack"),
        "{events:?}"
    );
}
