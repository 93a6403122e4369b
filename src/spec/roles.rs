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

use std::collections::{BTreeMap, BTreeSet};
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

// Fields are declared in sorted order and every map is a sorted map (serde_json
// has no preserve_order feature here), so serializing these directly gives
// canonical JSON, byte for byte what sorting through a `Value` would.
#[derive(Serialize)]
struct RolesDocument<'a> {
    machine: &'a str,
    services: BTreeMap<&'a str, ServiceEntry<'a>>,
}

#[derive(Serialize)]
struct ServiceEntry<'a> {
    module: &'a str,
    /// Who plays each role of the instance that this machine does not play.
    #[serde(rename = "otherRoles")]
    other_roles: BTreeMap<&'a str, &'a BTreeSet<Name>>,
    roles: BTreeMap<&'a str, RoleEntry<'a>>,
}

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

/// Resolves every machine's roles document.
///
/// `members[service][role]` must hold the machines each role selects (as
/// computed by [`select`] during validation); machines not in any role get an
/// empty document.
pub fn resolve(
    machines: &[&Name],
    services: &BTreeMap<Name, (&ServiceSpec, Members)>,
) -> BTreeMap<Name, MachineRoles> {
    // The roles each machine plays, in (service, role) order, found from the
    // members lists: work in proportion to memberships, not machines × roles.
    let mut plays: BTreeMap<&Name, Vec<(&Name, &Name, &Role)>> = BTreeMap::new();
    for (service_name, (spec, members)) in services {
        for (role_name, role) in &spec.roles {
            for member in members.get(&role_name.value).into_iter().flatten() {
                plays
                    .entry(member)
                    .or_default()
                    .push((service_name, &role_name.value, role));
            }
        }
    }
    let mut out = BTreeMap::new();
    for machine in machines {
        let mut doc = RolesDocument {
            machine: machine.as_str(),
            services: BTreeMap::new(),
        };
        let mut after = BTreeSet::new();
        let mut in_services = BTreeSet::new();
        let own = plays.get(*machine).map(Vec::as_slice).unwrap_or_default();
        for group in own.chunk_by(|a, b| a.0 == b.0) {
            let service_name = group[0].0;
            let Some((spec, members)) = services.get(service_name) else {
                continue;
            };
            let mut roles = BTreeMap::new();
            for &(_, role_name, role) in group {
                let mut settings = Value::Object(spec.settings.clone());
                merge(&mut settings, &role.settings);
                if let Some(own) = role.per_machine.get(*machine) {
                    merge(&mut settings, own);
                }
                let mut role_after: Vec<&str> =
                    role.after.iter().map(|a| a.value.as_str()).collect();
                role_after.sort_unstable();
                role_after.dedup();
                for earlier in &role.after {
                    if let Some(earlier_members) = members.get(&earlier.value) {
                        after.extend(earlier_members.iter().filter(|m| m != machine).cloned());
                    }
                }
                roles.insert(
                    role_name.as_str(),
                    RoleEntry {
                        after: role_after,
                        settings,
                    },
                );
            }
            if !roles.is_empty() {
                in_services.insert(service_name.clone());
                let other_roles = members
                    .iter()
                    .filter(|(role, _)| !roles.contains_key(role.as_str()))
                    .map(|(role, machines)| (role.as_str(), machines))
                    .collect();
                doc.services.insert(
                    service_name.as_str(),
                    ServiceEntry {
                        module: spec.module.value.as_str(),
                        other_roles,
                        roles,
                    },
                );
            }
        }
        let document: Arc<[u8]> = match serde_json::to_vec(&doc) {
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
    out
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
