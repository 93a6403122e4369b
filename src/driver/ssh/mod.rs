//! A machine reached over SSH as a [`Target`](crate::driver::Target): the
//! system OpenSSH client through the `openssh` crate's native multiplexing,
//! with ONE master connection per target, built lazily, shared by commands
//! and uploads (streams on a command's stdin: no SFTP), and rebuilt when it died. It owns the client-side
//! safety settings (strict host key checking against the spec's key or
//! known_hosts file, BatchMode, ConnectTimeout, ServerAlive) and turns ssh's
//! failures into errors that say whether a retry can help. It must not run a
//! shell string built with `format!` (commands travel as escaped argv words
//! behind a constant wrapper script), must not prompt for anything, and must
//! not leave a half-uploaded tree at a destination.
//!
//! This file is the facade: it declares the files and re-exports what the
//! rest of the crate uses, and holds no code. The files import each other,
//! never this facade, and depend one way: `error.rs` (SshError) <-
//! `options.rs` (SshOptions and their checks) <- `control_dir.rs` (where
//! sockets and client files live, checked private: `STATE/ssh` or a
//! temporary directory removed at the end), `config.rs` (the generated
//! client files) <- `master.rs` (SshTarget and its master connection) <-
//! `exec.rs` (running a command, as root through `sudo -n` when asked) <- `target.rs`
//! (SshTarget as a Target). `error` is visible to the rest of `driver`
//! because `TargetError` carries an [`SshError`].

mod config;
mod control_dir;
pub(super) mod error;
mod exec;
mod master;
mod options;
mod target;

pub use control_dir::ControlDir;
pub use error::SshError;
pub use master::{SshTarget, effective_client_config};
pub use options::SshOptions;
#[cfg(test)]
pub(crate) use options::testbed_options;

#[cfg(test)]
mod tests;
