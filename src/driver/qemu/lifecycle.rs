//! Starting, stopping and deleting a VM's QEMU. Start writes the launch
//! record, spawns QEMU daemonized (it outlives the controller) and waits for
//! its monitor; stop escalates from ACPI powerdown to QMP `quit` to SIGKILL;
//! delete stops and removes the directory, its disks kept or not. It must
//! not signal a process that is not provably this directory's QEMU, and
//! must not leave a QEMU it started behind when starting fails.

use std::path::Path;
use std::time::{Duration, Instant};

use super::error::{VmError, io_err};
use super::facts::{LAUNCH_RECORD_VERSION, LaunchRecord, Started, StopOutcome, now_ms};
use super::launch::{self, VmPaths};
use super::monitor::status_of;
use super::observe::{absolute, running_pid};
use super::preflight::preflight;
use super::process;
use super::qmp::{Qmp, QmpError};
use crate::spec::{OnDelete, VmSpec};

/// How long `quit`, then SIGKILL, may take to make QEMU exit.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How often start retries connecting to a new QEMU's monitor.
const READY_POLL: Duration = Duration::from_millis(5);

pub(super) async fn remove_if_present(path: &Path) -> Result<(), VmError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

async fn write_launch_record(paths: &VmPaths, record: &LaunchRecord) -> Result<(), VmError> {
    let tmp = paths.dir.join(".launch.json.tmp");
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| VmError::Io {
        op: "encode",
        path: paths.launch_record.clone(),
        source: e.into(),
    })?;
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(io_err("write", &tmp))?;
    tokio::fs::rename(&tmp, &paths.launch_record)
        .await
        .map_err(io_err("write", &paths.launch_record))
}

/// Starts `spec` as VM `vm` in `dir` and waits, within `timeout`, until its
/// monitor answers. Preflight failures (a taken forward port, a missing
/// bridge, kernel, initrd or disk, memory beyond MemTotal, an unusable
/// directory) are terminal and leave nothing started or written. Then
/// `launch.json` is written, QEMU is spawned daemonized (it survives the
/// controller) and polled over QMP. On any later failure the new QEMU is
/// killed by its pidfile; a launch failure carries the tail of QEMU's stderr.
/// Existing disks are used as they are: create them first.
pub async fn start(
    dir: &Path,
    vm: &str,
    spec: &VmSpec,
    spec_hash: &str,
    root: &Path,
    timeout: Duration,
) -> Result<Started, VmError> {
    let began = Instant::now();
    let paths = VmPaths::new(&absolute(dir));
    preflight(spec, vm, &paths, root).await?;
    tokio::fs::create_dir_all(&paths.dir)
        .await
        .map_err(io_err("create directory", &paths.dir))?;
    remove_if_present(&paths.pidfile).await?;
    remove_if_present(&paths.qmp_socket).await?;
    let argv = launch::argv(spec, vm, &paths.dir, root);
    let record = LaunchRecord {
        version: LAUNCH_RECORD_VERSION,
        spec_hash: spec_hash.to_owned(),
        argv: argv.clone(),
        started_ms: now_ms(),
    };
    write_launch_record(&paths, &record).await?;
    tracing::info!(target: "converge::qemu", vm, dir = %paths.dir.display(), "starting qemu");
    if let Err(source) = process::run_daemonizing(&argv, timeout).await {
        kill_leftover(&paths).await;
        return Err(VmError::Launch {
            vm: vm.to_owned(),
            source,
        });
    }
    let deadline = began + timeout;
    let mut qmp = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match Qmp::connect(&paths.qmp_socket, left.max(Duration::from_millis(1))).await {
            Ok(qmp) => break qmp,
            Err(source) if Instant::now() >= deadline || !source.is_transient() => {
                kill_leftover(&paths).await;
                return Err(VmError::NotReady {
                    vm: vm.to_owned(),
                    after: timeout,
                    source,
                });
            }
            Err(_) => tokio::time::sleep(READY_POLL).await,
        }
    };
    // The VM is up at this point; a status that cannot be read must not turn
    // into an error that makes the caller start it a second time.
    let status = status_of(&mut qmp, &paths)
        .await
        .unwrap_or_else(|_| "unknown".to_owned());
    let ready_after = began.elapsed();
    let pid = match running_pid(&paths.dir).await {
        Some(pid) => pid,
        None => {
            return Err(VmError::NotReady {
                vm: vm.to_owned(),
                after: timeout,
                source: QmpError::Closed {
                    path: paths.qmp_socket.clone(),
                },
            });
        }
    };
    Ok(Started {
        pid,
        status,
        ready_after,
    })
}

/// Kills whatever QEMU this directory's pidfile names, if it is ours.
async fn kill_leftover(paths: &VmPaths) {
    if let Some(pid) = running_pid(&paths.dir).await {
        if let Err(e) = process::kill9(pid).await {
            tracing::warn!(target: "converge::qemu", pid, error = %e, "cannot kill leftover qemu");
        }
        process::wait_exit(pid, EXIT_WAIT).await;
    }
}

/// Stops the VM: ACPI `system_powerdown` and up to `graceful_timeout` for the
/// guest to power off (zero skips it), then QMP `quit`, then SIGKILL by pid
/// (checked to still be this directory's QEMU). Idempotent: nothing running
/// is [`StopOutcome::NotRunning`]. Leaves no pidfile or socket behind.
pub async fn stop(dir: &Path, graceful_timeout: Duration) -> Result<StopOutcome, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let Some(pid) = running_pid(&paths.dir).await else {
        remove_if_present(&paths.pidfile).await?;
        remove_if_present(&paths.qmp_socket).await?;
        return Ok(StopOutcome::NotRunning);
    };
    let outcome = stop_pid(&paths, pid, graceful_timeout).await?;
    remove_if_present(&paths.pidfile).await?;
    remove_if_present(&paths.qmp_socket).await?;
    Ok(outcome)
}

async fn stop_pid(paths: &VmPaths, pid: u32, graceful: Duration) -> Result<StopOutcome, VmError> {
    match Qmp::connect(&paths.qmp_socket, Duration::from_secs(2)).await {
        Ok(mut qmp) => {
            qmp.set_timeout(Duration::from_secs(2));
            if !graceful.is_zero()
                && qmp.execute("system_powerdown", None).await.is_ok()
                && process::wait_exit(pid, graceful).await
            {
                return Ok(StopOutcome::PoweredDown);
            }
            // QEMU may close the socket before or after replying to `quit`.
            let _ = qmp.execute("quit", None).await;
            if process::wait_exit(pid, EXIT_WAIT).await {
                return Ok(StopOutcome::Quit);
            }
        }
        Err(e) => {
            tracing::warn!(target: "converge::qemu", pid, error = %e, "no monitor: killing qemu");
        }
    }
    // Only kill what is still provably this directory's QEMU.
    if running_pid(&paths.dir).await != Some(pid) {
        return Ok(StopOutcome::Quit);
    }
    process::kill9(pid).await.map_err(|source| VmError::Tool {
        op: "kill the QEMU of",
        path: paths.dir.clone(),
        source,
    })?;
    if process::wait_exit(pid, EXIT_WAIT).await {
        Ok(StopOutcome::Killed)
    } else {
        Err(VmError::StillAlive {
            dir: paths.dir.clone(),
            pid,
        })
    }
}

/// Stops the VM, then removes its directory: all of it with
/// [`OnDelete::Delete`], everything but `disks/` with [`OnDelete::KeepDisks`].
/// Idempotent: a missing directory is already deleted.
pub async fn delete(
    dir: &Path,
    on_delete: OnDelete,
    graceful_timeout: Duration,
) -> Result<StopOutcome, VmError> {
    let paths = VmPaths::new(&absolute(dir));
    let outcome = stop(&paths.dir, graceful_timeout).await?;
    match on_delete {
        OnDelete::Delete => match tokio::fs::remove_dir_all(&paths.dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("remove", &paths.dir)(e));
            }
            _ => {}
        },
        OnDelete::KeepDisks => {
            let Ok(mut entries) = tokio::fs::read_dir(&paths.dir).await else {
                return Ok(outcome);
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(io_err("list", &paths.dir))?
            {
                let path = entry.path();
                if path == paths.disks {
                    continue;
                }
                let removed = if entry.file_type().await.is_ok_and(|t| t.is_dir()) {
                    tokio::fs::remove_dir_all(&path).await
                } else {
                    tokio::fs::remove_file(&path).await
                };
                removed.map_err(io_err("remove", &path))?;
            }
        }
    }
    Ok(outcome)
}
