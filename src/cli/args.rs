//! What the subcommands share: exit codes, the common arguments (desired-state
//! directory, state directory, SSH settings, output format), the client for
//! the daemon's API with its timeout, the state directory's creation and the
//! async runtime. No subcommand logic lives here.

use std::path::PathBuf;

/// Exit code: success (and, for `plan --detailed-exitcode`, no changes).
pub const EXIT_OK: u8 = 0;
/// Exit code: fatal error (bad config, cannot start) or invalid input.
pub const EXIT_FATAL: u8 = 1;

/// How long a command waits for the daemon's answer.
pub const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the daemon on `state`'s socket; `Ok(None)` when none listens.
pub(crate) fn ask(
    state: &std::path::Path,
    method: &str,
    path: &str,
) -> anyhow::Result<Option<(u16, String)>> {
    ask_within(state, method, path, CLIENT_TIMEOUT)
}

/// [`ask`] with its own bound on the daemon's answer.
pub(crate) fn ask_within(
    state: &std::path::Path,
    method: &str,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Option<(u16, String)>> {
    let answer = crate::api::client::request(state, method, path, timeout)?;
    Ok(answer.map(|a| (a.status, a.body)))
}

/// Output format of read commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// How many generations targets keep: `plan`, `reconcile` and `run` agree.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct KeepArg {
    /// Complete generations each machine's prune step keeps on its target;
    /// the ones `current` and `confirmed` point at are never removed. With a
    /// daemon running, `plan` shows the daemon's value.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub keep_generations: u16,
}

/// The bound on the controller's build cache.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct CacheArg {
    /// Bound on the build cache (STATE/builds), e.g. 500MiB or 4GiB: artifacts
    /// no kept generation uses are removed, then the least recently used
    /// while it is larger; none used in the last hour. Pruned after each
    /// `reconcile --once` and at each periodic re-read of `run`.
    #[arg(long, default_value = "2GiB")]
    pub build_cache_max: crate::spec::ByteSize,
}

/// The desired-state directory argument shared by commands.
#[derive(Debug, clap::Args)]
pub struct DirArg {
    /// The desired-state directory (YAML files, searched recursively); with
    /// --git, a directory inside the repository, relative to its root.
    #[arg(long, short = 'd', default_value = ".", env = "CONVERGE_DIR")]
    pub dir: PathBuf,
}

/// The controller's state directory argument shared by commands.
#[derive(Debug, clap::Args)]
pub struct StateArg {
    /// The controller's state directory: its store, build cache and API socket.
    #[arg(long, short = 's', default_value_os_t = default_state_dir(), env = "CONVERGE_STATE")]
    pub state: PathBuf,
}

/// How long a one-shot command's idle SSH masters stay up for the next one.
pub(crate) const ONE_SHOT_SSH_PERSIST: std::time::Duration = std::time::Duration::from_secs(60);
/// How long the daemon's idle SSH masters stay up (also across a restart).
pub(crate) const DAEMON_SSH_PERSIST: std::time::Duration = std::time::Duration::from_secs(600);

/// How converge reaches SSH targets; shared by commands that touch machines.
#[derive(Debug, clap::Args)]
pub struct SshArgs {
    /// An ssh_config file to use instead of ~/.ssh/config (a daemon's unit sets it).
    #[arg(long, env = "CONVERGE_SSH_CONFIG")]
    pub ssh_config: Option<PathBuf>,
    /// A known_hosts file for targets that give neither hostKey nor knownHosts.
    #[arg(long, env = "CONVERGE_KNOWN_HOSTS")]
    pub known_hosts: Option<PathBuf>,
    /// Accept and remember host keys never seen before (a changed key is always refused).
    #[arg(long)]
    pub accept_new_host_keys: bool,
    /// SSH sessions at once per host.
    #[arg(long, default_value_t = 8)]
    pub ssh_sessions: usize,
    /// How long a new SSH connection may take.
    #[arg(long, default_value = "10s")]
    pub connect_timeout: crate::spec::HumanDuration,
    /// How long an idle SSH connection stays open after this command ends,
    /// for the next converge command to reuse instead of connecting again
    /// (like Ansible's ControlPersist). Default 60s; `run` keeps idle
    /// connections 10m. `0s` closes them when the command ends.
    #[arg(long, value_name = "DURATION")]
    pub ssh_persist: Option<crate::spec::HumanDuration>,
}

impl SshArgs {
    /// The real drivers, with builds cached and SSH sockets under `state`.
    /// `default_persist` is the command's `--ssh-persist` default.
    pub(crate) fn driver(
        &self,
        state: &std::path::Path,
        root: &std::path::Path,
        default_persist: std::time::Duration,
    ) -> crate::driver::host::HostDriver {
        let mut ssh = crate::driver::host::SshSettings::for_state(state);
        ssh.ssh_config.clone_from(&self.ssh_config);
        ssh.known_hosts.clone_from(&self.known_hosts);
        ssh.accept_new_host_keys = self.accept_new_host_keys;
        ssh.max_sessions = self.ssh_sessions;
        ssh.connect_timeout = self.connect_timeout.get();
        let persist = self.ssh_persist.map_or(default_persist, |d| d.get());
        ssh.keep_masters = !persist.is_zero();
        if ssh.keep_masters {
            ssh.master_idle_exit = persist;
        }
        crate::driver::host::HostDriver::new(
            crate::controller::context::build_cache_dir(state),
            root,
            ssh,
        )
    }
}

/// `/var/lib/converge/controller` for root, `~/.local/state/converge` otherwise.
fn default_state_dir() -> PathBuf {
    let is_root = std::env::var_os("USER").is_some_and(|u| u == "root")
        || std::env::var_os("HOME").is_some_and(|h| h == "/root");
    if is_root {
        return PathBuf::from("/var/lib/converge/controller");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) => PathBuf::from(dir).join("converge"),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/state/converge"))
            .unwrap_or_else(|| PathBuf::from(".converge")),
    }
}

/// Creates the state directory, private to its owner.
pub(crate) fn create_state_dir(state: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::fs::PermissionsExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .map_err(|e| anyhow::anyhow!("create state directory {}: {e}", state.display()))?;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| anyhow::anyhow!("make state directory {} private: {e}", state.display()))?;
    Ok(())
}

/// The async runtime of commands that need one.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("start the async runtime: {e}"))
}

/// Opens the store under the state directory `state`, creating it if
/// needed. Every command opens it here: a store that is locked or damaged
/// is reported by its own message, which names the store and says what to
/// do; other failures say that opening the store failed.
pub(crate) fn open_store(state: &std::path::Path) -> anyhow::Result<crate::store::Store> {
    use crate::store::{Store, StoreError};
    let dir = crate::controller::context::store_dir(state);
    match Store::open(&dir) {
        Ok(store) => Ok(store),
        Err(e @ (StoreError::Damaged { .. } | StoreError::Locked { .. })) => Err(e.into()),
        Err(e) => Err(anyhow::Error::new(e).context("open the store")),
    }
}
