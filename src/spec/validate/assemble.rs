//! Assembly: every checked file of a directory into a complete
//! [`DesiredState`] or every diagnostic found. Gathers the objects by kind
//! and name (a repeated name is an error at its later definition), runs the
//! checks across objects, updates the role [`Resolution`] and sorts the
//! diagnostics. It must not yield a desired state when any error was found
//! (the caller keeps the last valid one), and must not check single objects
//! itself: that is done once per parse, in `checked`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::checked::{AnyObject, CheckedFile};
use super::references::check_vm_references;
use super::resolution::Resolution;
use super::targets::check_shared_state_dirs;
use crate::spec::desired::{DesiredState, Object};
use crate::spec::diagnostic::Diagnostic;
use crate::spec::model::{MachineSpec, ServiceSpec, VmSpec};
use crate::spec::names::Name;
use crate::spec::parse::ParsedFile;

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
    check_shared_state_dirs(&machines, &mut diags);
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

#[cfg(test)]
mod tests {
    use super::*;

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
                    crate::spec::parse::parse_file(Path::new(path), text.as_bytes()),
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
}
