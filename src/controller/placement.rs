//! Where a VM lives: its host as the spec names it, resolved to the
//! controller's own host or a hypervisor Machine's target, and where converge
//! last observed it (from its stored facts). Reconcile, `plan` and the
//! operator verbs all resolve a VM's place here, the same way.

use serde_json::Value;

use crate::driver::capability::Hypervisor;
use crate::spec::{Name, ObjectKey, Target as TargetSpec, VmHost};
use crate::store::Store;
use crate::store::records::SpecRecord;

/// Why a VM's hypervisor could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Unresolved {
    #[error("read the hypervisor's last spec")]
    Store(#[from] crate::store::StoreError),
    #[error(
        "hypervisor machine {name} is neither declared nor ever converged, so there is no target to reach it at; declare it again"
    )]
    Unknown { name: Name },
}

/// Where converge last observed a VM, from its stored facts.
#[derive(Debug, Clone)]
pub struct LastPlace {
    /// Its host and, for a hypervisor Machine, the target it was reached at.
    pub host: Hypervisor,
    /// Whether its QEMU ran or any of its disks existed there.
    pub occupied: bool,
}

impl LastPlace {
    /// The host as a spec names it.
    pub fn vm_host(&self) -> VmHost {
        match &self.host {
            Hypervisor::Local => VmHost::Local,
            Hypervisor::Machine { name, .. } => VmHost::Machine(name.clone()),
        }
    }
}

/// Where converge last observed VM `key`; `None` before its first
/// observation. Facts written before hypervisors existed name no host:
/// those VMs were local.
pub fn last_place(store: &Store, key: &ObjectKey) -> Result<Option<LastPlace>, Unresolved> {
    let Some(record) = store.facts(key)? else {
        return Ok(None);
    };
    let facts = &record.facts;
    let occupied = facts.get("running").and_then(Value::as_bool) == Some(true)
        || facts
            .get("disks")
            .and_then(Value::as_array)
            .is_some_and(|disks| {
                disks
                    .iter()
                    .any(|d| d.get("exists").and_then(Value::as_bool) == Some(true))
            });
    let host = match facts.get("host").and_then(Value::as_str) {
        Some("local") | None => Hypervisor::Local,
        Some(name) => {
            let name = Name::new(name).ok();
            let target = facts
                .get("hostTarget")
                .and_then(|t| serde_json::from_value::<TargetSpec>(t.clone()).ok());
            match (name, target) {
                (Some(name), Some(target)) => Hypervisor::Machine {
                    name,
                    target: Box::new(target),
                },
                _ => return Ok(None),
            }
        }
    };
    Ok(Some(LastPlace { host, occupied }))
}

/// A VM's facts as stored: what was observed, and where.
pub fn facts_document(facts: &crate::driver::qemu::VmFacts, host: &Hypervisor) -> Value {
    let mut document = serde_json::to_value(facts).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut document {
        match host {
            Hypervisor::Local => {
                map.insert("host".into(), "local".into());
            }
            Hypervisor::Machine { name, target } => {
                map.insert("host".into(), name.as_str().into());
                map.insert(
                    "hostTarget".into(),
                    serde_json::to_value(target).unwrap_or(Value::Null),
                );
            }
        }
    }
    document
}

/// Whether two hypervisors are the same place for a VM: the same host, and
/// for a Machine the same address, port and state directory (a new host key
/// or user does not move anything).
pub fn same_place(a: &Hypervisor, b: &Hypervisor) -> bool {
    match (a, b) {
        (Hypervisor::Local, Hypervisor::Local) => true,
        (
            Hypervisor::Machine { name, target },
            Hypervisor::Machine {
                name: other,
                target: other_target,
            },
        ) => {
            name == other
                && target.is_local() == other_target.is_local()
                && target.host.as_ref().map(|h| &h.value)
                    == other_target.host.as_ref().map(|h| &h.value)
                && target.port.as_ref().map(|p| p.value.get())
                    == other_target.port.as_ref().map(|p| p.value.get())
                && target.state_dir() == other_target.state_dir()
        }
        _ => false,
    }
}

/// Where a VM with `host` runs. A hypervisor Machine's target comes from
/// the desired state in force, or else (the Machine was removed with its
/// VMs, or the caller has no desired state) from where the VM was last
/// observed (`last`), or else from the spec the Machine last converged with.
pub fn resolve_hypervisor(
    desired: Option<&crate::spec::DesiredState>,
    store: &Store,
    host: &VmHost,
    last: Option<&Hypervisor>,
) -> Result<Hypervisor, Unresolved> {
    let VmHost::Machine(name) = host else {
        return Ok(Hypervisor::Local);
    };
    if let Some(machine) = desired.and_then(|d| d.machines.get(name)) {
        return Ok(Hypervisor::Machine {
            name: name.clone(),
            target: Box::new(machine.spec.target.clone()),
        });
    }
    if let Some(Hypervisor::Machine {
        name: last_name,
        target,
    }) = last
    {
        if last_name == name {
            return Ok(Hypervisor::Machine {
                name: name.clone(),
                target: target.clone(),
            });
        }
    }
    let record = store.spec(&ObjectKey::machine(name.clone()))?;
    let target = record
        .as_ref()
        .and_then(|r| r.spec.pointer("/spec/target"))
        .and_then(|t| serde_json::from_value::<TargetSpec>(t.clone()).ok());
    match target {
        Some(target) => Ok(Hypervisor::Machine {
            name: name.clone(),
            target: Box::new(target),
        }),
        None => Err(Unresolved::Unknown { name: name.clone() }),
    }
}

/// The host a VM's recorded spec names (`local` when it names none).
pub fn recorded_host(record: Option<&SpecRecord>) -> VmHost {
    match record
        .and_then(|r| r.spec.pointer("/spec/host"))
        .and_then(Value::as_str)
    {
        Some("local") | None => VmHost::Local,
        Some(other) => Name::new(other).map_or(VmHost::Local, VmHost::Machine),
    }
}

/// A hypervisor as messages name it.
pub fn place_name(host: &Hypervisor) -> String {
    match host {
        Hypervisor::Local => "this host (`local`)".to_owned(),
        Hypervisor::Machine { name, target } => format!(
            "hypervisor machine {name} ({}:{})",
            target.host.as_ref().map_or("local", |h| h.value.as_str()),
            target.state_dir()
        ),
    }
}

/// Where VM `key`, whose spec names `host`, lives: [`resolve_hypervisor`]
/// with where it was last observed.
pub fn hypervisor(
    desired: &crate::spec::DesiredState,
    store: &Store,
    key: &ObjectKey,
    host: &VmHost,
) -> Result<Hypervisor, Unresolved> {
    let last = last_place(store, key)?;
    resolve_hypervisor(Some(desired), store, host, last.as_ref().map(|l| &l.host))
}
