//! `converge suspend KEY` and `converge resume KEY`: stop converge from
//! changing an object, and let it again. Asks a running daemon (which holds
//! the store); without one, writes the store itself.

use std::io::Write;

use super::args::{EXIT_FATAL, EXIT_OK, StateArg};
use crate::controller::suspend;
use crate::spec::ObjectKey;

/// Stop converging one object: it is still observed and its drift reported,
/// but nothing is changed on it (no build, activation, start or stop) until
/// `converge resume KEY`. `status` shows it Suspended with the steps that
/// wait. Survives daemon restarts.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  converge suspend machine/web1      # hands off while you debug it\n  converge status machine/web1       # Ready False (Suspended), steps waiting\n  converge resume machine/web1       # converges again at once"
)]
pub struct SuspendArgs {
    /// machine/NAME or vm/NAME.
    pub key: ObjectKey,
    #[command(flatten)]
    pub state: StateArg,
}

/// Let a suspended object converge again; with a daemon, at once.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  converge resume machine/web1\n  converge resume vm/builder")]
pub struct ResumeArgs {
    /// machine/NAME or vm/NAME.
    pub key: ObjectKey,
    #[command(flatten)]
    pub state: StateArg,
}

pub fn suspend(args: SuspendArgs) -> anyhow::Result<u8> {
    run("suspend", &args.key, &args.state)
}

pub fn resume(args: ResumeArgs) -> anyhow::Result<u8> {
    run("resume", &args.key, &args.state)
}

fn run(verb: &str, key: &ObjectKey, state: &StateArg) -> anyhow::Result<u8> {
    let path = format!("/v1/{verb}/{}/{}", key.kind.key_prefix(), key.name);
    let message = match super::args::ask(&state.state, "POST", &path)? {
        Some((200, body)) => body.trim().to_owned(),
        Some((_, body)) => {
            eprintln!("error: {}", body.trim());
            return Ok(EXIT_FATAL);
        }
        None => {
            let store = super::inspect::open_existing_store(state)?;
            let done = if verb == "suspend" {
                suspend::suspend(&store, key, "suspend")
            } else {
                suspend::resume(&store, key)
            };
            match done {
                Ok(message) if verb == "resume" => format!(
                    "{message} (no daemon runs: it converges at the next `converge reconcile --once` or when the daemon starts)"
                ),
                Ok(message) => message,
                Err(e) => {
                    eprintln!("error: {:#}", anyhow::Error::new(e));
                    return Ok(EXIT_FATAL);
                }
            }
        }
    };
    writeln!(std::io::stdout().lock(), "{message}")?;
    Ok(EXIT_OK)
}
