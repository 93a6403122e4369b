//! Nix on the controller: evaluating and building a NixOS system's toplevel
//! with the `nix` on PATH, turning it into a tiny artifact (the store path
//! and a constant `activate` that sets the system profile and runs the
//! system's `switch-to-configuration`), copying a closure to an SSH target,
//! and the argv that reads a target's current and booted systems.
//!
//! It adds the experimental features it needs itself and leaves NIX_CONFIG
//! alone. Flags that differ between Nix 2.8 (Debian 12) and current Nix are
//! chosen from the version, probed once per process. It must not decide
//! when to build or copy (the controller and the host driver do), and
//! commands are argv vectors: the only shell text is the constant script.

use std::path::Path;
use std::time::Duration;

use tokio::sync::OnceCell;

use super::command::{argv_summary, exit_text};
use super::local::run_process;
use super::target::{NO_INPUT, TargetError};

/// The artifact file that names the system's toplevel store path. An
/// artifact that has one is a NixOS system: its closure is copied before
/// it is installed.
pub const TOPLEVEL_FILE: &str = "nixos-toplevel";
/// The system profile whose generations are the machine's NixOS generations.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

/// The artifact's `activate`: sets the system profile (for modes that
/// change the next boot, as nixos-rebuild does) and runs the system's own
/// `switch-to-configuration MODE`. A rollback activates the previous
/// generation's copy of this script, which sets the profile back.
const ACTIVATE_SCRIPT: &str = r#"#!/bin/sh
# converge: activate a NixOS system: set the system profile, then switch to it
set -eu
here=$(dirname "$0")
toplevel=$(cat "$here/nixos-toplevel")
case $toplevel in
/nix/store/*) ;;
*) echo "converge: $here/nixos-toplevel does not name a store path" >&2; exit 2 ;;
esac
mode=${1:-switch}
case $mode in
switch | boot) nix-env -p /nix/var/nix/profiles/system --set "$toplevel" ;;
esac
exec "$toplevel/bin/switch-to-configuration" "$mode"
"#;

/// How long probing `nix --version` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to build: the resolved flake and attribute (see `spec::flake`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixRequest {
    pub flake: String,
    pub attribute: String,
    /// The flake lies in the desired-state directory, whose build-input
    /// hash the caller's cache key holds (validation refuses others).
    pub in_directory: bool,
}

impl NixRequest {
    /// The request for machine `machine` whose `build.nix.flake` is
    /// `reference`, in the desired-state directory `root`.
    pub fn for_machine(reference: &str, machine: &str, root: &Path) -> NixRequest {
        let resolved = crate::spec::flake::resolve(reference, machine, root);
        NixRequest {
            flake: resolved.flake,
            attribute: resolved.attribute,
            in_directory: resolved.in_directory,
        }
    }

    fn installable(&self) -> String {
        format!("{}#{}", self.flake, self.attribute)
    }
}

/// Why Nix did not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("run `{}`", argv_summary(.argv))]
    Run {
        argv: Vec<String>,
        #[source]
        source: TargetError,
    },
    #[error("`{}`: {}: {stderr}", argv_summary(.argv), exit_text(*.code))]
    Failed {
        argv: Vec<String>,
        code: Option<i32>,
        stderr: String,
    },
    #[error("`{}` within {after:?}", argv_summary(.argv))]
    Timeout { argv: Vec<String>, after: Duration },
    #[error("read the output of `{}`: {what}", argv_summary(.argv))]
    Output { argv: Vec<String>, what: String },
    #[error(
        "pass the ssh option {option:?} in NIX_SSHOPTS, which Nix splits at whitespace: use paths without spaces"
    )]
    SshOption { option: String },
}

impl NixError {
    /// Evaluation errors, failed builds and copies may pass on a retry
    /// (a network, a full disk): the controller's backoff bounds the cost.
    pub fn is_transient(&self) -> bool {
        match self {
            NixError::Run { source, .. } => source.is_transient(),
            NixError::Output { .. } | NixError::SshOption { .. } => false,
            NixError::Failed { .. } | NixError::Timeout { .. } => true,
        }
    }

    /// What Nix printed, for a failure.
    pub fn output(&self) -> Option<&str> {
        match self {
            NixError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// `nix --version` as (major, minor); probed once per process.
async fn version() -> Result<(u32, u32), NixError> {
    static VERSION: OnceCell<(u32, u32)> = OnceCell::const_new();
    VERSION
        .get_or_try_init(|| async {
            let argv = vec!["nix".to_owned(), "--version".to_owned()];
            let out = run(&argv, &[], PROBE_TIMEOUT).await?;
            parse_version(&out).ok_or(NixError::Output {
                argv,
                what: format!("no version in {:?}", out.trim()),
            })
        })
        .await
        .copied()
}

/// `nix (Nix) 2.8.0` → (2, 8).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let word = text.split_whitespace().last()?;
    let mut parts = word.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

/// `nix` with the experimental features converge needs, then `args`.
fn nix(args: &[&str]) -> Vec<String> {
    let mut argv = vec![
        "nix".to_owned(),
        "--extra-experimental-features".to_owned(),
        "nix-command flakes".to_owned(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    argv
}

/// Runs `argv` here; its stdout on success.
async fn run(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<String, NixError> {
    let finished = run_process("local", argv, env, &NO_INPUT, None, timeout)
        .await
        .map_err(|source| NixError::Run {
            argv: argv.to_vec(),
            source,
        })?;
    if finished.timed_out {
        return Err(NixError::Timeout {
            argv: argv.to_vec(),
            after: timeout,
        });
    }
    if !finished.output.succeeded() {
        return Err(NixError::Failed {
            argv: argv.to_vec(),
            code: finished.output.code,
            stderr: finished.output.stderr,
        });
    }
    Ok(finished.output.stdout)
}

/// Evaluates and builds the toplevel; its store path.
pub async fn build_toplevel(request: &NixRequest, timeout: Duration) -> Result<String, NixError> {
    let installable = request.installable();
    // `--print-out-paths` came after 2.8; `--json` is in both.
    let new_flags = version().await? >= (2, 13);
    let argv = if new_flags {
        nix(&["build", "--no-link", "--print-out-paths", &installable])
    } else {
        nix(&["build", "--no-link", "--json", &installable])
    };
    let out = run(&argv, &[], timeout).await?;
    let path = if new_flags {
        out.lines().next().unwrap_or_default().trim().to_owned()
    } else {
        out_path_of_json(&out).unwrap_or_default()
    };
    if !is_store_path(&path) {
        return Err(NixError::Output {
            argv,
            what: format!("no store path in {:?}", out.trim()),
        });
    }
    Ok(path)
}

/// The toplevel's store path, evaluated only (nothing is built): what a
/// plan shows as the new system.
pub async fn evaluate_toplevel(
    request: &NixRequest,
    timeout: Duration,
) -> Result<String, NixError> {
    let installable = format!("{}.outPath", request.installable());
    let argv = nix(&["eval", "--raw", &installable]);
    let out = run(&argv, &[], timeout).await?;
    let path = out.trim().to_owned();
    if !is_store_path(&path) {
        return Err(NixError::Output {
            argv,
            what: format!("no store path in {:?}", out.trim()),
        });
    }
    Ok(path)
}

/// `nix store diff-closures from to`, one line per package that was
/// added, removed or changed version or size; `None` unless both closures
/// are in this host's store.
pub async fn diff_closures(from: &str, to: &str, timeout: Duration) -> Option<Vec<String>> {
    let valid = nix(&["path-info", from, to]);
    run(&valid, &[], timeout).await.ok()?;
    let argv = nix(&["store", "diff-closures", from, to]);
    let out = run(&argv, &[], timeout).await.ok()?;
    Some(
        out.lines()
            .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
            .filter(|l| !l.trim().is_empty())
            .collect(),
    )
}

/// `[{"outputs":{"out":"/nix/store/..."}}]` → the `out` path.
fn out_path_of_json(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(
        value
            .get(0)?
            .get("outputs")?
            .get("out")?
            .as_str()?
            .to_owned(),
    )
}

/// A path directly under /nix/store with nothing that could steer a shell
/// or a terminal.
pub fn is_store_path(path: &str) -> bool {
    path.strip_prefix("/nix/store/").is_some_and(|name| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(c))
    })
}

/// Writes the artifact of `toplevel` into the empty directory `out`.
pub async fn write_artifact(out: &Path, toplevel: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::write(out.join(TOPLEVEL_FILE), format!("{toplevel}\n")).await?;
    let activate = out.join("activate");
    tokio::fs::write(&activate, ACTIVATE_SCRIPT).await?;
    tokio::fs::set_permissions(&activate, std::fs::Permissions::from_mode(0o755)).await
}

/// The toplevel an artifact names, when it is a NixOS system.
pub fn artifact_toplevel(artifact: &Path) -> Option<String> {
    let text = std::fs::read_to_string(artifact.join(TOPLEVEL_FILE)).ok()?;
    let path = text.trim();
    is_store_path(path).then(|| path.to_owned())
}

/// Copies the closure of `path` to `store` (`ssh://user@host`) with
/// `ssh_options` as NIX_SSHOPTS; Nix sends only the paths the target lacks.
pub async fn copy_closure(
    store: &str,
    ssh_options: &[String],
    path: &str,
    timeout: Duration,
) -> Result<(), NixError> {
    if let Some(option) = ssh_options.iter().find(|o| o.contains(char::is_whitespace)) {
        return Err(NixError::SshOption {
            option: option.clone(),
        });
    }
    let argv = nix(&["copy", "--to", store, path]);
    let env = [("NIX_SSHOPTS".to_owned(), ssh_options.join(" "))];
    run(&argv, &env, timeout).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_what_nix_prints() {
        assert_eq!(parse_version("nix (Nix) 2.8.0\n"), Some((2, 8)));
        assert_eq!(parse_version("nix (Nix) 2.24.10"), Some((2, 24)));
        assert_eq!(parse_version("nix (Nix) 2.19pre2023"), Some((2, 19)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn the_out_path_is_read_from_2_8s_json() {
        let json = r#"[{"drvPath":"/nix/store/x.drv","outputs":{"out":"/nix/store/abc-sys"}}]"#;
        assert_eq!(
            out_path_of_json(json).as_deref(),
            Some("/nix/store/abc-sys")
        );
        assert_eq!(out_path_of_json("[]"), None);
    }

    #[test]
    fn only_plain_store_paths_count() {
        assert!(is_store_path(
            "/nix/store/h80195pnsdz14si6him2ziyxsfgaa2cp-a"
        ));
        for bad in [
            "/nix/store/",
            "/nix/store/a/b",
            "/nix/store/a b",
            "/nix/store/a;rm",
            "/tmp/x",
            "/nix/store/a\n",
        ] {
            assert!(!is_store_path(bad), "{bad:?}");
        }
    }
}
