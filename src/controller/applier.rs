//! The applier: the reconcile loop that ties the scheduler, the runner and the
//! error backoff together (kube-runtime's `applier`). It turns requests into
//! scheduled keys, starts due keys when a slot is free, turns each finished
//! reconcile into its next deadline (requeue, backoff retry or nothing),
//! reports every finished reconcile, and shuts down on request. It must not
//! know what a key means, read specs or facts, or classify errors itself: the
//! reconcile function does the work and its error type answers
//! [`ReconcileError::is_transient`].

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use super::backoff::{BackoffConfig, ErrorBackoff};
use super::runner::{Runner, Unfinished};
use super::scheduler::Scheduler;

/// Longest delay honoured for a requeue or retry; longer ones are shortened
/// to it so that deadline arithmetic cannot overflow.
const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// What a successful reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reconcile the key again this long after this reconcile finished
    /// (sooner if something requests it).
    Requeue(Duration),
    /// Schedule nothing: the key runs again only when requested.
    AwaitChange,
}

/// What the applier needs to know about a reconcile's error.
pub trait ReconcileError {
    /// True if retrying the same spec may succeed (a host was unreachable),
    /// false if it cannot until the spec changes (invalid spec, missing image).
    fn is_transient(&self) -> bool;
}

/// A request to reconcile a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<K> {
    /// Reconcile at `Instant` or earlier (periodic resync, a dependency that
    /// became ready). While the key waits out an error backoff, the deadline
    /// is clamped to the end of that backoff: such requests neither cut the
    /// backoff short nor count as failures (kubernetes/kubernetes#132805).
    At(K, Instant),
    /// Reconcile as soon as possible, cutting any error backoff short. For
    /// changes that may fix the error: the spec changed, or an operator asked.
    Now(K),
}

impl<K> Request<K> {
    /// The key this request is about.
    pub fn key(&self) -> &K {
        match self {
            Request::At(key, _) | Request::Now(key) => key,
        }
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most reconciles in flight at once; 0 is raised to 1.
    pub concurrency: usize,
    /// Delays between retries of a key failing with transient errors.
    pub backoff: BackoffConfig,
    /// How long [`Phase::Graceful`] waits for running reconciles before it
    /// aborts them.
    pub shutdown_grace: Duration,
    /// Where to publish the number of keys pending or running (a metric).
    pub queue_depth: Option<Arc<AtomicUsize>>,
}

impl Default for Config {
    /// 4 reconciles at once (Flux's default), default backoff, 30 s grace.
    fn default() -> Self {
        Self {
            concurrency: 4,
            backoff: BackoffConfig::default(),
            shutdown_grace: Duration::from_secs(30),
            queue_depth: None,
        }
    }
}

/// What the loop should be doing; sent over a `watch` channel. Moves only
/// forward: once `Graceful` or `Abort` is seen, `Running` is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Schedule and start reconciles.
    Running,
    /// Start nothing more; wait up to the grace period for running reconciles,
    /// then abort the rest and return.
    Graceful,
    /// Abort running reconciles at their next `.await` and return.
    Abort,
}

/// How one reconcile ended, and what the applier scheduled because of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<E> {
    /// The reconcile returned `Ok`; the key's failure count was reset.
    Succeeded(Action),
    /// The reconcile returned `Err`.
    Failed {
        /// The error it returned.
        error: E,
        /// What [`ReconcileError::is_transient`] said.
        transient: bool,
        /// When transient: the backoff after which it is retried. When
        /// terminal: `None`, nothing is scheduled.
        retry_in: Option<Duration>,
        /// Consecutive transient failures of the key since its last success,
        /// this one included if it was transient.
        failures: u32,
    },
    /// The reconcile panicked. Treated as a transient failure: retried after
    /// a backoff, as controller-runtime does for recovered panics.
    Panicked {
        /// The panic message.
        message: String,
        /// The backoff after which it is retried.
        retry_in: Duration,
        /// Consecutive failures of the key, this one included.
        failures: u32,
    },
    /// The reconcile was aborted by shutdown before it returned. Its work may
    /// be half done; the caller should requeue the key on its next start.
    Aborted,
}

/// One finished reconcile, as reported on the `finished` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished<K, E> {
    /// The key that was reconciled.
    pub key: K,
    /// How it ended.
    pub outcome: Outcome<E>,
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The requests channel closed and no key was pending or running.
    RequestsDone,
    /// [`Phase::Graceful`]: running reconciles finished or were aborted at the
    /// end of the grace period.
    Graceful,
    /// [`Phase::Abort`]: running reconciles were aborted at once.
    Abort,
}

/// Totals of one [`run`], for the caller's exit status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary<K> {
    /// Why the loop ended.
    pub ended_by: EndReason,
    /// Reconciles started.
    pub started: u64,
    /// Reconciles that returned `Ok`.
    pub succeeded: u64,
    /// Reconciles that returned `Err`, transient or terminal.
    pub failed: u64,
    /// Reconciles that panicked.
    pub panicked: u64,
    /// Keys whose reconcile was aborted by shutdown, in the order they ended.
    pub aborted: Vec<K>,
    /// Keys still scheduled and never started when the loop ended.
    pub left_pending: usize,
}

/// Runs the reconcile loop until the requests channel closes with nothing
/// left to do, or until `phase` leaves [`Phase::Running`].
///
/// Contract:
/// - every key gets at most one pending entry, earliest deadline wins
///   (backoff clamping aside, see [`Request::At`]);
/// - never two reconciles of one key at once, never more than
///   `config.concurrency`; a request for a running key runs it once more after
///   it finishes, however many requests came;
/// - `Ok(Requeue(d))` schedules the key at finish + `d` and `Ok(AwaitChange)`
///   schedules nothing, both resetting its backoff; a transient `Err` or a
///   panic schedules it at finish + the next backoff delay, replacing any
///   pending [`Request::At`] made meanwhile; a terminal `Err` schedules nothing
///   and resets nothing;
/// - every started reconcile is reported exactly once on `finished` (a closed
///   `finished` receiver is ignored);
/// - requeues keep the loop alive: a caller that wants it to end must send
///   [`Phase::Graceful`] or have its reconciles return `AwaitChange`;
/// - if the `phase` sender is dropped, the last phase stays in force.
///
/// Reconciles are spawned as tokio tasks, each in a `reconcile` span with an
/// `object` field (and an empty `revision` field the reconcile may record).
/// Must be called within a tokio runtime.
pub async fn run<K, E, F, Fut>(
    config: Config,
    mut requests: mpsc::UnboundedReceiver<Request<K>>,
    reconcile: F,
    finished: mpsc::UnboundedSender<Finished<K, E>>,
    mut phase: watch::Receiver<Phase>,
) -> RunSummary<K>
where
    K: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
    E: ReconcileError + Send + 'static,
    F: FnMut(K) -> Fut,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    let grace = config.shutdown_grace;
    let queue_depth = config.queue_depth.clone();
    let mut state = Loop::new(config, reconcile, finished);
    let mut requests_open = true;
    let mut phase_open = true;
    let mut current = *phase.borrow_and_update();
    loop {
        match current {
            Phase::Running => {}
            Phase::Graceful => return state.drain(grace, &mut phase, phase_open).await,
            Phase::Abort => return state.abort_all(EndReason::Abort).await,
        }
        state.start_due();
        if let Some(depth) = &queue_depth {
            depth.store(
                state.scheduler.len() + state.runner.running_count(),
                Ordering::Relaxed,
            );
        }
        if !requests_open && state.scheduler.is_empty() && state.runner.is_empty() {
            return state.end(EndReason::RequestsDone);
        }
        let wake = state.next_wake();
        tokio::select! {
            biased;
            changed = phase.changed(), if phase_open => match changed {
                Ok(()) => current = *phase.borrow_and_update(),
                Err(_) => phase_open = false,
            },
            Some((key, result)) = state.runner.join_next(), if !state.runner.is_empty() => {
                state.finish(key, result);
            }
            request = requests.recv(), if requests_open => match request {
                Some(request) => state.request(request),
                None => requests_open = false,
            },
            () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            else => {
                // Unreachable: with requests closed and nothing running, an
                // empty scheduler returned above and a non-empty one has an
                // eligible deadline. Returning beats panicking in a daemon.
                tracing::error!("reconcile loop has nothing to wait for; stopping");
                return state.end(EndReason::RequestsDone);
            }
        }
    }
}

/// The loop's state between wake-ups.
///
/// Invariant: a key is in `backoff_until` only while its backoff retry is
/// pending and it has not started since, and in `urgent` only while a
/// [`Request::Now`] for it is pending.
struct Loop<K, E, F> {
    scheduler: Scheduler<K>,
    runner: Runner<K, Result<Action, E>>,
    backoff: ErrorBackoff<K>,
    backoff_until: HashMap<K, Instant>,
    urgent: HashSet<K>,
    reconcile: F,
    finished: mpsc::UnboundedSender<Finished<K, E>>,
    summary: RunSummary<K>,
}

impl<K, E, F, Fut> Loop<K, E, F>
where
    K: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
    E: ReconcileError + Send + 'static,
    F: FnMut(K) -> Fut,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    fn new(config: Config, reconcile: F, finished: mpsc::UnboundedSender<Finished<K, E>>) -> Self {
        Self {
            scheduler: Scheduler::new(),
            runner: Runner::new(config.concurrency),
            backoff: ErrorBackoff::new(config.backoff),
            backoff_until: HashMap::new(),
            urgent: HashSet::new(),
            reconcile,
            finished,
            summary: RunSummary {
                ended_by: EndReason::RequestsDone,
                started: 0,
                succeeded: 0,
                failed: 0,
                panicked: 0,
                aborted: Vec::new(),
                left_pending: 0,
            },
        }
    }

    fn request(&mut self, request: Request<K>) {
        match request {
            Request::Now(key) => {
                self.urgent.insert(key.clone());
                self.scheduler.schedule(key, Instant::now());
            }
            Request::At(key, at) => {
                let at = match self.backoff_until.get(&key) {
                    Some(&until) => at.max(until),
                    None => at,
                };
                self.scheduler.schedule(key, at);
            }
        }
    }

    /// Starts due keys that are not running, earliest first, while there is
    /// a free slot.
    fn start_due(&mut self) {
        let now = Instant::now();
        while self.runner.has_capacity() {
            let runner = &self.runner;
            let Some(key) = self.scheduler.pop_due(now, |key| !runner.is_running(key)) else {
                break;
            };
            self.backoff_until.remove(&key);
            self.urgent.remove(&key);
            // The caller's reconcile carries its own span (object, revision).
            let fut = (self.reconcile)(key.clone());
            match self.runner.start(key.clone(), fut) {
                Ok(()) => self.summary.started += 1,
                Err(error) => {
                    // Unreachable: capacity and eligibility were checked
                    // above. Keep the key rather than lose it.
                    tracing::error!(object = ?key, %error, "reconcile not started");
                    self.scheduler.schedule(key, now);
                    break;
                }
            }
        }
    }

    /// When the loop must wake to start a key, if it could start one.
    fn next_wake(&self) -> Option<Instant> {
        if !self.runner.has_capacity() {
            // Only a finishing reconcile can make room.
            return None;
        }
        let runner = &self.runner;
        self.scheduler
            .next_eligible_deadline(|key| !runner.is_running(key))
    }

    /// Records how `key`'s reconcile ended, schedules what follows from it
    /// and reports it.
    fn finish(&mut self, key: K, result: Result<Result<Action, E>, Unfinished>) {
        let now = Instant::now();
        let outcome = match result {
            Ok(Ok(action)) => {
                self.summary.succeeded += 1;
                self.backoff.on_success(&key);
                if let Action::Requeue(delay) = action {
                    self.scheduler.schedule(key.clone(), after(now, delay));
                }
                Outcome::Succeeded(action)
            }
            Ok(Err(error)) if error.is_transient() => {
                self.summary.failed += 1;
                let delay = self.retry_after_backoff(&key, now);
                Outcome::Failed {
                    error,
                    transient: true,
                    retry_in: Some(delay),
                    failures: self.backoff.failures(&key),
                }
            }
            Ok(Err(error)) => {
                self.summary.failed += 1;
                Outcome::Failed {
                    error,
                    transient: false,
                    retry_in: None,
                    failures: self.backoff.failures(&key),
                }
            }
            Err(Unfinished::Panicked { message }) => {
                self.summary.panicked += 1;
                tracing::error!(object = ?key, %message, "reconcile panicked");
                let delay = self.retry_after_backoff(&key, now);
                Outcome::Panicked {
                    message,
                    retry_in: delay,
                    failures: self.backoff.failures(&key),
                }
            }
            Err(Unfinished::Aborted) => {
                self.summary.aborted.push(key.clone());
                Outcome::Aborted
            }
        };
        if self.finished.send(Finished { key, outcome }).is_err() {
            tracing::debug!("finished receiver closed; reconcile outcome dropped");
        }
    }

    /// Counts a failure of `key` and schedules its retry after the backoff.
    /// Returns the backoff delay.
    fn retry_after_backoff(&mut self, key: &K, now: Instant) -> Duration {
        let delay = self.backoff.on_failure(key);
        let retry_at = after(now, delay);
        if !self.urgent.contains(key) {
            // An `At` request that arrived while the key ran is older news
            // than this failure; letting it win would retry without backoff.
            self.scheduler.cancel(key);
        }
        self.scheduler.schedule(key.clone(), retry_at);
        self.backoff_until.insert(key.clone(), retry_at);
        delay
    }

    /// Graceful shutdown: starts nothing, lets running reconciles finish
    /// within `grace`, then aborts the rest. [`Phase::Abort`] cuts it short.
    async fn drain(
        mut self,
        grace: Duration,
        phase: &mut watch::Receiver<Phase>,
        mut phase_open: bool,
    ) -> RunSummary<K> {
        let deadline = after(Instant::now(), grace);
        while !self.runner.is_empty() {
            tokio::select! {
                biased;
                changed = phase.changed(), if phase_open => match changed {
                    Ok(()) => {
                        if *phase.borrow_and_update() == Phase::Abort {
                            return self.abort_all(EndReason::Abort).await;
                        }
                    }
                    Err(_) => phase_open = false,
                },
                Some((key, result)) = self.runner.join_next() => self.finish(key, result),
                () = sleep_until(deadline) => {
                    tracing::warn!(
                        running = self.runner.running_count(),
                        "shutdown grace period over; aborting running reconciles"
                    );
                    return self.abort_all(EndReason::Graceful).await;
                }
            }
        }
        self.end(EndReason::Graceful)
    }

    /// Aborts every running reconcile, reports each, and ends the loop.
    async fn abort_all(mut self, reason: EndReason) -> RunSummary<K> {
        self.runner.abort_all();
        while let Some((key, result)) = self.runner.join_next().await {
            self.finish(key, result);
        }
        self.end(reason)
    }

    fn end(mut self, reason: EndReason) -> RunSummary<K> {
        self.summary.ended_by = reason;
        self.summary.left_pending = self.scheduler.len();
        self.summary
    }
}

/// `now + delay`, with `delay` capped at [`MAX_DELAY`].
fn after(now: Instant, delay: Duration) -> Instant {
    now.checked_add(delay.min(MAX_DELAY)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use tokio::task::JoinHandle;
    use tokio::time::sleep;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct FakeError {
        transient: bool,
    }

    impl ReconcileError for FakeError {
        fn is_transient(&self) -> bool {
            self.transient
        }
    }

    /// One scripted run of the fake reconcile: how long it works, then how it
    /// ends.
    #[derive(Debug, Clone)]
    enum Step {
        Ok(u64, Action),
        Transient(u64),
        Terminal(u64),
        Panic,
    }

    type Key = &'static str;

    /// A fake reconcile that plays a per-key script (then `AwaitChange`) and
    /// records when each key started, in seconds since the test began.
    #[derive(Clone)]
    struct Fake {
        t0: Instant,
        scripts: Arc<Mutex<HashMap<Key, VecDeque<Step>>>>,
        starts: Arc<Mutex<Vec<(Key, u64)>>>,
    }

    impl Fake {
        fn reconcile(&self) -> impl FnMut(Key) -> BoxedRun + use<> {
            let fake = self.clone();
            move |key| {
                let step = fake
                    .scripts
                    .lock()
                    .unwrap()
                    .get_mut(key)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or(Step::Ok(0, Action::AwaitChange));
                fake.starts
                    .lock()
                    .unwrap()
                    .push((key, fake.t0.elapsed().as_secs()));
                Box::pin(async move {
                    match step {
                        Step::Ok(work, action) => {
                            sleep(Duration::from_secs(work)).await;
                            Ok(action)
                        }
                        Step::Transient(work) => {
                            sleep(Duration::from_secs(work)).await;
                            Err(FakeError { transient: true })
                        }
                        Step::Terminal(work) => {
                            sleep(Duration::from_secs(work)).await;
                            Err(FakeError { transient: false })
                        }
                        Step::Panic => panic!("fake reconcile panicked"),
                    }
                })
            }
        }

        fn starts(&self) -> Vec<(Key, u64)> {
            self.starts.lock().unwrap().clone()
        }
    }

    type BoxedRun = std::pin::Pin<Box<dyn Future<Output = Result<Action, FakeError>> + Send>>;

    struct Harness {
        t0: Instant,
        fake: Fake,
        requests: Option<mpsc::UnboundedSender<Request<Key>>>,
        finished: mpsc::UnboundedReceiver<Finished<Key, FakeError>>,
        phase: watch::Sender<Phase>,
        run: JoinHandle<RunSummary<Key>>,
    }

    impl Harness {
        fn start(config: Config, scripts: Vec<(Key, Vec<Step>)>) -> Self {
            let t0 = Instant::now();
            let fake = Fake {
                t0,
                scripts: Arc::new(Mutex::new(
                    scripts
                        .into_iter()
                        .map(|(key, steps)| (key, steps.into()))
                        .collect(),
                )),
                starts: Arc::default(),
            };
            let (requests, requests_rx) = mpsc::unbounded_channel();
            let (finished_tx, finished) = mpsc::unbounded_channel();
            let (phase, phase_rx) = watch::channel(Phase::Running);
            let run = tokio::spawn(run(
                config,
                requests_rx,
                fake.reconcile(),
                finished_tx,
                phase_rx,
            ));
            Self {
                t0,
                fake,
                requests: Some(requests),
                finished,
                phase,
                run,
            }
        }

        fn now(&self, key: Key) {
            self.send(Request::Now(key));
        }

        fn at(&self, key: Key, secs: u64) {
            let at = self.t0 + Duration::from_secs(secs);
            self.send(Request::At(key, at));
        }

        fn send(&self, request: Request<Key>) {
            self.requests.as_ref().unwrap().send(request).unwrap();
        }

        /// Drops the only sender, as a `--once` caller does after its last
        /// request.
        fn close_requests(&mut self) {
            self.requests = None;
        }

        fn outcomes(&mut self) -> Vec<(Key, Outcome<FakeError>)> {
            let mut out = Vec::new();
            while let Ok(f) = self.finished.try_recv() {
                out.push((f.key, f.outcome));
            }
            out
        }

        fn elapsed(&self) -> u64 {
            self.t0.elapsed().as_secs()
        }
    }

    fn exact_config(concurrency: usize) -> Config {
        Config {
            concurrency,
            backoff: BackoffConfig {
                jitter: 0.0,
                ..BackoffConfig::default()
            },
            shutdown_grace: Duration::from_secs(10),
            queue_depth: None,
        }
    }

    async fn advance_to(h: &Harness, secs: u64) {
        tokio::time::sleep_until(h.t0 + Duration::from_secs(secs)).await;
    }

    fn ok() -> Outcome<FakeError> {
        Outcome::Succeeded(Action::AwaitChange)
    }

    fn transient(retry_secs: u64, failures: u32) -> Outcome<FakeError> {
        Outcome::Failed {
            error: FakeError { transient: true },
            transient: true,
            retry_in: Some(Duration::from_secs(retry_secs)),
            failures,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn applier_coalesces_requests_for_a_running_key_into_one_rerun() {
        let script = vec![Step::Ok(10, Action::AwaitChange); 2];
        let mut h = Harness::start(exact_config(4), vec![("a", script)]);
        h.now("a");
        advance_to(&h, 1).await;
        h.now("a");
        h.at("a", 1);
        h.now("a");
        h.at("a", 5);
        advance_to(&h, 100).await;
        assert_eq!(h.fake.starts(), vec![("a", 0), ("a", 10)]);
        assert_eq!(h.outcomes(), vec![("a", ok()), ("a", ok())]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_starts_a_key_once_at_its_earliest_requested_time() {
        let h = Harness::start(exact_config(4), vec![]);
        h.at("a", 30);
        h.at("a", 20);
        h.at("a", 40);
        advance_to(&h, 19).await;
        assert_eq!(h.fake.starts(), vec![]);
        advance_to(&h, 100).await;
        assert_eq!(h.fake.starts(), vec![("a", 20)]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_never_exceeds_concurrency_and_runs_keys_in_deadline_order() {
        let keys = ["a", "b", "c", "d", "e"];
        let scripts = keys
            .iter()
            .map(|k| (*k, vec![Step::Ok(1, Action::AwaitChange)]))
            .collect();
        let h = Harness::start(exact_config(2), scripts);
        for k in keys {
            h.now(k);
        }
        advance_to(&h, 10).await;
        assert_eq!(
            h.fake.starts(),
            vec![("a", 0), ("b", 0), ("c", 1), ("d", 1), ("e", 2)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn applier_requeues_at_finish_plus_the_requested_delay() {
        let script = vec![
            Step::Ok(1, Action::Requeue(Duration::from_secs(30))),
            Step::Ok(1, Action::Requeue(Duration::from_secs(30))),
            Step::Ok(1, Action::AwaitChange),
        ];
        let h = Harness::start(exact_config(4), vec![("a", script)]);
        h.now("a");
        advance_to(&h, 1_000).await;
        assert_eq!(h.fake.starts(), vec![("a", 0), ("a", 31), ("a", 62)]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_retries_transient_errors_with_growing_backoff_and_success_resets_it() {
        let script = vec![
            Step::Transient(1),
            Step::Transient(1),
            Step::Transient(1),
            Step::Ok(1, Action::Requeue(Duration::from_secs(100))),
            Step::Transient(1),
            Step::Ok(1, Action::AwaitChange),
        ];
        let mut h = Harness::start(exact_config(4), vec![("a", script)]);
        h.now("a");
        advance_to(&h, 1_000).await;
        // Each retry waits 2, 4, 8 s after the failed run finished; after the
        // success the next failure waits 2 s again.
        assert_eq!(
            h.fake.starts(),
            vec![
                ("a", 0),
                ("a", 3),
                ("a", 8),
                ("a", 17),
                ("a", 118),
                ("a", 121)
            ]
        );
        let outcomes: Vec<_> = h.outcomes().into_iter().map(|(_, o)| o).collect();
        assert_eq!(
            outcomes,
            vec![
                transient(2, 1),
                transient(4, 2),
                transient(8, 3),
                Outcome::Succeeded(Action::Requeue(Duration::from_secs(100))),
                transient(2, 1),
                ok(),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn applier_at_requests_during_backoff_neither_pull_the_retry_earlier_nor_count_as_failures()
     {
        let mut config = exact_config(4);
        config.backoff.min_delay = Duration::from_secs(10);
        let script = vec![Step::Transient(0), Step::Transient(0)];
        let mut h = Harness::start(config, vec![("a", script)]);
        h.now("a");
        advance_to(&h, 1).await;
        for _ in 0..5 {
            h.at("a", 1);
        }
        advance_to(&h, 25).await;
        assert_eq!(h.fake.starts(), vec![("a", 0), ("a", 10)]);
        let outcomes: Vec<_> = h.outcomes().into_iter().map(|(_, o)| o).collect();
        assert_eq!(outcomes, vec![transient(10, 1), transient(20, 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_now_request_cuts_a_backoff_short() {
        let mut config = exact_config(4);
        config.backoff.min_delay = Duration::from_secs(10);
        let h = Harness::start(config, vec![("a", vec![Step::Transient(0)])]);
        h.now("a");
        advance_to(&h, 3).await;
        h.now("a");
        advance_to(&h, 50).await;
        assert_eq!(h.fake.starts(), vec![("a", 0), ("a", 3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_at_request_held_during_a_failing_run_still_waits_for_the_backoff() {
        let h = Harness::start(exact_config(4), vec![("a", vec![Step::Transient(5)])]);
        h.now("a");
        advance_to(&h, 1).await;
        h.at("a", 1);
        advance_to(&h, 50).await;
        // Without the backoff the held request would have rerun "a" at 5.
        assert_eq!(h.fake.starts(), vec![("a", 0), ("a", 7)]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_now_request_held_during_a_failing_run_reruns_it_without_backoff() {
        let h = Harness::start(exact_config(4), vec![("a", vec![Step::Transient(5)])]);
        h.now("a");
        advance_to(&h, 1).await;
        h.now("a");
        advance_to(&h, 50).await;
        assert_eq!(h.fake.starts(), vec![("a", 0), ("a", 5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_never_retries_a_terminal_error() {
        let mut h = Harness::start(exact_config(4), vec![("a", vec![Step::Terminal(1)])]);
        h.now("a");
        advance_to(&h, 3_600).await;
        assert_eq!(h.fake.starts(), vec![("a", 0)]);
        let outcome = Outcome::Failed {
            error: FakeError { transient: false },
            transient: false,
            retry_in: None,
            failures: 0,
        };
        assert_eq!(h.outcomes(), vec![("a", outcome)]);
        h.close_requests();
        let summary = h.run.await.unwrap();
        assert_eq!(summary.ended_by, EndReason::RequestsDone);
        assert_eq!((summary.started, summary.failed), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn applier_retries_a_panicking_reconcile_after_a_backoff() {
        let mut h = Harness::start(exact_config(4), vec![("a", vec![Step::Panic])]);
        h.now("a");
        advance_to(&h, 100).await;
        assert_eq!(h.fake.starts(), vec![("a", 0), ("a", 2)]);
        let panicked = Outcome::Panicked {
            message: "fake reconcile panicked".to_owned(),
            retry_in: Duration::from_secs(2),
            failures: 1,
        };
        assert_eq!(h.outcomes(), vec![("a", panicked), ("a", ok())]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_graceful_shutdown_lets_reconciles_finish_within_grace_and_aborts_the_rest() {
        let scripts = vec![
            ("fast", vec![Step::Ok(5, Action::AwaitChange)]),
            ("slow", vec![Step::Ok(100, Action::AwaitChange)]),
        ];
        let mut h = Harness::start(exact_config(4), scripts);
        h.now("fast");
        h.now("slow");
        h.at("later", 2);
        advance_to(&h, 1).await;
        h.phase.send(Phase::Graceful).unwrap();
        let summary = (&mut h.run).await.unwrap();
        // Grace is 10 s from the signal at 1 s.
        assert_eq!(h.elapsed(), 11);
        assert_eq!(h.fake.starts(), vec![("fast", 0), ("slow", 0)]);
        assert_eq!(
            h.outcomes(),
            vec![("fast", ok()), ("slow", Outcome::Aborted)]
        );
        assert_eq!(summary.ended_by, EndReason::Graceful);
        assert_eq!(summary.aborted, vec!["slow"]);
        assert_eq!(summary.left_pending, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_graceful_shutdown_returns_as_soon_as_running_reconciles_finish() {
        let scripts = vec![("a", vec![Step::Ok(3, Action::AwaitChange)])];
        let mut h = Harness::start(exact_config(4), scripts);
        h.now("a");
        advance_to(&h, 1).await;
        h.phase.send(Phase::Graceful).unwrap();
        let summary = (&mut h.run).await.unwrap();
        assert_eq!(h.elapsed(), 3);
        assert_eq!(summary.aborted, Vec::<Key>::new());
        assert_eq!(h.outcomes(), vec![("a", ok())]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_abort_phase_aborts_running_reconciles_at_once() {
        let scripts = vec![("a", vec![Step::Ok(100, Action::AwaitChange)])];
        let mut h = Harness::start(exact_config(4), scripts);
        h.now("a");
        advance_to(&h, 1).await;
        h.phase.send(Phase::Abort).unwrap();
        let summary = (&mut h.run).await.unwrap();
        assert_eq!(h.elapsed(), 1);
        assert_eq!(summary.ended_by, EndReason::Abort);
        assert_eq!(summary.aborted, vec!["a"]);
        assert_eq!(h.outcomes(), vec![("a", Outcome::Aborted)]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_abort_during_graceful_shutdown_does_not_wait_for_grace() {
        let scripts = vec![("a", vec![Step::Ok(100, Action::AwaitChange)])];
        let mut h = Harness::start(exact_config(4), scripts);
        h.now("a");
        advance_to(&h, 1).await;
        h.phase.send(Phase::Graceful).unwrap();
        advance_to(&h, 4).await;
        h.phase.send(Phase::Abort).unwrap();
        let summary = (&mut h.run).await.unwrap();
        assert_eq!(h.elapsed(), 4);
        assert_eq!(summary.ended_by, EndReason::Abort);
        assert_eq!(summary.aborted, vec!["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn applier_returns_when_requests_close_and_nothing_is_pending_or_running() {
        let scripts = vec![
            ("a", vec![Step::Ok(1, Action::AwaitChange)]),
            (
                "b",
                vec![Step::Transient(1), Step::Ok(1, Action::AwaitChange)],
            ),
        ];
        let mut h = Harness::start(exact_config(4), scripts);
        h.now("a");
        h.now("b");
        h.close_requests();
        let summary = (&mut h.run).await.unwrap();
        // "b"'s retry keeps the loop alive: fails at 1, retried at 3, done at 4.
        assert_eq!(h.elapsed(), 4);
        assert_eq!(h.fake.starts(), vec![("a", 0), ("b", 0), ("b", 3)]);
        assert_eq!(summary.ended_by, EndReason::RequestsDone);
        assert_eq!(
            (summary.started, summary.succeeded, summary.failed),
            (3, 2, 1)
        );
        assert_eq!(summary.left_pending, 0);
        assert_eq!(h.outcomes().len(), 3);
    }
}
