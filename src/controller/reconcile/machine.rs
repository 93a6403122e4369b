//! Reconcile of one Machine: wait for `after` dependencies (and the VM it
//! lives in), observe, plan with `plan::diff`, then execute exactly the
//! plan's steps (`deploy`), and record the attempt.
//!
//! Drift (the machine's `current` is not what converge applied) gets one WARN
//! line when it is first seen, and is corrected or only reported per policy:
//! the plan says which.

use std::time::Duration;

use serde_json::Value;

use super::deploy;
use super::hold::{inputs_identity, still_held};
use super::record::{jittered, report_drift, set_ready};
use crate::controller::applier::Action;
use crate::controller::context::Context;
use crate::controller::error::ReconcileError;
use crate::driver::capability::Drivers;
use crate::driver::protocol::MachineFacts;
use crate::plan::{self, DesiredKind, MachineDesired};
use crate::spec::{MachineSpec, Name, Object, ObjectKey, VmPowerState};
use crate::store::records::{Applied, ConditionKind, FactsRecord, Reason, StatusRecord, now_ms};
use crate::telemetry::error_chain;

/// The document as canonical JSON, for diffs and records.
pub fn document_json(object: &Object<MachineSpec>) -> Value {
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

/// The desired side of a machine as the plan sees it; `converge plan` uses
/// the same, so the preview and the reconcile cannot disagree.
pub fn desired<'a>(
    object: &'a Object<MachineSpec>,
    roles_hash: &'a str,
    build_input: &'a str,
    keep_generations: usize,
) -> plan::Desired<'a> {
    plan::Desired {
        document: document_json(object),
        spec_hash: &object.spec_hash,
        kind: DesiredKind::Machine(MachineDesired {
            roles_hash,
            build_input,
            activation: &object.spec.activation,
            remote: !object.spec.target.is_local(),
            drift: object.spec.drift,
            keep_generations,
        }),
    }
}

/// What converge last applied to a machine, as the plan sees it.
pub fn applied<'a>(
    status: &'a StatusRecord,
    record: Option<&'a crate::store::records::SpecRecord>,
) -> Option<plan::Applied<'a>> {
    status.last_applied.as_ref().map(|a| plan::Applied {
        document: record.map(|r| &r.spec),
        spec_hash: &a.spec_hash,
        roles_hash: a.roles_hash.as_deref(),
        build_input: record.and_then(|r| r.revision.as_deref()),
        generation: Some(generation_name(a)),
        delete_on_removal: false,
    })
}

/// What was observed on a machine, as the plan sees it.
pub fn observed(facts: &MachineFacts) -> plan::Observed {
    plan::Observed::Machine {
        current: facts.current_generation().map(ToString::to_string),
        confirmed: facts.confirmed.as_ref().map(ToString::to_string),
        generations: facts.generations.iter().map(ToString::to_string).collect(),
        nixos: facts
            .nixos
            .as_ref()
            .and_then(|n| Some((n.generation_system.clone()?, n.current_system.clone()))),
    }
}

fn generation_name(a: &Applied) -> String {
    format!("{}-{}", a.generation, a.artifact)
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
    vm_name: &Name,
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
        let uptime = f.facts.get("uptimeMs").and_then(Value::as_u64)?;
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
            Err(e) if e.is_transient() => {
                return Err(ReconcileError::GuestUnreachable {
                    vm: vm_name.clone(),
                    within: ctx.config.guest_boot_timeout,
                    source: Box::new(e),
                });
            }
            Err(e) => return Err(unreachable(e)),
        }
    }
}

fn unreachable(source: crate::driver::capability::DriverError) -> ReconcileError {
    ReconcileError::Driver {
        reason: Reason::Unreachable,
        what: "observe".to_owned(),
        source: Box::new(source),
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
        return Err(ReconcileError::RolesMissing);
    };
    let mut status = ctx.store.status(key)?.unwrap_or_default();

    // A machine living in a VM (its `machine:`) needs that VM running.
    let host_vm = snapshot.desired.vms.iter().find(|(_, vm)| {
        vm.spec
            .machine
            .as_ref()
            .is_some_and(|m| m.value == key.name)
    });
    if let Some((vm_name, vm)) = host_vm {
        if vm.spec.state == VmPowerState::Stopped {
            return Err(ReconcileError::HostVmStopped {
                vm: vm_name.clone(),
            });
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
            Reason::DependencyNotReady,
            &message,
            now,
        );
        if !status.is_ready() {
            status.set_condition(
                ConditionKind::Ready,
                false,
                Reason::DependencyNotReady,
                &message,
                now,
            );
        }
        ctx.store.put_status(key, &status)?;
        tracing::debug!(object = %key, %message, "waiting for dependencies");
        return Ok(Action::Requeue(ctx.config.dependency_poll));
    }

    let spec = &object.spec;
    let build_input = snapshot.revision.build_input.as_str();
    let inputs = inputs_identity(&object.spec_hash, &roles.hash, build_input);
    // An artifact held (rolled back from, or whose build wrote into the
    // directory) is not tried again until its inputs change or an operator
    // asks: `reconcile KEY --retry` clears the hold.
    if status.held.is_some() && ctx.take_retry(key) {
        tracing::info!(object = %key, "held artifact released: it is tried again (--retry)");
        status.held = None;
        ctx.store.put_status(key, &status)?;
    }
    if let Some(held) = &status.held {
        let root = snapshot.root.clone();
        let check = held.clone();
        let (spec_hash, roles_hash, inputs_now) =
            (object.spec_hash.clone(), roles.hash.clone(), inputs.clone());
        let holds = tokio::task::spawn_blocking(move || {
            still_held(&check, &spec_hash, &roles_hash, &inputs_now, &root)
        })
        .await
        .unwrap_or(true);
        if holds {
            return Err(ReconcileError::Held {
                key: key.to_string(),
                reason: held.reason,
                message: held.message.clone(),
            });
        }
    }
    let facts = match host_vm {
        Some((vm_name, _)) => observe_guest(ctx, key, spec, vm_name).await?,
        None => ctx
            .driver
            .observe(&spec.target, ctx.config.observe_timeout)
            .await
            .map_err(unreachable)?,
    };
    put_facts(ctx, key, &facts)?;

    let build_input = snapshot.revision.build_input.as_str();
    let desired = desired(
        object,
        &roles.hash,
        build_input,
        ctx.config.keep_generations,
    );
    let record = ctx.store.spec(key)?;
    let applied = applied(&status, record.as_ref());
    let observed = observed(&facts);
    let (change, drift) = plan::diff(key, Some(&desired), applied.as_ref(), Some(&observed));
    drop(applied);

    report_drift(ctx, key, &mut status, &drift, spec.drift);
    let interval = spec.interval.value.get();

    let Some(change) = change else {
        // Nothing to do: Ready. Drift that is only reported leaves the
        // object Ready (what was applied is still what the spec says) with
        // Drifted=True beside it.
        let (reason, message) = if drift.is_empty() {
            (
                Reason::Converged,
                format!(
                    "generation {} is current",
                    facts
                        .current_generation()
                        .map_or_else(|| "none".to_owned(), ToString::to_string)
                ),
            )
        } else {
            (
                Reason::DriftReported,
                format!("drifted, reported only (drift: {})", spec.drift.as_str()),
            )
        };
        set_ready(&mut status, reason, message, &object.spec_hash);
        ctx.store.put_status(key, &status)?;
        return Ok(Action::Requeue(jittered(interval)));
    };
    if let Some(suspension) = ctx.store.suspension(key)? {
        super::record::suspended(key, &mut status, &suspension, &change);
        ctx.store.put_status(key, &status)?;
        return Ok(Action::Requeue(jittered(interval)));
    }

    let result = deploy::execute(
        ctx,
        &snapshot,
        deploy::Inputs {
            key,
            object,
            roles_document: &roles.document,
            roles_hash: &roles.hash,
            facts: &facts,
            document: desired.document.clone(),
            inputs,
        },
        status,
        &change,
    )
    .await;
    // The steps changed the machine: record what it looks like now, so
    // `converge facts` never shows the state before the change.
    if let Ok(after) = ctx
        .driver
        .observe(&spec.target, ctx.config.observe_timeout)
        .await
    {
        if let Err(e) = put_facts(ctx, key, &after) {
            tracing::error!(error = %error_chain(&e), "failed to record facts");
        }
    }
    result.map(|()| Action::Requeue(jittered(interval)))
}

fn put_facts<D>(
    ctx: &Context<D>,
    key: &ObjectKey,
    facts: &MachineFacts,
) -> Result<(), ReconcileError> {
    ctx.store.put_facts(
        key,
        &FactsRecord {
            observed_ms: facts.observed_ms,
            facts: serde_json::to_value(facts).unwrap_or(Value::Null),
        },
    )?;
    Ok(())
}
