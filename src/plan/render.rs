//! Text rendering of a plan, in Terraform's shape: drift first ("changed
//! outside converge"), then one block per change, then the summary line.

use std::fmt::Write;

use serde_json::Value;

use super::model::{ChangeKind, Plan};

fn value(v: &Option<Value>) -> String {
    match v {
        None => "(none)".to_owned(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
    }
}

/// The plan as text, ending with the summary line.
pub fn render_text(plan: &Plan) -> String {
    let mut out = String::new();
    if !plan.unobserved.is_empty() {
        let _ = writeln!(
            out,
            "Warning: these objects could not be observed; planned from records only:"
        );
        for (key, why) in &plan.unobserved {
            let _ = writeln!(out, "  ? {key}: {why}");
        }
        let _ = writeln!(out);
    }
    if !plan.drift.is_empty() {
        let _ = writeln!(out, "Note: objects changed outside converge");
        for d in &plan.drift {
            let _ = writeln!(
                out,
                "  ~ {}: {} is {} (converge applied {}); drift policy: {}",
                d.key, d.field, d.observed, d.applied, d.action
            );
        }
        let _ = writeln!(out);
    }
    if plan.changes.is_empty() {
        let _ = writeln!(out, "No changes. Every object matches its spec.");
        return out;
    }
    let _ = writeln!(out, "converge will perform these actions:");
    for change in &plan.changes {
        let verb = match change.kind {
            ChangeKind::Create => "will be created",
            ChangeKind::Update => "will be updated in place",
            ChangeKind::Replace => "must be replaced",
            ChangeKind::Destroy => "will be destroyed",
            ChangeKind::Forget => "will be forgotten",
            ChangeKind::Correct => "will be corrected (drift)",
        };
        let _ = writeln!(out);
        let _ = writeln!(out, "  {} {} {verb}", change.kind.symbol(), change.key);
        if let Some(note) = &change.note {
            let _ = writeln!(out, "      # {note}");
        }
        for f in &change.fields {
            let marker = if f.forces_replacement {
                "  # forces replacement"
            } else if f.forces_restart {
                "  # forces restart"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "      ~ {}: {} -> {}{marker}",
                f.path,
                value(&f.before),
                value(&f.after)
            );
        }
        if let Some(nixos) = &change.nixos {
            let current = nixos.current.as_deref().unwrap_or("(unknown)");
            let _ = writeln!(out, "      system: {current}");
            if nixos.current.as_deref() == Some(nixos.new.as_str()) {
                let _ = writeln!(
                    out,
                    "           -> {} (unchanged: nothing to switch)",
                    nixos.new
                );
            } else {
                let _ = writeln!(out, "           -> {}", nixos.new);
            }
            for line in nixos.closure.iter().flatten() {
                let _ = writeln!(out, "        closure: {line}");
            }
        }
        if !change.steps.is_empty() {
            let _ = writeln!(out, "      steps:");
            for step in &change.steps {
                let _ = writeln!(out, "        - {}", step.describe());
            }
        }
        if let Some(generation) = &change.rollback_to {
            let _ = writeln!(
                out,
                "      on failure: roll back to generation {generation}"
            );
        }
    }
    let (add, change, destroy) = plan.summary();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Plan: {add} to add, {change} to change, {destroy} to destroy."
    );
    out
}
