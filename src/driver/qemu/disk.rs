//! A VM's disks: `qemu-img create` (copy-on-write on a backing image when
//! asked), and growing a disk, online through QMP `block_resize` when the VM
//! runs, else with `qemu-img resize`. It must never overwrite an existing
//! disk or shrink one: both are refused with an error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::error::{VmError, io_err};
use super::facts::DiskGrowth;
use super::launch::{VmPaths, drive_id};
use super::lifecycle::remove_if_present;
use super::monitor::{QMP_TIMEOUT, connect};
use super::observe::{absolute, qcow2_virtual_size, running_pid};
use super::process;
use crate::spec::{ByteSize, Disk};

pub(super) const QEMU_IMG: &str = "qemu-img";
/// Bound on one `qemu-img` run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn argv_of(parts: &[&str], path: &Path) -> Vec<String> {
    let mut v: Vec<String> = parts.iter().map(|s| (*s).to_owned()).collect();
    v.push(path.to_string_lossy().into_owned());
    v
}

pub(super) async fn qemu_img(
    op: &'static str,
    path: &Path,
    argv: &[String],
) -> Result<Vec<u8>, VmError> {
    process::run(argv, TOOL_TIMEOUT)
        .await
        .map_err(|source| VmError::Tool {
            op,
            path: path.to_path_buf(),
            source,
        })
}

/// `qemu-img info` of an image, as JSON. `-U` lets it read images that a
/// running QEMU holds.
pub(super) async fn image_info(path: &Path) -> Result<Value, VmError> {
    let out = qemu_img(
        "inspect image",
        path,
        &argv_of(&[QEMU_IMG, "info", "-U", "--output=json"], path),
    )
    .await?;
    serde_json::from_slice(&out).map_err(|e| VmError::BadImage {
        path: path.to_path_buf(),
        detail: format!("qemu-img info printed invalid JSON ({e})"),
    })
}

/// Creates `disks/<disk>.qcow2` of the disk's size, copy-on-write on
/// `backing` when given (its format detected by `qemu-img info`, its path
/// recorded absolute). Never overwrites: an existing disk is
/// [`VmError::DiskExists`], also when another creator wins a race, because
/// the image is built under a temporary name and hard-linked into place.
pub async fn create_disk(dir: &Path, disk: &Disk, backing: Option<&Path>) -> Result<(), VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let name = disk.name.as_str();
    let path = paths.disk(name);
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Err(VmError::DiskExists { path });
    }
    tokio::fs::create_dir_all(&paths.disks)
        .await
        .map_err(io_err("create directory", &paths.disks))?;
    let tmp = paths.disks.join(format!(".{name}.qcow2.creating"));
    remove_if_present(&tmp).await?;
    let mut argv: Vec<String> = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
        .map(str::to_owned)
        .to_vec();
    if let Some(backing) = backing {
        let backing = absolute(backing);
        if !tokio::fs::try_exists(&backing).await.unwrap_or(false) {
            return Err(VmError::BackingMissing {
                disk: name.to_owned(),
                path: backing,
            });
        }
        let info = image_info(&backing).await?;
        let Some(format) = info["format"].as_str() else {
            return Err(VmError::BadImage {
                path: backing,
                detail: "qemu-img info names no format".to_owned(),
            });
        };
        argv.extend([
            "-b".to_owned(),
            backing.to_string_lossy().into_owned(),
            "-F".to_owned(),
            format.to_owned(),
        ]);
    }
    argv.push(tmp.to_string_lossy().into_owned());
    argv.push(disk.size.bytes().to_string());
    let created = qemu_img("create disk", &path, &argv).await;
    let linked = match created {
        Ok(_) => tokio::fs::hard_link(&tmp, &path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                VmError::DiskExists { path: path.clone() }
            } else {
                io_err("create disk", &path)(e)
            }
        }),
        Err(e) => Err(e),
    };
    remove_if_present(&tmp).await?;
    linked
}

/// Grows `disks/<disk>.qcow2` to `new_size`: online with QMP `block_resize`
/// when the VM runs (no restart needed), else with `qemu-img resize`. The
/// same size is a no-op; a smaller one is [`VmError::ShrinkRefused`].
pub async fn grow_disk(dir: &Path, disk: &str, new_size: ByteSize) -> Result<DiskGrowth, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let path = paths.disk(disk);
    let from = current_size(&path).await?;
    let to = new_size.bytes();
    if to <= from {
        return refuse_shrink(path, from, to);
    }
    if running_pid(&paths.dir).await.is_some() {
        return grow_disk_online(&paths.dir, disk, new_size).await;
    }
    qemu_img(
        "resize disk",
        &path,
        &[
            QEMU_IMG.to_owned(),
            "resize".to_owned(),
            "-q".to_owned(),
            "-f".to_owned(),
            "qcow2".to_owned(),
            path.to_string_lossy().into_owned(),
            to.to_string(),
        ],
    )
    .await?;
    Ok(DiskGrowth {
        from,
        to,
        online: false,
    })
}

/// Grows a disk of the running VM through QMP `block_resize` on its drive
/// ([`drive_id`]); the guest sees the new size at once. Same rules as
/// [`grow_disk`] for equal and smaller sizes.
pub async fn grow_disk_online(
    dir: &Path,
    disk: &str,
    new_size: ByteSize,
) -> Result<DiskGrowth, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let path = paths.disk(disk);
    let from = current_size(&path).await?;
    let to = new_size.bytes();
    if to <= from {
        return refuse_shrink(path, from, to);
    }
    let op = "resize a disk online";
    let mut qmp = connect(&paths, QMP_TIMEOUT, op).await?;
    qmp.execute(
        "block_resize",
        Some(json!({ "device": drive_id(disk), "size": to })),
    )
    .await
    .map_err(|source| VmError::Qmp {
        op,
        dir: paths.dir.clone(),
        source,
    })?;
    Ok(DiskGrowth {
        from,
        to,
        online: true,
    })
}

async fn current_size(path: &Path) -> Result<u64, VmError> {
    if !tokio::fs::try_exists(path).await.unwrap_or(false) {
        return Err(VmError::NoSuchDisk {
            path: path.to_path_buf(),
        });
    }
    qcow2_virtual_size(path).await
}

fn refuse_shrink(path: PathBuf, from: u64, to: u64) -> Result<DiskGrowth, VmError> {
    if to == from {
        Ok(DiskGrowth {
            from,
            to,
            online: false,
        })
    } else {
        Err(VmError::ShrinkRefused { path, from, to })
    }
}
