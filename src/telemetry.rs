//! Logging setup: human lines on a terminal, JSON lines for log shippers.
//!
//! Logs go to stderr so that stdout carries only command output (tables,
//! plans, JSON). `RUST_LOG` overrides the default filter. Span and field names
//! used across the program are defined here so they stay one vocabulary.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, RwLock};

use tracing_subscriber::EnvFilter;

/// Field carrying the object key (`machine/web1`) on every reconcile line.
pub const FIELD_OBJECT: &str = "object";
/// Field carrying the desired-state revision.
pub const FIELD_REVISION: &str = "revision";
/// Target of drift lines (one WARN per detected change).
pub const DRIFT_TARGET: &str = "converge::drift";

/// `e` and its sources, joined with ": ", each said once, so a message says
/// what failed and why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines (colored on a terminal).
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Call once, from main.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter);
    let result = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    // A second init (tests calling the CLI in-process) keeps the first subscriber.
    let _ = result;
}

/// Runs a write to stderr at a moment when it does not tear a progress
/// display (the display hides itself, the closure writes, it redraws).
pub type Suspender = Arc<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

static SUSPENDER: RwLock<Option<Suspender>> = RwLock::new(None);

/// While a progress display is drawn on stderr, log lines go through
/// `suspender`; `None` when it is gone.
pub fn set_suspender(suspender: Option<Suspender>) {
    if let Ok(mut slot) = SUSPENDER.write() {
        *slot = suspender;
    }
}

/// stderr, or stderr through the progress display's [`Suspender`]. The fmt
/// layer writes each event with one `write_all`, so a line is never split
/// around a redraw.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let suspender = SUSPENDER.read().ok().and_then(|s| s.clone());
        match suspender {
            Some(suspend) => {
                let mut result = Ok(());
                suspend(&mut || result = std::io::stderr().write_all(buf));
                result.map(|()| buf.len())
            }
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
