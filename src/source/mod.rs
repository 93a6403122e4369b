//! The desired-state directory: finding, reading and caching its YAML files.
//!
//! Walks the directory (`walk.rs`: recursively, following symlinks only
//! inside it; hidden files and directories, editor backups and temporary
//! files ignored; an entry it cannot read, such as a FIFO, a dangling link or
//! a name that is not UTF-8, is a diagnostic that makes the directory
//! invalid), reads each `.yaml`/`.yml` file (regular files only, at most
//! [`MAX_FILE_BYTES`], checked before reading) and hands the bytes to
//! [`crate::spec::parse`]. Parsed and checked files
//! are cached by fingerprint (size, mtime, inode), so a reload after one file
//! changed parses and checks only that file; the previous
//! [`Resolution`] is kept too, so roles are resolved again only when their
//! inputs changed. It never decides what the result means: an invalid
//! directory is returned as diagnostics, and the caller keeps its last valid
//! desired state.

mod content;
mod ignored;
mod walk;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::spec::Resolution;
use crate::spec::parse::{MAX_FILE_BYTES, ParsedFile, oversized_file, parse_file};
use crate::spec::{Assembled, CheckedFile, Diagnostic, Severity, assemble_with};

pub use content::{
    ContentError, Listing, changed_files, content_hash, content_hash_excluding, listing,
};
pub use ignored::is_ignored_name;
pub use walk::{EntryError, ReadError};

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
        let walked = walk::walk(&self.root);
        let walk_errors: Vec<Diagnostic> = walked.errors.iter().map(entry_error).collect();
        let found: Vec<walk::Found> = walked
            .files
            .into_iter()
            .filter(|f| Source::is_desired_state_file(&f.relative))
            .collect();

        let mut stats = LoadStats {
            files: found.len(),
            ..LoadStats::default()
        };
        let mut next: BTreeMap<PathBuf, CachedFile> = BTreeMap::new();
        for walk::Found {
            relative,
            open,
            meta,
            ..
        } in found
        {
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
            let parsed = match walk::read_bounded(&open, MAX_FILE_BYTES as u64) {
                Ok(bytes) => parse_file(&relative, &bytes),
                Err(ReadError::TooLarge { len, .. }) => oversized_file(&relative, len),
                Err(e) => ParsedFile {
                    objects: Vec::new(),
                    diagnostics: vec![file_error(
                        &relative,
                        format!("cannot read file: {e}: check that converge may read it"),
                    )],
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
    Diagnostic::about_file(Severity::Error, file.to_path_buf(), &message)
}

/// An entry the walk could not read, as a diagnostic about that entry (its
/// path escaped, so it is valid UTF-8 and safe to print).
pub fn entry_error(e: &EntryError) -> Diagnostic {
    file_error(Path::new(e.path()), e.to_string())
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
