//! The `converge` binary: parse arguments, set up logs, run the command.

use std::process::ExitCode;

fn main() -> ExitCode {
    converge::cli::main()
}
