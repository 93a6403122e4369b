//! converge's agent on a remote hypervisor: `converge vm-agent REQUEST` runs
//! one VM operation of this module's parent on the host it runs on and prints
//! one JSON [`Reply`] line.
//!
//! The controller reaches a hypervisor Machine over SSH, uploads its own
//! binary there (content-addressed, so the agent is always the same build as
//! the controller and the protocol needs no version), and runs one agent
//! process per operation. Everything that must be true *on the hypervisor*
//! (the pidfile names a live QEMU, a forward port is free, the memory fits,
//! the bridge exists, QMP answers on the VM's socket) is therefore checked
//! there by the same code as for local VMs. Nothing is kept between runs:
//! the VM's directory on the hypervisor is the whole truth, as locally.
//!
//! Paths in a request are paths on the hypervisor: the controller has
//! already replaced files of the desired-state directory (backing images,
//! kernels) by their uploaded copies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::VmError;
#[cfg(test)]
use super::facts::VmFacts;
use crate::spec::{ByteSize, Disk, OnDelete, VmSpec};

/// One operation on one VM directory of the hypervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Observe {
        dir: PathBuf,
        disks: Vec<Disk>,
    },
    CreateDisk {
        dir: PathBuf,
        disk: Disk,
        backing: Option<PathBuf>,
    },
    GrowDisk {
        dir: PathBuf,
        disk: String,
        size: ByteSize,
        online: bool,
    },
    #[serde(rename_all = "camelCase")]
    Start {
        dir: PathBuf,
        name: String,
        spec: Box<VmSpec>,
        launch_identity: String,
        timeout_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    Stop {
        dir: PathBuf,
        graceful_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    Delete {
        dir: PathBuf,
        on_delete: OnDelete,
        graceful_ms: u64,
    },
    RunningPid {
        dir: PathBuf,
    },
    Snapshots {
        dir: PathBuf,
    },
    Snapshot {
        dir: PathBuf,
        snap: String,
    },
    Revert {
        dir: PathBuf,
        snap: String,
    },
}

impl Request {
    /// How long the operation may take on the hypervisor, before transport.
    pub fn bound(&self) -> Duration {
        match self {
            Request::Start { timeout_ms, .. } => Duration::from_millis(*timeout_ms),
            // Powerdown grace, then quit and kill (each bounded by the driver).
            Request::Stop { graceful_ms, .. } | Request::Delete { graceful_ms, .. } => {
                Duration::from_millis(*graceful_ms) + Duration::from_secs(15)
            }
            Request::Observe { .. } | Request::RunningPid { .. } => Duration::from_secs(10),
            // qemu-img and QMP calls, each bounded at 60 s by the driver.
            Request::CreateDisk { .. }
            | Request::GrowDisk { .. }
            | Request::Snapshots { .. }
            | Request::Snapshot { .. }
            | Request::Revert { .. } => Duration::from_secs(125),
        }
    }
}

/// What an agent run prints: `{"ok": RESULT}` or `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Reply {
    Ok(Value),
    Error(ReplyError),
}

/// A failed operation, as the controller needs it: the whole error chain as
/// one message, and whether retrying can help.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplyError {
    pub message: String,
    pub transient: bool,
}

fn ok<T: Serialize>(value: &T) -> Reply {
    Reply::Ok(serde_json::to_value(value).unwrap_or(Value::Null))
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn failed(error: &VmError) -> Reply {
    Reply::Error(ReplyError {
        message: chain(error),
        transient: error.is_transient(),
    })
}

fn reply<T: Serialize>(result: Result<T, VmError>) -> Reply {
    match result {
        Ok(value) => ok(&value),
        Err(error) => failed(&error),
    }
}

/// Runs `request` on this host. Paths in the spec are used as they are
/// (the controller made them absolute), so the root is `/`.
pub async fn execute(request: Request) -> Reply {
    let root = Path::new("/");
    match request {
        Request::Observe { dir, disks } => ok(&super::observe::observe(&dir, &disks).await),
        Request::CreateDisk { dir, disk, backing } => {
            reply(super::disk::create_disk(&dir, &disk, backing.as_deref()).await)
        }
        Request::GrowDisk {
            dir,
            disk,
            size,
            online,
        } => reply(if online {
            super::disk::grow_disk_online(&dir, &disk, size).await
        } else {
            super::disk::grow_disk(&dir, &disk, size).await
        }),
        Request::Start {
            dir,
            name,
            mut spec,
            launch_identity,
            timeout_ms,
        } => reply({
            // This host is the hypervisor the spec names.
            spec.host = crate::spec::At::unplaced(crate::spec::VmHost::Local);
            super::lifecycle::start(
                &dir,
                &name,
                &spec,
                &launch_identity,
                root,
                Duration::from_millis(timeout_ms),
            )
            .await
        }),
        Request::Stop { dir, graceful_ms } => {
            reply(super::lifecycle::stop(&dir, Duration::from_millis(graceful_ms)).await)
        }
        Request::Delete {
            dir,
            on_delete,
            graceful_ms,
        } => reply(
            super::lifecycle::delete(&dir, on_delete, Duration::from_millis(graceful_ms)).await,
        ),
        Request::RunningPid { dir } => ok(&super::observe::running_pid(&dir).await),
        Request::Snapshots { dir } => reply(super::snapshot::snapshots(&dir).await),
        Request::Snapshot { dir, snap } => reply(super::snapshot::snapshot(&dir, &snap).await),
        Request::Revert { dir, snap } => reply(super::snapshot::revert(&dir, &snap).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmHost;
    use crate::spec::fields::SpecPath;

    fn spec() -> VmSpec {
        let yaml = "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {name: v}\nspec:\n  host: hyper\n  cpus: 2\n  memory: 96MiB\n  disks: [{name: root, size: 1GiB, backingImage: images/base.qcow2}]\n  network: {mode: user, forwards: [{host: 2222, guest: 22}]}\n  boot: {kernel: /boot/vmlinuz, append: console=ttyS0}\n  extraArgs: [-nodefaults]\n  onDelete: delete\n";
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("v.yaml"), yaml).expect("write");
        std::fs::write(
            dir.path().join("hyper.yaml"),
            "apiVersion: converge/v1\nkind: Machine\nmetadata: {name: hyper}\nspec:\n  target: {local: true}\n  build: {command: [./build.sh]}\n",
        )
        .expect("write");
        let (assembled, _) = crate::source::Source::new(dir.path()).load().expect("load");
        let desired = assembled.desired.expect("valid");
        let name = crate::spec::Name::new("v").expect("name");
        desired.vms[&name].spec.clone()
    }

    #[test]
    fn every_request_survives_its_json_round_trip() {
        let spec = spec();
        assert_eq!(
            spec.host.value,
            VmHost::Machine(crate::spec::Name::new("hyper").expect("name"))
        );
        let dir = PathBuf::from("/var/lib/converge/vms/v");
        let requests = vec![
            Request::Observe {
                dir: dir.clone(),
                disks: spec.disks.clone(),
            },
            Request::CreateDisk {
                dir: dir.clone(),
                disk: spec.disks[0].clone(),
                backing: Some(PathBuf::from("/var/lib/converge/vm-files/abc-base.qcow2")),
            },
            Request::GrowDisk {
                dir: dir.clone(),
                disk: "root".into(),
                size: spec.disks[0].size.value,
                online: true,
            },
            Request::Start {
                dir: dir.clone(),
                name: "v".into(),
                spec: Box::new(spec.clone()),
                launch_identity: "id".into(),
                timeout_ms: 5000,
            },
            Request::Stop {
                dir: dir.clone(),
                graceful_ms: 30_000,
            },
            Request::Delete {
                dir: dir.clone(),
                on_delete: OnDelete::Delete,
                graceful_ms: 1,
            },
            Request::Snapshot {
                dir: dir.clone(),
                snap: "s1".into(),
            },
            Request::Revert {
                dir: dir.clone(),
                snap: "s1".into(),
            },
            Request::Snapshots { dir: dir.clone() },
            Request::RunningPid { dir: dir.clone() },
        ];
        for request in requests {
            let text = serde_json::to_string(&request).expect("serialize");
            let back: Request = serde_json::from_str(&text).expect("deserialize");
            assert_eq!(back, request, "{text}");
        }
        let Request::Start { spec: back, .. } = serde_json::from_str::<Request>(
            &serde_json::to_string(&Request::Start {
                dir,
                name: "v".into(),
                spec: Box::new(spec.clone()),
                launch_identity: "id".into(),
                timeout_ms: 1,
            })
            .expect("serialize"),
        )
        .expect("deserialize") else {
            panic!("not a start");
        };
        // The spec the agent launches is the spec the controller sent.
        assert_eq!(
            super::super::launch::argv(&back, "v", Path::new("/d"), Path::new("/")),
            super::super::launch::argv(&spec, "v", Path::new("/d"), Path::new("/"))
        );
        assert_eq!(
            back.boot.as_ref().map(|b| b.kernel.value.clone()),
            Some(SpecPath::new("/boot/vmlinuz").expect("path"))
        );
    }

    #[tokio::test]
    async fn an_operation_error_is_a_reply_with_its_chain_and_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reply = execute(Request::GrowDisk {
            dir: dir.path().to_path_buf(),
            disk: "root".into(),
            size: spec().disks[0].size.value,
            online: false,
        })
        .await;
        let Reply::Error(error) = reply else {
            panic!("growing a missing disk fails: {reply:?}");
        };
        assert!(
            error.message.contains("does not exist"),
            "{}",
            error.message
        );
        assert!(!error.transient);
        let observed = execute(Request::Observe {
            dir: dir.path().to_path_buf(),
            disks: vec![],
        })
        .await;
        let Reply::Ok(value) = observed else {
            panic!("observe never fails: {observed:?}");
        };
        let facts: VmFacts = serde_json::from_value(value).expect("facts");
        // A unit result is a reply too, and it reads back as one.
        let text = serde_json::to_string(&ok(&())).expect("serialize");
        assert_eq!(text, r#"{"ok":null}"#);
        let Reply::Ok(unit) = serde_json::from_str::<Reply>(&text).expect("parse") else {
            panic!("{text} is not ok");
        };
        serde_json::from_value::<()>(unit).expect("unit");
        assert!(!facts.running);
    }
}
