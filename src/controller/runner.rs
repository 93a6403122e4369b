//! The runner: executes reconcile futures as tokio tasks, at most `limit` at a
//! time and never two of one key at once, and hands each key back when its
//! task ends, whether it returned, panicked or was aborted. It must not decide
//! what runs next, when, or what an outcome means: that is the scheduler's and
//! the applier's job. It never queues: a start it cannot honour is refused.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;

use tokio::task::{Id, JoinError, JoinSet};

/// Why [`Runner::start`] refused to start a reconcile. The future was dropped
/// without being polled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The key already has a reconcile in flight.
    #[error("start a reconcile: one for this key is already running")]
    AlreadyRunning,
    /// `limit` reconciles are in flight already.
    #[error("start a reconcile: all {limit} slots are busy")]
    AtCapacity {
        /// The runner's concurrency limit.
        limit: usize,
    },
}

/// How a reconcile task ended without returning its output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfinished {
    /// The reconcile panicked; the panic was caught by its task.
    #[error("finish a reconcile: it panicked: {message}")]
    Panicked {
        /// The panic payload if it was a string, else a placeholder.
        message: String,
    },
    /// The task was aborted (see [`Runner::abort_all`]) before it returned.
    #[error("finish a reconcile: it was aborted")]
    Aborted,
}

/// Runs reconcile futures as tasks, keyed by the object they reconcile.
///
/// Invariants: never runs two reconciles of one key at once; never has more
/// than `limit` in flight; every started key is returned exactly once by
/// [`Runner::join_next`], and stays "running" until then, even if its task
/// panicked or was aborted.
#[derive(Debug)]
pub struct Runner<K, O> {
    limit: usize,
    tasks: JoinSet<O>,
    /// The key of each task in `tasks`. Task ids, not futures, carry the key so
    /// that a panicking task still gives its key back.
    keys_by_task: HashMap<Id, K>,
    /// The task of each running key, for O(1) `is_running`.
    tasks_by_key: HashMap<K, Id>,
}

impl<K, O> Runner<K, O>
where
    K: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
    O: Send + 'static,
{
    /// A runner allowing `limit` reconciles in flight. There is no unlimited
    /// mode: a `limit` of 0 is raised to 1.
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            tasks: JoinSet::new(),
            keys_by_task: HashMap::new(),
            tasks_by_key: HashMap::new(),
        }
    }

    /// The concurrency limit in force (at least 1).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether `key` has a reconcile in flight (or one that ended but has not
    /// been returned by [`Runner::join_next`] yet).
    pub fn is_running(&self, key: &K) -> bool {
        self.tasks_by_key.contains_key(key)
    }

    /// Whether [`Runner::start`] would accept a key that is not running.
    pub fn has_capacity(&self) -> bool {
        self.tasks_by_key.len() < self.limit
    }

    /// The number of keys in flight.
    pub fn running_count(&self) -> usize {
        self.tasks_by_key.len()
    }

    /// Whether no key is in flight.
    pub fn is_empty(&self) -> bool {
        self.tasks_by_key.is_empty()
    }

    /// Spawns `fut` as the reconcile of `key` on the current tokio runtime.
    ///
    /// Refuses, dropping `fut` unpolled, if `key` is running or the runner is
    /// at its limit. Must be called from within a tokio runtime (spawning
    /// panics otherwise).
    pub fn start<F>(&mut self, key: K, fut: F) -> Result<(), StartError>
    where
        F: Future<Output = O> + Send + 'static,
    {
        if self.is_running(&key) {
            return Err(StartError::AlreadyRunning);
        }
        if !self.has_capacity() {
            return Err(StartError::AtCapacity { limit: self.limit });
        }
        let id = self.tasks.spawn(fut).id();
        self.keys_by_task.insert(id, key.clone());
        self.tasks_by_key.insert(key, id);
        Ok(())
    }

    /// Waits for the next reconcile to end and returns its key with its output,
    /// or why it has none. Returns `None` at once if nothing is running.
    ///
    /// Cancel-safe, so it can be a `tokio::select!` branch: if the returned
    /// future is dropped before it completes, no task result is lost and the
    /// key stays running until a later call returns it.
    pub async fn join_next(&mut self) -> Option<(K, Result<O, Unfinished>)> {
        loop {
            // `JoinSet::join_next_with_id` is documented cancel-safe; the
            // bookkeeping below happens after its await, with no await between
            // taking the result and returning it.
            let (id, result) = match self.tasks.join_next_with_id().await? {
                Ok((id, output)) => (id, Ok(output)),
                Err(error) => (error.id(), Err(unfinished(error))),
            };
            match self.keys_by_task.remove(&id) {
                Some(key) => {
                    self.tasks_by_key.remove(&key);
                    return Some((key, result));
                }
                None => {
                    // Every spawned task is recorded before `start` returns,
                    // so this is a bug in the runner; skip rather than stall.
                    tracing::error!(task = %id, "reconcile task ended with no key recorded");
                }
            }
        }
    }

    /// Asks every in-flight reconcile to stop at its next `.await`. Their keys
    /// stay running until [`Runner::join_next`] returns them, mostly with
    /// [`Unfinished::Aborted`] (or with their output, if they had already
    /// returned).
    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }
}

/// Converts tokio's join error, keeping a panic's message for the log.
fn unfinished(error: JoinError) -> Unfinished {
    if error.is_cancelled() {
        return Unfinished::Aborted;
    }
    let message = match error.try_into_panic() {
        Ok(payload) => match payload.downcast::<String>() {
            Ok(message) => *message,
            Err(payload) => match payload.downcast::<&'static str>() {
                Ok(message) => (*message).to_owned(),
                Err(_) => "non-string panic payload".to_owned(),
            },
        },
        Err(_) => "task failed".to_owned(),
    };
    Unfinished::Panicked { message }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::time::{Instant, sleep};

    use super::*;

    /// Counts reconciles in flight, overall and per key, keeping the maxima.
    #[derive(Default)]
    struct Probe {
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        per_key: [AtomicUsize; 8],
        max_per_key: AtomicUsize,
    }

    impl Probe {
        fn reconcile(
            self: &Arc<Self>,
            key: usize,
            work: Duration,
        ) -> impl Future<Output = usize> + Send + use<> {
            let probe = Arc::clone(self);
            async move {
                let now = probe.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                probe.max_in_flight.fetch_max(now, Ordering::SeqCst);
                let mine = probe.per_key[key].fetch_add(1, Ordering::SeqCst) + 1;
                probe.max_per_key.fetch_max(mine, Ordering::SeqCst);
                sleep(work).await;
                probe.per_key[key].fetch_sub(1, Ordering::SeqCst);
                probe.in_flight.fetch_sub(1, Ordering::SeqCst);
                key
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runner_never_reconciles_one_key_twice_at_once() {
        let probe = Arc::new(Probe::default());
        let mut runner = Runner::new(64);
        let mut started = 0;
        let mut refused = 0;
        for round in 0..200u64 {
            // Fire a start for every key each round; most keys are running.
            for key in 0..8 {
                let work = Duration::from_millis(10 + (round * 7 + key as u64 * 13) % 50);
                match runner.start(key, probe.reconcile(key, work)) {
                    Ok(()) => started += 1,
                    Err(StartError::AlreadyRunning) => refused += 1,
                    Err(other) => panic!("unexpected refusal: {other}"),
                }
            }
            tokio::select! {
                Some((key, result)) = runner.join_next() => {
                    assert_eq!(result, Ok(key));
                    assert!(!runner.is_running(&key));
                }
                () = sleep(Duration::from_millis(7)) => {}
            }
        }
        assert!(started > 100, "only {started} reconciles ran");
        assert!(refused > 100, "only {refused} duplicate starts were tried");
        assert_eq!(probe.max_per_key.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn runner_never_exceeds_its_concurrency_limit() {
        let probe = Arc::new(Probe::default());
        let mut runner = Runner::new(3);
        let mut queue: Vec<usize> = (0..8).collect();
        let mut done = 0;
        let t0 = Instant::now();
        while done < 8 {
            while runner.has_capacity() {
                let Some(key) = queue.pop() else { break };
                runner
                    .start(key, probe.reconcile(key, Duration::from_secs(1)))
                    .unwrap();
            }
            if let Some(key) = queue.last() {
                let refused = runner.start(*key, probe.reconcile(*key, Duration::ZERO));
                assert_eq!(refused, Err(StartError::AtCapacity { limit: 3 }));
            }
            assert!(runner.running_count() <= 3);
            runner.join_next().await.unwrap().1.unwrap();
            done += 1;
        }
        assert_eq!(probe.max_in_flight.load(Ordering::SeqCst), 3);
        // 8 one-second reconciles, 3 at a time: three waves.
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert!(runner.join_next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn runner_zero_limit_means_one_not_unlimited() {
        let mut runner: Runner<&str, ()> = Runner::new(0);
        assert_eq!(runner.limit(), 1);
        runner.start("a", sleep(Duration::from_secs(1))).unwrap();
        assert_eq!(
            runner.start("b", async {}),
            Err(StartError::AtCapacity { limit: 1 })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn runner_returns_the_key_of_a_panicking_reconcile() {
        let mut runner: Runner<&str, u32> = Runner::new(2);
        runner
            .start("ok", async {
                sleep(Duration::from_secs(5)).await;
                7
            })
            .unwrap();
        runner
            .start("boom", async { panic!("reconcile exploded") })
            .unwrap();
        let (key, result) = runner.join_next().await.unwrap();
        assert_eq!(key, "boom");
        assert_eq!(
            result,
            Err(Unfinished::Panicked {
                message: "reconcile exploded".to_owned()
            })
        );
        assert!(!runner.is_running(&"boom"));
        assert!(runner.is_running(&"ok"));
        // The key can run again once it was handed back.
        runner.start("boom", async { 1 }).unwrap();
        assert_eq!(runner.running_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn runner_abort_all_hands_back_every_key_as_aborted() {
        let mut runner: Runner<u32, ()> = Runner::new(4);
        for key in 0..3 {
            runner.start(key, sleep(Duration::from_secs(3600))).unwrap();
        }
        runner.abort_all();
        assert_eq!(runner.running_count(), 3, "keys stay running until joined");
        let t0 = Instant::now();
        let mut keys = Vec::new();
        while let Some((key, result)) = runner.join_next().await {
            assert_eq!(result, Err(Unfinished::Aborted));
            keys.push(key);
        }
        keys.sort();
        assert_eq!(keys, vec![0, 1, 2]);
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert!(runner.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn runner_join_next_loses_nothing_when_cancelled_in_select() {
        let mut runner: Runner<&str, &str> = Runner::new(2);
        runner
            .start("slow", async {
                sleep(Duration::from_millis(10_500)).await;
                "done"
            })
            .unwrap();
        let mut timeouts = 0;
        let joined = loop {
            tokio::select! {
                joined = runner.join_next() => break joined,
                () = sleep(Duration::from_secs(1)) => timeouts += 1,
            }
        };
        assert_eq!(timeouts, 10);
        assert_eq!(joined, Some(("slow", Ok("done"))));
        assert!(runner.is_empty());
    }
}
