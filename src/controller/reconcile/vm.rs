//! Reconcile of one VirtualMachine: resolve where it lives, observe its
//! process and disks, plan with `plan::diff` (which decides every disk step
//! and whether it starts, stops or restarts), execute exactly those steps,
//! and record the attempt.
//!
//! A VM that died while its spec says running is drift: one WARN line, then
//! the plan starts it again. A VM removed from the YAML is planned like any
//! object (stop, delete per `onDelete`, forget) and those steps run before
//! it is forgotten. A running local VM's exit is watched, so the daemon
//! notices it at once rather than at the next resync.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::attempt::Attempt;
use super::record::{jittered, report_drift, set_ready};
use crate::controller::applier::Action;
use crate::controller::context::Context;
use crate::controller::error::ReconcileError;
use crate::controller::placement::{
    LastPlace, facts_document, last_place, place_name, recorded_host, resolve_hypervisor,
    same_place,
};
use crate::driver::capability::{DriverError, Drivers, Hypervisor};
use crate::driver::qemu::VmFacts;
use crate::plan::{self, Change, DesiredKind, Step, VmDesired, VmObserved};
use crate::spec::{DriftPolicy, Object, ObjectKey, OnDelete, VmPowerState, VmSpec};
use crate::store::records::{
    Applied, AttemptResult, ConditionKind, FactsRecord, Reason, SpecRecord, StatusRecord, now_ms,
};
use crate::telemetry::error_chain;

/// The document recorded as a VM's applied spec, and compared with it by
/// `plan`: both must build it the same way.
pub fn spec_document(name: &crate::spec::Name, spec: &VmSpec) -> Value {
    serde_json::json!({
        "apiVersion": crate::spec::API_VERSION,
        "kind": "VirtualMachine",
        "metadata": {"name": name.as_str()},
        "spec": serde_json::to_value(spec).unwrap_or(Value::Null),
    })
}

/// The desired side of a VM as the plan sees it; `launch` is the identity
/// of what starting it would launch now.
pub fn desired<'a>(
    object: &'a Object<VmSpec>,
    launch: &'a str,
    restart: bool,
) -> plan::Desired<'a> {
    plan::Desired {
        document: spec_document(&object.key.name, &object.spec),
        spec_hash: &object.spec_hash,
        kind: DesiredKind::Vm(VmDesired {
            running: object.spec.state == VmPowerState::Running,
            disks: &object.spec.disks,
            launch,
            restart,
        }),
    }
}

/// What converge last applied to a VM (or, removed from the YAML, what its
/// last spec said about its disks), as the plan sees it.
pub fn applied<'a>(
    status: &'a StatusRecord,
    record: Option<&'a SpecRecord>,
) -> Option<plan::Applied<'a>> {
    status.last_applied.as_ref().map(|a| plan::Applied {
        document: record.map(|r| &r.spec),
        spec_hash: &a.spec_hash,
        roles_hash: None,
        build_input: None,
        generation: None,
        delete_on_removal: deletes_disks(record),
    })
}

/// What was observed of a VM, as the plan sees it.
pub fn observed(facts: &VmFacts) -> plan::Observed {
    plan::Observed::Vm(VmObserved {
        running: facts.running,
        launched: facts.started_spec_hash.clone(),
        disks: facts
            .disks
            .iter()
            .filter(|d| d.exists)
            .map(|d| (d.name.clone(), d.virtual_size))
            .collect(),
    })
}

/// Whether a VM's recorded spec says `onDelete: delete`.
pub(crate) fn deletes_disks(record: Option<&SpecRecord>) -> bool {
    record
        .and_then(|r| r.spec.pointer("/spec/onDelete"))
        .and_then(Value::as_str)
        == Some("delete")
}

fn driver(reason: Reason, what: impl Into<String>) -> impl FnOnce(DriverError) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Driver {
        reason,
        what,
        source: Box::new(source),
    }
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
    let last = last_place(&ctx.store, key)?;
    let host = resolve_hypervisor(
        Some(&snapshot.desired),
        &ctx.store,
        &spec.host.value,
        last.as_ref().map(|l| &l.host),
    )?;
    if let Some(last) = last.as_ref().filter(|l| l.occupied) {
        if !same_place(&last.host, &host) {
            return Err(ReconcileError::HostChanged {
                was: place_name(&last.host),
                now: place_name(&host),
            });
        }
    }
    let dir: PathBuf = host.vm_dir(&ctx.vm_root, key.name.as_str());
    let facts = ctx
        .driver
        .vm_observe(&host, &dir, &spec.disks)
        .await
        .map_err(driver(Reason::Unreachable, "observe the VM"))?;
    put_facts(ctx, key, &facts, &host)?;
    let mut status = ctx.store.status(key)?.unwrap_or_default();
    let launch = ctx
        .driver
        .vm_launch_identity(key.name.as_str(), spec, &dir, &snapshot.root);
    let record = ctx.store.spec(key)?;
    // Asked by `converge vm restart`, and kept while the VM is suspended.
    let suspension = ctx.store.suspension(key)?;
    let restart = suspension.is_none() && ctx.take_restart(key);
    let (change, drift) = plan::diff(
        key,
        Some(&desired(object, &launch, restart)),
        applied(&status, record.as_ref()).as_ref(),
        Some(&observed(&facts)),
    );
    report_drift(ctx, key, &mut status, &drift, DriftPolicy::Correct);
    let wants_running = spec.state == VmPowerState::Running;

    let Some(change) = change else {
        let (reason, message) = ready_reason(wants_running, facts.pid);
        set_ready(&mut status, reason, message, &object.spec_hash);
        ctx.store.put_status(key, &status)?;
        if host.is_local() {
            watch_exit(ctx, key, facts.pid);
        }
        return Ok(Action::Requeue(jittered(ctx.config.vm_resync)));
    };
    if let Some(suspension) = suspension {
        super::record::suspended(key, &mut status, &suspension, &change);
        ctx.store.put_status(key, &status)?;
        if host.is_local() {
            watch_exit(ctx, key, facts.pid);
        }
        return Ok(Action::Requeue(jittered(ctx.config.vm_resync)));
    }

    let mut attempt = Attempt::begin(ctx, key, &object.spec_hash, snapshot.revision.short())?;
    let place = Place {
        host: &host,
        dir: &dir,
        stop_grace: stop_grace(spec.stop_timeout.as_ref().map(|t| t.value), ctx),
    };
    let mut run = Run {
        ctx,
        place: &place,
        object: Some(object),
        root: &snapshot.root,
        launch: &launch,
        online: facts.running && !change.steps.contains(&Step::RestartVm),
        pid: None,
    };
    let result = run.steps(&change, &mut attempt).await;
    let pid = run.pid;

    // What the steps changed (a start, a stop, a new disk) shows in the
    // facts now, not only at the next resync.
    if !change.steps.is_empty() {
        if let Ok(after) = ctx.driver.vm_observe(&host, &dir, &spec.disks).await {
            if let Err(e) = put_facts(ctx, key, &after, &host) {
                tracing::warn!(object = %key, error = %error_chain(&e), "recording the VM's facts failed");
            }
        }
    }

    let now = now_ms();
    status.observed_spec_hash = Some(object.spec_hash.clone());
    let launches =
        status.last_applied.as_ref().map_or(0, |a| a.generation) + u64::from(pid.is_some());
    match result {
        Ok(()) => {
            status.last_applied = Some(Applied {
                generation: launches,
                artifact: launch.clone(),
                revision: Some(snapshot.revision.short()),
                spec_hash: object.spec_hash.clone(),
                roles_hash: None,
                applied_ms: now,
            });
            let (reason, message) = ready_reason(wants_running, pid.or(facts.pid));
            set_ready(&mut status, reason, message, &object.spec_hash);
            ctx.store.put_spec(
                key,
                &SpecRecord {
                    spec_hash: object.spec_hash.clone(),
                    revision: Some(snapshot.revision.short()),
                    spec: spec_document(&key.name, spec),
                    seen_ms: now,
                },
            )?;
            attempt.finish(
                AttemptResult::Succeeded,
                Some(launches),
                Some(launch),
                &status,
            )?;
            let steps: Vec<&str> = change.steps.iter().map(Step::name).collect();
            tracing::info!(steps = %steps.join(", "), "VM converged");
            // A VM on a hypervisor Machine is checked at each resync instead.
            if host.is_local() {
                watch_exit(ctx, key, pid.or(facts.pid).filter(|_| wants_running));
            }
            Ok(Action::Requeue(jittered(ctx.config.vm_resync)))
        }
        Err(e) => {
            status.set_condition(ConditionKind::Ready, false, e.reason(), e.message(), now);
            attempt.finish(
                AttemptResult::Failed {
                    reason: e.reason(),
                    message: e.message(),
                },
                None,
                Some(launch),
                &status,
            )?;
            Err(e)
        }
    }
}

fn ready_reason(wants_running: bool, pid: Option<u32>) -> (Reason, String) {
    if wants_running {
        (
            Reason::Running,
            format!("running as pid {}", pid.unwrap_or(0)),
        )
    } else {
        (Reason::Stopped, "stopped, as its spec says".to_owned())
    }
}

fn stop_grace<D>(stop_timeout: Option<crate::spec::HumanDuration>, ctx: &Context<D>) -> Duration {
    stop_timeout.map_or(ctx.config.vm_stop_grace, crate::spec::HumanDuration::get)
}

fn put_facts<D>(
    ctx: &Context<D>,
    key: &ObjectKey,
    facts: &VmFacts,
    host: &Hypervisor,
) -> Result<(), ReconcileError> {
    ctx.store.put_facts(
        key,
        &FactsRecord {
            observed_ms: facts.observed_ms,
            facts: facts_document(facts, host),
        },
    )?;
    Ok(())
}

/// Where a VM's steps act.
struct Place<'a> {
    host: &'a Hypervisor,
    dir: &'a Path,
    /// The ACPI power-off wait before QEMU is quit.
    stop_grace: Duration,
}

/// One VM change's steps as they run.
struct Run<'a, D> {
    ctx: &'a Context<D>,
    place: &'a Place<'a>,
    /// The VM's desired object; `None` when it was removed from the YAML.
    object: Option<&'a Object<VmSpec>>,
    root: &'a Path,
    launch: &'a str,
    /// Disks grow online (QMP) when the VM keeps running through the change.
    online: bool,
    /// The pid of a QEMU this change started.
    pid: Option<u32>,
}

impl<D: Drivers> Run<'_, D> {
    /// Runs every step in order, recording each; a failure skips the rest.
    async fn steps(
        &mut self,
        change: &Change,
        attempt: &mut Attempt<'_, D>,
    ) -> Result<(), ReconcileError> {
        for (i, step) in change.steps.iter().enumerate() {
            let started = Instant::now();
            match self.step(step).await {
                Ok(output) => attempt.ended(step, started, true, output),
                Err(e) => {
                    attempt.ended(step, started, false, e.message());
                    attempt.skipped(
                        &change.steps[i + 1..],
                        &format!("not run: {} failed", step.name()),
                    );
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn spec(&self, step: &Step) -> Result<&VmSpec, ReconcileError> {
        self.object
            .map(|o| &o.spec)
            .ok_or_else(|| ReconcileError::Unsupported {
                what: format!("the step {} on a VM removed from the YAML", step.name()),
            })
    }

    async fn step(&mut self, step: &Step) -> Result<String, ReconcileError> {
        let ctx = self.ctx;
        let Place {
            host,
            dir,
            stop_grace,
        } = *self.place;
        match step {
            Step::CreateDisk { disk, size } => {
                let spec = self.spec(step)?;
                let Some(d) = spec.disks.iter().find(|d| d.name.value.as_str() == disk) else {
                    return Err(ReconcileError::Unsupported {
                        what: format!("creating disk {disk}, which the spec does not name"),
                    });
                };
                let backing = d
                    .backing_image
                    .as_ref()
                    .and_then(|b| b.value.resolve(self.root));
                ctx.driver
                    .vm_create_disk(host, dir, d, backing.as_deref())
                    .await
                    .map_err(driver(Reason::DiskFailed, format!("create disk {disk}")))?;
                Ok(size.clone())
            }
            Step::GrowDisk { disk, .. } => {
                let spec = self.spec(step)?;
                let Some(d) = spec.disks.iter().find(|d| d.name.value.as_str() == disk) else {
                    return Err(ReconcileError::Unsupported {
                        what: format!("growing disk {disk}, which the spec does not name"),
                    });
                };
                let growth = ctx
                    .driver
                    .vm_grow_disk(host, dir, disk, d.size.value, self.online)
                    .await
                    .map_err(driver(Reason::DiskFailed, format!("grow disk {disk}")))?;
                Ok(format!(
                    "{} -> {} bytes{}",
                    growth.from,
                    growth.to,
                    if growth.online { " (online)" } else { "" }
                ))
            }
            Step::StopVm => {
                let outcome = ctx
                    .driver
                    .vm_stop(host, dir, stop_grace)
                    .await
                    .map_err(driver(Reason::StopFailed, "stop"))?;
                Ok(format!("{outcome:?}"))
            }
            Step::StartVm => self.start(step).await,
            Step::RestartVm => {
                let outcome = ctx
                    .driver
                    .vm_stop(host, dir, stop_grace)
                    .await
                    .map_err(driver(Reason::StopFailed, "stop"))?;
                let started = self.start(step).await?;
                Ok(format!("stopped ({outcome:?}); {started}"))
            }
            Step::DeleteVm { disks } => {
                let on_delete = if *disks {
                    OnDelete::Delete
                } else {
                    OnDelete::KeepDisks
                };
                let outcome = ctx
                    .driver
                    .vm_delete(host, dir, on_delete, stop_grace)
                    .await
                    .map_err(driver(Reason::DeleteFailed, "delete"))?;
                Ok(format!("{outcome:?}"))
            }
            other => Err(ReconcileError::Unsupported {
                what: format!("the step {} on a VM", other.name()),
            }),
        }
    }

    async fn start(&mut self, step: &Step) -> Result<String, ReconcileError> {
        let spec = self.spec(step)?;
        let Some(object) = self.object else {
            return Err(ReconcileError::Unsupported {
                what: "starting a VM removed from the YAML".to_owned(),
            });
        };
        let up = self
            .ctx
            .driver
            .vm_start(
                self.place.host,
                self.place.dir,
                object.key.name.as_str(),
                spec,
                self.launch,
                self.root,
                self.ctx.config.vm_start_timeout,
            )
            .await
            .map_err(driver(Reason::StartFailed, "start"))?;
        self.pid = Some(up.pid);
        Ok(format!(
            "pid {}, {}, QMP ready after {} ms",
            up.pid,
            up.status,
            up.ready_after.as_millis()
        ))
    }
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

/// A VM removed from the YAML: the plan's removal steps (stop, delete per
/// its last spec's `onDelete`, forget) run where it was last seen. Its
/// records, history included, go with the `forget` step.
async fn remove<D: Drivers>(ctx: &Context<D>, key: &ObjectKey) -> Result<Action, ReconcileError> {
    if ctx.store.suspension(key)?.is_some() {
        tracing::info!(object = %key, "removed from the YAML but suspended: it is removed once resumed (`converge resume {key}`)");
        return Ok(Action::AwaitChange);
    }
    let record = ctx.store.spec(key)?;
    let status = ctx.store.status(key)?.unwrap_or_default();
    let applied = applied(&status, record.as_ref()).unwrap_or(plan::Applied {
        document: record.as_ref().map(|r| &r.spec),
        spec_hash: "",
        roles_hash: None,
        build_input: None,
        generation: None,
        delete_on_removal: deletes_disks(record.as_ref()),
    });
    let (Some(change), _) = plan::diff(key, None, Some(&applied), None) else {
        return Ok(Action::AwaitChange);
    };
    // Where it was last seen; its recorded spec when it was never observed.
    let last = last_place(&ctx.store, key)?;
    let named = last
        .as_ref()
        .map_or_else(|| recorded_host(record.as_ref()), LastPlace::vm_host);
    let host = resolve_hypervisor(
        Some(&ctx.snapshot().desired),
        &ctx.store,
        &named,
        last.as_ref().map(|l| &l.host),
    )?;
    let recorded_grace = record
        .as_ref()
        .and_then(|r| r.spec.pointer("/spec/stopTimeout"))
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<crate::spec::HumanDuration>().ok());
    let dir = host.vm_dir(&ctx.vm_root, key.name.as_str());
    let place = Place {
        host: &host,
        dir: &dir,
        stop_grace: stop_grace(recorded_grace, ctx),
    };
    let mut run = Run {
        ctx,
        place: &place,
        object: None,
        root: Path::new("."),
        launch: "",
        online: false,
        pid: None,
    };
    for step in &change.steps {
        if *step == Step::Forget {
            if let Ok(mut watched) = ctx.watched.lock() {
                watched.remove(key);
            }
            ctx.store.forget(key)?;
            continue;
        }
        let output = run.step(step).await?;
        tracing::info!(object = %key, step = step.name(), %output, "removed from the desired state");
    }
    Ok(Action::AwaitChange)
}
