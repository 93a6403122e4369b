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
use crate::controller::metrics::Metrics;
use crate::controller::{lifecycle, preview, vmops};
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
/// Signals: SIGHUP re-reads the directory now (as a file change does: only
/// objects whose spec, roles or build inputs changed are reconciled). The
/// directory is also re-read every --reread-interval whatever the file watch
/// said, which catches changes it missed (an overflowed inotify queue, a
/// network file system). The first SIGTERM/SIGINT stops scheduling and lets
/// running steps finish (up to --grace); a second aborts them.
///
/// Exit codes: 0 stopped cleanly; 1 cannot start (invalid directory, store
/// locked by another daemon or damaged).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge run --dir /srv/fleet --state /var/lib/converge/controller\n  converge run --dir . --log-format json\n  converge run --dir /mnt/nfs/fleet --reread-interval 15s   # a watch that misses changes\n  kill -HUP \"$(systemctl show -p MainPID --value converge)\"   # re-read the directory now\n\nA systemd unit:\n  [Service]\n  ExecStart=/usr/local/bin/converge run --dir /srv/fleet --state /var/lib/converge/controller\n  ExecReload=/bin/kill -HUP $MAINPID\n  KillSignal=SIGTERM\n  TimeoutStopSec=60"
)]
pub struct Args {
    #[command(flatten)]
    pub dir: DirArg,
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
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let runtime = super::args::runtime()?;
    // Before anything else: a stop signal during start-up stops cleanly.
    let signals = runtime
        .block_on(async { Signals::install() })
        .context("install signal handlers")?;
    let mut source = Source::new(&args.dir.dir);
    let (assembled, _stats, snapshot) =
        lifecycle::load(&mut source).with_context(|| format!("load {}", args.dir.dir.display()))?;
    let Some(snapshot) = snapshot else {
        for d in &assembled.diagnostics {
            eprintln!("{d}");
        }
        eprintln!("error: the desired state is invalid; not starting");
        return Ok(EXIT_FATAL);
    };
    let state = &args.state.state;
    super::args::create_state_dir(state)?;
    let store = super::args::open_store(state)?;
    let driver = args
        .ssh
        .driver(state, &args.dir.dir, super::args::DAEMON_SSH_PERSIST);
    let config = Config {
        concurrency: args.concurrency,
        builds: args.builds,
        keep_generations: usize::from(args.keep.keep_generations),
        build_cache_max: args.cache.build_cache_max.bytes(),
        ..Config::default()
    };
    let (manual_tx, manual_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(
        Context::new(store.clone(), driver, config, state, snapshot)
            .with_wakeups(manual_tx.clone()),
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
    let watched = std::fs::canonicalize(&args.dir.dir)
        .with_context(|| format!("resolve {}", args.dir.dir.display()))?;
    runtime.block_on(async {
        let listener = api::bind(&socket).context("start the local API")?;
        let metrics = Arc::new(Metrics::new());
        let plan_ctx = ctx.clone();
        let vm_ctx = ctx.clone();
        let known_ctx = ctx.clone();
        let api_state = ApiState {
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
            plan: Arc::new(move || {
                let ctx = plan_ctx.clone();
                async move { preview::plan(&ctx).await }.boxed()
            }),
            vm: Arc::new(move |name, op| {
                let ctx = vm_ctx.clone();
                // Spawned: a client that hangs up must not cut a snapshot or
                // a revert off halfway.
                let task = tokio::spawn(async move {
                    let snapshot = ctx.snapshot();
                    vmops::operate(
                        &ctx.driver,
                        &ctx.store,
                        &ctx.vm_locks,
                        &ctx.vm_root,
                        Some(&snapshot.desired),
                        &name,
                        &op,
                    )
                    .await
                    .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
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
        let result = daemon::run(ctx, source, options, manual_rx, metrics, signals).await;
        server.abort();
        let _ = std::fs::remove_file(&socket);
        result.context("run the daemon")
    })?;
    // Let detached helper threads (the file watcher) wind down.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(EXIT_OK)
}
