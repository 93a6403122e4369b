//! Observing a VM's directory: whether its QEMU runs (a pid that is provably
//! this directory's QEMU, never a reused one), the monitor's status, the
//! launch record, and the disks with their sizes read from the qcow2 header;
//! also [`absolute`], the form of the directory every operation works on.
//! Other operations use these to look before they act. It must not change
//! anything (no file written, no process signalled), and [`observe`] never
//! fails: what cannot be read is `None`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::error::{VmError, io_err};
use super::facts::{DiskFacts, LaunchRecord, VmFacts, now_ms};
use super::launch::VmPaths;
use super::monitor::{OBSERVE_QMP_TIMEOUT, query_status};
use super::process;
use crate::spec::Disk;

/// `dir` made absolute (lexically, without resolving symlinks).
pub(super) fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The pid of this directory's QEMU, when one is alive: the pidfile's pid
/// exists, is not a zombie, and is a `qemu-system-*` whose `-pidfile` is this
/// directory's (so a reused pid is never mistaken for the VM).
pub async fn running_pid(dir: &Path) -> Option<u32> {
    let paths = VmPaths::new(&absolute(dir));
    let pid = process::read_pidfile(&paths.pidfile).await?;
    let info = process::proc_info(pid).await?;
    process::is_qemu_with_pidfile(&info, &paths.pidfile).then_some(pid)
}

/// Observes the VM in `dir`; `disks` are the spec's disks, reported in order
/// whether or not they exist. Never fails: what cannot be read is `None`.
pub async fn observe(dir: &Path, disks: &[Disk]) -> VmFacts {
    let paths = VmPaths::new(&absolute(dir));
    let pid = running_pid(&paths.dir).await;
    let (qmp_status, launched) = if pid.is_some() {
        let status = match query_status(&paths, OBSERVE_QMP_TIMEOUT).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(target: "converge::qemu", dir = %paths.dir.display(), error = %e, "qmp status unknown");
                None
            }
        };
        (status, read_launch_record(&paths).await)
    } else {
        (None, None)
    };
    let mut facts = Vec::new();
    let mut named = BTreeSet::new();
    for disk in disks {
        let name = disk.name.as_str().to_owned();
        facts.push(disk_facts(&paths, &name).await);
        named.insert(name);
    }
    for name in disk_names(&paths).await {
        if !named.contains(&name) {
            facts.push(disk_facts(&paths, &name).await);
        }
    }
    VmFacts {
        running: pid.is_some(),
        pid,
        qmp_status,
        started_spec_hash: launched.as_ref().map(|r| r.spec_hash.clone()),
        started_ms: launched.as_ref().map(|r| r.started_ms),
        uptime_ms: launched.map(|r| now_ms().saturating_sub(r.started_ms)),
        disks: facts,
        observed_ms: now_ms(),
    }
}

async fn disk_facts(paths: &VmPaths, name: &str) -> DiskFacts {
    let path = paths.disk(name);
    let exists = tokio::fs::try_exists(&path).await.unwrap_or(false);
    let virtual_size = if exists {
        qcow2_virtual_size(&path).await.ok()
    } else {
        None
    };
    DiskFacts {
        name: name.to_owned(),
        exists,
        virtual_size,
    }
}

/// The disks present in `disks/`, by name, sorted. Files being created
/// (dot-prefixed) are skipped.
pub(super) async fn disk_names(paths: &VmPaths) -> Vec<String> {
    let mut names = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(&paths.disks).await else {
        return names;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".qcow2")
            && !name.starts_with('.')
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    names
}

/// Reads a qcow2 image's virtual size from its header.
pub async fn qcow2_virtual_size(path: &Path) -> Result<u64, VmError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(io_err("open disk", path))?;
    let mut header = [0u8; 32];
    file.read_exact(&mut header)
        .await
        .map_err(io_err("read the header of", path))?;
    if header[..4] != *b"QFI\xfb" {
        return Err(VmError::BadImage {
            path: path.to_path_buf(),
            detail: "not a qcow2 image (bad magic)".to_owned(),
        });
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&header[24..32]);
    Ok(u64::from_be_bytes(size))
}

async fn read_launch_record(paths: &VmPaths) -> Option<LaunchRecord> {
    let bytes = tokio::fs::read(&paths.launch_record).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}
