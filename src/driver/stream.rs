//! Trees sent to a target on a command's stdin, so no SFTP subsystem is
//! needed: the [`Manifest`] of a local tree (every entry's path, kind, mode
//! and content hash) and the frames `stream.sh` reads back on the target
//! (`D` directories, `F` files with their bytes, `S` symlinks, `K` files the
//! target already has in a base tree, `R` a roles document, `E` the end).
//! Only what the target lacks travels: a file whose path, content and mode
//! are the same in the base tree is a `K` line. Modes are sent as 0700 or
//! 0600: everything converge writes on a target is private to its user.
//! This file reads local files; it never runs anything.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::target::Input;

/// The shell functions that read what [`push_tree`] writes.
pub const READER_SCRIPT: &str = include_str!("stream.sh");

/// One entry of a tree, by its path relative to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `/`-separated, no newline or tab, never empty.
    pub path: String,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        executable: bool,
        len: u64,
        /// blake3 of the contents.
        hash: [u8; 32],
    },
    Symlink {
        target: String,
    },
}

/// Every entry of a tree, parents before children, in a stable order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<Entry>,
}

impl Manifest {
    /// Reads the tree at `root`. Names that are not UTF-8 or hold a newline
    /// or tab, and entries that are neither a directory, a regular file nor
    /// a symlink, are errors naming them.
    pub fn of(root: &Path) -> io::Result<Manifest> {
        let mut entries = Vec::new();
        walk(root, "", &mut entries)?;
        Ok(Manifest { entries })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The file at `path`, when it is one.
    fn file(&self, path: &str) -> Option<&EntryKind> {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.entries[i].kind)
            .filter(|kind| matches!(kind, EntryKind::File { .. }))
    }
}

fn walk(root: &Path, prefix: &str, out: &mut Vec<Entry>) -> io::Result<()> {
    let dir = if prefix.is_empty() {
        root.to_path_buf()
    } else {
        root.join(prefix)
    };
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: the name is not UTF-8", entry.path().display()),
            ));
        };
        if name.contains(['\n', '\t']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: a name with a newline or tab", entry.path().display()),
            ));
        }
        names.push((name.to_owned(), entry.path()));
    }
    names.sort();
    for (name, path) in names {
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let meta = fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = fs::read_link(&path)?;
            let Some(target) = target.to_str() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: the link's target is not UTF-8", path.display()),
                ));
            };
            if target.contains(['\n', '\t']) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: a link target with a newline or tab", path.display()),
                ));
            }
            out.push(Entry {
                path: relative,
                kind: EntryKind::Symlink {
                    target: target.to_owned(),
                },
            });
        } else if kind.is_dir() {
            out.push(Entry {
                path: relative.clone(),
                kind: EntryKind::Dir,
            });
            walk(root, &relative, out)?;
        } else if kind.is_file() {
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(fs::File::open(&path)?)?;
            out.push(Entry {
                path: relative,
                kind: EntryKind::File {
                    executable: meta.permissions().mode() & 0o111 != 0,
                    len: meta.len(),
                    hash: *hasher.finalize().as_bytes(),
                },
            });
        } else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} is not a regular file, directory or symlink",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// What [`push_tree`] put in the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Entries of the tree (the end line's count includes a roles frame).
    pub entries: usize,
    /// Files whose bytes travel.
    pub files: usize,
    /// Files the target takes from its base tree.
    pub kept: usize,
    /// Bytes of file contents that travel.
    pub bytes: u64,
}

/// Appends the roles document frame.
pub fn push_roles(input: &mut Input, roles: &[u8]) {
    input.push_bytes(format!("R {}\n", roles.len()));
    input.push_bytes(roles.to_vec());
}

/// Appends the frames of the tree at `root` (read as `manifest`). A file
/// equal in path, content and executable bit to one of `base` is sent as a
/// `K` line (the target takes it from its copy of the base tree).
pub fn push_tree(
    input: &mut Input,
    root: &Path,
    manifest: &Manifest,
    base: Option<&Manifest>,
) -> Sent {
    let mut sent = Sent::default();
    for entry in &manifest.entries {
        sent.entries += 1;
        match &entry.kind {
            EntryKind::Dir => input.push_bytes(format!("D 700 {}\n", entry.path)),
            EntryKind::Symlink { target } => {
                input.push_bytes(format!("S {}\t{target}\n", entry.path));
            }
            file @ EntryKind::File {
                executable, len, ..
            } => {
                if base.and_then(|b| b.file(&entry.path)) == Some(file) {
                    sent.kept += 1;
                    input.push_bytes(format!("K {}\n", entry.path));
                } else {
                    sent.files += 1;
                    sent.bytes += len;
                    push_file(
                        input,
                        &entry.path,
                        &root.join(&entry.path),
                        *len,
                        *executable,
                    );
                }
            }
        }
    }
    sent
}

/// Appends one file frame: `len` bytes of the local file `local`, to be
/// written at `path` in the stream's tree (0700 when `executable`, else 0600).
pub fn push_file(input: &mut Input, path: &str, local: &Path, len: u64, executable: bool) {
    let mode = if executable { "700" } else { "600" };
    input.push_bytes(format!("F {mode} {len} {path}\n"));
    input.push_file(local, len);
}

/// Appends the end line: `count` frames came before it.
pub fn push_end(input: &mut Input, count: usize) {
    input.push_bytes(format!("E {count}\n"));
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("share/doc")).unwrap();
        fs::write(dir.path().join("activate"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(
            dir.path().join("activate"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::write(dir.path().join("share/doc/readme"), "hello").unwrap();
        symlink("share/doc/readme", dir.path().join("link")).unwrap();
        dir
    }

    #[test]
    fn a_manifest_lists_parents_first_with_kinds_modes_and_hashes() {
        let dir = tree();
        let manifest = Manifest::of(dir.path()).unwrap();
        let paths: Vec<&str> = manifest.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["activate", "link", "share", "share/doc", "share/doc/readme"]
        );
        assert!(matches!(
            manifest.entries()[0].kind,
            EntryKind::File {
                executable: true,
                len: 10,
                ..
            }
        ));
        assert_eq!(
            manifest.entries()[1].kind,
            EntryKind::Symlink {
                target: "share/doc/readme".to_owned()
            }
        );
    }

    #[test]
    fn only_files_the_base_lacks_travel() {
        let dir = tree();
        let base = Manifest::of(dir.path()).unwrap();
        fs::write(dir.path().join("share/doc/readme"), "changed").unwrap();
        let manifest = Manifest::of(dir.path()).unwrap();
        let mut input = Input::default();
        let sent = push_tree(&mut input, dir.path(), &manifest, Some(&base));
        assert_eq!(
            (sent.entries, sent.files, sent.kept, sent.bytes),
            (5, 1, 1, 7)
        );
        let mut all = Input::default();
        let sent = push_tree(&mut all, dir.path(), &manifest, None);
        assert_eq!((sent.files, sent.kept), (2, 0));
    }

    #[test]
    fn names_the_line_protocol_cannot_carry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a\nb"), "").unwrap();
        let error = Manifest::of(dir.path()).unwrap_err();
        assert!(error.to_string().contains("newline"), "{error}");
    }
}
