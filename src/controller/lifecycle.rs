//! Starting the loop, and what happens around it: loading the desired state
//! into a snapshot, recovering attempts a crash cut short, forgetting objects
//! removed from the YAML, and waking machines whose dependencies became Ready.
//!
//! Shared by `reconcile --once` and the daemon, so both behave the same.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::applier::{self, Config as ApplierConfig, Finished, Phase, Request, RunSummary};
use super::context::{Context, Snapshot};
use super::error::ReconcileError;
use super::metrics::Metrics;
use super::reconcile::reconcile;
use crate::driver::capability::Drivers;
use crate::driver::git;
use crate::driver::protocol::MachineFacts;
use crate::source::{LoadStats, Source};
use crate::spec::{Assembled, DesiredState, Kind, ObjectKey};
use crate::store::records::{ConditionKind, Reason, now_ms};

/// Loads the directory; a valid result becomes a snapshot.
pub fn load(
    source: &mut Source,
) -> Result<(Assembled, LoadStats, Option<Snapshot>), crate::source::SourceError> {
    let (mut assembled, stats) = source.load()?;
    let Some(desired) = assembled.desired.take() else {
        return Ok((assembled, stats, None));
    };
    // The walk the hash does fails on what the load's walk failed on; an
    // entry that changed in between makes this load invalid the same way.
    match crate::source::content_hash(source.root()) {
        Ok(inputs) => {
            let snapshot = Snapshot {
                desired,
                revision: git::revision(source.root(), &inputs),
                root: source.root().to_path_buf(),
            };
            Ok((assembled, stats, Some(snapshot)))
        }
        Err(e) => {
            assembled
                .diagnostics
                .extend(e.errors.iter().map(crate::source::entry_error));
            Ok((assembled, stats, None))
        }
    }
}

/// Every object key of a desired state, machines first.
pub fn keys(desired: &DesiredState) -> Vec<ObjectKey> {
    desired.spec_hashes().into_keys().collect()
}

/// Records attempts left in progress by a crash as interrupted, and returns
/// their keys: they are observed again and requeued at once.
pub fn recover_interrupted<D>(ctx: &Context<D>) -> Vec<ObjectKey> {
    let keys = match ctx.store.interrupted() {
        Ok(keys) => keys,
        Err(e) => {
            tracing::error!(error = %e, "failed to list interrupted attempts");
            return Vec::new();
        }
    };
    for key in &keys {
        let Ok(Some(mut status)) = ctx.store.status(key) else {
            continue;
        };
        let Some(in_progress) = status.in_progress.take() else {
            continue;
        };
        let record = in_progress.interrupted(key.clone(), now_ms());
        tracing::warn!(object = %key, attempt = record.id, "attempt was interrupted by a restart; observing again");
        if let Err(e) = ctx.store.finish_attempt(&record, &status) {
            tracing::error!(object = %key, error = %e, "failed to record interrupted attempt");
        }
    }
    keys
}

/// Releases held artifacts (of `key`, or of every object): the next
/// reconcile tries them again. Returns the keys released.
pub fn release_held<D>(ctx: &Context<D>, key: Option<&ObjectKey>) -> Vec<ObjectKey> {
    let statuses = match ctx.store.statuses() {
        Ok(statuses) => statuses,
        Err(e) => {
            tracing::error!(error = %e, "failed to list statuses");
            return Vec::new();
        }
    };
    let mut released = Vec::new();
    for (k, mut status) in statuses {
        if key.is_some_and(|key| *key != k) || status.held.is_none() {
            continue;
        }
        status.held = None;
        match ctx.store.put_status(&k, &status) {
            Ok(()) => released.push(k),
            Err(e) => tracing::error!(object = %k, error = %e, "failed to release a held artifact"),
        }
    }
    released
}

/// An artifact built or used this recently is never pruned from the build
/// cache (a build in flight, one about to be installed).
const CACHE_RECENT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Prunes the build cache: keeps every artifact a kept generation on some
/// machine uses (by the last facts) or a machine last applied, and bounds
/// the rest by `build_cache_max`. Logs what it removed; a failure is logged,
/// never fatal.
pub async fn prune_build_cache<D: Drivers>(ctx: &Context<D>) {
    let mut used = HashSet::new();
    for (key, status) in ctx.store.statuses().unwrap_or_default() {
        if key.kind != Kind::Machine {
            continue;
        }
        used.extend(status.last_applied.map(|a| a.artifact));
        let facts = ctx.store.facts(&key).ok().flatten();
        if let Some(facts) = facts.and_then(|f| MachineFacts::from_record(&f.facts)) {
            used.extend(facts.generations.iter().map(|g| g.hash().to_owned()));
            used.extend(facts.confirmed.map(|g| g.hash().to_owned()));
        }
    }
    match ctx
        .driver
        .prune_builds(used, ctx.config.build_cache_max, CACHE_RECENT)
        .await
    {
        Ok(pruned) if pruned.removed > 0 => tracing::info!(
            removed = pruned.removed,
            freed_bytes = pruned.freed_bytes,
            kept = pruned.kept,
            kept_bytes = pruned.kept_bytes,
            "pruned the build cache"
        ),
        Ok(pruned) => tracing::debug!(
            kept = pruned.kept,
            kept_bytes = pruned.kept_bytes,
            "the build cache needs no pruning"
        ),
        Err(e) => tracing::warn!(
            error = %crate::telemetry::error_chain(&e),
            "failed to prune the build cache"
        ),
    }
}

/// Forgets objects that are in the store but not in the desired state, and
/// returns them. VMs are not forgotten here: they are returned for a
/// reconcile that stops them (and deletes their disks only with
/// `onDelete: delete`) before forgetting them. A desired state that came up
/// empty while the store knows objects forgets nothing: an emptied directory
/// is far more often a mistake than an intent.
pub fn forget_removed<D>(ctx: &Context<D>, desired: &DesiredState) -> Vec<ObjectKey> {
    let wanted: BTreeSet<ObjectKey> = keys(desired).into_iter().collect();
    let known = ctx.store.keys().unwrap_or_default();
    let removed: Vec<ObjectKey> = known.into_iter().filter(|k| !wanted.contains(k)).collect();
    if removed.is_empty() {
        return removed;
    }
    if desired.is_empty() {
        tracing::warn!(
            known = removed.len(),
            "the desired-state directory has no objects; forgetting nothing (an empty directory is never applied as 'remove everything')"
        );
        return Vec::new();
    }
    for key in removed.iter().filter(|k| k.kind != Kind::VirtualMachine) {
        tracing::info!(object = %key, "removed from the desired state; forgotten, nothing on it is uninstalled");
        if let Err(e) = ctx.store.forget(key) {
            tracing::error!(object = %key, error = %e, "failed to forget");
        }
    }
    removed
}

/// For every machine, the machines that wait for it (role `after`) and the
/// services it is a member of, and for every VM with a `machine:`, that
/// machine: the reverse of what each waits
/// for, built once per desired state so waking dependents is not a scan of
/// the fleet per finished reconcile.
pub fn dependents_index(desired: &DesiredState) -> HashMap<ObjectKey, Vec<ObjectKey>> {
    let mut index: HashMap<ObjectKey, Vec<ObjectKey>> = HashMap::new();
    // A machine living in a VM waits for that VM.
    for (vm_name, vm) in &desired.vms {
        if let Some(machine) = &vm.spec.machine {
            index
                .entry(ObjectKey::vm(vm_name.clone()))
                .or_default()
                .push(ObjectKey::machine(machine.value.clone()));
        }
    }
    for (name, roles) in &desired.roles {
        for earlier in &roles.after {
            index
                .entry(ObjectKey::machine(earlier.clone()))
                .or_default()
                .push(ObjectKey::machine(name.clone()));
        }
        // A service is Ready only when all its members are.
        if !roles.services.is_empty() {
            index
                .entry(ObjectKey::machine(name.clone()))
                .or_default()
                .extend(roles.services.iter().map(|s| ObjectKey::service(s.clone())));
        }
    }
    index
}

/// Whether `key` last ended waiting for dependencies.
pub fn is_waiting<D>(ctx: &Context<D>, key: &ObjectKey) -> bool {
    ctx.store.status(key).ok().flatten().is_some_and(|s| {
        s.condition(ConditionKind::Reconciling)
            .is_some_and(|c| c.status && c.reason == Reason::DependencyNotReady)
    })
}

/// A running loop: send requests, read finished reconciles, steer shutdown.
pub struct Loop {
    pub requests: mpsc::UnboundedSender<Request<ObjectKey>>,
    pub finished: mpsc::UnboundedReceiver<Finished<ObjectKey, ReconcileError>>,
    pub phase: watch::Sender<Phase>,
    pub handle: JoinHandle<RunSummary<ObjectKey>>,
}

/// Starts the applier over `ctx`, recording each reconcile in `metrics`.
pub fn start<D: Drivers>(
    ctx: Arc<Context<D>>,
    mut config: ApplierConfig,
    metrics: Arc<Metrics>,
) -> Loop {
    let (requests, requests_rx) = mpsc::unbounded_channel();
    let (finished_tx, finished) = mpsc::unbounded_channel();
    let (phase, phase_rx) = watch::channel(Phase::Running);
    config.queue_depth = Some(metrics.queue_depth.clone());
    let handle = tokio::spawn(applier::run(
        config,
        requests_rx,
        move |key: ObjectKey| {
            let ctx = ctx.clone();
            let metrics = metrics.clone();
            let span = tracing::info_span!("reconcile", object = %key, revision = %ctx.snapshot().revision.short());
            let kind = key.kind.key_prefix();
            let timed = async move {
                let started = std::time::Instant::now();
                let result = reconcile(ctx, key).await;
                let failure = result.as_ref().err().map(|e| e.reason().as_str());
                metrics.observe(kind, started.elapsed().as_secs_f64(), failure);
                result
            };
            tracing::Instrument::instrument(timed, span)
        },
        finished_tx,
        phase_rx,
    ));
    Loop {
        requests,
        finished,
        phase,
        handle,
    }
}
