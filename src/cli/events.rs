//! `converge events`: what happened, newest first (failures, rollbacks,
//! recoveries, drift, refused source revisions, VM verbs), and with
//! `--follow` what happens next.
//!
//! Asks a running daemon over its socket; without one, reads the store
//! itself. Following without a daemon opens the store for a moment at each
//! look: a daemon or a `reconcile --once` starting meanwhile waits for it
//! (opening the store waits up to a second for a held lock), and one that
//! holds the store is simply looked at again next time.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use super::args::{EXIT_OK, Output, StateArg};
use crate::spec::HumanDuration;
use crate::store::StoreError;

/// List events, newest first: failures, rollbacks, recoveries, drift,
/// refused source revisions and VM verbs.
///
/// With --follow, the newest events are printed oldest first and new ones
/// are appended as they happen, until interrupted (Ctrl-C). With --output
/// json: a JSON array, or with --follow one JSON object per line.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge events\n  converge events machine/web1 --limit 5\n  converge events source      # refused Git revisions\n  converge events --follow\n  converge events --output json | jq '.[] | select(.severity == \"Error\")'\n  converge events --follow --output json   # one JSON object per line"
)]
pub struct Args {
    /// Only events about this object (machine/NAME, vm/NAME, service/NAME),
    /// or `source` for the Git source's.
    pub key: Option<crate::store::EventSubject>,
    #[command(flatten)]
    pub state: StateArg,
    /// How many of the newest events.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Keep printing new events as they happen.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How often --follow looks for new events.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub poll: HumanDuration,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

/// Events above `after`, newest first, from the daemon or the store.
/// `Ok(None)` when `held_is_fine` and the store is held by another process
/// that does not answer (a `reconcile --once`).
fn fetch(
    args: &Args,
    after: u64,
    limit: usize,
    held_is_fine: bool,
) -> anyhow::Result<Option<Vec<Value>>> {
    let mut path = format!("/v1/events?after={after}&limit={limit}");
    if let Some(key) = &args.key {
        path.push_str("&key=");
        path.push_str(&crate::api::client::query_value(key.to_string().as_bytes()));
    }
    if let Some((status, body)) = super::args::ask(&args.state.state, "GET", &path)? {
        if status != 200 {
            anyhow::bail!("the daemon answered {status}: {}", body.trim());
        }
        let events: Vec<Value> =
            serde_json::from_str(&body).context("parse the daemon's answer")?;
        return Ok(Some(events));
    }
    let store = match super::inspect::open_existing_store(&args.state) {
        Ok(store) => store,
        Err(e)
            if held_is_fine
                && matches!(
                    e.downcast_ref::<StoreError>(),
                    Some(StoreError::Locked { .. })
                ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let events = store.events_after(after, limit, args.key.as_ref())?;
    drop(store);
    Ok(Some(
        events
            .into_iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?,
    ))
}

fn row(event: &Value) -> Vec<String> {
    let text = |field: &str| match event.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    };
    let time = event
        .get("time_ms")
        .and_then(Value::as_u64)
        .map(|ms| {
            let mut t = crate::controller::notify::rfc3339(ms);
            // Seconds are enough in a table.
            t.replace_range(19.., "Z");
            t
        })
        .unwrap_or_default();
    vec![
        time,
        text("severity"),
        text("key"),
        text("reason"),
        text("message"),
    ]
}

/// At most this many new events per look of --follow (what the store keeps).
const FOLLOW_LIMIT: usize = 10_000;

const HEADER: [&str; 5] = ["TIME", "SEVERITY", "OBJECT", "REASON", "MESSAGE"];

pub fn run(args: Args) -> anyhow::Result<u8> {
    let events = fetch(&args, 0, args.limit, false)?.unwrap_or_default();
    let mut out = std::io::stdout().lock();
    if !args.follow {
        if args.output == Output::Json {
            writeln!(out, "{}", serde_json::to_string_pretty(&events)?)?;
        } else if events.is_empty() {
            writeln!(out, "no events recorded")?;
        } else {
            let rows: Vec<Vec<String>> = events.iter().map(row).collect();
            super::table::write(&mut out, &HEADER, &rows)?;
        }
        return Ok(EXIT_OK);
    }
    let mut newest = 0;
    let mut header = args.output == Output::Text;
    let mut batch = events;
    loop {
        // Oldest first, so new events append at the bottom.
        for event in batch.iter().rev() {
            newest = newest.max(event.get("seq").and_then(Value::as_u64).unwrap_or(0));
            if args.output == Output::Json {
                writeln!(out, "{}", serde_json::to_string(event)?)?;
            } else {
                if header {
                    writeln!(out, "{}", follow_line(&HEADER.map(str::to_owned)))?;
                    header = false;
                }
                writeln!(out, "{}", follow_line(&row(event)))?;
            }
        }
        out.flush()?;
        std::thread::sleep(args.poll.get().max(Duration::from_millis(100)));
        // Everything new, however much happened between two looks.
        batch = fetch(&args, newest, FOLLOW_LIMIT, true)?.unwrap_or_default();
    }
}

/// One line of --follow's text: fixed widths, since later lines cannot
/// widen the columns of earlier ones.
fn follow_line(cells: &[String]) -> String {
    let width: [usize; 4] = [20, 8, 28, 22];
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        line.push_str(cell);
        if let Some(w) = width.get(i) {
            let pad = w.saturating_sub(cell.chars().count()).max(1);
            line.push_str(&" ".repeat(pad));
        }
    }
    line.trim_end().to_owned()
}
