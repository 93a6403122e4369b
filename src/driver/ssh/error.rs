//! Why an SSH operation failed ([`SshError`]), each variant saying what to
//! do about it, and whether a retry can help ([`SshError::is_transient`]): a
//! wrong or unknown host key, a refused login or a bad option needs a
//! person, a dropped link does not. It must not import any other ssh file
//! or the `Target` seam: `TargetError` carries this error, so this file sits
//! below both.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::driver::command::io_is_transient;

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
    #[error(
        "use {path:?} for ssh's control sockets and client files: {problem}; {fix}. Nothing was run from it"
    )]
    UnsafeControlDir {
        path: PathBuf,
        /// What is wrong with it: "it is owned by uid 65534, not by uid 0 that converge runs as".
        problem: String,
        /// What to do: "remove it; converge creates it".
        fix: String,
    },
    #[error("{action} {path:?}")]
    ControlDir {
        /// What failed, read after "failed to": "create the ssh control directory".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
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
    /// `sudo -n` refused to run the command as root (it wants a password,
    /// or the login may not use sudo): a person must change the sudoers
    /// rules or the spec, so it is not retried.
    #[error(
        "run commands as root with `sudo -n` on {destination}: sudo refused ({message}); give the login a NOPASSWD sudo rule, or set `sudo: false`"
    )]
    SudoRefused {
        destination: String,
        message: String,
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
            | Self::UnsafeControlDir { .. }
            | Self::HostKeyMismatch { .. }
            | Self::HostKeyUnknown { .. }
            | Self::Auth { .. }
            | Self::SudoRefused { .. } => false,
            Self::Prepare { source, .. } | Self::ControlDir { source, .. } => {
                io_is_transient(source)
            }
            Self::Connect { source, .. } => !matches!(
                source,
                openssh::Error::Connect(e) | openssh::Error::Master(e)
                    if e.kind() == io::ErrorKind::NotFound
            ),
            Self::ConnectTimedOut { .. } | Self::ConnectionLost { .. } | Self::Session { .. } => {
                true
            }
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
