//! A small QMP client: one connection to one QEMU's monitor socket.
//!
//! It speaks newline-delimited JSON over a Unix socket: reads the greeting,
//! negotiates capabilities, then runs one command at a time, tagging each with
//! an `id` and matching the reply by that id. Asynchronous events that arrive
//! between replies are skipped but kept (the last [`EVENT_HISTORY`]), and
//! replies to requests that timed out earlier are dropped. Every wait is
//! bounded by the client's timeout. It knows nothing about VMs, directories or
//! processes: it must not spawn, kill or decide what a reply means for a VM.
//!
//! QEMU serves one monitor client at a time; a second client waits without a
//! greeting until the first disconnects. Hold a [`Qmp`] only for the length of
//! an operation.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How many asynchronous events a connection remembers.
pub const EVENT_HISTORY: usize = 64;

/// Longest message accepted from QEMU; a larger one means the peer is not a
/// sane QMP server.
const MAX_MESSAGE: usize = 16 << 20;

/// The longest Unix socket path Linux accepts (`sun_path` is 108 bytes with
/// its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why talking to a QEMU monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error(
        "use QMP socket path {path} ({len} bytes): Unix socket paths are limited to 107 bytes, use a shorter state directory"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("get {waiting_for} from QMP socket {path} within {after:?}")]
    Timeout {
        path: PathBuf,
        waiting_for: String,
        after: Duration,
    },
    #[error("talk to QMP socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read from QMP socket {path}: QEMU closed the connection")]
    Closed { path: PathBuf },
    #[error("understand QMP socket {path}: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("run QMP command `{command}`: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

impl QmpError {
    /// Whether trying again later can succeed without anyone changing the spec
    /// or the host: a slow, busy or restarting QEMU is transient; a refused
    /// command or a path that can never work is not.
    pub fn is_transient(&self) -> bool {
        match self {
            QmpError::Connect { .. }
            | QmpError::Timeout { .. }
            | QmpError::Io { .. }
            | QmpError::Closed { .. } => true,
            QmpError::SocketPathTooLong { .. }
            | QmpError::Malformed { .. }
            | QmpError::Command { .. } => false,
        }
    }
}

/// One asynchronous event QEMU sent (`SHUTDOWN`, `STOP`, `RESUME`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    /// The event's `data`, or `Null` when it has none.
    pub data: Value,
    /// QEMU's own timestamp of the event, when it sent a valid one.
    pub timestamp: Option<SystemTime>,
    /// When this client read it.
    pub received: SystemTime,
}

/// An open, negotiated QMP connection. Commands run one at a time (`&mut self`).
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// A line being read; kept across a timed-out read so that no bytes are
    /// lost and the stream stays in step.
    pending: Vec<u8>,
    next_id: u64,
    timeout: Duration,
    events: VecDeque<QmpEvent>,
    /// QEMU's version from the greeting, like `7.2.22`.
    version: String,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    /// The whole handshake, and later every command, is bounded by `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(QmpError::SocketPathTooLong {
                path: path.to_path_buf(),
                len,
            });
        }
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                path: path.to_path_buf(),
                waiting_for: "a connection".to_owned(),
                after: timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
            pending: Vec::new(),
            next_id: 1,
            timeout,
            events: VecDeque::new(),
            version: String::new(),
        };
        let greeting = qmp.read_message(timeout, "the greeting").await?;
        let Some(info) = greeting.get("QMP") else {
            return Err(qmp.malformed(format!("expected a greeting, got {greeting}")));
        };
        qmp.version = version_of(info);
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value. An `error` reply
    /// becomes [`QmpError::Command`]. Events read while waiting are recorded,
    /// replies to other ids are dropped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".to_owned(), Value::from(command));
        if let Some(arguments) = arguments {
            request.insert("arguments".to_owned(), arguments);
        }
        request.insert("id".to_owned(), Value::from(id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        let deadline = tokio::time::Instant::now() + self.timeout;
        let waiting_for = format!("a reply to `{command}`");
        tokio::time::timeout_at(deadline, self.writer.write_all(line.as_bytes()))
            .await
            .map_err(|_| self.timeout_error(&waiting_for))?
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut message = self.read_message(left, &waiting_for).await?;
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to an earlier request that timed out: stale, drop it.
                continue;
            }
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                let field = |k: &str| {
                    error
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(self.malformed(format!("reply without return or error: {message}")));
        }
    }

    /// Runs an HMP command through `human-monitor-command`. HMP reports
    /// failures as text rather than as QMP errors: output starting with
    /// `Error:` becomes [`QmpError::Command`] with class `HumanMonitorError`.
    pub async fn human(&mut self, command_line: &str) -> Result<String, QmpError> {
        let out = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .await?;
        let text = out.as_str().unwrap_or_default().to_owned();
        if text.trim_start().starts_with("Error") {
            return Err(QmpError::Command {
                command: command_line.to_owned(),
                class: "HumanMonitorError".to_owned(),
                desc: text.trim().to_owned(),
            });
        }
        Ok(text)
    }

    /// Waits up to `within` for an event named `name`, returning it. Events
    /// already recorded count, so an event that raced a reply is not missed.
    pub async fn wait_event(&mut self, name: &str, within: Duration) -> Result<QmpEvent, QmpError> {
        if let Some(seen) = self.events.iter().rev().find(|e| e.name == name) {
            return Ok(seen.clone());
        }
        let deadline = tokio::time::Instant::now() + within;
        let waiting_for = format!("event {name}");
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.read_message(left, &waiting_for).await?;
            if let Some(seen) = self.events.back().filter(|e| e.name == name) {
                return Ok(seen.clone());
            }
        }
    }

    /// Events received so far, oldest first, at most [`EVENT_HISTORY`].
    pub fn events(&self) -> impl Iterator<Item = &QmpEvent> {
        self.events.iter()
    }

    /// QEMU's version as announced in the greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Changes the bound on each later command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Reads messages until one that is not an event, recording events.
    async fn read_message(
        &mut self,
        within: Duration,
        waiting_for: &str,
    ) -> Result<Value, QmpError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.read_line())
                .await
                .map_err(|_| self.timeout_error(waiting_for))??;
            let value: Value = serde_json::from_slice(&line)
                .map_err(|e| self.malformed(format!("invalid JSON ({e})")))?;
            if let Some(event) = parse_event(&value) {
                if self.events.len() == EVENT_HISTORY {
                    self.events.pop_front();
                }
                tracing::debug!(target: "converge::qmp", socket = %self.path.display(), event = %event.name, "qmp event");
                self.events.push_back(event);
                continue;
            }
            return Ok(value);
        }
    }

    /// Reads one complete non-empty line. Cancel safe: a partial line stays
    /// in `pending` for the next call.
    async fn read_line(&mut self) -> Result<Vec<u8>, QmpError> {
        loop {
            let n = self
                .reader
                .read_until(b'\n', &mut self.pending)
                .await
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if self.pending.len() > MAX_MESSAGE {
                return Err(self.malformed(format!("message longer than {MAX_MESSAGE} bytes")));
            }
            if n == 0 {
                return Err(QmpError::Closed {
                    path: self.path.clone(),
                });
            }
            if self.pending.ends_with(b"\n") {
                let line = std::mem::take(&mut self.pending);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(line);
            }
        }
    }

    fn timeout_error(&self, waiting_for: &str) -> QmpError {
        QmpError::Timeout {
            path: self.path.clone(),
            waiting_for: waiting_for.to_owned(),
            after: self.timeout,
        }
    }

    fn malformed(&self, detail: String) -> QmpError {
        QmpError::Malformed {
            path: self.path.clone(),
            detail,
        }
    }
}

fn version_of(info: &Value) -> String {
    let q = &info["version"]["qemu"];
    match (
        q["major"].as_u64(),
        q["minor"].as_u64(),
        q["micro"].as_u64(),
    ) {
        (Some(a), Some(b), Some(c)) => format!("{a}.{b}.{c}"),
        _ => String::new(),
    }
}

fn parse_event(value: &Value) -> Option<QmpEvent> {
    let name = value.get("event")?.as_str()?.to_owned();
    let timestamp = value.get("timestamp").and_then(|t| {
        let secs = t.get("seconds")?.as_u64()?;
        let micros = t.get("microseconds")?.as_u64()?;
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
    });
    Some(QmpEvent {
        name,
        data: value.get("data").cloned().unwrap_or(Value::Null),
        timestamp,
        received: SystemTime::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    fn socket_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("qmp")
            .tempdir_in("/tmp")
            .unwrap()
    }

    /// A scripted server: sends the greeting in two pieces, answers
    /// capabilities, then for the first command sends an event, a stale reply,
    /// and the real reply split across writes.
    async fn scripted_server(listener: UnixListener) {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"mi")
            .await
            .unwrap();
        // A pause between the pieces, so that the client reads them apart.
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(b"nor\": 2, \"micro\": 22}}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut seen = String::new();
        while !seen.contains("qmp_capabilities") {
            let n = s.read(&mut buf).await.unwrap();
            seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        s.write_all(b"{\"return\": {}, \"id\": 1}\n").await.unwrap();
        seen.clear();
        while !seen.contains("query-status") {
            let n = s.read(&mut buf).await.unwrap();
            seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        s.write_all(
            b"{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 5}, \"event\": \"STOP\"}\n{\"return\": {\"status\": \"stale\"}, \"id\": 99}\n{\"return\": {\"stat",
        )
        .await
        .unwrap();
        // The reply split across reads, as above.
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(b"us\": \"running\"}, \"id\": 2}\n")
            .await
            .unwrap();
        seen.clear();
        while !seen.contains("bogus") {
            let n = s.read(&mut buf).await.unwrap();
            seen.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        s.write_all(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}, \"id\": 3}\n")
            .await
            .unwrap();
        // Never answer the next command, so the client times out; the test
        // aborts this server when it is done.
        std::future::pending::<()>().await;
    }

    #[tokio::test]
    async fn replies_are_matched_by_id_across_partial_reads_and_events_are_recorded() {
        let dir = socket_dir();
        let path = dir.path().join("q.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(scripted_server(listener));
        let mut qmp = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        assert_eq!(qmp.version(), "7.2.22");
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        let events: Vec<_> = qmp.events().collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "STOP");
        assert_eq!(
            events[0].timestamp,
            Some(
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(1_700_000_000)
                    + Duration::from_micros(5)
            )
        );

        let err = qmp.execute("bogus", None).await.unwrap_err();
        assert!(matches!(&err, QmpError::Command { class, .. } if class == "CommandNotFound"));
        assert!(!err.is_transient());

        qmp.set_timeout(Duration::from_millis(100));
        let err = qmp.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        assert!(err.is_transient());
        server.abort();
    }

    #[tokio::test]
    async fn a_silent_server_times_out_the_greeting_transiently() {
        let dir = socket_dir();
        let path = dir.path().join("q.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = Qmp::connect(&path, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn an_overlong_socket_path_is_refused_before_connecting() {
        let long = PathBuf::from(format!("/tmp/{}/qmp.sock", "x".repeat(120)));
        let err = Qmp::connect(&long, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::SocketPathTooLong { .. }));
        assert!(!err.is_transient());
        assert!(err.to_string().contains("107 bytes"));
    }
}
