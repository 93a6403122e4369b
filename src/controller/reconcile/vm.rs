//! Reconcile of one VirtualMachine: observe the process and disks, then
//! create missing disks, grow disks, start, stop, or restart when what qemu
//! was launched with differs from what the spec launches now; record the
//! attempt.
//!
//! A VM that died while its spec says running is drift: one WARN line, then
//! it is started again. A VM removed from the YAML is stopped, and its disks
//! deleted only with `onDelete: delete`, before it is forgotten. A running
//! VM's exit is watched, so the daemon notices it at once rather than at the
//! next resync.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;

use super::machine::error_chain;
use super::{ReconcileError, jittered};
use crate::controller::applier::Action;
use crate::controller::context::Context;
use crate::driver::capability::{DriverError, Drivers, Hypervisor};
use crate::spec::{Name, ObjectKey, OnDelete, Target as TargetSpec, VmHost, VmPowerState};
use crate::store::Store;
use crate::store::records::{
    Applied, AttemptRecord, AttemptResult, ConditionKind, FactsRecord, Severity, SpecRecord,
    StepRecord, now_ms,
};
use crate::telemetry::DRIFT_TARGET;

fn store_error(e: impl std::fmt::Display) -> ReconcileError {
    ReconcileError::transient("StoreFailed", e.to_string())
}

fn driver_error(reason: &str, e: &DriverError) -> ReconcileError {
    if e.is_transient() {
        ReconcileError::transient(reason, error_chain(e))
    } else {
        ReconcileError::terminal(reason, error_chain(e))
    }
}

fn step(name: &str, started: Instant, ok: bool, output: impl Into<String>) -> StepRecord {
    StepRecord {
        name: name.to_owned(),
        ok,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        output: output.into(),
    }
}

/// The document recorded as a VM's applied spec, and compared with it by
/// `plan`: both must build it the same way.
pub fn spec_document(name: &crate::spec::Name, spec: &crate::spec::VmSpec) -> Value {
    serde_json::json!({
        "apiVersion": crate::spec::API_VERSION,
        "kind": "VirtualMachine",
        "metadata": {"name": name.as_str()},
        "spec": serde_json::to_value(spec).unwrap_or(Value::Null),
    })
}

/// Reconciles `vm/NAME`.
pub async fn reconcile<D: Drivers>(
    ctx: &Context<D>,
    key: &ObjectKey,
) -> Result<Action, ReconcileError> {
    // Operator verbs (snapshot, revert) wait while this runs, and it waits for them.
    let _held = ctx.vm_locks.lock(&key.name).await;
    let snapshot = ctx.snapshot();
    let Some(object) = snapshot.desired.vms.get(&key.name) else {
        return remove(ctx, key).await;
    };
    let spec = &object.spec;
    let last = last_place(&ctx.store, key).map_err(unresolved)?;
    let host = &resolve_hypervisor(
        Some(&snapshot.desired),
        &ctx.store,
        &spec.host.value,
        last.as_ref().map(|l| &l.host),
    )
    .map_err(unresolved)?;
    if let Some(last) = last.as_ref().filter(|l| l.occupied) {
        if !same_place(&last.host, host) {
            return Err(ReconcileError::terminal(
                "HostChanged",
                format!(
                    "its QEMU or disks are on {}, and its spec now says {}: converge does not move VMs; set `host` back, or remove the VM from the YAML (its onDelete applies there) and declare it again",
                    place_name(&last.host),
                    place_name(host)
                ),
            ));
        }
    }
    let dir: PathBuf = host.vm_dir(&ctx.vm_root, key.name.as_str());
    let root = &snapshot.root;
    let stop_grace = spec
        .stop_timeout
        .as_ref()
        .map_or(ctx.config.vm_stop_grace, |t| t.value.get());

    let facts = ctx
        .driver
        .vm_observe(host, &dir, &spec.disks)
        .await
        .map_err(|e| driver_error("Unreachable", &e))?;
    let facts_json = facts_document(&facts, host);
    ctx.store
        .put_facts(
            key,
            &FactsRecord {
                observed_ms: facts.observed_ms,
                facts: facts_json,
            },
        )
        .map_err(store_error)?;
    let mut status = ctx
        .store
        .status(key)
        .map_err(store_error)?
        .unwrap_or_default();
    let launch = ctx
        .driver
        .vm_launch_identity(key.name.as_str(), spec, &dir, root);
    let wants_running = spec.state == VmPowerState::Running;

    // A VM that converge started and that is gone now is drift.
    let was_running = status.last_applied.is_some()
        && status
            .condition(ConditionKind::Ready)
            .is_some_and(|c| c.status && c.reason == "Running");
    if wants_running && was_running && !facts.running {
        tracing::warn!(
            target: DRIFT_TARGET,
            object = %key,
            field = "running",
            applied = "true",
            observed = "false",
            action = "restart",
            "drift detected"
        );
        if let Err(e) = ctx.store.append_event(
            key,
            Severity::Warning,
            "DriftDetected",
            "running: applied true, observed false; action: restart",
        ) {
            tracing::error!(error = %e, "failed to record event");
        }
    }

    let mut steps: Vec<StepRecord> = Vec::new();
    let mut plan: Vec<&'static str> = Vec::new();
    let missing: Vec<_> = spec
        .disks
        .iter()
        .filter(|d| {
            !facts
                .disks
                .iter()
                .any(|f| f.name == d.name.value.as_str() && f.exists)
        })
        .collect();
    let grow: Vec<_> = spec
        .disks
        .iter()
        .filter(|d| {
            facts.disks.iter().any(|f| {
                f.name == d.name.value.as_str()
                    && f.virtual_size.is_some_and(|s| s < d.size.value.bytes())
            })
        })
        .collect();
    let restart = wants_running
        && facts.running
        && facts.started_spec_hash.as_deref() != Some(launch.as_str());
    if !missing.is_empty() {
        plan.push("create disks");
    }
    if !grow.is_empty() {
        plan.push("grow disks");
    }
    if restart {
        plan.push("restart");
    }
    if wants_running && !facts.running {
        plan.push("start");
    }
    if !wants_running && facts.running {
        plan.push("stop");
    }

    if plan.is_empty() {
        let now = now_ms();
        let (reason, message) = if wants_running {
            (
                "Running",
                format!("running as pid {}", facts.pid.unwrap_or(0)),
            )
        } else {
            ("Stopped", "stopped, as its spec says".to_owned())
        };
        status.set_condition(ConditionKind::Ready, true, reason, message, now);
        status.set_condition(ConditionKind::Reconciling, false, "", "", now);
        status.set_condition(ConditionKind::Stalled, false, "", "", now);
        status.observed_spec_hash = Some(object.spec_hash.clone());
        status.failures = 0;
        ctx.store.put_status(key, &status).map_err(store_error)?;
        if host.is_local() {
            watch_exit(ctx, key, facts.pid);
        }
        return Ok(Action::Requeue(jittered(ctx.config.vm_resync)));
    }

    let attempt_id = ctx
        .store
        .begin_attempt(key, &object.spec_hash, Some(&snapshot.revision.short()))
        .map_err(store_error)?;
    let started_ms = now_ms();
    let result: Result<Option<u32>, ReconcileError> = async {
        for disk in &missing {
            let started = Instant::now();
            let backing = disk
                .backing_image
                .as_ref()
                .and_then(|b| b.value.resolve(root));
            ctx.driver
                .vm_create_disk(host, &dir, disk, backing.as_deref())
                .await
                .map_err(|e| {
                    steps.push(step(
                        &format!("create disk {}", disk.name.value),
                        started,
                        false,
                        error_chain(&e),
                    ));
                    driver_error("DiskFailed", &e)
                })?;
            steps.push(step(
                &format!("create disk {}", disk.name.value),
                started,
                true,
                format!("{}", disk.size.value),
            ));
        }
        for disk in &grow {
            let started = Instant::now();
            let growth = ctx
                .driver
                .vm_grow_disk(
                    host,
                    &dir,
                    disk.name.value.as_str(),
                    disk.size.value,
                    facts.running && !restart,
                )
                .await
                .map_err(|e| {
                    steps.push(step(
                        &format!("grow disk {}", disk.name.value),
                        started,
                        false,
                        error_chain(&e),
                    ));
                    driver_error("DiskFailed", &e)
                })?;
            steps.push(step(
                &format!("grow disk {}", disk.name.value),
                started,
                true,
                format!(
                    "{} -> {} bytes{}",
                    growth.from,
                    growth.to,
                    if growth.online { " (online)" } else { "" }
                ),
            ));
        }
        if restart || (!wants_running && facts.running) {
            let started = Instant::now();
            let outcome = ctx
                .driver
                .vm_stop(host, &dir, stop_grace)
                .await
                .map_err(|e| {
                    steps.push(step("stop", started, false, error_chain(&e)));
                    driver_error("StopFailed", &e)
                })?;
            let why = if restart {
                " (launch settings changed: restart)"
            } else {
                ""
            };
            steps.push(step("stop", started, true, format!("{outcome:?}{why}")));
        }
        if wants_running && (restart || !facts.running) {
            let started = Instant::now();
            let up = ctx
                .driver
                .vm_start(
                    host,
                    &dir,
                    key.name.as_str(),
                    spec,
                    &launch,
                    root,
                    ctx.config.vm_start_timeout,
                )
                .await
                .map_err(|e| {
                    steps.push(step("start", started, false, error_chain(&e)));
                    driver_error("StartFailed", &e)
                })?;
            steps.push(step(
                "start",
                started,
                true,
                format!(
                    "pid {}, {}, QMP ready after {} ms",
                    up.pid,
                    up.status,
                    up.ready_after.as_millis()
                ),
            ));
            return Ok(Some(up.pid));
        }
        Ok(None)
    }
    .await;

    // What the steps changed (a start, a stop, a new disk) shows in the
    // facts now, not only at the next resync.
    if !steps.is_empty() {
        if let Ok(after) = ctx.driver.vm_observe(host, &dir, &spec.disks).await {
            let record = FactsRecord {
                observed_ms: after.observed_ms,
                facts: facts_document(&after, host),
            };
            if let Err(e) = ctx.store.put_facts(key, &record) {
                tracing::warn!(object = %key, error = %e, "recording the VM's facts failed");
            }
        }
    }

    let now = now_ms();
    let mut record = AttemptRecord {
        id: attempt_id,
        key: key.clone(),
        started_ms,
        finished_ms: now,
        revision: Some(snapshot.revision.short()),
        spec_hash: object.spec_hash.clone(),
        generation: None,
        artifact: Some(launch.clone()),
        steps,
        result: AttemptResult::Succeeded,
    };
    status.in_progress = None;
    status.observed_spec_hash = Some(object.spec_hash.clone());
    match &result {
        Ok(pid) => {
            let launches =
                status.last_applied.as_ref().map_or(0, |a| a.generation) + u64::from(pid.is_some());
            status.last_applied = Some(Applied {
                generation: launches,
                artifact: launch.clone(),
                revision: Some(snapshot.revision.short()),
                spec_hash: object.spec_hash.clone(),
                roles_hash: None,
                applied_ms: now,
            });
            record.generation = Some(launches);
            let (reason, message) = if wants_running {
                (
                    "Running",
                    format!("running as pid {}", pid.or(facts.pid).unwrap_or(0)),
                )
            } else {
                ("Stopped", "stopped, as its spec says".to_owned())
            };
            status.set_condition(ConditionKind::Ready, true, reason, message, now);
            status.set_condition(ConditionKind::Reconciling, false, "", "", now);
            status.set_condition(ConditionKind::Stalled, false, "", "", now);
            status.failures = 0;
            let document = spec_document(&key.name, spec);
            ctx.store
                .put_spec(
                    key,
                    &SpecRecord {
                        spec_hash: object.spec_hash.clone(),
                        revision: Some(snapshot.revision.short()),
                        spec: document,
                        seen_ms: now,
                    },
                )
                .map_err(store_error)?;
        }
        Err(e) => {
            record.result = AttemptResult::Failed {
                reason: e.reason.clone(),
                message: e.message.clone(),
            };
            status.set_condition(ConditionKind::Ready, false, &e.reason, &e.message, now);
        }
    }
    ctx.store
        .finish_attempt(&record, &status)
        .map_err(store_error)?;
    let pid = result?;
    tracing::info!(steps = %plan.join(", "), "VM converged");
    // A VM on a hypervisor Machine is checked at each resync instead.
    if host.is_local() {
        watch_exit(ctx, key, pid.or(facts.pid).filter(|_| wants_running));
    }
    Ok(Action::Requeue(jittered(ctx.config.vm_resync)))
}

/// Watches a running VM's process once; its exit wakes the daemon.
fn watch_exit<D: Drivers>(ctx: &Context<D>, key: &ObjectKey, pid: Option<u32>) {
    let (Some(pid), Some(wakeups)) = (pid, ctx.wakeups.clone()) else {
        return;
    };
    let Ok(mut watched) = ctx.watched.lock() else {
        return;
    };
    if watched.get(key) == Some(&pid) {
        return;
    }
    watched.insert(key.clone(), pid);
    let key = key.clone();
    let exited = ctx.driver.vm_watch_exit(pid);
    tokio::spawn(async move {
        exited.await;
        tracing::info!(object = %key, pid, "VM process exited");
        let _ = wakeups.send(key);
    });
}

/// Why a VM's hypervisor could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Unresolved {
    #[error("read the hypervisor's last spec")]
    Store(#[from] crate::store::StoreError),
    #[error(
        "hypervisor machine {name} is neither declared nor ever converged, so there is no target to reach it at; declare it again"
    )]
    Unknown { name: Name },
}

/// Where converge last observed a VM, from its stored facts.
#[derive(Debug, Clone)]
pub struct LastPlace {
    /// Its host and, for a hypervisor Machine, the target it was reached at.
    pub host: Hypervisor,
    /// Whether its QEMU ran or any of its disks existed there.
    pub occupied: bool,
}

impl LastPlace {
    /// The host as a spec names it.
    pub fn vm_host(&self) -> VmHost {
        match &self.host {
            Hypervisor::Local => VmHost::Local,
            Hypervisor::Machine { name, .. } => VmHost::Machine(name.clone()),
        }
    }
}

/// Where converge last observed VM `key`; `None` before its first
/// observation. Facts written before hypervisors existed name no host:
/// those VMs were local.
pub fn last_place(store: &Store, key: &ObjectKey) -> Result<Option<LastPlace>, Unresolved> {
    let Some(record) = store.facts(key)? else {
        return Ok(None);
    };
    let facts = &record.facts;
    let occupied = facts.get("running").and_then(Value::as_bool) == Some(true)
        || facts
            .get("disks")
            .and_then(Value::as_array)
            .is_some_and(|disks| {
                disks
                    .iter()
                    .any(|d| d.get("exists").and_then(Value::as_bool) == Some(true))
            });
    let host = match facts.get("host").and_then(Value::as_str) {
        Some("local") | None => Hypervisor::Local,
        Some(name) => {
            let name = Name::new(name).ok();
            let target = facts
                .get("hostTarget")
                .and_then(|t| serde_json::from_value::<TargetSpec>(t.clone()).ok());
            match (name, target) {
                (Some(name), Some(target)) => Hypervisor::Machine {
                    name,
                    target: Box::new(target),
                },
                _ => return Ok(None),
            }
        }
    };
    Ok(Some(LastPlace { host, occupied }))
}

/// A VM's facts as stored: what was observed, and where.
fn facts_document(facts: &crate::driver::qemu::VmFacts, host: &Hypervisor) -> Value {
    let mut document = serde_json::to_value(facts).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut document {
        match host {
            Hypervisor::Local => {
                map.insert("host".into(), "local".into());
            }
            Hypervisor::Machine { name, target } => {
                map.insert("host".into(), name.as_str().into());
                map.insert(
                    "hostTarget".into(),
                    serde_json::to_value(target).unwrap_or(Value::Null),
                );
            }
        }
    }
    document
}

/// Whether two hypervisors are the same place for a VM: the same host, and
/// for a Machine the same address, port and state directory (a new host key
/// or user does not move anything).
fn same_place(a: &Hypervisor, b: &Hypervisor) -> bool {
    match (a, b) {
        (Hypervisor::Local, Hypervisor::Local) => true,
        (
            Hypervisor::Machine { name, target },
            Hypervisor::Machine {
                name: other,
                target: other_target,
            },
        ) => {
            name == other
                && target.is_local() == other_target.is_local()
                && target.host.as_ref().map(|h| &h.value)
                    == other_target.host.as_ref().map(|h| &h.value)
                && target.port.as_ref().map(|p| p.value.get())
                    == other_target.port.as_ref().map(|p| p.value.get())
                && target.state_dir() == other_target.state_dir()
        }
        _ => false,
    }
}

/// Where a VM with `host` runs. A hypervisor Machine's target comes from
/// the desired state in force, or else (the Machine was removed with its
/// VMs, or the caller has no desired state) from where the VM was last
/// observed (`last`), or else from the spec the Machine last converged with.
pub fn resolve_hypervisor(
    desired: Option<&crate::spec::DesiredState>,
    store: &Store,
    host: &VmHost,
    last: Option<&Hypervisor>,
) -> Result<Hypervisor, Unresolved> {
    let VmHost::Machine(name) = host else {
        return Ok(Hypervisor::Local);
    };
    if let Some(machine) = desired.and_then(|d| d.machines.get(name)) {
        return Ok(Hypervisor::Machine {
            name: name.clone(),
            target: Box::new(machine.spec.target.clone()),
        });
    }
    if let Some(Hypervisor::Machine {
        name: last_name,
        target,
    }) = last
    {
        if last_name == name {
            return Ok(Hypervisor::Machine {
                name: name.clone(),
                target: target.clone(),
            });
        }
    }
    let record = store.spec(&ObjectKey::machine(name.clone()))?;
    let target = record
        .as_ref()
        .and_then(|r| r.spec.pointer("/spec/target"))
        .and_then(|t| serde_json::from_value::<TargetSpec>(t.clone()).ok());
    match target {
        Some(target) => Ok(Hypervisor::Machine {
            name: name.clone(),
            target: Box::new(target),
        }),
        None => Err(Unresolved::Unknown { name: name.clone() }),
    }
}

/// The host a VM's recorded spec names (`local` when it names none).
pub fn recorded_host(record: Option<&SpecRecord>) -> VmHost {
    match record
        .and_then(|r| r.spec.pointer("/spec/host"))
        .and_then(Value::as_str)
    {
        Some("local") | None => VmHost::Local,
        Some(other) => Name::new(other).map_or(VmHost::Local, VmHost::Machine),
    }
}

/// A hypervisor as messages name it.
fn place_name(host: &Hypervisor) -> String {
    match host {
        Hypervisor::Local => "this host (`local`)".to_owned(),
        Hypervisor::Machine { name, target } => format!(
            "hypervisor machine {name} ({}:{})",
            target.host.as_ref().map_or("local", |h| h.value.as_str()),
            target.state_dir()
        ),
    }
}

fn unresolved(e: Unresolved) -> ReconcileError {
    match e {
        Unresolved::Store(e) => store_error(e),
        e @ Unresolved::Unknown { .. } => {
            ReconcileError::terminal("HypervisorUnknown", e.to_string())
        }
    }
}

/// [`resolve_hypervisor`] for a reconcile of `key`, whose spec names `host`.
pub fn hypervisor<D>(
    ctx: &Context<D>,
    key: &ObjectKey,
    host: &VmHost,
) -> Result<Hypervisor, ReconcileError> {
    let last = last_place(&ctx.store, key).map_err(unresolved)?;
    resolve_hypervisor(
        Some(&ctx.snapshot().desired),
        &ctx.store,
        host,
        last.as_ref().map(|l| &l.host),
    )
    .map_err(unresolved)
}

/// A VM removed from the YAML: stop it, delete its disks only if its last
/// applied spec said `onDelete: delete`, then forget it.
async fn remove<D: Drivers>(ctx: &Context<D>, key: &ObjectKey) -> Result<Action, ReconcileError> {
    let record = ctx.store.spec(key).map_err(store_error)?;
    let on_delete = match record
        .as_ref()
        .and_then(|r| r.spec.pointer("/spec/onDelete"))
        .and_then(Value::as_str)
    {
        Some("delete") => OnDelete::Delete,
        _ => OnDelete::KeepDisks,
    };
    // Where it was last seen; its recorded spec when it was never observed.
    let last = last_place(&ctx.store, key).map_err(unresolved)?;
    let named = last
        .as_ref()
        .map_or_else(|| recorded_host(record.as_ref()), LastPlace::vm_host);
    let host = resolve_hypervisor(
        Some(&ctx.snapshot().desired),
        &ctx.store,
        &named,
        last.as_ref().map(|l| &l.host),
    )
    .map_err(unresolved)?;
    let stop_grace = record
        .as_ref()
        .and_then(|r| r.spec.pointer("/spec/stopTimeout"))
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<crate::spec::HumanDuration>().ok())
        .map_or(ctx.config.vm_stop_grace, crate::spec::HumanDuration::get);
    let dir = host.vm_dir(&ctx.vm_root, key.name.as_str());
    let outcome = ctx
        .driver
        .vm_delete(&host, &dir, on_delete, stop_grace)
        .await
        .map_err(|e| driver_error("DeleteFailed", &e))?;
    let disks = if on_delete == OnDelete::Delete {
        "disks deleted"
    } else {
        "disks kept"
    };
    tracing::info!(object = %key, stop = ?outcome, "removed from the desired state: stopped, {disks}; forgotten");
    if let Ok(mut watched) = ctx.watched.lock() {
        watched.remove(key);
    }
    ctx.store.forget(key).map_err(store_error)?;
    Ok(Action::AwaitChange)
}
