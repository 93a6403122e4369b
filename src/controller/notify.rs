//! Telling people what happened: the [`Notifier`] turns a condition
//! transition (or a refused source revision) into one signed JSON
//! [`Notification`] and hands it to every sink's bounded queue, without
//! ever waiting; one task per sink delivers from its queue with retries and
//! backoff.
//!
//! A full queue drops the notification and counts it
//! (`converge_notifications_dropped_total`), so a dead webhook costs memory
//! bounded by the queue and never slows a reconcile. A delivery that still
//! fails after its retries is logged at ERROR by the sink's name (a URL's
//! host and port, or `--notify-exec #N`) and counted in
//! `converge_notifications_failed_total`. The secret the body is signed with
//! lives only in [`Secret`], whose `Debug` prints nothing of it; no log line
//! carries it.
//!
//! The sinks are driver code (`driver::sink::Sink`): this file depends on
//! the trait only.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use hmac::{Hmac, Mac};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::driver::sink::{Delivery, Sink};
use crate::spec::ObjectKey;
use crate::store::records::{Reason, Severity, now_ms};

/// The header a webhook receiver verifies.
pub const SIGNATURE_HEADER: &str = "X-Converge-Signature-256";

/// The key notifications are signed with: the secret file's content minus
/// one trailing newline. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Why a secret file's content cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error(
        "the secret file is empty: write a random secret into it (e.g. `openssl rand -hex 32`)"
    )]
    Empty,
}

impl Secret {
    /// The key from a secret file's content: one trailing `\n` (or `\r\n`)
    /// is not part of it, as `echo secret > file` writes one.
    pub fn from_file_content(mut content: Vec<u8>) -> Result<Secret, SecretError> {
        if content.last() == Some(&b'\n') {
            content.pop();
            if content.last() == Some(&b'\r') {
                content.pop();
            }
        }
        if content.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Secret(content))
    }
}

/// `sha256=<hex HMAC-SHA256 of body keyed with secret>`: the value of
/// [`SIGNATURE_HEADER`].
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    // HMAC accepts keys of any length; the error case cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&secret.0) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for byte in digest {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    hex
}

/// What happened, as a notification's `event` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Event {
    /// Ready=True after something else, or first seen Ready since the daemon started.
    Ready,
    /// Ready=True after a failure.
    Recovered,
    /// Ready=False for a new failure reason.
    Failed,
    /// The previous generation was re-activated after a failure.
    RolledBack,
    /// A new or changed drift.
    DriftDetected,
    /// A source revision was not applied (the Git source's refusals).
    SourceRefused,
}

impl Event {
    pub fn severity(self) -> Severity {
        match self {
            Event::Ready | Event::Recovered => Severity::Info,
            Event::DriftDetected => Severity::Warning,
            Event::Failed | Event::RolledBack | Event::SourceRefused => Severity::Error,
        }
    }
}

/// One notification's JSON body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// `machine/web1`, or `source` for a refused revision.
    pub object: String,
    pub event: Event,
    pub reason: Reason,
    pub message: String,
    /// The desired state's revision the reconcile worked from (or the
    /// refused one).
    pub revision: Option<String>,
    /// RFC 3339, UTC.
    pub time: String,
    pub time_ms: u64,
    pub severity: Severity,
}

impl Notification {
    /// A notification about `object`, timed now.
    pub fn new(
        object: impl Into<String>,
        event: Event,
        reason: Reason,
        message: impl Into<String>,
        revision: Option<String>,
    ) -> Notification {
        let time_ms = now_ms();
        Notification {
            object: object.into(),
            event,
            reason,
            message: message.into(),
            revision,
            time: rfc3339(time_ms),
            time_ms,
            severity: event.severity(),
        }
    }
}

/// `2026-12-04T17:14:38.123Z` for milliseconds since the epoch.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// How deliveries are queued and retried.
#[derive(Debug, Clone)]
pub struct Options {
    /// Notifications waiting per sink; past it, new ones are dropped.
    pub capacity: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Retries after the first try.
    pub retries: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            capacity: 256,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            retries: 6,
        }
    }
}

/// The counters the notifier updates (registered by `metrics.rs`).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub dropped: Counter,
    pub failed: Counter,
}

/// Hands notifications to the sinks' queues. Cheap to clone; the default is
/// disabled (`reconcile --once`, a daemon without `--notify`): it sends
/// nothing and remembers nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    queues: Vec<(String, mpsc::Sender<Arc<Delivery>>)>,
    secret: Option<Secret>,
    counters: Counters,
    /// Objects whose state was told since the daemon started.
    announced: Mutex<HashSet<ObjectKey>>,
    /// Notifications queued or being delivered, over all sinks.
    pending: Arc<AtomicUsize>,
}

impl Notifier {
    /// Starts one delivery task per sink (inside the runtime). With no
    /// sinks, the notifier is disabled.
    pub fn start(
        sinks: Vec<Arc<dyn Sink>>,
        secret: Option<Secret>,
        options: Options,
        counters: Counters,
    ) -> Notifier {
        if sinks.is_empty() {
            return Notifier::default();
        }
        let pending = Arc::new(AtomicUsize::new(0));
        let mut queues = Vec::new();
        for sink in sinks {
            let (tx, rx) = mpsc::channel(options.capacity.max(1));
            queues.push((sink.name().to_owned(), tx));
            tokio::spawn(deliver(
                sink,
                rx,
                options.clone(),
                counters.failed.clone(),
                pending.clone(),
            ));
        }
        Notifier {
            inner: Some(Arc::new(Inner {
                queues,
                secret,
                counters,
                announced: Mutex::new(HashSet::new()),
                pending,
            })),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// True the first time it is asked about `key` since the daemon
    /// started: that object's first converge is told even when its status
    /// did not change. Always false when disabled.
    pub fn first_since_start(&self, key: &ObjectKey) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        let mut announced = inner
            .announced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        announced.insert(key.clone())
    }

    /// Queues `notification` for every sink; never waits. A full queue
    /// drops it for that sink, counted and logged.
    pub fn notify(&self, notification: &Notification) {
        let Some(inner) = &self.inner else {
            return;
        };
        let body = match serde_json::to_vec(notification) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "failed to encode a notification");
                return;
            }
        };
        let signature = inner.secret.as_ref().map(|s| sign(s, &body));
        let mut env = vec![
            ("CONVERGE_EVENT".to_owned(), event_name(notification.event)),
            ("CONVERGE_OBJECT".to_owned(), notification.object.clone()),
            (
                "CONVERGE_REASON".to_owned(),
                notification.reason.to_string(),
            ),
        ];
        if let Some(revision) = &notification.revision {
            env.push(("CONVERGE_REVISION".to_owned(), revision.clone()));
        }
        let delivery = Arc::new(Delivery {
            body,
            signature,
            env,
        });
        for (name, queue) in &inner.queues {
            inner.pending.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = queue.try_send(delivery.clone()) {
                inner.pending.fetch_sub(1, Ordering::SeqCst);
                let before = inner.counters.dropped.inc();
                // A flood (a fleet failing at once) logs its first drop and
                // then every hundredth; the metric counts them all.
                if before % 100 == 0 {
                    let why = match e {
                        mpsc::error::TrySendError::Full(_) => "its queue is full",
                        mpsc::error::TrySendError::Closed(_) => "its delivery task stopped",
                    };
                    tracing::warn!(sink = %name, object = %notification.object, event = %event_name(notification.event), dropped_total = before + 1, "notification dropped: {why}");
                }
            }
        }
    }

    /// Tells that a source revision was refused (not applied): for the Git
    /// source, which keeps the last applied revision in force.
    pub fn source_refused(&self, revision: &str, reason: Reason, message: &str) {
        self.notify(&Notification::new(
            "source",
            Event::SourceRefused,
            reason,
            message,
            Some(revision.to_owned()),
        ));
    }

    /// Waits until every queued notification was delivered or given up on,
    /// at most `within` (the daemon's stop).
    pub async fn flush(&self, within: Duration) {
        let Some(inner) = &self.inner else {
            return;
        };
        let deadline = tokio::time::Instant::now() + within;
        while inner.pending.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn event_name(event: Event) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One sink's delivery task: each notification in order, retried with
/// exponential backoff while the failure may pass.
async fn deliver(
    sink: Arc<dyn Sink>,
    mut queue: mpsc::Receiver<Arc<Delivery>>,
    options: Options,
    failed: Counter,
    pending: Arc<AtomicUsize>,
) {
    while let Some(delivery) = queue.recv().await {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(options.min_delay)
            .with_max_delay(options.max_delay)
            .with_max_times(options.retries)
            .with_jitter();
        let result = (|| sink.deliver(&delivery))
            .retry(backoff)
            .when(|e| e.is_transient())
            .notify(|e, after| {
                tracing::warn!(sink = %sink.name(), error = %crate::telemetry::error_chain(e), retry_in_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX), "notification not delivered; retrying");
            })
            .await;
        if let Err(e) = result {
            failed.inc();
            tracing::error!(sink = %sink.name(), error = %crate::telemetry::error_chain(&e), "notification not delivered; giving up on it");
        }
        pending.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::sink::SinkError;
    use futures::future::BoxFuture;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231, test case 2.
        let secret = Secret::from_file_content(b"Jefe\n".to_vec()).unwrap();
        assert_eq!(
            sign(&secret, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
    }

    #[test]
    fn a_secret_loses_one_trailing_newline_and_may_not_be_empty() {
        let two = Secret::from_file_content(b"abc\n\n".to_vec()).unwrap();
        assert_eq!(two.0, b"abc\n");
        let crlf = Secret::from_file_content(b"abc\r\n".to_vec()).unwrap();
        assert_eq!(crlf.0, b"abc");
        assert_eq!(
            Secret::from_file_content(b"\n".to_vec()).unwrap_err(),
            SecretError::Empty
        );
        assert_eq!(
            Secret::from_file_content(Vec::new()).unwrap_err(),
            SecretError::Empty
        );
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339(1_796_405_678_123), "2026-12-04T17:34:38.123Z");
    }

    /// A sink that holds every delivery until released, and counts them.
    #[derive(Debug)]
    struct Gate {
        open: tokio::sync::Semaphore,
        delivered: AtomicUsize,
        fail_first: AtomicUsize,
    }

    impl Sink for Gate {
        fn name(&self) -> &str {
            "gate"
        }
        fn deliver<'a>(&'a self, _: &'a Delivery) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                let _permit = self.open.acquire().await;
                if self
                    .fail_first
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(SinkError::Status {
                        url: "gate".into(),
                        status: 503,
                    });
                }
                self.delivered.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    fn note(n: usize) -> Notification {
        Notification::new(
            format!("machine/m{n}"),
            Event::Failed,
            Reason::BuildFailed,
            "x",
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let gate = Arc::new(Gate {
            open: tokio::sync::Semaphore::new(0),
            delivered: AtomicUsize::new(0),
            fail_first: AtomicUsize::new(0),
        });
        let counters = Counters::default();
        let options = Options {
            capacity: 2,
            ..Options::default()
        };
        let notifier = Notifier::start(vec![gate.clone()], None, options, counters.clone());
        // No await between sends: the delivery task has taken none yet, so
        // the queue holds exactly its capacity and the rest are dropped.
        for n in 0..6 {
            notifier.notify(&note(n));
        }
        assert_eq!(counters.dropped.get(), 4);
        gate.open.add_permits(100);
        notifier.flush(Duration::from_secs(5)).await;
        assert_eq!(gate.delivered.load(Ordering::SeqCst), 2);
        assert_eq!(counters.failed.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_delivery_is_retried_with_backoff_then_given_up_and_counted() {
        let gate = Arc::new(Gate {
            open: tokio::sync::Semaphore::new(100),
            delivered: AtomicUsize::new(0),
            fail_first: AtomicUsize::new(2),
        });
        let counters = Counters::default();
        let notifier = Notifier::start(
            vec![gate.clone()],
            None,
            Options::default(),
            counters.clone(),
        );
        notifier.notify(&note(1));
        notifier.flush(Duration::from_secs(60)).await;
        assert_eq!(
            gate.delivered.load(Ordering::SeqCst),
            1,
            "third try delivers"
        );
        assert_eq!(counters.failed.get(), 0);

        gate.fail_first.store(100, Ordering::SeqCst);
        notifier.notify(&note(2));
        notifier.flush(Duration::from_secs(3600)).await;
        assert_eq!(counters.failed.get(), 1, "given up after its retries");
        assert_eq!(gate.delivered.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_disabled_notifier_remembers_nothing() {
        let notifier = Notifier::default();
        let key: ObjectKey = "machine/web".parse().unwrap();
        assert!(!notifier.first_since_start(&key));
        notifier.notify(&note(1));
    }
}
