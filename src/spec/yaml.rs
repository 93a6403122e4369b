//! How converge reads YAML with serde-saphyr: the options every parse uses
//! (budgets that bound any input, duplicate keys as errors), and the
//! parser's errors in converge's words with their location. `parse` reads
//! whole documents with it and `shape` single values, so both say the same
//! thing about the same input. Pure: text in, values or messages out.

use serde::de::DeserializeOwned;
use serde_saphyr::{Budget, DuplicateKeyPolicy, MessageFormatter, Options};

use super::at::Loc;

/// The largest file read, in bytes.
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// The deepest nesting a document may have.
pub const MAX_DEPTH: usize = 64;

/// The options of every parse.
pub(super) fn options() -> Options {
    let mut budget = Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.max_nodes = 200_000;
    budget.max_events = 1_000_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_total_scalar_bytes = MAX_FILE_BYTES * 2;
    budget.max_documents = 1;
    let mut options = Options::default();
    options.budget = Some(budget);
    options.duplicate_keys = DuplicateKeyPolicy::Error;
    options.with_snippet = false;
    options.alias_limits.max_total_replayed_events = 100_000;
    options.alias_limits.max_replay_stack_depth = MAX_DEPTH;
    options.alias_limits.max_alias_expansions_per_anchor = 1_000;
    options
}

/// Reads `text` (one document) as a `T`; an error is its location in
/// `text` and converge's message for it.
pub(super) fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, (Loc, String)> {
    serde_saphyr::from_str_with_options::<T>(text, options()).map_err(|e| {
        let loc = e
            .location()
            .map(|l| {
                Loc::new(
                    u32::try_from(l.line()).unwrap_or(u32::MAX),
                    u32::try_from(l.column()).unwrap_or(u32::MAX),
                )
            })
            .unwrap_or(Loc::UNKNOWN);
        (loc, message(&e))
    })
}

/// The parser's message without its own location suffix, in converge's words.
fn message(e: &serde_saphyr::Error) -> String {
    let raw = serde_saphyr::DefaultMessageFormatter
        .format_message(e.without_snippet())
        .into_owned();
    reword(strip_location_suffix(&raw))
}

/// A parser's message (or one worded like it) made actionable where we
/// know better words.
pub(super) fn reword(raw: &str) -> String {
    let mut message = raw.to_owned();
    if message.starts_with("duplicate mapping key") {
        message = message
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(&message)
            .to_owned();
        message.push_str(": each key may appear once in a mapping");
    } else if message.contains("budget")
        || message.contains("Budget")
        || message.contains("exceeded")
    {
        message = format!(
            "document is too large, too deeply nested or expands too many aliases ({message}): simplify it"
        );
    } else if let Some(expected) = message
        .strip_prefix("invalid ")
        .and_then(scalar_expectation)
    {
        message = format!("expected {expected} here");
    } else if message == "expected sequence start" {
        message = "expected a list here, like `[a, b]`".to_owned();
    } else if message == "expected mapping start" {
        message = "expected a mapping here, like `key: value`".to_owned();
    }
    message
}

/// What a scalar of a Rust type (as the parser names it) must look like.
fn scalar_expectation(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "u128" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "bool" => "`true` or `false`",
        _ => return None,
    })
}

fn strip_location_suffix(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(pos) if message[pos..].contains(", column ") => &message[..pos],
        _ => message,
    }
}
