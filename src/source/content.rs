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
//! editor (which writes a backup beside it) changes nothing. The directory
//! is walked as the loader walks it (`walk.rs`), and only regular files are
//! opened: a FIFO, socket or device, a symlink leaving the directory or an
//! unreadable file is an error that makes the directory invalid, not a hang.

use std::path::Path;

use super::walk::{self, EntryError, Found, ReadError};
use crate::spec::diagnostic::escape_path;

/// blake3 over every file below `dir` but YAML documents and ignored names,
/// in sorted order: relative path, executable bit, contents; a symlink also
/// adds its target as written. It walks the directory as the loader does
/// and opens only regular files, so an entry the loader rejects (a FIFO, a
/// dangling link, a link out of the directory, a name that is not UTF-8) or
/// a file that cannot be read is an error here too, never a hang or a
/// silent skip.
pub fn content_hash(dir: &Path) -> Result<String, ContentError> {
    content_hash_excluding(dir, &[])
}

/// [`content_hash`] with the files `excluded` (relative paths) left out.
pub fn content_hash_excluding(dir: &Path, excluded: &[String]) -> Result<String, ContentError> {
    let walked = walk::walk(dir);
    if !walked.errors.is_empty() {
        return Err(ContentError {
            errors: walked.errors,
        });
    }
    let mut files: Vec<Found> = walked
        .files
        .into_iter()
        .filter(|f| {
            let name = f.relative.to_string_lossy();
            let document = name.ends_with(".yaml") || name.ends_with(".yml");
            let left_out = excluded
                .iter()
                .any(|e| Path::new(e) == f.relative.as_path());
            !(document || left_out)
        })
        .collect();
    files.sort_by(|a, b| a.relative.cmp(&b.relative));
    let mut hasher = blake3::Hasher::new();
    let mut errors = Vec::new();
    for found in files {
        let name = found.relative.to_string_lossy();
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        if let Some(target) = &found.link {
            let target = target.to_string_lossy();
            hasher.update(b"L");
            hasher.update(&(target.len() as u64).to_le_bytes());
            hasher.update(target.as_bytes());
        }
        if let Err(error) = hash_file(&found, &mut hasher) {
            errors.push(EntryError::Unreadable {
                path: escape_path(&found.relative),
                error: match error {
                    ReadError::Io(e) => e,
                    other => std::io::Error::other(other),
                },
            });
        }
    }
    if errors.is_empty() {
        Ok(hasher.finalize().to_hex().to_string())
    } else {
        Err(ContentError { errors })
    }
}

fn hash_file(found: &Found, hasher: &mut blake3::Hasher) -> Result<(), ReadError> {
    use std::os::unix::fs::PermissionsExt;
    let (mut file, meta) = walk::open_regular(&found.open)?;
    let exec = meta.permissions().mode() & 0o111 != 0;
    hasher.update(if exec { b"X" } else { b"F" });
    std::io::copy(&mut file, hasher)?;
    Ok(())
}

/// Entries of the directory the build-input hash could not read; the
/// directory is invalid while they are there.
#[derive(Debug, thiserror::Error)]
#[error("read the build inputs of the desired-state directory: {}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ContentError {
    pub errors: Vec<EntryError>,
}

/// What a build could change in the directory: every file the walk finds
/// (documents included), with what says it changed (size, modification
/// time, inode).
pub type Listing = std::collections::BTreeMap<String, (u64, i64, i64, u64)>;

/// The [`Listing`] of `dir` now. Entries the walk rejects are left out: they
/// make the directory invalid on the next load anyway.
pub fn listing(dir: &Path) -> Listing {
    use std::os::unix::fs::MetadataExt;
    walk::walk(dir)
        .files
        .into_iter()
        .filter_map(|found| {
            let meta = std::fs::symlink_metadata(dir.join(&found.relative)).ok()?;
            Some((
                found.relative.to_string_lossy().into_owned(),
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
        let first = content_hash(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.yaml"), "x: 2\n").unwrap();
        assert_eq!(
            first,
            content_hash(dir.path()).unwrap(),
            "YAML documents do not count"
        );
        assert_eq!(first, content_hash(dir.path()).unwrap());
        std::fs::write(dir.path().join(".git/ignored"), "y").unwrap();
        assert_eq!(
            first,
            content_hash(dir.path()).unwrap(),
            "hidden entries do not count"
        );
        std::fs::write(dir.path().join("build.sh"), "echo 2\n").unwrap();
        let second = content_hash(dir.path()).unwrap();
        assert_ne!(first, second);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("build.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_ne!(second, content_hash(dir.path()).unwrap());
    }

    #[test]
    fn an_editor_backup_or_swap_file_does_not_change_the_build_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("build.sh"), "echo 1\n").unwrap();
        let before = content_hash(dir.path()).unwrap();
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
                content_hash(dir.path()).unwrap(),
                "{name} changed the build input"
            );
        }
        std::fs::write(dir.path().join("template.txt"), "a real input\n").unwrap();
        assert_ne!(
            before,
            content_hash(dir.path()).unwrap(),
            "a new file a build can read counts"
        );
    }

    #[test]
    fn a_file_reached_through_a_link_counts_by_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".scripts")).unwrap();
        std::fs::write(dir.path().join(".scripts/build.sh"), "echo 1\n").unwrap();
        std::os::unix::fs::symlink(".scripts/build.sh", dir.path().join("build.sh")).unwrap();
        let before = content_hash(dir.path()).unwrap();
        std::fs::write(dir.path().join(".scripts/build.sh"), "echo 2\n").unwrap();
        assert_ne!(before, content_hash(dir.path()).unwrap());
    }

    #[test]
    fn an_entry_the_loader_rejects_is_an_error_here_too() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("build.sh"), "echo 1\n").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("input"))
            .unwrap();
        let error = content_hash(dir.path()).unwrap_err();
        assert_eq!(error.errors.len(), 1);
        assert_eq!(error.errors[0].path(), "input");
    }
}
