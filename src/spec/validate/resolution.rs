//! Role resolution kept from one load to the next ([`Resolution`]): which
//! machines each role selects (with the diagnostics about unknown machines,
//! tags that select nothing and stray per-machine settings), every machine's
//! roles document, and the check for `after` cycles across services. An
//! update recomputes only what its change can touch and must give exactly
//! the result of resolving from scratch. The documents themselves are built
//! by [`roles`]; this file must not build them, nor check anything but roles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use super::cycle::find_cycle_from;
use crate::spec::desired::Object;
use crate::spec::diagnostic::{Diagnostic, Severity};
use crate::spec::model::{MachineSpec, ServiceSpec};
use crate::spec::names::Name;
use crate::spec::roles::{self, MachineRoles, Members, ServicePieces};

/// The part of assembling that depends only on the machines' names and tags
/// and on the services: which machines each role selects (with the
/// diagnostics about that), every machine's roles document, and the check
/// for `after` cycles across services. It is kept from one assembly to the
/// next together with the inputs it came from, and an assembly recomputes
/// only what its change can touch:
///
/// - a service's members and their diagnostics are reused when it is the
///   same document (same file text, same place) and no machine was added,
///   removed or retagged; otherwise they are selected again;
/// - a machine's roles document is a function of the services the machine is
///   a member of, their specs and their members (see [`roles::resolve`]), so
///   it is resolved again only for the members, old and new, of the services
///   whose spec or members changed (added and removed ones included), and
///   for new machines;
/// - the cycle check looks at the whole graph, and is redone whenever
///   anything it reads may have changed.
#[derive(Debug, Default)]
pub struct Resolution {
    /// The machines it was computed for, in name order.
    machines: Vec<Arc<Object<MachineSpec>>>,
    /// Machines by tag, as positions in `machines`.
    by_tag: BTreeMap<Name, Vec<usize>>,
    services: BTreeMap<Name, Arc<Object<ServiceSpec>>>,
    /// Per service, the members of each role and the diagnostics found
    /// selecting them.
    members: BTreeMap<Name, (Members, Vec<Diagnostic>)>,
    pub(super) roles: BTreeMap<Name, Arc<MachineRoles>>,
    /// Per service, the parts of its members' documents that they share.
    pieces: BTreeMap<Name, ServicePieces>,
    cycle: Option<Diagnostic>,
}

impl Resolution {
    /// The resolution for `machines` and `services`, reusing `self` (the
    /// previous one) where its inputs are unchanged.
    pub(super) fn update(
        mut self,
        machines: &BTreeMap<Name, Arc<Object<MachineSpec>>>,
        services: &BTreeMap<Name, Arc<Object<ServiceSpec>>>,
    ) -> Resolution {
        // Role selection reads the machines' names and tags only.
        let same_machines = self.machines.len() == machines.len()
            && self
                .machines
                .iter()
                .zip(machines.values())
                .all(|(old, new)| {
                    Arc::ptr_eq(old, new) || (old.key.name == new.key.name && old.tags == new.tags)
                });
        let mut old_members = std::mem::take(&mut self.members);
        let reusable = |name: &Name, service: &Arc<Object<ServiceSpec>>| {
            same_machines
                && old_members.contains_key(name)
                && self.services.get(name).is_some_and(|old| {
                    Arc::ptr_eq(old, service) || old.origin.is_same_document(&service.origin)
                })
        };
        let reselect: BTreeSet<&Name> = services
            .iter()
            .filter(|(name, service)| !reusable(name, service))
            .map(|(name, _)| name)
            .collect();
        let by_tag = if same_machines {
            std::mem::take(&mut self.by_tag)
        } else {
            tag_index(machines)
        };
        let order: Vec<&Name> = if reselect.is_empty() {
            Vec::new()
        } else {
            machines.keys().collect()
        };

        let mut members: BTreeMap<Name, (Members, Vec<Diagnostic>)> = BTreeMap::new();
        // Machines whose roles documents may differ from the previous ones.
        // With no previous documents, that is every machine.
        let cold = self.roles.is_empty();
        let mut affected: BTreeSet<&Name> = BTreeSet::new();
        for (name, service) in services {
            let old_entry = old_members.remove(name);
            let entry = match old_entry {
                Some(entry) if !reselect.contains(name) => entry,
                old_entry => {
                    let mut diags = Vec::new();
                    let selected = select_members(service, machines, &order, &by_tag, &mut diags);
                    let same_roles = self
                        .services
                        .get(name)
                        .is_some_and(|old| old.spec == service.spec)
                        && old_entry.as_ref().is_some_and(|(old, _)| *old == selected);
                    if !same_roles {
                        self.pieces.remove(name);
                    }
                    if !same_roles && !cold {
                        if let Some((old, _)) = &old_entry {
                            mark(old, machines, &mut affected);
                        }
                        mark(&selected, machines, &mut affected);
                    }
                    (selected, diags)
                }
            };
            members.insert(name.clone(), entry);
        }
        // What is left are removed services: their old members lose them.
        let removed_services = !old_members.is_empty();
        for (name, (old, _)) in &old_members {
            self.pieces.remove(name);
            if !cold {
                mark(old, machines, &mut affected);
            }
        }

        let mut roles = std::mem::take(&mut self.roles);
        if cold {
            affected.extend(machines.keys());
        } else if !same_machines {
            roles.retain(|name, _| machines.contains_key(name));
            // A new machine gets its document, empty if it plays no role.
            affected.extend(machines.keys().filter(|name| !roles.contains_key(*name)));
        }
        // Machines that may wait for others differently than before.
        let mut rewired: Vec<Name> = Vec::new();
        if !affected.is_empty() {
            let wanted: Vec<&Name> = affected.into_iter().collect();
            let inputs: BTreeMap<&Name, (&ServiceSpec, &Members)> = services
                .iter()
                .filter_map(|(name, service)| {
                    let (selected, _) = members.get(name)?;
                    Some((name, (&service.spec, selected)))
                })
                .collect();
            for (machine, resolved) in roles::resolve_with(&wanted, &inputs, &mut self.pieces) {
                if roles
                    .get(&machine)
                    .is_none_or(|old| old.after != resolved.after)
                {
                    rewired.push(machine.clone());
                }
                roles.insert(machine, Arc::new(resolved));
            }
        }

        let all_reused =
            same_machines && reselect.is_empty() && !removed_services && rewired.is_empty();
        let cycle = if all_reused {
            self.cycle
        } else if !cold
            && self.cycle.is_none()
            && find_cycle_from(rewired.iter(), |m| after_of(&roles, m)).is_none()
        {
            // The previous graph had no cycle, so a new one would pass
            // through a machine whose `after` changed; none does.
            None
        } else {
            machine_cycle(&roles, services, &members)
        };
        let mut kept = self.machines;
        if same_machines {
            // Mostly the same objects: replace only the rebuilt ones.
            for (old, new) in kept.iter_mut().zip(machines.values()) {
                if !Arc::ptr_eq(old, new) {
                    *old = Arc::clone(new);
                }
            }
        } else {
            kept = machines.values().cloned().collect();
        }
        Resolution {
            machines: kept,
            by_tag,
            services: services.clone(),
            members,
            roles,
            pieces: self.pieces,
            cycle,
        }
    }

    /// Appends the diagnostics of role selection and the cycle check, in the
    /// order a from-scratch assembly finds them.
    pub(super) fn diagnostics(&self, into: &mut Vec<Diagnostic>) {
        for (_, diags) in self.members.values() {
            into.extend(diags.iter().cloned());
        }
        into.extend(self.cycle.iter().cloned());
    }
}

/// Adds the machines of `set` that still exist to `affected`.
fn mark<'m>(
    set: &Members,
    machines: &'m BTreeMap<Name, Arc<Object<MachineSpec>>>,
    affected: &mut BTreeSet<&'m Name>,
) {
    for machine in set.values().flatten() {
        if let Some((name, _)) = machines.get_key_value(machine) {
            affected.insert(name);
        }
    }
}

/// Machines by tag, as positions in name order, built once, so a role costs
/// what it selects rather than a pass over every machine.
fn tag_index(machines: &BTreeMap<Name, Arc<Object<MachineSpec>>>) -> BTreeMap<Name, Vec<usize>> {
    let mut by_tag: BTreeMap<Name, Vec<usize>> = BTreeMap::new();
    for (position, machine) in machines.values().enumerate() {
        for tag in &machine.tags {
            match by_tag.get_mut(tag) {
                Some(positions) => positions.push(position),
                None => {
                    by_tag.insert(tag.clone(), vec![position]);
                }
            }
        }
    }
    by_tag
}

/// Computes which machines each role of `service` selects, reporting unknown
/// machines, tags that select nothing, and per-machine settings for machines
/// outside the role. `by_tag` holds positions in `order`, the machines'
/// names in order.
fn select_members(
    service: &Object<ServiceSpec>,
    machines: &BTreeMap<Name, Arc<Object<MachineSpec>>>,
    order: &[&Name],
    by_tag: &BTreeMap<Name, Vec<usize>>,
    diags: &mut Vec<Diagnostic>,
) -> Members {
    let mut members = Members::new();
    for (role_name, role) in &service.spec.roles {
        for m in &role.machines {
            if !machines.contains_key(&m.value) {
                diags.push(service.origin.error(
                    m.loc,
                    format!(
                        "role `{}` names machine `{}`, which is not a Machine in this directory",
                        role_name.value, m.value
                    ),
                ));
            }
        }
        for tag in &role.tags {
            let used = tag.value.as_str() == "all" || by_tag.contains_key(&tag.value);
            if !used {
                diags.push(service.origin.warning(
                    tag.loc,
                    format!(
                        "tag `{}` of role `{}` selects no machine",
                        tag.value, role_name.value
                    ),
                ));
            }
        }
        // Named machines plus those carrying any of the tags (`all`: every
        // machine), as `roles::select` defines it.
        let mut selected: BTreeSet<Name> = role
            .machines
            .iter()
            .map(|m| &m.value)
            .filter(|m| machines.contains_key(*m))
            .cloned()
            .collect();
        for tag in &role.tags {
            if tag.value.as_str() == "all" {
                selected.extend(machines.keys().cloned());
            } else if let Some(tagged) = by_tag.get(&tag.value) {
                selected.extend(
                    tagged
                        .iter()
                        .filter_map(|position| order.get(*position))
                        .map(|m| (*m).clone()),
                );
            }
        }
        for machine in role.per_machine.keys() {
            if !selected.contains(&machine.value) {
                diags.push(service.origin.error(
                    machine.loc,
                    format!("perMachine names `{}`, which role `{}` does not select: add it to `machines` or give it a tag of the role", machine.value, role_name.value),
                ));
            }
        }
        members.insert(role_name.value.clone(), selected);
    }
    members
}

/// The machine graph of `after`: a machine and the machines it waits for.
fn after_of<'g>(
    resolved: &'g BTreeMap<Name, Arc<MachineRoles>>,
    machine: &Name,
) -> Option<(&'g Name, std::collections::btree_set::Iter<'g, Name>)> {
    resolved
        .get_key_value(machine)
        .map(|(name, roles)| (name, roles.after.iter()))
}

/// `after` across services can make machines wait for each other in a circle
/// even when each service alone is acyclic.
fn machine_cycle(
    resolved: &BTreeMap<Name, Arc<MachineRoles>>,
    services: &BTreeMap<Name, Arc<Object<ServiceSpec>>>,
    members: &BTreeMap<Name, (Members, Vec<Diagnostic>)>,
) -> Option<Diagnostic> {
    let cycle = find_cycle_from(resolved.keys(), |machine| after_of(resolved, machine))?;
    let path: Vec<&str> = cycle
        .iter()
        .map(Name::as_str)
        .chain([cycle[0].as_str()])
        .collect();
    let message = format!(
        "machines wait for each other in a cycle through role `after`: {}; remove one `after`",
        path.join(" -> ")
    );
    // Point at the `after` that makes the cycle's first machine wait for the second.
    let (waiter, awaited) = (&cycle[0], &cycle[1 % cycle.len()]);
    let place = services.iter().find_map(|(service_name, service)| {
        let (roles, _) = members.get(service_name)?;
        service.spec.roles.iter().find_map(|(role_name, role)| {
            if !roles.get(&role_name.value)?.contains(waiter) {
                return None;
            }
            role.after
                .iter()
                .find(|earlier| {
                    roles
                        .get(&earlier.value)
                        .is_some_and(|m| m.contains(awaited))
                })
                .map(|earlier| (service, earlier.loc))
        })
    });
    Some(match place {
        Some((service, loc)) => service.origin.error(loc, message),
        None => Diagnostic::about_file(Severity::Error, Path::new(".").to_path_buf(), &message),
    })
}
