//! `converge schema`: write (or check) the JSON Schemas of the object kinds.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use super::args::{EXIT_FATAL, EXIT_OK};
use crate::spec::schema;

/// Write one JSON Schema per kind, plus document.json for any document.
///
/// Editors use them through a first-line comment in each YAML file:
///   # yaml-language-server: $schema=../schemas/document.json
///
/// With --check nothing is written; exit 1 if a file is missing or stale.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge schema --out schemas\n  converge schema --out schemas --check"
)]
pub struct Args {
    /// Directory to write the schemas into.
    #[arg(long, default_value = "schemas")]
    pub out: PathBuf,
    /// Compare instead of writing; exit 1 if any schema is stale.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut stdout = std::io::stdout().lock();
    let mut stale = Vec::new();
    if !args.check {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("create {}", args.out.display()))?;
    }
    for (name, value) in schema::all() {
        let path = args.out.join(name);
        let text = schema::render(&value);
        if args.check {
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current != text {
                stale.push(path);
            }
        } else {
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            writeln!(stdout, "wrote {}", path.display())?;
        }
    }
    if stale.is_empty() {
        if args.check {
            writeln!(stdout, "schemas in {} are up to date", args.out.display())?;
        }
        Ok(EXIT_OK)
    } else {
        for path in &stale {
            writeln!(
                stdout,
                "stale: {} (run `converge schema --out {}`)",
                path.display(),
                args.out.display()
            )?;
        }
        Ok(EXIT_FATAL)
    }
}
