//! Reconcile of one Service: its effect is each member machine's roles
//! document (resolved with the desired state), so its one step is
//! `resolve-roles`, recorded when its spec changed. A Service is Ready only
//! when every machine it selects is Ready with its current roles document;
//! its message counts the members by condition. While members are still
//! converging it waits (Reconciling, `DependencyNotReady`) and looks again
//! every dependency poll; a member that failed for good makes it
//! `DependencyFailed`. The loop wakes it when a member becomes Ready
//! (`lifecycle::dependents_index`) and when a member's roles change.

use std::collections::BTreeMap;
use std::time::Instant;

use super::attempt::Attempt;
use super::record::set_ready;
use crate::controller::applier::Action;
use crate::controller::context::Context;
use crate::controller::error::ReconcileError;
use crate::plan::{self, DesiredKind};
use crate::spec::{DesiredState, Name, ObjectKey};
use crate::store::Store;
use crate::store::records::{
    Applied, AttemptResult, ConditionKind, Reason, SpecRecord, StatusRecord, now_ms,
};

/// The document recorded as a service's applied spec, and compared with it
/// by `plan`: both must build it the same way.
pub fn document(key: &ObjectKey, spec: &crate::spec::ServiceSpec) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": crate::spec::API_VERSION,
        "kind": "Service",
        "metadata": {"name": key.name.as_str()},
        "spec": serde_json::to_value(spec).unwrap_or(serde_json::Value::Null),
    })
}

/// Reconciles `service/NAME`.
pub fn reconcile<D>(ctx: &Context<D>, key: &ObjectKey) -> Result<Action, ReconcileError> {
    let snapshot = ctx.snapshot();
    let Some(service) = snapshot.desired.services.get(&key.name) else {
        return Ok(Action::AwaitChange);
    };
    let members = Members::count(&ctx.store, &snapshot.desired, &key.name)?;
    let message = members.message(service.spec.roles.len());
    let mut status = ctx.store.status(key)?.unwrap_or_default();
    let record = ctx.store.spec(key)?;
    let document = document(key, &service.spec);
    let desired = plan::Desired {
        document: document.clone(),
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
    let (change, _) = plan::diff(key, Some(&desired), applied.as_ref(), None);
    let Some(change) = change else {
        let action = members.set_status(ctx, &mut status, message, &service.spec_hash);
        ctx.store.put_status(key, &status)?;
        return Ok(action);
    };
    let mut attempt = Attempt::begin(ctx, key, &service.spec_hash, snapshot.revision.short())?;
    for step in &change.steps {
        // `resolve-roles` is the only step a service plans; the roles were
        // resolved with the desired state this snapshot holds.
        attempt.ended(step, Instant::now(), true, message.clone());
    }
    let now = now_ms();
    status.last_applied = Some(Applied {
        generation: status.last_applied.as_ref().map_or(0, |a| a.generation) + 1,
        artifact: service.spec_hash.clone(),
        revision: Some(snapshot.revision.short()),
        spec_hash: service.spec_hash.clone(),
        roles_hash: None,
        applied_ms: now,
    });
    let action = members.set_status(ctx, &mut status, message, &service.spec_hash);
    ctx.store.put_spec(
        key,
        &SpecRecord {
            spec_hash: service.spec_hash.clone(),
            revision: Some(snapshot.revision.short()),
            spec: document,
            seen_ms: now,
        },
    )?;
    attempt.finish(AttemptResult::Succeeded, None, None, &status)?;
    Ok(action)
}

/// Where a service's members stand.
#[derive(Debug, Default)]
struct Members {
    total: usize,
    /// Ready with the current roles document.
    ready: usize,
    /// Not counted ready, by what they are (`HealthCheckFailed`,
    /// `OlderRolesDocument`), with up to a few names each.
    others: BTreeMap<String, (usize, Vec<Name>)>,
    /// Some member failed and is not being retried (Stalled, or failed with
    /// nothing in progress).
    failed: bool,
}

/// How many names per category a message lists.
const NAMED: usize = 3;

impl Members {
    fn count(
        store: &Store,
        desired: &DesiredState,
        service: &Name,
    ) -> Result<Members, ReconcileError> {
        let mut members = Members::default();
        for (name, roles) in desired
            .roles
            .iter()
            .filter(|(_, r)| r.services.contains(service))
        {
            members.total += 1;
            let status = store.status(&ObjectKey::machine(name.clone()))?;
            let category = match &status {
                None => Reason::NotReconciled.to_string(),
                Some(s) if s.is_ready() => {
                    let current = s
                        .last_applied
                        .as_ref()
                        .is_some_and(|a| a.roles_hash.as_deref() == Some(roles.hash.as_str()));
                    if current {
                        members.ready += 1;
                        continue;
                    }
                    "OlderRolesDocument".to_owned()
                }
                Some(s) => {
                    let reason = s
                        .condition(ConditionKind::Ready)
                        .map_or(Reason::NotReconciled, |c| c.reason);
                    members.failed |= reason.is_failure() && !retrying(s);
                    reason.to_string()
                }
            };
            let entry = members.others.entry(category).or_default();
            entry.0 += 1;
            if entry.1.len() < NAMED {
                entry.1.push(name.clone());
            }
        }
        Ok(members)
    }

    /// `2 roles, 3 members: 2 Ready, 1 HealthCheckFailed (web2)`.
    fn message(&self, roles: usize) -> String {
        let mut parts = vec![format!("{} Ready", self.ready)];
        for (category, (count, names)) in &self.others {
            let names: Vec<&str> = names.iter().map(Name::as_str).collect();
            let more = if *count > names.len() { ", …" } else { "" };
            parts.push(format!("{count} {category} ({}{more})", names.join(", ")));
        }
        format!(
            "{roles} roles, {} members: {}",
            self.total,
            parts.join(", ")
        )
    }

    /// Ready when every member is; otherwise waiting for them (looked at
    /// again every dependency poll) or failed with them.
    fn set_status<D>(
        &self,
        ctx: &Context<D>,
        status: &mut StatusRecord,
        message: String,
        spec_hash: &str,
    ) -> Action {
        if self.ready == self.total {
            set_ready(status, Reason::Resolved, message, spec_hash);
            return Action::AwaitChange;
        }
        let now = now_ms();
        status.observed_spec_hash = Some(spec_hash.to_owned());
        status.set_condition(ConditionKind::Stalled, false, Reason::Unset, "", now);
        if self.failed {
            status.set_condition(
                ConditionKind::Ready,
                false,
                Reason::DependencyFailed,
                &message,
                now,
            );
            status.set_condition(ConditionKind::Reconciling, false, Reason::Unset, "", now);
            return Action::AwaitChange;
        }
        status.set_condition(
            ConditionKind::Ready,
            false,
            Reason::DependencyNotReady,
            &message,
            now,
        );
        status.set_condition(
            ConditionKind::Reconciling,
            true,
            Reason::DependencyNotReady,
            &message,
            now,
        );
        Action::Requeue(ctx.config.dependency_poll)
    }
}

/// Whether a not-Ready machine is still being worked on: retried after a
/// transient failure, or waiting for its own dependencies.
fn retrying(status: &StatusRecord) -> bool {
    status
        .condition(ConditionKind::Reconciling)
        .is_some_and(|c| c.status)
}
