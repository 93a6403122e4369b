//! `converge vm-agent REQUEST`: the agent a controller runs over SSH on a
//! hypervisor Machine (hidden from `--help`; see `driver::qemu::agent`).
//!
//! Prints exactly one JSON line on stdout: the operation's result or its
//! error. Exit code 0 whenever such a line was printed, so the controller
//! can tell an operation that failed (a reply) from an agent that could not
//! run (no reply, exit 1).

use anyhow::Context as _;

use super::args::{EXIT_OK, runtime};
use crate::driver::qemu::agent::{self, Request};

/// Run one VM operation on this host and print its JSON reply.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The operation, as JSON (written by the controller).
    pub request: String,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let request: Request = serde_json::from_str(&args.request)
        .context("read the request: this agent was not run by the same converge build")?;
    let reply = runtime()?.block_on(agent::execute(request));
    let line = serde_json::to_string(&reply).context("write the reply")?;
    println!("{line}");
    Ok(EXIT_OK)
}
