//! `converge run --notify-exec CMD`: each notification runs `sh -c CMD`
//! with the JSON body on stdin and `CONVERGE_EVENT`, `CONVERGE_OBJECT`,
//! `CONVERGE_REASON` and `CONVERGE_REVISION` in its environment, for ntfy,
//! Matrix or mail scripts (and https webhooks, through curl).
//!
//! CMD is the operator's own command line, passed to sh as one argument and
//! never built from data: what a notification says travels only on stdin
//! and in environment variables, so nothing in an object's message can
//! become shell syntax. A hook that runs past its timeout is killed.

use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::command::read_tail;
use super::sink::{Delivery, Sink, SinkError};

/// How much of the hook's stderr a failure reports.
const STDERR_TAIL: usize = 2048;

/// A command run once per notification.
pub struct ExecSink {
    command: String,
    /// How logs and errors name it: the command line may hold a token.
    name: String,
    timeout: Duration,
}

impl std::fmt::Debug for ExecSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSink")
            .field("name", &self.name)
            .finish()
    }
}

impl ExecSink {
    /// `name` is how logs call it (`--notify-exec #1`), never the command.
    pub fn new(command: String, name: String, timeout: Duration) -> ExecSink {
        ExecSink {
            command,
            name,
            timeout,
        }
    }

    async fn run(&self, delivery: &Delivery) -> Result<(), SinkError> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .envs(delivery.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SinkError::Spawn {
                command: self.name.clone(),
                source,
            })?;
        let mut stdin = child.stdin.take();
        let mut stderr = child.stderr.take();
        let body = delivery.body.clone();
        let write = async move {
            if let Some(stdin) = stdin.as_mut() {
                // A hook that does not read its stdin closes the pipe: not
                // a failure of the delivery, its exit status says.
                let _ = stdin.write_all(&body).await;
            }
            drop(stdin);
        };
        let mut tail = Vec::new();
        let read = async {
            if let Some(stderr) = stderr.as_mut() {
                let _ = read_tail(stderr, &mut tail, STDERR_TAIL).await;
            }
        };
        let ran = tokio::time::timeout(self.timeout, async {
            let ((), (), status) = tokio::join!(write, read, child.wait());
            status
        })
        .await;
        let status = match ran {
            Ok(Ok(status)) => status,
            Ok(Err(source)) => {
                return Err(SinkError::Spawn {
                    command: self.name.clone(),
                    source,
                });
            }
            Err(_) => {
                let _ = child.kill().await;
                return Err(SinkError::Timeout {
                    url: self.name.clone(),
                    secs: self.timeout.as_secs(),
                });
            }
        };
        if status.success() {
            return Ok(());
        }
        Err(SinkError::Exit {
            command: self.name.clone(),
            code: status
                .code()
                .map_or_else(|| "a signal".to_owned(), |c| format!("status {c}")),
            stderr: String::from_utf8_lossy(&tail).trim().to_owned(),
        })
    }
}

impl Sink for ExecSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.run(delivery))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(body: &str) -> Delivery {
        Delivery {
            body: body.as_bytes().to_vec(),
            signature: None,
            env: vec![("CONVERGE_OBJECT".into(), "machine/web".into())],
        }
    }

    #[tokio::test]
    async fn the_hook_gets_the_body_on_stdin_and_the_object_in_its_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let command = format!(
            "cat > '{}' && printf '%s' \"$CONVERGE_OBJECT\" >> '{}'",
            out.display(),
            out.display()
        );
        let sink = ExecSink::new(command, "hook".into(), Duration::from_secs(10));
        sink.deliver(&delivery("{\"a\":1}")).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"a\":1}machine/web"
        );
    }

    #[tokio::test]
    async fn a_failing_or_hanging_hook_is_an_error_with_its_stderr() {
        let sink = ExecSink::new(
            "echo nope >&2; exit 3".into(),
            "hook".into(),
            Duration::from_secs(10),
        );
        let e = sink.deliver(&delivery("{}")).await.unwrap_err();
        assert!(e.to_string().contains("status 3"), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
        let sink = ExecSink::new("sleep 30".into(), "hook".into(), Duration::from_millis(200));
        let e = sink.deliver(&delivery("{}")).await.unwrap_err();
        assert!(matches!(e, SinkError::Timeout { .. }), "{e}");
    }
}
