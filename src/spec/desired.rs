//! The result of loading a directory: one validated [`Object`] per document,
//! and the [`DesiredState`] that holds every object and each machine's roles.
//!
//! Plain data: `validate` builds these types and the rest of the crate reads
//! them. This file must not check or build anything itself (that is
//! `validate`'s job), and, like all of `spec`, must do no IO.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::at::Loc;
use super::diagnostic::Origin;
use super::key::{Kind, ObjectKey};
use super::model::{MachineSpec, ServiceSpec, VmSpec};
use super::names::Name;
use super::roles::MachineRoles;

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

    /// Whether an object of that kind and name is in this desired state.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        match key.kind {
            Kind::Machine => self.machines.contains_key(&key.name),
            Kind::VirtualMachine => self.vms.contains_key(&key.name),
            Kind::Service => self.services.contains_key(&key.name),
        }
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
