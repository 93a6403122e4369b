//! Desired state: the object model, parsing, validation and roles resolution.
//!
//! Everything here is pure: it takes bytes and paths that someone else read
//! and returns typed objects or diagnostics. It never touches the filesystem,
//! never spawns, never imports tokio. [`crate::source`] walks and reads the
//! directory; the controller decides what to do with the result.

pub mod at;
pub mod diagnostic;
pub mod fields;
pub mod key;
pub mod model;
pub mod names;
pub mod parse;
pub mod quantity;
pub mod roles;
pub mod schema;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use at::{At, Loc};
pub use diagnostic::{Diagnostic, Origin, Related, Severity};
pub use key::{KeyError, Kind, ObjectKey};
pub use model::*;
pub use names::{Name, NameError};
pub use quantity::{ByteSize, HumanDuration, Port, QuantityError};
pub use roles::MachineRoles;
pub use validate::{Assembled, CheckedFile, Resolution, assemble, assemble_with};

/// One validated object.
#[derive(Debug, Clone)]
pub struct Object<S> {
    pub key: ObjectKey,
    pub tags: BTreeSet<Name>,
    pub spec: S,
    /// Where the document is, for later messages.
    pub origin: Origin,
    pub(crate) name_loc: Loc,
    /// blake3 of the document's canonical JSON: changes exactly when the YAML's
    /// meaning changes (not when a comment or the document's position does).
    pub spec_hash: String,
}

/// A complete, valid desired state: every object of a directory, and each
/// machine's resolved roles.
///
/// Objects are shared (`Arc`) with the source's cache of parsed files and
/// with the previous desired state: a reload builds new objects only for the
/// files that changed, and cloning a desired state copies no spec.
#[derive(Debug, Clone, Default)]
pub struct DesiredState {
    pub machines: BTreeMap<Name, Arc<Object<MachineSpec>>>,
    pub vms: BTreeMap<Name, Arc<Object<VmSpec>>>,
    pub services: BTreeMap<Name, Arc<Object<ServiceSpec>>>,
    /// Every machine's roles document (machines without roles get an empty
    /// one), shared with the next load when it does not change.
    pub roles: BTreeMap<Name, Arc<MachineRoles>>,
}

impl DesiredState {
    pub fn len(&self) -> usize {
        self.machines.len() + self.vms.len() + self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every object key with its spec hash, in key order.
    pub fn spec_hashes(&self) -> BTreeMap<ObjectKey, &str> {
        let machines = self
            .machines
            .values()
            .map(|o| (o.key.clone(), o.spec_hash.as_str()));
        let vms = self
            .vms
            .values()
            .map(|o| (o.key.clone(), o.spec_hash.as_str()));
        let services = self
            .services
            .values()
            .map(|o| (o.key.clone(), o.spec_hash.as_str()));
        machines.chain(vms).chain(services).collect()
    }
}
