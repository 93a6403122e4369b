//! [`SshTarget`] itself and its one master connection: built lazily on
//! first use, checked for life before each use, rebuilt after it died,
//! optionally kept past this process and resumed by the next one
//! (`keep_master`), and ssh's connect failures sorted into [`SshError`]s
//! that say whether a retry can help. Also the retry of session opens sshd
//! refused, and `ssh -G` with the options the master gets, for diagnostics.
//! It must not run commands or upload files (`exec.rs`, `upload.rs`), and
//! must never hold two masters for one target.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio as StdStdio;
use std::sync::Arc;
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use super::config::{client_config, known_hosts_line, short_hash, write_private};
use super::control_dir::{ControlDir, prepare_private_dir};
use super::error::SshError;
use super::options::{SshOptions, check_options, check_socket_dir};
use crate::driver::target::{Target, TargetError};

/// How long the local mux alive check may take (it never touches the network).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A machine over SSH. Cheap to share (`&self` everywhere); commands and
/// uploads run concurrently up to `max_sessions` over one master.
///
/// Invariant: at most one master connection exists per `SshTarget` at a
/// time; it is built on first use and rebuilt only after it was found dead.
/// A new `SshTarget` for the same options ([`SshTarget::fresh`]) has its own
/// master: that is how a caller proves a machine still accepts connections.
#[derive(Debug)]
pub struct SshTarget {
    pub(super) options: Arc<SshOptions>,
    /// Our generated ssh_config: fixed options first, then the user's config.
    config_file: PathBuf,
    /// The known_hosts file handed to ssh, when the spec names one or a key.
    known_hosts_file: Option<PathBuf>,
    master: Mutex<Option<Arc<Session>>>,
    pub(super) sessions: Arc<Semaphore>,
    /// The [`ControlDir`] this target's files and sockets are in, when it
    /// was given one: held so that a temporary one is removed only after
    /// the last target using it (declared last, so it is dropped after the
    /// master).
    control_dir: Option<Arc<ControlDir>>,
}

impl SshTarget {
    /// Checks the options and the control directory (creating it, mode
    /// 0700, when missing; refusing one that is not this user's own with
    /// mode 0700, or that another user could replace, see
    /// `control_dir.rs`), then writes the client files (the generated
    /// ssh_config and, for a `host_key`, a known_hosts file, both 0600)
    /// into it. Does not connect: the master is built on first use.
    pub fn new(options: SshOptions) -> Result<Self, SshError> {
        Self::with_control_dir(options, None)
    }

    /// [`SshTarget::new`] in `dir`, which replaces `options.control_dir`
    /// and is held as long as this target (and its [`fresh`] copies). In a
    /// temporary `dir` the master is never kept for another process: the
    /// directory goes when this one ends.
    ///
    /// [`fresh`]: SshTarget::fresh
    pub fn in_control_dir(mut options: SshOptions, dir: Arc<ControlDir>) -> Result<Self, SshError> {
        options.control_dir = dir.path().to_path_buf();
        if dir.is_temporary() {
            options.keep_master = false;
        }
        Self::with_control_dir(options, Some(dir))
    }

    fn with_control_dir(
        mut options: SshOptions,
        control_dir: Option<Arc<ControlDir>>,
    ) -> Result<Self, SshError> {
        check_options(&options)?;
        // From here on the checked, resolved path is the one used.
        options.control_dir = prepare_private_dir(&options.control_dir)?;
        check_socket_dir(&options.control_dir)?;
        let known_hosts_file = match (&options.host_key, &options.known_hosts) {
            (Some(key), _) => {
                let line = known_hosts_line(&options.host, options.port, key)?;
                let path = options
                    .control_dir
                    .join(format!("kh-{}", short_hash(line.as_bytes())));
                write_private(&path, line.as_bytes())?;
                Some(path)
            }
            (None, Some(file)) => Some(file.clone()),
            (None, None) => None,
        };
        let config = client_config(&options, known_hosts_file.is_some())?;
        let config_file = options
            .control_dir
            .join(format!("cfg-{}", short_hash(config.as_bytes())));
        write_private(&config_file, config.as_bytes())?;
        let sessions = Arc::new(Semaphore::new(options.max_sessions.max(1)));
        Ok(Self {
            options: Arc::new(options),
            config_file,
            known_hosts_file,
            master: Mutex::new(None),
            sessions,
            control_dir,
        })
    }

    /// A target for the same machine with the same options but its own
    /// master connection (built on first use).
    pub fn fresh(&self) -> Self {
        let options = if self.options.keep_master {
            Arc::new(SshOptions {
                keep_master: false,
                ..SshOptions::clone(&self.options)
            })
        } else {
            Arc::clone(&self.options)
        };
        Self {
            options,
            config_file: self.config_file.clone(),
            known_hosts_file: self.known_hosts_file.clone(),
            master: Mutex::new(None),
            sessions: Arc::new(Semaphore::new(self.options.max_sessions.max(1))),
            control_dir: self.control_dir.clone(),
        }
    }

    /// The options this target was built with.
    pub fn options(&self) -> &SshOptions {
        &self.options
    }

    /// The generated ssh_config file ssh reads (`ssh -F`).
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// `user@host` and the ssh options that make another OpenSSH client
    /// (Nix's `nix copy`) run over this target's master: connected first,
    /// the same config, host-key checking and identity, so a client that
    /// cannot use the master checks the host key as strictly as converge.
    pub async fn reuse_options(&self) -> Result<(String, Vec<String>), TargetError> {
        let session = self.master().await?;
        let o = &self.options;
        let mut args = vec![
            "-F".to_owned(),
            self.config_file.display().to_string(),
            "-o".to_owned(),
            format!("ControlPath={}", session.control_socket().display()),
            "-o".to_owned(),
            "ControlMaster=no".to_owned(),
            "-o".to_owned(),
            if o.accept_new_host_keys && o.host_key.is_none() {
                "StrictHostKeyChecking=accept-new".to_owned()
            } else {
                "StrictHostKeyChecking=yes".to_owned()
            },
            "-o".to_owned(),
            "BatchMode=yes".to_owned(),
            "-p".to_owned(),
            o.port.to_string(),
        ];
        if let Some(file) = &self.known_hosts_file {
            args.push("-o".to_owned());
            args.push(format!("UserKnownHostsFile={}", file.display()));
        }
        if let Some(identity) = &o.identity_file {
            args.push("-i".to_owned());
            args.push(identity.display().to_string());
        }
        Ok((format!("{}@{}", o.user, o.host), args))
    }

    /// Connects now, when no live master exists (otherwise does nothing).
    pub async fn connect(&self) -> Result<(), TargetError> {
        self.master().await.map(drop)
    }

    /// The control socket of the current master, when there is one.
    pub async fn master_socket(&self) -> Option<PathBuf> {
        let slot = self.master.lock().await;
        slot.as_ref().map(|s| s.control_socket().to_path_buf())
    }

    /// Closes the master connection (running sessions end with it). The
    /// next call connects again.
    pub async fn disconnect(&self) {
        let session = self.master.lock().await.take();
        if let Some(session) = session {
            match Arc::try_unwrap(session) {
                Ok(session) => {
                    if let Err(error) = session.close().await {
                        tracing::debug!(target_host = %self.describe(), %error, "closing an ssh master failed");
                    }
                }
                // Still in use: the last user's drop shuts it down.
                Err(shared) => drop(shared),
            }
        }
    }

    pub(super) fn destination(&self) -> String {
        self.describe()
    }

    pub(super) fn ssh_error(&self, source: SshError) -> TargetError {
        TargetError::Ssh {
            target: self.describe(),
            source: Box::new(source),
        }
    }

    /// The live master, connecting when there is none or it died.
    pub(super) async fn master(&self) -> Result<Arc<Session>, TargetError> {
        let mut slot = self.master.lock().await;
        if let Some(session) = slot.as_ref() {
            let alive = tokio::time::timeout(CHECK_TIMEOUT, session.check()).await;
            if matches!(alive, Ok(Ok(()))) {
                return Ok(Arc::clone(session));
            }
            tracing::info!(target_host = %self.describe(), "ssh master connection is gone; connecting again");
            if self.options.keep_master && socket_is_dead(session.control_socket()) {
                self.forget_kept(session.control_socket());
            }
            *slot = None;
        } else if self.options.keep_master {
            if let Some(session) = self.resume_kept().await {
                let session = Arc::new(session);
                *slot = Some(Arc::clone(&session));
                return Ok(session);
            }
        }
        let mut session = self.launch().await?;
        if self.options.keep_master {
            session = self.keep(session);
        }
        let session = Arc::new(session);
        *slot = Some(Arc::clone(&session));
        Ok(session)
    }

    /// The file naming the kept master for these options: the same
    /// destination, client files and persistence share one master. The
    /// files that decide how a master authenticates (the ssh_configs read,
    /// the known_hosts file, the identity) count by their content, so
    /// editing one never resumes a master made under the old one.
    fn kept_pointer(&self) -> PathBuf {
        let o = &self.options;
        let content = |path: Option<&Path>| -> String {
            path.and_then(|p| std::fs::read(p).ok())
                .map_or_else(|| "-".to_owned(), |bytes| short_hash(&bytes))
        };
        let home_config = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh/config"));
        let user_config = o.ssh_config.clone().or(home_config);
        let identity = format!(
            "{}\0{}\0{}\0{:?}\0{}\0{:?}\0{}\0{:?}\0{}\0{}\0{}\0{}",
            o.user,
            o.host,
            o.port,
            self.config_file,
            content(user_config.as_deref()),
            self.known_hosts_file,
            content(self.known_hosts_file.as_deref()),
            o.identity_file,
            content(o.identity_file.as_deref()),
            content(Some(Path::new("/etc/ssh/ssh_config"))),
            o.accept_new_host_keys,
            o.master_idle_exit.as_secs(),
        );
        o.control_dir
            .join(format!("keep-{}", short_hash(identity.as_bytes())))
    }

    /// Whether `ctl` is a master socket converge made directly under this
    /// target's control directory (what a pointer file may name).
    fn is_own_socket(&self, ctl: &Path) -> bool {
        let Some(dir) = ctl.parent() else {
            return false;
        };
        dir.parent() == Some(self.options.control_dir.as_path())
            && ctl.file_name() == Some(std::ffi::OsStr::new("master"))
            && dir
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".ssh-connection"))
            && !ctl
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
    }

    /// Leaves `session`'s master running past this process and records its
    /// socket for the next one. Returns a handle to the same master that
    /// does not stop it when dropped.
    fn keep(&self, session: Session) -> Session {
        let (ctl, log) = session.detach();
        let pointer = self.kept_pointer();
        if let Err(error) = write_private(&pointer, ctl.as_os_str().as_encoded_bytes()) {
            tracing::debug!(target_host = %self.describe(), %error, "recording a kept ssh master failed; the next run connects again");
        }
        Session::resume_mux(ctl, log)
    }

    /// The master an earlier process kept for these options, when it is
    /// still alive; a dead one is cleaned up.
    async fn resume_kept(&self) -> Option<Session> {
        let pointer = self.kept_pointer();
        let bytes = std::fs::read(&pointer).ok()?;
        let ctl = PathBuf::from(String::from_utf8(bytes).ok()?);
        // Only a socket converge made in this control directory.
        if !self.is_own_socket(&ctl) {
            return None;
        }
        let log = ctl.parent()?.join("log");
        let session = Session::resume_mux(ctl.clone().into_boxed_path(), Some(log.into()));
        match tokio::time::timeout(CHECK_TIMEOUT, session.check()).await {
            Ok(Ok(())) => {
                tracing::debug!(target_host = %self.describe(), "resumed a kept ssh master");
                Some(session)
            }
            _ => {
                // Removed only when nothing listens any more: a master that
                // was merely slow to answer may serve another process.
                if socket_is_dead(&ctl) {
                    self.forget_kept(&ctl);
                }
                None
            }
        }
    }

    /// Removes a dead kept master's directory and, if it still names that
    /// master, the pointer to it.
    fn forget_kept(&self, ctl: &Path) {
        let pointer = self.kept_pointer();
        if std::fs::read(&pointer).is_ok_and(|b| b == ctl.as_os_str().as_encoded_bytes()) {
            let _ = std::fs::remove_file(&pointer);
        }
        if self.is_own_socket(ctl) {
            if let Some(dir) = ctl.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    async fn launch(&self) -> Result<Session, TargetError> {
        let o = &self.options;
        let mut builder = SessionBuilder::default();
        builder
            .user(o.user.clone())
            .port(o.port)
            .known_hosts_check(if o.accept_new_host_keys && o.host_key.is_none() {
                KnownHosts::Add
            } else {
                KnownHosts::Strict
            })
            .connect_timeout(whole_seconds(o.connect_timeout))
            .server_alive_interval(whole_seconds(o.server_alive_interval))
            .control_directory(&o.control_dir)
            .control_persist(idle_persist(o.master_idle_exit))
            .config_file(&self.config_file);
        if let Some(file) = &self.known_hosts_file {
            builder.user_known_hosts_file(file);
        }
        if let Some(identity) = &o.identity_file {
            builder.keyfile(identity);
        }
        // ConnectTimeout covers TCP and the banner, not key exchange and
        // login: bound the whole launch so a host that stalls later cannot
        // hang the caller.
        let bound = o
            .connect_timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(5));
        let started = std::time::Instant::now();
        let launched = tokio::time::timeout(bound, builder.connect_mux(&o.host)).await;
        let destination = self.destination();
        match launched {
            Ok(Ok(session)) => {
                // The openssh crate makes the master's directory with the
                // default mode (0755 after a usual umask). The control
                // directory's 0700 keeps others out of it already; this
                // keeps every directory converge leaves there at 0700 too.
                if let Some(dir) = session.control_socket().parent() {
                    if self.is_own_socket(session.control_socket()) {
                        let _ =
                            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                    }
                }
                tracing::debug!(target_host = %destination, elapsed = ?started.elapsed(), "ssh master connected");
                Ok(session)
            }
            Ok(Err(source)) => Err(self.ssh_error(self.classify_connect_error(source))),
            Err(_elapsed) => Err(self.ssh_error(SshError::ConnectTimedOut {
                destination,
                after: bound,
            })),
        }
    }

    /// Sorts ssh's complaint (the master's log text) into what it means.
    fn classify_connect_error(&self, source: openssh::Error) -> SshError {
        let o = &self.options;
        let text = match &source {
            openssh::Error::Connect(e) | openssh::Error::Master(e) => e.to_string(),
            other => other.to_string(),
        };
        let trusted = match (&o.host_key, &o.known_hosts) {
            (Some(_), _) => "the spec's hostKey".to_owned(),
            (None, Some(file)) => format!("known_hosts file {}", file.display()),
            (None, None) => "the user's and the system's known_hosts".to_owned(),
        };
        if text.contains("HOST IDENTIFICATION HAS CHANGED")
            || text.contains("Host key verification failed") && !text.contains("is known for")
        {
            let fingerprint = text
                .split_whitespace()
                .find(|word| word.starts_with("SHA256:"))
                .map(|fp| format!(", it offered {}", fp.trim_end_matches('.')))
                .unwrap_or_default();
            SshError::HostKeyMismatch {
                host: o.host.clone(),
                port: o.port,
                trusted,
                fingerprint,
                source,
            }
        } else if text.contains("is known for") || text.contains("No matching host key") {
            SshError::HostKeyUnknown {
                host: o.host.clone(),
                port: o.port,
                trusted,
                source,
            }
        } else if text.contains("Permission denied (") {
            SshError::Auth {
                destination: self.destination(),
                source,
            }
        } else {
            SshError::Connect {
                destination: self.destination(),
                source,
            }
        }
    }

    /// After a failure on an established master: was it the connection?
    /// Returns the error to report when the master is dead.
    pub(super) async fn lost_connection(
        &self,
        session: &Session,
        source: openssh::Error,
    ) -> Result<(), TargetError> {
        match tokio::time::timeout(CHECK_TIMEOUT, session.check()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(self.ssh_error(SshError::ConnectionLost {
                destination: self.destination(),
                bound: self.options.dead_link_bound(),
                source,
            })),
        }
    }
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs().max(1))
}

fn idle_persist(d: Duration) -> ControlPersist {
    match usize::try_from(d.as_secs())
        .ok()
        .and_then(std::num::NonZeroUsize::new)
    {
        Some(secs) => ControlPersist::IdleFor(secs),
        None => ControlPersist::ClosedAfterInitialConnection,
    }
}

/// Whether nothing listens on the master socket `ctl` any more (it is gone,
/// or connecting is refused), as opposed to a master slow to answer.
fn socket_is_dead(ctl: &Path) -> bool {
    match std::os::unix::net::UnixStream::connect(ctl) {
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ),
    }
}

/// How long refused session opens are retried before the refusal itself is
/// reported (a `MaxSessions` below our own limit would refuse forever).
const REFUSED_RETRY_FOR: Duration = Duration::from_secs(10);

/// Runs `open` (which opens a session channel) again while sshd refuses the
/// channel, for at most [`REFUSED_RETRY_FOR`]. sshd frees a closed channel's
/// slot a moment after the client sees it close, so a burst can briefly
/// exceed `MaxSessions`; a refused open ran nothing, so opening again is
/// safe. Past the bound the refusal itself is returned.
pub(super) async fn open_again_if_refused<T, E, F, Fut>(target: &str, mut open: F) -> Result<T, E>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut pause = REFUSED_PAUSE;
    let give_up = Instant::now() + REFUSED_RETRY_FOR;
    loop {
        match open().await {
            Err(error) if session_refused(&error) && Instant::now() < give_up => {
                tracing::debug!(target_host = %target, ?pause, "sshd refused a session (MaxSessions); opening again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(REFUSED_PAUSE_MAX);
            }
            other => return other,
        }
    }
}

/// First pause before opening a session sshd refused; doubles up to the max.
const REFUSED_PAUSE: Duration = Duration::from_millis(20);
const REFUSED_PAUSE_MAX: Duration = Duration::from_millis(500);

/// Whether the master reports that sshd refused to open a session channel
/// (its `MaxSessions` reached): the request was never run, so it is safe to
/// open again. The mux client's error type is not re-exported by `openssh`,
/// so the master's own wording is matched.
fn session_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.to_string().contains("open refused by peer") {
            return true;
        }
        next = e.source();
    }
    false
}

/// Runs `ssh -G` with the same configuration the master gets, for checks and
/// diagnostics: the effective client options, lowercase `key value` lines.
pub async fn effective_client_config(target: &SshTarget) -> io::Result<String> {
    let o = target.options();
    let mut argv: Vec<String> = vec![
        "-G".into(),
        "-F".into(),
        target.config_file().to_string_lossy().into_owned(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        format!(
            "StrictHostKeyChecking={}",
            if o.accept_new_host_keys && o.host_key.is_none() {
                "accept-new"
            } else {
                "yes"
            }
        ),
        "-o".into(),
        format!(
            "ConnectTimeout={}",
            whole_seconds(o.connect_timeout).as_secs()
        ),
        "-o".into(),
        format!(
            "ServerAliveInterval={}",
            whole_seconds(o.server_alive_interval).as_secs()
        ),
        "-p".into(),
        o.port.to_string(),
        "-l".into(),
        o.user.clone(),
    ];
    if let Some(file) = &target.known_hosts_file {
        argv.push("-o".into());
        argv.push(format!("UserKnownHostsFile={}", file.display()));
    }
    argv.push(o.host.clone());
    let output = tokio::process::Command::new("ssh")
        .args(&argv)
        .stdin(StdStdio::null())
        .output()
        .await?;
    if !output.status.success() {
        let mut message = String::new();
        let _ = write!(
            message,
            "ssh -G failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return Err(io::Error::other(message));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
