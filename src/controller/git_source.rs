//! The Git source (`run --git URL`, `reconcile --once --git URL`): which
//! tip of the remote's branch becomes the desired state, and which is
//! refused.
//!
//! converge keeps its own bare clone (`STATE/git/repo.git`), fetches the
//! branch every poll interval and when asked, and accepts a new tip only
//! when all of these hold: it fast-forwards from the last applied commit
//! (kept in the store, so a restart keeps the base); with
//! `--allowed-signers`, `git verify-commit` accepts the tip's SSH signature
//! (the tip only, as Flux and comin do: its id covers the whole tree and
//! history, and no commit in between is ever applied); and the desired state
//! in `--dir` of its tree is valid. An accepted tip is checked out into
//! `STATE/git/trees/<commit>` and the link `STATE/git/current` is switched
//! to it (a rename, atomic), so the desired-state directory the loop reads,
//! `STATE/git/current/DIR`, keeps one path across commits: paths resolved
//! from it (a VM's backing image, a known_hosts file) do not change, and
//! nothing restarts because of the path. A refused tip is logged at ERROR
//! with its commit and reason, recorded as an event and counted in
//! `converge_source_refusals_total`; the last applied commit stays in
//! force, and stays the base. A fetch that fails is retried with backoff
//! and shown in `status`; it is never fatal.
//!
//! This file decides; git is run by `driver::git_source`. It must not
//! touch the snapshot in force: the daemon reloads once told a tip was
//! applied.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::backoff::{BackoffConfig, ErrorBackoff};
use super::lifecycle;
use super::metrics::Metrics;
use crate::driver::git_source::{GitClone, GitError, Signature};
use crate::spec::diagnostic::escape_path;
use crate::store::Store;
use crate::store::records::{EventSubject, Reason, Refusal, Severity, SourceRecord, now_ms};

/// Bound on one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Trees kept: the one in force and the one before it (a build that started
/// on it may still read it).
const TREES_KEPT: usize = 2;

/// What `--git` and its companions say.
#[derive(Debug, Clone)]
pub struct GitConfig {
    pub url: String,
    pub branch: String,
    /// The desired-state directory inside the repository (relative).
    pub dir: PathBuf,
    /// An allowed-signers file (absolute); `None`: signatures are not checked.
    pub allowed_signers: Option<PathBuf>,
    pub poll: Duration,
}

/// Why the Git source could not be set up (bad input: the command stops).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "read the allowed-signers file {path}: create it with one line per signer \
         (`alice@example.com ssh-ed25519 AAAA…`), or leave out --allowed-signers"
    )]
    AllowedSigners {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the allowed-signers file {path} names no key: add a line `PRINCIPAL ssh-ed25519 AAAA…` \
         per signer"
    )]
    NoSigners { path: PathBuf },
    #[error(
        "--dir {dir} must be a path inside the repository (relative, without `..`) when --git is given"
    )]
    Dir { dir: PathBuf },
    #[error("set up converge's clone of {url}")]
    Git {
        url: String,
        #[source]
        source: GitError,
    },
    #[error("read the Git source's record from the store")]
    Store(#[source] crate::store::StoreError),
}

/// `STATE/git`: converge's clone and its trees (private).
pub fn git_dir(state: &Path) -> PathBuf {
    state.join("git")
}

/// The desired-state directory the loop reads in Git mode:
/// `STATE/git/current/DIR`, one path whatever commit is in force.
pub fn desired_root(state: &Path, dir: &Path) -> PathBuf {
    let current = git_dir(state).join("current");
    if dir == Path::new(".") || dir.as_os_str().is_empty() {
        current
    } else {
        current.join(dir)
    }
}

/// The desired state in force before any commit was accepted: nothing
/// (which forgets nothing the store knows: an empty desired state never
/// removes objects).
pub fn empty_snapshot(root: &Path) -> super::context::Snapshot {
    super::context::Snapshot {
        desired: crate::spec::DesiredState::default(),
        revision: crate::driver::git::Revision {
            commit: None,
            dirty: false,
            build_input: "content:".to_owned(),
        },
        root: root.to_path_buf(),
    }
}

fn trees_dir(state: &Path) -> PathBuf {
    git_dir(state).join("trees")
}

/// `commit` shortened for messages: 12 hex digits.
fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// What one look at the remote ended with; `converge fetch` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The tip is the commit in force.
    Unchanged { commit: String },
    /// The tip is now in force.
    Applied {
        commit: String,
        previous: Option<String>,
    },
    /// The tip was refused (now, or at an earlier fetch).
    Refused { commit: String, reason: String },
    /// The remote could not be read; `transient` when trying again may
    /// help (unreachable), not for a branch that does not exist.
    Failed { error: String, transient: bool },
}

impl Outcome {
    /// One line for humans.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Unchanged { commit } => format!("up to date at {}", short(commit)),
            Outcome::Applied { commit, previous } => match previous {
                Some(p) => format!("applied {} (was {})", short(commit), short(p)),
                None => format!("applied {}", short(commit)),
            },
            Outcome::Refused { commit, reason } => {
                format!("refused {}: {reason}", short(commit))
            }
            Outcome::Failed { error, .. } => format!("fetch failed: {error}"),
        }
    }
}

/// Why a tip is refused: the label of `converge_source_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Unsigned,
    UnknownSigner,
    NotFastForward,
    Invalid,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::Unsigned => "unsigned",
            Cause::UnknownSigner => "unknown-signer",
            Cause::NotFastForward => "not-fast-forward",
            Cause::Invalid => "invalid",
        }
    }
}

/// The source: the clone, the configuration and what was applied.
pub struct Tracker {
    clone: GitClone,
    config: GitConfig,
    state: PathBuf,
    store: Store,
    metrics: Option<Arc<Metrics>>,
    record: SourceRecord,
    /// The refused tip this process already logged at ERROR.
    logged_refusal: Option<String>,
    /// Why this process refused the tip it refused last.
    refused_cause: Option<(String, Cause)>,
    /// The fetch error last logged, so a remote that stays down is not
    /// logged at ERROR on every retry.
    logged_error: Option<String>,
    /// Held for writing while `current` is switched, and by the daemon for
    /// reading while it loads the directory: a load never reads one
    /// commit's file list with another's contents.
    tree_lock: TreeLock,
}

/// See [`Tracker::tree_lock`].
pub type TreeLock = Arc<std::sync::RwLock<()>>;

impl Tracker {
    /// Checks the configuration, opens (or creates) the clone, and reads
    /// what was applied before from the store.
    pub async fn open(
        config: GitConfig,
        state: &Path,
        store: Store,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Tracker, SetupError> {
        if config.dir.is_absolute()
            || config
                .dir
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(SetupError::Dir {
                dir: config.dir.clone(),
            });
        }
        if let Some(path) = &config.allowed_signers {
            check_allowed_signers(path)?;
        }
        let git_error = |source| SetupError::Git {
            url: crate::driver::git_source::redact_url(&config.url),
            source,
        };
        let clone = GitClone::open(&git_dir(state).join("repo.git"), &config.url, FETCH_TIMEOUT)
            .await
            .map_err(git_error)?;
        clone
            .check_branch(&config.branch)
            .await
            .map_err(git_error)?;
        std::fs::create_dir_all(trees_dir(state)).map_err(|source| {
            git_error(GitError::Io {
                path: trees_dir(state),
                source,
            })
        })?;
        let mut record = store
            .source()
            .map_err(SetupError::Store)?
            .unwrap_or_default();
        record.url = clone.url();
        record.branch.clone_from(&config.branch);
        record.dir = config.dir.to_string_lossy().into_owned();
        let mut tracker = Tracker {
            clone,
            config,
            state: state.to_path_buf(),
            store,
            metrics,
            record,
            logged_refusal: None,
            refused_cause: None,
            logged_error: None,
            tree_lock: TreeLock::default(),
        };
        tracker.restore_applied_tree().await;
        Ok(tracker)
    }

    /// The commit in force, if one was ever accepted.
    pub fn applied(&self) -> Option<&str> {
        self.record.applied.as_deref()
    }

    /// Whether the tree of the applied commit is checked out and current.
    /// The lock a load of the checkout holds for reading (see the field).
    pub fn tree_lock(&self) -> TreeLock {
        self.tree_lock.clone()
    }

    pub fn has_applied_tree(&self) -> bool {
        self.applied()
            .is_some_and(|c| self.current_target().as_deref() == Some(c))
    }

    /// The commit `STATE/git/current` points at.
    fn current_target(&self) -> Option<String> {
        let target = std::fs::read_link(git_dir(&self.state).join("current")).ok()?;
        let name = target.file_name()?.to_str()?.to_owned();
        trees_dir(&self.state).join(&name).is_dir().then_some(name)
    }

    /// After a restart (or a lost tree), checks the applied commit out again
    /// if the clone has it.
    /// Checks the applied commit out again when its tree is missing; true
    /// when `current` was switched to it.
    async fn restore_applied_tree(&mut self) -> bool {
        let Some(applied) = self.record.applied.clone() else {
            return false;
        };
        if self.current_target().as_deref() == Some(applied.as_str()) {
            return false;
        }
        if !self.clone.has_commit(&applied).await {
            return false;
        }
        let tree = trees_dir(&self.state).join(&applied);
        let _ = self.clone.remove_checkout(&tree).await;
        match self.clone.check_out(&applied, &tree).await {
            Ok(()) => match self.point_current_at(&applied) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "failed to restore the applied commit's tree");
                    false
                }
            },
            Err(e) => {
                tracing::error!(
                    commit = short(&applied),
                    error = %crate::telemetry::error_chain(&e),
                    "failed to check out the applied commit again"
                );
                false
            }
        }
    }

    /// Fetches the branch and applies or refuses its tip.
    pub async fn poll(&mut self) -> Outcome {
        let fetched = self.clone.fetch(&self.config.branch).await;
        let now = now_ms();
        self.record.fetched_ms = Some(now);
        let tip = match fetched {
            Ok(tip) => tip,
            Err(e) => {
                let error = crate::telemetry::error_chain(&e);
                let transient = e.is_transient();
                self.record.failures = self.record.failures.saturating_add(1);
                self.record.error = Some(error.clone());
                self.save();
                if self.logged_error.as_deref() == Some(error.as_str()) {
                    tracing::warn!(
                        failures = self.record.failures,
                        "the Git source still cannot be fetched; retrying with backoff"
                    );
                } else if transient {
                    tracing::error!(error = %error, url = %self.clone.url(), "cannot fetch the Git source; the last applied revision stays in force, retrying with backoff");
                    self.logged_error = Some(error.clone());
                } else {
                    tracing::error!(error = %error, url = %self.clone.url(), "cannot fetch the Git source; the last applied revision stays in force (check --git and --branch)");
                    self.logged_error = Some(error.clone());
                }
                return Outcome::Failed { error, transient };
            }
        };
        if self.logged_error.take().is_some() {
            tracing::info!(url = %self.clone.url(), "the Git source can be fetched again");
        }
        self.record.tip = Some(tip.clone());
        self.record.succeeded_ms = Some(now);
        self.record.error = None;
        self.record.failures = 0;
        let restored = !self.has_applied_tree() && self.restore_applied_tree().await;
        if self.record.applied.as_deref() == Some(tip.as_str()) {
            self.record.refused = None;
            self.save();
            // A tree checked out again is new to a daemon that started
            // without one: it must load it.
            return if restored {
                Outcome::Applied {
                    commit: tip,
                    previous: None,
                }
            } else {
                Outcome::Unchanged { commit: tip }
            };
        }
        // A refused tip is checked again at each poll (the allowed-signers
        // file may have gained its key), but for invalid desired state,
        // which the same commit cannot mend; the same refusal again is not
        // news: it is logged once per process and recorded once.
        let known = self.record.refused.clone().filter(|r| r.commit == tip);
        let known_invalid = self
            .refused_cause
            .as_ref()
            .is_some_and(|(commit, cause)| *commit == tip && *cause == Cause::Invalid);
        if let Some(refused) = known.as_ref().filter(|_| known_invalid) {
            return self.still_refused(tip, refused.reason.clone());
        }
        match self.check(&tip).await {
            Ok(Ok(())) => self.apply(tip).await,
            Ok(Err((cause, reason))) => {
                self.refused_cause = Some((tip.clone(), cause));
                match known.filter(|r| r.reason == reason) {
                    Some(_) => self.still_refused(tip, reason),
                    None => self.refuse(tip, cause, reason),
                }
            }
            Err(e) => {
                // Not the commit's fault (a disk, a killed git): try again.
                let error = crate::telemetry::error_chain(&e);
                tracing::error!(commit = short(&tip), error = %error, "cannot check the Git source's new tip; trying again later");
                self.record.error = Some(error.clone());
                self.record.failures = self.record.failures.saturating_add(1);
                self.save();
                Outcome::Failed {
                    error,
                    transient: true,
                }
            }
        }
    }

    /// The tip is the commit refused before, for the same reason.
    fn still_refused(&mut self, tip: String, reason: String) -> Outcome {
        if self.logged_refusal.as_deref() == Some(tip.as_str()) {
            tracing::debug!(
                commit = short(&tip),
                "the branch's tip is still the refused commit"
            );
        } else {
            self.log_refusal(&tip, &reason);
        }
        self.save();
        Outcome::Refused {
            commit: tip,
            reason,
        }
    }

    /// Fast-forward, signature and desired state of `tip`, in that order;
    /// the tree is checked out only for a tip that passed the first two.
    /// `Err` when git failed for another reason than the commit.
    async fn check(&mut self, tip: &str) -> Result<Result<(), (Cause, String)>, GitError> {
        if let Some(base) = self.record.applied.clone() {
            if !self.clone.has_commit(&base).await {
                return Ok(Err((
                    Cause::NotFastForward,
                    format!(
                        "the applied commit {} is not in the fetched history, so the tip \
                         cannot be a fast-forward of it (was the branch rewritten?)",
                        short(&base)
                    ),
                )));
            }
            if !self.clone.is_ancestor(&base, tip).await? {
                return Ok(Err((
                    Cause::NotFastForward,
                    format!(
                        "not a fast-forward of the applied commit {} (was the branch force-pushed? \
                         restore it, or push a commit on top of {})",
                        short(&base),
                        short(&base)
                    ),
                )));
            }
        }
        if let Some(allowed) = &self.config.allowed_signers {
            match self.clone.signature(tip).await? {
                Signature::None => {
                    return Ok(Err((
                        Cause::Unsigned,
                        "not signed (--allowed-signers requires an SSH signature on the tip)"
                            .to_owned(),
                    )));
                }
                Signature::Other => {
                    return Ok(Err((
                        Cause::Unsigned,
                        "signed with OpenPGP or X.509, not SSH (--allowed-signers checks only SSH signatures)"
                            .to_owned(),
                    )));
                }
                Signature::Ssh => {}
            }
            if let Err(said) = self.clone.verify(tip, allowed).await? {
                return Ok(Err((
                    Cause::UnknownSigner,
                    format!(
                        "its SSH signature is not accepted by {}: {said}",
                        allowed.display()
                    ),
                )));
            }
        }
        let tree = trees_dir(&self.state).join(tip);
        let _ = self.clone.remove_checkout(&tree).await;
        self.clone.check_out(tip, &tree).await?;
        let root = if self.config.dir == Path::new(".") {
            tree.clone()
        } else {
            tree.join(&self.config.dir)
        };
        let loaded = tokio::task::spawn_blocking(move || {
            lifecycle::load(&mut crate::source::Source::new(root))
        })
        .await;
        let invalid = match loaded {
            Ok(Ok((_, _, Some(_)))) => return Ok(Ok(())),
            Ok(Ok((assembled, _, None))) => {
                let errors: Vec<_> = assembled.errors().collect();
                for d in &errors {
                    tracing::error!(commit = short(tip), file = %escape_path(&d.file), line = d.line, column = d.column, "{}", d.message);
                }
                format!(
                    "invalid desired state in {}: {} error(s), the first: {}",
                    self.config.dir.display(),
                    errors.len(),
                    errors
                        .first()
                        .map(|d| d.to_string())
                        .unwrap_or_default()
                        .trim()
                )
            }
            Ok(Err(e)) => format!(
                "no desired-state directory {} in the commit: {}",
                self.config.dir.display(),
                crate::telemetry::error_chain(&e)
            ),
            Err(e) => format!("loading the commit failed: {e}"),
        };
        let _ = self.clone.remove_checkout(&tree).await;
        Ok(Err((Cause::Invalid, invalid)))
    }

    async fn apply(&mut self, tip: String) -> Outcome {
        if let Err(e) = self.point_current_at(&tip) {
            let reason = format!("switching to its tree failed: {e}");
            return self.refuse(tip, Cause::Invalid, reason);
        }
        let previous = self.record.applied.replace(tip.clone());
        self.record.applied_ms = Some(now_ms());
        self.record.refused = None;
        self.save();
        tracing::info!(
            commit = short(&tip),
            previous = previous.as_deref().map(short),
            "applying the Git source's new tip"
        );
        self.prune_trees(&tip, previous.as_deref()).await;
        Outcome::Applied {
            commit: tip,
            previous,
        }
    }

    fn refuse(&mut self, tip: String, cause: Cause, reason: String) -> Outcome {
        self.log_refusal(&tip, &reason);
        if let Some(metrics) = &self.metrics {
            metrics.source_refused(cause.label());
        }
        let message = format!("commit {} refused: {reason}", short(&tip));
        if let Err(e) = self.store.append_event(
            EventSubject::Source,
            Severity::Error,
            Reason::SourceRefused,
            &message,
        ) {
            tracing::error!(error = %e, "failed to record the refusal as an event");
        }
        self.record.refused = Some(Refusal {
            commit: tip.clone(),
            reason: reason.clone(),
            since_ms: now_ms(),
        });
        self.save();
        Outcome::Refused {
            commit: tip,
            reason,
        }
    }

    fn log_refusal(&mut self, tip: &str, reason: &str) {
        tracing::error!(
            commit = tip,
            applied = self.record.applied.as_deref().map(short).unwrap_or("none"),
            reason,
            "refused commit {} of the Git source: {reason}; the last applied revision stays in force",
            short(tip)
        );
        self.logged_refusal = Some(tip.to_owned());
    }

    /// Points `STATE/git/current` at the tree of `commit` (a new link
    /// renamed over the old one: atomic).
    fn point_current_at(&self, commit: &str) -> std::io::Result<()> {
        let _switching = self
            .tree_lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let git = git_dir(&self.state);
        let staged = git.join("current.new");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(Path::new("trees").join(commit), &staged)?;
        std::fs::rename(&staged, git.join("current"))
    }

    /// Removes trees but the newest [`TREES_KEPT`] (the one in force and the
    /// one before).
    async fn prune_trees(&self, current: &str, previous: Option<&str>) {
        let keep: Vec<&str> = [Some(current), previous]
            .into_iter()
            .flatten()
            .take(TREES_KEPT)
            .collect();
        let Ok(entries) = std::fs::read_dir(trees_dir(&self.state)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if keep.iter().any(|k| name.to_str() == Some(k)) {
                continue;
            }
            if let Err(e) = self.clone.remove_checkout(&entry.path()).await {
                tracing::warn!(tree = %entry.path().display(), error = %crate::telemetry::error_chain(&e), "failed to remove an old tree");
            }
        }
    }

    fn save(&self) {
        if let Err(e) = self.store.put_source(&self.record) {
            tracing::error!(error = %crate::telemetry::error_chain(&e), "failed to record the Git source's state");
        }
    }
}

/// Reads the allowed-signers file once, so a missing or empty one stops the
/// command with what to do instead of refusing every commit.
fn check_allowed_signers(path: &Path) -> Result<(), SetupError> {
    let text = std::fs::read_to_string(path).map_err(|source| SetupError::AllowedSigners {
        path: path.to_path_buf(),
        source,
    })?;
    let names_a_key = text
        .lines()
        .map(str::trim)
        .any(|l| !l.is_empty() && !l.starts_with('#') && l.split_whitespace().count() >= 3);
    if names_a_key {
        Ok(())
    } else {
        Err(SetupError::NoSigners {
            path: path.to_path_buf(),
        })
    }
}

/// A request for a fetch now (`converge fetch`), answered with its outcome.
pub type FetchRequest = oneshot::Sender<Outcome>;

/// Polls the remote every interval (after a failure, with backoff) and
/// when asked; tells `applied` each time a new tip is in force. Runs until
/// both channels close or the task is aborted.
/// Who else hears of each fetch: `/healthz` (a fetch that reached the
/// remote is a source read; one that did not is a failed read) and the
/// notifier (a tip refused, once per tip).
pub struct Listeners {
    pub health: std::sync::Arc<super::health::Health>,
    pub notifier: super::notify::Notifier,
}

impl Listeners {
    /// Tells health what a fetch found, and the notifier a newly refused
    /// tip (`told_refused`: the one told last, so a tip that stays refused
    /// is told once).
    fn tell(&self, outcome: &Outcome, told_refused: &mut Option<String>) {
        match outcome {
            Outcome::Failed { error, .. } => self.health.source_failed(error),
            Outcome::Refused { commit, reason } => {
                self.health.source_read();
                if told_refused.as_deref() != Some(commit.as_str()) {
                    self.notifier.source_refused(
                        short(commit),
                        Reason::SourceRefused,
                        &format!("commit {} refused: {reason}", short(commit)),
                    );
                    *told_refused = Some(commit.clone());
                }
            }
            Outcome::Unchanged { .. } | Outcome::Applied { .. } => {
                self.health.source_read();
                *told_refused = None;
            }
        }
    }
}

pub async fn poll_loop(
    mut tracker: Tracker,
    mut requests: mpsc::UnboundedReceiver<FetchRequest>,
    applied: mpsc::UnboundedSender<String>,
    first_delay: Duration,
    first: Option<Outcome>,
    listeners: Listeners,
) {
    let poll = tracker.config.poll;
    // A source read may be three polls old before /healthz says so.
    listeners.health.set_source_interval(Some(poll));
    let mut told_refused: Option<String> = None;
    // The daemon's start polled once already (`None`: it did not end).
    if let Some(first) = &first {
        listeners.tell(first, &mut told_refused);
    }
    let mut backoff = ErrorBackoff::new(BackoffConfig {
        min_delay: poll.min(Duration::from_secs(5)),
        max_delay: poll.max(Duration::from_secs(300)),
        ..BackoffConfig::default()
    });
    let mut delay = first_delay;
    loop {
        let reply = tokio::select! {
            () = tokio::time::sleep(delay) => None,
            request = requests.recv() => match request {
                Some(reply) => Some(reply),
                None => {
                    // No more requests will come (the API is gone): keep
                    // polling on the interval alone.
                    tokio::time::sleep(delay).await;
                    None
                }
            },
        };
        let outcome = tracker.poll().await;
        delay = match &outcome {
            Outcome::Failed { .. } => backoff.on_failure(&()),
            _ => {
                backoff.on_success(&());
                poll
            }
        };
        listeners.tell(&outcome, &mut told_refused);
        if let Outcome::Applied { commit, .. } = &outcome {
            if applied.send(commit.clone()).is_err() {
                return;
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_desired_state_of_a_git_source_keeps_one_path_under_current() {
        let state = Path::new("/var/lib/converge/controller");
        assert_eq!(
            desired_root(state, Path::new("hosts")),
            Path::new("/var/lib/converge/controller/git/current/hosts")
        );
        assert_eq!(
            desired_root(state, Path::new(".")),
            Path::new("/var/lib/converge/controller/git/current")
        );
    }

    #[test]
    fn an_allowed_signers_file_must_exist_and_name_a_key() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("allowed_signers");
        assert!(matches!(
            check_allowed_signers(&path),
            Err(SetupError::AllowedSigners { .. })
        ));
        std::fs::write(&path, "# nobody yet\n\n").unwrap();
        assert!(matches!(
            check_allowed_signers(&path),
            Err(SetupError::NoSigners { .. })
        ));
        std::fs::write(
            &path,
            "# ops\nalice@example.com namespaces=\"git\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFZa\n",
        )
        .unwrap();
        check_allowed_signers(&path).unwrap();
        let message = SetupError::NoSigners { path: path.clone() }.to_string();
        assert!(message.contains("allowed_signers"), "{message}");
    }

    #[test]
    fn outcomes_name_the_commit_in_twelve_hex_digits() {
        let commit = "96e669e874f6941eb3fead96b1fedd063541b49f".to_owned();
        let refused = Outcome::Refused {
            commit: commit.clone(),
            reason: "not signed".into(),
        };
        assert_eq!(refused.describe(), "refused 96e669e874f6: not signed");
        let json = serde_json::to_value(&refused).unwrap();
        assert_eq!(json["outcome"], "refused");
        assert_eq!(json["commit"], commit);
        let applied = Outcome::Applied {
            commit: commit.clone(),
            previous: None,
        };
        assert_eq!(applied.describe(), "applied 96e669e874f6");
    }
}
