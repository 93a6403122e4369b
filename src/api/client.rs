//! The CLI's side of the daemon's local API: small HTTP/1.1 requests over the
//! Unix socket in the state directory.
//!
//! While `converge run` holds the store, read commands ask it here. When no
//! daemon answers (no socket, or nobody listening), they fall back to opening
//! the store themselves. This file only talks HTTP; it prints nothing and
//! decides no exit code.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The socket path under a state directory.
pub fn socket_path(state: &Path) -> PathBuf {
    state.join("converge.sock")
}

/// `value` percent-encoded for a URL's query: every byte but the
/// unreserved ones (RFC 3986) as `%XX`, so a path with spaces, `&` or
/// non-UTF-8 bytes travels intact.
pub fn query_value(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &byte in value {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Why a request to the daemon failed (other than nobody listening).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to the daemon at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talk to the daemon at {socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at {socket} answered without an HTTP status")]
    NoStatus { socket: PathBuf },
}

/// One answer of the daemon: its HTTP status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Sends one request with an empty body, waiting at most `timeout` for the
/// answer; `Ok(None)` when no daemon listens.
pub fn request(
    state: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<Option<Answer>, ClientError> {
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
        Err(source) => return Err(ClientError::Connect { socket, source }),
    };
    let io = |source| ClientError::Io {
        socket: socket.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: converge\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(io)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::NoStatus {
            socket: socket.clone(),
        })?;
    // Bodies are sent whole (no chunking) by the API; see api/mod.rs.
    Ok(Some(Answer {
        status,
        body: body.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_value_keeps_unreserved_bytes_and_escapes_the_rest() {
        assert_eq!(query_value(b"/srv/fleet-1/a_b.c~"), "/srv/fleet-1/a_b.c~");
        assert_eq!(query_value(b"/a b&c=d%"), "/a%20b%26c%3Dd%25");
        assert_eq!(query_value(&[b'/', 0xff]), "/%FF");
    }
}
