//! The Git source's arguments (`--git`, `--branch`, `--poll`,
//! `--allowed-signers`), shared by `run` and `reconcile --once`, and
//! `converge fetch`, which asks the daemon to fetch now.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::args::{EXIT_FATAL, EXIT_OK, StateArg};
use crate::controller::git_source::{GitConfig, Outcome, Tracker};
use crate::spec::HumanDuration;

/// Where desired state comes from when it is a Git remote.
#[derive(Debug, Clone, clap::Args)]
pub struct GitArgs {
    /// Pull desired state from this Git remote (any URL `git fetch` takes;
    /// your SSH config and credential helpers apply) into a private clone
    /// under the state directory; --dir is then a directory inside the
    /// repository. Only fast-forwards of the last applied commit are applied.
    #[arg(long, value_name = "URL")]
    pub git: Option<String>,
    /// The branch to follow.
    #[arg(long, default_value = "main", requires = "git")]
    pub branch: String,
    /// How often to fetch (`converge fetch` fetches at once).
    #[arg(long, value_name = "DURATION", default_value = "60s", requires = "git")]
    pub poll: HumanDuration,
    /// Apply a new tip only if `git verify-commit` accepts its SSH signature
    /// against this file (ssh-keygen's allowed-signers format: `PRINCIPAL
    /// ssh-ed25519 AAAA…` per line).
    #[arg(long, value_name = "FILE", requires = "git")]
    pub allowed_signers: Option<PathBuf>,
}

impl GitArgs {
    /// The source's configuration, when --git was given; `dir` is --dir.
    pub fn config(&self, dir: &Path) -> anyhow::Result<Option<GitConfig>> {
        let Some(url) = &self.git else {
            return Ok(None);
        };
        // git runs in the clone: a relative path must not change meaning.
        let allowed_signers = match &self.allowed_signers {
            Some(path) => Some(std::path::absolute(path).map_err(|e| {
                anyhow::anyhow!("resolve --allowed-signers {}: {e}", path.display())
            })?),
            None => None,
        };
        Ok(Some(GitConfig {
            url: url.clone(),
            branch: self.branch.clone(),
            dir: dir.to_path_buf(),
            allowed_signers,
            poll: self.poll.get().max(Duration::from_millis(100)),
        }))
    }
}

/// At start-up: one fetch, retried with backoff `tries` times while the
/// remote cannot be reached. Returns the last outcome.
pub(crate) async fn first_poll(tracker: &mut Tracker, tries: u32) -> Outcome {
    let mut delay = Duration::from_secs(1);
    let mut outcome = tracker.poll().await;
    for _ in 1..tries {
        if !matches!(
            outcome,
            Outcome::Failed {
                transient: true,
                ..
            }
        ) {
            break;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
        outcome = tracker.poll().await;
    }
    outcome
}

/// Ask the daemon to fetch its Git source now and apply the tip if it
/// passes (fast-forward, signature, valid desired state).
///
/// Waits for that fetch and prints what it did. Exit codes: 0 the branch's
/// tip is in force (applied now, or already); 1 the tip was refused, the
/// fetch failed, no daemon runs, or the daemon reads a directory.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge fetch --state /var/lib/converge/controller\n  converge fetch --output json"
)]
pub struct FetchArgs {
    #[command(flatten)]
    pub state: StateArg,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: super::args::Output,
}

/// How long `converge fetch` waits for the daemon's fetch.
const FETCH_WAIT: Duration = Duration::from_secs(300);

pub fn run(args: FetchArgs) -> anyhow::Result<u8> {
    let state = &args.state.state;
    let Some((status, body)) = super::args::ask_within(state, "POST", "/v1/fetch", FETCH_WAIT)?
    else {
        eprintln!(
            "error: no daemon answers at {}: start `converge run --git URL`, or use \
             `converge reconcile --once --git URL` to fetch and apply once",
            crate::api::client::socket_path(state).display()
        );
        return Ok(EXIT_FATAL);
    };
    if status != 200 {
        eprintln!("error: {}", body.trim());
        return Ok(EXIT_FATAL);
    }
    let outcome: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("parse the daemon's answer: {e}"))?;
    let kind = outcome["outcome"].as_str().unwrap_or_default();
    if args.output == super::args::Output::Json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        let commit = outcome["commit"].as_str().unwrap_or_default();
        let short = commit.get(..12).unwrap_or(commit);
        match kind {
            "applied" => println!("applied {short}"),
            "unchanged" => println!("up to date at {short}"),
            "refused" => eprintln!(
                "error: refused {short}: {}; the last applied revision stays in force",
                outcome["reason"].as_str().unwrap_or_default()
            ),
            _ => eprintln!(
                "error: fetch failed: {}",
                outcome["error"].as_str().unwrap_or_default()
            ),
        }
    }
    Ok(if matches!(kind, "applied" | "unchanged") {
        EXIT_OK
    } else {
        EXIT_FATAL
    })
}
