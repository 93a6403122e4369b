//! What a VM is launched with: the layout of its directory, the
//! `qemu-system-x86_64` argv a spec turns into, and which spec changes need
//! the running process to be replaced.
//!
//! Everything here is pure: it computes paths and vectors of strings and does
//! no IO (paths are not checked for existence; [`super::start`] does that in
//! its preflight). It must not spawn, read files or decide *when* to restart:
//! it only says *why* a restart would be needed.

use std::path::{Path, PathBuf};

use crate::spec::fields::SpecPath;
use crate::spec::{NetworkMode, Protocol, VmSpec};

/// The emulator binary; looked up in `PATH`.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";

/// Where one VM keeps its files. Every path derives from `dir`, which should
/// be absolute: QEMU's `-daemonize` changes its working directory to `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
    /// `disks/`, holding `<disk>.qcow2` files.
    pub disks: PathBuf,
    /// `qemu.pid`, written by QEMU after it daemonized, removed when it exits.
    pub pidfile: PathBuf,
    /// `qmp.sock`, the monitor socket.
    pub qmp_socket: PathBuf,
    /// `serial.log`, everything the guest's first serial port wrote since
    /// the last start (truncated on each start).
    pub serial_log: PathBuf,
    /// `console.sock`, the first serial port (`converge vm console`).
    pub console_socket: PathBuf,
    /// `launch.json`, the spec hash and argv of the last start.
    pub launch_record: PathBuf,
}

impl VmPaths {
    pub fn new(dir: &Path) -> VmPaths {
        VmPaths {
            dir: dir.to_path_buf(),
            disks: dir.join("disks"),
            pidfile: dir.join("qemu.pid"),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            console_socket: dir.join("console.sock"),
            launch_record: dir.join("launch.json"),
        }
    }

    /// The qcow2 file of the disk named `disk` (a validated DNS label).
    pub fn disk(&self, disk: &str) -> PathBuf {
        self.disks.join(format!("{disk}.qcow2"))
    }
}

/// The QEMU block device id of a disk, as used by `block_resize`.
pub fn drive_id(disk: &str) -> String {
    format!("disk-{disk}")
}

/// Resolves a spec path against the desired-state directory. A path that
/// climbs out of it (validation rejects those) is kept as written, so that
/// this stays total; the preflight refuses it.
pub fn resolve(path: &SpecPath, root: &Path) -> PathBuf {
    path.resolve(root)
        .unwrap_or_else(|| PathBuf::from(path.as_str()))
}

fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The full argv (program first) that launches `spec` as VM `name` in `dir`.
/// Relative spec paths resolve against `root`. The result is deterministic:
/// the same inputs give the same vector, so it can be recorded and compared.
///
/// Paths inside `dir` are embedded in QEMU option strings, where a comma
/// separates options: the preflight refuses a `dir` containing one.
/// A stable, locally administered MAC for a bridged VM, from its name in
/// QEMU's `52:54:00` range: without one every bridged VM gets QEMU's default
/// `52:54:00:12:34:56`, and two of them on one bridge collide.
pub fn mac_address(name: &str) -> String {
    let hash = blake3::hash(name.as_bytes());
    let b = hash.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

pub fn argv(spec: &VmSpec, name: &str, dir: &Path, root: &Path) -> Vec<String> {
    let paths = VmPaths::new(dir);
    let mut a: Vec<String> = [
        QEMU_SYSTEM,
        "-name",
        name,
        "-machine",
        "q35,accel=tcg",
        "-nodefaults",
        "-display",
        "none",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    a.push("-m".to_owned());
    a.push(spec.memory.mib().to_string());
    a.push("-smp".to_owned());
    a.push(spec.cpus.to_string());
    for disk in &spec.disks {
        a.push("-drive".to_owned());
        a.push(format!(
            "file={},if=virtio,format=qcow2,id={}",
            text(&paths.disk(disk.name.as_str())),
            drive_id(disk.name.as_str())
        ));
    }
    a.push("-nic".to_owned());
    a.push(match spec.network.mode.value {
        NetworkMode::User => {
            let mut nic = "user,model=virtio-net-pci".to_owned();
            for fwd in &spec.network.forwards {
                let proto = match fwd.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                };
                nic.push_str(&format!(",hostfwd={proto}::{}-:{}", fwd.host, fwd.guest));
            }
            nic
        }
        NetworkMode::Bridge => {
            let bridge = spec.network.bridge.as_ref().map_or("", |b| b.as_str());
            format!(
                "bridge,br={bridge},model=virtio-net-pci,mac={}",
                mac_address(name)
            )
        }
    });
    if let Some(boot) = &spec.boot {
        a.push("-kernel".to_owned());
        a.push(text(&resolve(&boot.kernel, root)));
        if let Some(initrd) = &boot.initrd {
            a.push("-initrd".to_owned());
            a.push(text(&resolve(initrd, root)));
        }
        if let Some(append) = &boot.append {
            a.push("-append".to_owned());
            a.push(append.value.clone());
        }
    }
    // The serial port is a socket an operator can attach to, logged to a file.
    a.push("-chardev".to_owned());
    a.push(format!(
        "socket,id=serial0,path={},server=on,wait=off,logfile={}",
        text(&paths.console_socket),
        text(&paths.serial_log)
    ));
    a.push("-serial".to_owned());
    a.push("chardev:serial0".to_owned());
    a.push("-qmp".to_owned());
    a.push(format!(
        "unix:{},server=on,wait=off",
        text(&paths.qmp_socket)
    ));
    a.push("-daemonize".to_owned());
    a.push("-pidfile".to_owned());
    a.push(text(&paths.pidfile));
    a.extend(spec.extra_args.iter().map(|x| x.value.clone()));
    a
}

/// The spec fields whose change from `old` to `new` needs the VM restarted,
/// in a fixed order, by their YAML names. Empty means the running process
/// can stay: a disk growing is applied online, and `state`, `machine` and
/// `onDelete` do not concern the process. (`host` is not here: moving a VM to
/// another hypervisor is a replacement, not a restart.)
pub fn restart_reasons(old: &VmSpec, new: &VmSpec) -> Vec<&'static str> {
    let mut reasons = Vec::new();
    if old.cpus != new.cpus {
        reasons.push("cpus");
    }
    if old.memory.mib() != new.memory.mib() {
        reasons.push("memory");
    }
    let layout = |s: &VmSpec| {
        s.disks
            .iter()
            .map(|d| {
                (
                    d.name.value.clone(),
                    d.backing_image.as_ref().map(|b| b.value.clone()),
                )
            })
            .collect::<Vec<_>>()
    };
    if layout(old) != layout(new) {
        reasons.push("disks");
    }
    if old.network != new.network {
        reasons.push("network");
    }
    if old.boot != new.boot {
        reasons.push("boot");
    }
    if old.extra_args != new.extra_args {
        reasons.push("extraArgs");
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(yaml: &str) -> VmSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn argv_lists_every_part_of_the_spec_in_a_fixed_order() {
        let s = spec(
            "memory: 256MiB\ncpus: 2\ndisks:\n  - {name: root, size: 1GiB, backingImage: images/base.qcow2}\n  - {name: data, size: 64MiB}\nnetwork:\n  forwards:\n    - {host: 2222, guest: 22}\n    - {host: 5353, guest: 53, protocol: udp}\nboot:\n  kernel: k/vmlinuz\n  initrd: /boot/initrd.img\n  append: console=ttyS0 quiet\nextraArgs: [-rtc, base=utc]\n",
        );
        let a = argv(&s, "web1", Path::new("/s/vms/web1"), Path::new("/repo"));
        let expected = [
            "qemu-system-x86_64",
            "-name",
            "web1",
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "256",
            "-smp",
            "2",
            "-drive",
            "file=/s/vms/web1/disks/root.qcow2,if=virtio,format=qcow2,id=disk-root",
            "-drive",
            "file=/s/vms/web1/disks/data.qcow2,if=virtio,format=qcow2,id=disk-data",
            "-nic",
            "user,model=virtio-net-pci,hostfwd=tcp::2222-:22,hostfwd=udp::5353-:53",
            "-kernel",
            "/repo/k/vmlinuz",
            "-initrd",
            "/boot/initrd.img",
            "-append",
            "console=ttyS0 quiet",
            "-chardev",
            "socket,id=serial0,path=/s/vms/web1/console.sock,server=on,wait=off,logfile=/s/vms/web1/serial.log",
            "-serial",
            "chardev:serial0",
            "-qmp",
            "unix:/s/vms/web1/qmp.sock,server=on,wait=off",
            "-daemonize",
            "-pidfile",
            "/s/vms/web1/qemu.pid",
            "-rtc",
            "base=utc",
        ];
        assert_eq!(a, expected);
    }

    #[test]
    fn argv_attaches_a_bridge_with_virtio() {
        let s = spec("memory: 64MiB\nnetwork: {mode: bridge, bridge: br0}\n");
        let a = argv(&s, "vm", Path::new("/d"), Path::new("/r"));
        let nic = a.iter().position(|x| x == "-nic").unwrap();
        let mac = mac_address("vm");
        assert_eq!(
            a[nic + 1],
            format!("bridge,br=br0,model=virtio-net-pci,mac={mac}")
        );
        assert!(!a.iter().any(|x| x == "-kernel" || x.starts_with("file=")));
        // Stable per name, distinct between names, locally administered.
        assert_eq!(mac, mac_address("vm"));
        assert_ne!(mac, mac_address("vm2"));
        assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
    }

    #[test]
    fn growing_a_disk_alone_needs_no_restart() {
        let old = spec("memory: 64MiB\ndisks: [{name: a, size: 64MiB}]\n");
        let new = spec(
            "memory: 64MiB\ndisks: [{name: a, size: 1GiB}]\nstate: stopped\nonDelete: delete\n",
        );
        assert!(restart_reasons(&old, &new).is_empty());
    }

    #[test]
    fn every_process_field_is_a_restart_reason() {
        let old = spec("memory: 64MiB\ndisks: [{name: a, size: 64MiB}]\n");
        let new = spec(
            "memory: 128MiB\ncpus: 2\ndisks: [{name: a, size: 64MiB}, {name: b, size: 1GiB}]\nnetwork: {forwards: [{host: 2222, guest: 22}]}\nboot: {kernel: /k}\nextraArgs: [-s]\n",
        );
        assert_eq!(
            restart_reasons(&old, &new),
            ["cpus", "memory", "disks", "network", "boot", "extraArgs"]
        );
        let removed = spec("memory: 64MiB\n");
        assert_eq!(restart_reasons(&old, &removed), ["disks"]);
    }
}
