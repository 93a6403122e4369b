//! `converge validate`: check a desired-state directory without touching anything.

use std::io::Write;

use anyhow::Context;

use super::args::{DirArg, EXIT_FATAL, EXIT_OK, Output};
use crate::source::Source;

/// Check a desired-state directory: syntax, schema, references, roles.
///
/// Every file is read and every error reported, each with file:line:column.
/// Warnings (a tag that selects nothing, a role without machines) do not fail
/// validation. With --roles, each machine's resolved roles document is shown.
///
/// Exit codes: 0 valid (warnings allowed), 1 invalid.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge validate --dir examples/homelab\n  converge validate --dir . --roles\n  converge validate --dir . --output json | jq '.diagnostics[]'"
)]
pub struct Args {
    #[command(flatten)]
    pub dir: DirArg,
    /// Show each machine's resolved roles document and its hash.
    #[arg(long)]
    pub roles: bool,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut source = Source::new(&args.dir.dir);
    let (assembled, stats) = source
        .load()
        .with_context(|| format!("validate {}", args.dir.dir.display()))?;
    let mut out = std::io::stdout().lock();
    let valid = assembled.desired.is_some();
    match args.output {
        Output::Json => {
            let roles: serde_json::Map<String, serde_json::Value> = assembled
                .desired
                .iter()
                .flat_map(|d| d.roles.iter())
                .map(|(name, r)| {
                    let document: serde_json::Value =
                        serde_json::from_slice(&r.document).unwrap_or(serde_json::Value::Null);
                    (
                        name.to_string(),
                        serde_json::json!({"hash": r.hash, "document": document}),
                    )
                })
                .collect();
            let summary = serde_json::json!({
                "valid": valid,
                "files": stats.files,
                "machines": assembled.desired.as_ref().map(|d| d.machines.len()),
                "virtualMachines": assembled.desired.as_ref().map(|d| d.vms.len()),
                "services": assembled.desired.as_ref().map(|d| d.services.len()),
                "diagnostics": assembled.diagnostics,
                "roles": if args.roles { serde_json::Value::Object(roles) } else { serde_json::Value::Null },
            });
            serde_json::to_writer_pretty(&mut out, &summary)?;
            writeln!(out)?;
        }
        Output::Text => {
            for d in &assembled.diagnostics {
                writeln!(out, "{d}")?;
            }
            let errors = assembled.errors().count();
            let warnings = assembled.warnings().count();
            match &assembled.desired {
                Some(desired) => {
                    if args.roles {
                        for (name, roles) in &desired.roles {
                            writeln!(out, "roles of machine/{name} (hash {}):", &roles.hash[..16])?;
                            let doc: serde_json::Value = serde_json::from_slice(&roles.document)?;
                            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
                        }
                    }
                    writeln!(
                        out,
                        "valid: {} machines, {} virtual machines, {} services in {} files ({} warnings)",
                        desired.machines.len(),
                        desired.vms.len(),
                        desired.services.len(),
                        stats.files,
                        warnings
                    )?;
                }
                None => writeln!(
                    out,
                    "invalid: {errors} errors, {warnings} warnings in {} files; nothing would be applied",
                    stats.files
                )?,
            }
        }
    }
    Ok(if valid { EXIT_OK } else { EXIT_FATAL })
}
