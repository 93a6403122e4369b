//! Uploading a local tree or one file to any [`Target`] over a command's
//! stdin, with converge's own stream framing (`driver/stream.rs`, read by
//! `stream.sh`): a target needs `sh` and the coreutils the protocol uses,
//! never an SFTP subsystem. The copy lands in a partial sibling of the
//! destination and takes the destination's name only when complete (a
//! rename for a tree, a hard link for a file, so an existing file is never
//! replaced). Modes are private to the target's user, as everywhere in the
//! protocol: 0700 for directories and executables, 0600 otherwise. It must
//! not leave anything under the destination's name that is not a complete
//! copy; removing a partial copy a lost connection left is the caller's job.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::script::{Script, script_command};
use crate::driver::stream::{self, Manifest};
use crate::driver::target::{Input, Target, TargetError};

const UPLOAD_SCRIPT: Script = Script {
    name: "converge-upload.sh",
    text: concat!(
        include_str!("scripts/lib.sh"),
        include_str!("../stream.sh"),
        include_str!("scripts/upload.sh")
    ),
};

/// Exit code of `upload.sh` when the destination exists already.
const EXIT_EXISTS: i32 = 4;

/// Copies the local tree or regular file at `src` to `dest` on `t` through
/// `partial` (which must not exist), by `timeout`. `dest` must not exist and
/// its parent must. A destination that exists is an `AlreadyExists` error.
pub async fn upload<T: Target>(
    t: &T,
    src: &Path,
    dest: &str,
    partial: &str,
    timeout: Duration,
) -> Result<(), TargetError> {
    let io_error = |action: &'static str, path: &Path, source: io::Error| TargetError::Io {
        target: t.describe(),
        action,
        path: path.to_path_buf(),
        source,
    };
    // Followed: `/proc/self/exe` is a link to the running binary.
    let meta = tokio::fs::metadata(src)
        .await
        .map_err(|e| io_error("read, to upload it,", src, e))?;
    let (kind, input) = if meta.is_file() {
        let mut input = Input::default();
        let executable = meta.permissions().mode() & 0o111 != 0;
        stream::push_file(&mut input, "file", src, meta.len(), executable);
        stream::push_end(&mut input, 1);
        ("file", input)
    } else if meta.is_dir() {
        let root = src.to_path_buf();
        let manifest = tokio::task::spawn_blocking(move || Manifest::of(&root))
            .await
            .map_err(|join| io_error("list", src, io::Error::other(join)))?
            .map_err(|e| io_error("list", src, e))?;
        let mut input = Input::default();
        let sent = stream::push_tree(&mut input, src, &manifest, None);
        stream::push_end(&mut input, sent.entries);
        ("tree", input)
    } else {
        return Err(io_error(
            "upload",
            src,
            io::Error::new(
                io::ErrorKind::Unsupported,
                "only a directory or a regular file can be uploaded",
            ),
        ));
    };
    let (argv, stdin) = script_command(UPLOAD_SCRIPT, &[partial, dest, kind], &input);
    let output = t.run_input(&argv, &[], &stdin, timeout).await?;
    match output.code {
        Some(0) => Ok(()),
        Some(EXIT_EXISTS) => Err(io_error(
            "upload to",
            &PathBuf::from(dest),
            io::Error::new(io::ErrorKind::AlreadyExists, "the destination exists"),
        )),
        code => Err(io_error(
            "upload to",
            &PathBuf::from(dest),
            io::Error::other(format!(
                "the receiving script exited with {code:?}: {}",
                output.stderr.trim_end()
            )),
        )),
    }
}
