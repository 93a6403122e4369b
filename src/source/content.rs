//! The build input of the desired-state directory: a blake3 hash of every
//! file a build can read there, which changes exactly when such a file does.
//!
//! Every file under the directory counts except the YAML documents and what
//! the loader ignores too (hidden entries such as `.git`, editor backups and
//! temporary files: `*~`, `.#*`, `#*`, `*.swp`, ...): build scripts,
//! templates, images. The YAML documents are left out on purpose: their
//! meaning reaches a build through the machine's build section and its roles
//! document, both part of the build cache key; hashing them too would
//! rebuild every machine when any one document changed. Uncommitted edits
//! count, so a dirty checkout never reuses a stale build. Saving a file in an
//! editor (which writes a backup beside it) changes nothing.

use std::path::{Path, PathBuf};

use super::ignored::is_ignored_name;

/// blake3 over every file below `dir` but YAML documents and ignored names: relative path,
/// executable bit, contents (symlinks: their target), in sorted order.
pub fn content_hash(dir: &Path) -> String {
    content_hash_excluding(dir, &[])
}

/// [`content_hash`] with the files `excluded` (relative paths) left out.
pub fn content_hash_excluding(dir: &Path, excluded: &[String]) -> String {
    let mut files = Vec::new();
    collect(dir, Path::new(""), 0, &mut files);
    files.retain(|f| !excluded.iter().any(|e| Path::new(e) == f.as_path()));
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

fn collect(root: &Path, relative: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 32 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root.join(relative)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if is_ignored_name(&text) || text.ends_with(".yaml") || text.ends_with(".yml") {
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

/// What a build could change in the directory: every file the content
/// hash covers, with what says it changed (size, modification time, inode).
pub type Listing = std::collections::BTreeMap<String, (u64, i64, i64, u64)>;

/// The [`Listing`] of `dir` now.
pub fn listing(dir: &Path) -> Listing {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    collect(dir, Path::new(""), 0, &mut files);
    files
        .into_iter()
        .filter_map(|relative| {
            let meta = std::fs::symlink_metadata(dir.join(&relative)).ok()?;
            Some((
                relative.to_string_lossy().into_owned(),
                (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()),
            ))
        })
        .collect()
}

/// The files that differ between two listings (added, removed or changed).
pub fn changed_files(before: &Listing, after: &Listing) -> Vec<String> {
    let mut changed: Vec<String> = after
        .iter()
        .filter(|(name, stamp)| before.get(*name) != Some(stamp))
        .map(|(name, _)| name.clone())
        .collect();
    changed.extend(before.keys().filter(|n| !after.contains_key(*n)).cloned());
    changed.sort();
    changed
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
    fn an_editor_backup_or_swap_file_does_not_change_the_build_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("build.sh"), "echo 1\n").unwrap();
        let before = content_hash(dir.path());
        for name in [
            "build.sh~",
            ".#build.sh",
            "#build.sh#",
            ".build.sh.swp",
            "build.sh.swp",
            "build.sh.orig",
        ] {
            std::fs::write(dir.path().join(name), "an editor's copy\n").unwrap();
            assert_eq!(
                before,
                content_hash(dir.path()),
                "{name} changed the build input"
            );
        }
        std::fs::write(dir.path().join("template.txt"), "a real input\n").unwrap();
        assert_ne!(
            before,
            content_hash(dir.path()),
            "a new file a build can read counts"
        );
    }
}
