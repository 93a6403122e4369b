//! Desired state: the object model, parsing, validation and roles resolution.
//!
//! Everything here is pure: it takes bytes and paths that someone else read
//! and returns typed objects or diagnostics. It never touches the filesystem,
//! never spawns, never imports tokio. [`crate::source`] walks and reads the
//! directory; the controller decides what to do with the result.
//!
//! This file is the module's facade: it declares the modules and re-exports
//! their main types, and defines nothing. The modules never import through
//! it (they name their siblings, `super::model::VmSpec`), so no file of
//! `spec` depends on this one.

pub mod at;
pub mod desired;
pub mod diagnostic;
pub mod fields;
pub mod flake;
pub mod key;
pub mod model;
pub mod names;
pub mod parse;
pub mod quantity;
pub mod roles;
pub mod schema;
mod shape;
pub mod validate;
mod yaml;

pub use at::{At, Loc};
pub use desired::{DesiredState, Object};
pub use diagnostic::{Diagnostic, Origin, Related, Severity};
pub use key::{KeyError, Kind, ObjectKey};
pub use model::*;
pub use names::{Name, NameError};
pub use quantity::{ByteSize, HumanDuration, Port, QuantityError};
pub use roles::MachineRoles;
pub use validate::{Assembled, CheckedFile, Resolution, assemble, assemble_with};
