//! Drivers: the only code in converge that spawns processes or touches a
//! machine. This file is the facade: it declares the driver modules and
//! re-exports the [`Target`] seam (`target.rs`) so the rest of the crate
//! names it as `driver::Target`. It must hold no code of its own, and the
//! driver files must not import through it: they name their siblings
//! (`super::target::Target`), so no file depends on this one and the
//! dependencies between driver files point one way.

pub mod build;
pub mod capability;
mod command;
pub mod console;
pub mod exec_hook;
pub mod git;
pub mod git_source;
pub mod host;
pub mod hypervisor;
mod hypervisor_error;
pub mod local;
pub mod nix;
pub mod protocol;
pub mod qemu;
pub mod sink;
pub mod ssh;
pub mod stream;
mod target;
pub mod webhook;

pub use target::{CommandOutput, Input, InputError, NO_INPUT, OUTPUT_LIMIT, Target, TargetError};
