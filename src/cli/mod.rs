//! Command-line interface: argument parsing and one file per subcommand.
//!
//! This is the only place that prints to stdout and the only place (with
//! main.rs) that uses anyhow. Each subcommand returns its exit code; the codes
//! are part of the interface and documented in `--help` and the README.

mod agent;
mod args;
mod events;
mod fetch;
mod inspect;
mod notify;
mod plan;
mod progress;
mod reconcile;
mod run;
mod schema;
mod suspend;
mod table;
mod validate;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

pub use args::{EXIT_FATAL, EXIT_OK};

#[derive(Debug, Parser)]
#[command(
    name = "converge",
    version,
    about = "Reconcile machines, QEMU VMs and service roles to YAML desired state",
    long_about = "converge reads desired state (YAML documents of kind Machine, VirtualMachine \
and Service) from a directory, usually a Git checkout, and converges each object to it: \
build, upload, activate, health-check, roll back on failure, retry with backoff.\n\n\
Start with `converge validate --dir DIR` to check a directory.",
    after_help = "Examples:\n  converge validate --dir examples/quickstart\n  converge schema --out schemas\n\nExit codes: 0 success; 1 invalid input or fatal error."
)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "CONVERGE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Validate(validate::Args),
    Plan(plan::Args),
    Reconcile(reconcile::Args),
    Run(run::Args),
    Fetch(fetch::FetchArgs),
    Status(inspect::StatusArgs),
    History(inspect::HistoryArgs),
    Facts(inspect::FactsArgs),
    Suspend(suspend::SuspendArgs),
    Resume(suspend::ResumeArgs),
    Events(events::Args),
    Vm(vm::Args),
    Schema(schema::Args),
    /// Run one VM operation for a controller on this hypervisor (internal).
    #[command(name = "vm-agent", hide = true)]
    VmAgent(agent::Args),
}

/// Parses arguments, runs the command and maps errors to exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "info");
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FATAL)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Validate(args) => validate::run(args),
        Command::Reconcile(args) => reconcile::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Run(args) => run::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Status(args) => inspect::status(args),
        Command::History(args) => inspect::history(args),
        Command::Facts(args) => inspect::facts(args),
        Command::Suspend(args) => suspend::suspend(args),
        Command::Resume(args) => suspend::resume(args),
        Command::Events(args) => events::run(args),
        Command::Vm(args) => vm::run(args),
        Command::Schema(args) => schema::run(args),
        Command::VmAgent(args) => agent::run(args),
    }
}
