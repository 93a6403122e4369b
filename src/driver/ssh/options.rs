//! How to reach one machine over SSH ([`SshOptions`], with converge's
//! defaults) and which options are refused before anything is written or
//! run: host and user names ssh could read as flags, relative or quoted
//! paths, a control directory too long for a socket path. It must not touch
//! the filesystem or the network: writing the client files is `config.rs`'s
//! job, connecting is `master.rs`'s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::SshError;

/// `sun_path` holds 108 bytes including the NUL terminator.
const SOCKET_PATH_MAX: usize = 107;
/// What the openssh crate and ssh add to the control directory: the crate's
/// per-master `/.ssh-connectionXXXXXX/master`, then ssh's temporary
/// `.XXXXXXXXXXXXXXXX` suffix while it binds the socket.
const SOCKET_PATH_OVERHEAD: usize =
    "/.ssh-connectionXXXXXX/master".len() + ".XXXXXXXXXXXXXXXX".len();

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
    /// (at most 61 bytes): socket paths are limited to 107 bytes. Created
    /// when missing (mode 0700) and checked before every use: a directory
    /// that is not this user's own with mode 0700, or below a parent
    /// another user could write to, is refused ([`SshTarget::new`]).
    /// converge's controller uses a [`ControlDir`] under its state
    /// directory.
    ///
    /// [`SshTarget::new`]: super::master::SshTarget::new
    /// [`ControlDir`]: super::control_dir::ControlDir
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
    ///
    /// [`SshTarget::fresh`]: super::master::SshTarget::fresh
    pub keep_master: bool,
    /// Run every command as root through `sudo -n --` (never a prompt): a
    /// sudo that refuses is [`SshError::SudoRefused`], not retried.
    pub sudo: bool,
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
            sudo: false,
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

pub(super) fn check_options(o: &SshOptions) -> Result<(), SshError> {
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
    check_socket_dir(&o.control_dir)
}

/// The longest control socket path under `dir`, with what ssh and the
/// openssh crate add to it.
fn socket_path_len(dir: &Path) -> usize {
    dir.as_os_str().len() + SOCKET_PATH_OVERHEAD
}

/// Whether control sockets under `dir` fit a Unix socket's path.
pub(super) fn socket_dir_fits(dir: &Path) -> bool {
    socket_path_len(dir) <= SOCKET_PATH_MAX
}

/// [`SshError::ControlPathTooLong`] unless control sockets under `dir` fit.
pub(super) fn check_socket_dir(dir: &Path) -> Result<(), SshError> {
    let len = socket_path_len(dir);
    if len > SOCKET_PATH_MAX {
        return Err(SshError::ControlPathTooLong {
            dir: dir.to_path_buf(),
            len,
            max: SOCKET_PATH_MAX,
        });
    }
    Ok(())
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
