//! What every driver shares about running commands, apart from the
//! [`Target`](super::target::Target) seam itself: keeping the tail of an output
//! stream, showing argv and exit codes in messages, naming temporary files
//! uniquely, and sorting IO errors by whether a retry can help. Plain
//! functions over std and tokio types: this file must not import any other
//! driver file, so every driver file (the SSH error included) can use it
//! without a loop.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Sorts an IO error by whether a retry can help: errors about the request
/// itself (not found, permission, bad input, wrong type) cannot.
pub(crate) fn io_is_transient(error: &io::Error) -> bool {
    !matches!(
        error.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidData
            | io::ErrorKind::AlreadyExists
            | io::ErrorKind::Unsupported
    )
}

/// Reads `reader` to its end into `buf`, keeping only the last `limit` bytes.
///
/// Appends to `buf` as it goes, so a caller that abandons this future (at a
/// timeout) still has everything read so far.
pub(crate) async fn read_tail<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<()> {
    let mut chunk = [0u8; 8192];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            trim_front(buf, limit);
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        // Trimming only past twice the limit keeps the copying amortised.
        if buf.len() > limit.saturating_mul(2) {
            trim_front(buf, limit);
        }
    }
}

/// Drops all but the last `limit` bytes of `buf`.
pub(crate) fn trim_front(buf: &mut Vec<u8>, limit: usize) {
    if buf.len() > limit {
        let excess = buf.len() - limit;
        buf.drain(..excess);
    }
}

/// Renders argv for messages and logs: arguments joined by spaces, each cut
/// to 60 characters, and an `sh -c` script shown by its first line only (the
/// scripts converge embeds open with a comment naming them).
pub(crate) fn argv_summary(argv: &[String]) -> String {
    fn cut(arg: &str) -> String {
        match arg.char_indices().nth(60) {
            Some((at, _)) => format!("{}...", &arg[..at]),
            None => arg.to_owned(),
        }
    }
    let mut parts = Vec::with_capacity(argv.len());
    let mut script_next = false;
    for (i, arg) in argv.iter().enumerate() {
        if script_next {
            parts.push(cut(arg.lines().next().unwrap_or_default()));
            script_next = false;
        } else {
            script_next = i == 1 && arg == "-c" && argv[0].ends_with("sh");
            parts.push(cut(arg));
        }
    }
    parts.join(" ")
}

/// "exit code N", or "killed by a signal" for a process without one.
pub(crate) fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_owned(),
    }
}

/// A name component unique within this host for the life of the process and
/// across processes (pid, clock, counter), made of `[0-9a-f-]` only, for
/// temporary files and activation attempts.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}-{:x}", std::process::id(), nanos, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_tail_keeps_only_the_last_bytes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut buf = Vec::new();
        read_tail(&mut data.as_slice(), &mut buf, 1000)
            .await
            .expect("read from a slice");
        assert_eq!(buf, data[data.len() - 1000..]);
    }

    #[test]
    fn unique_suffixes_differ() {
        let a = unique_suffix();
        let b = unique_suffix();
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
    }
}
