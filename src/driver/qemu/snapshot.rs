//! Internal qcow2 snapshots of a VM's disks: listing them merged by name,
//! taking one (with RAM and devices through HMP `savevm` when running, of
//! the disks alone when stopped) and reverting to one. It must not replace
//! an existing snapshot, revert to one that some disk lacks, or leave a
//! running VM paused when `loadvm` fails.

use std::path::Path;

use serde_json::Value;

use super::disk::{QEMU_IMG, argv_of, image_info, qemu_img};
use super::error::VmError;
use super::facts::SnapshotInfo;
use super::launch::VmPaths;
use super::monitor::{QMP_TIMEOUT, connect, status_of};
use super::observe::{absolute, disk_names, running_pid};

/// Snapshot names go into an HMP command line and must not be mistaken for
/// snapshot ids, which are numbers.
pub fn check_snapshot_name(snap: &str) -> Result<(), VmError> {
    let ok = !snap.is_empty()
        && snap.len() <= 64
        && snap
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !snap.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(VmError::SnapshotName {
            snap: snap.to_owned(),
        })
    }
}

/// Lists internal snapshots, merged by name over the VM's disks: from QMP
/// `query-block` when running, from `qemu-img info` otherwise.
pub async fn snapshots(dir: &Path) -> Result<Vec<SnapshotInfo>, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let mut per_disk: Vec<(String, Value)> = Vec::new();
    if running_pid(&paths.dir).await.is_some() {
        let op = "list snapshots";
        let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
        let blocks = qmp
            .execute("query-block", None)
            .await
            .map_err(|source| VmError::Qmp {
                op,
                dir: paths.dir.clone(),
                source,
            })?;
        for block in blocks.as_array().into_iter().flatten() {
            let device = block["device"].as_str().unwrap_or_default();
            if let Some(disk) = device.strip_prefix("disk-") {
                per_disk.push((
                    disk.to_owned(),
                    block["inserted"]["image"]["snapshots"].clone(),
                ));
            }
        }
    } else {
        for disk in disk_names(&paths).await {
            let info = image_info(&paths.disk(&disk)).await?;
            per_disk.push((disk, info["snapshots"].clone()));
        }
    }
    per_disk.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged: Vec<SnapshotInfo> = Vec::new();
    for (disk, list) in per_disk {
        for snap in list.as_array().into_iter().flatten() {
            let name = snap["name"].as_str().unwrap_or_default().to_owned();
            let vm_state_size = snap["vm-state-size"].as_u64().unwrap_or(0);
            let date_sec = snap["date-sec"].as_u64().unwrap_or(0);
            match merged.iter_mut().find(|s| s.name == name) {
                Some(seen) => {
                    seen.disks.push(disk.clone());
                    seen.vm_state_size = seen.vm_state_size.max(vm_state_size);
                }
                None => merged.push(SnapshotInfo {
                    name,
                    disks: vec![disk.clone()],
                    vm_state_size,
                    date_sec,
                }),
            }
        }
    }
    Ok(merged)
}

/// Takes snapshot `snap` of every disk: with RAM and device state via HMP
/// `savevm` when running, disk-only via `qemu-img snapshot -c` when stopped.
/// An existing name is refused rather than replaced.
pub async fn snapshot(dir: &Path, snap: &str) -> Result<(), VmError> {
    check_snapshot_name(snap)?;
    let paths = VmPaths::new(&absolute(dir));
    if snapshots(&paths.dir).await?.iter().any(|s| s.name == snap) {
        return Err(VmError::SnapshotExists {
            snap: snap.to_owned(),
        });
    }
    let disks = disk_names(&paths).await;
    if disks.is_empty() {
        return Err(VmError::NoDisks {
            dir: paths.dir.clone(),
        });
    }
    if running_pid(&paths.dir).await.is_some() {
        let op = "save a snapshot";
        let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
        qmp.human(&format!("savevm {snap}"))
            .await
            .map_err(|source| VmError::Qmp {
                op,
                dir: paths.dir.clone(),
                source,
            })?;
        return Ok(());
    }
    for disk in disks {
        let path = paths.disk(&disk);
        qemu_img(
            "snapshot disk",
            &path,
            &argv_of(&[QEMU_IMG, "snapshot", "-c", snap], &path),
        )
        .await?;
    }
    Ok(())
}

/// Reverts every disk (and, when running, RAM and devices via HMP `loadvm`)
/// to snapshot `snap`, which must exist on every disk. A running VM that
/// `loadvm` fails on is resumed rather than left paused.
pub async fn revert(dir: &Path, snap: &str) -> Result<(), VmError> {
    check_snapshot_name(snap)?;
    let paths = VmPaths::new(&absolute(dir));
    let disks = disk_names(&paths).await;
    let holding = snapshots(&paths.dir)
        .await?
        .into_iter()
        .find(|s| s.name == snap)
        .map(|s| s.disks)
        .unwrap_or_default();
    let missing: Vec<String> = disks
        .iter()
        .filter(|d| !holding.contains(d))
        .cloned()
        .collect();
    if disks.is_empty() || !missing.is_empty() {
        return Err(VmError::SnapshotMissing {
            snap: snap.to_owned(),
            missing,
        });
    }
    if running_pid(&paths.dir).await.is_some() {
        let op = "load a snapshot";
        let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
        let was = status_of(&mut qmp, &paths).await?;
        if let Err(source) = qmp.human(&format!("loadvm {snap}")).await {
            // loadvm stops the guest first and leaves it stopped on failure.
            if was == "running" {
                let _ = qmp.execute("cont", None).await;
            }
            return Err(VmError::Qmp {
                op,
                dir: paths.dir.clone(),
                source,
            });
        }
        return Ok(());
    }
    for disk in disks {
        let path = paths.disk(&disk);
        qemu_img(
            "revert disk",
            &path,
            &argv_of(&[QEMU_IMG, "snapshot", "-a", snap], &path),
        )
        .await?;
    }
    Ok(())
}
