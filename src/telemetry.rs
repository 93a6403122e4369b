//! Logging setup: human lines on a terminal, JSON lines for log shippers.
//!
//! Logs go to stderr so that stdout carries only command output (tables,
//! plans, JSON). `RUST_LOG` overrides the default filter. Span and field names
//! used across the program are defined here so they stay one vocabulary.

use std::io::IsTerminal;

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
        .with_writer(std::io::stderr);
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
