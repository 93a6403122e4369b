//! An SSH fleet for scenarios and benchmarks: a desired-state directory whose
//! machines are testbed hosts, the real `converge` binary (whose path the
//! caller gives) run with a time bound, its JSON output parsed, and bounded
//! polls.
//!
//! Every wait is a poll of an observable condition with a limit; a limit that
//! runs out fails the test with what was seen.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::run::{Converge, run_within_env, write_atomically};
pub use crate::run::{Run, read_lines, ready_of, result_kind, wait_for};
use crate::{REMOTE_STATE_DIR, Testbed, leftovers};

/// Bound on one `reconcile --once` of a small fleet, or a read command.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// The build every fleet uses: `./build.sh VARIANT [OPTION...]`.
///
/// The variant is written into the artifact (a new variant is a new
/// artifact). Options, each applying only when `CONVERGE_MACHINE` is the
/// named machine: `fail-on=NAME` (activate exits 1), `sleep-on=NAME:SECS`
/// (activate sleeps after its start line), and for every machine:
/// `big=MB` (a file of MB MiB of random data in the artifact).
///
/// On the target, every activation appends `start GEN MODE VARIANT` to
/// `$CONVERGE_STATE_DIR/starts` and, when it succeeds, `GEN MODE VARIANT` to
/// `$CONVERGE_STATE_DIR/ledger`.
const BUILD_SCRIPT: &str = r#"#!/bin/sh
set -eu
name=$CONVERGE_MACHINE
variant=${1:-v1}
[ $# -gt 0 ] && shift
fail=0
sleep_line=:
for opt in "$@"; do
  case $opt in
    fail-on="$name") fail=1 ;;
    sleep-on="$name":*) sleep_line="sleep ${opt##*:}" ;;
    big=*) head -c "$(( ${opt#*=} * 1048576 ))" /dev/urandom > "$CONVERGE_OUT/big" ;;
  esac
done
echo "$variant" > "$CONVERGE_OUT/variant"
head -c 1024 /dev/zero | tr '\0' x > "$CONVERGE_OUT/payload"
cat > "$CONVERGE_OUT/activate" <<ACT
#!/bin/sh
echo "start \$CONVERGE_GENERATION \$1 $variant" >> "\$CONVERGE_STATE_DIR/starts"
$sleep_line
if [ $fail -ne 0 ]; then echo "activate of $variant on $name fails on purpose" >&2; exit 1; fi
echo "\$CONVERGE_GENERATION \$1 $variant" >> "\$CONVERGE_STATE_DIR/ledger"
ACT
chmod +x "$CONVERGE_OUT/activate"
"#;

/// One scenario's world: a testbed of SSH hosts and a temporary directory
/// with `d/` (desired state), `s/` (controller state) and `logs/`.
pub struct SshFleet {
    bin: PathBuf,
    root: tempfile::TempDir,
    runs: std::cell::Cell<u32>,
    /// Added to the environment of every `converge` this fleet runs.
    env: std::cell::RefCell<Vec<(String, String)>>,
    pub testbed: Testbed,
}

impl SshFleet {
    /// A fleet of `n` fresh SSH hosts named `host0`..; no machine documents
    /// yet. `bin` is the `converge` binary to run.
    pub fn new(bin: impl Into<PathBuf>, n: usize) -> SshFleet {
        SshFleet::on(bin, Testbed::new(n))
    }

    /// [`SshFleet::new`] on hosts that each have their own /nix.
    pub fn with_private_nix(bin: impl Into<PathBuf>, n: usize) -> SshFleet {
        SshFleet::on(bin, Testbed::with_private_nix(n))
    }

    /// Sets `key=value` in the environment of every later `converge` run.
    pub fn set_env(&self, key: &str, value: &str) {
        let mut env = self.env.borrow_mut();
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }

    /// A fleet on hosts made already (with other sshd options, or users).
    pub fn on(bin: impl Into<PathBuf>, testbed: Testbed) -> SshFleet {
        let root = tempfile::Builder::new()
            .prefix("converge-fleet-")
            .tempdir()
            .expect("create a temporary directory");
        for dir in ["d", "s", "logs"] {
            fs::create_dir_all(root.path().join(dir)).expect("create a fleet directory");
        }
        let fleet = SshFleet {
            bin: bin.into(),
            root,
            runs: std::cell::Cell::new(0),
            env: std::cell::RefCell::new(Vec::new()),
            testbed,
        };
        let path = fleet.dir().join("build.sh");
        fs::write(&path, BUILD_SCRIPT).expect("write build.sh");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod +x");
        fleet
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The desired-state directory.
    pub fn dir(&self) -> PathBuf {
        self.root().join("d")
    }

    /// The testbed's (empty) ssh_config, passed as `--ssh-config`.
    pub fn ssh_config(&self) -> PathBuf {
        self.testbed.client(0).ssh_config
    }

    /// The Machine document of host `i` (named `host{i}`), built by
    /// `./build.sh ARGS...`, with the host key of host `key_of`;
    /// `extra` is more YAML at the level of `target`.
    pub fn machine_with_key(&self, i: usize, key_of: usize, build: &[&str], extra: &str) -> String {
        let host = self.testbed.host(i);
        let identity = self.testbed.client(i).identity_file;
        let argv: Vec<String> = std::iter::once("./build.sh")
            .chain(build.iter().copied())
            .map(|a| format!("{a:?}"))
            .collect();
        let mut doc = format!(
            "apiVersion: converge/v1\nkind: Machine\nmetadata:\n  name: host{i}\nspec:\n  target: {{host: {addr}, port: {port}, user: root, hostKey: {key:?}, identityFile: {identity:?}, stateDir: {REMOTE_STATE_DIR}}}\n  build: {{command: [{argv}], timeout: 1m}}\n",
            addr = host.address,
            port = host.port,
            key = self.testbed.host(key_of).host_key,
            identity = identity.to_str().expect("utf-8 key path"),
            argv = argv.join(", "),
        );
        doc.push_str(extra);
        if !doc.ends_with('\n') {
            doc.push('\n');
        }
        doc
    }

    /// The Machine document of host `i` with its own host key.
    pub fn machine(&self, i: usize, build: &[&str], extra: &str) -> String {
        self.machine_with_key(i, i, build, extra)
    }

    /// Writes `host{i}.yaml` into the desired-state directory.
    pub fn write_machine(&self, i: usize, doc: &str) {
        write_atomically(&self.dir().join(format!("host{i}.yaml")), doc);
    }

    /// Writes every host's document with the same build and extra YAML.
    pub fn write_all(&self, n: usize, build: &[&str], extra: &str) {
        for i in 0..n {
            self.write_machine(i, &self.machine(i, build, extra));
        }
    }

    /// Host `i`'s state directory as the controller sees it.
    pub fn host_state(&self, i: usize) -> PathBuf {
        self.testbed.host(i).state_dir.clone()
    }

    /// Successful activations on host `i` (its ledger).
    pub fn ledger(&self, i: usize) -> Vec<String> {
        read_lines(&self.host_state(i).join("ledger"))
    }

    /// Started activations on host `i`.
    pub fn starts(&self, i: usize) -> Vec<String> {
        read_lines(&self.host_state(i).join("starts"))
    }

    /// Where host `i`'s `current` points (`generations/<n>-<hash>`).
    pub fn current(&self, i: usize) -> Option<String> {
        fs::read_link(self.host_state(i).join("current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// Every entry of host `i`'s generations directory (partial ones too).
    pub fn generation_entries(&self, i: usize) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.host_state(i).join("generations"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Asserts that host `i`'s `current` points at a complete generation;
    /// returns that generation's directory name.
    pub fn assert_current_complete(&self, i: usize) -> String {
        let current = self
            .current(i)
            .unwrap_or_else(|| panic!("host{i} has no `current` link"));
        let generation = current
            .strip_prefix("generations/")
            .unwrap_or_else(|| panic!("host{i}: current -> {current}, not generations/…"))
            .to_owned();
        let dir = self.host_state(i).join("generations").join(&generation);
        assert!(
            dir.join(".complete").exists(),
            "host{i}: current -> {current}, which has no .complete marker"
        );
        assert!(
            dir.join("artifact/activate").exists(),
            "host{i}: generation {generation} has no artifact/activate"
        );
        generation
    }

    /// The argv of `converge reconcile --once` for this fleet, plus `extra`.
    pub fn reconcile_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "reconcile",
            "--once",
            "--dir",
            self.dir().to_str().expect("utf-8"),
            "--state",
            self.state().to_str().expect("utf-8"),
            "--ssh-config",
            self.ssh_config().to_str().expect("utf-8"),
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// `converge reconcile --once ... EXTRA...` within `limit`.
    pub fn reconcile_within(&self, extra: &[&str], limit: Duration) -> Run {
        let args = self.reconcile_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.converge_within(&args, limit)
    }

    /// `converge reconcile --once ... EXTRA...` within [`COMMAND_LIMIT`].
    pub fn reconcile_once(&self, extra: &[&str]) -> Run {
        self.reconcile_within(extra, COMMAND_LIMIT)
    }

    /// Asserts that each of `hosts` is Ready with a complete current generation.
    pub fn assert_ready(&self, hosts: impl IntoIterator<Item = usize>) {
        for i in hosts {
            let view = self.status(&format!("machine/host{i}"));
            let (ready, reason, message) = ready_of(&view);
            assert!(ready, "host{i} is not Ready: {reason}: {message}");
            self.assert_current_complete(i);
        }
    }

    /// `(ready, reason, message)` of host `i`.
    pub fn ready(&self, i: usize) -> (bool, String, String) {
        ready_of(&self.status(&format!("machine/host{i}")))
    }

    /// Tears the testbed down and asserts that it left nothing behind.
    pub fn finish(self) {
        let id = self.testbed.id().to_owned();
        drop(self);
        let left = leftovers(&id);
        assert!(left.is_empty(), "testbed {id} left behind: {left:#?}");
    }
}

impl Converge for SshFleet {
    /// Runs `converge ARGS...` to its end (killed and failing past `limit`).
    fn converge_within(&self, args: &[&str], limit: Duration) -> Run {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let logs = self.root().join("logs");
        run_within_env(
            &self.bin,
            args,
            &self.env.borrow(),
            &logs.join(format!("run-{n}.out")),
            &logs.join(format!("run-{n}.err")),
            limit,
        )
    }

    fn state(&self) -> PathBuf {
        self.root().join("s")
    }
}
