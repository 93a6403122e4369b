//! Reconcile of one Service: its effect is each member machine's roles
//! document (resolved with the desired state), so its one step is
//! `resolve-roles`, recorded when its spec changed; a Service is Ready once
//! resolved.

use std::time::Instant;

use super::attempt::Attempt;
use super::record::set_ready;
use crate::controller::applier::Action;
use crate::controller::context::Context;
use crate::controller::error::ReconcileError;
use crate::plan::{self, DesiredKind};
use crate::spec::ObjectKey;
use crate::store::records::{Applied, AttemptResult, Reason, SpecRecord, now_ms};

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
    let members = snapshot
        .desired
        .roles
        .values()
        .filter(|r| r.services.contains(&key.name))
        .count();
    let message = format!(
        "{} roles resolved for {members} machines",
        service.spec.roles.len()
    );
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
        set_ready(&mut status, Reason::Resolved, message, &service.spec_hash);
        ctx.store.put_status(key, &status)?;
        return Ok(Action::AwaitChange);
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
    set_ready(&mut status, Reason::Resolved, message, &service.spec_hash);
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
    Ok(Action::AwaitChange)
}
