//! A machine reached over SSH as a [`Target`]: the system OpenSSH client
//! through the `openssh` crate's native multiplexing, with ONE master
//! connection per target, built lazily, shared by commands and SFTP uploads,
//! and rebuilt when it died. It owns the client-side safety settings (strict
//! host key checking against the spec's key or known_hosts file, BatchMode,
//! ConnectTimeout, ServerAlive) and turns ssh's failures into errors that say
//! whether a retry can help. It must not run a shell string built with
//! `format!` (commands travel as escaped argv words behind a constant
//! wrapper script), must not prompt for anything, and must not leave a
//! half-uploaded tree at a destination.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio as StdStdio;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::{Sftp, SftpOptions};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::{Instant, timeout_at};

use super::command::{argv_summary, read_tail, unique_suffix};
use super::target::{CommandOutput, OUTPUT_LIMIT, Target, TargetError};

/// Runs every command: reports its process group, exports env, execs argv.
const RUN_SCRIPT: &str = include_str!("run.sh");

/// `sun_path` holds 108 bytes including the NUL terminator.
const SOCKET_PATH_MAX: usize = 107;
/// What the openssh crate and ssh add to the control directory: the crate's
/// per-master `/.ssh-connectionXXXXXX/master`, then ssh's temporary
/// `.XXXXXXXXXXXXXXXX` suffix while it binds the socket.
const SOCKET_PATH_OVERHEAD: usize =
    "/.ssh-connectionXXXXXX/master".len() + ".XXXXXXXXXXXXXXXX".len();
/// How long killing a timed-out remote command may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long removing a failed upload's partial copy may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the local mux alive check may take (it never touches the network).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Files uploaded at once over one SFTP session (requests are pipelined).
const UPLOAD_CONCURRENCY: usize = 16;
/// Bytes read locally and written remotely per SFTP write.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// How to reach one machine over SSH. Built from a spec's `target` plus the
/// controller's settings; [`SshOptions::new`] fills in the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOptions {
    /// Host name or address (or a `Host` alias of the user's ssh_config).
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The host's public key (`ssh-ed25519 AAAA...`, a comment may follow):
    /// the only key accepted. Takes precedence over `known_hosts`.
    pub host_key: Option<String>,
    /// A known_hosts file to check the host key against (instead of the
    /// user's and the system's).
    pub known_hosts: Option<PathBuf>,
    /// A private key to log in with, and only that one.
    pub identity_file: Option<PathBuf>,
    /// Another ssh_config instead of `~/.ssh/config` and `/etc/ssh/ssh_config`.
    pub ssh_config: Option<PathBuf>,
    /// Accept and remember an unknown host key (never a changed one). Off by
    /// default; ignored when `host_key` is set.
    pub accept_new_host_keys: bool,
    /// TCP connect plus banner exchange (`ConnectTimeout`), whole seconds.
    pub connect_timeout: Duration,
    /// `ServerAliveInterval`, whole seconds: with `server_alive_count_max` it
    /// bounds how long a dead link goes unnoticed (interval x (count + 1)).
    pub server_alive_interval: Duration,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: u32,
    /// Sessions open at once over the master (sshd's `MaxSessions` is 10).
    pub max_sessions: usize,
    /// Where control sockets and generated client files live. Must be short
    /// (at most 61 bytes): socket paths are limited to 107 bytes.
    pub control_dir: PathBuf,
    /// An idle master exits after this long, so masters of a controller that
    /// died do not linger (`ControlPersist`); the next call reconnects.
    pub master_idle_exit: Duration,
    /// Hand the master on to the next converge process: it stays up when
    /// this process ends (until idle for `master_idle_exit`), and a target
    /// with the same options in a later process resumes it instead of paying
    /// a new handshake (what Ansible's `ControlPersist=60s` does). Its socket
    /// lives in `control_dir` (0700). Off by default; [`SshTarget::fresh`]
    /// never resumes nor keeps.
    pub keep_master: bool,
}

impl SshOptions {
    /// `root@host:22` with converge's defaults: connect timeout 10 s,
    /// ServerAlive every 2 s, 2 missed, 8 sessions, master idle exit 10 min.
    pub fn new(host: impl Into<String>, control_dir: impl Into<PathBuf>) -> Self {
        Self {
            host: host.into(),
            port: 22,
            user: "root".to_owned(),
            host_key: None,
            known_hosts: None,
            identity_file: None,
            ssh_config: None,
            accept_new_host_keys: false,
            connect_timeout: Duration::from_secs(10),
            server_alive_interval: Duration::from_secs(2),
            server_alive_count_max: 2,
            max_sessions: 8,
            control_dir: control_dir.into(),
            master_idle_exit: Duration::from_secs(600),
            keep_master: false,
        }
    }

    /// The longest a dead link can go unnoticed on an established master:
    /// ssh gives up after `count_max` unanswered probes, sent one interval
    /// apart after one silent interval.
    pub fn dead_link_bound(&self) -> Duration {
        self.server_alive_interval
            .saturating_mul(self.server_alive_count_max.saturating_add(1))
    }
}

/// Why an SSH operation failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "use control directory {dir:?}: socket paths under it would take {len} bytes, over the limit of {max}; choose a shorter directory"
    )]
    ControlPathTooLong {
        dir: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("use ssh option {option} {value:?}: {why}")]
    InvalidOption {
        option: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("write the ssh client file {path:?}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "verify the host key of {host} port {port}: the key the host offered does not match the one converge trusts ({trusted}){fingerprint}. If the host was reinstalled, put its new key in the spec's hostKey (or the knownHosts file), taken from the host itself or from `ssh-keyscan -p {port} {host}` over a network you trust; otherwise the connection may be intercepted. Nothing was run or uploaded"
    )]
    HostKeyMismatch {
        host: String,
        port: u16,
        trusted: String,
        /// ", it offered SHA256:..." when ssh printed the fingerprint.
        fingerprint: String,
        #[source]
        source: openssh::Error,
    },
    #[error(
        "verify the host key of {host} port {port}: no key is known for it ({trusted}) and strict checking is on. Set the spec's hostKey or knownHosts, or opt in to accepting new host keys. Nothing was run or uploaded"
    )]
    HostKeyUnknown {
        host: String,
        port: u16,
        trusted: String,
        #[source]
        source: openssh::Error,
    },
    #[error(
        "log in to {destination}: the host refused every key offered (check identityFile, the agent, and the host's authorized_keys)"
    )]
    Auth {
        destination: String,
        #[source]
        source: openssh::Error,
    },
    #[error("connect to {destination}")]
    Connect {
        destination: String,
        #[source]
        source: openssh::Error,
    },
    #[error("connect to {destination} within {after:?}")]
    ConnectTimedOut {
        destination: String,
        after: Duration,
    },
    #[error(
        "keep the connection to {destination}: it is gone (link down, host down, or sshd stopped) and was dropped after at most {bound:?} without an answer"
    )]
    ConnectionLost {
        destination: String,
        bound: Duration,
        #[source]
        source: openssh::Error,
    },
    #[error("open an ssh session to {destination}")]
    Session {
        destination: String,
        #[source]
        source: openssh::Error,
    },
    #[error("start sftp on {destination}")]
    Sftp {
        destination: String,
        #[source]
        source: openssh_sftp_client::Error,
    },
}

impl SshError {
    /// True when trying again later may succeed: network and session
    /// failures. False for what needs a person: a wrong or unknown host key,
    /// refused login, bad options.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::ControlPathTooLong { .. }
            | Self::InvalidOption { .. }
            | Self::HostKeyMismatch { .. }
            | Self::HostKeyUnknown { .. }
            | Self::Auth { .. } => false,
            Self::Prepare { source, .. } => super::command::io_is_transient(source),
            Self::Connect { source, .. } => !matches!(
                source,
                openssh::Error::Connect(e) | openssh::Error::Master(e)
                    if e.kind() == io::ErrorKind::NotFound
            ),
            Self::ConnectTimedOut { .. }
            | Self::ConnectionLost { .. }
            | Self::Session { .. }
            | Self::Sftp { .. } => true,
        }
    }

    /// True when the host's identity could not be verified.
    pub fn is_host_key_error(&self) -> bool {
        matches!(
            self,
            Self::HostKeyMismatch { .. } | Self::HostKeyUnknown { .. }
        )
    }
}

/// A machine over SSH. Cheap to share (`&self` everywhere); commands and
/// uploads run concurrently up to `max_sessions` over one master.
///
/// Invariant: at most one master connection exists per `SshTarget` at a
/// time; it is built on first use and rebuilt only after it was found dead.
/// A new `SshTarget` for the same options ([`SshTarget::fresh`]) has its own
/// master: that is how a caller proves a machine still accepts connections.
#[derive(Debug)]
pub struct SshTarget {
    options: Arc<SshOptions>,
    /// Our generated ssh_config: fixed options first, then the user's config.
    config_file: PathBuf,
    /// The known_hosts file handed to ssh, when the spec names one or a key.
    known_hosts_file: Option<PathBuf>,
    master: Mutex<Option<Arc<Session>>>,
    sessions: Arc<Semaphore>,
}

impl SshTarget {
    /// Checks the options and writes the client files (the generated
    /// ssh_config and, for a `host_key`, a known_hosts file, both 0600) into
    /// the control directory. Does not connect: the master is built on first
    /// use.
    pub fn new(options: SshOptions) -> Result<Self, SshError> {
        check_options(&options)?;
        create_private_dir(&options.control_dir)?;
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

    fn destination(&self) -> String {
        self.describe()
    }

    fn ssh_error(&self, source: SshError) -> TargetError {
        TargetError::Ssh {
            target: self.describe(),
            source: Box::new(source),
        }
    }

    /// The live master, connecting when there is none or it died.
    async fn master(&self) -> Result<Arc<Session>, TargetError> {
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
    async fn lost_connection(
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

    /// Kills a timed-out command's process group on the target, best effort.
    async fn kill_group(&self, session: &Arc<Session>, pgid: u32) {
        let mut command = Session::to_command(Arc::clone(session), "kill");
        command
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{pgid}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match tokio::time::timeout(KILL_TIMEOUT, command.status()).await {
            Ok(Ok(status)) if status.success() => {}
            other => {
                tracing::debug!(target_host = %self.describe(), pgid, ?other, "killing a timed-out remote command did not succeed")
            }
        }
    }

    async fn run_inner(
        &self,
        argv: &[String],
        env: &[(String, String)],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        let target = self.describe();
        let timed_out = || TargetError::Timeout {
            target: target.clone(),
            what: argv_summary(argv),
            after: timeout,
        };
        let wrapped = wrap_argv(argv, env).map_err(|source| TargetError::Spawn {
            target: target.clone(),
            argv: argv.to_vec(),
            source,
        })?;
        let _permit = timeout_at(deadline, self.sessions.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_closed| TargetError::Spawn {
                target: target.clone(),
                argv: argv.to_vec(),
                source: io::Error::other("session limit closed"),
            })?;
        let session = timeout_at(deadline, self.master())
            .await
            .map_err(|_| timed_out())??;
        tracing::debug!(target_host = %target, argv = %argv_summary(argv), "running command over ssh");
        let spawn = open_again_if_refused(&target, || {
            let mut command = Session::to_command(Arc::clone(&session), "sh");
            command
                .args(&wrapped)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            async move { command.spawn().await }
        });
        let mut child = match timeout_at(deadline, spawn).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(source)) => {
                self.lost_connection(&session, clone_error(&source)).await?;
                return Err(self.ssh_error(SshError::Session {
                    destination: self.destination(),
                    source,
                }));
            }
            Ok(Ok(child)) => child,
        };
        let mut stdout = child.stdout().take();
        let mut stderr = child.stderr().take();
        let mut out_buf = Vec::new();
        let mut err_buf = Vec::new();
        let mut pgid = None;
        let mut not_found = false;
        let waited = timeout_at(deadline, async {
            let (out, err) = tokio::join!(
                read_optional(stdout.as_mut(), &mut out_buf),
                read_marked_stderr(stderr.as_mut(), &mut err_buf, &mut pgid, &mut not_found),
            );
            // Wait only after both streams ended: `wait` returns at the
            // master's exit message and then drops the mux connection, and
            // the master discards output it has not written yet when that
            // connection goes (seen as truncated output in ~3% of runs;
            // same family as openssh-rust/openssh#103).
            let status = child.wait().await;
            (out.and(err), status)
        })
        .await;
        let (read, status) = match waited {
            Ok(result) => result,
            Err(_elapsed) => {
                // The child (and with it the channel) is gone; the remote
                // processes may not be: kill their group.
                if let Some(pgid) = pgid {
                    self.kill_group(&session, pgid).await;
                }
                return Err(timed_out());
            }
        };
        let code = match status {
            Ok(status) => status.code(),
            Err(openssh::Error::Remote(e)) if e.kind() == io::ErrorKind::NotFound => {
                if not_found {
                    return Err(TargetError::Spawn {
                        target,
                        argv: argv.to_vec(),
                        source: io::Error::new(
                            io::ErrorKind::NotFound,
                            "program not found on the target",
                        ),
                    });
                }
                // A command that exited 127 on its own.
                Some(127)
            }
            Err(openssh::Error::RemoteProcessTerminated) => {
                // Killed by a signal, or the connection died: ask the master.
                self.lost_connection(&session, openssh::Error::RemoteProcessTerminated)
                    .await?;
                None
            }
            Err(source) => {
                self.lost_connection(&session, clone_error(&source)).await?;
                return Err(TargetError::Wait {
                    target,
                    argv: argv.to_vec(),
                    source: io::Error::other(source),
                });
            }
        };
        if let Err(source) = read {
            self.lost_connection(
                &session,
                openssh::Error::ChildIo(io::Error::new(source.kind(), source.to_string())),
            )
            .await?;
            return Err(TargetError::Wait {
                target,
                argv: argv.to_vec(),
                source,
            });
        }
        Ok(CommandOutput {
            code,
            stdout: lossy(out_buf),
            stderr: lossy(err_buf),
        })
    }

    async fn upload_inner(
        &self,
        src: &Path,
        dest: &str,
        partial: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        let target = self.describe();
        let timed_out = || TargetError::Timeout {
            target: target.clone(),
            what: format!("upload to {dest}"),
            after: timeout,
        };
        let src_owned = src.to_path_buf();
        let entries = tokio::task::spawn_blocking(move || walk(&src_owned))
            .await
            .map_err(|join| TargetError::Io {
                target: target.clone(),
                action: "list",
                path: src.to_path_buf(),
                source: io::Error::other(join),
            })?
            .map_err(|failure| TargetError::Io {
                target: target.clone(),
                action: failure.action,
                path: failure.path,
                source: failure.source,
            })?;
        let _permit = timeout_at(deadline, self.sessions.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_closed| TargetError::Io {
                target: target.clone(),
                action: "upload to",
                path: PathBuf::from(dest),
                source: io::Error::other("session limit closed"),
            })?;
        let session = timeout_at(deadline, self.master())
            .await
            .map_err(|_| timed_out())??;
        let open = open_again_if_refused(&target, || {
            Sftp::from_clonable_session(Arc::clone(&session), SftpOptions::default())
        });
        let sftp = match timeout_at(deadline, open).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(source)) => {
                self.lost_connection(&session, openssh::Error::Disconnected)
                    .await?;
                return Err(self.ssh_error(SshError::Sftp {
                    destination: self.destination(),
                    source,
                }));
            }
            Ok(Ok(sftp)) => sftp,
        };
        let copied = timeout_at(deadline, copy_tree(&sftp, src, dest, partial, &entries)).await;
        let result = match copied {
            Err(_) => Err(timed_out()),
            Ok(Err(failure)) => {
                let dead = self
                    .lost_connection(&session, openssh::Error::Disconnected)
                    .await;
                Err(dead.err().unwrap_or_else(|| TargetError::Io {
                    target: target.clone(),
                    action: failure.action,
                    path: failure.path,
                    source: failure.source,
                }))
            }
            Ok(Ok(())) => {
                // Once the rename is sent its result stands, even past the
                // deadline: a dead link ends it within the ServerAlive bound.
                let mut fs = sftp.fs();
                match fs.rename(partial, dest).await {
                    Ok(()) => Ok(()),
                    Err(error) => {
                        let dead = self
                            .lost_connection(&session, openssh::Error::Disconnected)
                            .await;
                        Err(dead.err().unwrap_or_else(|| TargetError::Io {
                            target: target.clone(),
                            action: "rename into place",
                            path: PathBuf::from(dest),
                            source: sftp_io(error),
                        }))
                    }
                }
            }
        };
        if let Err(error) = sftp.close().await {
            tracing::debug!(target_host = %target, %error, "closing sftp failed");
        }
        result
    }

    /// Uploads one regular file to `dest` the way [`Target::upload_dir`]
    /// uploads a tree: into a partial sibling, renamed when complete, with
    /// its permission bits. `dest` must not exist and its parent must.
    pub async fn upload_file(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        self.upload_dir(src, dest, timeout).await
    }

    /// Removes a failed upload's partial copy, best effort (the connection
    /// may be gone; an install starts its generation over anyway).
    async fn remove_partial(&self, partial: &str) {
        let argv = ["rm", "-rf", "--", partial].map(str::to_owned);
        if let Err(error) = self.run(&argv, &[], CLEANUP_TIMEOUT).await {
            tracing::warn!(target_host = %self.describe(), path = partial, %error, "could not remove a partial upload");
        }
    }
}

impl Target for SshTarget {
    fn describe(&self) -> String {
        format!(
            "{}@{}:{}",
            self.options.user, self.options.host, self.options.port
        )
    }

    /// Runs `argv` over the master (connecting first when needed), each word
    /// shell-escaped for the remote login shell and run by a constant wrapper
    /// that exports `env` and execs argv. At the timeout the session is
    /// closed and the command's process group is killed on the target (it
    /// runs in its own session there). When the master dies meanwhile, the
    /// error is [`SshError::ConnectionLost`] (transient) within the
    /// ServerAlive bound. A missing program is a terminal `Spawn` error, as
    /// for [`super::local::LocalTarget`].
    async fn run(
        &self,
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        let deadline = Instant::now() + timeout;
        self.run_inner(argv, env, deadline, timeout).await
    }

    /// Uploads over SFTP on the master into `<dest>.partial-<unique>`, then
    /// renames it to `dest`. Keeps permission bits (the executable bit
    /// included) and symlinks as they are. On failure the partial copy is
    /// removed when the connection still works; a partial copy left by a
    /// dead connection never has `dest`'s name.
    async fn upload_dir(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        let deadline = Instant::now() + timeout;
        let partial = format!("{dest}.partial-{}", unique_suffix());
        let result = self
            .upload_inner(src, dest, &partial, deadline, timeout)
            .await;
        match &result {
            // Without a connection there is nothing to clean up with; an
            // install starts its generation directory over anyway.
            Err(TargetError::Ssh { .. }) | Ok(()) => {}
            Err(_) => self.remove_partial(&partial).await,
        }
        result
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
async fn open_again_if_refused<T, E, F, Fut>(target: &str, mut open: F) -> Result<T, E>
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

/// openssh errors are not Clone; this keeps what matters for classifying.
fn clone_error(error: &openssh::Error) -> openssh::Error {
    match error {
        openssh::Error::Disconnected => openssh::Error::Disconnected,
        openssh::Error::RemoteProcessTerminated => openssh::Error::RemoteProcessTerminated,
        other => openssh::Error::ChildIo(io::Error::other(other.to_string())),
    }
}

fn check_options(o: &SshOptions) -> Result<(), SshError> {
    let invalid = |option, value: &str, why| SshError::InvalidOption {
        option,
        value: value.to_owned(),
        why,
    };
    let word_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && !s
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"')
    };
    if !word_ok(&o.host) || o.host.contains('@') {
        return Err(invalid(
            "host",
            &o.host,
            "must be a host name or address, not starting with '-'",
        ));
    }
    if !word_ok(&o.user) || o.user.contains('@') {
        return Err(invalid(
            "user",
            &o.user,
            "must be a user name, not starting with '-'",
        ));
    }
    if o.port == 0 {
        return Err(invalid("port", "0", "must be 1-65535"));
    }
    for (option, path) in [
        ("knownHosts", &o.known_hosts),
        ("identityFile", &o.identity_file),
        ("ssh config", &o.ssh_config),
    ] {
        if let Some(path) = path {
            let text = path.to_string_lossy();
            if text.contains(['"', '\n', '\r']) || !path.is_absolute() {
                return Err(invalid(
                    option,
                    &text,
                    "must be an absolute path without quotes or newlines",
                ));
            }
        }
    }
    let dir_len = o.control_dir.as_os_str().len();
    let len = dir_len + SOCKET_PATH_OVERHEAD;
    if len > SOCKET_PATH_MAX {
        return Err(SshError::ControlPathTooLong {
            dir: o.control_dir.clone(),
            len,
            max: SOCKET_PATH_MAX,
        });
    }
    Ok(())
}

/// The known_hosts line trusting `key` (its first two words) for host:port.
fn known_hosts_line(host: &str, port: u16, key: &str) -> Result<String, SshError> {
    let mut words = key.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(SshError::InvalidOption {
            option: "hostKey",
            value: key.to_owned(),
            why: "must be `<type> <base64>`, e.g. `ssh-ed25519 AAAA...`",
        });
    };
    let kind_ok = kind
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'@' | b'.'));
    let blob_ok = blob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !kind_ok || !blob_ok {
        return Err(SshError::InvalidOption {
            option: "hostKey",
            value: key.to_owned(),
            why: "must be `<type> <base64>`, e.g. `ssh-ed25519 AAAA...`",
        });
    }
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    Ok(format!("{name} {kind} {blob}\n"))
}

/// The generated ssh_config. ssh keeps the first value it reads for each
/// option, and command-line options come first, so the crate's `-o` options
/// (BatchMode, StrictHostKeyChecking, ConnectTimeout, ServerAliveInterval,
/// UserKnownHostsFile) win; the options the crate has no setter for are set
/// here, before the user's config is included.
fn client_config(o: &SshOptions, own_known_hosts: bool) -> Result<String, SshError> {
    let mut c = String::new();
    let mut line = |text: &str| {
        c.push_str(text);
        c.push('\n');
    };
    line(
        "# converge: generated ssh_config; these options come first so they win, then the user's config",
    );
    line(&format!(
        "ServerAliveCountMax {}",
        o.server_alive_count_max.max(1)
    ));
    line("PasswordAuthentication no");
    line("KbdInteractiveAuthentication no");
    line("UpdateHostKeys no");
    line("CheckHostIP no");
    line("HashKnownHosts no");
    if own_known_hosts {
        line("GlobalKnownHostsFile /dev/null");
    }
    match &o.ssh_config {
        Some(user_config) => line(&format!("Include \"{}\"", user_config.display())),
        None => {
            line("Include ~/.ssh/config");
            line("Include /etc/ssh/ssh_config");
        }
    }
    // Defaults below the user's config, so a KexAlgorithms there wins.
    // The post-quantum hybrid OpenSSH picks first costs ~70 ms of client CPU
    // per handshake (sntrup761 key generation), curve25519 ~5 ms: a fleet of
    // 20 connects 10× cheaper. This gives up protection of recorded traffic
    // against a future quantum computer; set KexAlgorithms in the ssh_config
    // converge reads to keep it (ARCHITECTURE.md, "SSH").
    if default_kex_is_costly_hybrid() {
        line("Match all");
        line("KexAlgorithms ^curve25519-sha256,curve25519-sha256@libssh.org");
    }
    Ok(c)
}

/// Whether this OpenSSH client's default key exchange starts with the
/// sntrup761 hybrid (OpenSSH 9.0 to 9.8) and it offers curve25519: only
/// then is curve25519 put first. Older clients may not understand the `^`
/// syntax, FIPS builds lack curve25519, and from 9.9 the default
/// mlkem768x25519 is cheap already. Asked once per process (`ssh -G` reads
/// configuration only; it does not connect).
fn default_kex_is_costly_hybrid() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        let Ok(out) = std::process::Command::new("ssh")
            .args(["-G", "-F", "/dev/null", "converge-kex-probe"])
            .stdin(StdStdio::null())
            .stderr(StdStdio::null())
            .output()
        else {
            return false;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("kexalgorithms "))
            .is_some_and(|list| {
                list.starts_with("sntrup761x25519")
                    && list.split(',').any(|a| a == "curve25519-sha256")
            })
    })
}

/// 16 hex digits naming a generated file after its content.
fn short_hash(bytes: &[u8]) -> String {
    let hash = blake3::hash(bytes).to_hex();
    hash.as_str()[..16].to_owned()
}

/// Creates `dir` (and its parents) and makes it 0700: it holds master
/// sockets, which give whoever can reach them a shell on the target.
fn create_private_dir(dir: &Path) -> Result<(), SshError> {
    let prepare = |source| SshError::Prepare {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(prepare)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(prepare)
}

/// Writes `bytes` to `path` (mode 0600) by a rename, so concurrent writers of
/// the same content never expose a half-written file.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SshError> {
    let prepare = |source| SshError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", unique_suffix()));
    let tmp = PathBuf::from(tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(prepare)
}

/// argv for `sh -c RUN_SCRIPT converge N NAME=VALUE... argv...`, after
/// checking the inputs the wrapper relies on.
fn wrap_argv(argv: &[String], env: &[(String, String)]) -> io::Result<Vec<String>> {
    if argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"));
    }
    let mut wrapped = Vec::with_capacity(argv.len() + env.len() + 4);
    wrapped.extend(["-c", RUN_SCRIPT, "converge"].map(str::to_owned));
    wrapped.push(env.len().to_string());
    for (name, value) in env {
        let valid = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("environment variable name {name:?} is not [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        wrapped.push(format!("{name}={value}"));
    }
    if argv.iter().any(|a| a.contains('\0')) || env.iter().any(|(_, v)| v.contains('\0')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument contains a NUL byte",
        ));
    }
    wrapped.extend(argv.iter().cloned());
    Ok(wrapped)
}

async fn read_optional<R: AsyncRead + Unpin>(
    reader: Option<&mut R>,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    match reader {
        Some(reader) => read_tail(reader, buf, OUTPUT_LIMIT).await,
        None => Ok(()),
    }
}

/// Reads stderr, taking out the wrapper's marker lines (`converge-pgid=`,
/// `converge-not-found=`) from its first 4 KiB; the rest is kept like stdout.
async fn read_marked_stderr<R: AsyncRead + Unpin>(
    reader: Option<&mut R>,
    buf: &mut Vec<u8>,
    pgid: &mut Option<u32>,
    not_found: &mut bool,
) -> io::Result<()> {
    const HEAD: usize = 4096;
    let Some(reader) = reader else {
        return Ok(());
    };
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut marker_seen = false;
    // Until the pgid marker: lines before it (a login script's chatter) are output.
    while !marker_seen && head.len() < HEAD {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
        while let Some(end) = head.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = head.drain(..=end).collect();
            if let Some(value) = line.strip_prefix(b"converge-pgid=") {
                *pgid = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
                marker_seen = true;
                break;
            }
            buf.extend_from_slice(&line);
        }
    }
    buf.append(&mut head);
    read_tail(reader, buf, OUTPUT_LIMIT).await?;
    // The not-found marker is the last line the wrapper writes before exit 127.
    let text = String::from_utf8_lossy(buf);
    if let Some(at) = text.rfind("converge-not-found=") {
        if text[at..].lines().count() <= 1 && (at == 0 || text.as_bytes()[at - 1] == b'\n') {
            *not_found = true;
        }
    }
    Ok(())
}

fn lossy(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
    }
}

/// One entry of the local tree to upload, by path relative to its root.
#[derive(Debug)]
enum Entry {
    Dir { rel: PathBuf, mode: u32 },
    File { rel: PathBuf, mode: u32 },
    Symlink { rel: PathBuf, target: PathBuf },
}

/// A failed local or remote file operation during an upload.
struct UploadFailure {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn failed(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UploadFailure {
    move |source| UploadFailure {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Lists `root` (a directory) depth-first, parents before children; the
/// root itself comes first with an empty relative path. A regular file as
/// the root is one entry with an empty relative path.
fn walk(root: &Path) -> Result<Vec<Entry>, UploadFailure> {
    let meta = std::fs::metadata(root).map_err(failed("read", root))?;
    if meta.is_file() {
        return Ok(vec![Entry::File {
            rel: PathBuf::new(),
            mode: meta.permissions().mode() & 0o7777,
        }]);
    }
    if !meta.is_dir() {
        return Err(UploadFailure {
            action: "upload",
            path: root.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    let mut entries = vec![Entry::Dir {
        rel: PathBuf::new(),
        mode: meta.permissions().mode() & 0o7777,
    }];
    walk_into(root, Path::new(""), &mut entries)?;
    Ok(entries)
}

fn walk_into(root: &Path, rel: &Path, entries: &mut Vec<Entry>) -> Result<(), UploadFailure> {
    let dir = root.join(rel);
    let mut children: Vec<_> = std::fs::read_dir(&dir)
        .map_err(failed("list", &dir))?
        .collect::<Result<_, _>>()
        .map_err(failed("list", &dir))?;
    children.sort_by_key(std::fs::DirEntry::file_name);
    for child in children {
        let path = child.path();
        let child_rel = rel.join(child.file_name());
        let meta = std::fs::symlink_metadata(&path).map_err(failed("read", &path))?;
        let kind = meta.file_type();
        let mode = meta.permissions().mode() & 0o7777;
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).map_err(failed("read link", &path))?;
            entries.push(Entry::Symlink {
                rel: child_rel,
                target,
            });
        } else if kind.is_dir() {
            entries.push(Entry::Dir {
                rel: child_rel.clone(),
                mode,
            });
            walk_into(root, &child_rel, entries)?;
        } else if kind.is_file() {
            entries.push(Entry::File {
                rel: child_rel,
                mode,
            });
        } else {
            return Err(UploadFailure {
                action: "copy",
                path,
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    "not a regular file, directory or symlink",
                ),
            });
        }
    }
    Ok(())
}

fn remote_path(base: &str, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        PathBuf::from(base)
    } else {
        Path::new(base).join(rel)
    }
}

/// Maps an SFTP failure onto an IO error of the matching kind.
fn sftp_io(error: openssh_sftp_client::Error) -> io::Error {
    let kind = match &error {
        openssh_sftp_client::Error::SftpError(code, _) => match code {
            SftpErrorKind::NoSuchFile => io::ErrorKind::NotFound,
            SftpErrorKind::PermDenied => io::ErrorKind::PermissionDenied,
            SftpErrorKind::OpUnsupported => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        },
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, error)
}

/// Copies the listed tree to `partial` (which must not exist): directories
/// first, then files and symlinks several at a time, then directory modes
/// deepest first (so a read-only directory can still be filled).
async fn copy_tree(
    sftp: &Sftp,
    src: &Path,
    dest: &str,
    partial: &str,
    entries: &[Entry],
) -> Result<(), UploadFailure> {
    let mut fs = sftp.fs();
    match fs.symlink_metadata(dest).await {
        Ok(_) => {
            return Err(UploadFailure {
                action: "upload to",
                path: PathBuf::from(dest),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "destination exists"),
            });
        }
        Err(openssh_sftp_client::Error::SftpError(SftpErrorKind::NoSuchFile, _)) => {}
        Err(error) => return Err(failed("inspect", Path::new(dest))(sftp_io(error))),
    }
    for entry in entries {
        if let Entry::Dir { rel, .. } = entry {
            let path = remote_path(partial, rel);
            fs.create_dir(&path)
                .await
                .map_err(|e| failed("create", &path)(sftp_io(e)))?;
        }
    }
    stream::iter(entries.iter().filter(|e| !matches!(e, Entry::Dir { .. })))
        .map(Ok)
        .try_for_each_concurrent(UPLOAD_CONCURRENCY, |entry| async move {
            match entry {
                Entry::File { rel, mode } => {
                    let local = if rel.as_os_str().is_empty() {
                        src.to_path_buf()
                    } else {
                        src.join(rel)
                    };
                    upload_file(sftp, &local, &remote_path(partial, rel), *mode).await
                }
                Entry::Symlink { rel, target } => {
                    let path = remote_path(partial, rel);
                    let mut fs = sftp.fs();
                    // OpenSSH's sftp-server takes SSH_FXP_SYMLINK arguments
                    // in swapped order; the client follows it (tested).
                    fs.symlink(target, &path)
                        .await
                        .map_err(|e| failed("create link", &path)(sftp_io(e)))
                }
                Entry::Dir { .. } => Ok(()),
            }
        })
        .await?;
    for entry in entries.iter().rev() {
        if let Entry::Dir { rel, mode } = entry {
            let path = remote_path(partial, rel);
            fs.set_permissions(
                &path,
                openssh_sftp_client::metadata::Permissions::from(mode_bits(*mode)),
            )
            .await
            .map_err(|e| failed("set permissions of", &path)(sftp_io(e)))?;
        }
    }
    Ok(())
}

fn mode_bits(mode: u32) -> u16 {
    u16::try_from(mode & 0o7777).unwrap_or(0o755)
}

async fn upload_file(
    sftp: &Sftp,
    local: &Path,
    remote: &Path,
    mode: u32,
) -> Result<(), UploadFailure> {
    let mut input = tokio::fs::File::open(local)
        .await
        .map_err(failed("read", local))?;
    let mut output = sftp
        .options()
        .write(true)
        .create_new(true)
        .open(remote)
        .await
        .map_err(|e| failed("create", remote)(sftp_io(e)))?;
    let mut chunk = vec![0u8; UPLOAD_CHUNK];
    loop {
        let n = input
            .read(&mut chunk)
            .await
            .map_err(failed("read", local))?;
        if n == 0 {
            break;
        }
        output
            .write_all(&chunk[..n])
            .await
            .map_err(|e| failed("write", remote)(sftp_io(e)))?;
    }
    // Set explicitly: the server's umask applies to the mode at creation.
    output
        .set_permissions(openssh_sftp_client::metadata::Permissions::from(mode_bits(
            mode,
        )))
        .await
        .map_err(|e| failed("set permissions of", remote)(sftp_io(e)))?;
    output
        .close()
        .await
        .map_err(|e| failed("close", remote)(sftp_io(e)))
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

/// Client options for a testbed host: its key and host key, an empty user
/// ssh_config, a short control directory, converge's defaults otherwise.
#[cfg(test)]
pub(crate) fn testbed_options(client: &testbed::Client) -> SshOptions {
    let mut options = SshOptions::new(client.address.clone(), client.control_dir.clone());
    options.port = client.port;
    options.host_key = Some(client.host_key.clone());
    options.identity_file = Some(client.identity_file.clone());
    options.ssh_config = Some(client.ssh_config.clone());
    options
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::time::Instant as StdInstant;
    use testbed::{REMOTE_STATE_DIR, Testbed};

    const T: Duration = Duration::from_secs(30);

    fn argv(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|p| (*p).to_owned()).collect()
    }

    fn target(testbed: &Testbed, i: usize) -> SshTarget {
        SshTarget::new(testbed_options(&testbed.client(i))).expect("ssh target")
    }

    fn remote(path: &str) -> String {
        format!("{REMOTE_STATE_DIR}/{path}")
    }

    fn is_alive(pid: &str) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    #[tokio::test]
    async fn run_returns_output_env_exit_codes_and_keeps_arguments_verbatim() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        let out = t
            .run(
                &argv(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
                &[],
                T,
            )
            .await
            .expect("run");
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (Some(7), "out\n", "err\n")
        );

        let tricky = ["a b", "it's", "$HOME", "`id`", "x\ny", "", "--", "*", "\\"];
        let mut command = argv(&["printf", "[%s]\\n"]);
        command.extend(tricky.iter().map(|s| (*s).to_owned()));
        let out = t.run(&command, &[], T).await.expect("run printf");
        let expected: String = tricky.iter().map(|s| format!("[{s}]\n")).collect();
        assert_eq!(out.stdout, expected);
        assert_eq!(out.stderr, "");

        let out = t
            .run(
                &argv(&["sh", "-c", "printf '%s|%s' \"$CONVERGE_A\" \"$CONVERGE_B\""]),
                &[
                    ("CONVERGE_A".to_owned(), "a b'c $x".to_owned()),
                    ("CONVERGE_B".to_owned(), "line1\nline2".to_owned()),
                ],
                T,
            )
            .await
            .expect("run with env");
        assert_eq!(out.stdout, "a b'c $x|line1\nline2");

        let out = t
            .run(&argv(&["sh", "-c", "kill -9 $$"]), &[], T)
            .await
            .expect("run");
        assert_eq!(out.code, None, "a signal death has no exit code");
        let out = t
            .run(&argv(&["sh", "-c", "echo x >&2; exit 127"]), &[], T)
            .await
            .expect("run");
        assert_eq!((out.code, out.stderr.as_str()), (Some(127), "x\n"));

        let error = t
            .run(&argv(&["/nonexistent/converge-test"]), &[], T)
            .await
            .expect_err("missing program");
        assert!(
            matches!(error, TargetError::Spawn { .. }) && !error.is_transient(),
            "{error:?}"
        );
        let error = t
            .run(
                &argv(&["true"]),
                &[("BAD NAME".to_owned(), "x".to_owned())],
                T,
            )
            .await
            .expect_err("invalid env name");
        assert!(!error.is_transient(), "{error:?}");

        let out = t.run(&argv(&["uname", "-n"]), &[], T).await.expect("run");
        assert_eq!(out.stdout.trim(), testbed.host(0).name);
        assert_eq!(t.describe(), format!("root@{}:22", testbed.host(0).address));
    }

    #[tokio::test]
    async fn run_keeps_only_the_last_64_kib_of_each_stream() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        let out = t
            .run(
                &argv(&["sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo \"line $i\"; i=$((i+1)); done; head -c 200000 /dev/zero | tr '\\0' e >&2"]),
                &[],
                T,
            )
            .await
            .expect("run");
        assert_eq!(out.stdout.len(), OUTPUT_LIMIT);
        assert!(out.stdout.ends_with("line 19999\n"));
        assert_eq!(out.stderr.len(), OUTPUT_LIMIT);
        assert!(out.stderr.bytes().all(|b| b == b'e'));
    }

    #[tokio::test]
    async fn run_timeout_kills_the_remote_process_group() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        let started = StdInstant::now();
        let error = t
            .run(
                &argv(&[
                    "sh",
                    "-c",
                    "sleep 300 & echo $! > \"$1\"; wait",
                    "converge-test",
                    &remote("sleep.pid"),
                ]),
                &[],
                Duration::from_secs(2),
            )
            .await
            .expect_err("must time out");
        assert!(error.is_timeout() && error.is_transient(), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        let pid =
            fs::read_to_string(testbed.host(0).state_dir.join("sleep.pid")).expect("pid written");
        let pid = pid.trim();
        let deadline = StdInstant::now() + Duration::from_secs(3);
        while is_alive(pid) && StdInstant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_alive(pid), "remote sleep {pid} survived the timeout");
        // The master is still usable after a timeout.
        assert!(
            t.run(&argv(&["true"]), &[], T)
                .await
                .expect("run")
                .succeeded()
        );
    }

    #[tokio::test]
    async fn commands_share_one_master_and_a_dead_master_is_rebuilt() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        let started = StdInstant::now();
        t.run(&argv(&["true"]), &[], T).await.expect("first run");
        let first = started.elapsed();
        let socket = t.master_socket().await.expect("a master exists");
        let started = StdInstant::now();
        t.run(&argv(&["true"]), &[], T).await.expect("second run");
        let second = started.elapsed();
        println!("first command (connects) {first:?}, second (over the master) {second:?}");
        assert_eq!(
            t.master_socket().await.as_ref(),
            Some(&socket),
            "the same master is reused"
        );
        // Many at once, more than sshd's MaxSessions (10): the semaphore queues them.
        let nap = argv(&["sleep", "0.2"]);
        let runs = (0..30).map(|_| t.run(&nap, &[], T));
        for result in futures::future::join_all(runs).await {
            assert!(result.expect("concurrent run").succeeded());
        }
        assert_eq!(t.master_socket().await.as_ref(), Some(&socket));
        // Kill the master process itself: the next call builds a new one.
        let master_pid = fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .find(|p| {
                fs::read(p.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*socket.to_string_lossy()))
            })
            .map(|p| p.file_name().to_string_lossy().into_owned())
            .expect("master process");
        std::process::Command::new("kill")
            .args(["-KILL", &master_pid])
            .status()
            .expect("kill");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            t.run(&argv(&["true"]), &[], T)
                .await
                .expect("run after master death")
                .succeeded()
        );
        let rebuilt = t.master_socket().await.expect("a master exists");
        assert_ne!(rebuilt, socket, "a dead master is replaced");
    }

    #[tokio::test]
    async fn a_kept_master_outlives_its_target_and_the_next_one_resumes_it() {
        let testbed = Testbed::new(1);
        let mut options = testbed_options(&testbed.client(0));
        options.keep_master = true;
        options.master_idle_exit = Duration::from_secs(30);
        let first = SshTarget::new(options.clone()).expect("target");
        assert!(
            first
                .run(&argv(&["true"]), &[], T)
                .await
                .expect("run")
                .succeeded()
        );
        let socket = first.master_socket().await.expect("a master");
        drop(first); // as when a `reconcile --once` process ends
        let pid_of = |socket: &Path| {
            fs::read_dir("/proc")
                .expect("proc")
                .flatten()
                .find_map(|p| {
                    let cmdline = fs::read(p.path().join("cmdline")).ok()?;
                    String::from_utf8_lossy(&cmdline)
                        .contains(&*socket.to_string_lossy())
                        .then(|| p.file_name().to_string_lossy().into_owned())
                })
        };
        let master_pid = pid_of(&socket).expect("the kept master still runs");
        let control_mode = fs::metadata(&options.control_dir)
            .expect("control dir")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(control_mode, 0o700);

        let second = SshTarget::new(options.clone()).expect("target");
        assert!(
            second
                .run(&argv(&["true"]), &[], T)
                .await
                .expect("run")
                .succeeded()
        );
        assert_eq!(
            second.master_socket().await.as_ref(),
            Some(&socket),
            "the next target resumes the kept master"
        );
        // A fresh target still proves a new connection.
        let fresh = second.fresh();
        assert!(
            fresh
                .run(&argv(&["true"]), &[], T)
                .await
                .expect("run")
                .succeeded()
        );
        let fresh_socket = fresh.master_socket().await.expect("a master");
        assert_ne!(fresh_socket, socket);
        drop(fresh);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            pid_of(&fresh_socket).is_none(),
            "a fresh master is not kept"
        );

        // A kept master that died is cleaned up and replaced.
        drop(second);
        std::process::Command::new("kill")
            .args(["-KILL", &master_pid])
            .status()
            .expect("kill");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let third = SshTarget::new(options).expect("target");
        assert!(
            third
                .run(&argv(&["true"]), &[], T)
                .await
                .expect("run")
                .succeeded()
        );
        let replaced = third.master_socket().await.expect("a master");
        assert_ne!(replaced, socket);
        assert!(
            !socket.parent().expect("dir").exists(),
            "the dead master's directory is removed"
        );
        third.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            pid_of(&replaced).is_none(),
            "disconnect stops a kept master"
        );
    }

    #[tokio::test]
    async fn sessions_sshd_refuses_past_max_sessions_are_opened_again() {
        let testbed = Testbed::new(1);
        // A limit above sshd's MaxSessions (10): sshd itself refuses the
        // extra channels, and each refused one must be opened again.
        let mut options = testbed_options(&testbed.client(0));
        options.max_sessions = 24;
        let t = SshTarget::new(options).expect("ssh target");
        let nap = argv(&["sleep", "0.3"]);
        let runs = (0..24).map(|_| t.run(&nap, &[], T));
        for result in futures::future::join_all(runs).await {
            assert!(result.expect("run past MaxSessions").succeeded());
        }
        let trees = tempfile::tempdir().expect("tempdir");
        let src = trees.path().join("src");
        sample_tree(&src);
        let uploads = (0..12).map(|i| {
            let dest = remote(&format!("refused-{i}"));
            let (t, src) = (&t, &src);
            async move { t.upload_dir(src, &dest, T).await }
        });
        for result in futures::future::join_all(uploads).await {
            result.expect("upload past MaxSessions");
        }
    }

    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).expect("mkdir");
        fs::write(root.join("bin/tool"), "#!/bin/sh\necho tool\n").expect("write");
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        fs::write(root.join("data.txt"), "plain").expect("write");
        fs::set_permissions(root.join("data.txt"), fs::Permissions::from_mode(0o640))
            .expect("chmod");
        symlink("bin/tool", root.join("tool-link")).expect("symlink");
        symlink("/nonexistent/dangling", root.join("dangling")).expect("symlink");
        fs::create_dir(root.join("empty")).expect("mkdir");
        fs::create_dir(root.join("ro")).expect("mkdir");
        fs::write(root.join("ro/inside"), "x").expect("write");
        fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).expect("chmod");
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        fs::write(root.join("big.bin"), big).expect("write");
    }

    #[tokio::test]
    async fn upload_dir_copies_contents_modes_and_symlinks_then_renames() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        let local = tempfile::tempdir().expect("tempdir");
        let src = local.path().join("src");
        sample_tree(&src);
        t.upload_dir(&src, &remote("dest"), T)
            .await
            .expect("upload");
        let dest = testbed.host(0).state_dir.join("dest");
        let mode = |p: &str| {
            fs::symlink_metadata(dest.join(p))
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("data.txt"), 0o640);
        assert_eq!(mode("ro"), 0o555);
        assert_eq!(
            fs::read_to_string(dest.join("data.txt")).expect("read"),
            "plain"
        );
        assert_eq!(
            fs::read_to_string(dest.join("ro/inside")).expect("read"),
            "x"
        );
        assert_eq!(
            fs::read(dest.join("big.bin")).expect("read"),
            fs::read(src.join("big.bin")).expect("read")
        );
        assert_eq!(
            fs::read_link(dest.join("tool-link")).expect("link"),
            PathBuf::from("bin/tool")
        );
        assert_eq!(
            fs::read_link(dest.join("dangling")).expect("link"),
            PathBuf::from("/nonexistent/dangling")
        );
        assert!(dest.join("empty").is_dir());
        let names: Vec<_> = fs::read_dir(&testbed.host(0).state_dir)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["dest"], "no partial copy is left");

        let error = t
            .upload_dir(&src, &remote("dest"), T)
            .await
            .expect_err("dest exists");
        assert!(
            matches!(&error, TargetError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{error:?}"
        );
        assert!(!error.is_transient());
        let _socket = std::os::unix::net::UnixListener::bind(src.join("socket")).expect("bind");
        let error = t
            .upload_dir(&src, &remote("other"), T)
            .await
            .expect_err("a socket cannot be uploaded");
        assert!(!error.is_transient(), "{error:?}");
        assert!(!testbed.host(0).state_dir.join("other").exists());
    }

    #[tokio::test]
    async fn an_upload_cut_by_a_dead_link_fails_and_leaves_no_dest() {
        let testbed = Testbed::new(1);
        let mut options = testbed_options(&testbed.client(0));
        options.connect_timeout = Duration::from_secs(2);
        let t = SshTarget::new(options).expect("target");
        t.connect().await.expect("connect");
        let local = tempfile::tempdir().expect("tempdir");
        let src = local.path().join("src");
        fs::create_dir(&src).expect("mkdir");
        for i in 0..8 {
            let chunk: Vec<u8> = (0..16_000_000u32).map(|b| (b ^ i) as u8).collect();
            fs::write(src.join(format!("part{i}")), chunk).expect("write");
        }
        let state = testbed.host(0).state_dir.clone();
        let watcher = tokio::task::spawn_blocking(move || {
            // Wait until the partial copy holds some bytes, then cut the link.
            let deadline = StdInstant::now() + Duration::from_secs(20);
            loop {
                let partial = fs::read_dir(&state).ok().and_then(|mut d| {
                    d.find_map(|e| {
                        e.ok()
                            .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
                    })
                });
                let bytes: u64 = partial
                    .and_then(|p| fs::read_dir(p.path()).ok())
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0);
                if bytes > 1_000_000 || StdInstant::now() > deadline {
                    return bytes;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let dest = remote("dest");
        let upload = t.upload_dir(&src, &dest, Duration::from_secs(60));
        let cut = async {
            let bytes = watcher.await.expect("watcher");
            testbed.host(0).link_down();
            (bytes, StdInstant::now())
        };
        let (result, (bytes, cut_at)) = tokio::join!(upload, cut);
        let noticed = cut_at.elapsed();
        assert!(bytes > 1_000_000, "the upload never got going");
        let error = result.expect_err("the upload must fail");
        println!(
            "upload cut after {bytes} bytes; failed {noticed:?} after the link went down: {error}"
        );
        assert!(error.is_transient(), "{error:?}");
        testbed.host(0).link_up();
        let left: Vec<_> = fs::read_dir(&testbed.host(0).state_dir)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.iter().any(|n| n == "dest"), "{left:?}");
        // Once the link is back the same target works again (neighbour
        // discovery may need a moment after the link flapped: retry briefly).
        runs_again_soon(&t).await;
    }

    #[tokio::test]
    async fn a_wrong_host_key_is_refused_before_anything_runs_or_uploads() {
        let testbed = Testbed::new(2);
        let mut options = testbed_options(&testbed.client(0));
        options.host_key = Some(testbed.host(1).host_key.clone());
        let t = SshTarget::new(options).expect("target");
        let error = t
            .run(&argv(&["touch", &remote("ran")]), &[], T)
            .await
            .expect_err("wrong key");
        let message = error_chain(&error);
        println!("{message}");
        assert!(!error.is_transient(), "{error:?}");
        assert!(
            matches!(&error, TargetError::Ssh { source, .. } if source.is_host_key_error()),
            "{error:?}"
        );
        assert!(
            message.contains("does not match") && message.contains("hostKey"),
            "{message}"
        );
        let local = tempfile::tempdir().expect("tempdir");
        let error = t
            .upload_dir(local.path(), &remote("dest"), T)
            .await
            .expect_err("wrong key");
        assert!(!error.is_transient());
        let state = &testbed.host(0).state_dir;
        assert!(!state.join("ran").exists() && !state.join("dest").exists());

        // No key known at all: refused too, unless the user opted in to accept-new.
        let known_hosts = testbed.dir().join("empty_known_hosts");
        fs::write(&known_hosts, "").expect("write");
        let mut options = testbed_options(&testbed.client(0));
        options.host_key = None;
        options.known_hosts = Some(known_hosts.clone());
        let t = SshTarget::new(options.clone()).expect("target");
        let error = t
            .run(&argv(&["true"]), &[], T)
            .await
            .expect_err("unknown key");
        assert!(!error.is_transient(), "{error:?}");
        assert!(
            error_chain(&error).contains("no key is known"),
            "{}",
            error_chain(&error)
        );
        options.accept_new_host_keys = true;
        let t = SshTarget::new(options).expect("target");
        assert!(
            t.run(&argv(&["true"]), &[], T)
                .await
                .expect("accept-new")
                .succeeded()
        );
        let learned = fs::read_to_string(&known_hosts).expect("read");
        assert!(
            learned.contains(
                testbed
                    .host(0)
                    .host_key
                    .split_whitespace()
                    .nth(1)
                    .expect("blob")
            ),
            "{learned}"
        );
    }

    #[tokio::test]
    async fn a_host_whose_link_is_down_fails_within_the_connect_timeout() {
        let testbed = Testbed::new(1);
        testbed.host(0).link_down();
        let mut options = testbed_options(&testbed.client(0));
        options.connect_timeout = Duration::from_secs(2);
        let t = SshTarget::new(options).expect("target");
        let started = StdInstant::now();
        let error = t
            .run(&argv(&["true"]), &[], T)
            .await
            .expect_err("unreachable");
        let took = started.elapsed();
        println!(
            "connect to a host with its link down failed after {took:?}: {}",
            error_chain(&error)
        );
        assert!(error.is_transient() && !error.is_timeout(), "{error:?}");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
            "{took:?}"
        );
        testbed.host(0).link_up();
        assert!(
            t.run(&argv(&["true"]), &[], T)
                .await
                .expect("after link up")
                .succeeded()
        );
    }

    /// Starts a long command, injects `fault` after a second, and returns how
    /// long after the fault the command failed, and its error.
    async fn fault_during_command(t: &SshTarget, fault: impl FnOnce()) -> (Duration, TargetError) {
        t.connect().await.expect("connect");
        let long = argv(&["sleep", "60"]);
        let command = t.run(&long, &[], Duration::from_secs(90));
        let inject = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            fault();
            StdInstant::now()
        };
        let (result, at) = tokio::join!(command, inject);
        (at.elapsed(), result.expect_err("the command must fail"))
    }

    #[tokio::test]
    async fn a_link_that_drops_during_a_command_fails_within_the_server_alive_bound() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        let bound = t.options().dead_link_bound();
        let (took, error) = fault_during_command(&t, || testbed.host(0).link_down()).await;
        println!(
            "link down mid-command: failed after {took:?} (bound {bound:?}): {}",
            error_chain(&error)
        );
        assert!(error.is_transient() && !error.is_timeout(), "{error:?}");
        assert!(
            matches!(&error, TargetError::Ssh { source, .. }
                if matches!(**source, SshError::ConnectionLost { .. })),
            "{error:?}"
        );
        assert!(took < bound + Duration::from_millis(2500), "{took:?}");
        testbed.host(0).link_up();
        runs_again_soon(&t).await;
    }

    #[tokio::test]
    async fn a_frozen_sshd_is_noticed_within_the_server_alive_bound() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        let bound = t.options().dead_link_bound();
        let (took, error) = fault_during_command(&t, || testbed.host(0).freeze()).await;
        println!(
            "sshd frozen mid-command: failed after {took:?} (bound {bound:?}): {}",
            error_chain(&error)
        );
        assert!(error.is_transient() && !error.is_timeout(), "{error:?}");
        assert!(took < bound + Duration::from_millis(2500), "{took:?}");
        testbed.host(0).thaw();
    }

    #[tokio::test]
    async fn killing_the_listener_keeps_the_master_but_refuses_new_connections() {
        let testbed = Testbed::new(1);
        let t = target(&testbed, 0);
        t.connect().await.expect("connect");
        testbed.host(0).kill_sshd();
        assert!(
            t.run(&argv(&["true"]), &[], T)
                .await
                .expect("over the existing master")
                .succeeded()
        );
        let started = StdInstant::now();
        let error = t
            .fresh()
            .run(&argv(&["true"]), &[], T)
            .await
            .expect_err("no listener");
        assert!(error.is_transient(), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "refused, not timed out"
        );
        testbed.host(0).restart_sshd();
        assert!(
            t.fresh()
                .run(&argv(&["true"]), &[], T)
                .await
                .expect("listener back")
                .succeeded()
        );
    }

    #[tokio::test]
    async fn the_effective_client_options_are_strict_and_bounded() {
        let testbed = Testbed::new(1);
        // A user config that tries to loosen things, and sets one harmless option.
        let user_config = testbed.dir().join("user_config");
        fs::write(
            &user_config,
            "Host *\n  ServerAliveCountMax 9\n  StrictHostKeyChecking no\n  ConnectTimeout 99\n  Compression yes\n",
        )
        .expect("write");
        let mut options = testbed_options(&testbed.client(0));
        options.ssh_config = Some(user_config);
        let t = SshTarget::new(options).expect("target");
        let config = effective_client_config(&t).await.expect("ssh -G");
        for expected in [
            "serveralivecountmax 2",
            "serveraliveinterval 2",
            "connecttimeout 10",
            "stricthostkeychecking true",
            "batchmode yes",
            "passwordauthentication no",
            "kbdinteractiveauthentication no",
            "globalknownhostsfile /dev/null",
            "updatehostkeys false",
            "compression yes",
        ] {
            assert!(
                config.lines().any(|l| l == expected),
                "missing `{expected}` in:\n{config}"
            );
        }
        let kex = config
            .lines()
            .find_map(|l| l.strip_prefix("kexalgorithms "))
            .expect("kexalgorithms");
        // Debian 12's OpenSSH 9.2 defaults to the costly sntrup761 hybrid.
        assert!(
            default_kex_is_costly_hybrid(),
            "expected OpenSSH 9.0-9.8 here"
        );
        assert!(
            kex.starts_with("curve25519-sha256,curve25519-sha256@libssh.org,"),
            "the cheap key exchange comes first: {kex}"
        );
        // A user who sets KexAlgorithms keeps it.
        let pq_config = testbed.dir().join("pq_config");
        fs::write(
            &pq_config,
            "Host *\n  KexAlgorithms sntrup761x25519-sha512@openssh.com\n",
        )
        .expect("write");
        let mut pq = testbed_options(&testbed.client(0));
        pq.ssh_config = Some(pq_config);
        let pq = SshTarget::new(pq).expect("target");
        let pq_effective = effective_client_config(&pq).await.expect("ssh -G");
        assert!(
            pq_effective
                .lines()
                .any(|l| l == "kexalgorithms sntrup761x25519-sha512@openssh.com"),
            "the user's KexAlgorithms wins:\n{pq_effective}"
        );
        assert!(
            pq.run(&argv(&["true"]), &[], T)
                .await
                .expect("run")
                .succeeded()
        );
        let known_hosts = config
            .lines()
            .find_map(|l| l.strip_prefix("userknownhostsfile "))
            .expect("userknownhostsfile");
        let file = fs::read_to_string(known_hosts).expect("read generated known_hosts");
        assert_eq!(
            file,
            format!("{} {}\n", testbed.host(0).address, testbed.host(0).host_key)
        );
        let mode = fs::metadata(known_hosts)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        // And the real master uses them: it connects.
        assert!(
            t.run(&argv(&["true"]), &[], T)
                .await
                .expect("run")
                .succeeded()
        );
    }

    #[test]
    fn options_that_could_break_ssh_are_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(60)));
        let error = SshTarget::new(SshOptions::new("10.0.0.5", long)).expect_err("too long");
        assert!(matches!(error, SshError::ControlPathTooLong { .. }) && !error.is_transient());
        for host in ["-oProxyCommand=x", "a b", "", "u@h"] {
            assert!(
                SshTarget::new(SshOptions::new(host, "/tmp/cv")).is_err(),
                "{host:?}"
            );
        }
        let mut options = SshOptions::new("h", "/tmp/cv-opt-test");
        options.host_key = Some("ssh-ed25519".to_owned());
        assert!(SshTarget::new(options.clone()).is_err());
        options.host_key = Some("ssh-ed25519 AAAA$(id)".to_owned());
        assert!(SshTarget::new(options).is_err());
        assert_eq!(
            known_hosts_line("h", 2222, "ssh-ed25519 AAAA comment").expect("line"),
            "[h]:2222 ssh-ed25519 AAAA\n"
        );
        let _ = fs::remove_dir_all("/tmp/cv-opt-test");
    }

    /// Retries `true` for up to 10 s, as the controller's backoff would.
    async fn runs_again_soon(t: &SshTarget) {
        let deadline = StdInstant::now() + Duration::from_secs(10);
        loop {
            match t.run(&argv(&["true"]), &[], T).await {
                Ok(out) => {
                    assert!(out.succeeded());
                    return;
                }
                Err(e) if StdInstant::now() < deadline && e.is_transient() => {
                    println!("not yet: {}", error_chain(&e));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("did not run again: {}", error_chain(&e)),
            }
        }
    }

    fn error_chain(error: &dyn std::error::Error) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}
