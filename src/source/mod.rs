//! The desired-state directory: finding, reading and caching its YAML files.
//!
//! Walks the directory (recursively, `.yaml`/`.yml` only; hidden files and
//! directories, editor backups and temporary files ignored), reads each file
//! and hands the bytes to [`crate::spec::parse`]. Parsed and checked files
//! are cached by fingerprint (size, mtime, inode), so a reload after one file
//! changed parses and checks only that file; the previous
//! [`Resolution`] is kept too, so roles are resolved again only when their
//! inputs changed. It never decides what the result means: an invalid
//! directory is returned as diagnostics, and the caller keeps its last valid
//! desired state.

mod content;
mod ignored;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::spec::parse::{ParsedFile, parse_file};
use crate::spec::{Assembled, CheckedFile, Diagnostic, Resolution, Severity, assemble_with};

pub use content::{Listing, changed_files, content_hash, content_hash_excluding, listing};
use ignored::is_ignored_name;

/// Directories nested deeper than this are not walked.
const MAX_DEPTH: usize = 32;

/// A file modified this shortly before it was read may be rewritten within
/// the same timestamp tick (coarse on many filesystems) with the same size,
/// which its fingerprint cannot see; such a file is parsed again next load.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Why the directory could not be read at all (a bad file is a diagnostic, not this).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("read desired-state directory {path}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read desired-state directory {path}: it is not a directory")]
    NotADirectory { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug)]
struct CachedFile {
    fingerprint: Fingerprint,
    /// Modified within [`RACY_WINDOW`] of being read: not reused.
    racy: bool,
    checked: CheckedFile,
}

/// What one load did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    pub files: usize,
    pub parsed: usize,
    pub reused: usize,
    pub micros: u128,
}

/// A desired-state directory, the cache of its parsed files, and the roles
/// resolution of the last load.
#[derive(Debug)]
pub struct Source {
    root: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    resolution: Resolution,
}

impl Source {
    pub fn new(root: impl Into<PathBuf>) -> Source {
        Source {
            root: root.into(),
            files: BTreeMap::new(),
            resolution: Resolution::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether converge reads this file (by name only).
    pub fn is_desired_state_file(path: &Path) -> bool {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        !is_ignored_name(name) && (name.ends_with(".yaml") || name.ends_with(".yml"))
    }

    /// Reads the directory, parsing only files that changed since the last
    /// load, and assembles the desired state.
    pub fn load(&mut self) -> Result<(Assembled, LoadStats), SourceError> {
        let started = Instant::now();
        let meta = std::fs::metadata(&self.root).map_err(|source| SourceError::Root {
            path: self.root.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SourceError::NotADirectory {
                path: self.root.clone(),
            });
        }
        let mut found: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
        let mut walk_errors: Vec<Diagnostic> = Vec::new();
        walk(&self.root, Path::new(""), 0, &mut found, &mut walk_errors);

        let mut stats = LoadStats {
            files: found.len(),
            ..LoadStats::default()
        };
        let mut next: BTreeMap<PathBuf, CachedFile> = BTreeMap::new();
        for (relative, meta) in found {
            let fingerprint = Fingerprint::of(&meta);
            if let Some(cached) = self.files.remove(&relative) {
                if cached.fingerprint == fingerprint && !cached.racy {
                    stats.reused += 1;
                    next.insert(relative, cached);
                    continue;
                }
            }
            stats.parsed += 1;
            let racy = meta.modified().is_ok_and(|mtime| {
                SystemTime::now()
                    .duration_since(mtime)
                    .map_or(true, |age| age < RACY_WINDOW)
            });
            let parsed = match std::fs::read(self.root.join(&relative)) {
                Ok(bytes) => parse_file(&relative, &bytes),
                Err(e) => ParsedFile {
                    objects: Vec::new(),
                    diagnostics: vec![file_error(&relative, format!("cannot read file: {e}"))],
                },
            };
            let checked = CheckedFile::new(&self.root, parsed);
            next.insert(
                relative,
                CachedFile {
                    fingerprint,
                    racy,
                    checked,
                },
            );
        }
        self.files = next;
        let walk_file = CheckedFile::from_diagnostics(walk_errors);
        let assembled = assemble_with(
            self.files.values().map(|c| &c.checked).chain([&walk_file]),
            &mut self.resolution,
        );
        stats.micros = started.elapsed().as_micros();
        Ok((assembled, stats))
    }
}

fn file_error(file: &Path, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        message,
        source_line: None,
        related: Vec::new(),
    }
}

fn walk(
    root: &Path,
    relative: &Path,
    depth: usize,
    found: &mut Vec<(PathBuf, std::fs::Metadata)>,
    errors: &mut Vec<Diagnostic>,
) {
    if depth > MAX_DEPTH {
        errors.push(file_error(
            relative,
            format!(
                "directory is nested more than {MAX_DEPTH} levels deep: its files were not read"
            ),
        ));
        return;
    }
    let entries = match std::fs::read_dir(root.join(relative)) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(file_error(relative, format!("cannot read directory: {e}")));
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if is_ignored_name(name) {
            continue;
        }
        let path = relative.join(name);
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            walk(root, &path, depth + 1, found, errors);
        } else if Source::is_desired_state_file(&path) {
            // Follows a symlink to a file; symlinked directories are not
            // walked, so a link loop cannot make loading endless.
            match std::fs::metadata(root.join(&path)) {
                Ok(meta) if meta.is_file() => found.push((path, meta)),
                Ok(_) => {}
                Err(e) => errors.push(file_error(&path, format!("cannot read file: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editor_backups_and_hidden_files_are_ignored() {
        for ignored in [
            ".hidden.yaml",
            "a.yaml~",
            ".a.yaml.swp",
            "#a.yaml#",
            "a.yaml.bak",
            "a.yaml.tmp",
        ] {
            assert!(
                !Source::is_desired_state_file(Path::new(ignored)),
                "{ignored}"
            );
        }
        for read in ["a.yaml", "b.yml", "dir/c.yaml"] {
            assert!(Source::is_desired_state_file(Path::new(read)), "{read}");
        }
        assert!(!Source::is_desired_state_file(Path::new("README.md")));
    }
}
