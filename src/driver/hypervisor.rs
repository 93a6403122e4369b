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
//! Every step is bounded: the checks by [`CHECK_TIMEOUT`], an upload by
//! [`upload_bound`] of its size, an operation by its own bound plus
//! [`TRANSPORT_SLACK`]. Uploads to one destination are serialized, and a
//! destination some other process filled meanwhile counts as done.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::capability::DriverError;
use super::qemu::agent::{Reply, Request};
use super::ssh::SshTarget;
use super::target::{CommandOutput, Target, TargetError};

// Re-exported so its path stays `driver::hypervisor::HypervisorError`; it
// lives in `hypervisor_error.rs`, below `capability.rs`.
pub use super::hypervisor_error::HypervisorError;

/// Bound on a presence or kind check on the hypervisor.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// Added to an operation's own bound for the SSH round trip and agent start.
const TRANSPORT_SLACK: Duration = Duration::from_secs(15);
/// The running binary, readable even when its file was replaced or removed.
const OWN_EXE: &str = "/proc/self/exe";
/// Agents of other builds are removed once this old (another controller of
/// another build may still use its own).
const OLD_AGENT_MINUTES: &str = "1440";

/// Bound on uploading `bytes`: a minute, plus a second per MiB (1 MiB/s at
/// worst, as a slow link).
fn upload_bound(bytes: u64) -> Duration {
    Duration::from_secs(60 + bytes / (1024 * 1024))
}

/// A local file as of one version: path, length, modification time.
type FileVersion = (PathBuf, u64, Option<SystemTime>);

/// What this process knows about hypervisors: its own binary's hash, the
/// agents known to be in place, the hashes of uploaded files, and one lock
/// per upload destination.
#[derive(Debug, Default)]
pub struct Agents {
    own_hash: tokio::sync::OnceCell<String>,
    /// `destination path` of agents known to exist on their host.
    present: Mutex<HashSet<String>>,
    /// Content hash of a local file by path, length and modification time.
    hashes: Mutex<HashMap<FileVersion, String>>,
    /// One lock per `destination path`, so one process uploads a file once.
    uploads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// blake3 of a file's content, hex.
async fn hash_file(path: &Path) -> Result<String, HypervisorError> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut hasher = blake3::Hasher::new();
        let mut file = std::fs::File::open(&owned)?;
        std::io::copy(&mut file, &mut hasher)?;
        Ok(hasher.finalize().to_hex().to_string())
    })
    .await
    .unwrap_or_else(|join| Err(std::io::Error::other(join)));
    hashed.map_err(|source| HypervisorError::Hash {
        path: path.to_path_buf(),
        source,
    })
}

/// `sh -c SCRIPT sh ARGS...` as an argv.
fn script(script: &str, args: &[&str]) -> Vec<String> {
    ["sh", "-c", script, "sh"]
        .iter()
        .chain(args)
        .map(|s| (*s).to_owned())
        .collect()
}

/// The last non-empty line of a command's stdout (a login script may print
/// before it).
fn last_line(stdout: &str) -> &str {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

fn failed(machine: &str, what: &'static str, output: &CommandOutput) -> HypervisorError {
    let stderr = output.stderr.trim();
    let tail = stderr
        .char_indices()
        .rev()
        .nth(2000)
        .map_or(stderr, |(i, _)| &stderr[i..]);
    HypervisorError::Command {
        machine: machine.to_owned(),
        what,
        code: output.code,
        stderr: tail.to_owned(),
    }
}

impl Agents {
    async fn own_hash(&self) -> Result<&str, HypervisorError> {
        self.own_hash
            .get_or_try_init(|| hash_file(Path::new(OWN_EXE)))
            .await
            .map(String::as_str)
    }

    fn key(t: &SshTarget, path: &str) -> String {
        format!("{} {path}", t.describe())
    }

    fn upload_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(lock(&self.uploads).entry(key.to_owned()).or_default())
    }

    /// Uploads `local` to `path` unless it is there already (checked after
    /// taking this destination's lock). A destination that another process
    /// filled while we uploaded counts as done: it is content-addressed.
    async fn upload_once(
        &self,
        t: &SshTarget,
        machine: &str,
        local: &Path,
        path: &str,
        what: &'static str,
    ) -> Result<(), DriverError> {
        let before = tokio::fs::metadata(local)
            .await
            .map_err(|source| HypervisorError::Hash {
                path: local.to_path_buf(),
                source,
            })?;
        tracing::info!(hypervisor = machine, file = %local.display(), path, bytes = before.len(), "uploading {what}");
        let uploaded = t.upload_file(local, path, upload_bound(before.len())).await;
        let exists = || async {
            t.run(&["test", "-e", path].map(str::to_owned), &[], CHECK_TIMEOUT)
                .await
                .is_ok_and(|o| o.succeeded())
        };
        match uploaded {
            Ok(()) => {}
            Err(_) if exists().await => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let after = tokio::fs::metadata(local).await.ok();
        let unchanged = after.is_some_and(|a| {
            a.len() == before.len() && a.modified().ok() == before.modified().ok()
        });
        if !unchanged {
            let removed = t
                .run(
                    &["rm", "-f", "--", path].map(str::to_owned),
                    &[],
                    CHECK_TIMEOUT,
                )
                .await;
            if let Err(error) = removed {
                tracing::warn!(hypervisor = machine, path, %error, "removing a changed upload failed");
            }
            return Err(HypervisorError::Changed {
                machine: machine.to_owned(),
                path: local.to_path_buf(),
            }
            .into());
        }
        Ok(())
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
        let key = Self::key(t, &path);
        if lock(&self.present).contains(&key) {
            return Ok(path);
        }
        let one = self.upload_lock(&key);
        let _held = one.lock().await;
        if lock(&self.present).contains(&key) {
            return Ok(path);
        }
        // Present already, or which kind of host it is (and make room).
        let probe = t
            .run(
                &script(
                    "if test -x \"$2\"; then echo present; else mkdir -p -m 0700 -- \"$1\" && uname -sm; fi",
                    &[&dir, &path],
                ),
                &[],
                CHECK_TIMEOUT,
            )
            .await?;
        if !probe.succeeded() {
            return Err(failed(machine, "probe for converge's agent", &probe).into());
        }
        let answer = last_line(&probe.stdout);
        if answer != "present" {
            let ours = format!("Linux {}", std::env::consts::ARCH);
            if answer != ours {
                return Err(HypervisorError::Incompatible {
                    machine: machine.to_owned(),
                    remote: answer.to_owned(),
                    local: ours,
                }
                .into());
            }
            self.upload_once(t, machine, Path::new(OWN_EXE), &path, "converge's agent")
                .await?;
            // Agents of other builds go once a day old; partial uploads stay
            // (another process may be writing one).
            let pruned = t
                .run(
                    &[
                        "find",
                        &dir,
                        "-maxdepth",
                        "1",
                        "-type",
                        "f",
                        "-name",
                        "converge-*",
                        "!",
                        "-name",
                        "*.partial-*",
                        "!",
                        "-path",
                        &path,
                        "-mmin",
                        &format!("+{OLD_AGENT_MINUTES}"),
                        "-delete",
                    ]
                    .map(str::to_owned),
                    &[],
                    CHECK_TIMEOUT,
                )
                .await;
            match pruned {
                Ok(out) if out.succeeded() => {}
                Ok(out) => {
                    let error = failed(machine, "remove older agents", &out);
                    tracing::warn!(hypervisor = machine, %error, "removing older agents failed");
                }
                Err(error) => {
                    tracing::warn!(hypervisor = machine, %error, "removing older agents failed");
                }
            }
        }
        lock(&self.present).insert(key);
        Ok(path)
    }

    /// The path on the hypervisor of a local file a spec names, uploading it
    /// (by content) when missing. Checked on the hypervisor every time
    /// (starts and disk creations are rare), so a cleared `vm-files/` is
    /// filled again.
    pub async fn ensure_file(
        &self,
        t: &SshTarget,
        state_dir: &str,
        machine: &str,
        local: &Path,
    ) -> Result<PathBuf, DriverError> {
        let meta = tokio::fs::metadata(local)
            .await
            .map_err(|source| HypervisorError::Hash {
                path: local.to_path_buf(),
                source,
            })?;
        let version = (local.to_path_buf(), meta.len(), meta.modified().ok());
        let known = lock(&self.hashes).get(&version).cloned();
        let hash = match known {
            Some(hash) => hash,
            None => {
                let hash = hash_file(local).await?;
                lock(&self.hashes).insert(version, hash.clone());
                hash
            }
        };
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = format!("{state_dir}/vm-files");
        let path = format!("{dir}/{}-{name}", &hash[..32]);
        let one = self.upload_lock(&Self::key(t, &path));
        let _held = one.lock().await;
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
                self.upload_once(t, machine, local, &path, "a file the VM spec names")
                    .await?;
            }
            _ => return Err(failed(machine, "prepare vm-files", &probe).into()),
        }
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
        let json = serde_json::to_string(request).map_err(|source| HypervisorError::Encode {
            machine: machine.to_owned(),
            source,
        })?;
        let argv = [agent, "vm-agent", &json].map(str::to_owned);
        let output = match t.run(&argv, &[], request.bound() + TRANSPORT_SLACK).await {
            Ok(output) => output,
            // Removed behind our back: installed again at the next attempt.
            Err(TargetError::Spawn { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                lock(&self.present).remove(&Self::key(t, agent));
                return Err(HypervisorError::AgentGone {
                    machine: machine.to_owned(),
                    path: agent.to_owned(),
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        if !output.succeeded() {
            return Err(failed(machine, "run converge's agent", &output).into());
        }
        let reply: Reply = serde_json::from_str(last_line(&output.stdout)).map_err(|source| {
            HypervisorError::Decode {
                machine: machine.to_owned(),
                source,
            }
        })?;
        Ok(into_result(reply, machine)?)
    }
}

/// A reply as a result.
pub fn into_result(reply: Reply, machine: &str) -> Result<Value, HypervisorError> {
    match reply {
        Reply::Ok(value) => Ok(value),
        Reply::Error(error) => Err(HypervisorError::Operation {
            machine: machine.to_owned(),
            message: error.message,
            transient: error.transient,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbed::{REMOTE_STATE_DIR, Testbed};

    fn target(testbed: &Testbed) -> SshTarget {
        SshTarget::new(crate::driver::ssh::testbed_options(&testbed.client(0))).expect("ssh target")
    }

    #[tokio::test]
    async fn one_file_for_many_vms_ends_as_one_copy_and_is_filled_again_when_cleared() {
        let testbed = Testbed::new(1);
        let t = target(&testbed);
        let agents = Agents::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("base.qcow2");
        std::fs::write(&image, vec![7u8; 3 * 1024 * 1024]).expect("write");

        // Eight VMs asking at once: one upload, one path, all succeed.
        let asks = (0..8).map(|_| agents.ensure_file(&t, REMOTE_STATE_DIR, "host0", &image));
        let paths: Vec<PathBuf> = futures::future::join_all(asks)
            .await
            .into_iter()
            .map(|r| r.expect("ensure_file"))
            .collect();
        assert!(paths.iter().all(|p| *p == paths[0]), "{paths:?}");
        let name = paths[0].file_name().expect("a file name").to_owned();
        let on_host = testbed.host(0).state_dir.join("vm-files");
        let entries: Vec<_> = std::fs::read_dir(&on_host)
            .expect("vm-files on the host")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(entries, vec![name.clone()], "no partial or second copy");
        assert_eq!(
            std::fs::read(on_host.join(&name)).expect("read the upload"),
            std::fs::read(&image).expect("read the image")
        );

        // Someone clears vm-files: the next use puts it back.
        std::fs::remove_dir_all(&on_host).expect("clear vm-files");
        let again = agents
            .ensure_file(&t, REMOTE_STATE_DIR, "host0", &image)
            .await
            .expect("ensure_file after clearing");
        assert_eq!(again, paths[0]);
        assert!(on_host.join(&name).exists());
        t.disconnect().await;
    }

    #[tokio::test]
    async fn an_agent_removed_behind_our_back_is_a_transient_error_that_forgets_it() {
        let testbed = Testbed::new(1);
        let t = target(&testbed);
        let agents = Agents::default();
        let agent = format!("{REMOTE_STATE_DIR}/agent/converge-gone");
        lock(&agents.present).insert(Agents::key(&t, &agent));
        let request = Request::RunningPid {
            dir: PathBuf::from("/nowhere"),
        };

        let error = agents
            .call(&t, &agent, "host0", &request)
            .await
            .expect_err("a missing agent cannot answer");

        assert!(
            matches!(
                error,
                DriverError::Hypervisor(HypervisorError::AgentGone { .. })
            ),
            "{error:?}"
        );
        assert!(error.is_transient(), "retried, not stalled");
        assert!(
            !lock(&agents.present).contains(&Agents::key(&t, &agent)),
            "the next attempt installs it again"
        );
        t.disconnect().await;
    }
}
