//! The revision of the desired-state directory: which Git commit it is, and
//! the identity of what a build can read besides its spec.
//!
//! The revision shown to users is the Git commit (with a dirty flag) when
//! the directory is in a Git checkout. The build input is always a blake3
//! content hash of every file under the directory except the YAML documents
//! and hidden entries (such as `.git`): build scripts, templates, images.
//! The YAML documents are left out on purpose: their meaning reaches a build
//! through the machine's build section and its roles document, both part of
//! the build cache key; hashing them too would rebuild every machine when
//! any one document changed. Uncommitted edits count, so a dirty checkout
//! never reuses a stale build. Never fails: a directory git cannot read is
//! simply not a Git checkout.

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

/// Reads the revision of `dir`.
pub fn revision(dir: &Path) -> Revision {
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
        build_input: format!("content:{}", content_hash(dir)),
    }
}

/// blake3 over every non-hidden, non-YAML file below `dir`: relative path,
/// executable bit, contents (symlinks: their target), in sorted order.
pub fn content_hash(dir: &Path) -> String {
    let mut files = Vec::new();
    collect(dir, Path::new(""), 0, &mut files);
    files.sort();
    let mut hasher = blake3::Hasher::new();
    for relative in files {
        let path = dir.join(&relative);
        let name = relative.to_string_lossy();
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = std::fs::read_link(&path).unwrap_or_default();
                hasher.update(b"L");
                hasher.update(target.to_string_lossy().as_bytes());
            }
            Ok(meta) => {
                use std::os::unix::fs::PermissionsExt;
                let exec = meta.permissions().mode() & 0o111 != 0;
                hasher.update(if exec { b"X" } else { b"F" });
                if let Ok(mut f) = std::fs::File::open(&path) {
                    let _ = std::io::copy(&mut f, &mut hasher);
                }
            }
            Err(_) => {
                hasher.update(b"?");
            }
        }
    }
    hasher.finalize().to_hex().to_string()
}

fn collect(root: &Path, relative: &Path, depth: usize, out: &mut Vec<std::path::PathBuf>) {
    if depth > 32 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root.join(relative)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.starts_with('.') || text.ends_with(".yaml") || text.ends_with(".yml") {
            continue;
        }
        let path = relative.join(&name);
        match entry.file_type() {
            Ok(t) if t.is_dir() => collect(root, &path, depth + 1, out),
            Ok(_) => out.push(path),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_changes_with_contents_and_exec_bit_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("build.sh"), "echo 1\n").unwrap();
        std::fs::write(dir.path().join("a.yaml"), "x: 1\n").unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        let first = content_hash(dir.path());
        std::fs::write(dir.path().join("a.yaml"), "x: 2\n").unwrap();
        assert_eq!(
            first,
            content_hash(dir.path()),
            "YAML documents do not count"
        );
        assert_eq!(first, content_hash(dir.path()));
        std::fs::write(dir.path().join(".git/ignored"), "y").unwrap();
        assert_eq!(
            first,
            content_hash(dir.path()),
            "hidden entries do not count"
        );
        std::fs::write(dir.path().join("build.sh"), "echo 2\n").unwrap();
        let second = content_hash(dir.path());
        assert_ne!(first, second);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("build.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_ne!(second, content_hash(dir.path()));
    }

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
        let clean = revision(&sub);
        assert!(clean.commit.is_some());
        assert!(!clean.dirty);
        assert!(clean.build_input.starts_with("content:"), "{clean:?}");
        std::fs::write(sub.join("a.yaml"), "x: 2\n").unwrap();
        let dirty = revision(&sub);
        assert!(dirty.dirty);
        assert_eq!(
            dirty.build_input, clean.build_input,
            "YAML edits reach builds through spec and roles hashes"
        );
        assert!(dirty.short().ends_with("-dirty"));
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("a.yaml"), "x: 1\n").unwrap();
        assert_eq!(revision(outside.path()).commit, None);
    }
}
