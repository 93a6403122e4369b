//! `converge status`, `converge history`, `converge facts`: what is deployed
//! where, and how it got there.
//!
//! Each asks a running daemon over its socket; without one, it opens the
//! store itself. Both paths produce the same JSON, rendered as a table or
//! printed with --output json.

use std::io::Write;

use anyhow::Context as _;
use serde_json::Value;

use super::args::{EXIT_FATAL, EXIT_OK, Output, StateArg};
use crate::spec::ObjectKey;
use crate::store::Store;

/// Show each object's condition, generation, revision and last contact.
///
/// Without KEY: one row per object, after the Git source (`run --git`):
/// the commit applied, the last fetch, a refused tip. With KEY: that
/// object's full status, its conditions with reasons and transition times.
/// With --source: only the Git source.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge status\n  converge status machine/web1\n  converge status --output json | jq '.[] | select(.status.failures > 0)'\n  converge status --source --output json | jq .applied"
)]
pub struct StatusArgs {
    pub key: Option<ObjectKey>,
    /// Show only the Git source: applied commit, last fetch, refused tip.
    #[arg(long, conflicts_with = "key")]
    pub source: bool,
    #[command(flatten)]
    pub state: StateArg,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

/// Show an object's attempts, newest first: result, generation, steps.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge history machine/web1\n  converge history machine/web1 --limit 5 --output json"
)]
pub struct HistoryArgs {
    pub key: ObjectKey,
    #[command(flatten)]
    pub state: StateArg,
    /// How many attempts.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Show each step's captured output.
    #[arg(long)]
    pub steps: bool,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

/// Show what was last observed on an object (hostname, boot id, kernel, generations…).
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge facts machine/web1\n  converge facts vm/builder --output json | jq .facts.pid"
)]
pub struct FactsArgs {
    pub key: ObjectKey,
    #[command(flatten)]
    pub state: StateArg,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

/// Asks the daemon for `path`, or computes the same JSON from the store.
fn fetch(
    state: &StateArg,
    path: &str,
    direct: impl FnOnce(&Store) -> anyhow::Result<Option<Value>>,
) -> anyhow::Result<Option<Value>> {
    if let Some((status, body)) = super::args::ask(&state.state, "GET", path)? {
        return match status {
            200 => Ok(Some(
                serde_json::from_str(&body).context("parse the daemon's answer")?,
            )),
            404 => Ok(None),
            other => anyhow::bail!("the daemon answered {other}: {}", body.trim()),
        };
    }
    direct(&open_existing_store(state)?)
}

/// Opens the store under `--state` for a read or an operator verb, refusing
/// to create one where nothing was ever reconciled.
pub(crate) fn open_existing_store(state: &StateArg) -> anyhow::Result<Store> {
    let dir = crate::controller::context::store_dir(&state.state);
    if !dir.exists() {
        anyhow::bail!(
            "no store at {}: nothing was reconciled with this --state yet",
            dir.display()
        );
    }
    super::args::open_store(&state.state)
}

fn path_of(prefix: &str, key: &ObjectKey) -> String {
    format!("/v1/{prefix}/{key}")
}

pub(crate) fn ms_ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "-".to_owned();
    };
    let now = crate::store::records::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("kind").and_then(Value::as_str) == Some(kind))
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

/// The Git source's section of `status`.
fn write_source(out: &mut impl Write, source: &Value) -> std::io::Result<()> {
    let short = |v: &Value| {
        let c = v.as_str().unwrap_or("-");
        c.get(..12).unwrap_or(c).to_owned()
    };
    writeln!(
        out,
        "SOURCE {} branch {} dir {}",
        text(source.get("url")),
        text(source.get("branch")),
        text(source.get("dir"))
    )?;
    writeln!(
        out,
        "  applied  {} ({})",
        short(&source["applied"]),
        ms_ago(source["applied_ms"].as_u64())
    )?;
    match source["error"].as_str() {
        None => writeln!(
            out,
            "  fetched  {} ok, tip {}",
            ms_ago(source["fetched_ms"].as_u64()),
            short(&source["tip"])
        )?,
        Some(error) => writeln!(
            out,
            "  fetch    FAILING {} time(s) in a row, last success {}: {error}",
            source["failures"],
            ms_ago(source["succeeded_ms"].as_u64())
        )?,
    }
    if let Some(refused) = source.get("refused").filter(|r| !r.is_null()) {
        writeln!(
            out,
            "  refused  {} ({}): {}",
            short(&refused["commit"]),
            ms_ago(refused["since_ms"].as_u64()),
            text(refused.get("reason"))
        )?;
    }
    writeln!(out)
}

pub fn status(args: StatusArgs) -> anyhow::Result<u8> {
    if args.source || args.key.is_none() {
        let source = fetch(&args.state, "/v1/source", |store| {
            Ok(store.source()?.map(serde_json::to_value).transpose()?)
        })?;
        let mut out = std::io::stdout().lock();
        match (args.source, source) {
            (true, None) => {
                eprintln!("error: no Git source: this state directory was never used with --git");
                return Ok(EXIT_FATAL);
            }
            (true, Some(source)) => {
                if args.output == Output::Json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&source)?)?;
                } else {
                    write_source(&mut out, &source)?;
                }
                return Ok(EXIT_OK);
            }
            (false, Some(source)) if args.output == Output::Text => {
                write_source(&mut out, &source)?;
            }
            (false, _) => {}
        }
    }
    let value = match &args.key {
        Some(key) => fetch(&args.state, &path_of("status", key), |store| {
            Ok(crate::api::status_view(store, key)?)
        })?,
        None => fetch(&args.state, "/v1/status", |store| {
            let mut out = Vec::new();
            for (key, _) in store.statuses()? {
                out.extend(crate::api::status_view(store, &key)?);
            }
            Ok(Some(Value::Array(out)))
        })?,
    };
    let mut out = std::io::stdout().lock();
    let Some(value) = value else {
        writeln!(
            out,
            "no status for {}",
            args.key.map(|k| k.to_string()).unwrap_or_default()
        )?;
        return Ok(EXIT_FATAL);
    };
    if args.output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(EXIT_OK);
    }
    let rows: Vec<Value> = match value {
        Value::Array(rows) => rows,
        one => vec![one],
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let status = &row["status"];
            let ready = condition(status, "Ready");
            let drifted = condition(status, "Drifted")
                .and_then(|c| c.get("status"))
                .and_then(Value::as_bool)
                == Some(true);
            let applied = &status["last_applied"];
            let applied_generation = match (
                applied.get("generation"),
                applied.get("artifact").and_then(Value::as_str),
            ) {
                (Some(g), Some(a)) => Some(format!("{g}-{a}")),
                _ => None,
            };
            let generation = super::table::generation_cell(
                row.get("current").and_then(Value::as_str),
                applied_generation.as_deref(),
            );
            vec![
                text(row.get("key")),
                match ready.and_then(|c| c.get("status")).and_then(Value::as_bool) {
                    Some(true) => "True".to_owned(),
                    Some(false) => "False".to_owned(),
                    None => "Unknown".to_owned(),
                },
                format!(
                    "{}{}{}",
                    ready
                        .map(|c| text(c.get("reason")))
                        .unwrap_or_else(|| "-".into()),
                    if drifted { " (drifted)" } else { "" },
                    if row.get("suspended").is_some_and(|v| !v.is_null()) {
                        " (suspended)"
                    } else {
                        ""
                    }
                ),
                generation,
                text(applied.get("revision")),
                ms_ago(row.get("lastSeenMs").and_then(Value::as_u64)),
                ready.map(|c| text(c.get("message"))).unwrap_or_default(),
            ]
        })
        .collect();
    super::table::write(
        &mut out,
        &[
            "OBJECT",
            "READY",
            "REASON",
            "GENERATION",
            "REVISION",
            "LAST SEEN",
            "MESSAGE",
        ],
        &table,
    )?;
    if let (Some(_), Some(row)) = (&args.key, rows.first()) {
        writeln!(out)?;
        if let Some(nixos) = row.get("nixos").filter(|n| n.is_object()) {
            writeln!(
                out,
                "  NixOS system {}  booted {}{}",
                text(nixos.get("currentSystem")),
                text(nixos.get("bootedSystem")),
                if nixos.get("needsReboot").and_then(Value::as_bool) == Some(true) {
                    "  (reboot needed: the booted kernel, initrd or modules differ)"
                } else {
                    ""
                }
            )?;
        }
        for c in row["status"]["conditions"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "  {:<12} {:<6} {:<22} since {}  {}",
                text(c.get("kind")),
                text(c.get("status")),
                text(c.get("reason")),
                ms_ago(c.get("last_transition_ms").and_then(Value::as_u64)),
                text(c.get("message"))
            )?;
        }
    }
    Ok(EXIT_OK)
}

pub fn history(args: HistoryArgs) -> anyhow::Result<u8> {
    let key = args.key.clone();
    let limit = args.limit;
    let path = format!("{}?limit={limit}", path_of("history", &key));
    let value = fetch(&args.state, &path, |store| {
        Ok(Some(serde_json::to_value(store.history(&key, limit)?)?))
    })?
    .unwrap_or(Value::Array(Vec::new()));
    let mut out = std::io::stdout().lock();
    if args.output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(EXIT_OK);
    }
    let attempts = value.as_array().cloned().unwrap_or_default();
    if attempts.is_empty() {
        writeln!(out, "no attempts recorded for {key}")?;
        return Ok(EXIT_OK);
    }
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .map(|a| {
            let started = a.get("started_ms").and_then(Value::as_u64);
            let duration = a
                .get("finished_ms")
                .and_then(Value::as_u64)
                .zip(started)
                .map(|(f, s)| f.saturating_sub(s));
            let result = &a["result"];
            let kind = text(result.get("kind"));
            let detail = result.get("message").and_then(Value::as_str).unwrap_or("");
            let steps: Vec<String> = a["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let mark = match s["status"].as_str() {
                        Some("failed") => "!",
                        Some("skipped") => "-",
                        _ => "",
                    };
                    format!("{}{mark}", text(s.get("name")))
                })
                .collect();
            vec![
                text(a.get("id")),
                ms_ago(started),
                duration.map(|d| format!("{d}ms")).unwrap_or_default(),
                kind,
                text(a.get("generation")),
                text(a.get("revision")),
                steps.join(","),
                detail.chars().take(100).collect(),
            ]
        })
        .collect();
    super::table::write(
        &mut out,
        &[
            "ID", "STARTED", "DURATION", "RESULT", "GEN", "REVISION", "STEPS", "MESSAGE",
        ],
        &rows,
    )?;
    if args.steps {
        for a in &attempts {
            writeln!(out, "\nattempt {}:", text(a.get("id")))?;
            for s in a["steps"].as_array().into_iter().flatten() {
                let detail = match s.get("detail") {
                    Some(Value::Object(map)) if !map.is_empty() => {
                        format!(" {}", Value::Object(map.clone()))
                    }
                    _ => String::new(),
                };
                writeln!(
                    out,
                    "  [{}] {}{detail} ({}ms)",
                    match s["status"].as_str() {
                        Some("succeeded") => "ok",
                        Some("skipped") => "skipped",
                        _ => "FAILED",
                    },
                    text(s.get("name")),
                    text(s.get("duration_ms"))
                )?;
                for line in s["output"].as_str().unwrap_or("").lines() {
                    writeln!(out, "      {line}")?;
                }
            }
        }
    }
    Ok(EXIT_OK)
}

pub fn facts(args: FactsArgs) -> anyhow::Result<u8> {
    let key = args.key.clone();
    let value = fetch(&args.state, &path_of("facts", &key), |store| {
        Ok(store.facts(&key)?.map(serde_json::to_value).transpose()?)
    })?;
    let mut out = std::io::stdout().lock();
    match value {
        Some(v) if args.output == Output::Json => {
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            Ok(EXIT_OK)
        }
        Some(v) => {
            writeln!(
                out,
                "{key} observed {}",
                ms_ago(v.get("observed_ms").and_then(Value::as_u64))
            )?;
            let mut lines = Vec::new();
            flatten("", v.get("facts").unwrap_or(&Value::Null), &mut lines);
            let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in lines {
                writeln!(out, "  {k:width$}  {v}")?;
            }
            Ok(EXIT_OK)
        }
        None => {
            writeln!(out, "no facts observed for {key}")?;
            Ok(EXIT_FATAL)
        }
    }
}

/// `a.b[0].c`-style paths and their scalar values, in document order.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => out.push((prefix.to_owned(), text(Some(other)))),
    }
}
