//! `converge run`'s notification arguments: `--notify URL` (repeatable),
//! `--notify-secret-file FILE` and `--notify-exec CMD`, checked before the
//! daemon starts (an https URL, a missing or empty secret file are clear
//! errors that say what to do) and turned into the controller's
//! [`Notifier`].
//!
//! The secret is read once, here, and kept only inside `notify::Secret`;
//! neither it nor a URL's path or query nor a hook's command line is
//! printed (logs name a hook `--notify-exec #N`).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::controller::notify::{Counters, Notifier, Options, Secret};
use crate::driver::exec_hook::ExecSink;
use crate::driver::sink::Sink;
use crate::driver::webhook::{WebhookSink, WebhookUrl};

/// How long one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one run of the command hook may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the daemon tells what happened.
#[derive(Debug, clap::Args)]
pub struct NotifyArgs {
    /// POST a JSON notification to this http:// URL on each condition
    /// transition: an object became Ready (also its first converge after
    /// the daemon starts), failed, was rolled back, drifted or recovered,
    /// and a source revision was refused. Repeatable. Each POST carries
    /// `X-Converge-Signature-256: sha256=<hex HMAC-SHA256 of the body>`
    /// keyed with --notify-secret-file. Deliveries are retried with backoff
    /// from a bounded queue and never hold up reconciles. For https, use
    /// --notify-exec with curl.
    #[arg(long = "notify", value_name = "URL")]
    pub urls: Vec<String>,
    /// The file whose content (minus one trailing newline) keys the
    /// signature of every --notify POST; read once at start. Required with
    /// --notify.
    #[arg(long, value_name = "FILE", env = "CONVERGE_NOTIFY_SECRET_FILE")]
    pub notify_secret_file: Option<PathBuf>,
    /// Run `sh -c CMD` for each notification, with its JSON on stdin and
    /// CONVERGE_EVENT, CONVERGE_OBJECT, CONVERGE_REASON, CONVERGE_REVISION
    /// in the environment (ntfy, Matrix or mail scripts; curl for https).
    /// Repeatable.
    #[arg(long, value_name = "CMD")]
    pub notify_exec: Vec<String>,
}

/// The sinks and secret, checked; started inside the runtime.
#[derive(Debug)]
pub struct Prepared {
    sinks: Vec<Arc<dyn Sink>>,
    secret: Option<Secret>,
}

impl Prepared {
    /// Starts the delivery tasks (call inside the runtime).
    pub fn start(self, counters: Counters) -> Notifier {
        Notifier::start(self.sinks, self.secret, Options::default(), counters)
    }
}

/// Checks the arguments and reads the secret.
pub fn prepare(args: &NotifyArgs) -> anyhow::Result<Prepared> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    for url in &args.urls {
        let url = WebhookUrl::parse(url)?;
        sinks.push(Arc::new(WebhookSink::new(url, POST_TIMEOUT)));
    }
    let secret = match (&args.notify_secret_file, args.urls.is_empty()) {
        (None, false) => anyhow::bail!(
            "--notify needs --notify-secret-file FILE: every POST is signed with the secret in \
             FILE, and receivers check the X-Converge-Signature-256 header with it \
             (create one with `openssl rand -hex 32 > FILE; chmod 600 FILE`)"
        ),
        (None, true) => None,
        (Some(path), urls_empty) => {
            if urls_empty {
                tracing::warn!(file = %path.display(), "--notify-secret-file is only used to sign --notify POSTs, and no --notify URL was given");
            }
            Some(read_secret(path)?)
        }
    };
    for (n, command) in args.notify_exec.iter().enumerate() {
        if command.trim().is_empty() {
            anyhow::bail!(
                "--notify-exec needs a command, e.g. --notify-exec '/usr/local/bin/notify-me'"
            );
        }
        let name = format!("--notify-exec #{}", n + 1);
        sinks.push(Arc::new(ExecSink::new(command.clone(), name, EXEC_TIMEOUT)));
    }
    Ok(Prepared { sinks, secret })
}

fn read_secret(path: &std::path::Path) -> anyhow::Result<Secret> {
    let content = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "read the notify secret file {}: {e} (create it with `openssl rand -hex 32 > {0}; chmod 600 {0}`)",
            path.display()
        )
    })?;
    let secret = Secret::from_file_content(content)
        .map_err(|e| anyhow::anyhow!("notify secret file {}: {e}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the notify secret file is readable by other users: chmod 600 it");
        }
    }
    Ok(secret)
}
