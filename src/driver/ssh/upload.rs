//! Uploading a local tree over SFTP on the master: listing it (regular
//! files, directories and symlinks; anything else is an error), copying it
//! into a partial sibling several files at a time with permission bits and
//! symlinks kept, and renaming it into place only when complete. It must
//! not leave anything under the destination's name that is not a complete
//! copy; removing a failed partial copy is `target.rs`'s job.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::{Sftp, SftpOptions};
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, timeout_at};

use super::error::SshError;
use super::master::{SshTarget, open_again_if_refused};
use crate::driver::target::{Target, TargetError};

/// Files uploaded at once over one SFTP session (requests are pipelined).
const UPLOAD_CONCURRENCY: usize = 16;
/// Bytes read locally and written remotely per SFTP write.
const UPLOAD_CHUNK: usize = 256 * 1024;

impl SshTarget {
    /// Copies `src` into `partial` by `deadline`, then renames it to `dest`;
    /// `timeout` is what a timeout error reports. Leaves removing a failed
    /// partial copy to the caller.
    pub(super) async fn upload_inner(
        &self,
        src: &Path,
        dest: &str,
        partial: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        let target = self.describe();
        let timed_out = || TargetError::Timeout {
            target: target.clone(),
            what: format!("upload to {dest}"),
            after: timeout,
        };
        let src_owned = src.to_path_buf();
        let entries = tokio::task::spawn_blocking(move || walk(&src_owned))
            .await
            .map_err(|join| TargetError::Io {
                target: target.clone(),
                action: "list",
                path: src.to_path_buf(),
                source: io::Error::other(join),
            })?
            .map_err(|failure| TargetError::Io {
                target: target.clone(),
                action: failure.action,
                path: failure.path,
                source: failure.source,
            })?;
        let _permit = timeout_at(deadline, self.sessions.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_closed| TargetError::Io {
                target: target.clone(),
                action: "upload to",
                path: PathBuf::from(dest),
                source: io::Error::other("session limit closed"),
            })?;
        let session = timeout_at(deadline, self.master())
            .await
            .map_err(|_| timed_out())??;
        let open = open_again_if_refused(&target, || {
            Sftp::from_clonable_session(Arc::clone(&session), SftpOptions::default())
        });
        let sftp = match timeout_at(deadline, open).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(source)) => {
                self.lost_connection(&session, openssh::Error::Disconnected)
                    .await?;
                return Err(self.ssh_error(SshError::Sftp {
                    destination: self.destination(),
                    source,
                }));
            }
            Ok(Ok(sftp)) => sftp,
        };
        let copied = timeout_at(deadline, copy_tree(&sftp, src, dest, partial, &entries)).await;
        let result = match copied {
            Err(_) => Err(timed_out()),
            Ok(Err(failure)) => {
                let dead = self
                    .lost_connection(&session, openssh::Error::Disconnected)
                    .await;
                Err(dead.err().unwrap_or_else(|| TargetError::Io {
                    target: target.clone(),
                    action: failure.action,
                    path: failure.path,
                    source: failure.source,
                }))
            }
            Ok(Ok(())) => {
                // Once the rename is sent its result stands, even past the
                // deadline: a dead link ends it within the ServerAlive bound.
                let mut fs = sftp.fs();
                match fs.rename(partial, dest).await {
                    Ok(()) => Ok(()),
                    Err(error) => {
                        let dead = self
                            .lost_connection(&session, openssh::Error::Disconnected)
                            .await;
                        Err(dead.err().unwrap_or_else(|| TargetError::Io {
                            target: target.clone(),
                            action: "rename into place",
                            path: PathBuf::from(dest),
                            source: sftp_io(error),
                        }))
                    }
                }
            }
        };
        if let Err(error) = sftp.close().await {
            tracing::debug!(target_host = %target, %error, "closing sftp failed");
        }
        result
    }
}

/// One entry of the local tree to upload, by path relative to its root.
#[derive(Debug)]
enum Entry {
    Dir { rel: PathBuf, mode: u32 },
    File { rel: PathBuf, mode: u32 },
    Symlink { rel: PathBuf, target: PathBuf },
}

/// A failed local or remote file operation during an upload.
struct UploadFailure {
    action: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn failed(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UploadFailure {
    move |source| UploadFailure {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Lists `root` (a directory) depth-first, parents before children; the
/// root itself comes first with an empty relative path. A regular file as
/// the root is one entry with an empty relative path.
fn walk(root: &Path) -> Result<Vec<Entry>, UploadFailure> {
    let meta = std::fs::metadata(root).map_err(failed("read", root))?;
    if meta.is_file() {
        return Ok(vec![Entry::File {
            rel: PathBuf::new(),
            mode: meta.permissions().mode() & 0o7777,
        }]);
    }
    if !meta.is_dir() {
        return Err(UploadFailure {
            action: "upload",
            path: root.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    let mut entries = vec![Entry::Dir {
        rel: PathBuf::new(),
        mode: meta.permissions().mode() & 0o7777,
    }];
    walk_into(root, Path::new(""), &mut entries)?;
    Ok(entries)
}

fn walk_into(root: &Path, rel: &Path, entries: &mut Vec<Entry>) -> Result<(), UploadFailure> {
    let dir = root.join(rel);
    let mut children: Vec<_> = std::fs::read_dir(&dir)
        .map_err(failed("list", &dir))?
        .collect::<Result<_, _>>()
        .map_err(failed("list", &dir))?;
    children.sort_by_key(std::fs::DirEntry::file_name);
    for child in children {
        let path = child.path();
        let child_rel = rel.join(child.file_name());
        let meta = std::fs::symlink_metadata(&path).map_err(failed("read", &path))?;
        let kind = meta.file_type();
        let mode = meta.permissions().mode() & 0o7777;
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).map_err(failed("read link", &path))?;
            entries.push(Entry::Symlink {
                rel: child_rel,
                target,
            });
        } else if kind.is_dir() {
            entries.push(Entry::Dir {
                rel: child_rel.clone(),
                mode,
            });
            walk_into(root, &child_rel, entries)?;
        } else if kind.is_file() {
            entries.push(Entry::File {
                rel: child_rel,
                mode,
            });
        } else {
            return Err(UploadFailure {
                action: "copy",
                path,
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    "not a regular file, directory or symlink",
                ),
            });
        }
    }
    Ok(())
}

fn remote_path(base: &str, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        PathBuf::from(base)
    } else {
        Path::new(base).join(rel)
    }
}

/// Maps an SFTP failure onto an IO error of the matching kind.
fn sftp_io(error: openssh_sftp_client::Error) -> io::Error {
    let kind = match &error {
        openssh_sftp_client::Error::SftpError(code, _) => match code {
            SftpErrorKind::NoSuchFile => io::ErrorKind::NotFound,
            SftpErrorKind::PermDenied => io::ErrorKind::PermissionDenied,
            SftpErrorKind::OpUnsupported => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        },
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, error)
}

/// Copies the listed tree to `partial` (which must not exist): directories
/// first, then files and symlinks several at a time, then directory modes
/// deepest first (so a read-only directory can still be filled).
async fn copy_tree(
    sftp: &Sftp,
    src: &Path,
    dest: &str,
    partial: &str,
    entries: &[Entry],
) -> Result<(), UploadFailure> {
    let mut fs = sftp.fs();
    match fs.symlink_metadata(dest).await {
        Ok(_) => {
            return Err(UploadFailure {
                action: "upload to",
                path: PathBuf::from(dest),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "destination exists"),
            });
        }
        Err(openssh_sftp_client::Error::SftpError(SftpErrorKind::NoSuchFile, _)) => {}
        Err(error) => return Err(failed("inspect", Path::new(dest))(sftp_io(error))),
    }
    for entry in entries {
        if let Entry::Dir { rel, .. } = entry {
            let path = remote_path(partial, rel);
            fs.create_dir(&path)
                .await
                .map_err(|e| failed("create", &path)(sftp_io(e)))?;
        }
    }
    stream::iter(entries.iter().filter(|e| !matches!(e, Entry::Dir { .. })))
        .map(Ok)
        .try_for_each_concurrent(UPLOAD_CONCURRENCY, |entry| async move {
            match entry {
                Entry::File { rel, mode } => {
                    let local = if rel.as_os_str().is_empty() {
                        src.to_path_buf()
                    } else {
                        src.join(rel)
                    };
                    upload_file(sftp, &local, &remote_path(partial, rel), *mode).await
                }
                Entry::Symlink { rel, target } => {
                    let path = remote_path(partial, rel);
                    let mut fs = sftp.fs();
                    // OpenSSH's sftp-server takes SSH_FXP_SYMLINK arguments
                    // in swapped order; the client follows it (tested).
                    fs.symlink(target, &path)
                        .await
                        .map_err(|e| failed("create link", &path)(sftp_io(e)))
                }
                Entry::Dir { .. } => Ok(()),
            }
        })
        .await?;
    for entry in entries.iter().rev() {
        if let Entry::Dir { rel, mode } = entry {
            let path = remote_path(partial, rel);
            fs.set_permissions(
                &path,
                openssh_sftp_client::metadata::Permissions::from(mode_bits(*mode)),
            )
            .await
            .map_err(|e| failed("set permissions of", &path)(sftp_io(e)))?;
        }
    }
    Ok(())
}

fn mode_bits(mode: u32) -> u16 {
    u16::try_from(mode & 0o7777).unwrap_or(0o755)
}

async fn upload_file(
    sftp: &Sftp,
    local: &Path,
    remote: &Path,
    mode: u32,
) -> Result<(), UploadFailure> {
    let mut input = tokio::fs::File::open(local)
        .await
        .map_err(failed("read", local))?;
    let mut output = sftp
        .options()
        .write(true)
        .create_new(true)
        .open(remote)
        .await
        .map_err(|e| failed("create", remote)(sftp_io(e)))?;
    let mut chunk = vec![0u8; UPLOAD_CHUNK];
    loop {
        let n = input
            .read(&mut chunk)
            .await
            .map_err(failed("read", local))?;
        if n == 0 {
            break;
        }
        output
            .write_all(&chunk[..n])
            .await
            .map_err(|e| failed("write", remote)(sftp_io(e)))?;
    }
    // Set explicitly: the server's umask applies to the mode at creation.
    output
        .set_permissions(openssh_sftp_client::metadata::Permissions::from(mode_bits(
            mode,
        )))
        .await
        .map_err(|e| failed("set permissions of", remote)(sftp_io(e)))?;
    output
        .close()
        .await
        .map_err(|e| failed("close", remote)(sftp_io(e)))
}
