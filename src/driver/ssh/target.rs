//! [`SshTarget`] as a driver [`Target`]: its description, `run` and
//! `upload_dir` with their deadlines, `upload_file` for one file, and the
//! removal of a failed upload's partial copy while the connection still
//! works. It only composes `master.rs`, `exec.rs` and the protocol's
//! `upload` (a stream on an exec channel: no SFTP); it must not talk to ssh
//! itself.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use super::master::SshTarget;
use crate::driver::command::unique_suffix;
use crate::driver::protocol;
use crate::driver::target::{CommandOutput, Input, Target, TargetError};

/// How long removing a failed upload's partial copy may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

impl SshTarget {
    /// Uploads one regular file to `dest` the way [`Target::upload_dir`]
    /// uploads a tree: into a partial sibling, renamed when complete, with
    /// its permission bits. `dest` must not exist and its parent must.
    pub async fn upload_file(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        self.upload_dir(src, dest, timeout).await
    }

    /// Removes a failed upload's partial copy, best effort (the connection
    /// may be gone; an install starts its generation over anyway).
    async fn remove_partial(&self, partial: &str) {
        let argv = ["rm", "-rf", "--", partial].map(str::to_owned);
        if let Err(error) = self.run(&argv, &[], CLEANUP_TIMEOUT).await {
            tracing::warn!(target_host = %self.describe(), path = partial, %error, "could not remove a partial upload");
        }
    }
}

impl Target for SshTarget {
    fn describe(&self) -> String {
        format!(
            "{}@{}:{}",
            self.options.user, self.options.host, self.options.port
        )
    }

    /// Runs `argv` over the master (connecting first when needed), each word
    /// shell-escaped for the remote login shell and run by a constant wrapper
    /// that exports `env` and execs argv. At the timeout the session is
    /// closed and the command's process group is killed on the target (it
    /// runs in its own session there). When the master dies meanwhile, the
    /// error is [`SshError::ConnectionLost`] (transient) within the
    /// ServerAlive bound. A missing program is a terminal `Spawn` error, as
    /// for [`super::local::LocalTarget`].
    ///
    /// [`SshError::ConnectionLost`]: super::error::SshError::ConnectionLost
    /// [`super::local::LocalTarget`]: crate::driver::local::LocalTarget
    async fn run_input(
        &self,
        argv: &[String],
        env: &[(String, String)],
        input: &Input,
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        let deadline = Instant::now() + timeout;
        self.run_inner(argv, env, input, deadline, timeout).await
    }

    /// Streams the tree on the stdin of a constant script over the master
    /// (no SFTP subsystem needed) into `<dest>.partial-<unique>`, then
    /// renames it to `dest`. Keeps the executable bit and symlinks; modes
    /// are private to the login (0700 or 0600). On failure the partial copy
    /// is removed when the connection still works; a partial copy left by a
    /// dead connection never has `dest`'s name.
    async fn upload_dir(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        let partial = format!("{dest}.partial-{}", unique_suffix());
        let result = protocol::upload(self, src, dest, &partial, timeout).await;
        match &result {
            // Without a connection there is nothing to clean up with; an
            // install starts its generation directory over anyway.
            Err(TargetError::Ssh { .. }) | Ok(()) => {}
            Err(_) => self.remove_partial(&partial).await,
        }
        result
    }
}
