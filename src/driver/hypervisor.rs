//! VMs on a hypervisor Machine over SSH: converge's own binary is the agent.
//!
//! Before the first operation on a hypervisor, the running converge binary
//! (`/proc/self/exe`, so a binary replaced on disk since start is never the
//! one sent) is uploaded to `<stateDir>/agent/converge-<blake3>` there,
//! unless that file is already in place; older agents are removed. Each VM
//! operation is then one `converge vm-agent REQUEST` run over the machine's
//! pooled SSH master, printing one JSON reply (see [`super::qemu::agent`]).
//! The agent is the very same build, so the protocol needs no versions; the
//! hypervisor must run the same OS and architecture (checked with `uname`
//! before anything is uploaded, a terminal error otherwise).
//!
//! Files a VM spec names by a path relative to the desired-state directory
//! (backing images, kernels, initrds) are uploaded once, by content, to
//! `<stateDir>/vm-files/<blake3>-<file name>`; absolute paths name files on
//! the hypervisor and are used as they are.
//!
//! Every step is bounded: the checks by [`CHECK_TIMEOUT`], the agent upload
//! by [`AGENT_UPLOAD_TIMEOUT`], a file upload by [`FILE_UPLOAD_TIMEOUT`], an
//! operation by its own bound plus [`TRANSPORT_SLACK`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::capability::DriverError;
use super::qemu::agent::{Reply, Request};
use super::ssh::SshTarget;
use super::{Target, TargetError};

/// Bound on a presence or kind check on the hypervisor.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on uploading the agent binary.
const AGENT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on uploading one file a VM spec names (a backing image can be large).
const FILE_UPLOAD_TIMEOUT: Duration = Duration::from_secs(1800);
/// Added to an operation's own bound for the SSH round trip and agent start.
const TRANSPORT_SLACK: Duration = Duration::from_secs(15);
/// The running binary, readable even when its file was replaced or removed.
const OWN_EXE: &str = "/proc/self/exe";

/// A local file as of one version: path, length, modification time.
type FileVersion = (PathBuf, u64, Option<SystemTime>);

/// What this process knows about hypervisors: its own binary's hash, the
/// remote files known to be in place, and the hashes of uploaded files.
#[derive(Debug, Default)]
pub struct Agents {
    own_hash: tokio::sync::OnceCell<String>,
    /// `destination path` pairs known to exist on their host.
    present: Mutex<HashSet<String>>,
    /// Content hash of a local file by path, length and modification time.
    hashes: Mutex<HashMap<FileVersion, String>>,
    /// Serializes installs, so two VMs on one new hypervisor upload once.
    installing: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> DriverError {
    DriverError::Target(TargetError::Io {
        target: "local".into(),
        action: "read",
        path: path.to_path_buf(),
        source: std::io::Error::new(e.kind(), format!("{what}: {e}")),
    })
}

/// blake3 of a file's content, hex.
async fn hash_file(path: &Path) -> Result<String, DriverError> {
    let owned = path.to_path_buf();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut hasher = blake3::Hasher::new();
        let mut file = std::fs::File::open(&owned)?;
        std::io::copy(&mut file, &mut hasher)?;
        Ok(hasher.finalize().to_hex().to_string())
    })
    .await
    .map_err(|e| io_error("hash", path, &std::io::Error::other(e)))?;
    result.map_err(|e| io_error("hash", path, &e))
}

/// `sh -c SCRIPT sh ARGS...` as an argv.
fn script(script: &str, args: &[&str]) -> Vec<String> {
    ["sh", "-c", script, "sh"]
        .iter()
        .chain(args)
        .map(|s| (*s).to_owned())
        .collect()
}

impl Agents {
    async fn own_hash(&self) -> Result<&str, DriverError> {
        self.own_hash
            .get_or_try_init(|| hash_file(Path::new(OWN_EXE)))
            .await
            .map(String::as_str)
    }

    fn is_present(&self, t: &SshTarget, path: &str) -> bool {
        lock(&self.present).contains(&format!("{} {path}", t.describe()))
    }

    fn mark_present(&self, t: &SshTarget, path: &str) {
        lock(&self.present).insert(format!("{} {path}", t.describe()));
    }

    /// The agent's path on the hypervisor, uploading it first when missing.
    pub async fn ensure_agent(
        &self,
        t: &SshTarget,
        state_dir: &str,
        machine: &str,
    ) -> Result<String, DriverError> {
        let hash = self.own_hash().await?;
        let dir = format!("{state_dir}/agent");
        let path = format!("{dir}/converge-{}", &hash[..32]);
        if self.is_present(t, &path) {
            return Ok(path);
        }
        let _one = self.installing.lock().await;
        if self.is_present(t, &path) {
            return Ok(path);
        }
        // Present already, or which kind of host it is.
        let probe = t
            .run(
                &script(
                    "if test -x \"$1\"; then echo present; else uname -sm; fi",
                    &[&path],
                ),
                &[],
                CHECK_TIMEOUT,
            )
            .await?;
        let answer = probe.stdout.trim();
        if !probe.succeeded() {
            return Err(remote_failure(
                machine,
                "probe for converge's agent",
                &probe,
            ));
        }
        if answer != "present" {
            let ours = format!("Linux {}", std::env::consts::ARCH);
            if answer != ours {
                return Err(DriverError::Unsupported {
                    what: format!(
                        "hypervisor {machine}, which is `{answer}`: its agent is this converge binary, built for `{ours}`; run converge from a host of the same kind"
                    ),
                });
            }
            let made = t
                .run(
                    &["mkdir", "-p", "-m", "0700", "--", &dir].map(str::to_owned),
                    &[],
                    CHECK_TIMEOUT,
                )
                .await?;
            if !made.succeeded() {
                return Err(remote_failure(machine, "create the agent directory", &made));
            }
            tracing::info!(hypervisor = machine, path = %path, "uploading converge's agent");
            t.upload_file(Path::new(OWN_EXE), &path, AGENT_UPLOAD_TIMEOUT)
                .await?;
            // Agents of other converge builds (and partial uploads) go.
            let pruned = t
                .run(
                    &script(
                        "for f in \"$1\"/converge-*; do [ \"$f\" = \"$2\" ] || rm -f -- \"$f\"; done",
                        &[&dir, &path],
                    ),
                    &[],
                    CHECK_TIMEOUT,
                )
                .await;
            if let Err(error) = pruned {
                tracing::warn!(hypervisor = machine, %error, "removing older agents failed");
            }
        }
        self.mark_present(t, &path);
        Ok(path)
    }

    /// The path on the hypervisor of a local file a spec names, uploading it
    /// (by content) when missing.
    pub async fn ensure_file(
        &self,
        t: &SshTarget,
        state_dir: &str,
        machine: &str,
        local: &Path,
    ) -> Result<PathBuf, DriverError> {
        let meta = tokio::fs::metadata(local)
            .await
            .map_err(|e| io_error("read", local, &e))?;
        let key = (local.to_path_buf(), meta.len(), meta.modified().ok());
        let known = lock(&self.hashes).get(&key).cloned();
        let hash = match known {
            Some(hash) => hash,
            None => {
                let hash = hash_file(local).await?;
                lock(&self.hashes).insert(key, hash.clone());
                hash
            }
        };
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = format!("{state_dir}/vm-files");
        let path = format!("{dir}/{}-{name}", &hash[..32]);
        if self.is_present(t, &path) {
            return Ok(PathBuf::from(path));
        }
        let probe = t
            .run(
                &script(
                    "test -e \"$2\" && exit 0; mkdir -p -m 0700 -- \"$1\" && exit 3",
                    &[&dir, &path],
                ),
                &[],
                CHECK_TIMEOUT,
            )
            .await?;
        match probe.code {
            Some(0) => {}
            Some(3) => {
                tracing::info!(hypervisor = machine, file = %local.display(), path = %path, bytes = meta.len(), "uploading a file the VM spec names");
                t.upload_file(local, &path, FILE_UPLOAD_TIMEOUT).await?;
            }
            _ => return Err(remote_failure(machine, "prepare vm-files", &probe)),
        }
        self.mark_present(t, &path);
        Ok(PathBuf::from(path))
    }

    /// Runs one operation with the agent at `agent` and returns its result.
    pub async fn call(
        &self,
        t: &SshTarget,
        agent: &str,
        machine: &str,
        request: &Request,
    ) -> Result<Value, DriverError> {
        let json = serde_json::to_string(request).map_err(|e| DriverError::Remote {
            hypervisor: machine.to_owned(),
            message: format!("encode a request: {e}"),
            transient: false,
        })?;
        let argv = [agent, "vm-agent", &json].map(str::to_owned);
        let output = match t.run(&argv, &[], request.bound() + TRANSPORT_SLACK).await {
            Ok(output) => output,
            // Removed behind our back: installed again at the next attempt.
            Err(TargetError::Spawn { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                lock(&self.present).remove(&format!("{} {agent}", t.describe()));
                return Err(DriverError::Remote {
                    hypervisor: machine.to_owned(),
                    message: format!(
                        "run converge's agent {agent}: it is gone; it is uploaded again at the next attempt"
                    ),
                    transient: true,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let line = output
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        match serde_json::from_str::<Reply>(line) {
            Ok(reply) if output.succeeded() => into_result(reply, machine),
            _ => Err(remote_failure(machine, "run converge's agent", &output)),
        }
    }
}

/// A reply as a result.
pub fn into_result(reply: Reply, machine: &str) -> Result<Value, DriverError> {
    match reply {
        Reply::Ok(value) => Ok(value),
        Reply::Error(error) => Err(DriverError::Remote {
            hypervisor: machine.to_owned(),
            message: error.message,
            transient: error.transient,
        }),
    }
}

/// A helper command that failed on the hypervisor. Killed by a signal is
/// worth retrying; anything else (a broken binary, a full disk) needs a person.
fn remote_failure(machine: &str, what: &str, output: &super::CommandOutput) -> DriverError {
    let stderr = output.stderr.trim();
    let tail: String = stderr
        .char_indices()
        .rev()
        .nth(2000)
        .map_or(stderr, |(i, _)| &stderr[i..])
        .to_owned();
    DriverError::Remote {
        hypervisor: machine.to_owned(),
        message: format!(
            "{what}: exit {}{}{tail}",
            output
                .code
                .map_or_else(|| "by a signal".to_owned(), |c| c.to_string()),
            if tail.is_empty() { "" } else { ": " },
        ),
        transient: output.code.is_none(),
    }
}
