//! `converge plan`: what a reconcile would do, without doing it.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context as _;

use super::args::{DirArg, EXIT_FATAL, EXIT_OK, Output, StateArg};
use crate::controller::context::{Config, Context};
use crate::controller::{lifecycle, preview};
use crate::plan::{Plan, render_text};
use crate::source::Source;

/// Exit code of --detailed-exitcode when the plan has changes.
pub const EXIT_CHANGES: u8 = 2;

/// Show what converge would change, Terraform-style.
///
/// Observes every machine (one round trip each) and compares desired spec,
/// what was last applied and what is there now: `+ create`, `~ update` (with
/// the fields that changed), `-/+ replace`, `- destroy`/forget, and a
/// separate section for objects changed outside converge (drift). Changes
/// nothing.
///
/// While a daemon runs on --state it holds the store, so it is asked
/// instead, and it answers only for the directory it watches (compared
/// after resolving symlinks and relative paths). For any other --dir the
/// plan is refused with exit 1, naming the directory the daemon watches:
/// plan that one, or stop the daemon.
///
/// Exit codes: 0 success; 1 error (invalid directory, a daemon on --state
/// watching another directory); with --detailed-exitcode, 0 no changes,
/// 2 changes present.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge plan --dir . --state /var/lib/converge/controller\n  converge plan --dir . --detailed-exitcode || echo 'changes pending'\n  converge plan --dir . --output json"
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
    /// Exit 2 when there are changes, 0 when none (1 stays an error).
    #[arg(long)]
    pub detailed_exitcode: bool,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut source = Source::new(&args.dir.dir);
    let (assembled, _stats, snapshot) =
        lifecycle::load(&mut source).with_context(|| format!("load {}", args.dir.dir.display()))?;
    let Some(snapshot) = snapshot else {
        let mut out = std::io::stdout().lock();
        for d in &assembled.diagnostics {
            writeln!(out, "{d}")?;
        }
        writeln!(out, "invalid desired state: no plan")?;
        return Ok(EXIT_FATAL);
    };
    // The daemon plans only the directory it watches: it is told which one
    // this plan is of, resolved as the daemon resolved its own.
    let dir = std::fs::canonicalize(&args.dir.dir)
        .with_context(|| format!("resolve {}", args.dir.dir.display()))?;
    let path = format!(
        "/v1/plan?dir={}",
        crate::api::client::query_value(dir.as_os_str().as_encoded_bytes())
    );
    let plan: Plan = match super::args::ask(&args.state.state, "GET", &path)? {
        Some((200, body)) => serde_json::from_str(&body).context("parse the daemon's plan")?,
        Some((409, body)) => {
            eprintln!("error: {}", body.trim());
            return Ok(EXIT_FATAL);
        }
        Some((status, body)) => anyhow::bail!("the daemon answered {status}: {}", body.trim()),
        None => {
            let state = &args.state.state;
            super::args::create_state_dir(state)?;
            let store = super::args::open_store(state)?;
            let driver = args
                .ssh
                .driver(state, &args.dir.dir, super::args::ONE_SHOT_SSH_PERSIST);
            let ctx = Arc::new(Context::new(
                store,
                driver,
                Config {
                    keep_generations: usize::from(args.keep.keep_generations),
                    ..Config::default()
                },
                state,
                snapshot,
            ));
            super::args::runtime()?.block_on(preview::plan(&ctx))
        }
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&plan)?)?,
        Output::Text => write!(out, "{}", render_text(&plan))?,
    }
    Ok(if args.detailed_exitcode && plan.has_changes() {
        EXIT_CHANGES
    } else {
        EXIT_OK
    })
}
