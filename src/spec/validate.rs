//! Validation across fields and objects, and assembly of the desired state.
//!
//! Takes every parsed file of a directory, checks each object on its own
//! (ranges, exclusive fields, paths that climb out of the directory) and then
//! all of them together (duplicate names, references to machines that do not
//! exist, tags that select nothing, `after` cycles, host port clashes), and
//! returns either a complete [`DesiredState`] or every diagnostic found. A
//! directory with any error yields no desired state at all: the caller keeps
//! the last valid one. Pure: paths are checked lexically, nothing is read.
//!
//! Assembling is incremental when the caller keeps two things between loads:
//! a [`CheckedFile`] per file (its objects built, hashed and checked on their
//! own, once per parse) and the [`Resolution`] of the previous assembly (role
//! members, roles documents and the diagnostics about them, with the inputs
//! they came from). Both are reused only where their inputs are unchanged, so
//! the result is always exactly that of assembling from scratch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use super::at::{At, Loc};
use super::diagnostic::{Diagnostic, Origin, Severity};
use super::key::{Kind, ObjectKey};
use super::model::{Document, MachineSpec, NetworkMode, Protocol, ServiceSpec, VmHost, VmSpec};
use super::names::Name;
use super::parse::{Located, ParsedFile, ParsedObject};
use super::quantity::{ByteSize, HumanDuration};
use super::roles::{self, MachineRoles, Members, ServicePieces};
use super::desired::{DesiredState, Object};

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

/// One file's objects, each built (with its spec hash) and checked on its
/// own: everything assembling does that depends on one document only. It
/// depends on the desired-state directory's path too (paths are checked
/// against it), so it is reused only for the same root.
#[derive(Debug, Clone, Default)]
pub struct CheckedFile {
    /// What parsing the file reported.
    diagnostics: Vec<Diagnostic>,
    /// In document order.
    objects: Vec<CheckedObject>,
}

#[derive(Debug, Clone)]
struct CheckedObject {
    object: AnyObject,
    /// What the checks of this object alone found.
    diagnostics: Vec<Diagnostic>,
}

#[derive(Debug, Clone)]
enum AnyObject {
    Machine(Arc<Object<MachineSpec>>),
    Vm(Arc<Object<VmSpec>>),
    Service(Arc<Object<ServiceSpec>>),
}

impl CheckedFile {
    /// Builds and checks the objects of `parsed`, a file of the directory `root`.
    pub fn new(root: &Path, parsed: ParsedFile) -> CheckedFile {
        // Not `collect()`: from a `Vec<Located>` it reuses that allocation
        // in place, keeping ~2.3 KiB (a growth-sized buffer of 584-byte
        // `Located`s) for each file's one small `CheckedObject`: 23 MiB for
        // 10,000 files, for as long as the parse cache holds the file.
        let mut objects = Vec::with_capacity(parsed.objects.len());
        objects.extend(
            parsed
                .objects
                .into_iter()
                .map(|Located { object, origin }| {
                    let mut diagnostics = Vec::new();
                    let object = match object {
                        ParsedObject::Machine(doc) => {
                            check_machine(root, &doc, &origin, &mut diagnostics);
                            AnyObject::Machine(build(doc, origin, Kind::Machine))
                        }
                        ParsedObject::VirtualMachine(doc) => {
                            check_vm(root, &doc, &origin, &mut diagnostics);
                            AnyObject::Vm(build(doc, origin, Kind::VirtualMachine))
                        }
                        ParsedObject::Service(doc) => {
                            check_service(&doc, &origin, &mut diagnostics);
                            AnyObject::Service(build(doc, origin, Kind::Service))
                        }
                    };
                    CheckedObject {
                        object,
                        diagnostics,
                    }
                }),
        );
        CheckedFile {
            diagnostics: parsed.diagnostics,
            objects,
        }
    }

    /// A file that holds no object, only these diagnostics (about the
    /// directory itself, say).
    pub fn from_diagnostics(diagnostics: Vec<Diagnostic>) -> CheckedFile {
        CheckedFile {
            diagnostics,
            objects: Vec::new(),
        }
    }
}

/// Validates and assembles the objects of all `files` under `root`, from scratch.
pub fn assemble<'a>(root: &Path, files: impl IntoIterator<Item = &'a ParsedFile>) -> Assembled {
    let checked: Vec<CheckedFile> = files
        .into_iter()
        .map(|file| CheckedFile::new(root, file.clone()))
        .collect();
    assemble_with(checked.iter(), &mut Resolution::default())
}

/// Validates and assembles the objects of all `files`, reusing what
/// `previous` (the resolution of the last assembly, or an empty one) holds
/// where its inputs are unchanged, and leaving this assembly's resolution in
/// its place. The result is the same as [`assemble`]'s from scratch.
pub fn assemble_with<'a>(
    files: impl IntoIterator<Item = &'a CheckedFile>,
    previous: &mut Resolution,
) -> Assembled {
    let Gathered {
        mut diags,
        machines,
        vms,
        services,
    } = gather(files);
    check_vm_references(&machines, &vms, &mut diags);
    let resolution = std::mem::take(previous).update(&machines, &services);
    resolution.diagnostics(&mut diags);

    diags.sort_by(|a, b| {
        (a.severity, &a.file, a.line, a.column).cmp(&(b.severity, &b.file, b.line, b.column))
    });
    diags.dedup();
    let has_errors = diags.iter().any(Diagnostic::is_error);
    let desired = (!has_errors).then(|| DesiredState {
        machines,
        vms,
        services,
        roles: resolution.roles.clone(),
    });
    *previous = resolution;
    Assembled {
        desired,
        diagnostics: diags,
    }
}

/// Every object by kind and name (the first definition of a name wins),
/// and the diagnostics found so far, in the order of checking one object at
/// a time: each file's, each object's own, and each duplicate's.
struct Gathered {
    diags: Vec<Diagnostic>,
    machines: BTreeMap<Name, Arc<Object<MachineSpec>>>,
    vms: BTreeMap<Name, Arc<Object<VmSpec>>>,
    services: BTreeMap<Name, Arc<Object<ServiceSpec>>>,
}

fn gather<'a>(files: impl IntoIterator<Item = &'a CheckedFile>) -> Gathered {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut machines = Defined::default();
    let mut vms = Defined::default();
    let mut services = Defined::default();
    // Each object in the order met, and where in `diags` its duplicate
    // diagnostic (if it is one) belongs: after its own checks' diagnostics.
    let mut seq = 0;
    for file in files {
        diags.extend(file.diagnostics.iter().cloned());
        for checked in &file.objects {
            diags.extend(checked.diagnostics.iter().cloned());
            let at = diags.len();
            match &checked.object {
                AnyObject::Machine(object) => machines.push(object, at, seq),
                AnyObject::Vm(object) => vms.push(object, at, seq),
                AnyObject::Service(object) => services.push(object, at, seq),
            }
            seq += 1;
        }
    }
    // Duplicates are found by sorting; their diagnostics go back to where
    // they were met, so the order is that of checking one object at a time.
    let mut duplicates = Vec::new();
    let machines = machines.unique(&mut duplicates);
    let vms = vms.unique(&mut duplicates);
    let services = services.unique(&mut duplicates);
    if !duplicates.is_empty() {
        duplicates.sort_by_key(|(at, seq, _)| (*at, *seq));
        let mut merged = Vec::with_capacity(diags.len() + duplicates.len());
        let mut duplicates = duplicates.into_iter().peekable();
        for (i, d) in std::mem::take(&mut diags).into_iter().enumerate() {
            while let Some((_, _, duplicate)) = duplicates.next_if(|(at, _, _)| *at <= i) {
                merged.push(duplicate);
            }
            merged.push(d);
        }
        merged.extend(duplicates.map(|(_, _, duplicate)| duplicate));
        diags = merged;
    }

    Gathered {
        diags,
        machines,
        vms,
        services,
    }
}

/// An object as assembling keeps it, built from its document.
fn build<S: serde::Serialize>(doc: Document<S>, origin: Origin, kind: Kind) -> Arc<Object<S>> {
    let spec_hash = spec_hash(&doc);
    let Document { metadata, spec, .. } = doc;
    Arc::new(Object {
        key: ObjectKey::new(kind, metadata.name.value),
        tags: metadata.tags.into_iter().map(|t| t.value).collect(),
        spec,
        origin,
        name_loc: metadata.name.loc,
        spec_hash,
    })
}

/// The objects of one kind, in the order assembling meets them (file by
/// file, document by document), with where their diagnostics go.
struct Defined<'a, S> {
    /// Each object, the length of the diagnostics when it was met, and its
    /// place in the order of all objects.
    objects: Vec<(&'a Arc<Object<S>>, usize, usize)>,
}

impl<S> Default for Defined<'_, S> {
    fn default() -> Self {
        Defined {
            objects: Vec::new(),
        }
    }
}

impl<'a, S> Defined<'a, S> {
    fn push(&mut self, object: &'a Arc<Object<S>>, at: usize, seq: usize) {
        self.objects.push((object, at, seq));
    }

    /// The objects by name, the first definition of each name winning; a
    /// later one is a duplicate: (where its diagnostic goes, its place, the
    /// diagnostic).
    fn unique(
        mut self,
        duplicates: &mut Vec<(usize, usize, Diagnostic)>,
    ) -> BTreeMap<Name, Arc<Object<S>>> {
        // Stable: the first definition of a name stays first.
        self.objects.sort_by(|a, b| a.0.key.name.cmp(&b.0.key.name));
        let mut first: Option<&Arc<Object<S>>> = None;
        let mut unique = Vec::with_capacity(self.objects.len());
        for (object, at, seq) in self.objects {
            match first {
                Some(first) if first.key.name == object.key.name => {
                    duplicates.push((at, seq, duplicate(first, object)));
                }
                _ => {
                    first = Some(object);
                    unique.push((object.key.name.clone(), Arc::clone(object)));
                }
            }
        }
        unique.into_iter().collect()
    }
}

fn duplicate<S>(first: &Object<S>, object: &Object<S>) -> Diagnostic {
    object
        .origin
        .error(
            object.name_loc,
            format!(
                "duplicate {} name `{}`: names must be unique per kind; rename one of them",
                object.key.kind, object.key.name
            ),
        )
        .with_related(first.origin.related(first.name_loc, "first defined"))
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
    find_cycle_from(graph.keys(), |node| {
        graph
            .get_key_value(node)
            .map(|(name, successors)| (name, successors.iter()))
    })
}

/// Finds one cycle reachable from `starts` (tried in order), depth first.
/// `node(n)` gives the node named `n` and its successors in order, or `None`
/// when there is no such node (an edge to it is ignored). Deterministic: the
/// same graph and starts give the same cycle. A cycle is found exactly when
/// one is reachable from the starts.
fn find_cycle_from<'g, I>(
    starts: impl Iterator<Item = &'g Name>,
    node: impl Fn(&Name) -> Option<(&'g Name, I)>,
) -> Option<Vec<Name>>
where
    I: Iterator<Item = &'g Name>,
{
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    let mut marks: BTreeMap<&Name, Mark> = BTreeMap::new();
    for start in starts {
        if marks.contains_key(start) {
            continue;
        }
        let Some((start, successors)) = node(start) else {
            continue;
        };
        // Iterative DFS: the active path, each node with its successors not
        // yet followed.
        let mut stack: Vec<(&Name, I)> = vec![(start, successors)];
        marks.insert(start, Mark::Active);
        while let Some((current, successors)) = stack.last_mut() {
            let current: &Name = current;
            let Some(succ) = successors.next() else {
                marks.insert(current, Mark::Done);
                stack.pop();
                continue;
            };
            match marks.get(succ) {
                Some(Mark::Active) => {
                    let from = stack.iter().position(|(n, _)| *n == succ).unwrap_or(0);
                    return Some(stack[from..].iter().map(|(n, _)| (*n).clone()).collect());
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some((key, successors)) = node(succ) {
                        marks.insert(key, Mark::Active);
                        stack.push((key, successors));
                    }
                }
            }
        }
    }
    None
}

fn check_vm_references(
    machines: &BTreeMap<Name, Arc<Object<MachineSpec>>>,
    vms: &BTreeMap<Name, Arc<Object<VmSpec>>>,
    diags: &mut Vec<Diagnostic>,
) {
    let mut hosted: BTreeMap<&Name, (&Object<VmSpec>, Loc)> = BTreeMap::new();
    // (hypervisor, host port, protocol) -> the VM that forwards it first.
    type Slot<'a> = (Option<&'a Name>, u16, Protocol);
    let mut forwards: BTreeMap<Slot<'_>, (&Object<VmSpec>, Loc)> = BTreeMap::new();
    for vm in vms.values().map(Arc::as_ref) {
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
    roles: BTreeMap<Name, Arc<MachineRoles>>,
    /// Per service, the parts of its members' documents that they share.
    pieces: BTreeMap<Name, ServicePieces>,
    cycle: Option<Diagnostic>,
}

impl Resolution {
    /// The resolution for `machines` and `services`, reusing `self` (the
    /// previous one) where its inputs are unchanged.
    fn update(
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
    fn diagnostics(&self, into: &mut Vec<Diagnostic>) {
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
        None => Diagnostic {
            severity: Severity::Error,
            file: Path::new(".").to_path_buf(),
            line: 0,
            column: 0,
            message,
            source_line: None,
            related: Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// Gathering as it was done before sorting: one object at a time into
    /// maps, a duplicate's diagnostic pushed when it is met.
    fn gather_one_at_a_time(files: &[CheckedFile]) -> (Vec<Diagnostic>, Vec<String>) {
        fn insert<S>(
            into: &mut BTreeMap<Name, Arc<Object<S>>>,
            object: &Arc<Object<S>>,
            diags: &mut Vec<Diagnostic>,
        ) {
            match into.get(&object.key.name) {
                Some(first) => diags.push(duplicate(first, object)),
                None => {
                    into.insert(object.key.name.clone(), object.clone());
                }
            }
        }
        let (mut diags, mut machines, mut vms, mut services) = (
            Vec::new(),
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        for file in files {
            diags.extend(file.diagnostics.iter().cloned());
            for checked in &file.objects {
                diags.extend(checked.diagnostics.iter().cloned());
                match &checked.object {
                    AnyObject::Machine(o) => insert(&mut machines, o, &mut diags),
                    AnyObject::Vm(o) => insert(&mut vms, o, &mut diags),
                    AnyObject::Service(o) => insert(&mut services, o, &mut diags),
                }
            }
        }
        let kept = machines
            .values()
            .map(|o| o.origin.describe(o.name_loc))
            .chain(vms.values().map(|o| o.origin.describe(o.name_loc)))
            .chain(services.values().map(|o| o.origin.describe(o.name_loc)))
            .collect();
        (diags, kept)
    }

    #[test]
    fn duplicates_are_reported_in_the_order_of_checking_one_object_at_a_time() {
        let machine = |name: &str| {
            format!(
                "apiVersion: converge/v1\nkind: Machine\nmetadata: {{name: {name}}}\nspec: {{target: {{}}, build: {{}}}}\n"
            )
        };
        let vm = |name: &str| {
            format!(
                "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\nspec: {{host: local, memory: 1GiB, cpus: 0}}\n"
            )
        };
        // A machine without target and build gets two diagnostics at its
        // name (`local` a third), where its duplicate's diagnostic goes too.
        let a = [
            machine("local"),
            vm("x"),
            machine("b"),
            machine("local"),
            vm("x"),
        ]
        .join("---\n");
        let b = [
            machine("b"),
            vm("x"),
            machine("local"),
            machine("c"),
            machine("b"),
        ]
        .join("---\n");
        let c = [vm("y"), machine("c")].join("---\n");
        let files: Vec<CheckedFile> = [("a.yaml", a), ("b.yaml", b), ("c.yaml", c)]
            .iter()
            .map(|(path, text)| {
                CheckedFile::new(
                    Path::new("/d"),
                    super::super::parse::parse_file(Path::new(path), text.as_bytes()),
                )
            })
            .collect();
        let gathered = gather(&files);
        let (diags, kept) = gather_one_at_a_time(&files);
        assert_eq!(gathered.diags, diags);
        assert!(
            diags
                .iter()
                .filter(|d| d.message.starts_with("duplicate"))
                .count()
                >= 6
        );
        let gathered_kept: Vec<String> = gathered
            .machines
            .values()
            .map(|o| o.origin.describe(o.name_loc))
            .chain(gathered.vms.values().map(|o| o.origin.describe(o.name_loc)))
            .chain(
                gathered
                    .services
                    .values()
                    .map(|o| o.origin.describe(o.name_loc)),
            )
            .collect();
        assert_eq!(gathered_kept, kept);
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
