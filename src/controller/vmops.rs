//! Operator verbs on VMs (`converge vm snapshot|revert|snapshots`): done by
//! the daemon when one runs, by the CLI otherwise, with the same checks.
//!
//! A verb never races the VM's reconcile: both hold the VM's lock
//! ([`VmLocks`]) while they touch its process or disks. The CLI only acts
//! on its own when it could open the store, which proves that no daemon and
//! no `reconcile --once` holds it.
//!
//! A verb refuses what would fight the spec: a VM converge has never
//! reconciled, or one whose spec no longer exists (it is being removed), a
//! VM on a remote hypervisor (not supported yet), and a revert of a running
//! VM to a snapshot taken while it was stopped (that would load disks
//! under a running guest's feet).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::driver::qemu::{self, SnapshotInfo, VmError};
use crate::spec::{Name, ObjectKey};
use crate::store::Store;
use crate::store::records::Severity;

/// One lock per VM name, shared by its reconcile and operator verbs.
#[derive(Debug, Default)]
pub struct VmLocks {
    locks: Mutex<HashMap<Name, Arc<tokio::sync::Mutex<()>>>>,
}

impl VmLocks {
    /// Waits for, then holds, the lock of VM `name`.
    pub async fn lock(&self, name: &Name) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = match self.locks.lock() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            Arc::clone(locks.entry(name.clone()).or_default())
        };
        lock.lock_owned().await
    }
}

/// What an operator asks of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOp {
    /// List its snapshots.
    Snapshots,
    /// Take snapshot SNAP of every disk (with RAM and devices when running).
    Snapshot(String),
    /// Revert every disk (and RAM when running) to SNAP.
    Revert(String),
}

impl VmOp {
    fn verb(&self) -> &'static str {
        match self {
            VmOp::Snapshots => "list snapshots of",
            VmOp::Snapshot(_) => "snapshot",
            VmOp::Revert(_) => "revert",
        }
    }
}

/// What a verb did, as the CLI prints it (also the API's JSON).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmOpOutcome {
    pub vm: String,
    /// One line saying what happened.
    pub message: String,
    pub snapshots: Vec<SnapshotRow>,
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRow {
    pub name: String,
    pub disks: Vec<String>,
    /// RAM and device state were saved (taken while running).
    pub with_ram: bool,
    pub taken_ms: u64,
}

impl From<SnapshotInfo> for SnapshotRow {
    fn from(s: SnapshotInfo) -> SnapshotRow {
        SnapshotRow {
            name: s.name,
            disks: s.disks,
            with_ram: s.vm_state_size > 0,
            taken_ms: s.date_sec.saturating_mul(1000),
        }
    }
}

/// Why a verb was refused or failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VmOpError {
    #[error(
        "{verb} vm/{name}: converge has not reconciled a VirtualMachine named {name} with this state directory; check the name (`converge vm list`)"
    )]
    Unknown { verb: &'static str, name: String },
    #[error(
        "{verb} vm/{name}: it is no longer in the desired state and is being removed; restore its YAML first"
    )]
    Removed { verb: &'static str, name: String },
    #[error(
        "{verb} vm/{name}: it runs on hypervisor machine {host}; operator verbs work on VMs with `host: local` only for now"
    )]
    Remote {
        verb: &'static str,
        name: String,
        host: String,
    },
    #[error(
        "revert vm/{name} to {snap}: the VM is running and {snap} holds no RAM state (it was taken while stopped); stop the VM (`state: stopped`), revert, then start it"
    )]
    RunningToDiskOnly { name: String, snap: String },
    #[error("{verb} vm/{name}")]
    Driver {
        verb: &'static str,
        name: String,
        #[source]
        source: VmError,
    },
    #[error("{verb} vm/{name}: read the store")]
    Store {
        verb: &'static str,
        name: String,
        #[source]
        source: crate::store::StoreError,
    },
}

/// Carries out `op` on VM `name` whose directory is under `vm_root`,
/// holding its lock. `desired` says whether the desired state in force
/// still has the VM (the daemon knows; the CLI passes `None`). Successful
/// snapshots and reverts are recorded as events.
pub async fn operate(
    store: &Store,
    locks: &VmLocks,
    vm_root: &Path,
    name: &Name,
    desired: Option<bool>,
    op: &VmOp,
) -> Result<VmOpOutcome, VmOpError> {
    let verb = op.verb();
    let key = ObjectKey::vm(name.clone());
    let store_error = |source| VmOpError::Store {
        verb,
        name: name.to_string(),
        source,
    };
    let Some(record) = store.spec(&key).map_err(store_error)? else {
        return Err(VmOpError::Unknown {
            verb,
            name: name.to_string(),
        });
    };
    if desired == Some(false) {
        return Err(VmOpError::Removed {
            verb,
            name: name.to_string(),
        });
    }
    let host = record
        .spec
        .pointer("/spec/host")
        .and_then(|h| h.as_str())
        .unwrap_or("local");
    if host != "local" {
        return Err(VmOpError::Remote {
            verb,
            name: name.to_string(),
            host: host.to_owned(),
        });
    }
    let dir: PathBuf = vm_root.join(name.as_str());
    let driver = |source| VmOpError::Driver {
        verb,
        name: name.to_string(),
        source,
    };
    let _held = locks.lock(name).await;
    let message = match op {
        VmOp::Snapshots => "snapshots".to_owned(),
        VmOp::Snapshot(snap) => {
            let running = qemu::running_pid(&dir).await.is_some();
            qemu::snapshot(&dir, snap).await.map_err(driver)?;
            let what = if running {
                "disks, RAM and devices (running)"
            } else {
                "disks only (stopped)"
            };
            let message = format!("vm/{name}: snapshot {snap} taken: {what}");
            record_event(store, &key, &message);
            message
        }
        VmOp::Revert(snap) => {
            let running = qemu::running_pid(&dir).await.is_some();
            if running {
                let list = qemu::snapshots(&dir).await.map_err(driver)?;
                if list.iter().any(|s| s.name == *snap && s.vm_state_size == 0) {
                    return Err(VmOpError::RunningToDiskOnly {
                        name: name.to_string(),
                        snap: snap.clone(),
                    });
                }
            }
            qemu::revert(&dir, snap).await.map_err(driver)?;
            let message = format!("vm/{name}: reverted to snapshot {snap}");
            record_event(store, &key, &message);
            message
        }
    };
    let snapshots = qemu::snapshots(&dir)
        .await
        .map_err(driver)?
        .into_iter()
        .map(SnapshotRow::from)
        .collect();
    Ok(VmOpOutcome {
        vm: name.to_string(),
        message,
        snapshots,
    })
}

fn record_event(store: &Store, key: &ObjectKey, message: &str) {
    tracing::info!(object = %key, "{message}");
    if let Err(error) = store.append_event(key, Severity::Info, "OperatorVerb", message) {
        tracing::warn!(object = %key, %error, "recording an operator verb's event failed");
    }
}
