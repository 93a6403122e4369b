//! The plan of a whole desired state: what `converge plan` prints.
//!
//! Observes every machine and VM (in parallel, bounded by the probe timeout), reads
//! what was applied from the store, and runs the same pure `plan::diff` that
//! reconcile uses. Changes nothing: no build, no step, no record written.

use std::collections::BTreeSet;

use futures::StreamExt;

use super::context::Context;
use crate::driver::capability::Drivers;
use crate::plan::{self, Plan};
use crate::spec::{Kind, ObjectKey, OnDelete, VmPowerState};

/// Objects observed at once while planning.
const PARALLEL_OBSERVES: usize = 16;

/// Plans every object of the snapshot in force, and every object the store
/// knows that the snapshot no longer has.
pub async fn plan<D: Drivers>(ctx: &std::sync::Arc<Context<D>>) -> Plan {
    let snapshot = ctx.snapshot();
    let desired = &snapshot.desired;
    let mut out = Plan {
        revision: Some(snapshot.revision.short()),
        ..Plan::default()
    };

    let targets: Vec<_> = desired
        .machines
        .values()
        .map(|o| (o.key.name.clone(), o.spec.target.clone()))
        .collect();
    let observed: Vec<_> = futures::stream::iter(targets)
        .map(|(name, target)| {
            let ctx = ctx.clone();
            async move {
                let result = ctx
                    .driver
                    .observe(&target, ctx.config.observe_timeout)
                    .await;
                (name, result)
            }
        })
        .buffered(PARALLEL_OBSERVES)
        .collect()
        .await;

    for (name, facts) in observed {
        let Some(object) = desired.machines.get(&name) else {
            continue;
        };
        let key = &object.key;
        let Some(roles) = desired.roles.get(&key.name) else {
            continue;
        };
        let status = ctx.store.status(key).ok().flatten().unwrap_or_default();
        let record = ctx.store.spec(key).ok().flatten();
        let view = super::reconcile::machine::plan_inputs(
            object,
            &roles.hash,
            &snapshot.revision.build_input,
        );
        let applied = status.last_applied.as_ref().map(|a| plan::Applied {
            document: record.as_ref().map(|r| &r.spec),
            spec_hash: &a.spec_hash,
            roles_hash: a.roles_hash.as_deref(),
            build_input: record.as_ref().and_then(|r| r.revision.as_deref()),
            generation: Some(format!("{}-{}", a.generation, a.artifact)),
            delete_on_removal: false,
        });
        let observed = match facts {
            Ok(facts) => Some(plan::Observed {
                current_generation: facts.current_generation().map(ToString::to_string),
                ..plan::Observed::default()
            }),
            Err(e) => {
                out.unobserved
                    .push((key.clone(), super::reconcile::machine::error_chain(&e)));
                None
            }
        };
        let (change, drift) = plan::diff(key, Some(&view), applied.as_ref(), observed.as_ref());
        out.changes.extend(change);
        out.drift.extend(drift);
    }

    // VMs: observed on their host (process, disks), compared the same way.
    let vms: Vec<_> = desired.vms.values().cloned().collect();
    let vm_observed: Vec<_> = futures::stream::iter(vms)
        .map(|object| {
            let ctx = ctx.clone();
            async move {
                let result = match super::reconcile::vm::hypervisor(
                    &ctx,
                    &object.key,
                    &object.spec.host.value,
                ) {
                    Ok(host) => {
                        let dir = host.vm_dir(&ctx.vm_root, object.key.name.as_str());
                        ctx.driver
                            .vm_observe(&host, &dir, &object.spec.disks)
                            .await
                            .map_err(|e| super::reconcile::machine::error_chain(&e))
                    }
                    Err(e) => Err(e.message),
                };
                (object, result)
            }
        })
        .buffered(PARALLEL_OBSERVES)
        .collect()
        .await;
    for (object, facts) in &vm_observed {
        let key = &object.key;
        let spec = &object.spec;
        let status = ctx.store.status(key).ok().flatten().unwrap_or_default();
        let record = ctx.store.spec(key).ok().flatten();
        let view = plan::Desired {
            document: super::reconcile::vm::spec_document(&key.name, spec),
            spec_hash: &object.spec_hash,
            roles_hash: None,
            build_input: None,
            activation_mode: None,
            health_checks: 0,
            vm_running: Some(spec.state == VmPowerState::Running),
            drift_policy: "correct",
            delete_on_removal: spec.on_delete == OnDelete::Delete,
        };
        let applied = status.last_applied.as_ref().map(|a| plan::Applied {
            document: record.as_ref().map(|r| &r.spec),
            spec_hash: &a.spec_hash,
            roles_hash: None,
            build_input: None,
            generation: None,
            delete_on_removal: false,
        });
        let observed = match facts {
            Ok(facts) => Some(plan::Observed {
                vm_running: Some(facts.running),
                vm_disks: facts
                    .disks
                    .iter()
                    .filter(|d| d.exists)
                    .map(|d| d.name.clone())
                    .collect(),
                ..plan::Observed::default()
            }),
            Err(message) => {
                out.unobserved.push((key.clone(), message.clone()));
                None
            }
        };
        let (change, drift) = plan::diff(key, Some(&view), applied.as_ref(), observed.as_ref());
        out.changes.extend(change);
        out.drift.extend(drift);
    }

    // Objects converge applied before but the YAML no longer has.
    let wanted: BTreeSet<ObjectKey> = desired.spec_hashes().into_keys().collect();
    for key in ctx.store.keys().unwrap_or_default() {
        if wanted.contains(&key) || key.kind == Kind::Service {
            continue;
        }
        let status = ctx.store.status(&key).ok().flatten().unwrap_or_default();
        let record = ctx.store.spec(&key).ok().flatten();
        let delete = record
            .as_ref()
            .and_then(|r| r.spec.pointer("/spec/onDelete"))
            .and_then(|v| v.as_str())
            == Some("delete");
        let applied = plan::Applied {
            document: record.as_ref().map(|r| &r.spec),
            spec_hash: status.observed_spec_hash.as_deref().unwrap_or(""),
            roles_hash: None,
            build_input: None,
            generation: None,
            delete_on_removal: delete,
        };
        let (change, _) = plan::diff(&key, None, Some(&applied), None);
        out.changes.extend(change);
    }
    out.changes.sort_by(|a, b| a.key.cmp(&b.key));
    out
}
