//! Roles resolution: services and their roles, turned into one roles document
//! per machine.
//!
//! A machine's roles document lists each service instance it takes part in,
//! the roles it plays there with their merged settings (instance < role <
//! per-machine), the roles each waits for (`after`), and who plays the
//! instance's OTHER roles (a VPN peer learns its controller, the controller
//! its peers). Members of a machine's own roles are not listed: with a role
//! selecting every machine (`tags: [all]`) that would make every document as
//! large as the fleet and the total quadratic; this way a hub's document
//! grows with its spokes and a spoke's stays small. The document is
//! canonical JSON (sorted keys, no whitespace), so its blake3 hash is stable:
//! same input, same hash; a change that does not touch a machine's services
//! leaves its hash alone. Pure: no IO.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::model::{Role, ServiceSpec, Settings};
use super::names::Name;

/// The resolved roles of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRoles {
    /// Canonical JSON of the roles document.
    pub document: Arc<[u8]>,
    /// blake3 of `document`, hex.
    pub hash: String,
    /// Machines that must be Ready before this one is converged (from `after`).
    pub after: BTreeSet<Name>,
    /// The service instances this machine takes part in.
    pub services: BTreeSet<Name>,
}

// The document is written as canonical JSON (sorted keys, no whitespace):
//
//   {"machine":M,"services":{S:{"module":MOD,"otherRoles":{R:[MEMBERS]},
//     "roles":{R:{"after":[ROLES],"settings":{…}}}}}}
//
// Services and roles come from sorted maps, so keys are in order; strings and
// settings go through serde_json. The pieces that every member of a service
// shares (member lists, role entries without per-machine settings) are
// serialized once per service, not once per machine.

/// A role's entry in a machine's document. Fields are declared in sorted
/// order and settings is a sorted map (serde_json has no preserve_order
/// feature here), so serializing it gives canonical JSON.
#[derive(Serialize)]
struct RoleEntry<'a> {
    after: Vec<&'a str>,
    settings: Value,
}

/// Which machines each role of one service selects.
pub type Members = BTreeMap<Name, BTreeSet<Name>>;

/// The machines a role selects: named ones plus those carrying any of its
/// tags (`all` selects every machine).
pub fn select<'a>(
    machines: &[&Name],
    tags_of: impl Fn(&Name) -> Option<&'a BTreeSet<Name>>,
    named: impl Iterator<Item = &'a Name>,
    tags: impl Iterator<Item = &'a Name> + Clone,
) -> BTreeSet<Name> {
    let mut out: BTreeSet<Name> = named.cloned().collect();
    for machine in machines {
        let selected = tags
            .clone()
            .any(|tag| tag.as_str() == "all" || tags_of(machine).is_some_and(|t| t.contains(tag)));
        if selected {
            out.insert((*machine).clone());
        }
    }
    out
}

/// Resolves the roles documents of `machines`, given every service with its
/// members.
///
/// `services[service].1[role]` must hold the machines each role selects (as
/// computed by [`select`] during validation); machines not in any role get an
/// empty document. A machine's document depends only on its name and on the
/// services it is a member of (their specs and members): resolving a subset
/// of the machines gives exactly their documents of resolving them all.
pub fn resolve(
    machines: &[&Name],
    services: &BTreeMap<&Name, (&ServiceSpec, &Members)>,
) -> BTreeMap<Name, MachineRoles> {
    resolve_with(machines, services, &mut BTreeMap::new())
}

/// [`resolve`], reusing the serialized pieces of services kept from an
/// earlier call. `pieces[service]`, where present, must have been made for
/// the same spec and members that `services` gives it: the caller removes
/// the pieces of every service whose spec or members changed. Afterwards
/// `pieces` holds the pieces of the services in `services` that documents
/// needed, now or before.
pub fn resolve_with(
    machines: &[&Name],
    services: &BTreeMap<&Name, (&ServiceSpec, &Members)>,
    pieces: &mut BTreeMap<Name, ServicePieces>,
) -> BTreeMap<Name, MachineRoles> {
    let services: Vec<(&Name, &ServiceSpec, &Members)> = services
        .iter()
        .map(|(name, (spec, members))| (*name, *spec, *members))
        .collect();
    // The roles each machine plays, in (service, role) order, found from the
    // members lists: work in proportion to memberships, not machines × roles.
    // A hash map, because every membership of every service is looked up.
    let position: HashMap<&Name, usize> = machines
        .iter()
        .enumerate()
        .map(|(i, machine)| (*machine, i))
        .collect();
    let mut plays: Vec<Vec<Play<'_>>> = machines.iter().map(|_| Vec::new()).collect();
    for (service, (_, spec, members)) in services.iter().enumerate() {
        for (index, (role_name, role)) in spec.roles.iter().enumerate() {
            for member in members.get(&role_name.value).into_iter().flatten() {
                if let Some(plays) = position.get(member).and_then(|i| plays.get_mut(*i)) {
                    plays.push(Play {
                        service,
                        index,
                        name: &role_name.value,
                        role,
                    });
                }
            }
        }
    }
    let mut shared: Vec<Option<ServicePieces>> = services
        .iter()
        .map(|(name, _, _)| pieces.remove(*name))
        .collect();
    let mut out = BTreeMap::new();
    for (i, machine) in machines.iter().enumerate() {
        let own = plays.get(i).map(Vec::as_slice).unwrap_or_default();
        let mut after = BTreeSet::new();
        let mut in_services = BTreeSet::new();
        let document: Arc<[u8]> = match write_document(
            machine,
            own,
            &services,
            &mut shared,
            &mut after,
            &mut in_services,
        ) {
            Ok(bytes) => Arc::from(bytes),
            // Serializing plain maps and strings cannot fail; keep an empty
            // document rather than panic if it ever did.
            Err(_) => Arc::from(b"{}".as_slice()),
        };
        let hash = blake3::hash(&document).to_hex().to_string();
        out.insert(
            (*machine).clone(),
            MachineRoles {
                document,
                hash,
                after,
                services: in_services,
            },
        );
    }
    pieces.clear();
    for ((name, _, _), kept) in services.iter().zip(shared) {
        if let Some(kept) = kept {
            pieces.insert((*name).clone(), kept);
        }
    }
    out
}

/// One role a machine plays.
struct Play<'a> {
    /// Index of the service in the services being resolved.
    service: usize,
    /// Index of the role in its service's `roles`.
    index: usize,
    name: &'a Name,
    role: &'a Role,
}

/// What the documents of a service's members share, serialized once: valid
/// as long as the service's spec and members are the same.
#[derive(Debug, Clone)]
pub struct ServicePieces {
    /// Each entry of the service's members, in order: its member list as JSON.
    members: Vec<Vec<u8>>,
    /// Each role of the spec, in order: its entry as JSON for a machine
    /// without per-machine settings.
    entries: Vec<Vec<u8>>,
}

impl ServicePieces {
    fn new(spec: &ServiceSpec, members: &Members) -> Result<ServicePieces, serde_json::Error> {
        Ok(ServicePieces {
            members: members
                .values()
                .map(serde_json::to_vec)
                .collect::<Result<_, _>>()?,
            entries: spec
                .roles
                .values()
                .map(|role| role_entry(spec, role, None))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A role's entry: the roles it waits for, and its settings merged
/// (instance < role < `machine`'s own, if given).
fn role_entry(
    spec: &ServiceSpec,
    role: &Role,
    machine: Option<&Name>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut settings = Value::Object(spec.settings.clone());
    merge(&mut settings, &role.settings);
    if let Some(own) = machine.and_then(|m| role.per_machine.get(m)) {
        merge(&mut settings, own);
    }
    let mut after: Vec<&str> = role.after.iter().map(|a| a.value.as_str()).collect();
    after.sort_unstable();
    after.dedup();
    serde_json::to_vec(&RoleEntry { after, settings })
}

/// Writes `machine`'s document, given the roles it plays (`own`), and
/// collects the machines it waits for and the services it is in.
fn write_document(
    machine: &Name,
    own: &[Play<'_>],
    services: &[(&Name, &ServiceSpec, &Members)],
    shared: &mut [Option<ServicePieces>],
    after: &mut BTreeSet<Name>,
    in_services: &mut BTreeSet<Name>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut doc = Vec::with_capacity(256);
    doc.extend_from_slice(b"{\"machine\":");
    serde_json::to_writer(&mut doc, machine.as_str())?;
    doc.extend_from_slice(b",\"services\":{");
    let mut first_service = true;
    for group in own.chunk_by(|a, b| a.service == b.service) {
        let service = group[0].service;
        let (Some(&(service_name, spec, members)), Some(cached)) =
            (services.get(service), shared.get_mut(service))
        else {
            continue;
        };
        if cached.is_none() {
            *cached = Some(ServicePieces::new(spec, members)?);
        }
        let Some(cached) = cached.as_ref() else {
            continue;
        };
        if !first_service {
            doc.push(b',');
        }
        first_service = false;
        serde_json::to_writer(&mut doc, service_name.as_str())?;
        doc.extend_from_slice(b":{\"module\":");
        serde_json::to_writer(&mut doc, spec.module.value.as_str())?;
        // Who plays each role of the instance that this machine does not play.
        doc.extend_from_slice(b",\"otherRoles\":{");
        let mut first = true;
        for (role_name, list) in members.keys().zip(&cached.members) {
            if group.iter().any(|play| play.name == role_name) {
                continue;
            }
            if !first {
                doc.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut doc, role_name.as_str())?;
            doc.push(b':');
            doc.extend_from_slice(list);
        }
        doc.extend_from_slice(b"},\"roles\":{");
        for (j, play) in group.iter().enumerate() {
            if j > 0 {
                doc.push(b',');
            }
            serde_json::to_writer(&mut doc, play.name.as_str())?;
            doc.push(b':');
            match cached.entries.get(play.index) {
                Some(entry) if !play.role.per_machine.contains_key(machine) => {
                    doc.extend_from_slice(entry);
                }
                _ => doc.extend_from_slice(&role_entry(spec, play.role, Some(machine))?),
            }
            for earlier in &play.role.after {
                if let Some(earlier_members) = members.get(&earlier.value) {
                    after.extend(earlier_members.iter().filter(|m| *m != machine).cloned());
                }
            }
        }
        doc.extend_from_slice(b"}}");
        in_services.insert(service_name.clone());
    }
    doc.extend_from_slice(b"}}");
    Ok(doc)
}

/// Merges `over` into `base`: mappings merge key by key, recursively; any
/// other value in `over` replaces the one in `base`.
pub fn merge(base: &mut Value, over: &Settings) {
    if !base.is_object() {
        *base = Value::Object(Settings::new());
    }
    let Value::Object(base_map) = base else {
        return;
    };
    for (key, value) in over {
        match (base_map.get_mut(key), value) {
            (Some(existing @ Value::Object(_)), Value::Object(over_map)) => {
                merge(existing, over_map)
            }
            _ => {
                base_map.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // The document as the struct-based serializer wrote it before documents
    // were assembled from shared pieces: the reference the writer must
    // match byte for byte.
    #[derive(Serialize)]
    struct ReferenceDocument<'a> {
        machine: &'a str,
        services: BTreeMap<&'a str, ReferenceService<'a>>,
    }

    #[derive(Serialize)]
    struct ReferenceService<'a> {
        module: &'a str,
        #[serde(rename = "otherRoles")]
        other_roles: BTreeMap<&'a str, &'a BTreeSet<Name>>,
        roles: BTreeMap<&'a str, RoleEntry<'a>>,
    }

    fn reference_document(
        machine: &Name,
        services: &BTreeMap<&Name, (&ServiceSpec, &Members)>,
    ) -> Vec<u8> {
        let mut doc = ReferenceDocument {
            machine: machine.as_str(),
            services: BTreeMap::new(),
        };
        for (service_name, (spec, members)) in services {
            let mut roles = BTreeMap::new();
            for (role_name, role) in &spec.roles {
                if !members
                    .get(&role_name.value)
                    .is_some_and(|m| m.contains(machine))
                {
                    continue;
                }
                let mut settings = Value::Object(spec.settings.clone());
                merge(&mut settings, &role.settings);
                if let Some(own) = role.per_machine.get(machine) {
                    merge(&mut settings, own);
                }
                let mut after: Vec<&str> = role.after.iter().map(|a| a.value.as_str()).collect();
                after.sort_unstable();
                after.dedup();
                roles.insert(role_name.value.as_str(), RoleEntry { after, settings });
            }
            if !roles.is_empty() {
                let other_roles = members
                    .iter()
                    .filter(|(role, _)| !roles.contains_key(role.as_str()))
                    .map(|(role, machines)| (role.as_str(), machines))
                    .collect();
                doc.services.insert(
                    service_name.as_str(),
                    ReferenceService {
                        module: spec.module.value.as_str(),
                        other_roles,
                        roles,
                    },
                );
            }
        }
        serde_json::to_vec(&doc).unwrap()
    }

    /// A small deterministic generator (64-bit LCG).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) as usize) % n
        }
    }

    #[test]
    fn documents_are_byte_for_byte_what_serializing_the_whole_document_gives() {
        let tags = ["a", "b", "c", "all"];
        let values = [
            "1",
            "-2.5",
            "true",
            "null",
            "\"quote \\\" and \\u00e9 \\t\"",
            "[1, {x: 2}]",
            "{deep: {x: 1, y: [2]}}",
        ];
        for seed in 0..200 {
            let mut rng = Rng(seed);
            let machines: Vec<Name> = (0..6)
                .map(|i| Name::new(&format!("m{i}")).unwrap())
                .collect();
            let tags_of: BTreeMap<&Name, BTreeSet<Name>> = machines
                .iter()
                .map(|m| {
                    (
                        m,
                        [tags[rng.below(3)], tags[rng.below(3)]]
                            .iter()
                            .map(|t| Name::new(t).unwrap())
                            .collect(),
                    )
                })
                .collect();
            let mut specs: Vec<(Name, ServiceSpec)> = Vec::new();
            for s in 0..1 + rng.below(4) {
                let mut yaml = format!(
                    "module: mod{}\nsettings: {{k{}: {}, deep: {{x: 0}}}}\nroles:\n",
                    rng.below(2),
                    rng.below(3),
                    values[rng.below(values.len())]
                );
                for role in ["r0", "r1", "r2"].iter().take(1 + rng.below(3)) {
                    yaml.push_str(&format!(
                        "  {role}: {{machines: [m{}], tags: [{}], after: [r{}, r0], settings: {{k{}: {}, deep: {{y: 1}}}}, perMachine: {{m{}: {{k0: {}, deep: {{x: 9}}}}}}}}\n",
                        rng.below(6),
                        tags[rng.below(4)],
                        rng.below(3),
                        rng.below(3),
                        values[rng.below(values.len())],
                        rng.below(6),
                        values[rng.below(values.len())],
                    ));
                }
                let spec: ServiceSpec = serde_saphyr::from_str(&yaml).unwrap();
                specs.push((Name::new(&format!("svc{s}")).unwrap(), spec));
            }
            let names: Vec<&Name> = machines.iter().collect();
            let members: Vec<Members> = specs
                .iter()
                .map(|(_, spec)| {
                    spec.roles
                        .iter()
                        .map(|(role_name, role)| {
                            let selected = select(
                                &names,
                                |m| tags_of.get(m),
                                role.machines.iter().map(|m| &m.value),
                                role.tags.iter().map(|t| &t.value),
                            );
                            (role_name.value.clone(), selected)
                        })
                        .collect()
                })
                .collect();
            let services: BTreeMap<&Name, (&ServiceSpec, &Members)> = specs
                .iter()
                .zip(&members)
                .map(|((name, spec), members)| (name, (spec, members)))
                .collect();
            let resolved = resolve(&names, &services);
            for machine in &machines {
                let expected = reference_document(machine, &services);
                let got = &resolved[machine];
                assert_eq!(
                    String::from_utf8_lossy(&got.document),
                    String::from_utf8_lossy(&expected),
                    "seed {seed}"
                );
                assert_eq!(got.hash, blake3::hash(&expected).to_hex().to_string());
            }
            // Resolving some machines gives exactly their documents.
            let some: Vec<&Name> = names
                .iter()
                .copied()
                .filter(|_| rng.below(2) == 0)
                .collect();
            for (machine, roles) in resolve(&some, &services) {
                assert_eq!(roles, resolved[&machine], "seed {seed}");
            }
            // Also from the pieces an earlier call kept.
            let mut pieces = BTreeMap::new();
            assert_eq!(resolve_with(&names, &services, &mut pieces), resolved);
            assert_eq!(pieces.len(), services.len(), "seed {seed}");
            for (machine, roles) in resolve_with(&some, &services, &mut pieces) {
                assert_eq!(roles, resolved[&machine], "seed {seed}");
            }
        }
    }

    fn settings(v: Value) -> Settings {
        match v {
            Value::Object(m) => m,
            _ => Settings::new(),
        }
    }

    #[test]
    fn merge_is_deep_for_mappings_and_replaces_everything_else() {
        let mut base = json!({"a": {"x": 1, "y": 2}, "list": [1, 2], "keep": true});
        merge(
            &mut base,
            &settings(json!({"a": {"y": 3, "z": 4}, "list": [9]})),
        );
        assert_eq!(
            base,
            json!({"a": {"x": 1, "y": 3, "z": 4}, "list": [9], "keep": true})
        );
    }
}
