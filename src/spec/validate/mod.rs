//! Validation across fields and objects, and assembly of the desired state.
//!
//! Takes every parsed file of a directory, checks each object on its own
//! (ranges, exclusive fields, paths that climb out of the directory) and then
//! all of them together (duplicate names, references to machines that do not
//! exist, tags that select nothing, `after` cycles, host port clashes, two
//! machines sharing one state directory on one host), and
//! returns either a complete
//! [`DesiredState`](crate::spec::desired::DesiredState) or every diagnostic
//! found. A directory with any error yields no desired state at all: the
//! caller keeps the last valid one. Pure: paths are checked lexically,
//! nothing is read.
//!
//! Assembling is incremental when the caller keeps two things between loads:
//! a [`CheckedFile`] per file (its objects built, hashed and checked on their
//! own, once per parse) and the [`Resolution`] of the previous assembly (role
//! members, roles documents and the diagnostics about them, with the inputs
//! they came from). Both are reused only where their inputs are unchanged, so
//! the result is always exactly that of assembling from scratch.
//!
//! The work is split by stage, one file each: `checks` looks at one object
//! alone, `checked` builds a file's objects with what those checks found,
//! `references` checks the VMs against the machines and each other,
//! `targets` the machines' targets against each other,
//! `resolution` selects role members and resolves the roles documents, and
//! `assemble` puts it all together, finding duplicate names on the way;
//! `cycle` finds the `after` cycles that `checks` and `resolution` report.
//! This file only declares them and re-exports what the rest of the crate
//! uses; they never import through it.

mod assemble;
mod checked;
mod checks;
mod cycle;
mod references;
mod resolution;
mod targets;

pub use assemble::{Assembled, assemble, assemble_with};
pub use checked::CheckedFile;
pub use resolution::Resolution;
