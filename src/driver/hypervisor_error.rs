//! Why an operation on a hypervisor Machine failed, apart from the SSH
//! transport's own errors ([`HypervisorError`]), and whether a retry can
//! help. It lives apart from `hypervisor.rs` so that `capability.rs`'s
//! `DriverError` can carry it while `hypervisor.rs` returns `DriverError`:
//! the dependencies point one way (hypervisor -> capability -> this file).
//! It must not import any other driver file.

use std::path::PathBuf;

/// Why an operation on a hypervisor Machine failed, apart from the SSH
/// transport's own errors.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error(
        "use hypervisor {machine}: it is `{remote}`, and its agent is this converge binary, built for `{local}`; run converge from a host of the same kind"
    )]
    Incompatible {
        machine: String,
        remote: String,
        local: String,
    },
    #[error("{what} on hypervisor {machine}: exit {}{}", code_text(*.code), stderr_text(.stderr))]
    Command {
        machine: String,
        what: &'static str,
        code: Option<i32>,
        stderr: String,
    },
    #[error(
        "run converge's agent on hypervisor {machine}: it is gone ({path}); it is uploaded again at the next attempt"
    )]
    AgentGone { machine: String, path: String },
    #[error("encode a request for hypervisor {machine}")]
    Encode {
        machine: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("read a reply of converge's agent on hypervisor {machine}")]
    Decode {
        machine: String,
        #[source]
        source: serde_json::Error,
    },
    /// The operation itself failed; `message` is the agent's error chain.
    #[error("{message} (on hypervisor {machine})")]
    Operation {
        machine: String,
        message: String,
        transient: bool,
    },
    #[error("hash {path}")]
    Hash {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("upload {path} to hypervisor {machine}: it changed while it was uploaded")]
    Changed { machine: String, path: PathBuf },
}

fn code_text(code: Option<i32>) -> String {
    code.map_or_else(|| "by a signal".to_owned(), |c| c.to_string())
}

fn stderr_text(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

impl HypervisorError {
    pub fn is_transient(&self) -> bool {
        match self {
            // Killed by a signal may pass; a broken binary or a full disk needs a person.
            HypervisorError::Command { code, .. } => code.is_none(),
            HypervisorError::AgentGone { .. } | HypervisorError::Changed { .. } => true,
            HypervisorError::Operation { transient, .. } => *transient,
            HypervisorError::Hash { source, .. } => {
                source.kind() != std::io::ErrorKind::PermissionDenied
            }
            HypervisorError::Incompatible { .. }
            | HypervisorError::Encode { .. }
            | HypervisorError::Decode { .. } => false,
        }
    }
}
