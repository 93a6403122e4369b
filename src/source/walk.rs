//! Walking the desired-state directory, and opening what the walk found.
//!
//! One walk serves the loader and the build-input hash, so they agree on
//! what the directory holds and fail on the same entries. Every entry is
//! looked at with `lstat` before anything else: a regular file is listed, a
//! directory is walked, a symlink is followed only when it resolves inside
//! the directory (canonicalized, then checked by prefix). Everything else is
//! an error naming the entry, never a silent skip: a FIFO, socket or device,
//! a name that is not UTF-8, a symlink that dangles, leaves the directory or
//! leads back to a directory that contains it, an entry that cannot be
//! read. A skipped entry would make its objects vanish from the desired
//! state, and the daemon would then forget them (and delete the disks of a
//! VM with `onDelete: delete`); an error keeps the last valid desired state
//! in force instead. Hidden entries, editor backups and temporary files are
//! ignored (`ignored.rs`), before any of these checks.
//!
//! Only regular files are ever opened ([`open_regular`]): nothing here can
//! block on a FIFO or read a device, and nothing outside the directory is
//! read or quoted. It must not parse what it reads or decide what an invalid
//! directory means.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::ignored::is_ignored_name;
use crate::spec::diagnostic::escape_path;

/// Directories nested deeper than this are not walked.
pub(super) const MAX_DEPTH: usize = 32;

/// The most entries one walk visits, counting those reached through
/// symlinked directories (which can multiply: links to links to links).
pub(super) const MAX_ENTRIES: usize = 1_000_000;

/// An entry of the directory that cannot be read as converge needs to; each
/// makes the directory invalid. `path` is relative to the desired-state
/// directory, escaped for display (`\xNN` for bytes that are not UTF-8).
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error(
        "the name of `{path}` is not UTF-8: rename it (converge reads only UTF-8 names, so it cannot tell what it holds)"
    )]
    NotUtf8 { path: String },
    #[error(
        "`{path}` is a {what}, not a regular file or directory: remove it from the desired-state directory (converge never opens it)"
    )]
    Special { path: String, what: &'static str },
    #[error(
        "symlink `{path}` points to `{target}`, outside the desired-state directory: converge reads nothing outside it; copy what it points to into the directory, or remove the link"
    )]
    LinkOutside { path: String, target: String },
    #[error("symlink `{path}` points to `{target}`, which does not exist: fix or remove the link")]
    LinkDangling { path: String, target: String },
    #[error(
        "symlink `{path}` leads back to `{target}`, a directory that contains it: remove the link"
    )]
    LinkLoop { path: String, target: String },
    #[error(
        "symlink `{path}` points to `{target}`, which cannot be resolved ({error}): fix or remove the link"
    )]
    LinkUnresolvable {
        path: String,
        target: String,
        error: std::io::Error,
    },
    #[error("cannot read `{path}`: {error}: check that converge may read it")]
    Unreadable { path: String, error: std::io::Error },
    #[error(
        "directory `{path}` is nested more than {MAX_DEPTH} levels deep: its files were not read; flatten the directory"
    )]
    TooDeep { path: String },
    #[error(
        "the desired-state directory holds more than {MAX_ENTRIES} entries (counting those reached through symlinked directories): the rest were not read; remove entries or links"
    )]
    TooMany,
}

impl EntryError {
    /// The entry the error is about, relative and escaped; empty for the
    /// directory as a whole.
    pub fn path(&self) -> &str {
        match self {
            EntryError::NotUtf8 { path }
            | EntryError::Special { path, .. }
            | EntryError::LinkOutside { path, .. }
            | EntryError::LinkDangling { path, .. }
            | EntryError::LinkLoop { path, .. }
            | EntryError::LinkUnresolvable { path, .. }
            | EntryError::Unreadable { path, .. }
            | EntryError::TooDeep { path } => path,
            EntryError::TooMany => "",
        }
    }
}

/// A regular file the walk found.
#[derive(Debug)]
pub(super) struct Found {
    /// Relative to the desired-state directory, as the user names it (a
    /// file under a symlinked directory is named through the link); UTF-8.
    pub relative: PathBuf,
    /// What to open: the path below the root, or for a file reached
    /// through a symlink, its canonical path (checked to be inside).
    pub open: PathBuf,
    /// The file's metadata (of the file a symlink points to).
    pub meta: Metadata,
    /// For a symlink to a file: its target, as written.
    pub link: Option<PathBuf>,
}

/// Everything below the desired-state directory: the regular files, and
/// the entries that could not be read.
#[derive(Debug, Default)]
pub(super) struct Walk {
    pub files: Vec<Found>,
    pub errors: Vec<EntryError>,
}

/// Walks `root` (which must be a readable directory; the caller checked).
/// Entries are visited in name order, so the result is deterministic.
pub(super) fn walk(root: &Path) -> Walk {
    walk_at_most(root, MAX_ENTRIES)
}

fn walk_at_most(root: &Path, max_entries: usize) -> Walk {
    let mut walker = Walker {
        canonical_root: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
        entries: 0,
        max_entries,
        out: Walk::default(),
    };
    let mut ancestors = vec![walker.canonical_root.clone()];
    walker.dir(root, Path::new(""), &mut ancestors);
    walker.out
}

struct Walker {
    canonical_root: PathBuf,
    entries: usize,
    max_entries: usize,
    out: Walk,
}

impl Walker {
    /// Walks the directory at `open` (its real path), named `relative`;
    /// `ancestors` are the canonical paths of it and the directories above.
    fn dir(&mut self, open: &Path, relative: &Path, ancestors: &mut Vec<PathBuf>) {
        if ancestors.len() > MAX_DEPTH + 1 {
            self.out.errors.push(EntryError::TooDeep {
                path: escape_path(relative),
            });
            return;
        }
        let unreadable = |error| EntryError::Unreadable {
            path: escape_path(relative),
            error,
        };
        let mut names = Vec::new();
        match std::fs::read_dir(open) {
            Ok(entries) => {
                for entry in entries {
                    match entry {
                        Ok(entry) => names.push(entry.file_name()),
                        Err(e) => {
                            self.out.errors.push(unreadable(e));
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                self.out.errors.push(unreadable(e));
                return;
            }
        }
        names.sort();
        for name in names {
            // Ignored names are ignored whatever else is wrong with them; a
            // name that is not UTF-8 is tested by its readable parts.
            if is_ignored_name(&name.to_string_lossy()) {
                continue;
            }
            self.entries += 1;
            if self.entries > self.max_entries {
                self.out.errors.push(EntryError::TooMany);
                return;
            }
            let path = relative.join(&name);
            if name.to_str().is_none() {
                self.out.errors.push(EntryError::NotUtf8 {
                    path: escape_path(&path),
                });
                continue;
            }
            self.entry(&open.join(&name), path, ancestors);
        }
    }

    fn entry(&mut self, open: &Path, relative: PathBuf, ancestors: &mut Vec<PathBuf>) {
        let meta = match std::fs::symlink_metadata(open) {
            Ok(meta) => meta,
            Err(source) => {
                self.out.errors.push(EntryError::Unreadable {
                    path: escape_path(&relative),
                    error: source,
                });
                return;
            }
        };
        let file_type = meta.file_type();
        if file_type.is_dir() {
            let canonical = ancestors
                .last()
                .map(|parent| parent.join(relative.file_name().unwrap_or_default()))
                .unwrap_or_default();
            ancestors.push(canonical);
            self.dir(open, &relative, ancestors);
            ancestors.pop();
        } else if file_type.is_file() {
            self.out.files.push(Found {
                relative,
                open: open.to_path_buf(),
                meta,
                link: None,
            });
        } else if file_type.is_symlink() {
            self.symlink(open, relative, ancestors);
        } else {
            self.out.errors.push(special(&relative, &file_type));
        }
    }

    /// Follows a symlink when it resolves inside the directory.
    fn symlink(&mut self, open: &Path, relative: PathBuf, ancestors: &mut Vec<PathBuf>) {
        let path = escape_path(&relative);
        let target = match std::fs::read_link(open) {
            Ok(target) => target,
            Err(source) => {
                self.out.errors.push(EntryError::Unreadable {
                    path,
                    error: source,
                });
                return;
            }
        };
        let shown = escape_path(&target);
        let canonical = match std::fs::canonicalize(open) {
            Ok(canonical) => canonical,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.out.errors.push(EntryError::LinkDangling {
                    path,
                    target: shown,
                });
                return;
            }
            Err(error) => {
                self.out.errors.push(EntryError::LinkUnresolvable {
                    path,
                    target: shown,
                    error,
                });
                return;
            }
        };
        if !canonical.starts_with(&self.canonical_root) {
            self.out.errors.push(EntryError::LinkOutside {
                path,
                target: shown,
            });
            return;
        }
        // `stat`, not `lstat`: a canonical path has no symlink left in it.
        let meta = match std::fs::metadata(&canonical) {
            Ok(meta) => meta,
            Err(source) => {
                self.out.errors.push(EntryError::Unreadable {
                    path,
                    error: source,
                });
                return;
            }
        };
        let file_type = meta.file_type();
        if file_type.is_dir() {
            if ancestors.contains(&canonical) {
                let inside = canonical
                    .strip_prefix(&self.canonical_root)
                    .unwrap_or(&canonical);
                let target = if inside.as_os_str().is_empty() {
                    ".".to_owned()
                } else {
                    escape_path(inside)
                };
                self.out.errors.push(EntryError::LinkLoop { path, target });
                return;
            }
            ancestors.push(canonical.clone());
            self.dir(&canonical, &relative, ancestors);
            ancestors.pop();
        } else if file_type.is_file() {
            self.out.files.push(Found {
                relative,
                open: canonical,
                meta,
                link: Some(target),
            });
        } else {
            self.out.errors.push(special(&relative, &file_type));
        }
    }
}

fn special(relative: &Path, file_type: &std::fs::FileType) -> EntryError {
    let what = if file_type.is_fifo() {
        "FIFO (named pipe)"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    EntryError::Special {
        path: escape_path(relative),
        what,
    }
}

/// Why a file could not be read (by [`read_bounded`] or [`open_regular`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// It was replaced by something else since the walk saw a regular file.
    #[error("it is no longer a regular file")]
    NotRegular,
    /// More than the limit: from its metadata, or it grew while being read
    /// (`len` is then what was read, one byte over).
    #[error("it is {len} bytes, more than the limit of {limit}")]
    TooLarge { len: u64, limit: u64 },
}

/// Opens `path` for reading only if it is a regular file. The open itself
/// cannot block (`O_NONBLOCK`: a FIFO swapped in after the walk's `lstat`
/// opens at once and is then refused by `fstat`), nor make a terminal the
/// controlling one (`O_NOCTTY`).
pub(super) fn open_regular(path: &Path) -> Result<(File, Metadata), ReadError> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular);
    }
    Ok((file, meta))
}

/// Reads a regular file of at most `limit` bytes. The size is checked from
/// the metadata before reading, and the read is bounded too, so a file that
/// grows meanwhile cannot make it read more than `limit + 1` bytes.
pub(super) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let (file, meta) = open_regular(path)?;
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            len: meta.len(),
            limit,
        });
    }
    let capacity = usize::try_from(meta.len()).unwrap_or(0);
    let mut bytes = Vec::with_capacity(capacity);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    let len = bytes.len() as u64;
    if len > limit {
        return Err(ReadError::TooLarge { len, limit });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;

    use super::*;

    fn relative_files(walk: &Walk) -> Vec<String> {
        walk.files
            .iter()
            .map(|f| f.relative.display().to_string())
            .collect()
    }

    fn messages(walk: &Walk) -> Vec<String> {
        walk.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_symlink_inside_the_directory_is_followed_and_named_as_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("shared/vms")).unwrap();
        std::fs::write(root.join("shared/vms/a.yaml"), "a").unwrap();
        std::fs::write(root.join("b.yaml"), "b").unwrap();
        symlink("shared/vms", root.join("vms")).unwrap();
        symlink("b.yaml", root.join("c.yaml")).unwrap();
        let walked = walk(root);
        assert!(walked.errors.is_empty(), "{:?}", messages(&walked));
        assert_eq!(
            relative_files(&walked),
            ["b.yaml", "c.yaml", "shared/vms/a.yaml", "vms/a.yaml"]
        );
        let through_link = &walked.files[3];
        assert!(through_link.open.starts_with(root.canonicalize().unwrap()));
        assert_eq!(walked.files[1].link.as_deref(), Some(Path::new("b.yaml")));
    }

    #[test]
    fn a_symlink_out_of_the_directory_dangling_or_looping_is_an_error_naming_it() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "do not read me").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        symlink(outside.path().join("secret"), root.join("leak.yaml")).unwrap();
        symlink(outside.path(), root.join("outdir")).unwrap();
        symlink("../..", root.join("sub/up")).unwrap();
        symlink("missing.yaml", root.join("gone.yaml")).unwrap();
        symlink("..", root.join("sub/loop")).unwrap();
        symlink("self", root.join("self")).unwrap();
        let walked = walk(root);
        assert!(walked.files.is_empty(), "{:?}", relative_files(&walked));
        let errors = messages(&walked);
        let expect = [
            "symlink `gone.yaml` points to `missing.yaml`, which does not exist",
            "symlink `leak.yaml` points to `",
            "symlink `outdir` points to `",
            "symlink `self` points to `self`, which cannot be resolved",
            "symlink `sub/loop` leads back to `.`, a directory that contains it",
            "symlink `sub/up` points to `../..`, outside the desired-state directory",
        ];
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
        for (error, expect) in errors.iter().zip(expect) {
            assert!(
                error.starts_with(expect),
                "{error}\nshould start with\n{expect}"
            );
            assert!(!error.contains("do not read me"));
        }
    }

    #[test]
    fn a_name_that_is_not_utf8_is_an_error_shown_escaped_unless_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let name = std::ffi::OsStr::from_bytes(b"web\xff\x1b.yaml");
        std::fs::write(root.join(name), "x").unwrap();
        std::fs::create_dir(root.join(std::ffi::OsStr::from_bytes(b"d\xfe"))).unwrap();
        std::fs::write(root.join(std::ffi::OsStr::from_bytes(b".hidden\xff")), "x").unwrap();
        std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"backup\xff~")), "x").unwrap();
        let walked = walk(root);
        let paths: Vec<&str> = walked.errors.iter().map(EntryError::path).collect();
        assert_eq!(paths, ["d\\xfe", "web\\xff\\u{1b}.yaml"]);
        assert!(matches!(walked.errors[0], EntryError::NotUtf8 { .. }));
    }

    #[test]
    fn links_that_multiply_the_paths_end_at_the_entry_limit() {
        // Two links per level to the level below: 2^20 paths to `z/a.yaml`.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for level in 0..20 {
            let here = root.join(format!("l{level:02}"));
            std::fs::create_dir(&here).unwrap();
            for link in ["a", "b"] {
                symlink(format!("../l{:02}", level + 1), here.join(link)).unwrap();
            }
        }
        std::fs::create_dir(root.join("l20")).unwrap();
        std::fs::write(root.join("l20/a.yaml"), "a").unwrap();
        let walked = walk_at_most(root, 10_000);
        assert!(matches!(walked.errors.last(), Some(EntryError::TooMany)));
        assert!(walked.files.len() < 10_000);
    }

    #[test]
    fn nesting_beyond_the_limit_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..=MAX_DEPTH + 1 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let walked = walk(dir.path());
        assert_eq!(walked.errors.len(), 1);
        assert!(matches!(walked.errors[0], EntryError::TooDeep { .. }));
    }

    #[test]
    fn an_oversized_file_is_refused_from_its_size_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse.yaml");
        // 2 GiB of nothing: reading it would cost 2 GiB of memory.
        File::create(&sparse).unwrap().set_len(2 << 30).unwrap();
        match read_bounded(&sparse, 4 << 20) {
            Err(ReadError::TooLarge { len, limit }) => {
                assert_eq!((len, limit), (2 << 30, 4 << 20));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_read_is_bounded_when_the_size_in_the_metadata_is_not_the_truth() {
        // procfs reports size 0 and has more: like a file that grows after
        // its size was checked, the read stops one byte past the limit.
        let status = Path::new("/proc/self/status");
        assert_eq!(std::fs::metadata(status).unwrap().len(), 0);
        match read_bounded(status, 16) {
            Err(ReadError::TooLarge { len, limit }) => assert_eq!((len, limit), (17, 16)),
            other => panic!("{other:?}"),
        }
        assert!(read_bounded(status, 1 << 20).is_ok());
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_regular(dir.path()),
            Err(ReadError::NotRegular)
        ));
        assert!(matches!(
            open_regular(Path::new("/dev/null")),
            Err(ReadError::NotRegular)
        ));
    }
}
