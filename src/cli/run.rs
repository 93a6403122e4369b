//! `converge run`: the daemon.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt;
use tokio::sync::mpsc;

use super::args::{DirArg, EXIT_FATAL, EXIT_OK, StateArg};
use crate::api::{self, ApiState};
use crate::controller::applier::Config as ApplierConfig;
use crate::controller::context::{Config, Context};
use crate::controller::daemon::{self, DaemonOptions, Signals};
use crate::controller::git_source::{self, Outcome};
use crate::controller::metrics::Metrics;
use crate::controller::vmops::{self, VmOp};
use crate::controller::{lifecycle, preview};
use crate::source::Source;
use crate::spec::{HumanDuration, Kind};

/// Run the controller: keep every object converged.
///
/// Reconciles everything at start, then whenever a file of the directory
/// changes (only the objects whose spec, roles or build inputs changed), on
/// each object's resync interval (±10% jitter), and on request
/// (`converge reconcile KEY`). An invalid directory is logged with
/// file:line:col and not applied; the last valid desired state stays in
/// force. While it runs, `converge status/history/facts/plan` ask it over a
/// Unix socket in the state directory (mode 0600); a socket left by a daemon
/// that did not stop cleanly is replaced (and logged), one that answers
/// stops this one from starting.
///
/// Notifications: with --notify URL or --notify-exec CMD, each condition
/// transition (Ready, failed, rolled back, drift, recovered) is sent as
/// signed JSON; `converge events` lists them from the store. GET /healthz on
/// the socket answers 200 while the loop runs and the source was read
/// within three intervals (--reread-interval; with --git, --poll), 503 with
/// the reason otherwise.
///
/// Signals: SIGHUP re-reads the directory now (as a file change does: only
/// objects whose spec, roles or build inputs changed are reconciled; with
/// --git it also fetches). The
/// directory is also re-read every --reread-interval whatever the file watch
/// said, which catches changes it missed (an overflowed inotify queue, a
/// network file system). The first SIGTERM/SIGINT stops scheduling and lets
/// running steps finish (up to --grace); a second aborts them.
///
/// With --git URL, desired state comes from converge's own clone of that
/// remote (STATE/git): fetched every --poll and on `converge fetch`, applied
/// only as a fast-forward of the last applied commit, only when its tip's
/// SSH signature verifies against --allowed-signers (if given), and only
/// when valid; --dir is then a directory inside the repository. A refused
/// tip is logged at ERROR and recorded as an event; the last applied commit
/// stays in force. An unreachable remote is retried with backoff.
///
/// Exit codes: 0 stopped cleanly; 1 cannot start (invalid directory, store
/// locked by another daemon or damaged, a missing allowed-signers file, a
/// branch the remote does not have).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge run --dir /srv/fleet --state /var/lib/converge/controller\n  converge run --dir . --log-format json\n  converge run --dir /mnt/nfs/fleet --reread-interval 15s   # a watch that misses changes\n  converge run --git git@example.com:me/fleet.git --branch main --dir hosts --allowed-signers /etc/converge/allowed_signers\n  converge run --dir /srv/fleet --notify http://alerts.lan:8080/converge --notify-secret-file /etc/converge/notify.secret\n  converge run --dir /srv/fleet --notify-exec 'curl -fsS --data-binary @- https://ntfy.sh/my-topic'\n  kill -HUP \"$(systemctl show -p MainPID --value converge)\"   # re-read the directory now\n\nA systemd unit:\n  [Service]\n  ExecStart=/usr/local/bin/converge run --dir /srv/fleet --state /var/lib/converge/controller\n  ExecReload=/bin/kill -HUP $MAINPID\n  KillSignal=SIGTERM\n  TimeoutStopSec=60"
)]
pub struct Args {
    #[command(flatten)]
    pub dir: DirArg,
    #[command(flatten)]
    pub git: super::fetch::GitArgs,
    #[command(flatten)]
    pub state: StateArg,
    #[command(flatten)]
    pub ssh: super::args::SshArgs,
    #[command(flatten)]
    pub keep: super::args::KeepArg,
    #[command(flatten)]
    pub cache: super::args::CacheArg,
    /// Objects reconciled at once (default: the whole fleet up to 256; a
    /// slow or dead host holds one slot).
    #[arg(long, default_value_t = crate::controller::context::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Builds run at once, apart from the reconciles that wait for them
    /// (default: one per CPU).
    #[arg(long, default_value_t = crate::controller::context::default_builds())]
    pub builds: usize,
    /// Quiet window after a file change before reloading.
    #[arg(long, default_value = "500ms")]
    pub debounce: HumanDuration,
    /// Re-read the whole directory this often, whatever the file watch
    /// reported (an unchanged directory reconciles nothing); `0s` turns it
    /// off. SIGHUP re-reads at once.
    #[arg(long, value_name = "DURATION", default_value = "1m")]
    pub reread_interval: HumanDuration,
    /// How long running steps may finish after the first stop signal.
    #[arg(long, default_value = "30s")]
    pub grace: HumanDuration,
    /// First retry delay after a transient failure (doubling up to 15m).
    #[arg(long, default_value = "2s")]
    pub retry_delay: HumanDuration,
    #[command(flatten)]
    pub notify: super::notify::NotifyArgs,
}

/// How long the daemon's start waits for the first fetch of a Git source.
const FIRST_FETCH_WAIT: Duration = Duration::from_secs(20);

pub fn run(args: Args) -> anyhow::Result<u8> {
    let runtime = super::args::runtime()?;
    // Before anything else: a stop signal during start-up stops cleanly.
    let signals = runtime
        .block_on(async { Signals::install() })
        .context("install signal handlers")?;
    let notify = super::notify::prepare(&args.notify)?;
    let state = &args.state.state;
    let metrics = Arc::new(Metrics::new());
    let git_config = args.git.config(&args.dir.dir)?;
    let mut early_store = None;
    let mut git = None;
    let mut fetch_tx = None;
    let root = match git_config {
        None => args.dir.dir.clone(),
        Some(config) => {
            super::args::create_state_dir(state)?;
            let store = super::args::open_store(state)?;
            let root = git_source::desired_root(state, &config.dir);
            let poll = config.poll;
            let mut tracker = runtime
                .block_on(git_source::Tracker::open(
                    config,
                    state,
                    store.clone(),
                    Some(metrics.clone()),
                ))
                .context("start the Git source")?;
            // A remote that hangs must not keep the daemon (and its API)
            // from starting on the commit applied before: past the bound,
            // the poll loop tries again at once.
            let first = runtime
                .block_on(async { tokio::time::timeout(FIRST_FETCH_WAIT, tracker.poll()).await });
            let first_poll = match &first {
                Err(_) => {
                    tracing::warn!(
                        wait_secs = FIRST_FETCH_WAIT.as_secs(),
                        "the first fetch of the Git source did not end in time; starting anyway and trying again"
                    );
                    Duration::ZERO
                }
                Ok(Outcome::Failed {
                    error,
                    transient: false,
                }) => {
                    eprintln!("error: {error}");
                    return Ok(EXIT_FATAL);
                }
                Ok(Outcome::Failed { .. }) => poll.min(Duration::from_secs(5)),
                Ok(outcome) => {
                    tracing::info!(result = %outcome.describe(), "first fetch of the Git source");
                    poll
                }
            };
            if !tracker.has_applied_tree() {
                tracing::warn!(
                    "no commit of the Git source is applied yet: converging nothing until one is accepted"
                );
            }
            let (tx, requests) = mpsc::unbounded_channel();
            fetch_tx = Some(tx.clone());
            git = Some((tracker, requests, tx, first_poll, first.ok()));
            early_store = Some(store);
            root
        }
    };
    let mut source = Source::new(&root);
    let snapshot = if git.as_ref().is_some_and(|(t, ..)| !t.has_applied_tree()) {
        git_source::empty_snapshot(&root)
    } else {
        let (assembled, _stats, snapshot) =
            lifecycle::load(&mut source).with_context(|| format!("load {}", root.display()))?;
        let Some(snapshot) = snapshot else {
            for d in &assembled.diagnostics {
                eprintln!("{d}");
            }
            eprintln!("error: the desired state is invalid; not starting");
            return Ok(EXIT_FATAL);
        };
        snapshot
    };
    let store = match early_store {
        Some(store) => store,
        None => {
            super::args::create_state_dir(state)?;
            super::args::open_store(state)?
        }
    };
    let driver = args
        .ssh
        .driver(state, &root, super::args::DAEMON_SSH_PERSIST);
    let config = Config {
        concurrency: args.concurrency,
        builds: args.builds,
        keep_generations: usize::from(args.keep.keep_generations),
        build_cache_max: args.cache.build_cache_max.bytes(),
        ..Config::default()
    };
    let (manual_tx, manual_rx) = mpsc::unbounded_channel();
    // The same metrics the Git source counts its refusals in.
    let notifier = {
        let _runtime = runtime.enter();
        notify.start(metrics.notifications.clone())
    };
    let ctx = Arc::new(
        Context::new(store.clone(), driver, config, state, snapshot)
            .with_wakeups(manual_tx.clone())
            .with_notifier(notifier),
    );
    let mut applier = ApplierConfig {
        concurrency: args.concurrency,
        shutdown_grace: args.grace.get(),
        ..ApplierConfig::default()
    };
    applier.backoff.min_delay = args.retry_delay.get();
    let reread = args.reread_interval.get();
    let options = DaemonOptions {
        applier,
        debounce: args.debounce.get(),
        reread: (!reread.is_zero()).then_some(reread),
    };
    let socket = crate::api::client::socket_path(state);
    // Canonical, so that `plan --dir` through another path (relative, a
    // symlink) is recognised as this directory and any other is refused.
    let watched = if git.is_some() {
        root.clone()
    } else {
        std::fs::canonicalize(&root).with_context(|| format!("resolve {}", root.display()))?
    };
    runtime.block_on(async {
        let listener = api::bind(&socket).context("start the local API")?;
        let plan_ctx = ctx.clone();
        let vm_ctx = ctx.clone();
        let known_ctx = ctx.clone();
        let verb_queue = manual_tx.clone();
        let api_state = ApiState {
            health: ctx.health.clone(),
            store,
            dir: watched,
            // In the desired state in force, or a removed VM still to stop.
            known: Arc::new(move |key| {
                known_ctx.snapshot().desired.contains(key)
                    || (key.kind == Kind::VirtualMachine
                        && known_ctx.store.status(key).ok().flatten().is_some())
            }),
            manual: manual_tx,
            retries: ctx.retries.clone(),
            metrics: metrics.clone(),
            fetch: fetch_tx,
            plan: Arc::new(move || {
                let ctx = plan_ctx.clone();
                async move { preview::plan(&ctx).await }.boxed()
            }),
            vm: Arc::new(move |name, op| {
                let ctx = vm_ctx.clone();
                let queue = verb_queue.clone();
                // Spawned: a client that hangs up must not cut a snapshot or
                // a revert off halfway.
                let task = tokio::spawn(async move {
                    let snapshot = ctx.snapshot();
                    let done = vmops::operate(
                        &ctx.driver,
                        &ctx.store,
                        &ctx.vm_locks,
                        &ctx.vm_root,
                        Some(&snapshot.desired),
                        &name,
                        &op,
                    )
                    .await
                    .map_err(|e| format!("{:#}", anyhow::Error::new(e)))?;
                    // A power verb changes what the VM's reconcile does:
                    // run it now (a restart is planned there).
                    if matches!(op, VmOp::Stop | VmOp::Start | VmOp::Restart | VmOp::Delete) {
                        let key = crate::spec::ObjectKey::vm(name.clone());
                        if op == VmOp::Restart {
                            if let Ok(mut keys) = ctx.restarts.lock() {
                                keys.insert(key.clone());
                            }
                        }
                        let _ = queue.send(key);
                    }
                    Ok(done)
                });
                async move {
                    task.await
                        .unwrap_or_else(|e| Err(format!("the verb's task failed: {e}")))
                }
                .boxed()
            }),
        };
        let server = tokio::spawn(async move {
            if let Err(e) = api::serve(listener, api_state).await {
                tracing::error!(error = %e, "the local API stopped");
            }
        });
        tracing::info!(socket = %socket.display(), "local API listening");
        let git = git.map(
            |(tracker, requests, fetch, first_poll, first)| daemon::GitRun {
                tracker,
                requests,
                fetch,
                first_poll,
                first,
            },
        );
        let result = daemon::run(ctx, source, options, manual_rx, metrics, signals, git).await;
        server.abort();
        let _ = std::fs::remove_file(&socket);
        result.context("run the daemon")
    })?;
    // Let detached helper threads (the file watcher) wind down.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(EXIT_OK)
}
