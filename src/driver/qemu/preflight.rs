//! The checks before a VM starts: everything that would make `start` fail
//! for reasons of spec or host (a remote host, an unusable or too long
//! directory path, a QEMU already running, memory beyond MemTotal, missing
//! boot files, disks or bridge, a taken forward port), each a terminal
//! [`VmError`]. It must not write or start anything; a forward port is only
//! bound for a moment and released.

use std::path::Path;

use super::error::VmError;
use super::launch::VmPaths;
use super::observe::running_pid;
use super::qmp;
use crate::spec::{ByteSize, NetworkMode, Protocol, VmHost, VmSpec};

/// Checks everything that would make `start` fail for reasons of spec or
/// host, before anything is written or started.
pub(super) async fn preflight(
    spec: &VmSpec,
    vm: &str,
    paths: &VmPaths,
    root: &Path,
) -> Result<(), VmError> {
    if let VmHost::Machine(host) = &spec.host.value {
        return Err(VmError::NotLocal {
            vm: vm.to_owned(),
            host: host.as_str().to_owned(),
        });
    }
    let Some(dir_text) = paths.dir.to_str() else {
        return Err(VmError::UnusableDir {
            dir: paths.dir.clone(),
            reason: "its path is not UTF-8",
        });
    };
    if dir_text.contains(',') {
        // QEMU option strings (`file=...,if=virtio`) separate with commas.
        return Err(VmError::UnusableDir {
            dir: paths.dir.clone(),
            reason: "its path contains a comma, which QEMU options cannot hold",
        });
    }
    let len = paths.qmp_socket.as_os_str().len();
    if len > qmp::MAX_SOCKET_PATH {
        return Err(VmError::SocketPathTooLong {
            path: paths.qmp_socket.clone(),
            len,
        });
    }
    if let Some(pid) = running_pid(&paths.dir).await {
        return Err(VmError::AlreadyRunning {
            vm: vm.to_owned(),
            pid,
        });
    }
    if let Some(total) = host_mem_total().await
        && spec.memory.bytes() > total
    {
        return Err(VmError::MemoryTooLarge {
            vm: vm.to_owned(),
            requested: spec.memory.value,
            host_total: ByteSize::from_bytes(total),
        });
    }
    if let Some(boot) = &spec.boot {
        let mut files = vec![("kernel", &boot.kernel)];
        if let Some(initrd) = &boot.initrd {
            files.push(("initrd", initrd));
        }
        for (what, file) in files {
            let Some(path) = file.resolve(root) else {
                return Err(VmError::PathOutsideRoot {
                    what,
                    path: file.as_str().to_owned(),
                });
            };
            if !tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()) {
                return Err(VmError::BootFileMissing {
                    vm: vm.to_owned(),
                    what,
                    path,
                });
            }
        }
    }
    for disk in &spec.disks {
        let path = paths.disk(disk.name.as_str());
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Err(VmError::DiskMissing {
                vm: vm.to_owned(),
                disk: disk.name.as_str().to_owned(),
                path,
            });
        }
    }
    match spec.network.mode.value {
        NetworkMode::Bridge => {
            let bridge = spec.network.bridge.as_ref().map_or("", |b| b.as_str());
            let problem = if bridge.is_empty() {
                Some("is not named")
            } else {
                let sys = Path::new("/sys/class/net").join(bridge);
                if !tokio::fs::try_exists(&sys).await.unwrap_or(false) {
                    Some("does not exist")
                } else if !tokio::fs::try_exists(sys.join("bridge"))
                    .await
                    .unwrap_or(false)
                {
                    Some("is a network interface but not a bridge")
                } else {
                    None
                }
            };
            if let Some(problem) = problem {
                return Err(VmError::Bridge {
                    vm: vm.to_owned(),
                    bridge: bridge.to_owned(),
                    problem,
                });
            }
        }
        NetworkMode::User => {
            for fwd in &spec.network.forwards {
                probe_port(vm, fwd.host.get(), fwd.protocol).await?;
            }
        }
    }
    Ok(())
}

/// Binds the port on all addresses as slirp will, then releases it.
async fn probe_port(vm: &str, port: u16, protocol: Protocol) -> Result<(), VmError> {
    let addr = (std::net::Ipv4Addr::UNSPECIFIED, port);
    let (bound, name) = match protocol {
        Protocol::Tcp => (tokio::net::TcpListener::bind(addr).await.map(drop), "tcp"),
        Protocol::Udp => (tokio::net::UdpSocket::bind(addr).await.map(drop), "udp"),
    };
    bound.map_err(|source| VmError::PortTaken {
        vm: vm.to_owned(),
        port,
        protocol: name,
        source,
    })
}

/// The host's MemTotal in bytes, when /proc/meminfo says.
async fn host_mem_total() -> Option<u64> {
    let text = tokio::fs::read_to_string("/proc/meminfo").await.ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}
