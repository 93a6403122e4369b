//! Where notifications go: the [`Sink`] trait the controller's notifier
//! delivers through, one [`Delivery`] (the JSON body, its signature and the
//! few fields a command hook gets in its environment), and why a delivery
//! failed. The sinks themselves are `webhook.rs` (an HTTP POST) and
//! `exec_hook.rs` (a command with the body on stdin).
//!
//! This file knows nothing of conditions or the store: a delivery is bytes
//! and a handful of strings. It must never hold or log the secret the
//! signature was made with.

use futures::future::BoxFuture;

/// One notification, ready to send: its body is the exact bytes the
/// signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The JSON document.
    pub body: Vec<u8>,
    /// `sha256=<hex>` of the body, for the `X-Converge-Signature-256` header.
    pub signature: Option<String>,
    /// `CONVERGE_*` variables a command hook gets besides the body on stdin:
    /// event, object, reason, revision (plain data, never a shell string).
    pub env: Vec<(String, String)>,
}

/// Why one delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("send to {url}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} answered something that is not HTTP: {head:?}")]
    NotHttp { url: String, head: String },
    #[error("{url} did not answer within {secs}s")]
    Timeout { url: String, secs: u64 },
    #[error("start {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} exited with {code}: {stderr}")]
    Exit {
        command: String,
        code: String,
        stderr: String,
    },
}

impl SinkError {
    /// False when sending the same body again cannot help: the receiver
    /// refused it (4xx other than 408 and 429).
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Status { status, .. } => {
                !(400..500).contains(status) || matches!(status, 408 | 429)
            }
            _ => true,
        }
    }
}

/// A place notifications are delivered to. Implementations bound each
/// delivery by their own timeout; retries are the caller's.
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// How logs name this sink: never a credential, path, query or command
    /// line (any may hold a token).
    fn name(&self) -> &str;
    /// Delivers one notification once.
    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_by_the_receiver_is_not_retried() {
        let status = |status| SinkError::Status {
            url: "http://x/".into(),
            status,
        };
        assert!(!status(400).is_transient());
        assert!(!status(404).is_transient());
        assert!(status(429).is_transient());
        assert!(status(408).is_transient());
        assert!(status(500).is_transient());
        assert!(status(503).is_transient());
    }
}
