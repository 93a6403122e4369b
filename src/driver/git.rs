//! The revision of the desired-state directory: which Git commit it is, and
//! the identity of what a build can read besides its spec.
//!
//! The revision shown to users is the Git commit (with a dirty flag) when
//! the directory is in a Git checkout, asked of the git command line; the
//! build input beside it is the content hash `source::content_hash` gives.
//! Never fails: a directory git cannot read is simply not a Git checkout.

use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// Which commit the directory is at, and what its builds read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The commit id, when the directory is in a Git checkout.
    pub commit: Option<String>,
    /// Uncommitted changes (or untracked files) under the directory.
    pub dirty: bool,
    /// `content:<blake3>` of the non-YAML files: changes when a file a build can read changes.
    pub build_input: String,
}

impl Revision {
    /// Short form for logs and tables: `1a2b3c4d`, `1a2b3c4d-dirty`, `content:1a2b3c4d`.
    pub fn short(&self) -> String {
        match &self.commit {
            Some(commit) => {
                let short: String = commit.chars().take(8).collect();
                if self.dirty {
                    format!("{short}-dirty")
                } else {
                    short
                }
            }
            None => {
                let hash = self.build_input.trim_start_matches("content:");
                format!("content:{}", hash.chars().take(8).collect::<String>())
            }
        }
    }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Reads the revision of `dir`; `build_input` is the content hash of what
/// its builds read (`source::content_hash`).
pub fn revision(dir: &Path, build_input: &str) -> Revision {
    let commit = git(dir, &["rev-parse", "--verify", "--quiet", "HEAD"]).filter(|c| !c.is_empty());
    let dirty = commit.is_some()
        && git(
            dir,
            &[
                "status",
                "--porcelain",
                "--untracked-files=normal",
                "--",
                ".",
            ],
        )
        .is_none_or(|s| !s.is_empty());
    Revision {
        commit,
        dirty,
        build_input: format!("content:{build_input}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_names_the_commit_and_whether_it_is_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("desired");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("a.yaml"), "x: 1\n").unwrap();
        let run = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        run(&["init", "-q"]);
        run(&["-c", "user.name=t", "-c", "user.email=t@t", "add", "."]);
        run(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "x",
        ]);
        let clean = revision(&sub, "h");
        assert!(clean.commit.is_some());
        assert!(!clean.dirty);
        assert!(clean.build_input.starts_with("content:"), "{clean:?}");
        std::fs::write(sub.join("a.yaml"), "x: 2\n").unwrap();
        let dirty = revision(&sub, "h");
        assert!(dirty.dirty);
        assert!(dirty.short().ends_with("-dirty"));
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("a.yaml"), "x: 1\n").unwrap();
        assert_eq!(revision(outside.path(), "h").commit, None);
    }
}
