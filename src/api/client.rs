//! The CLI's side of the daemon's local API: small HTTP/1.1 requests over the
//! Unix socket in the state directory.
//!
//! While `converge run` holds the store, read commands ask it here. When no
//! daemon answers (no socket, or nobody listening), they fall back to opening
//! the store themselves.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context as _;

use super::reconcile::CLIENT_TIMEOUT;
use super::{EXIT_FATAL, EXIT_OK};
use crate::spec::ObjectKey;

/// The socket path under a state directory.
pub fn socket_path(state: &Path) -> std::path::PathBuf {
    state.join("converge.sock")
}

/// Sends one request; `Ok(None)` when no daemon listens.
pub fn request(state: &Path, method: &str, path: &str) -> anyhow::Result<Option<(u16, String)>> {
    request_within(state, method, path, CLIENT_TIMEOUT)
}

/// [`request`] with its own bound on the daemon's answer.
pub fn request_within(
    state: &Path,
    method: &str,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Option<(u16, String)>> {
    let socket = socket_path(state);
    let mut stream = match UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("connect to the daemon at {}", socket.display()));
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: converge\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .context("send the request to the daemon")?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .context("read the daemon's answer")?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the daemon's answer has no HTTP status")?;
    // Bodies are sent whole (no chunking) by the API; see api/mod.rs.
    Ok(Some((status, body.to_owned())))
}

/// `converge reconcile KEY`: asks the daemon to reconcile one object now.
pub fn request_reconcile(state: &Path, key: &ObjectKey) -> anyhow::Result<u8> {
    match request(state, "POST", &format!("/v1/reconcile/{key}"))? {
        None => {
            eprintln!(
                "error: no daemon answers at {}: start `converge run`, or use `converge reconcile --once`",
                socket_path(state).display()
            );
            Ok(EXIT_FATAL)
        }
        Some((202, body)) => {
            println!("{}", body.trim());
            Ok(EXIT_OK)
        }
        Some((status, body)) => {
            eprintln!("error: the daemon answered {status}: {}", body.trim());
            Ok(EXIT_FATAL)
        }
    }
}
