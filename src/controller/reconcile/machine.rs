//! Reconcile of one Machine: wait for `after` dependencies, observe, plan,
//! then build, install, switch, activate, health-check, and roll back on
//! failure; record the attempt.
//!
//! Every step has a timeout. A failed activation or health check re-activates
//! the generation that was current before (with `rollback: auto`), and the
//! attempt is recorded as rolled back: it is a failure, never a success.
//! Drift (the machine's `current` is not what converge applied) gets one WARN
//! line when it is first seen, and is corrected or only reported per policy.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ReconcileError, jittered};
use crate::controller::applier::Action;
use crate::controller::context::{Context, Snapshot};
use crate::driver::build::{Artifact, BuildRequest, cache_key};
use crate::driver::capability::{DriverError, Drivers};
use crate::driver::protocol::{ConfirmOutcome, Confirmation, GenerationId, MachineFacts};
use crate::plan::{self, ChangeKind};
use crate::spec::{DriftPolicy, MachineSpec, Object, ObjectKey, RollbackPolicy};
use crate::store::records::{
    Applied, AttemptRecord, AttemptResult, ConditionKind, FactsRecord, SpecRecord, StatusRecord,
    StepRecord, now_ms,
};
use crate::telemetry::DRIFT_TARGET;

/// Reason set while a machine waits for the machines of an earlier role.
pub const DEPENDENCY_NOT_READY: &str = "DependencyNotReady";

fn drift_policy_name(p: DriftPolicy) -> &'static str {
    match p {
        DriftPolicy::Correct => "correct",
        DriftPolicy::Warn => "warn",
        DriftPolicy::Ignore => "ignore",
    }
}

/// The document as canonical JSON, for diffs and records.
fn document_json(object: &Object<MachineSpec>) -> Value {
    serde_json::json!({
        "apiVersion": crate::spec::API_VERSION,
        "kind": "Machine",
        "metadata": {
            "name": object.key.name.as_str(),
            "tags": object.tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        },
        "spec": serde_json::to_value(&object.spec).unwrap_or(Value::Null),
    })
}

fn store_error(e: impl std::fmt::Display) -> ReconcileError {
    ReconcileError::transient("StoreFailed", e.to_string())
}

fn driver_error(reason: &str, e: &DriverError) -> ReconcileError {
    let message = error_chain(e);
    if e.is_transient() {
        ReconcileError::transient(reason, message)
    } else {
        ReconcileError::terminal(reason, message)
    }
}

/// `e` and its sources, joined, so a message says what failed and why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// Records of one attempt's steps as they happen.
struct Steps {
    records: Vec<StepRecord>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            records: Vec::new(),
        }
    }

    fn push(&mut self, name: &str, started: Instant, ok: bool, output: impl Into<String>) {
        self.records.push(StepRecord {
            name: name.to_owned(),
            ok,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            output: output.into(),
        });
    }
}

/// The machine-specific view the plan needs; `converge plan` uses the same,
/// so the preview and the reconcile cannot disagree.
pub(crate) fn plan_inputs<'a>(
    object: &'a Object<MachineSpec>,
    roles_hash: &'a str,
    build_input: &'a str,
) -> plan::Desired<'a> {
    plan::Desired {
        document: document_json(object),
        spec_hash: &object.spec_hash,
        roles_hash: Some(roles_hash),
        build_input: Some(build_input),
        activation_mode: Some(object.spec.activation.mode.as_arg()),
        health_checks: object.spec.activation.health_checks.len(),
        vm_running: None,
        drift_policy: drift_policy_name(object.spec.drift),
        delete_on_removal: false,
    }
}

/// Observes a machine that lives in VM `vm_name`, which is Ready (its QEMU
/// runs): while the guest boots its SSH does not answer yet, so transient
/// failures are retried every `guest_poll` until `guest_boot_timeout` after
/// the VM's process started (its observed uptime, measured on its host;
/// its last applied change when the facts predate it). Past that, the
/// failure is an ordinary transient error (backoff). The wait runs on
/// tokio's clock.
async fn observe_guest<D: Drivers>(
    ctx: &Context<D>,
    key: &ObjectKey,
    spec: &MachineSpec,
    vm_name: &crate::spec::Name,
) -> Result<MachineFacts, ReconcileError> {
    let vm_key = ObjectKey::vm(vm_name.clone());
    let applied_ms = ctx
        .store
        .status(&vm_key)
        .ok()
        .flatten()
        .and_then(|s| s.last_applied.map(|a| a.applied_ms));
    // How long the VM's process has run: its observed uptime plus the time
    // since that observation, unless the VM was (re)started after it.
    let facts = ctx.store.facts(&vm_key).ok().flatten();
    let observed_age = facts.as_ref().and_then(|f| {
        let uptime = f
            .facts
            .get("uptimeMs")
            .and_then(serde_json::Value::as_u64)?;
        let fresh = applied_ms.is_none_or(|applied| f.observed_ms >= applied);
        fresh.then(|| uptime.saturating_add(now_ms().saturating_sub(f.observed_ms)))
    });
    let age_ms = observed_age
        .or_else(|| applied_ms.map(|applied| now_ms().saturating_sub(applied)))
        .unwrap_or(u64::MAX);
    let deadline = tokio::time::Instant::now()
        + ctx
            .config
            .guest_boot_timeout
            .saturating_sub(Duration::from_millis(age_ms));
    let mut tries = 0u32;
    loop {
        tries += 1;
        match ctx
            .driver
            .observe(&spec.target, ctx.config.observe_timeout)
            .await
        {
            Ok(facts) => {
                if tries > 1 {
                    tracing::info!(object = %key, vm = %vm_name, tries, "the guest answers");
                }
                return Ok(facts);
            }
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(object = %key, vm = %vm_name, error = %error_chain(&e), "the guest does not answer yet");
                tokio::time::sleep(ctx.config.guest_poll).await;
            }
            Err(e) => {
                let mut failure = driver_error("Unreachable", &e);
                if e.is_transient() {
                    failure.message = format!(
                        "{} (it lives in vm/{vm_name}; its guest did not answer within {:?} of starting)",
                        failure.message, ctx.config.guest_boot_timeout
                    );
                }
                return Err(failure);
            }
        }
    }
}

/// Reconciles `machine/NAME`.
pub async fn reconcile<D: Drivers>(
    ctx: &Context<D>,
    key: &ObjectKey,
) -> Result<Action, ReconcileError> {
    let snapshot = ctx.snapshot();
    let Some(object) = snapshot.desired.machines.get(&key.name) else {
        // Removed from the YAML while queued: the loop forgets it.
        return Ok(Action::AwaitChange);
    };
    let Some(roles) = snapshot.desired.roles.get(&key.name) else {
        return Err(ReconcileError::terminal(
            "RolesMissing",
            "machine has no resolved roles document",
        ));
    };
    let mut status = ctx
        .store
        .status(key)
        .map_err(store_error)?
        .unwrap_or_default();

    // A machine living in a VM (its `machine:`) needs that VM running.
    let host_vm = snapshot.desired.vms.iter().find(|(_, vm)| {
        vm.spec
            .machine
            .as_ref()
            .is_some_and(|m| m.value == key.name)
    });
    if let Some((vm_name, vm)) = host_vm {
        if vm.spec.state == crate::spec::VmPowerState::Stopped {
            return Err(ReconcileError::terminal(
                "HostVmStopped",
                format!(
                    "it lives in vm/{vm_name}, whose spec says `state: stopped`; set it running to deploy this machine"
                ),
            ));
        }
    }
    let is_ready = |dep_key: &ObjectKey| {
        ctx.store
            .status(dep_key)
            .ok()
            .flatten()
            .is_some_and(|s| s.is_ready())
    };
    // Machines of an earlier role (`after`), and the VM it lives in, must be Ready first.
    let mut waiting: Vec<String> = roles
        .after
        .iter()
        .filter(|dep| !is_ready(&ObjectKey::machine((*dep).clone())))
        .map(|dep| format!("machine/{dep} (role `after`)"))
        .collect();
    if let Some((vm_name, _)) = host_vm {
        if !is_ready(&ObjectKey::vm(vm_name.clone())) {
            waiting.push(format!("vm/{vm_name} (it lives there)"));
        }
    }
    if !waiting.is_empty() {
        let now = now_ms();
        let message = format!("waiting for {} to be Ready", waiting.join(", "));
        status.set_condition(
            ConditionKind::Reconciling,
            true,
            DEPENDENCY_NOT_READY,
            &message,
            now,
        );
        if !status.is_ready() {
            status.set_condition(
                ConditionKind::Ready,
                false,
                DEPENDENCY_NOT_READY,
                &message,
                now,
            );
        }
        ctx.store.put_status(key, &status).map_err(store_error)?;
        tracing::debug!(object = %key, %message, "waiting for dependencies");
        return Ok(Action::Requeue(ctx.config.dependency_poll));
    }

    let spec = &object.spec;
    let facts = match host_vm {
        Some((vm_name, _)) => observe_guest(ctx, key, spec, vm_name).await?,
        None => ctx
            .driver
            .observe(&spec.target, ctx.config.observe_timeout)
            .await
            .map_err(|e| driver_error("Unreachable", &e))?,
    };
    let facts_json = serde_json::to_value(&facts).unwrap_or(Value::Null);
    ctx.store
        .put_facts(
            key,
            &FactsRecord {
                observed_ms: facts.observed_ms,
                facts: facts_json,
            },
        )
        .map_err(store_error)?;

    let build_input = snapshot.revision.build_input.as_str();
    let desired_view = plan_inputs(object, &roles.hash, build_input);
    let applied_record = ctx.store.spec(key).map_err(store_error)?;
    // An unchanged artifact still needs activating when how it is activated
    // changed (mode, health checks): the plan says so, execution must agree.
    let activation_changed = applied_record.as_ref().is_some_and(|r| {
        r.spec.pointer("/spec/activation")
            != serde_json::to_value(&object.spec.activation).ok().as_ref()
    });
    let applied_view = status.last_applied.as_ref().map(|a| plan::Applied {
        document: applied_record.as_ref().map(|r| &r.spec),
        spec_hash: &a.spec_hash,
        roles_hash: a.roles_hash.as_deref(),
        build_input: applied_record.as_ref().and_then(|r| r.revision.as_deref()),
        generation: Some(generation_name(a)),
        delete_on_removal: false,
    });
    let observed = plan::Observed {
        current_generation: facts.current_generation().map(ToString::to_string),
        ..plan::Observed::default()
    };
    let (change, drift) = plan::diff(
        key,
        Some(&desired_view),
        applied_view.as_ref(),
        Some(&observed),
    );

    report_drift(ctx, key, &mut status, &drift, spec.drift);
    let interval = spec.interval.value.get();

    let Some(change) = change else {
        // Nothing to do: Ready, unless drift is only reported.
        let now = now_ms();
        let (reason, message) = if drift.is_empty() {
            (
                "Converged",
                format!(
                    "generation {} is current",
                    observed.current_generation.as_deref().unwrap_or("none")
                ),
            )
        } else {
            (
                "DriftReported",
                format!(
                    "drifted, reported only (drift: {})",
                    drift_policy_name(spec.drift)
                ),
            )
        };
        // Drift that is only reported leaves the object Ready (what was
        // applied is still what the spec says) with Drifted=True beside it.
        status.set_condition(ConditionKind::Ready, true, reason, message, now);
        status.set_condition(ConditionKind::Reconciling, false, "", "", now);
        status.set_condition(ConditionKind::Stalled, false, "", "", now);
        status.observed_spec_hash = Some(object.spec_hash.clone());
        status.failures = 0;
        status.next_attempt_ms = None;
        ctx.store.put_status(key, &status).map_err(store_error)?;
        return Ok(Action::Requeue(jittered(interval)));
    };

    let result = execute(
        ctx,
        &snapshot,
        key,
        object,
        &roles.document,
        &roles.hash,
        &facts,
        status,
        change.kind,
        activation_changed,
    )
    .await;
    // The steps changed the machine: record what it looks like now, so
    // `converge facts` never shows the state before the change.
    if let Ok(after) = ctx
        .driver
        .observe(&spec.target, ctx.config.observe_timeout)
        .await
    {
        let json = serde_json::to_value(&after).unwrap_or(Value::Null);
        if let Err(e) = ctx.store.put_facts(
            key,
            &FactsRecord {
                observed_ms: after.observed_ms,
                facts: json,
            },
        ) {
            tracing::error!(error = %e, "failed to record facts");
        }
    }
    result.map(|()| Action::Requeue(jittered(interval)))
}

fn generation_name(a: &Applied) -> String {
    format!("{}-{}", a.generation, a.artifact)
}

/// One WARN line per drifted field, when it is first seen (or changes);
/// the Drifted condition remembers what was reported.
fn report_drift<D>(
    ctx: &Context<D>,
    key: &ObjectKey,
    status: &mut StatusRecord,
    drift: &[plan::Drift],
    policy: DriftPolicy,
) {
    let now = now_ms();
    if drift.is_empty() {
        if status
            .condition(ConditionKind::Drifted)
            .is_some_and(|c| c.status)
        {
            status.set_condition(ConditionKind::Drifted, false, "NoDrift", "", now);
        }
        return;
    }
    let message: Vec<String> = drift
        .iter()
        .map(|d| {
            format!(
                "{}: applied {}, observed {}",
                d.field, d.applied, d.observed
            )
        })
        .collect();
    let message = message.join("; ");
    let already = status
        .condition(ConditionKind::Drifted)
        .is_some_and(|c| c.status && c.message == message);
    if !already {
        for d in drift {
            tracing::warn!(
                target: DRIFT_TARGET,
                object = %key,
                field = %d.field,
                applied = %d.applied,
                observed = %d.observed,
                action = %d.action,
                "drift detected"
            );
            let event = format!(
                "{}: applied {}, observed {}; action: {}",
                d.field, d.applied, d.observed, d.action
            );
            if let Err(e) = ctx.store.append_event(
                key,
                crate::store::records::Severity::Warning,
                "DriftDetected",
                &event,
            ) {
                tracing::error!(object = %key, error = %e, "failed to record event");
            }
        }
    }
    let reason = match policy {
        DriftPolicy::Correct => "DriftDetected",
        DriftPolicy::Warn | DriftPolicy::Ignore => "DriftReported",
    };
    status.set_condition(ConditionKind::Drifted, true, reason, message, now);
}

/// Where an attempt stands when it ends.
struct Outcome {
    result: AttemptResult,
    generation: Option<GenerationId>,
    artifact: Option<String>,
    applied: Option<Applied>,
    error: Option<ReconcileError>,
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the arguments are the reconcile's inputs"
)]
async fn execute<D: Drivers>(
    ctx: &Context<D>,
    snapshot: &Snapshot,
    key: &ObjectKey,
    object: &Object<MachineSpec>,
    roles_document: &[u8],
    roles_hash: &str,
    facts: &MachineFacts,
    mut status: StatusRecord,
    kind: ChangeKind,
    activation_changed: bool,
) -> Result<(), ReconcileError> {
    let revision = snapshot.revision.short();
    let attempt_id = ctx
        .store
        .begin_attempt(key, &object.spec_hash, Some(&revision))
        .map_err(store_error)?;
    let started_ms = now_ms();
    let mut steps = Steps::new();
    let outcome = run_steps(
        ctx,
        snapshot,
        key,
        object,
        roles_document,
        roles_hash,
        facts,
        &status,
        kind,
        activation_changed,
        &mut steps,
    )
    .await;

    let now = now_ms();
    let record = AttemptRecord {
        id: attempt_id,
        key: key.clone(),
        started_ms,
        finished_ms: now,
        revision: Some(revision.clone()),
        spec_hash: object.spec_hash.clone(),
        generation: outcome.generation.as_ref().map(GenerationId::number),
        artifact: outcome.artifact.clone(),
        steps: steps.records,
        result: outcome.result.clone(),
    };
    status.in_progress = None;
    status.observed_spec_hash = Some(object.spec_hash.clone());
    match &outcome.error {
        None => {
            if let Some(applied) = outcome.applied {
                status.last_applied = Some(applied);
            }
            status.set_condition(
                ConditionKind::Ready,
                true,
                "Converged",
                format!(
                    "generation {} is current",
                    outcome
                        .generation
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
                now,
            );
            status.set_condition(ConditionKind::Reconciling, false, "", "", now);
            status.set_condition(ConditionKind::Stalled, false, "", "", now);
            status.set_condition(ConditionKind::Drifted, false, "NoDrift", "", now);
            status.failures = 0;
            status.next_attempt_ms = None;
            let spec_record = SpecRecord {
                spec_hash: object.spec_hash.clone(),
                revision: Some(snapshot.revision.build_input.clone()),
                spec: document_json(object),
                seen_ms: now,
            };
            ctx.store.put_spec(key, &spec_record).map_err(store_error)?;
        }
        Some(e) => {
            status.set_condition(ConditionKind::Ready, false, &e.reason, &e.message, now);
        }
    }
    ctx.store
        .finish_attempt(&record, &status)
        .map_err(store_error)?;
    match outcome.error {
        None => {
            tracing::info!(generation = %outcome.generation.map(|g| g.to_string()).unwrap_or_default(), "converged");
            Ok(())
        }
        Some(e) => {
            tracing::warn!(reason = %e.reason, "{}", e.message);
            Err(e)
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the arguments are the reconcile's inputs"
)]
async fn run_steps<D: Drivers>(
    ctx: &Context<D>,
    snapshot: &Snapshot,
    key: &ObjectKey,
    object: &Object<MachineSpec>,
    roles_document: &[u8],
    roles_hash: &str,
    facts: &MachineFacts,
    status: &StatusRecord,
    kind: ChangeKind,
    activation_changed: bool,
    steps: &mut Steps,
) -> Outcome {
    let spec = &object.spec;
    let target = &spec.target;
    let mode = spec.activation.mode.as_arg();
    let previous = facts.current_generation().cloned();
    let fail = |result: AttemptResult,
                error: ReconcileError,
                generation: Option<GenerationId>,
                artifact: Option<String>| Outcome {
        result,
        generation,
        artifact,
        applied: None,
        error: Some(error),
    };

    // Drift correction: re-activate the generation converge applied, if it is still there.
    let reactivate = match (kind, &status.last_applied) {
        (ChangeKind::Correct, Some(applied)) => {
            GenerationId::new(applied.generation, applied.artifact.clone())
                .ok()
                .filter(|g| facts.generations.contains(g))
        }
        _ => None,
    };

    let (generation, artifact_hash) = if let Some(generation) = reactivate {
        let hash = generation.hash().to_owned();
        (generation, hash)
    } else {
        // Build.
        let Some(argv) = spec.build.command.as_ref().map(|c| c.value.clone()) else {
            return fail(
                AttemptResult::Failed {
                    reason: "Unsupported".into(),
                    message: "nix builds are not supported by this converge yet".into(),
                },
                ReconcileError::terminal(
                    "Unsupported",
                    "nix builds are not supported by this converge yet: use build.command",
                ),
                None,
                None,
            );
        };
        let build_section = serde_json::to_vec(&spec.build).unwrap_or_default();
        let request = BuildRequest {
            workdir: snapshot.root.clone(),
            argv,
            machine: key.name.to_string(),
            roles_json: roles_document.to_vec(),
            cache_key: cache_key(&[
                b"converge-build-v1",
                &build_section,
                key.name.as_str().as_bytes(),
                roles_hash.as_bytes(),
                snapshot.revision.build_input.as_bytes(),
            ]),
            timeout: spec.build.timeout.value.get(),
        };
        let started = Instant::now();
        let artifact: Artifact = {
            let _permit = ctx.builds.acquire().await;
            match ctx.driver.build(&request).await {
                Ok(a) => a,
                Err(e) => {
                    let output = e.build_output().unwrap_or_default().to_owned();
                    steps.push(
                        "build",
                        started,
                        false,
                        format!("{}\n{output}", error_chain(&e)),
                    );
                    let err = driver_error("BuildFailed", &e);
                    return fail(
                        AttemptResult::Failed {
                            reason: "BuildFailed".into(),
                            message: err.message.clone(),
                        },
                        err,
                        None,
                        None,
                    );
                }
            }
        };
        let note = if artifact.cached {
            "cached: nothing ran".to_owned()
        } else {
            artifact.output.clone()
        };
        steps.push("build", started, true, note);

        // Unchanged artifact already current and applied, activated the same
        // way: record, nothing to activate.
        if !activation_changed
            && previous.as_ref().is_some_and(|p| p.hash() == artifact.hash)
            && status
                .last_applied
                .as_ref()
                .is_some_and(|a| a.artifact == artifact.hash)
        {
            let Some(current) = previous.clone() else {
                return fail(
                    AttemptResult::Interrupted,
                    ReconcileError::transient("Internal", "current generation vanished"),
                    None,
                    None,
                );
            };
            return Outcome {
                result: AttemptResult::NoChange,
                applied: Some(applied_record(
                    &current,
                    snapshot,
                    &object.spec_hash,
                    roles_hash,
                )),
                generation: Some(current),
                artifact: Some(artifact.hash),
                error: None,
            };
        }

        let number = facts
            .generations
            .iter()
            .chain(facts.incomplete.iter())
            .map(GenerationId::number)
            .chain(status.last_applied.as_ref().map(|a| a.generation))
            .max()
            .unwrap_or(0)
            + 1;
        let generation = match GenerationId::new(number, artifact.hash.clone()) {
            Ok(g) => g,
            Err(e) => {
                let err = ReconcileError::terminal("BuildFailed", error_chain(&e));
                return fail(
                    AttemptResult::Failed {
                        reason: err.reason.clone(),
                        message: err.message.clone(),
                    },
                    err,
                    None,
                    Some(artifact.hash),
                );
            }
        };

        // Install.
        let started = Instant::now();
        match ctx
            .driver
            .install(
                target,
                &artifact,
                roles_document,
                &generation,
                ctx.config.install_timeout,
            )
            .await
        {
            Ok(how) => steps.push("install", started, true, format!("{how:?}")),
            Err(e) => {
                steps.push("install", started, false, error_chain(&e));
                let err = driver_error("InstallFailed", &e);
                return fail(
                    AttemptResult::Failed {
                        reason: err.reason.clone(),
                        message: err.message.clone(),
                    },
                    err,
                    Some(generation),
                    Some(artifact.hash),
                );
            }
        }
        (generation, artifact.hash)
    };

    // Switch, activate, health-check.
    let checked =
        activate_and_check(ctx, object, &generation, previous.as_ref(), mode, steps).await;
    let Some(Failure {
        error: failure,
        confirmation,
    }) = checked
    else {
        // Old generations go, so months of deploys do not fill the target;
        // the new one and the one before are always kept.
        let protect: Vec<GenerationId> = std::iter::once(generation.clone())
            .chain(previous.clone())
            .collect();
        let started = Instant::now();
        match ctx
            .driver
            .prune(
                target,
                ctx.config.keep_generations,
                &protect,
                ctx.config.switch_timeout,
            )
            .await
        {
            Ok(removed) if !removed.is_empty() => {
                let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
                steps.push(
                    "prune",
                    started,
                    true,
                    format!("removed {}", names.join(", ")),
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %error_chain(&e), "failed to prune old generations"),
        }
        return Outcome {
            result: AttemptResult::Succeeded,
            applied: Some(applied_record(
                &generation,
                snapshot,
                &object.spec_hash,
                roles_hash,
            )),
            generation: Some(generation),
            artifact: Some(artifact_hash),
            error: None,
        };
    };

    // The target's watchdog may act (or have acted) on its own: claim the
    // confirmation before deciding anything, so it and converge never both
    // roll back. A watchdog that already fired means the target rolled back.
    if let Some(confirmation) = &confirmation {
        let started = Instant::now();
        match ctx
            .driver
            .confirm(target, confirmation, ctx.config.switch_timeout)
            .await
        {
            Ok(ConfirmOutcome::Confirmed) => steps.push(
                "claim confirmation",
                started,
                true,
                "watchdog disarmed before rolling back",
            ),
            Ok(ConfirmOutcome::AlreadyRolledBack { rollback }) => {
                let message = format!(
                    "{}; the machine rolled itself back ({rollback:?})",
                    failure.message
                );
                steps.push("claim confirmation", started, false, message.clone());
                return target_rolled_back(
                    failure,
                    message,
                    previous.as_ref(),
                    generation,
                    artifact_hash,
                );
            }
            Err(e) => {
                let message = format!(
                    "{}; could not reach the machine to roll back ({}); its watchdog rolls it back after confirmTimeout",
                    failure.message,
                    error_chain(&e)
                );
                steps.push("claim confirmation", started, false, message.clone());
                return Outcome {
                    result: AttemptResult::Failed {
                        reason: failure.reason.clone(),
                        message: message.clone(),
                    },
                    generation: Some(generation),
                    artifact: Some(artifact_hash),
                    applied: None,
                    error: Some(ReconcileError { message, ..failure }),
                };
            }
        }
    }
    if failure.reason == TARGET_ROLLED_BACK {
        let message = failure.message.clone();
        return target_rolled_back(
            failure,
            message,
            previous.as_ref(),
            generation,
            artifact_hash,
        );
    }

    // Roll back to what was current before, if allowed and possible.
    let rollback_target = previous.filter(|p| *p != generation);
    match (spec.activation.rollback, rollback_target) {
        (RollbackPolicy::Auto, Some(previous)) => {
            let started = Instant::now();
            let rolled = rollback(ctx, object, &previous, mode).await;
            let ok = rolled.is_ok();
            steps.push(
                "rollback",
                started,
                ok,
                match &rolled {
                    Ok(()) => format!("re-activated generation {previous}"),
                    Err(e) => e.clone(),
                },
            );
            let message = match rolled {
                Ok(()) => format!("{}; rolled back to generation {previous}", failure.message),
                Err(e) => format!(
                    "{}; rollback to generation {previous} failed too: {e}",
                    failure.message
                ),
            };
            let err = ReconcileError::transient(&failure.reason, message.clone());
            Outcome {
                result: AttemptResult::RolledBack {
                    reason: failure.reason.clone(),
                    message,
                    to_generation: Some(previous.number()),
                },
                generation: Some(generation),
                artifact: Some(artifact_hash),
                applied: None,
                error: Some(ReconcileError {
                    reason: "RolledBack".into(),
                    ..err
                }),
            }
        }
        (policy, _) => {
            let why = if policy == RollbackPolicy::Never {
                "rollback: never"
            } else {
                "no earlier generation to roll back to"
            };
            let message = format!("{}; not rolled back ({why})", failure.message);
            Outcome {
                result: AttemptResult::Failed {
                    reason: failure.reason.clone(),
                    message: message.clone(),
                },
                generation: Some(generation),
                artifact: Some(artifact_hash),
                applied: None,
                error: Some(ReconcileError { message, ..failure }),
            }
        }
    }
}

fn applied_record(
    generation: &GenerationId,
    snapshot: &Snapshot,
    spec_hash: &str,
    roles_hash: &str,
) -> Applied {
    Applied {
        generation: generation.number(),
        artifact: generation.hash().to_owned(),
        revision: Some(snapshot.revision.short()),
        spec_hash: spec_hash.to_owned(),
        roles_hash: Some(roles_hash.to_owned()),
        applied_ms: now_ms(),
    }
}

/// Reason of a failure where the target's own watchdog rolled back (the
/// activation was not confirmed in time).
const TARGET_ROLLED_BACK: &str = "NotConfirmed";

/// Why an activation did not stand, and the watchdog armed for it (if any).
struct Failure {
    error: ReconcileError,
    confirmation: Option<Confirmation>,
}

/// The outcome of an attempt the target rolled back by itself.
fn target_rolled_back(
    failure: ReconcileError,
    message: String,
    previous: Option<&GenerationId>,
    generation: GenerationId,
    artifact_hash: String,
) -> Outcome {
    Outcome {
        result: AttemptResult::RolledBack {
            reason: failure.reason.clone(),
            message: message.clone(),
            to_generation: previous.map(GenerationId::number),
        },
        generation: Some(generation),
        artifact: Some(artifact_hash),
        applied: None,
        error: Some(ReconcileError::transient("RolledBack", message)),
    }
}

/// Switches to `generation`, activates it (arming the target's confirmation
/// watchdog for modes that change the running system), runs the health
/// checks, and confirms over a new connection. Returns the failure, if any
/// (transient: a retry may succeed).
async fn activate_and_check<D: Drivers>(
    ctx: &Context<D>,
    object: &Object<MachineSpec>,
    generation: &GenerationId,
    previous: Option<&GenerationId>,
    mode: &str,
    steps: &mut Steps,
) -> Option<Failure> {
    let spec = &object.spec;
    let target = &spec.target;
    let fail = |error: ReconcileError, confirmation: Option<Confirmation>| {
        Some(Failure {
            error,
            confirmation,
        })
    };
    let started = Instant::now();
    if let Err(e) = ctx
        .driver
        .switch(target, generation, ctx.config.switch_timeout)
        .await
    {
        steps.push("switch", started, false, error_chain(&e));
        return fail(driver_error("SwitchFailed", &e), None);
    }
    steps.push(
        "switch",
        started,
        true,
        format!("current -> generations/{generation}"),
    );

    let started = Instant::now();
    let activated = ctx
        .driver
        .activate_confirmed(
            target,
            generation,
            previous.filter(|p| *p != generation),
            mode,
            spec.activation.timeout.value.get(),
            spec.activation.confirm_timeout.value.get(),
        )
        .await;
    let confirmation = match activated {
        Ok((result, confirmation)) if result.succeeded() => {
            steps.push("activate", started, true, result.log);
            confirmation
        }
        Ok((result, confirmation)) => {
            let message = format!(
                "activate {mode} of generation {generation} exited with code {}",
                result.code
            );
            steps.push("activate", started, false, result.log);
            return fail(
                ReconcileError::transient("ActivationFailed", message),
                confirmation,
            );
        }
        Err(e) => {
            steps.push("activate", started, false, error_chain(&e));
            return fail(driver_error("ActivationFailed", &e), None);
        }
    };

    for check in &spec.activation.health_checks {
        let started = Instant::now();
        let argv = &check.exec.value;
        let name = format!("health check `{}`", argv.join(" "));
        match ctx
            .driver
            .health_check(target, argv, check.timeout.value.get())
            .await
        {
            Ok(output) => steps.push(
                &name,
                started,
                true,
                format!("{}{}", output.stdout, output.stderr),
            ),
            Err(e) => {
                steps.push(&name, started, false, error_chain(&e));
                let reason = if e.is_health_failure() {
                    "HealthCheckFailed"
                } else {
                    "Unreachable"
                };
                return fail(
                    ReconcileError::transient(
                        reason,
                        format!("{name} failed: {}", error_chain(&e)),
                    ),
                    confirmation,
                );
            }
        }
    }

    // Prove the machine is reachable afresh; otherwise it rolls itself back.
    if let Some(c) = &confirmation {
        let started = Instant::now();
        match ctx
            .driver
            .confirm(target, c, ctx.config.switch_timeout)
            .await
        {
            Ok(ConfirmOutcome::Confirmed) => {
                steps.push("confirm", started, true, "reached over a new connection")
            }
            Ok(ConfirmOutcome::AlreadyRolledBack { rollback }) => {
                let message = format!(
                    "generation {generation} was not confirmed within confirmTimeout; the machine rolled itself back ({rollback:?})"
                );
                steps.push("confirm", started, false, message.clone());
                return fail(ReconcileError::transient(TARGET_ROLLED_BACK, message), None);
            }
            Err(e) => {
                let message = format!(
                    "could not reach the machine over a new connection after activating generation {generation}: {}; it rolls itself back after confirmTimeout",
                    error_chain(&e)
                );
                steps.push("confirm", started, false, message.clone());
                // Kept: the caller tries to claim it before any rollback of
                // its own, so converge and the watchdog never both act.
                return fail(
                    ReconcileError::transient("Unreachable", message),
                    confirmation.clone(),
                );
            }
        }
    }
    None
}

async fn rollback<D: Drivers>(
    ctx: &Context<D>,
    object: &Object<MachineSpec>,
    previous: &GenerationId,
    mode: &str,
) -> Result<(), String> {
    let target = &object.spec.target;
    ctx.driver
        .switch(target, previous, ctx.config.switch_timeout)
        .await
        .map_err(|e| error_chain(&e))?;
    let timeout: Duration = object.spec.activation.timeout.value.get();
    match ctx.driver.activate(target, previous, mode, timeout).await {
        Ok(r) if r.succeeded() => Ok(()),
        Ok(r) => Err(format!("activate exited with code {}", r.code)),
        Err(e) => Err(error_chain(&e)),
    }
}
