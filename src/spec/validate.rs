//! Validation across fields and objects, and assembly of the desired state.
//!
//! Takes every parsed file of a directory, checks each object on its own
//! (ranges, exclusive fields, paths that climb out of the directory) and then
//! all of them together (duplicate names, references to machines that do not
//! exist, tags that select nothing, `after` cycles, host port clashes), and
//! returns either a complete [`DesiredState`] or every diagnostic found. A
//! directory with any error yields no desired state at all: the caller keeps
//! the last valid one. Pure: paths are checked lexically, nothing is read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::at::{At, Loc};
use super::diagnostic::{Diagnostic, Origin, Severity};
use super::key::{Kind, ObjectKey};
use super::model::{Document, MachineSpec, NetworkMode, Protocol, ServiceSpec, VmHost, VmSpec};
use super::names::Name;
use super::parse::{Located, ParsedFile, ParsedObject};
use super::quantity::{ByteSize, HumanDuration};
use super::roles::{self, MachineRoles, Members};
use super::{DesiredState, Object};

/// Name no Machine may take: `host: local` of a VM means the controller's host.
const RESERVED_MACHINE_NAME: &str = "local";

/// The outcome of assembling a directory.
#[derive(Debug)]
pub struct Assembled {
    /// Present only when there is no error.
    pub desired: Option<DesiredState>,
    /// Errors and warnings, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
}

impl Assembled {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }
}

/// Validates and assembles the objects of all `files` under `root`.
pub fn assemble<'a>(root: &Path, files: impl IntoIterator<Item = &'a ParsedFile>) -> Assembled {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut machines: BTreeMap<Name, Object<MachineSpec>> = BTreeMap::new();
    let mut vms: BTreeMap<Name, Object<VmSpec>> = BTreeMap::new();
    let mut services: BTreeMap<Name, Object<ServiceSpec>> = BTreeMap::new();

    for file in files {
        diags.extend(file.diagnostics.iter().cloned());
        for Located { object, origin } in &file.objects {
            match object {
                ParsedObject::Machine(doc) => {
                    check_machine(root, doc, origin, &mut diags);
                    insert_unique(&mut machines, doc, origin, &mut diags);
                }
                ParsedObject::VirtualMachine(doc) => {
                    check_vm(root, doc, origin, &mut diags);
                    insert_unique(&mut vms, doc, origin, &mut diags);
                }
                ParsedObject::Service(doc) => {
                    check_service(doc, origin, &mut diags);
                    insert_unique(&mut services, doc, origin, &mut diags);
                }
            }
        }
    }

    check_vm_references(&machines, &vms, &mut diags);
    let members = resolve_members(&machines, &services, &mut diags);
    let machine_names: Vec<&Name> = machines.keys().collect();
    let service_inputs: BTreeMap<Name, (&ServiceSpec, Members)> = services
        .iter()
        .map(|(name, object)| {
            let m = members.get(name).cloned().unwrap_or_default();
            (name.clone(), (&object.spec, m))
        })
        .collect();
    let resolved = roles::resolve(&machine_names, &service_inputs);
    check_machine_cycles(&resolved, &services, &members, &mut diags);

    diags.sort_by(|a, b| {
        (a.severity, &a.file, a.line, a.column).cmp(&(b.severity, &b.file, b.line, b.column))
    });
    diags.dedup();
    let has_errors = diags.iter().any(Diagnostic::is_error);
    let desired = (!has_errors).then_some(DesiredState {
        machines,
        vms,
        services,
        roles: resolved,
    });
    Assembled {
        desired,
        diagnostics: diags,
    }
}

trait HasDocument {
    type Spec: Clone + serde::Serialize;
    fn kind() -> Kind;
}

impl HasDocument for MachineSpec {
    type Spec = MachineSpec;
    fn kind() -> Kind {
        Kind::Machine
    }
}

impl HasDocument for VmSpec {
    type Spec = VmSpec;
    fn kind() -> Kind {
        Kind::VirtualMachine
    }
}

impl HasDocument for ServiceSpec {
    type Spec = ServiceSpec;
    fn kind() -> Kind {
        Kind::Service
    }
}

fn insert_unique<S: HasDocument<Spec = S> + Clone + serde::Serialize>(
    into: &mut BTreeMap<Name, Object<S>>,
    doc: &Document<S>,
    origin: &Origin,
    diags: &mut Vec<Diagnostic>,
) {
    let name = &doc.metadata.name;
    if let Some(first) = into.get(&name.value) {
        diags.push(
            origin
                .error(
                    name.loc,
                    format!(
                        "duplicate {} name `{}`: names must be unique per kind; rename one of them",
                        S::kind(),
                        name.value
                    ),
                )
                .with_related(first.origin.related(first.name_loc, "first defined")),
        );
        return;
    }
    let spec_hash = spec_hash(doc);
    into.insert(
        name.value.clone(),
        Object {
            key: ObjectKey::new(S::kind(), name.value.clone()),
            tags: doc.metadata.tags.iter().map(|t| t.value.clone()).collect(),
            spec: doc.spec.clone(),
            origin: origin.clone(),
            name_loc: name.loc,
            spec_hash,
        },
    );
}

/// blake3 of the document's canonical JSON (locations excluded), hex.
fn spec_hash<S: serde::Serialize>(doc: &Document<S>) -> String {
    match serde_json::to_vec(doc) {
        Ok(bytes) => blake3::hash(&bytes).to_hex().to_string(),
        // Serializing plain data cannot fail; an unhashable spec would then
        // compare unequal to everything, which forces a reconcile: the safe side.
        Err(e) => format!("unhashable:{e}"),
    }
}

fn check_duration(
    origin: &Origin,
    d: &At<HumanDuration>,
    field: &str,
    min: HumanDuration,
    max: HumanDuration,
    diags: &mut Vec<Diagnostic>,
) {
    if d.value < min || d.value > max {
        diags.push(origin.error(
            d.loc,
            format!("{field} {} is out of range: use {min} to {max}", d.value),
        ));
    }
}

fn check_size(
    origin: &Origin,
    s: &At<ByteSize>,
    field: &str,
    min: ByteSize,
    max: ByteSize,
    diags: &mut Vec<Diagnostic>,
) {
    if s.value < min || s.value > max {
        diags.push(origin.error(
            s.loc,
            format!("{field} {} is out of range: use {min} to {max}", s.value),
        ));
    }
}

fn check_path(
    root: &Path,
    origin: &Origin,
    path: &At<super::fields::SpecPath>,
    field: &str,
    diags: &mut Vec<Diagnostic>,
) {
    if path.value.resolve(root).is_none() {
        diags.push(origin.error(
            path.loc,
            format!(
                "{field} `{}` climbs out of the desired-state directory: keep relative paths inside it, or write an absolute path",
                path.value
            ),
        ));
    }
}

fn check_machine(
    root: &Path,
    doc: &Document<MachineSpec>,
    origin: &Origin,
    diags: &mut Vec<Diagnostic>,
) {
    let name = &doc.metadata.name;
    if name.value.as_str() == RESERVED_MACHINE_NAME {
        diags.push(origin.error(
            name.loc,
            "machine name `local` is reserved (a VM's `host: local` means the controller's host): choose another name",
        ));
    }
    let spec = &doc.spec;
    let t = &spec.target;
    match (&t.local, &t.host) {
        (Some(local), Some(host)) if local.value => diags.push(origin.error(
            host.loc,
            "target sets both `local: true` and `host`: a machine is either the controller's own host or an SSH host",
        )),
        (Some(local), None) if !local.value => diags.push(origin.error(
            local.loc,
            "target has `local: false` and no `host`: give the SSH `host`, or set `local: true`",
        )),
        (None, None) => diags.push(origin.error(
            doc.metadata.name.loc,
            "target has neither `host` nor `local: true`: set `host: …` for an SSH host or `local: true` for the controller's own host",
        )),
        _ => {}
    }
    if t.is_local() {
        let ssh_only = [
            t.user.as_ref().map(|v| v.loc),
            t.port.as_ref().map(|v| v.loc),
            t.host_key.as_ref().map(|v| v.loc),
            t.known_hosts.as_ref().map(|v| v.loc),
            t.identity_file.as_ref().map(|v| v.loc),
        ];
        for loc in ssh_only.into_iter().flatten() {
            diags.push(origin.error(
                loc,
                "SSH settings (user, port, hostKey, knownHosts, identityFile) do not apply to a `local: true` target: remove them",
            ));
        }
    }
    for path in [&t.known_hosts, &t.identity_file].into_iter().flatten() {
        check_path(root, origin, path, "path", diags);
    }

    let build = &spec.build;
    match (&build.command, &build.nix) {
        (Some(_), Some(nix)) => diags.push(origin.error(
            nix.loc,
            "build sets both `command` and `nix`: choose one",
        )),
        (None, None) => diags.push(origin.error(
            doc.metadata.name.loc,
            "build has neither `command` nor `nix`: set `command: [\"./build.sh\"]` or `nix: {flake: \".#name\"}`",
        )),
        _ => {}
    }
    if let Some(command) = &build.command {
        match command.value.first() {
            None => diags.push(origin.error(
                command.loc,
                "build command is empty: give an argv like [\"./build.sh\"]",
            )),
            Some(program) if program.is_empty() => {
                diags.push(origin.error(command.loc, "build command's program is an empty string"));
            }
            Some(program) if program.contains('/') => {
                let as_path = super::fields::SpecPath::new(program);
                if let Ok(p) = as_path {
                    check_path(
                        root,
                        origin,
                        &At::new(p, command.loc),
                        "build program",
                        diags,
                    );
                }
            }
            Some(_) => {}
        }
    }
    if let Some(nix) = &build.nix {
        if nix.value.flake.trim().is_empty() {
            diags.push(origin.error(nix.loc, "nix build has an empty `flake` reference"));
        }
    }
    let day = HumanDuration::from_secs(86_400);
    check_duration(
        origin,
        &build.timeout,
        "build timeout",
        HumanDuration::from_secs(1),
        day,
        diags,
    );
    let act = &spec.activation;
    check_duration(
        origin,
        &act.timeout,
        "activation timeout",
        HumanDuration::from_secs(1),
        day,
        diags,
    );
    check_duration(
        origin,
        &act.confirm_timeout,
        "confirm timeout",
        HumanDuration::from_secs(1),
        HumanDuration::from_secs(3600),
        diags,
    );
    for check in &act.health_checks {
        if check.exec.value.first().is_none_or(String::is_empty) {
            diags.push(origin.error(check.exec.loc, "health check `exec` is empty: give an argv like [\"systemctl\", \"is-system-running\"]"));
        }
        check_duration(
            origin,
            &check.timeout,
            "health check timeout",
            HumanDuration::from_millis(100),
            HumanDuration::from_secs(3600),
            diags,
        );
    }
    check_duration(
        origin,
        &spec.interval,
        "interval",
        HumanDuration::from_secs(1),
        HumanDuration::from_secs(30 * 86_400),
        diags,
    );
}

fn check_vm(root: &Path, doc: &Document<VmSpec>, origin: &Origin, diags: &mut Vec<Diagnostic>) {
    let spec = &doc.spec;
    if spec.cpus.value == 0 || spec.cpus.value > 256 {
        diags.push(origin.error(
            spec.cpus.loc,
            format!("cpus {} is out of range: use 1 to 256", spec.cpus.value),
        ));
    }
    check_size(
        origin,
        &spec.memory,
        "memory",
        ByteSize::from_bytes(16 * ByteSize::MIB),
        ByteSize::from_bytes(4 * ByteSize::TIB),
        diags,
    );
    let mut disk_names: BTreeMap<&Name, Loc> = BTreeMap::new();
    for disk in &spec.disks {
        if let Some(first) = disk_names.insert(&disk.name.value, disk.name.loc) {
            diags.push(
                origin
                    .error(
                        disk.name.loc,
                        format!("duplicate disk name `{}` in this VM", disk.name.value),
                    )
                    .with_related(origin.related(first, "first defined")),
            );
        }
        check_size(
            origin,
            &disk.size,
            "disk size",
            ByteSize::from_bytes(ByteSize::MIB),
            ByteSize::from_bytes(64 * ByteSize::TIB),
            diags,
        );
        if let Some(image) = &disk.backing_image {
            check_path(root, origin, image, "backing image", diags);
        }
    }
    if let Some(boot) = &spec.boot {
        check_path(root, origin, &boot.kernel, "kernel", diags);
        if let Some(initrd) = &boot.initrd {
            check_path(root, origin, initrd, "initrd", diags);
        }
    }
    let net = &spec.network;
    match net.mode.value {
        NetworkMode::User => {
            if let Some(bridge) = &net.bridge {
                diags.push(origin.error(
                    bridge.loc,
                    "`bridge` needs `mode: bridge`: remove it or set the mode",
                ));
            }
        }
        NetworkMode::Bridge => {
            if net.bridge.is_none() {
                diags.push(origin.error(
                    net.mode.loc,
                    "network mode `bridge` needs `bridge: <interface>`",
                ));
            }
            if let Some(forward) = net.forwards.first() {
                diags.push(origin.error(
                    forward.host.loc,
                    "`forwards` need `mode: user`: a bridged VM is reached at its own address",
                ));
            }
        }
    }
    let mut seen: BTreeMap<(u16, Protocol), Loc> = BTreeMap::new();
    for forward in &net.forwards {
        if let Some(first) = seen.insert(
            (forward.host.value.get(), forward.protocol),
            forward.host.loc,
        ) {
            diags.push(
                origin
                    .error(
                        forward.host.loc,
                        format!(
                            "host port {} is forwarded twice in this VM",
                            forward.host.value
                        ),
                    )
                    .with_related(origin.related(first, "first forwarded")),
            );
        }
    }
    for arg in &spec.extra_args {
        if arg.value.contains('\0') {
            diags.push(origin.error(arg.loc, "extra argument contains a NUL byte"));
        }
    }
}

fn check_service(doc: &Document<ServiceSpec>, origin: &Origin, diags: &mut Vec<Diagnostic>) {
    let spec = &doc.spec;
    if spec.roles.is_empty() {
        diags.push(origin.error(
            doc.metadata.name.loc,
            "service has no roles: give at least one, like `roles: {server: {machines: [nas]}}`",
        ));
    }
    for (role_name, role) in &spec.roles {
        if role.machines.is_empty() && role.tags.is_empty() {
            diags.push(origin.warning(
                role_name.loc,
                format!(
                    "role `{}` selects no machines: give `machines` or `tags`",
                    role_name.value
                ),
            ));
        }
        for earlier in &role.after {
            if earlier.value == role_name.value {
                diags.push(origin.error(
                    earlier.loc,
                    format!("role `{}` cannot come after itself", role_name.value),
                ));
            } else if !spec.roles.contains_key(&earlier.value) {
                diags.push(origin.error(
                    earlier.loc,
                    format!(
                        "role `{}` comes after `{}`, which is not a role of this service",
                        role_name.value, earlier.value
                    ),
                ));
            }
        }
    }
    // Cycles among roles of this service (self-loops are reported above).
    if let Some(cycle) = find_cycle(spec.roles.iter().map(|(name, role)| {
        (
            name.value.clone(),
            role.after
                .iter()
                .map(|a| a.value.clone())
                .filter(|a| *a != name.value)
                .collect(),
        )
    })) {
        let first = &cycle[0];
        let loc = spec
            .roles
            .get(first)
            .and_then(|r| r.after.first().map(|a| a.loc))
            .unwrap_or(Loc::UNKNOWN);
        let path: Vec<&str> = cycle
            .iter()
            .map(Name::as_str)
            .chain([first.as_str()])
            .collect();
        diags.push(origin.error(
            loc,
            format!(
                "roles wait for each other in a cycle: {}; remove one `after`",
                path.join(" -> ")
            ),
        ));
    }
}

/// Finds one cycle in a directed graph given as (node, successors).
fn find_cycle(graph: impl Iterator<Item = (Name, Vec<Name>)>) -> Option<Vec<Name>> {
    let graph: BTreeMap<Name, Vec<Name>> = graph.collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    let mut marks: BTreeMap<&Name, Mark> = BTreeMap::new();
    for start in graph.keys() {
        if marks.contains_key(start) {
            continue;
        }
        // Iterative DFS: (node, index of next successor), with the active path.
        let mut stack: Vec<(&Name, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::Active);
        while let Some((node, next)) = stack.last_mut() {
            let successors = graph.get(*node).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(succ) = successors.get(*next) {
                *next += 1;
                match marks.get(succ) {
                    Some(Mark::Active) => {
                        let from = stack.iter().position(|(n, _)| *n == succ).unwrap_or(0);
                        return Some(stack[from..].iter().map(|(n, _)| (*n).clone()).collect());
                    }
                    Some(Mark::Done) => {}
                    None => {
                        if let Some((key, _)) = graph.get_key_value(succ) {
                            marks.insert(key, Mark::Active);
                            stack.push((key, 0));
                        }
                    }
                }
            } else {
                marks.insert(*node, Mark::Done);
                stack.pop();
            }
        }
    }
    None
}

fn check_vm_references(
    machines: &BTreeMap<Name, Object<MachineSpec>>,
    vms: &BTreeMap<Name, Object<VmSpec>>,
    diags: &mut Vec<Diagnostic>,
) {
    let mut hosted: BTreeMap<&Name, (&Object<VmSpec>, Loc)> = BTreeMap::new();
    // (hypervisor, host port, protocol) -> the VM that forwards it first.
    type Slot<'a> = (Option<&'a Name>, u16, Protocol);
    let mut forwards: BTreeMap<Slot<'_>, (&Object<VmSpec>, Loc)> = BTreeMap::new();
    for vm in vms.values() {
        let spec = &vm.spec;
        if let VmHost::Machine(host) = &spec.host.value {
            if !machines.contains_key(host) {
                diags.push(vm.origin.error(spec.host.loc, format!("VM host `{host}` is not a Machine in this directory: name a Machine, or use `local`")));
            }
        }
        if let Some(inner) = &spec.machine {
            if !machines.contains_key(&inner.value) {
                diags.push(vm.origin.error(
                    inner.loc,
                    format!(
                        "VM's machine `{}` is not a Machine in this directory",
                        inner.value
                    ),
                ));
            } else if let Some((other, other_loc)) = hosted.insert(&inner.value, (vm, inner.loc)) {
                diags.push(
                    vm.origin
                        .error(inner.loc, format!("machine `{}` is already the machine of VM `{}`: a machine lives in one VM", inner.value, other.key.name))
                        .with_related(other.origin.related(other_loc, "claimed")),
                );
            }
            if let VmHost::Machine(host) = &spec.host.value {
                if *host == inner.value {
                    diags.push(
                        vm.origin
                            .error(inner.loc, "a VM cannot host the machine it runs on"),
                    );
                }
            }
        }
        let host_key = match &spec.host.value {
            VmHost::Local => None,
            VmHost::Machine(m) => Some(m),
        };
        for forward in &spec.network.forwards {
            let slot = (host_key, forward.host.value.get(), forward.protocol);
            if let Some((other, other_loc)) = forwards.get(&slot) {
                if other.key != vm.key {
                    diags.push(
                        vm.origin
                            .error(forward.host.loc, format!("host port {} is already forwarded by VM `{}` on the same host: choose another port", forward.host.value, other.key.name))
                            .with_related(other.origin.related(*other_loc, "first forwarded")),
                    );
                }
            } else {
                forwards.insert(slot, (vm, forward.host.loc));
            }
        }
    }
}

/// Computes which machines each role selects, reporting unknown machines,
/// tags that select nothing, and per-machine settings for machines outside
/// the role.
fn resolve_members(
    machines: &BTreeMap<Name, Object<MachineSpec>>,
    services: &BTreeMap<Name, Object<ServiceSpec>>,
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<Name, Members> {
    // Machines by tag, built once, so a role costs what it selects rather
    // than a pass over every machine.
    let mut by_tag: BTreeMap<&Name, Vec<&Name>> = BTreeMap::new();
    for (name, machine) in machines {
        for tag in &machine.tags {
            by_tag.entry(tag).or_default().push(name);
        }
    }
    let mut out = BTreeMap::new();
    for (service_name, service) in services {
        let mut members = Members::new();
        for (role_name, role) in &service.spec.roles {
            for m in &role.machines {
                if !machines.contains_key(&m.value) {
                    diags.push(service.origin.error(m.loc, format!("role `{}` names machine `{}`, which is not a Machine in this directory", role_name.value, m.value)));
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
                    selected.extend(tagged.iter().map(|m| (*m).clone()));
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
        out.insert(service_name.clone(), members);
    }
    out
}

/// `after` across services can make machines wait for each other in a circle
/// even when each service alone is acyclic.
fn check_machine_cycles(
    resolved: &BTreeMap<Name, MachineRoles>,
    services: &BTreeMap<Name, Object<ServiceSpec>>,
    members: &BTreeMap<Name, Members>,
    diags: &mut Vec<Diagnostic>,
) {
    let graph = resolved
        .iter()
        .map(|(m, r)| (m.clone(), r.after.iter().cloned().collect()));
    let Some(cycle) = find_cycle(graph) else {
        return;
    };
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
        let roles = members.get(service_name)?;
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
    let d = match place {
        Some((service, loc)) => service.origin.error(loc, message),
        None => Diagnostic {
            severity: Severity::Error,
            file: Path::new(".").to_path_buf(),
            line: 0,
            column: 0,
            message,
            source_line: None,
            related: Vec::new(),
        },
    };
    diags.push(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn find_cycle_finds_cycles_and_only_cycles() {
        let acyclic = vec![
            (n("a"), vec![n("b")]),
            (n("b"), vec![n("c")]),
            (n("c"), vec![]),
        ];
        assert_eq!(find_cycle(acyclic.into_iter()), None);
        let cyclic = vec![
            (n("a"), vec![n("b")]),
            (n("b"), vec![n("c")]),
            (n("c"), vec![n("a")]),
        ];
        let cycle = find_cycle(cyclic.into_iter()).unwrap();
        assert_eq!(cycle.len(), 3);
    }
}
