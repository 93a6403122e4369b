//! The plan of a whole desired state: what `converge plan` prints.
//!
//! Observes every machine and VM (in parallel, bounded by the probe
//! timeout), reads what was applied from the store, and runs the same pure
//! `plan::diff` over the same per-kind inputs that reconcile uses
//! (`reconcile::machine`, `reconcile::vm`). Changes nothing: no build, no
//! step, no record written.

use std::collections::BTreeSet;

use futures::StreamExt;

use super::context::Context;
use super::placement;
use super::reconcile::{machine, vm};
use crate::driver::capability::Drivers;
use crate::driver::nix::NixRequest;
use crate::plan::{self, DesiredKind, Plan};
use crate::spec::{Kind, ObjectKey};
use crate::telemetry::error_chain;

/// Objects observed at once while planning: as many as reconcile at once.
const PARALLEL_OBSERVES: usize = super::context::DEFAULT_CONCURRENCY;

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
        let view = machine::desired(
            object,
            &roles.hash,
            &snapshot.revision.build_input,
            ctx.config.keep_generations,
        );
        let applied = machine::applied(&status, record.as_ref());
        let running = facts
            .as_ref()
            .ok()
            .and_then(|f| f.nixos.as_ref())
            .map(|n| n.current_system.clone());
        let observed = match facts {
            Ok(facts) => Some(machine::observed(&facts)),
            Err(e) => {
                out.unobserved.push((key.clone(), error_chain(&e)));
                None
            }
        };
        let (mut change, drift) = plan::diff(key, Some(&view), applied.as_ref(), observed.as_ref());
        // A NixOS machine that will build: its next system, evaluated (an
        // unchanged machine has no change, so it evaluates nothing).
        if let (Some(change), Some(nix)) = (change.as_mut(), &object.spec.build.nix) {
            if change.steps.contains(&plan::Step::Build) {
                let request =
                    NixRequest::for_machine(&nix.value.flake, name.as_str(), &snapshot.root);
                let preview = ctx
                    .driver
                    .nix_preview(
                        &request,
                        running.as_deref(),
                        object.spec.build.timeout.value.get(),
                    )
                    .await;
                change.nixos = preview.map(|p| plan::NixosChange {
                    current: running.clone(),
                    new: p.toplevel,
                    closure: p.closure,
                });
            }
        }
        out.changes.extend(change);
        out.drift.extend(drift);
    }

    // VMs: observed on their host (process, disks), compared the same way.
    let vms: Vec<_> = desired.vms.values().cloned().collect();
    let vm_observed: Vec<_> = futures::stream::iter(vms)
        .map(|object| {
            let ctx = ctx.clone();
            async move {
                let snapshot = ctx.snapshot();
                let root = snapshot.root.clone();
                let result = match placement::hypervisor(
                    &snapshot.desired,
                    &ctx.store,
                    &object.key,
                    &object.spec.host.value,
                ) {
                    Ok(host) => {
                        let dir = host.vm_dir(&ctx.vm_root, object.key.name.as_str());
                        let launch = ctx.driver.vm_launch_identity(
                            object.key.name.as_str(),
                            &object.spec,
                            &dir,
                            &root,
                        );
                        ctx.driver
                            .vm_observe(&host, &dir, &object.spec.disks)
                            .await
                            .map(|facts| (facts, launch.clone()))
                            .map_err(|e| (error_chain(&e), Some(launch)))
                    }
                    Err(e) => Err((error_chain(&e), None)),
                };
                (object, result)
            }
        })
        .buffered(PARALLEL_OBSERVES)
        .collect()
        .await;
    for (object, facts) in &vm_observed {
        let key = &object.key;
        let status = ctx.store.status(key).ok().flatten().unwrap_or_default();
        let record = ctx.store.spec(key).ok().flatten();
        let applied = vm::applied(&status, record.as_ref());
        let (launch, observed) = match facts {
            Ok((facts, launch)) => (launch.clone(), Some(vm::observed(facts))),
            Err((message, launch)) => {
                out.unobserved.push((key.clone(), message.clone()));
                (launch.clone().unwrap_or_default(), None)
            }
        };
        let view = vm::desired(object, &launch, false);
        let (change, drift) = plan::diff(key, Some(&view), applied.as_ref(), observed.as_ref());
        out.changes.extend(change);
        out.drift.extend(drift);
    }

    // Services: resolved with the desired state; planned from the records.
    for (name, service) in &desired.services {
        let key = ObjectKey::service(name.clone());
        let status = ctx.store.status(&key).ok().flatten().unwrap_or_default();
        let record = ctx.store.spec(&key).ok().flatten();
        let view = plan::Desired {
            document: super::reconcile::service_document(&key, &service.spec),
            spec_hash: &service.spec_hash,
            kind: DesiredKind::Service,
        };
        let applied = status.last_applied.as_ref().map(|a| plan::Applied {
            document: record.as_ref().map(|r| &r.spec),
            spec_hash: &a.spec_hash,
            roles_hash: None,
            build_input: None,
            generation: None,
            delete_on_removal: false,
        });
        let (change, _) = plan::diff(&key, Some(&view), applied.as_ref(), None);
        out.changes.extend(change);
    }

    // Objects converge applied before but the YAML no longer has.
    let wanted: BTreeSet<ObjectKey> = desired.spec_hashes().into_keys().collect();
    for key in ctx.store.keys().unwrap_or_default() {
        if wanted.contains(&key) {
            continue;
        }
        let status = ctx.store.status(&key).ok().flatten().unwrap_or_default();
        let record = ctx.store.spec(&key).ok().flatten();
        let applied = plan::Applied {
            document: record.as_ref().map(|r| &r.spec),
            spec_hash: status.observed_spec_hash.as_deref().unwrap_or(""),
            roles_hash: None,
            build_input: None,
            generation: None,
            delete_on_removal: key.kind == Kind::VirtualMachine
                && record
                    .as_ref()
                    .and_then(|r| r.spec.pointer("/spec/onDelete"))
                    .and_then(|v| v.as_str())
                    == Some("delete"),
        };
        let (change, _) = plan::diff(&key, None, Some(&applied), None);
        out.changes.extend(change);
    }
    out.changes.sort_by(|a, b| a.key.cmp(&b.key));
    out
}
