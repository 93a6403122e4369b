//! A tiny bootable guest for real-QEMU tests: a Debian kernel, a busybox
//! initramfs as its root filesystem and dropbear SSH, built offline from
//! Debian packages by `scripts/guest-image` and booted under
//! `qemu-system-x86_64` with TCG (never KVM). SSH reaches it through a
//! user-mode network host forward on 127.0.0.1.
//!
//! Self-contained (std and `tempfile` only) so integration tests can include
//! it with `#[path]`; its own tests use `crate::driver`, so such a test crate
//! needs `use converge::driver;` at its root (or `mod tests` moves out). A [`Guest`] kills its QEMU and removes its files when
//! dropped, also when a test panics; guests left by a killed test process are
//! reaped by the next [`Guest::boot`].

use std::fs;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Where the image is built, once per checkout.
const CACHE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/guest-image");
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/guest-image");
/// Prefix of each guest's directory under /tmp (short: ssh control sockets
/// may live below it).
pub const DIR_PREFIX: &str = "cg-guest-";
/// How long between two SSH readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(300);

/// A built guest image. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The private key root of the guest accepts (and the only one).
    pub client_key: PathBuf,
    /// The guest's host key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// What `uname -r` prints in the guest.
    pub kernel_release: String,
}

impl GuestImage {
    /// The image, built by `scripts/guest-image` into `target/guest-image`
    /// when it is missing or stale. Threads of one process build it once;
    /// processes wait for each other (the script holds a lock file).
    ///
    /// # Panics
    /// When the image cannot be built, with the script's output.
    pub fn get() -> GuestImage {
        static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
        match IMAGE.get_or_init(|| Self::build(Path::new(CACHE_DIR))) {
            Ok(image) => image.clone(),
            Err(why) => panic!("cannot build the test guest image: {why}"),
        }
    }

    fn build(dir: &Path) -> Result<GuestImage, String> {
        let output = Command::new(BUILD_SCRIPT)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run {BUILD_SCRIPT}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "`{BUILD_SCRIPT} {}` failed ({}); it needs root and apt access to Debian 12 packages:\n{}{}",
                dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            ));
        }
        let read = |name: &str| {
            fs::read_to_string(dir.join(name))
                .map_err(|e| format!("read {}: {e}", dir.join(name).display()))
        };
        let host_key = read("host_key.pub")?.trim().to_owned();
        let kernel_release = read("info")?
            .lines()
            .find_map(|l| l.strip_prefix("kernel=linux-image-"))
            .map(str::to_owned)
            .ok_or_else(|| format!("no kernel= line in {}/info", dir.display()))?;
        Ok(GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            client_key: dir.join("client_key"),
            host_key,
            kernel_release,
        })
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// # Panics
/// When no port can be bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("find a free port on 127.0.0.1: {e}"))
}

/// A running guest: QEMU (TCG) with the guest's port 22 forwarded to
/// `127.0.0.1:port`. Dropping it kills QEMU and removes its directory.
#[derive(Debug)]
pub struct Guest {
    pub port: u16,
    pub image: GuestImage,
    /// A known_hosts file with the guest's host key for `[127.0.0.1]:port`.
    pub known_hosts: PathBuf,
    /// An empty ssh_config, so the user's `~/.ssh/config` is not read.
    pub ssh_config: PathBuf,
    booted: Instant,
    qemu: Child,
    dir: tempfile::TempDir,
}

impl Guest {
    /// Starts QEMU with the image; returns at once (see [`Guest::wait_ssh`]).
    ///
    /// # Panics
    /// When QEMU cannot be started.
    pub fn boot(image: &GuestImage, port: u16) -> Guest {
        reap_orphans();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("create a guest directory under /tmp: {e}"));
        let path = dir.path();
        let write = |name: &str, text: &str| {
            let file = path.join(name);
            fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
            file
        };
        write("owner", &own_identity());
        let known_hosts = write(
            "known_hosts",
            &format!("[127.0.0.1]:{port} {}\n", image.host_key),
        );
        let ssh_config = write("ssh_config", "");
        let log = fs::File::create(path.join("qemu.log"))
            .unwrap_or_else(|e| panic!("create {}/qemu.log: {e}", path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("clone a file handle: {e}"));
        let booted = Instant::now();
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35,accel=tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-m", "256", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-serial")
            .arg(format!("file:{}", path.join("serial.log").display()))
            .args(["-device", "virtio-rng-pci", "-nic"])
            .arg(format!(
                "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22"
            ))
            .arg("-pidfile")
            .arg(path.join("qemu.pid"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start qemu-system-x86_64 (apt-get install qemu-system-x86): {e}")
            });
        Guest {
            port,
            image: image.clone(),
            known_hosts,
            ssh_config,
            booted,
            qemu,
            dir,
        }
    }

    /// Waits until a real `ssh root@127.0.0.1 true` with strict host key
    /// checking succeeds; returns the time since [`Guest::boot`].
    ///
    /// # Panics
    /// When QEMU exits or SSH does not answer within `limit`, with the
    /// guest's console and ssh's last error.
    pub fn wait_ssh(&mut self, limit: Duration) -> Duration {
        let deadline = Instant::now() + limit;
        loop {
            let output = self.ssh("true");
            if output.status.success() {
                return self.booted.elapsed();
            }
            if let Ok(Some(status)) = self.qemu.try_wait() {
                panic!(
                    "qemu exited ({status}) before SSH answered.\nqemu: {}\nconsole:\n{}",
                    self.qemu_log(),
                    self.serial_log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "the guest did not answer SSH on 127.0.0.1:{} within {limit:?}; last ssh error: {}\nconsole:\n{}",
                    self.port,
                    String::from_utf8_lossy(&output.stderr).trim(),
                    self.serial_log()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Runs `command` in the guest's shell over a fresh real `ssh`.
    ///
    /// # Panics
    /// When ssh cannot be started.
    pub fn ssh(&self, command: &str) -> Output {
        Command::new("ssh")
            .arg("-F")
            .arg(&self.ssh_config)
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"])
            .args(["-o", "ConnectTimeout=2", "-o", "LogLevel=ERROR"])
            .arg("-i")
            .arg(&self.image.client_key)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["root@127.0.0.1", command])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run ssh: {e}"))
    }

    /// The guest's serial console so far (at most its last 64 KiB).
    pub fn serial_log(&self) -> String {
        read_tail(&self.dir.path().join("serial.log"), 64 * 1024)
    }

    fn qemu_log(&self) -> String {
        read_tail(&self.dir.path().join("qemu.log"), 16 * 1024)
    }

    /// The guest's own directory (console log, pidfile, client files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // The child handle is ours: no pid reuse race. The TempDir field
        // removes the directory after this.
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `<pid> <start time>` of a process, from `/proc/<pid>/stat`.
fn identity(pid: &str) -> io::Result<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let start = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .ok_or_else(|| io::Error::other("unparsable /proc stat"))?;
    Ok(format!("{pid} {start}"))
}

fn own_identity() -> String {
    identity(&std::process::id().to_string()).unwrap_or_default()
}

/// Kills the QEMU of guest directories whose test process is gone (killed
/// before its drops ran) and removes those directories. Only a process whose
/// command line names the directory is killed.
pub fn reap_orphans() {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join("owner")) else {
            continue;
        };
        let owner = owner.trim();
        let owner_pid = owner.split(' ').next().unwrap_or_default();
        if owner.is_empty() || identity(owner_pid).is_ok_and(|now| now == owner) {
            continue;
        }
        if let Ok(pid) = fs::read_to_string(dir.join("qemu.pid")) {
            let pid = pid.trim();
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let needle = dir.to_string_lossy();
            if !pid.is_empty() && String::from_utf8_lossy(&cmdline).contains(needle.as_ref()) {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
