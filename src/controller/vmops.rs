//! Operator verbs on VMs (`converge vm snapshot|revert|snapshots|stop|
//! start|restart|delete`): done by the daemon when one runs, by the CLI
//! otherwise, with the same checks.
//!
//! The power verbs keep the loop from undoing them: `stop` suspends the VM
//! object (it is observed, never started again) and stops it; `start`
//! resumes it, and its reconcile starts it; `restart` asks the VM's next
//! reconcile to plan a restart (so it is in its history like any other),
//! which only the daemon can do; `delete` does what removing its YAML
//! would (stop, delete its disks per `onDelete`) and suspends it, so it is
//! not created again while its document remains.
//!
//! A verb never races the VM's reconcile: both hold the VM's lock
//! ([`VmLocks`]) while they touch its process or disks. The CLI only acts
//! on its own when it could open the store, which proves that no daemon and
//! no `reconcile --once` holds it.
//!
//! A verb refuses what would fight the spec: a VM converge has never
//! reconciled, or one whose spec no longer exists (it is being removed),
//! and a revert of a running VM to a snapshot taken while it was stopped
//! (that would load disks under a running guest's feet).
//!
//! A VM on a hypervisor Machine is operated through converge's agent there,
//! like its reconcile (see `driver::hypervisor`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::context::VmLocks;
use crate::driver::capability::{DriverError, VmDriver};
use crate::driver::qemu::SnapshotInfo;
use crate::spec::{DesiredState, Name, ObjectKey};
use crate::store::Store;
use crate::store::records::Severity;

/// What an operator asks of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOp {
    /// List its snapshots.
    Snapshots,
    /// Take snapshot SNAP of every disk (with RAM and devices when running).
    Snapshot(String),
    /// Revert every disk (and RAM when running) to SNAP.
    Revert(String),
    /// Suspend the VM object and stop the VM.
    Stop,
    /// Resume the VM object; its reconcile starts it.
    Start,
    /// Restart the VM at its next reconcile (the daemon only).
    Restart,
    /// Stop it, delete its files (disks per `onDelete`), suspend it.
    Delete,
}

impl VmOp {
    fn verb(&self) -> &'static str {
        match self {
            VmOp::Snapshots => "list snapshots of",
            VmOp::Snapshot(_) => "snapshot",
            VmOp::Revert(_) => "revert",
            VmOp::Stop => "stop",
            VmOp::Start => "start",
            VmOp::Restart => "restart",
            VmOp::Delete => "delete",
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
    #[error("{verb} vm/{name}")]
    Hypervisor {
        verb: &'static str,
        name: String,
        #[source]
        source: super::placement::Unresolved,
    },
    #[error(
        "revert vm/{name} to {snap}: the VM is running and {snap} holds no RAM state (it was taken while stopped); stop the VM (`state: stopped`), revert, then start it"
    )]
    RunningToDiskOnly { name: String, snap: String },
    #[error(
        "restart vm/{name}: a restart is planned by the VM's reconcile, and no daemon runs on this state directory; run `converge vm stop {name}`, then `converge vm start {name}` and `converge reconcile --once`"
    )]
    RestartNeedsDaemon { name: String },
    #[error(
        "restart vm/{name}: it is suspended (by `converge {by}`), so nothing would start it again; `converge vm start {name}` resumes and starts it"
    )]
    RestartSuspended { name: String, by: String },
    #[error("{verb} vm/{name}")]
    Driver {
        verb: &'static str,
        name: String,
        #[source]
        source: DriverError,
    },
    #[error("{verb} vm/{name}: read the store")]
    Store {
        verb: &'static str,
        name: String,
        #[source]
        source: crate::store::StoreError,
    },
}

/// Carries out `op` on VM `name` on its host, holding its lock. `desired`
/// is the desired state in force (the daemon has it; the CLI passes
/// `None`): a VM missing from it is being removed and refused. Successful
/// snapshots and reverts are recorded as events.
pub async fn operate<D: VmDriver>(
    driver: &D,
    store: &Store,
    locks: &VmLocks,
    vm_root: &Path,
    desired: Option<&DesiredState>,
    name: &Name,
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
    if desired.is_some_and(|d| !d.vms.contains_key(name)) {
        return Err(VmOpError::Removed {
            verb,
            name: name.to_string(),
        });
    }
    let unresolved = |source| VmOpError::Hypervisor {
        verb,
        name: name.to_string(),
        source,
    };
    // Where the VM was last seen: the CLI has no desired state to ask.
    let last = super::placement::last_place(store, &key).map_err(unresolved)?;
    let host = super::placement::resolve_hypervisor(
        desired,
        store,
        &super::placement::recorded_host(Some(&record)),
        last.as_ref().map(|l| &l.host),
    )
    .map_err(unresolved)?;
    let dir: PathBuf = host.vm_dir(vm_root, name.as_str());
    let failed = |source| VmOpError::Driver {
        verb,
        name: name.to_string(),
        source,
    };
    if let VmOp::Start | VmOp::Restart = op {
        return resume_or_restart(store, desired.is_some(), name, op);
    }
    let _held = locks.lock(name).await;
    let message = match op {
        VmOp::Start | VmOp::Restart => unreachable!("answered above"),
        VmOp::Stop => {
            let suspended = store.suspend(&key, "vm stop").map_err(store_error)?;
            let grace = stop_grace(Some(&record));
            let outcome = driver.vm_stop(&host, &dir, grace).await.map_err(failed)?;
            let message = format!(
                "vm/{name}: stopped ({outcome:?}){}; suspended, so converge does not start it again until `converge vm start {name}`",
                if suspended {
                    ""
                } else {
                    ", it was suspended already"
                }
            );
            record_event(store, &key, &message);
            record_stopped(store, &key, &message);
            message
        }
        VmOp::Delete => {
            store.suspend(&key, "vm delete").map_err(store_error)?;
            let deletes = super::reconcile::vm::deletes_disks(Some(&record));
            let on_delete = if deletes {
                crate::spec::OnDelete::Delete
            } else {
                crate::spec::OnDelete::KeepDisks
            };
            let outcome = driver
                .vm_delete(&host, &dir, on_delete, stop_grace(Some(&record)))
                .await
                .map_err(failed)?;
            let message = format!(
                "vm/{name}: deleted ({outcome:?}; its disks {} per `onDelete`); suspended, so it is not created again while its YAML remains: remove the YAML, or `converge vm start {name}` to create it again",
                if deletes { "deleted" } else { "kept" }
            );
            record_event(store, &key, &message);
            record_stopped(store, &key, &message);
            message
        }
        VmOp::Snapshots => "snapshots".to_owned(),
        VmOp::Snapshot(snap) => {
            let running = driver
                .vm_running_pid(&host, &dir)
                .await
                .map_err(failed)?
                .is_some();
            driver
                .vm_snapshot(&host, &dir, snap)
                .await
                .map_err(failed)?;
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
            let running = driver.vm_running_pid(&host, &dir).await.map_err(failed)?;
            if running.is_some() {
                let list = driver.vm_snapshots(&host, &dir).await.map_err(failed)?;
                if list.iter().any(|s| s.name == *snap && s.vm_state_size == 0) {
                    return Err(VmOpError::RunningToDiskOnly {
                        name: name.to_string(),
                        snap: snap.clone(),
                    });
                }
            }
            driver.vm_revert(&host, &dir, snap).await.map_err(failed)?;
            let message = format!("vm/{name}: reverted to snapshot {snap}");
            record_event(store, &key, &message);
            message
        }
    };
    let snapshots = driver
        .vm_snapshots(&host, &dir)
        .await
        .map_err(failed)?
        .into_iter()
        .map(SnapshotRow::from)
        .collect();
    Ok(VmOpOutcome {
        vm: name.to_string(),
        message,
        snapshots,
    })
}

/// `start` resumes (the VM's reconcile then starts it); `restart` asks the
/// daemon's next reconcile of the VM to plan one. The daemon queues that
/// reconcile itself.
#[expect(
    clippy::result_large_err,
    reason = "the same error as `operate`, which returns it as is; verbs are rare"
)]
fn resume_or_restart(
    store: &Store,
    daemon: bool,
    name: &Name,
    op: &VmOp,
) -> Result<VmOpOutcome, VmOpError> {
    let key = ObjectKey::vm(name.clone());
    let store_error = |source| VmOpError::Store {
        verb: op.verb(),
        name: name.to_string(),
        source,
    };
    let message = if *op == VmOp::Start {
        let resumed = store.resume(&key).map_err(store_error)?;
        let when = if daemon {
            "the daemon starts it now"
        } else {
            "no daemon runs: `converge reconcile --once` starts it"
        };
        let message = if resumed {
            format!("vm/{name}: resumed; {when} (if its spec says `state: running`)")
        } else {
            format!("vm/{name}: it was not stopped by converge; {when} if it is not running")
        };
        record_event(store, &key, &message);
        message
    } else {
        if !daemon {
            return Err(VmOpError::RestartNeedsDaemon {
                name: name.to_string(),
            });
        }
        if let Some(s) = store.suspension(&key).map_err(store_error)? {
            return Err(VmOpError::RestartSuspended {
                name: name.to_string(),
                by: s.by,
            });
        }
        let message = format!(
            "vm/{name}: restart asked: the daemon's next reconcile of it, queued now, plans and records it (`converge history vm/{name}`); a daemon stopped before then forgets the request"
        );
        record_event(store, &key, &message);
        message
    };
    Ok(VmOpOutcome {
        vm: name.to_string(),
        message,
        snapshots: Vec::new(),
    })
}

/// What the verb just did is what `status` and `vm list` say at once
/// (without a daemon no reconcile follows to observe it): the VM is not
/// running, and not Ready, suspended.
fn record_stopped(store: &Store, key: &ObjectKey, message: &str) {
    use crate::store::records::{ConditionKind, Reason, now_ms};
    let now = now_ms();
    let written = (|| {
        if let Some(mut facts) = store.facts(key)? {
            if let Some(map) = facts.facts.as_object_mut() {
                map.insert("running".to_owned(), serde_json::Value::Bool(false));
                map.insert("pid".to_owned(), serde_json::Value::Null);
                map.remove("qmpStatus");
            }
            facts.observed_ms = now;
            store.put_facts(key, &facts)?;
        }
        if let Some(mut status) = store.status(key)? {
            status.set_condition(ConditionKind::Ready, false, Reason::Suspended, message, now);
            store.put_status(key, &status)?;
        }
        store.flush()
    })();
    if let Err(error) = written {
        tracing::warn!(object = %key, %error, "recording the stopped VM failed");
    }
}

/// The VM's `stopTimeout` from its recorded spec, else 30 s.
fn stop_grace(record: Option<&crate::store::records::SpecRecord>) -> std::time::Duration {
    record
        .and_then(|r| r.spec.pointer("/spec/stopTimeout"))
        .and_then(serde_json::Value::as_str)
        .and_then(|t| t.parse::<crate::spec::HumanDuration>().ok())
        .map_or(std::time::Duration::from_secs(30), |d| d.get())
}

fn record_event(store: &Store, key: &ObjectKey, message: &str) {
    tracing::info!(object = %key, "{message}");
    if let Err(error) = store.append_event(
        key,
        Severity::Info,
        crate::store::records::Reason::OperatorVerb,
        message,
    ) {
        tracing::warn!(object = %key, %error, "recording an operator verb's event failed");
    }
}
