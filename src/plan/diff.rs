//! `diff`: for one object, the spec in the YAML against the spec last applied
//! (from the store) and the facts just observed, giving the change to make
//! (with its fields and the exact steps that make it) and any drift.
//!
//! Every decision about what to do lives here, once: whether a machine is
//! rebuilt, re-activated or left alone; whether a VM's disks are created or
//! grown; whether it starts, stops or restarts (its launch identity against
//! the one its QEMU was started with). `converge plan` prints the result and
//! reconcile executes it, so the preview and the action cannot disagree.
//! Pure and deterministic: no IO, no tokio.

use std::collections::BTreeSet;

use serde_json::Value;

use super::model::{Change, ChangeKind, Drift, FieldChange, Step};
use crate::spec::{Activation, ActivationMode, Disk, DriftPolicy, Kind, ObjectKey, RollbackPolicy};

/// The desired side of one object.
#[derive(Debug, Clone)]
pub struct Desired<'a> {
    /// The document as canonical JSON (`{apiVersion, kind, metadata, spec}`).
    pub document: Value,
    pub spec_hash: &'a str,
    pub kind: DesiredKind<'a>,
}

/// What the diff needs of each kind beyond the document.
#[derive(Debug, Clone)]
pub enum DesiredKind<'a> {
    Machine(MachineDesired<'a>),
    Vm(VmDesired<'a>),
    Service,
}

#[derive(Debug, Clone)]
pub struct MachineDesired<'a> {
    /// Hash of the machine's roles document.
    pub roles_hash: &'a str,
    /// The build-input identity (content of the directory's non-YAML files).
    pub build_input: &'a str,
    pub activation: &'a Activation,
    /// Reached over SSH: activations that change the running system are
    /// confirmed over a new connection.
    pub remote: bool,
    pub drift: DriftPolicy,
    /// Generations kept on the target besides the current one and the one before.
    pub keep_generations: usize,
}

#[derive(Debug, Clone)]
pub struct VmDesired<'a> {
    pub running: bool,
    pub disks: &'a [Disk],
    /// The identity of what starting the VM would launch now (a hash of
    /// QEMU's argv): a running VM launched otherwise restarts.
    pub launch: &'a str,
    /// An operator asked for a restart (`converge vm restart`): a running
    /// VM restarts even when launched as its spec says.
    pub restart: bool,
}

/// What converge recorded when it last applied the object.
#[derive(Debug, Clone)]
pub struct Applied<'a> {
    pub document: Option<&'a Value>,
    pub spec_hash: &'a str,
    pub roles_hash: Option<&'a str>,
    pub build_input: Option<&'a str>,
    /// Machines: `N-hash` of the generation applied.
    pub generation: Option<String>,
    /// VMs removed from the YAML: whether their last spec said `onDelete: delete`.
    pub delete_on_removal: bool,
}

/// What was just observed.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Machine {
        /// `N-hash` of the generation `current` points at.
        current: Option<String>,
        /// `N-hash` of the last generation the target recorded as confirmed.
        confirmed: Option<String>,
        /// `N-hash` of every complete generation on the target.
        generations: Vec<String>,
        /// NixOS: the system the current generation's artifact names, and
        /// the one that runs (`/run/current-system`), when both are known.
        nixos: Option<(String, String)>,
    },
    Vm(VmObserved),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmObserved {
    /// Whether its QEMU runs.
    pub running: bool,
    /// The launch identity its running QEMU was started with.
    pub launched: Option<String>,
    /// Disks that exist, by name, with their virtual size when known.
    pub disks: Vec<(String, Option<u64>)>,
}

/// Plans one object. `desired` is None for an object removed from the YAML;
/// `applied` is None for one never applied; `observed` is None when facts
/// could not be gathered (planning then trusts the records).
pub fn diff(
    key: &ObjectKey,
    desired: Option<&Desired<'_>>,
    applied: Option<&Applied<'_>>,
    observed: Option<&Observed>,
) -> (Option<Change>, Vec<Drift>) {
    match (desired, applied) {
        (None, None) => (None, Vec::new()),
        (None, Some(applied)) => (Some(removal(key, applied)), Vec::new()),
        (Some(desired), applied) => change(key, desired, applied, observed),
    }
}

fn removal(key: &ObjectKey, applied: &Applied<'_>) -> Change {
    let (kind, steps, note) = match key.kind {
        Kind::VirtualMachine if applied.delete_on_removal => (
            ChangeKind::Destroy,
            vec![Step::StopVm, Step::DeleteVm { disks: true }, Step::Forget],
            "removed from the YAML; onDelete: delete removes its disks",
        ),
        Kind::VirtualMachine => (
            ChangeKind::Destroy,
            vec![Step::StopVm, Step::DeleteVm { disks: false }, Step::Forget],
            "removed from the YAML; stopped, disks kept (onDelete: keep-disks)",
        ),
        _ => (
            ChangeKind::Forget,
            vec![Step::Forget],
            "removed from the YAML; converge forgets it, nothing is uninstalled",
        ),
    };
    Change {
        key: key.clone(),
        kind,
        fields: Vec::new(),
        steps,
        only_if_artifact_changed: false,
        rollback_to: None,
        note: Some(note.to_owned()),
        nixos: None,
    }
}

/// Activation steps of a generation: switch, activate, health checks, and
/// the confirmation (over a new connection, guarded by the target's
/// watchdog, where the target is remote and the mode changes the running
/// system).
fn activation_steps(machine: &MachineDesired<'_>, generation: Option<String>) -> Vec<Step> {
    let activation = machine.activation;
    let mut steps = vec![
        Step::Switch { generation },
        Step::Activate {
            mode: activation.mode.as_arg().to_owned(),
        },
    ];
    steps.extend(
        activation
            .health_checks
            .iter()
            .map(|check| Step::HealthCheck {
                command: check.exec.value.clone(),
                timeout: check.timeout.value.to_string(),
            }),
    );
    let watched = machine.remote && activation.mode.changes_running_system();
    steps.push(Step::Confirm {
        timeout: watched.then(|| activation.confirm_timeout.value.to_string()),
    });
    steps
}

/// A new generation: build, install, activate it, prune old ones.
fn deploy_steps(machine: &MachineDesired<'_>) -> Vec<Step> {
    let mut steps = vec![Step::Build, Step::Install];
    steps.extend(activation_steps(machine, None));
    steps.push(Step::Prune {
        keep: machine.keep_generations,
    });
    steps
}

fn change(
    key: &ObjectKey,
    desired: &Desired<'_>,
    applied: Option<&Applied<'_>>,
    observed: Option<&Observed>,
) -> (Option<Change>, Vec<Drift>) {
    let mut fields = match applied {
        Some(applied) => field_changes(key.kind, desired, applied),
        None => Vec::new(),
    };
    let drift = applied
        .map(|a| drift_of(key, desired, a, observed))
        .unwrap_or_default();
    let created = applied.is_none();
    let replace = fields.iter().any(|f| f.forces_replacement);
    let mut only_if_artifact_changed = false;
    let mut rollback_to = None;

    let steps = match &desired.kind {
        DesiredKind::Machine(machine) => {
            let (current, confirmed, generations) = match observed {
                Some(Observed::Machine {
                    current,
                    confirmed,
                    generations,
                    ..
                }) => (current.clone(), confirmed.clone(), generations.as_slice()),
                _ => (None, None, &[][..]),
            };
            let steps = if created || !fields.is_empty() {
                only_if_artifact_changed = !created
                    && !fields.iter().any(|f| {
                        f.path == "spec.activation" || f.path.starts_with("spec.activation.")
                    });
                deploy_steps(machine)
            } else if !drift.is_empty() && machine.drift == DriftPolicy::Correct {
                // Re-activate what converge applied if the target still has
                // it; otherwise build and install it again.
                let applied_generation = applied.and_then(|a| a.generation.clone());
                match applied_generation {
                    Some(g) if generations.contains(&g) => activation_steps(machine, Some(g)),
                    _ => deploy_steps(machine),
                }
            } else {
                Vec::new()
            };
            if !steps.is_empty() && machine.activation.rollback == RollbackPolicy::Auto {
                rollback_to = confirmed.or(current);
            }
            steps
        }
        DesiredKind::Vm(vm) => {
            let observed = match observed {
                Some(Observed::Vm(o)) => Some(o),
                _ => None,
            };
            let steps = vm_steps(vm, observed, applied, &fields);
            let restarts = steps.contains(&Step::RestartVm);
            for field in &mut fields {
                field.forces_restart = restarts && forces_restart(&field.path);
            }
            steps
        }
        DesiredKind::Service if created || !fields.is_empty() => vec![Step::ResolveRoles],
        DesiredKind::Service => Vec::new(),
    };

    if !created && fields.is_empty() && steps.is_empty() {
        return (None, drift);
    }
    let kind = if created {
        ChangeKind::Create
    } else if replace {
        ChangeKind::Replace
    } else if fields.is_empty() {
        ChangeKind::Correct
    } else {
        ChangeKind::Update
    };
    let restart = steps.contains(&Step::RestartVm);
    let note = match (kind, key.kind) {
        (ChangeKind::Correct, Kind::VirtualMachine) if restart => Some(
            "its QEMU was launched with other settings than its spec launches now: restarted"
                .to_owned(),
        ),
        (ChangeKind::Correct, _) => {
            Some("drifted; its policy (drift: correct) converges it back".to_owned())
        }
        (ChangeKind::Update, Kind::Machine) if fields.iter().all(|f| f.path == "revision") => {
            Some(
                "only the directory's revision changed: rebuilt, activated only if the artifact differs"
                    .to_owned(),
            )
        }
        (ChangeKind::Update, Kind::VirtualMachine) if restart => {
            Some("forces a restart of the running VM".to_owned())
        }
        (ChangeKind::Replace, Kind::VirtualMachine) => Some(
            "converge does not move VMs: while its QEMU or disks exist where it ran, applying stops with HostChanged; remove the VM, then declare it on the new host".to_owned(),
        ),
        _ => None,
    };
    (
        Some(Change {
            key: key.clone(),
            kind,
            fields,
            steps,
            only_if_artifact_changed,
            rollback_to,
            note,
            nixos: None,
        }),
        drift,
    )
}

/// The fields whose values differ between the applied and the desired
/// object, marked where they force a replacement.
fn field_changes(kind: Kind, desired: &Desired<'_>, applied: &Applied<'_>) -> Vec<FieldChange> {
    let mut fields = Vec::new();
    if desired.spec_hash != applied.spec_hash {
        match applied.document {
            Some(before) => json_diff("", before, &desired.document, &mut fields),
            None => fields.push(FieldChange {
                path: "spec".to_owned(),
                before: None,
                after: None,
                forces_replacement: false,
                forces_restart: false,
            }),
        }
        // Metadata-only changes (tags) matter only through roles.
        fields.retain(|f| f.path != "metadata.tags" && !f.path.starts_with("metadata.tags."));
    }
    for field in &mut fields {
        field.forces_replacement = forces_replacement(kind, &field.path);
    }
    if let DesiredKind::Machine(machine) = &desired.kind {
        if Some(machine.roles_hash) != applied.roles_hash {
            fields.push(short_change(
                "roles",
                applied.roles_hash,
                Some(machine.roles_hash),
            ));
        }
        if Some(machine.build_input) != applied.build_input {
            fields.push(short_change(
                "revision",
                applied.build_input,
                Some(machine.build_input),
            ));
        }
    }
    fields
}

/// The steps that take a VM from what was observed (or, unobserved, from
/// what was applied) to its spec: create missing disks, grow small ones,
/// then start, stop or restart.
fn vm_steps(
    vm: &VmDesired<'_>,
    observed: Option<&VmObserved>,
    applied: Option<&Applied<'_>>,
    fields: &[FieldChange],
) -> Vec<Step> {
    let mut steps = Vec::new();
    match observed {
        Some(o) => {
            for disk in vm.disks {
                let name = disk.name.value.as_str();
                let size = disk.size.value;
                match o.disks.iter().find(|(n, _)| n == name) {
                    None => steps.push(Step::CreateDisk {
                        disk: name.to_owned(),
                        size: size.to_string(),
                    }),
                    Some((_, Some(have))) if *have < size.bytes() => steps.push(Step::GrowDisk {
                        disk: name.to_owned(),
                        size: size.to_string(),
                    }),
                    Some(_) => {}
                }
            }
            match (vm.running, o.running) {
                (true, false) => steps.push(Step::StartVm),
                (true, true) if vm.restart || o.launched.as_deref() != Some(vm.launch) => {
                    steps.push(Step::RestartVm);
                }
                (false, true) => steps.push(Step::StopVm),
                _ => {}
            }
        }
        None => {
            // Unobserved: planned from the records alone.
            let before: Vec<(String, String)> = applied
                .and_then(|a| a.document)
                .map(vm_disk_sizes)
                .unwrap_or_default();
            for disk in vm.disks {
                let name = disk.name.value.as_str();
                let size = disk.size.value.to_string();
                match before.iter().find(|(n, _)| n == name) {
                    None => steps.push(Step::CreateDisk {
                        disk: name.to_owned(),
                        size,
                    }),
                    Some((_, old)) if *old != size => steps.push(Step::GrowDisk {
                        disk: name.to_owned(),
                        size,
                    }),
                    Some(_) => {}
                }
            }
            if vm.running && applied.is_none() {
                steps.push(Step::StartVm);
            } else if vm.running && fields.iter().any(|f| forces_restart(&f.path)) {
                steps.push(Step::RestartVm);
            }
        }
    }
    steps
}

/// Fields whose change moves the object somewhere else.
fn forces_replacement(kind: Kind, path: &str) -> bool {
    match kind {
        Kind::Machine => {
            path.starts_with("spec.target.host")
                || path.starts_with("spec.target.local")
                || path.starts_with("spec.target.port")
                || path.starts_with("spec.target.stateDir")
        }
        Kind::VirtualMachine => path == "spec.host",
        Kind::Service => false,
    }
}

/// VM fields that only take effect when QEMU is started again.
fn forces_restart(path: &str) -> bool {
    [
        "spec.cpus",
        "spec.memory",
        "spec.network",
        "spec.boot",
        "spec.extraArgs",
    ]
    .iter()
    .any(|p| {
        path == *p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

fn vm_disk_sizes(document: &Value) -> Vec<(String, String)> {
    document
        .pointer("/spec/disks")
        .and_then(Value::as_array)
        .map(|disks| {
            disks
                .iter()
                .filter_map(|d| {
                    let name = d.get("name")?.as_str()?.to_owned();
                    let size = d.get("size")?.as_str()?.to_owned();
                    Some((name, size))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn drift_of(
    key: &ObjectKey,
    desired: &Desired<'_>,
    applied: &Applied<'_>,
    observed: Option<&Observed>,
) -> Vec<Drift> {
    let drift = |field: &str, applied: String, observed: String, action: &str| Drift {
        key: key.clone(),
        field: field.to_owned(),
        applied,
        observed,
        action: action.to_owned(),
    };
    match (&desired.kind, observed) {
        (DesiredKind::Machine(machine), Some(Observed::Machine { current, nixos, .. })) => {
            let action = match machine.drift {
                DriftPolicy::Ignore => return Vec::new(),
                DriftPolicy::Warn => "warn",
                DriftPolicy::Correct => "correct",
            };
            // Only modes that switch the running system say what must run.
            let switches = matches!(
                machine.activation.mode,
                ActivationMode::Switch | ActivationMode::Test
            );
            match (&applied.generation, nixos) {
                (Some(applied_generation), _) if current.as_ref() != Some(applied_generation) => {
                    vec![drift(
                        "current_generation",
                        applied_generation.clone(),
                        current.clone().unwrap_or_else(|| "none".to_owned()),
                        action,
                    )]
                }
                (Some(_), Some((applied_system, running)))
                    if switches && applied_system != running =>
                {
                    vec![drift(
                        "nixos_system",
                        applied_system.clone(),
                        running.clone(),
                        action,
                    )]
                }
                _ => Vec::new(),
            }
        }
        // A VM converge left running that is gone: started again.
        (DesiredKind::Vm(vm), Some(Observed::Vm(o)))
            if vm.running && !o.running && applied_running(applied) =>
        {
            vec![drift(
                "running",
                "true".to_owned(),
                "false".to_owned(),
                "restart",
            )]
        }
        _ => Vec::new(),
    }
}

/// Whether the VM spec last applied said running (the default).
fn applied_running(applied: &Applied<'_>) -> bool {
    applied
        .document
        .and_then(|d| d.pointer("/spec/state"))
        .and_then(Value::as_str)
        .is_none_or(|state| state == "running")
}

fn short(hash: Option<&str>) -> Value {
    match hash {
        Some(h) => Value::String(h.chars().take(12).collect()),
        None => Value::Null,
    }
}

fn short_change(path: &str, before: Option<&str>, after: Option<&str>) -> FieldChange {
    FieldChange {
        path: path.to_owned(),
        before: Some(short(before)),
        after: Some(short(after)),
        forces_replacement: false,
        forces_restart: false,
    }
}

/// Leaf-level differences between two JSON documents; arrays compare whole.
fn json_diff(path: &str, before: &Value, after: &Value, out: &mut Vec<FieldChange>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (b.get(k), a.get(k)) {
                    (Some(bv), Some(av)) => json_diff(&child, bv, av, out),
                    (bv, av) => out.push(FieldChange {
                        path: child,
                        before: bv.cloned(),
                        after: av.cloned(),
                        forces_replacement: false,
                        forces_restart: false,
                    }),
                }
            }
        }
        _ => out.push(FieldChange {
            path: path.to_owned(),
            before: Some(before.clone()),
            after: Some(after.clone()),
            forces_replacement: false,
            forces_restart: false,
        }),
    }
}
