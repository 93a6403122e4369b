//! Test support: real SSH hosts in network namespaces on a private bridge,
//! for integration tests of the SSH driver and the machine protocol. Each
//! host is one namespace with a veth into the testbed's bridge and one sshd
//! with its own config and host key, its own mounted state directory and an
//! empty /root (bind mounts in a private mount namespace), and its own
//! hostname. Faults are injected for real: link down, listener killed, sshd
//! frozen. It must leave nothing behind (namespaces, links, processes,
//! mounts), also when a test panics, and must never touch another run's
//! hosts: every name carries a per-run id, and [`cleanup_stale`] removes only
//! runs whose owning process is gone. Needs root, iproute2, util-linux and
//! OpenSSH (`apt-get install -y openssh-server openssh-client iproute2`).

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every testbed's names start with this; the run id follows.
pub const PREFIX: &str = "cvt";
/// Where a host sees its state directory (the bind mount's target).
pub const REMOTE_STATE_DIR: &str = "/var/lib/converge";
/// How long an sshd may take to write its pidfile.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Boots one host inside its namespaces: hostname, bind mounts (its own
/// /nix when the host dir has one), then sshd in the foreground. $1
/// hostname, $2 host dir, $3 state dir as the host sees it, $4 sshd config.
/// Each host gets an /etc/hosts naming it (sudo resolves the host's name and
/// complains on every call otherwise).
const BOOT_SCRIPT: &str = r#"# converge testbed: boot.sh
set -e
hostname "$1"
mkdir -p "$3"
mount --bind "$2/state" "$3"
mount --bind "$2/home" /root
if [ -d "$2/nix" ]; then mount --bind "$2/nix" /nix; fi
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$1" > "$2/hosts"
mount --bind "$2/hosts" /etc/hosts
exec /usr/sbin/sshd -D -f "$4" -E "$2/sshd.log"
"#;

/// Serializes subnet choice within this process (tests run in parallel).
static SUBNET_LOCK: Mutex<()> = Mutex::new(());

/// How a testbed's sshd hosts are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Offer the SFTP subsystem (`Subsystem sftp internal-sftp`); without
    /// it, sshd has none, as its compiled-in default and hardened configs.
    pub sftp: bool,
    /// Offer only curve25519 key exchange (`curve25519-sha256` and its
    /// older name `curve25519-sha256@libssh.org`), so every client pays the
    /// same handshake (benchmarks compare tools this way).
    pub curve25519_only: bool,
    /// Refuse root logins (`DenyUsers root`): whatever runs as root came
    /// from sudo.
    pub deny_root: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sftp: true,
            curve25519_only: false,
            deny_root: false,
        }
    }
}

/// What a testbed user may do with sudo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sudo {
    /// No sudoers rule at all.
    None,
    /// `NOPASSWD: ALL`.
    NoPassword,
    /// `ALL`, with a password (which the user does not have): `sudo -n`
    /// fails at once with "a password is required".
    Password,
}

/// A login made by [`Testbed::add_user`]; it logs in to every host with
/// the testbed's client key (hosts share /etc/passwd and /home).
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
}

/// A bridge, a subnet and `n` SSH hosts; all of it goes away on drop.
pub struct Testbed {
    id: String,
    options: Options,
    /// Users and sudoers files made by [`Testbed::add_user`].
    users: Mutex<Vec<(String, Option<PathBuf>)>>,
    dir: PathBuf,
    bridge: String,
    octet: u8,
    client_key: PathBuf,
    ssh_config: PathBuf,
    hosts: Vec<Host>,
    /// Each host gets its own empty /nix (see [`Testbed::with_private_nix`]).
    private_nix: bool,
}

pub mod fleet;
pub mod git;
pub mod guest;
pub mod nix;
pub mod run;

/// How an SSH client reaches one host of a [`Testbed`], as plain data (the
/// tests turn it into converge's own client options).
#[derive(Debug, Clone)]
pub struct Client {
    pub address: String,
    pub port: u16,
    /// The host's public key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    pub identity_file: PathBuf,
    /// An empty user ssh_config (so the machine's own is not read).
    pub ssh_config: PathBuf,
    /// A short directory for control sockets.
    pub control_dir: PathBuf,
}

/// One SSH host of a [`Testbed`].
pub struct Host {
    /// Its hostname (`uname -n` on it).
    pub name: String,
    pub netns: String,
    pub address: String,
    pub port: u16,
    /// Its public host key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// Its state directory as the controller sees it (the bind source).
    pub state_dir: PathBuf,
    veth: String,
    dir: PathBuf,
    sshd: Mutex<Option<Child>>,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("cannot run {program} (install openssh-server openssh-client iproute2): {e}")
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("testbed: {e}"))
}

/// Feeds `commands` to `ip [-n netns] -batch -`.
fn ip_batch(netns: Option<&str>, commands: &str) {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("testbed: run ip (apt-get install -y iproute2)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(commands.as_bytes())
        .expect("write ip batch");
    let output = child.wait_with_output().expect("wait for ip");
    assert!(
        output.status.success(),
        "testbed: ip -batch failed: {}\n{commands}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A random-enough u64 without a rand crate: std's hasher keys are random per process.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// "pid starttime" of this process: pids are reused, start times tell them apart.
fn process_identity(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // Fields after the comm: state is field 3, starttime field 22.
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

fn used_subnets() -> String {
    let mut text = run("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default();
    text.push_str(&run("ip", &["-4", "route", "show", "table", "all"]).unwrap_or_default());
    text
}

impl Testbed {
    /// Builds `n_hosts` hosts (1-200) on a fresh bridge and subnet and waits
    /// until every sshd listens. Panics with what to install when a tool is
    /// missing, or with the sshd log when a host does not come up.
    pub fn new(n_hosts: usize) -> Testbed {
        Testbed::make(n_hosts, Options::default(), false)
    }

    /// [`Testbed::new`] whose hosts each see their own empty /nix (a bind
    /// mount of `<host dir>/nix` in the host's mount namespace), so Nix
    /// store paths copied to one host are that host's alone.
    pub fn with_private_nix(n_hosts: usize) -> Testbed {
        fs::create_dir_all("/nix").expect("create /nix, the hosts' mount point");
        Testbed::make(n_hosts, Options::default(), true)
    }

    /// [`Testbed::new`] with sshd configured by `options`.
    pub fn with_options(n_hosts: usize, options: Options) -> Testbed {
        Testbed::make(n_hosts, options, false)
    }

    fn make(n_hosts: usize, options: Options, private_nix: bool) -> Testbed {
        assert!((1..=200).contains(&n_hosts), "testbed: 1-200 hosts");
        let uid = run("id", &["-u"]).unwrap_or_default();
        assert_eq!(
            uid.trim(),
            "0",
            "testbed: needs root (network namespaces, bind mounts)"
        );
        for tool in ["/usr/sbin/sshd", "/usr/bin/ssh-keygen", "/usr/bin/unshare"] {
            assert!(
                Path::new(tool).exists(),
                "testbed: {tool} is missing; apt-get install -y openssh-server openssh-client iproute2 util-linux"
            );
        }
        // A unique id: its directory is created exclusively.
        let (id, dir) = loop {
            let id = format!("{:04x}", random_u64() & 0xffff);
            let dir = PathBuf::from(format!("/tmp/{PREFIX}{id}"));
            if fs::create_dir(&dir).is_ok() {
                break (id, dir);
            }
        };
        let owner = process_identity(std::process::id()).expect("read /proc/self/stat");
        fs::write(dir.join("owner"), owner).expect("write owner");
        let mut testbed = Testbed {
            bridge: format!("{PREFIX}{id}b"),
            client_key: dir.join("client_key"),
            ssh_config: dir.join("ssh_config"),
            id,
            options,
            users: Mutex::new(Vec::new()),
            dir,
            octet: 0,
            hosts: Vec::new(),
            private_nix,
        };
        // From here on, Drop cleans up whatever was made, also on a panic.
        testbed.build(n_hosts);
        testbed
    }

    fn build(&mut self, n_hosts: usize) {
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        fs::write(&self.ssh_config, "# converge testbed: no user ssh config\n")
            .expect("write ssh_config");
        let client_key = self.client_key.to_string_lossy().into_owned();
        let mut keygens = vec![keygen(&client_key, "converge-testbed")];
        {
            let _guard = SUBNET_LOCK
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let used = used_subnets();
            let mut octet = None;
            for _ in 0..200 {
                let candidate = 77 + (random_u64() % 123) as u8;
                if !used.contains(&format!("10.{candidate}.")) {
                    octet = Some(candidate);
                    break;
                }
            }
            self.octet = octet.expect("testbed: no free 10.77-199 subnet");
            ip_batch(
                None,
                &format!(
                    "link add {b} type bridge\naddr add 10.{o}.0.1/24 dev {b}\nlink set {b} up\n",
                    b = self.bridge,
                    o = self.octet
                ),
            );
        }
        let mut batch = String::new();
        for i in 0..n_hosts {
            let name = format!("host{i}");
            let netns = format!("{PREFIX}{}n{i}", self.id);
            let veth = format!("{PREFIX}{}v{i}", self.id);
            let dir = self.dir.join(format!("h{i}"));
            for sub in ["state", "home"] {
                fs::create_dir_all(dir.join(sub)).expect("create host dir");
            }
            if self.private_nix {
                fs::create_dir_all(dir.join("nix")).expect("create host dir");
            }
            let key = dir.join("ssh_host_ed25519_key");
            keygens.push(keygen(&key.to_string_lossy(), &name));
            batch.push_str(&format!(
                "netns add {netns}\nlink add {veth} type veth peer name eth0 netns {netns}\nlink set {veth} master {b} up\n",
                b = self.bridge
            ));
            self.hosts.push(Host {
                name,
                netns,
                address: format!("10.{}.0.{}", self.octet, 11 + i),
                port: 22,
                host_key: String::new(),
                state_dir: dir.join("state"),
                veth,
                dir,
                sshd: Mutex::new(None),
            });
        }
        ip_batch(None, &batch);
        for host in &self.hosts {
            ip_batch(
                Some(&host.netns),
                &format!(
                    "addr add {}/24 dev eth0\nlink set eth0 up\nlink set lo up\n",
                    host.address
                ),
            );
        }
        for keygen in keygens {
            let output = keygen.wait_with_output().expect("wait for ssh-keygen");
            assert!(
                output.status.success(),
                "testbed: ssh-keygen failed: {output:?}"
            );
        }
        let client_pub = fs::read_to_string(format!("{client_key}.pub")).expect("read client key");
        for host in &mut self.hosts {
            let key = fs::read_to_string(host.dir.join("ssh_host_ed25519_key.pub"))
                .expect("read host key");
            host.host_key = key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            fs::write(host.dir.join("authorized_keys"), &client_pub)
                .expect("write authorized_keys");
            let d = host.dir.display();
            let mut config = format!(
                "# converge testbed sshd for {name}\nListenAddress {addr}:{port}\nHostKey {d}/ssh_host_ed25519_key\nPidFile {d}/sshd.pid\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPrintMotd no\nPrintLastLog no\nUseDNS no\nMaxStartups 100:30:200\n",
                name = host.name,
                addr = host.address,
                port = host.port,
            );
            if self.options.sftp {
                config.push_str("Subsystem sftp internal-sftp\n");
            }
            if self.options.deny_root {
                config.push_str("DenyUsers root\n");
            }
            if self.options.curve25519_only {
                // Both names of one algorithm: paramiko knows only the older one.
                config.push_str("KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org\n");
            }
            fs::write(host.dir.join("sshd_config"), config).expect("write sshd_config");
            host.spawn_sshd();
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for host in &self.hosts {
            host.wait_ready(deadline);
        }
    }

    /// All hosts, in creation order (host `i` has address `10.X.0.(11+i)`).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i`; panics when out of range.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// This run's id; every name of the run contains `PREFIX` + id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bridge all hosts' veths are attached to (address `10.X.0.1`).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The run's directory (host dirs, client key, control sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How a client reaches host `i`: the testbed's key and host key, an
    /// empty user ssh_config, a short control directory.
    pub fn client(&self, i: usize) -> Client {
        let host = &self.hosts[i];
        Client {
            address: host.address.clone(),
            port: host.port,
            host_key: host.host_key.clone(),
            identity_file: self.client_key.clone(),
            ssh_config: self.ssh_config.clone(),
            control_dir: self.dir.join("c"),
        }
    }

    /// Makes a login `<prefix><id>u<n>` with a home under /home and the
    /// testbed's client key authorized (sshd reads the testbed's
    /// authorized_keys for every user), and the sudo rule `sudo` asks for in
    /// /etc/sudoers.d. Both go at teardown. Needs `useradd` and, for a rule,
    /// sudo (`apt-get install -y sudo`).
    pub fn add_user(&self, sudo: Sudo) -> User {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let name = format!("{PREFIX}{}u{}", self.id, users.len());
        // useradd fails when another test holds /etc/passwd's lock: retry.
        let mut tries = 0;
        while let Err(e) = run("useradd", &["-m", "-p", "*", "-s", "/bin/sh", &name]) {
            tries += 1;
            assert!(tries < 50, "testbed: useradd {name}: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let rule = match sudo {
            Sudo::None => None,
            Sudo::NoPassword => Some(format!("{name} ALL=(ALL) NOPASSWD: ALL\n")),
            Sudo::Password => Some(format!("{name} ALL=(ALL) ALL\n")),
        };
        let sudoers = rule.map(|rule| {
            assert!(
                Path::new("/usr/bin/sudo").exists(),
                "testbed: sudo is missing; apt-get install -y sudo (scripts/setup does)"
            );
            let path = PathBuf::from(format!("/etc/sudoers.d/{name}"));
            fs::write(&path, rule).expect("write a sudoers rule");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o440)).expect("chmod 0440");
            path
        });
        users.push((name.clone(), sudoers));
        let uid = must("id", &["-u", &name]).trim().parse().expect("a uid");
        User {
            home: PathBuf::from(format!("/home/{name}")),
            name,
            uid,
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // Client-side processes that use this testbed's files (its client
        // key): SSH masters that converge keeps for a next run
        // (`--ssh-persist`) would otherwise wait for their idle exit.
        kill_processes_mentioning(&self.dir);
        for host in &self.hosts {
            kill_netns_processes(&host.netns);
            host.stop_sshd();
        }
        for host in &self.hosts {
            // Deleting the veth first: `ip netns del` removes devices asynchronously.
            if link_exists(&host.veth) {
                if let Err(e) = run("ip", &["link", "del", &host.veth]) {
                    problems.push(e);
                }
            }
        }
        for host in &self.hosts {
            if let Err(e) = delete_netns(&host.netns) {
                problems.push(e);
            }
        }
        if link_exists(&self.bridge) {
            if let Err(e) = run("ip", &["link", "del", &self.bridge]) {
                problems.push(e);
            }
        }
        let users = std::mem::take(&mut *self.users.lock().unwrap_or_else(|p| p.into_inner()));
        for (name, sudoers) in users {
            if let Some(path) = sudoers {
                if let Err(e) = fs::remove_file(&path) {
                    problems.push(format!("remove {}: {e}", path.display()));
                }
            }
            // Its processes all ran on the hosts, killed with their namespaces above.
            let mut tries = 0;
            while let Err(e) = run("userdel", &["-r", &name]) {
                tries += 1;
                if tries >= 50 {
                    problems.push(e);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            problems.push(format!("remove {}: {e}", self.dir.display()));
        }
        problems
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let problems = self.teardown();
        if !problems.is_empty() {
            // No panic in drop (it may run during an unwind): say it loudly.
            eprintln!("testbed {}: teardown problems: {problems:?}", self.id);
        }
    }
}

fn keygen(path: &str, comment: &str) -> Child {
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("testbed: run ssh-keygen (apt-get install -y openssh-client)")
}

fn link_exists(name: &str) -> bool {
    run("ip", &["link", "show", "dev", name]).is_ok()
}

fn delete_netns(netns: &str) -> Result<(), String> {
    let listed = run("ip", &["netns", "list"]).unwrap_or_default();
    if listed
        .lines()
        .any(|l| l.split_whitespace().next() == Some(netns))
    {
        run("ip", &["netns", "del", netns])?;
    }
    Ok(())
}

/// Every process in the namespace (sshd, sessions, detached activations).
fn netns_pids(netns: &str) -> Vec<u32> {
    run("ip", &["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    let mut args = vec![sig.to_owned(), "--".to_owned()];
    args.extend(pids.iter().map(u32::to_string));
    let _ = Command::new("kill")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn kill_netns_processes(netns: &str) {
    // Twice: a process may fork while the first round runs.
    for _ in 0..2 {
        signal(&netns_pids(netns), "-KILL");
    }
}

fn sshd_pids(netns: &str) -> Vec<u32> {
    netns_pids(netns)
        .into_iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "sshd")
        })
        .collect()
}

impl Host {
    /// The processes running in this host's network namespace whose command
    /// line contains `needle`: (pid, command line with spaces for NULs).
    pub fn processes_mentioning(&self, needle: &str) -> Vec<(u32, String)> {
        netns_pids(&self.netns)
            .into_iter()
            .filter_map(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline.contains(needle).then_some((pid, cmdline))
            })
            .collect()
    }

    fn spawn_sshd(&self) {
        let _ = fs::remove_file(self.dir.join("sshd.pid"));
        let dir = self.dir.to_string_lossy().into_owned();
        let config = self.dir.join("sshd_config");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
            ])
            .args([
                "sh",
                "-c",
                BOOT_SCRIPT,
                "boot",
                &self.name,
                &dir,
                REMOTE_STATE_DIR,
            ])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(self.dir.join("boot.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .expect("testbed: start sshd");
        *self.sshd.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
    }

    fn wait_ready(&self, deadline: Instant) {
        let pidfile = self.dir.join("sshd.pid");
        while !pidfile.exists() {
            let exited = self
                .sshd
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .map(|c| c.try_wait().ok().flatten().is_some())
                .unwrap_or(true);
            if exited || Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
                let boot = fs::read_to_string(self.dir.join("boot.log")).unwrap_or_default();
                panic!(
                    "testbed: sshd of {} did not come up:\n{boot}\n{log}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop_sshd(&self) {
        if let Some(mut child) = self.sshd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.dir.join("sshd.pid"));
    }

    /// The host's directory on the controller (logs, keys, config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the host's link down: packets to and from it are dropped.
    pub fn link_down(&self) {
        must("ip", &["-n", &self.netns, "link", "set", "eth0", "down"]);
    }

    /// Brings the host's link back up.
    pub fn link_up(&self) {
        must("ip", &["-n", &self.netns, "link", "set", "eth0", "up"]);
        // Connections tried while the link was down leave a failed
        // neighbour entry on the controller's side, which answers "no route
        // to host" for seconds after the link is back: forget it.
        let _ = run("ip", &["neigh", "flush", "to", &self.address]);
    }

    /// Kills the listening sshd only: established connections live on.
    pub fn kill_sshd(&self) {
        self.stop_sshd();
    }

    /// Stops (SIGSTOP) every sshd process of the host, the listener and the
    /// per-connection ones: the host's SSH side hangs.
    pub fn freeze(&self) {
        signal(&sshd_pids(&self.netns), "-STOP");
    }

    /// Resumes (SIGCONT) every sshd process of the host.
    pub fn thaw(&self) {
        signal(&sshd_pids(&self.netns), "-CONT");
    }

    /// Starts the listener again (killing it first if it runs) and waits for it.
    pub fn restart_sshd(&self) {
        self.stop_sshd();
        self.spawn_sshd();
        self.wait_ready(Instant::now() + READY_TIMEOUT);
    }

    /// Runs argv inside the host's network namespace (not its mount
    /// namespace), e.g. to look at it from the inside.
    pub fn exec(&self, argv: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.netns];
        args.extend_from_slice(argv);
        must("ip", &args)
    }
}

/// Removes what earlier runs with names starting `prefix` left behind after
/// a crash: runs whose owning process is gone (or whose directory is gone).
/// Kills their processes (by namespace and by pidfile), deletes veths, then
/// namespaces, then bridges, then their directories. Never touches a run
/// whose owner still lives. Returns the ids it cleaned.
pub fn cleanup_stale(prefix: &str) -> Vec<String> {
    let alive = |id: &str| -> bool {
        let dir = PathBuf::from(format!("/tmp/{prefix}{id}"));
        match fs::read_to_string(dir.join("owner")) {
            Ok(owner) => owner
                .split_whitespace()
                .next()
                .and_then(|pid| pid.parse().ok())
                .and_then(process_identity)
                .is_some_and(|now| now == owner.trim()),
            // A run being created writes its owner right after its directory.
            Err(_) => {
                dir.exists()
                    && fs::metadata(&dir).is_ok_and(|m| {
                        m.modified()
                            .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(5))
                    })
            }
        }
    };
    // Ids are the 4 hex digits after the prefix.
    let id_of = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(prefix)?;
        let id = rest.get(..4)?;
        id.bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| id.to_owned())
    };
    let mut ids = HashSet::new();
    if let Ok(entries) = fs::read_dir("/tmp") {
        for entry in entries.flatten() {
            if let Some(id) = id_of(&entry.file_name().to_string_lossy()) {
                ids.insert(id);
            }
        }
    }
    let netns_list = run("ip", &["netns", "list"]).unwrap_or_default();
    let namespaces: Vec<String> = netns_list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    let links_text = run("ip", &["-o", "link", "show"]).unwrap_or_default();
    let links: Vec<String> = links_text
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    ids.extend(namespaces.iter().chain(&links).filter_map(|n| id_of(n)));
    let stale: Vec<String> = ids.into_iter().filter(|id| !alive(id)).collect();
    for id in &stale {
        let run_prefix = format!("{prefix}{id}");
        let dir = PathBuf::from(format!("/tmp/{run_prefix}"));
        for ns in namespaces.iter().filter(|n| n.starts_with(&run_prefix)) {
            kill_netns_processes(ns);
        }
        if let Ok(hosts) = fs::read_dir(&dir) {
            for host in hosts.flatten() {
                if let Some(pid) = fs::read_to_string(host.path().join("sshd.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<u32>().ok())
                {
                    signal(&[pid], "-KILL");
                }
            }
        }
        for link in links
            .iter()
            .filter(|l| l.starts_with(&run_prefix) && !l.ends_with('b'))
        {
            let _ = run("ip", &["link", "del", link]);
        }
        for ns in namespaces.iter().filter(|n| n.starts_with(&run_prefix)) {
            let _ = run("ip", &["netns", "del", ns]);
        }
        for link in links
            .iter()
            .filter(|l| l.starts_with(&run_prefix) && l.ends_with('b'))
        {
            let _ = run("ip", &["link", "del", link]);
        }
        let _ = fs::remove_dir_all(&dir);
    }
    stale
}

/// Processes other than this one whose command line contains `needle`:
/// pid and command line (arguments joined by spaces).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_string_lossy().parse().ok()?;
            let cmdline = fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid != std::process::id() && cmdline.contains(needle)).then_some((pid, cmdline))
        })
        .collect()
}

/// SIGKILLs every process but this one whose command line names `path`.
fn kill_processes_mentioning(path: &Path) {
    for (pid, _) in processes_mentioning(&path.to_string_lossy()) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Everything of a run still visible on this host: namespaces, links,
/// processes whose command line names its directory, and mounts. Empty when
/// the run left nothing behind.
pub fn leftovers(id: &str) -> Vec<String> {
    let run_prefix = format!("{PREFIX}{id}");
    let mut found = Vec::new();
    for line in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
        if line.contains(&run_prefix) {
            found.push(format!("netns {line}"));
        }
    }
    for line in run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
    {
        if line.contains(&run_prefix) {
            found.push(format!("link {line}"));
        }
    }
    for (pid, cmdline) in processes_mentioning(&format!("/tmp/{run_prefix}")) {
        found.push(format!("process {pid}: {cmdline}"));
    }
    for line in fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
    {
        if line.contains(&run_prefix) {
            found.push(format!("mount {line}"));
        }
    }
    if Path::new(&format!("/tmp/{run_prefix}")).exists() {
        found.push(format!("directory /tmp/{run_prefix}"));
    }
    for line in fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
    {
        if line.starts_with(&run_prefix) {
            found.push(format!("user {line}"));
        }
    }
    found
}

/// Marks a file executable (tests build artifacts with it).
pub fn make_executable(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}
