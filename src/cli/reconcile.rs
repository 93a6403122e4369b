//! `converge reconcile`: converge every object once and exit, or ask a
//! running daemon to reconcile one object now.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use super::args::{DirArg, EXIT_FATAL, EXIT_OK, Output, StateArg};
use crate::controller::applier::Config as ApplierConfig;
use crate::controller::context::{Config, Context};
use crate::controller::once::{self, OnceOptions};
use crate::controller::{git_source, lifecycle};
use crate::source::Source;
use crate::spec::{HumanDuration, ObjectKey};

/// Exit code: some objects failed (or were rolled back).
pub const EXIT_FAILED: u8 = 3;
/// Exit code: the run did not finish within --timeout.
pub const EXIT_TIMED_OUT: u8 = 4;

/// Converge objects to their spec.
///
/// With --once: load the directory, converge every object (build, install,
/// activate, health-check, roll back on failure, retry transient failures
/// with backoff), print a summary and exit. An invalid directory applies
/// nothing and exits 1. --timeout bounds the whole command, from reading
/// the directory and hashing its build inputs to the last step: past it,
/// running steps are aborted, an object that had not ended is reported not
/// ready (an attempt cut halfway is recorded as Interrupted) and the exit
/// code is 4.
///
/// With --git URL (and --once): fetch the branch into converge's clone
/// under the state directory, apply its tip under the daemon's rules
/// (fast-forward of the last applied commit, SSH signature with
/// --allowed-signers, valid desired state in --dir inside the repository),
/// then converge as above; --timeout bounds the fetch too. A refused tip applies nothing and exits 1, with
/// the commit and the reason on stderr; an unreachable remote is tried
/// three times with backoff, then exits 1.
///
/// With a KEY (and no --once): ask the running daemon to reconcile that
/// object now; a key the daemon's desired state does not have is an error.
///
/// Exit codes: 0 every object Ready; 1 fatal (invalid directory, store
/// locked by a daemon or damaged, unknown KEY, cannot start, a refused or
/// unreachable Git source); 3 some objects
/// failed or were rolled back; 4 timed out.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge reconcile --once --dir examples/quickstart --state /tmp/cv\n  converge reconcile --once --dir . --timeout 10m --output json\n  converge reconcile --once --dir . --retry   # try rolled-back artifacts again\n  converge reconcile --once --git https://example.com/fleet.git --dir hosts --allowed-signers signers\n  converge reconcile machine/web1 --state /var/lib/converge/controller"
)]
pub struct Args {
    /// Converge everything once and exit.
    #[arg(long)]
    pub once: bool,
    /// With a running daemon: the object to reconcile now (machine/NAME, vm/NAME, service/NAME).
    #[arg(conflicts_with = "once")]
    pub key: Option<ObjectKey>,
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
    /// Bound on the whole run (e.g. 10m), loading the directory included;
    /// past it, steps are aborted and the exit code is 4.
    #[arg(long)]
    pub timeout: Option<HumanDuration>,
    /// Tries per object in this run; transient failures are retried with backoff in between.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
    /// Try again what converge holds back: an artifact that was rolled back,
    /// or whose build wrote into the desired-state directory, is not
    /// activated again until its inputs change. With --once: every held
    /// object; with KEY: that object.
    #[arg(long)]
    pub retry: bool,
    /// Objects reconciled at once (default: the whole fleet up to 256; a
    /// slow or dead host holds one slot).
    #[arg(long, default_value_t = crate::controller::context::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Builds run at once, apart from the reconciles that wait for them
    /// (default: one per CPU).
    #[arg(long, default_value_t = crate::controller::context::default_builds())]
    pub builds: usize,
    /// First retry delay after a transient failure (doubling up to 15m).
    #[arg(long, default_value = "2s")]
    pub retry_delay: HumanDuration,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    if let Some(key) = &args.key {
        return request_reconcile(&args.state.state, key, args.retry);
    }
    if !args.once {
        anyhow::bail!(
            "give --once to converge everything once, or an object key to ask the daemon (see --help)"
        );
    }
    // --timeout bounds everything from here, loading and hashing included.
    let deadline = args.timeout.map(|t| Instant::now() + t.get());
    let state = &args.state.state;
    let runtime = super::args::runtime()?;
    let mut early_store = None;
    let root = match args.git.config(&args.dir.dir)? {
        None => args.dir.dir.clone(),
        Some(config) => {
            super::args::create_state_dir(state)?;
            let store = super::args::open_store(state)?;
            let root = git_source::desired_root(state, &config.dir);
            let fetched = runtime.block_on(async {
                let fetch = async {
                    let mut tracker =
                        git_source::Tracker::open(config, state, store.clone(), None).await?;
                    anyhow::Ok(super::fetch::first_poll(&mut tracker, 3).await)
                };
                match deadline {
                    None => Some(fetch.await),
                    Some(deadline) => tokio::time::timeout(
                        deadline.saturating_duration_since(Instant::now()),
                        fetch,
                    )
                    .await
                    .ok(),
                }
            });
            let Some(outcome) = fetched else {
                eprintln!(
                    "error: timed out while fetching and checking the Git source; nothing was applied"
                );
                return Ok(EXIT_TIMED_OUT);
            };
            let outcome = outcome.context("start the Git source")?;
            match &outcome {
                git_source::Outcome::Applied { .. } | git_source::Outcome::Unchanged { .. } => {
                    tracing::info!(result = %outcome.describe(), "Git source");
                }
                git_source::Outcome::Refused { commit, reason } => {
                    eprintln!(
                        "error: refused commit {commit} of the Git source: {reason}; nothing was applied"
                    );
                    return Ok(EXIT_FATAL);
                }
                git_source::Outcome::Failed { error, .. } => {
                    eprintln!("error: {error}; nothing was applied");
                    return Ok(EXIT_FATAL);
                }
            }
            early_store = Some(store);
            root
        }
    };
    let loaded = match deadline {
        None => lifecycle::load(&mut Source::new(&root)),
        Some(deadline) => match load_before(&root, deadline) {
            Some(loaded) => loaded,
            None => return loading_timed_out(&args),
        },
    };
    let (assembled, _stats, snapshot) =
        loaded.with_context(|| format!("load {}", root.display()))?;
    let Some(snapshot) = snapshot else {
        let mut out = std::io::stdout().lock();
        for d in &assembled.diagnostics {
            writeln!(out, "{d}")?;
        }
        writeln!(out, "invalid desired state: nothing was applied")?;
        return Ok(EXIT_FATAL);
    };
    for warning in assembled.warnings() {
        tracing::warn!("{}", warning.to_string().trim_end());
    }
    let store = match early_store {
        Some(store) => store,
        None => {
            super::args::create_state_dir(state)?;
            super::args::open_store(state)?
        }
    };
    let config = Config {
        concurrency: args.concurrency,
        builds: args.builds,
        keep_generations: usize::from(args.keep.keep_generations),
        build_cache_max: args.cache.build_cache_max.bytes(),
        ..Config::default()
    };
    let driver = args
        .ssh
        .driver(state, &root, super::args::ONE_SHOT_SSH_PERSIST);
    let ctx = Arc::new(Context::new(store, driver, config, state, snapshot));
    if args.retry {
        for key in lifecycle::release_held(&ctx, None) {
            tracing::info!(object = %key, "held artifact released: it is tried again (--retry)");
        }
    }
    let mut applier = ApplierConfig {
        concurrency: args.concurrency,
        ..ApplierConfig::default()
    };
    applier.backoff.min_delay = args.retry_delay.get();
    let options = OnceOptions {
        attempts: args.attempts,
        timeout: deadline.map(|d| d.saturating_duration_since(Instant::now())),
        applier,
    };
    // On a terminal, a line per object while it runs; plain log lines otherwise.
    let progress = match args.output {
        Output::Text => super::progress::Progress::start(
            ctx.store.clone(),
            lifecycle::keys(&ctx.snapshot().desired),
        ),
        Output::Json => None,
    };
    let report = runtime.block_on(once::run(ctx.clone(), options));
    if let Some(progress) = progress {
        progress.finish();
    }
    if let Err(e) = ctx.store.flush() {
        tracing::error!(error = %e, "failed to flush the store");
    }

    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
        }
        Output::Text => {
            let rows: Vec<Vec<String>> = report
                .rows
                .iter()
                .map(|r| {
                    vec![
                        r.key.to_string(),
                        if r.ready {
                            "True".into()
                        } else {
                            "False".into()
                        },
                        r.reason.to_string(),
                        super::table::generation_cell(
                            r.current.as_deref(),
                            r.generation.as_deref(),
                        ),
                        r.attempts.to_string(),
                        r.message.clone(),
                    ]
                })
                .collect();
            super::table::write(
                &mut out,
                &[
                    "OBJECT",
                    "READY",
                    "REASON",
                    "GENERATION",
                    "ATTEMPTS",
                    "MESSAGE",
                ],
                &rows,
            )?;
            for key in &report.forgotten {
                writeln!(
                    out,
                    "forgotten: {key} (removed from the YAML; nothing uninstalled)"
                )?;
            }
            let ready = report.rows.iter().filter(|r| r.ready).count();
            let failed = report.rows.len() - ready;
            let how = if report.timed_out { "; timed out" } else { "" };
            writeln!(
                out,
                "revision {}: {ready} ready, {failed} not ready{how}",
                report.revision
            )?;
        }
    }
    Ok(if report.timed_out {
        EXIT_TIMED_OUT
    } else if report.all_ready() {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

type Loaded = Result<
    (
        crate::spec::Assembled,
        crate::source::LoadStats,
        Option<crate::controller::context::Snapshot>,
    ),
    crate::source::SourceError,
>;

/// Loads `dir` on a thread of its own and waits for it until `deadline`;
/// `None` when it did not end by then. Reading a file can block for good (a
/// FIFO, a hung network mount), so the thread is left behind: the command
/// exits right after, which ends it.
fn load_before(dir: &Path, deadline: Instant) -> Option<Loaded> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("load".into())
        .spawn(move || {
            let _ = tx.send(lifecycle::load(&mut Source::new(dir)));
        })
        .ok()?;
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .ok()
}

/// What `--once` reports when the directory did not load within --timeout.
fn loading_timed_out(args: &Args) -> anyhow::Result<u8> {
    let limit = args.timeout.map(|t| t.to_string()).unwrap_or_default();
    eprintln!(
        "error: timed out after {limit} while loading {} (reading its files and hashing its \
         build inputs); nothing was applied. Is a file there unreadable (a FIFO, a hung mount)?",
        args.dir.dir.display()
    );
    if args.output == Output::Json {
        let report = once::OnceReport {
            rows: Vec::new(),
            timed_out: true,
            forgotten: Vec::new(),
            revision: String::new(),
        };
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    }
    Ok(EXIT_TIMED_OUT)
}

/// `converge reconcile KEY`: asks the daemon to reconcile one object now.
fn request_reconcile(state: &std::path::Path, key: &ObjectKey, retry: bool) -> anyhow::Result<u8> {
    let query = if retry { "?retry=true" } else { "" };
    match super::args::ask(state, "POST", &format!("/v1/reconcile/{key}{query}"))? {
        None => {
            eprintln!(
                "error: no daemon answers at {}: start `converge run`, or use `converge reconcile --once{}`",
                crate::api::client::socket_path(state).display(),
                if retry { " --retry" } else { "" }
            );
            Ok(EXIT_FATAL)
        }
        Some((202, body)) => {
            println!("{}", body.trim());
            Ok(EXIT_OK)
        }
        Some((404, body)) => {
            eprintln!("error: {}", body.trim());
            Ok(EXIT_FATAL)
        }
        Some((status, body)) => {
            eprintln!("error: the daemon answered {status}: {}", body.trim());
            Ok(EXIT_FATAL)
        }
    }
}
