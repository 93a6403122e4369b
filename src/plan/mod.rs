//! Plans: what converge would do to take facts to spec, object by object.
//!
//! `diff` compares, for one object, the spec in the YAML with the spec last
//! applied (from the store) and the facts just observed, and returns the
//! change to make (create, update, replace, destroy, forget) with the fields
//! that changed and the steps it takes, plus any drift: facts that differ from
//! what was last applied without a spec change. `converge plan` renders the
//! whole plan; reconcile uses the same diff for one object, so the preview and
//! the action cannot disagree. Pure and deterministic: no IO, no tokio.

mod render;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::{Kind, ObjectKey};

pub use render::render_text;

/// What happens to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangeKind {
    /// `+`: never applied before.
    Create,
    /// `~`: applied before; its spec, roles or build inputs changed.
    Update,
    /// `-/+`: a field that identifies where the object lives changed.
    Replace,
    /// `-`: removed from the YAML and torn down (a VM with `onDelete: delete`).
    Destroy,
    /// `-`: removed from the YAML; converge stops managing it, nothing is uninstalled.
    Forget,
    /// `~`: nothing changed in the YAML, but the object drifted and its policy corrects it.
    Correct,
}

impl ChangeKind {
    pub fn symbol(self) -> &'static str {
        match self {
            ChangeKind::Create => "+",
            ChangeKind::Update | ChangeKind::Correct => "~",
            ChangeKind::Replace => "-/+",
            ChangeKind::Destroy | ChangeKind::Forget => "-",
        }
    }

    /// Counts for Terraform's summary line: (add, change, destroy).
    pub fn counts(self) -> (usize, usize, usize) {
        match self {
            ChangeKind::Create => (1, 0, 0),
            ChangeKind::Update | ChangeKind::Correct => (0, 1, 0),
            ChangeKind::Replace => (1, 0, 1),
            ChangeKind::Destroy | ChangeKind::Forget => (0, 0, 1),
        }
    }
}

/// One field that differs between the applied spec and the desired one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    /// Dotted path, like `spec.activation.mode`, `roles` or `revision`.
    pub path: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    /// Changing this field replaces the object (`-/+`).
    pub forces_replacement: bool,
    /// Changing this field restarts a running VM.
    pub forces_restart: bool,
}

/// One action of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Run the machine's build (skipped when cached for the same inputs).
    Build,
    /// Write a new generation to the target.
    Install,
    /// Point `current` at the new generation and run its `activate MODE`.
    Activate {
        mode: String,
    },
    /// Run health checks after activation; roll back on failure if allowed.
    HealthCheck {
        count: usize,
    },
    /// Re-activate the generation that was last applied (drift correction).
    Reactivate,
    CreateDisk {
        disk: String,
    },
    GrowDisk {
        disk: String,
    },
    StartVm,
    StopVm,
    RestartVm,
    DeleteVm,
    /// Drop the object from converge's records.
    Forget,
}

impl Step {
    /// Whether the step can interrupt what runs on the target now.
    pub fn is_disruptive(&self) -> bool {
        matches!(
            self,
            Step::Activate { .. }
                | Step::Reactivate
                | Step::StopVm
                | Step::RestartVm
                | Step::DeleteVm
        )
    }
}

/// The change planned for one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub key: ObjectKey,
    pub kind: ChangeKind,
    pub fields: Vec<FieldChange>,
    pub steps: Vec<Step>,
    /// One line of context, like "removed from the YAML; nothing is uninstalled".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A fact that differs from what converge last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub key: ObjectKey,
    pub field: String,
    pub applied: String,
    pub observed: String,
    /// What the object's drift policy does about it: correct, warn.
    pub action: String,
}

/// A whole plan: changes in key order, and drift.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub revision: Option<String>,
    pub changes: Vec<Change>,
    pub drift: Vec<Drift>,
    /// Objects that could not be observed (unreachable): planned from records only.
    pub unobserved: Vec<(ObjectKey, String)>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// (to add, to change, to destroy), as in Terraform's summary line.
    pub fn summary(&self) -> (usize, usize, usize) {
        self.changes.iter().fold((0, 0, 0), |acc, c| {
            let (a, m, d) = c.kind.counts();
            (acc.0 + a, acc.1 + m, acc.2 + d)
        })
    }
}

/// The desired side of one object.
#[derive(Debug, Clone)]
pub struct Desired<'a> {
    /// The document as canonical JSON (`{apiVersion, kind, metadata, spec}`).
    pub document: Value,
    pub spec_hash: &'a str,
    /// Machines: hash of the roles document.
    pub roles_hash: Option<&'a str>,
    /// Machines: the build-input identity (revision of the directory).
    pub build_input: Option<&'a str>,
    /// Machines: steps after install.
    pub activation_mode: Option<&'a str>,
    pub health_checks: usize,
    /// VMs: whether the spec wants it running.
    pub vm_running: Option<bool>,
    /// Drift policy: "correct", "warn" or "ignore".
    pub drift_policy: &'a str,
    /// VMs: whether removal deletes disks.
    pub delete_on_removal: bool,
}

/// What converge recorded when it last applied the object.
#[derive(Debug, Clone)]
pub struct Applied<'a> {
    pub document: Option<&'a Value>,
    pub spec_hash: &'a str,
    pub roles_hash: Option<&'a str>,
    pub build_input: Option<&'a str>,
    /// Machines: `n-hash` of the generation applied.
    pub generation: Option<String>,
    /// VMs removed from the YAML: whether their last spec said `onDelete: delete`.
    pub delete_on_removal: bool,
}

/// What was just observed.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Machines: `n-hash` of the generation `current` points at.
    pub current_generation: Option<String>,
    /// VMs: whether its process runs.
    pub vm_running: Option<bool>,
    /// VMs: disks present, by name.
    pub vm_disks: Vec<String>,
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
        (Some(desired), None) => (Some(creation(key, desired, observed)), Vec::new()),
        (Some(desired), Some(applied)) => update(key, desired, applied, observed),
    }
}

fn removal(key: &ObjectKey, applied: &Applied<'_>) -> Change {
    let (kind, steps, note) = match key.kind {
        Kind::VirtualMachine if applied.delete_on_removal => (
            ChangeKind::Destroy,
            vec![Step::StopVm, Step::DeleteVm, Step::Forget],
            "removed from the YAML; onDelete: delete removes its disks",
        ),
        Kind::VirtualMachine => (
            ChangeKind::Destroy,
            vec![Step::StopVm, Step::Forget],
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
        note: Some(note.to_owned()),
    }
}

fn machine_steps(desired: &Desired<'_>) -> Vec<Step> {
    let mut steps = vec![
        Step::Build,
        Step::Install,
        Step::Activate {
            mode: desired.activation_mode.unwrap_or("switch").to_owned(),
        },
    ];
    if desired.health_checks > 0 {
        steps.push(Step::HealthCheck {
            count: desired.health_checks,
        });
    }
    steps
}

fn vm_disks(document: &Value) -> Vec<String> {
    document
        .pointer("/spec/disks")
        .and_then(Value::as_array)
        .map(|disks| {
            disks
                .iter()
                .filter_map(|d| d.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn creation(key: &ObjectKey, desired: &Desired<'_>, observed: Option<&Observed>) -> Change {
    let steps = match key.kind {
        Kind::Machine => machine_steps(desired),
        Kind::VirtualMachine => {
            let present = observed.map(|o| o.vm_disks.as_slice()).unwrap_or(&[]);
            let mut steps: Vec<Step> = vm_disks(&desired.document)
                .into_iter()
                .filter(|d| !present.contains(d))
                .map(|disk| Step::CreateDisk { disk })
                .collect();
            let running = observed.and_then(|o| o.vm_running).unwrap_or(false);
            if desired.vm_running == Some(true) && !running {
                steps.push(Step::StartVm);
            }
            steps
        }
        Kind::Service => Vec::new(),
    };
    Change {
        key: key.clone(),
        kind: ChangeKind::Create,
        fields: Vec::new(),
        steps,
        note: None,
    }
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

/// VM fields that only take effect when qemu is started again.
fn forces_restart(kind: Kind, path: &str) -> bool {
    kind == Kind::VirtualMachine
        && [
            "spec.cpus",
            "spec.memory",
            "spec.network",
            "spec.boot",
            "spec.extraArgs",
        ]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}.")))
}

fn update(
    key: &ObjectKey,
    desired: &Desired<'_>,
    applied: &Applied<'_>,
    observed: Option<&Observed>,
) -> (Option<Change>, Vec<Drift>) {
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
        field.forces_replacement = forces_replacement(key.kind, &field.path);
        field.forces_restart = forces_restart(key.kind, &field.path);
    }
    if key.kind == Kind::Machine {
        if desired.roles_hash != applied.roles_hash {
            fields.push(short_change(
                "roles",
                applied.roles_hash,
                desired.roles_hash,
            ));
        }
        if desired.build_input != applied.build_input {
            fields.push(short_change(
                "revision",
                applied.build_input,
                desired.build_input,
            ));
        }
    }

    let drift = drift_of(key, desired, applied, observed);
    let replace = fields.iter().any(|f| f.forces_replacement);
    let restart = fields.iter().any(|f| f.forces_restart);

    let steps = match key.kind {
        Kind::Machine if !fields.is_empty() => machine_steps(desired),
        Kind::Machine if !drift.is_empty() && desired.drift_policy == "correct" => {
            vec![Step::Reactivate]
        }
        Kind::VirtualMachine => {
            vm_update_steps(desired, applied, observed, &fields, restart || replace)
        }
        _ => Vec::new(),
    };
    if fields.is_empty() && steps.is_empty() {
        return (None, drift);
    }
    let kind = if replace {
        ChangeKind::Replace
    } else if fields.is_empty() {
        ChangeKind::Correct
    } else {
        ChangeKind::Update
    };
    let note = match (kind, key.kind) {
        (ChangeKind::Correct, _) => Some("drifted; its policy (drift: correct) converges it back".to_owned()),
        (ChangeKind::Update, Kind::Machine) if fields.iter().all(|f| f.path == "revision") => Some(
            "only the directory's revision changed: rebuilt, activated only if the artifact differs".to_owned(),
        ),
        (ChangeKind::Update, Kind::VirtualMachine) if restart => Some("forces a restart of the running VM".to_owned()),
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
            note,
        }),
        drift,
    )
}

fn vm_update_steps(
    desired: &Desired<'_>,
    applied: &Applied<'_>,
    observed: Option<&Observed>,
    fields: &[FieldChange],
    restart: bool,
) -> Vec<Step> {
    let running = observed.and_then(|o| o.vm_running).unwrap_or(true);
    let wants_running = desired.vm_running == Some(true);
    let present = observed
        .map(|o| o.vm_disks.clone())
        .unwrap_or_else(|| applied.document.map(vm_disks).unwrap_or_default());
    let mut steps: Vec<Step> = vm_disks(&desired.document)
        .into_iter()
        .filter(|d| !present.contains(d))
        .map(|disk| Step::CreateDisk { disk })
        .collect();
    if let Some(before) = applied.document {
        let old = vm_disk_sizes(before);
        for (name, size) in vm_disk_sizes(&desired.document) {
            if old.iter().any(|(n, s)| *n == name && *s != size) {
                steps.push(Step::GrowDisk { disk: name });
            }
        }
    }
    match (wants_running, running) {
        (true, true) if restart => steps.push(Step::RestartVm),
        (true, false) => steps.push(Step::StartVm),
        (false, true) => steps.push(Step::StopVm),
        _ => {}
    }
    if fields.is_empty() && steps.is_empty() {
        return Vec::new();
    }
    steps
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
    let Some(observed) = observed else {
        return Vec::new();
    };
    if desired.drift_policy == "ignore" {
        return Vec::new();
    }
    let action = if desired.drift_policy == "warn" {
        "warn"
    } else {
        "correct"
    };
    let mut out = Vec::new();
    match key.kind {
        Kind::Machine => {
            if let Some(applied_generation) = &applied.generation {
                if observed.current_generation.as_ref() != Some(applied_generation) {
                    out.push(Drift {
                        key: key.clone(),
                        field: "current_generation".to_owned(),
                        applied: applied_generation.clone(),
                        observed: observed
                            .current_generation
                            .clone()
                            .unwrap_or_else(|| "none".to_owned()),
                        action: action.to_owned(),
                    });
                }
            }
        }
        Kind::VirtualMachine => {
            if desired.vm_running == Some(true) && observed.vm_running == Some(false) {
                out.push(Drift {
                    key: key.clone(),
                    field: "running".to_owned(),
                    applied: "true".to_owned(),
                    observed: "false".to_owned(),
                    action: action.to_owned(),
                });
            }
        }
        Kind::Service => {}
    }
    out
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
            let keys: std::collections::BTreeSet<&String> = b.keys().chain(a.keys()).collect();
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

#[cfg(test)]
mod tests;
