//! converge's own clone of a Git remote (`run --git URL`), through the git
//! command line so that the user's SSH config, credential helpers and
//! `insteadOf` rules apply as they do for `git` itself.
//!
//! The clone is bare (`STATE/git/repo.git`, private); the remote's branch is
//! fetched into `refs/remotes/origin/BRANCH`, and an accepted commit is
//! checked out into a tree of its own with `git worktree add --detach`. This
//! file runs git and reports what it said; it decides nothing (which tip is
//! accepted is the controller's `git_source`). Every command has a time
//! bound, runs with no terminal prompt and with hooks disabled (a hook in
//! the user's `core.hooksPath` has no business in converge's clone), and is
//! an argv vector.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// How long one git command that does not talk to the remote may take.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Kept of a failed command's stderr for the message.
const STDERR_LIMIT: usize = 2000;

/// Why a git command failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("run `{argv}`: is git installed (apt-get install git)?")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("run `{argv}`: no answer within {}s", after.as_secs())]
    TimedOut { argv: String, after: Duration },
    #[error("run `{argv}`: exit {code}: {stderr}")]
    Failed {
        argv: String,
        code: String,
        stderr: String,
    },
    #[error("fetch {url}: the remote cannot be reached or refused access: {stderr}")]
    Unreachable { url: String, stderr: String },
    #[error("fetch {url}: the branch `{branch}` does not exist there (check --branch)")]
    BranchMissing { url: String, branch: String },
    #[error("`{branch}` is not a valid branch name")]
    BadBranch { branch: String },
    #[error("prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl GitError {
    /// Whether trying again later can help (the remote may come back).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GitError::Unreachable { .. } | GitError::TimedOut { .. }
        )
    }
}

/// What signature a commit carries, read from its `gpgsig` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signature {
    None,
    Ssh,
    /// OpenPGP or X.509: not what `--allowed-signers` checks.
    Other,
}

/// `user:password@` in a URL becomes `user:***@`, and any user of an
/// http(s) URL `***@` (a token may stand there), so a token never reaches a
/// log line or `status`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
                // `https://TOKEN@host/`: a token as the user name (GitHub's
                // personal access tokens). An ssh user name is no secret.
                format!("{scheme}://***@{host}{path}")
            } else {
                url.to_owned()
            }
        }
        None => url.to_owned(),
    }
}

/// A private bare clone of one remote.
#[derive(Debug, Clone)]
pub struct GitClone {
    dir: PathBuf,
    url: String,
    /// Bound on a fetch (it talks to the remote).
    fetch_timeout: Duration,
}

impl GitClone {
    /// Opens the clone in `dir` (created 0700 as a bare repository when
    /// missing) and points its `origin` at `url`.
    pub async fn open(
        dir: &Path,
        url: &str,
        fetch_timeout: Duration,
    ) -> Result<GitClone, GitError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let io = |source| GitError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let clone = GitClone {
            dir: dir.to_path_buf(),
            url: url.to_owned(),
            fetch_timeout,
        };
        if !dir.join("HEAD").exists() {
            clone.git(&["init", "--bare", "-q"], LOCAL_TIMEOUT).await?;
        }
        if clone
            .git_ok(&["config", "--get", "remote.origin.url"])
            .await
            .as_deref()
            != Some(url)
        {
            clone
                .git(&["config", "remote.origin.url", url], LOCAL_TIMEOUT)
                .await?;
        }
        Ok(clone)
    }

    /// The remote's URL, with any password hidden.
    pub fn url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks that `branch` is a valid branch name (git's own rules).
    pub async fn check_branch(&self, branch: &str) -> Result<(), GitError> {
        let refname = format!("refs/heads/{branch}");
        if branch.starts_with('-')
            || self
                .git(&["check-ref-format", &refname], LOCAL_TIMEOUT)
                .await
                .is_err()
        {
            return Err(GitError::BadBranch {
                branch: branch.to_owned(),
            });
        }
        Ok(())
    }

    /// Fetches `branch` and returns the commit it points at.
    pub async fn fetch(&self, branch: &str) -> Result<String, GitError> {
        let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        let fetched = self
            .git(
                &["fetch", "--quiet", "--no-tags", "origin", &refspec],
                self.fetch_timeout,
            )
            .await;
        match fetched {
            Ok(_) => {}
            Err(GitError::Failed { stderr, .. }) => {
                // A remote that answers tells apart "no such branch" (exit 2).
                let probe = self
                    .run(
                        &[
                            "ls-remote",
                            "--exit-code",
                            "origin",
                            &format!("refs/heads/{branch}"),
                        ],
                        self.fetch_timeout,
                    )
                    .await;
                if matches!(probe, Ok((Some(2), _, _))) {
                    return Err(GitError::BranchMissing {
                        url: self.url(),
                        branch: branch.to_owned(),
                    });
                }
                return Err(GitError::Unreachable {
                    url: self.url(),
                    stderr,
                });
            }
            Err(other) => return Err(other),
        }
        self.git(
            &[
                "rev-parse",
                "--verify",
                &format!("refs/remotes/origin/{branch}^{{commit}}"),
            ],
            LOCAL_TIMEOUT,
        )
        .await
    }

    /// Whether the clone has `commit`.
    pub async fn has_commit(&self, commit: &str) -> bool {
        self.git_ok(&["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .await
            .is_some()
    }

    /// Whether `tip` descends from `base` (or is it).
    pub async fn is_ancestor(&self, base: &str, tip: &str) -> Result<bool, GitError> {
        let argv = ["merge-base", "--is-ancestor", base, tip];
        match self.run(&argv, LOCAL_TIMEOUT).await? {
            (Some(0), _, _) => Ok(true),
            (Some(1), _, _) => Ok(false),
            (code, _, stderr) => Err(self.failed(&argv, code, &stderr)),
        }
    }

    /// The kind of signature `commit` carries.
    pub async fn signature(&self, commit: &str) -> Result<Signature, GitError> {
        let raw = self
            .git(&["cat-file", "commit", commit], LOCAL_TIMEOUT)
            .await?;
        let headers = raw.split("\n\n").next().unwrap_or("");
        let Some(sig) = headers.lines().find_map(|l| {
            l.strip_prefix("gpgsig ")
                .or(l.strip_prefix("gpgsig-sha256 "))
        }) else {
            return Ok(Signature::None);
        };
        Ok(if sig.trim() == "-----BEGIN SSH SIGNATURE-----" {
            Signature::Ssh
        } else {
            Signature::Other
        })
    }

    /// `git verify-commit` of `commit`'s SSH signature against the
    /// allowed-signers file: `Ok(Ok(what git said))` when it accepts,
    /// `Ok(Err(what git said))` when it refuses.
    pub async fn verify(
        &self,
        commit: &str,
        allowed_signers: &Path,
    ) -> Result<Result<String, String>, GitError> {
        let allowed = format!("gpg.ssh.allowedSignersFile={}", allowed_signers.display());
        let argv = [
            "-c",
            "gpg.format=ssh",
            "-c",
            &allowed,
            "verify-commit",
            commit,
        ];
        let (code, _, stderr) = self.run(&argv, LOCAL_TIMEOUT).await?;
        let said = stderr.lines().map(str::trim).collect::<Vec<_>>().join("; ");
        Ok(if code == Some(0) { Ok(said) } else { Err(said) })
    }

    /// Checks `commit` out into `into` (a new directory), detached.
    pub async fn check_out(&self, commit: &str, into: &Path) -> Result<(), GitError> {
        let _ = self.git_ok(&["worktree", "prune"]).await;
        let path = into.to_string_lossy();
        self.git(
            &[
                "worktree", "add", "--quiet", "--detach", "--force", &path, commit,
            ],
            LOCAL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    /// Removes a tree [`GitClone::check_out`] made.
    pub async fn remove_checkout(&self, tree: &Path) -> Result<(), GitError> {
        let path = tree.to_string_lossy();
        if self
            .git(&["worktree", "remove", "--force", &path], LOCAL_TIMEOUT)
            .await
            .is_err()
            && tree.exists()
        {
            std::fs::remove_dir_all(tree).map_err(|source| GitError::Io {
                path: tree.to_path_buf(),
                source,
            })?;
        }
        let _ = self.git_ok(&["worktree", "prune"]).await;
        Ok(())
    }

    async fn git_ok(&self, args: &[&str]) -> Option<String> {
        self.git(args, LOCAL_TIMEOUT).await.ok()
    }

    /// Runs git; its trimmed stdout when it exits 0.
    async fn git(&self, args: &[&str], timeout: Duration) -> Result<String, GitError> {
        match self.run(args, timeout).await? {
            (Some(0), stdout, _) => Ok(stdout.trim().to_owned()),
            (code, _, stderr) => Err(self.failed(args, code, &stderr)),
        }
    }

    fn failed(&self, args: &[&str], code: Option<i32>, stderr: &str) -> GitError {
        GitError::Failed {
            argv: self.argv(args),
            code: code.map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
            stderr: stderr.trim().to_owned(),
        }
    }

    /// `git ARGS` as shown in messages: a URL argument is redacted.
    fn argv(&self, args: &[&str]) -> String {
        std::iter::once("git".to_owned())
            .chain(args.iter().map(|a| redact_url(a)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs `git -C DIR ARGS`: exit code, stdout, stderr (its tail).
    async fn run(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<(Option<i32>, String, String), GitError> {
        let mut command = Command::new("git");
        command
            .arg("-C")
            .arg(&self.dir)
            .args(["-c", "core.hooksPath=/dev/null"])
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| GitError::Spawn {
            argv: self.argv(args),
            source,
        })?;
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(source)) => {
                return Err(GitError::Spawn {
                    argv: self.argv(args),
                    source,
                });
            }
            Err(_) => {
                return Err(GitError::TimedOut {
                    argv: self.argv(args),
                    after: timeout,
                });
            }
        };
        let mut stderr = output.stderr;
        super::command::trim_front(&mut stderr, STDERR_LIMIT);
        Ok((
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&stderr).into_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_url_is_hidden() {
        assert_eq!(
            redact_url("https://bot:s3cret@example.com/fleet.git"),
            "https://bot:***@example.com/fleet.git"
        );
        assert_eq!(
            redact_url("https://ghp_T0KEN@github.com/me/fleet.git"),
            "https://***@github.com/me/fleet.git",
            "a token as the user name"
        );
        for kept in [
            "https://example.com/fleet.git",
            "ssh://git@example.com/fleet.git",
            "git@example.com:fleet.git",
            "/srv/fleet.git",
        ] {
            assert_eq!(redact_url(kept), kept);
        }
    }

    #[tokio::test]
    async fn fetch_tells_a_missing_branch_from_an_unreachable_remote() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = tmp.path().join("remote.git");
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .args(args)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            remote.to_str().unwrap(),
        ]);
        let work = tmp.path().join("work");
        git(&[
            "clone",
            "-q",
            remote.to_str().unwrap(),
            work.to_str().unwrap(),
        ]);
        let w = work.to_str().unwrap();
        git(&[
            "-C",
            w,
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "one",
        ]);
        git(&["-C", w, "push", "-q", "origin", "HEAD:main"]);

        let clone = GitClone::open(
            &tmp.path().join("clone"),
            remote.to_str().unwrap(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let tip = clone.fetch("main").await.unwrap();
        assert_eq!(tip.len(), 40, "{tip}");
        assert!(clone.has_commit(&tip).await);
        assert_eq!(clone.signature(&tip).await.unwrap(), Signature::None);
        assert!(matches!(
            clone.fetch("nope").await,
            Err(GitError::BranchMissing { .. })
        ));
        assert!(clone.check_branch("a..b").await.is_err());

        let gone = GitClone::open(
            &tmp.path().join("clone2"),
            tmp.path().join("missing.git").to_str().unwrap(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let err = gone.fetch("main").await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    }
}
