//! `converge run`: the daemon. Keeps every object converged for as long as it
//! runs.
//!
//! On start it records attempts a crash cut short as interrupted and
//! requeues their objects at once, then reconciles everything. Afterwards it
//! reacts to file changes (reloading the directory and enqueuing only the
//! objects whose spec, roles or build inputs changed), to resync intervals
//! (each reconcile requeues itself), to manual requests from the API, and to
//! machines becoming Ready (their dependents are woken). SIGHUP re-reads the
//! directory at once, and a periodic re-read (`--reread-interval`) catches
//! changes the file watch missed (an overflowed inotify queue, a network
//! file system, a watch that failed to start); both go through the same
//! reload as a file change, so an unchanged directory enqueues nothing. An
//! invalid directory is logged with file:line:col and never applied: the
//! last valid desired state stays in force. With a Git source (`--git`),
//! the directory is converge's checkout and is not watched: the source's
//! poll loop (`git_source.rs`) says when a new tip is in force, and the
//! daemon reloads then; SIGHUP also fetches at once. The first SIGTERM or
//! SIGINT stops
//! scheduling and lets running steps finish within the grace period; a
//! second aborts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::applier::{Config as ApplierConfig, Outcome, Phase, Request};
use super::context::{Context, Snapshot};
use super::lifecycle::{self, Loop};
use super::triggers;
use crate::driver::capability::Drivers;
use crate::source::Source;
use crate::spec::diagnostic::escape_path;
use crate::spec::{Kind, ObjectKey};

/// How long a stopping daemon waits for queued notifications.
const NOTIFY_FLUSH: Duration = Duration::from_secs(5);

/// Options of the daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub applier: ApplierConfig,
    /// Quiet window after a file change before reloading.
    pub debounce: Duration,
    /// How often the directory is re-read whatever the file watch said;
    /// `None`: never.
    pub reread: Option<Duration>,
}

/// Why the directory is read again: decides how loudly a reload that finds
/// nothing new, or the same errors again, is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The file watch reported changed paths.
    Files,
    /// SIGHUP.
    Signal,
    /// The periodic re-read.
    Periodic,
    /// The Git source applied a new tip.
    Source,
    /// The file watch was just set up: a change made before it was missed.
    WatchStarted,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Files => "files changed",
            Cause::Signal => "SIGHUP",
            Cause::Periodic => "periodic re-read",
            Cause::Source => "git source",
            Cause::WatchStarted => "changed while the file watch was being set up",
        }
    }
}

/// What a reload found changed, by key.
fn changed_keys(old: &Snapshot, new: &Snapshot) -> (Vec<ObjectKey>, Vec<ObjectKey>) {
    let old_hashes = old.desired.spec_hashes();
    let new_hashes = new.desired.spec_hashes();
    let build_input_changed = old.revision.build_input != new.revision.build_input;
    let mut changed = Vec::new();
    for (key, hash) in &new_hashes {
        let spec_changed = old_hashes.get(key) != Some(hash);
        let roles_changed = key.kind == Kind::Machine
            && old.desired.roles.get(&key.name).map(|r| &r.hash)
                != new.desired.roles.get(&key.name).map(|r| &r.hash);
        let machine_inputs_changed =
            key.kind == Kind::Machine && (build_input_changed || roles_changed);
        if spec_changed || machine_inputs_changed {
            changed.push(key.clone());
        }
        if roles_changed {
            // Its services are Ready only with every member on its current
            // roles document: they look again (and wait for it).
            for roles in [
                old.desired.roles.get(&key.name),
                new.desired.roles.get(&key.name),
            ]
            .into_iter()
            .flatten()
            {
                changed.extend(roles.services.iter().map(|s| ObjectKey::service(s.clone())));
            }
        }
    }
    let removed = old_hashes
        .keys()
        .filter(|k| !new_hashes.contains_key(*k))
        .cloned()
        .collect();
    (changed, removed)
}

/// SIGTERM, SIGINT and SIGHUP, installed before the daemon does anything
/// else, so a stop signal during start-up is a clean stop rather than a kill,
/// and a SIGHUP (whose default action ends a process) never kills it.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside the runtime.
    pub fn install() -> Result<Signals, DaemonError> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(DaemonError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?,
            hup: signal(SignalKind::hangup()).map_err(DaemonError::Signal)?,
        })
    }
}

/// A Git source for the daemon: its tracker, `converge fetch` requests, and
/// how long until its first poll.
pub struct GitRun {
    pub tracker: super::git_source::Tracker,
    pub requests: mpsc::UnboundedReceiver<super::git_source::FetchRequest>,
    /// The sending side of `requests`: SIGHUP fetches too.
    pub fetch: mpsc::UnboundedSender<super::git_source::FetchRequest>,
    pub first_poll: Duration,
    /// What the start's first poll found (`None`: it did not end in time).
    pub first: Option<super::git_source::Outcome>,
}

/// Runs until shut down by signal.
pub async fn run<D: Drivers>(
    ctx: Arc<Context<D>>,
    source: Source,
    options: DaemonOptions,
    manual: mpsc::UnboundedReceiver<ObjectKey>,
    metrics: Arc<super::metrics::Metrics>,
    signals: Signals,
    git: Option<GitRun>,
) -> Result<(), DaemonError> {
    // The directory was read once already, to start; a Git source's first
    // fetch tells health itself.
    if git.is_none() {
        ctx.health.source_read();
    }
    ctx.health.set_source_interval(options.reread);
    let interrupted = lifecycle::recover_interrupted(&ctx);
    let removed = lifecycle::forget_removed(&ctx, &ctx.snapshot().desired);

    let Loop {
        requests,
        mut finished,
        phase,
        handle,
    } = lifecycle::start(ctx.clone(), options.applier.clone(), metrics);
    for key in interrupted {
        let _ = requests.send(Request::Now(key));
    }
    // Removed VMs still need stopping.
    for key in removed
        .into_iter()
        .filter(|k| k.kind == Kind::VirtualMachine)
    {
        let _ = requests.send(Request::Now(key));
    }
    for key in lifecycle::keys(&ctx.snapshot().desired) {
        let _ = requests.send(Request::Now(key));
    }

    let (changes_tx, mut changes) = mpsc::unbounded_channel::<BTreeSet<PathBuf>>();
    let root = source.root().to_path_buf();
    let (applied_tx, mut applied) = mpsc::unbounded_channel::<String>();
    let fetch_on_hup = git.as_ref().map(|git| git.fetch.clone());
    let tree_lock = git.as_ref().map(|git| git.tracker.tree_lock());
    let poller = git.map(|git| {
        tokio::spawn(super::git_source::poll_loop(
            git.tracker,
            git.requests,
            applied_tx,
            git.first_poll,
            git.first,
            super::git_source::Listeners {
                health: ctx.health.clone(),
                notifier: ctx.notifier.clone(),
            },
        ))
    });
    let watched = if poller.is_some() {
        // converge's own checkout: only the source changes it.
        Ok(None)
    } else {
        triggers::watch_dir(&root, options.debounce, changes_tx).map(Some)
    };
    let _watch = match watched {
        Ok(w) => w,
        Err(e) => {
            match options.reread {
                Some(every) => {
                    tracing::error!(error = %crate::telemetry::error_chain(&e), reread_secs = every.as_secs(), "file changes are noticed only by the periodic re-read (or SIGHUP); objects still resync on their interval")
                }
                None => {
                    tracing::error!(error = %crate::telemetry::error_chain(&e), "file changes will not be noticed (the periodic re-read is off): send SIGHUP after changing the directory; objects still resync on their interval")
                }
            }
            None
        }
    };
    let mut reread = options.reread.map(|every| {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    let watching = _watch.is_some();
    let mut reloader = Reloader {
        source,
        rejected: None,
        tree_lock,
    };
    // A change between the start's load and the watch being in place was
    // seen by neither: look once more now (files unchanged since are not
    // parsed again, and nothing is queued when nothing changed).
    if watching {
        reloader.reload(&ctx, &requests, Cause::WatchStarted).await;
    }

    let Signals {
        term: mut sigterm,
        int: mut sigint,
        hup: mut sighup,
    } = signals;
    let mut manual = manual;
    let mut stop_signals = 0;
    let grace = options.applier.shutdown_grace;
    let mut handle = handle;
    let mut indexed_for = ctx.snapshot();
    let mut dependents = lifecycle::dependents_index(&indexed_for.desired);
    tracing::info!(objects = ctx.snapshot().desired.len(), revision = %ctx.snapshot().revision.short(), "converge is running");
    ctx.health.set_running(true);
    let mut beat = tokio::time::interval(super::health::BEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        ctx.health.beat();
        tokio::select! {
            _ = beat.tick() => {}
            summary = &mut handle => {
                if let Ok(summary) = summary {
                    for key in &summary.aborted {
                        tracing::warn!(object = %key, "aborted by shutdown; it is observed again on the next start");
                    }
                }
                break;
            }
            _ = sigterm.recv() => stop_signals += 1,
            _ = sigint.recv() => stop_signals += 1,
            Some(paths) = changes.recv() => {
                tracing::debug!(count = paths.len(), "files changed");
                reloader.reload(&ctx, &requests, Cause::Files).await;
                reset(&mut reread);
            }
            Some(()) = sighup.recv() => {
                tracing::info!(dir = %root.display(), "SIGHUP: re-reading the desired-state directory");
                if let Some(fetch) = &fetch_on_hup {
                    // Nobody waits for the answer.
                    let _ = fetch.send(tokio::sync::oneshot::channel().0);
                }
                reloader.reload(&ctx, &requests, Cause::Signal).await;
                reset(&mut reread);
            }
            () = next_tick(&mut reread) => {
                tracing::debug!(dir = %root.display(), "periodic re-read of the desired-state directory");
                reloader.reload(&ctx, &requests, Cause::Periodic).await;
                lifecycle::prune_build_cache(&ctx).await;
            }
            Some(commit) = applied.recv() => {
                tracing::debug!(%commit, "the Git source applied a new tip");
                reloader.reload(&ctx, &requests, Cause::Source).await;
                reset(&mut reread);
            }
            Some(key) = manual.recv() => {
                tracing::info!(object = %key, "reconcile requested");
                let _ = requests.send(Request::Now(key));
            }
            Some(done) = finished.recv() => {
                let succeeded = matches!(done.outcome, Outcome::Succeeded(_));
                if !succeeded || !lifecycle::is_waiting(&ctx, &done.key) {
                    let snapshot = ctx.snapshot();
                    if !Arc::ptr_eq(&snapshot, &indexed_for) {
                        dependents = lifecycle::dependents_index(&snapshot.desired);
                        indexed_for = snapshot;
                    }
                    for dependent in dependents.get(&done.key).into_iter().flatten() {
                        let ready = ctx.store.status(dependent).ok().flatten().is_some_and(|s| s.is_ready());
                        // A success wakes what waits for it; a failure
                        // makes a Ready service count its members again.
                        let wake = if succeeded { !ready } else { ready && dependent.kind == Kind::Service };
                        if wake {
                            let _ = requests.send(Request::Now(dependent.clone()));
                        }
                    }
                }
            }
        }
        match stop_signals {
            1 => {
                ctx.health.set_running(false);
                tracing::info!(
                    grace_secs = grace.as_secs(),
                    "stopping: no new reconciles; running steps may finish (send the signal again to abort)"
                );
                let _ = phase.send(Phase::Graceful);
                stop_signals = 2;
            }
            3.. => {
                tracing::warn!("aborting running steps");
                let _ = phase.send(Phase::Abort);
            }
            _ => {}
        }
    }
    if let Some(poller) = poller {
        poller.abort();
    }
    ctx.health.set_running(false);
    if let Err(e) = ctx.store.flush() {
        tracing::error!(error = %e, "failed to flush the store");
    }
    // What the last reconciles told is sent before the process goes.
    ctx.notifier.flush(NOTIFY_FLUSH).await;
    tracing::info!("converge stopped");
    Ok(())
}

/// Waits for the next periodic re-read; never, when it is off.
async fn next_tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A reload for another cause just read the directory: the next periodic
/// re-read is a full interval away.
fn reset(ticker: &mut Option<tokio::time::Interval>) {
    if let Some(ticker) = ticker {
        ticker.reset();
    }
}

/// The source and what the last rejected load said, so that a periodic
/// re-read of a directory that is still invalid in the same way does not
/// log the same errors again every interval.
struct Reloader {
    source: Source,
    /// The diagnostics of the last load that was not applied, if the last
    /// load was not applied.
    rejected: Option<Vec<String>>,
    /// A Git source's: held for reading while the checkout is loaded, so
    /// `current` cannot move to another commit halfway through. Without
    /// one, reading the directory is reading the source, for `/healthz`
    /// (with one, the source's fetches are; the checkout is converge's own).
    tree_lock: Option<super::git_source::TreeLock>,
}

impl Reloader {
    /// Reloads the directory; applies it only if valid.
    async fn reload<D: Drivers>(
        &mut self,
        ctx: &Arc<Context<D>>,
        requests: &mpsc::UnboundedSender<Request<ObjectKey>>,
        cause: Cause,
    ) {
        let loaded = tokio::task::block_in_place(|| {
            let _reading = self.tree_lock.as_ref().map(|lock| {
                lock.read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            });
            lifecycle::load(&mut self.source)
        });
        let (assembled, stats, snapshot) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                let error = crate::telemetry::error_chain(&e);
                if self.tree_lock.is_none() {
                    ctx.health.source_failed(&error);
                }
                tracing::error!(%error, cause = cause.as_str(), "cannot read the desired-state directory; keeping the last valid desired state");
                return;
            }
        };
        if self.tree_lock.is_none() {
            ctx.health.source_read();
        }
        let Some(snapshot) = snapshot else {
            let diagnostics: Vec<String> = assembled.errors().map(ToString::to_string).collect();
            let repeated = self.rejected.as_ref() == Some(&diagnostics);
            if repeated && matches!(cause, Cause::Periodic | Cause::WatchStarted) {
                tracing::debug!(
                    errors = diagnostics.len(),
                    "the desired state is still invalid in the same way; keeping the last valid one"
                );
                return;
            }
            for d in assembled.errors() {
                tracing::error!(file = %escape_path(&d.file), line = d.line, column = d.column, "{}", d.message);
            }
            tracing::error!(
                errors = diagnostics.len(),
                cause = cause.as_str(),
                revision = %ctx.snapshot().revision.short(),
                "the desired state is invalid and was not applied; keeping the last valid one"
            );
            self.rejected = Some(diagnostics);
            return;
        };
        self.rejected = None;
        for d in assembled.warnings() {
            tracing::warn!(file = %escape_path(&d.file), line = d.line, column = d.column, "{}", d.message);
        }
        let old = ctx.snapshot();
        let (changed, removed) = changed_keys(&old, &snapshot);
        let revision = snapshot.revision.short();
        let desired = snapshot.desired.clone();
        ctx.replace_snapshot(snapshot);
        let forgotten = if removed.is_empty() {
            Vec::new()
        } else {
            lifecycle::forget_removed(ctx, &desired)
        };
        let mut changed = changed;
        changed.extend(
            forgotten
                .iter()
                .filter(|k| k.kind == Kind::VirtualMachine)
                .cloned(),
        );
        let nothing_new = changed.is_empty() && forgotten.is_empty();
        if matches!(cause, Cause::Periodic | Cause::WatchStarted) && nothing_new {
            tracing::debug!(
                %revision,
                cause = cause.as_str(),
                parsed_files = stats.parsed,
                load_ms = stats.micros / 1000,
                "re-read: nothing changed"
            );
        } else {
            if cause == Cause::Periodic {
                tracing::info!(
                    changed = changed.len(),
                    forgotten = forgotten.len(),
                    "the periodic re-read found changes the file watch had not reported"
                );
            }
            tracing::info!(
                %revision,
                cause = cause.as_str(),
                changed = changed.len(),
                forgotten = forgotten.len(),
                parsed_files = stats.parsed,
                load_ms = stats.micros / 1000,
                "desired state reloaded"
            );
        }
        let order: BTreeMap<ObjectKey, ()> = changed.into_iter().map(|k| (k, ())).collect();
        for key in order.into_keys() {
            let _ = requests.send(Request::Now(key));
        }
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("install signal handlers")]
    Signal(#[source] std::io::Error),
}
