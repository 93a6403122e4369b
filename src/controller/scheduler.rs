//! The scheduler: the set of keys waiting to be reconciled, each with the
//! deadline at which it becomes due. It owns deduplication (one pending entry
//! per key, earliest deadline wins) and the choice of which due key goes next.
//! It must not sleep, spawn, read the clock or know why a key was requested:
//! callers pass `now` in, and time, concurrency and backoff policy live in the
//! applier, runner and backoff modules.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::Hash;

use tokio::time::Instant;

/// Keys waiting to be reconciled, ordered by deadline.
///
/// Invariants:
/// - at most one pending entry per key;
/// - a key's deadline only ever moves earlier while it is pending (a later
///   request never delays it); only [`Scheduler::cancel`] followed by
///   [`Scheduler::schedule`] can move it later;
/// - keys with equal deadlines come out in the order they were scheduled.
///
/// `schedule`, `cancel` and `deadline` are O(log n); `pop_due` and
/// `next_eligible_deadline` are O(h + log n), where h is the number of
/// ineligible ("held") keys ahead of the answer. The applier holds only running
/// keys, so h is bounded by its concurrency limit.
#[derive(Debug)]
pub struct Scheduler<K> {
    /// Entries in the order they become due; `seq` breaks ties by arrival and
    /// keeps entries unique even if two keys share a deadline.
    queue: BTreeSet<(Instant, u64, K)>,
    /// The queue entry of each pending key, so it can be found without a scan.
    entries: HashMap<K, (Instant, u64)>,
    next_seq: u64,
}

impl<K> Default for Scheduler<K>
where
    K: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K> Scheduler<K>
where
    K: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
{
    /// An empty scheduler.
    pub fn new() -> Self {
        Self {
            queue: BTreeSet::new(),
            entries: HashMap::new(),
            next_seq: 0,
        }
    }

    /// Asks for `key` to be reconciled at `at`.
    ///
    /// If `key` is already pending, the earlier of the two deadlines wins: a
    /// later `at` is ignored, an earlier one moves the entry forward.
    pub fn schedule(&mut self, key: K, at: Instant) {
        if let Some(&(current, seq)) = self.entries.get(&key) {
            if current <= at {
                return;
            }
            self.queue.remove(&(current, seq, key.clone()));
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.entries.insert(key.clone(), (at, seq));
        self.queue.insert((at, seq, key));
    }

    /// Removes `key`'s pending entry, if any. Returns whether there was one.
    pub fn cancel(&mut self, key: &K) -> bool {
        match self.entries.remove(key) {
            Some((at, seq)) => {
                self.queue.remove(&(at, seq, key.clone()));
                true
            }
            None => false,
        }
    }

    /// The deadline of `key`'s pending entry, or `None` if it is not pending.
    pub fn deadline(&self, key: &K) -> Option<Instant> {
        self.entries.get(key).map(|&(at, _)| at)
    }

    /// The earliest deadline of any pending key, held or not.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _, _)| *at)
    }

    /// The earliest deadline among keys for which `eligible` returns true.
    ///
    /// A loop that sleeps until the next deadline must use this rather than
    /// [`Scheduler::next_deadline`]: a held key that is already due would
    /// otherwise wake it again at once, forever.
    pub fn next_eligible_deadline(&self, mut eligible: impl FnMut(&K) -> bool) -> Option<Instant> {
        self.queue
            .iter()
            .find(|(_, _, key)| eligible(key))
            .map(|(at, _, _)| *at)
    }

    /// Removes and returns the key with the earliest deadline `<= now` for
    /// which `eligible` returns true.
    ///
    /// Due keys for which `eligible` returns false (for example because they
    /// are running) are held: they stay pending with their deadline unchanged
    /// and are returned by a later call once they are eligible.
    pub fn pop_due(&mut self, now: Instant, mut eligible: impl FnMut(&K) -> bool) -> Option<K> {
        let (at, seq, key) = self
            .queue
            .iter()
            .take_while(|(at, _, _)| *at <= now)
            .find(|(_, _, key)| eligible(key))?
            .clone();
        self.queue.remove(&(at, seq, key.clone()));
        self.entries.remove(&key);
        Some(key)
    }

    /// The number of pending keys, held ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn secs(base: Instant, s: u64) -> Instant {
        base + Duration::from_secs(s)
    }

    #[test]
    fn scheduler_keeps_one_entry_per_key() {
        let t0 = Instant::now();
        let mut s = Scheduler::new();
        for i in 0..5 {
            s.schedule("a", secs(t0, 10 + i));
        }
        s.schedule("b", secs(t0, 3));
        assert_eq!(s.len(), 2);
        assert_eq!(s.pop_due(secs(t0, 100), |_| true), Some("b"));
        assert_eq!(s.pop_due(secs(t0, 100), |_| true), Some("a"));
        assert_eq!(s.pop_due(secs(t0, 100), |_| true), None);
        assert!(s.is_empty());
    }

    #[test]
    fn scheduler_later_request_never_delays_a_pending_key() {
        let t0 = Instant::now();
        let mut s = Scheduler::new();
        s.schedule("a", secs(t0, 5));
        s.schedule("a", secs(t0, 50));
        assert_eq!(s.deadline(&"a"), Some(secs(t0, 5)));
        assert_eq!(s.pop_due(secs(t0, 5), |_| true), Some("a"));
    }

    #[test]
    fn scheduler_earlier_request_moves_a_pending_key_forward() {
        let t0 = Instant::now();
        let mut s = Scheduler::new();
        s.schedule("a", secs(t0, 50));
        s.schedule("b", secs(t0, 20));
        s.schedule("a", secs(t0, 10));
        assert_eq!(s.deadline(&"a"), Some(secs(t0, 10)));
        assert_eq!(s.next_deadline(), Some(secs(t0, 10)));
        assert_eq!(s.pop_due(secs(t0, 9), |_| true), None);
        assert_eq!(s.pop_due(secs(t0, 10), |_| true), Some("a"));
        // The old, later entry of "a" must be gone, not returned a second time.
        assert_eq!(s.pop_due(secs(t0, 100), |_| true), Some("b"));
        assert_eq!(s.pop_due(secs(t0, 100), |_| true), None);
    }

    #[test]
    fn scheduler_pops_due_keys_earliest_first_and_ties_in_arrival_order() {
        let t0 = Instant::now();
        let mut s = Scheduler::new();
        s.schedule("c", secs(t0, 3));
        s.schedule("z", secs(t0, 1));
        s.schedule("a", secs(t0, 1));
        s.schedule("late", secs(t0, 60));
        let mut out = Vec::new();
        while let Some(k) = s.pop_due(secs(t0, 10), |_| true) {
            out.push(k);
        }
        assert_eq!(out, vec!["z", "a", "c"]);
        assert_eq!(s.len(), 1);
        assert_eq!(s.next_deadline(), Some(secs(t0, 60)));
    }

    #[test]
    fn scheduler_holds_ineligible_due_keys_pending() {
        let t0 = Instant::now();
        let mut s = Scheduler::new();
        s.schedule("running", secs(t0, 1));
        s.schedule("idle", secs(t0, 2));
        s.schedule("future", secs(t0, 30));
        assert_eq!(s.pop_due(secs(t0, 5), |k| *k != "running"), Some("idle"));
        assert_eq!(s.pop_due(secs(t0, 5), |k| *k != "running"), None);
        // Held, not dropped, and its deadline is unchanged.
        assert_eq!(s.deadline(&"running"), Some(secs(t0, 1)));
        assert_eq!(s.next_deadline(), Some(secs(t0, 1)));
        assert_eq!(
            s.next_eligible_deadline(|k| *k != "running"),
            Some(secs(t0, 30))
        );
        assert_eq!(s.pop_due(secs(t0, 5), |_| true), Some("running"));
    }

    #[test]
    fn scheduler_cancel_removes_only_that_key() {
        let t0 = Instant::now();
        let mut s = Scheduler::new();
        s.schedule("a", secs(t0, 1));
        s.schedule("b", secs(t0, 2));
        assert!(s.cancel(&"a"));
        assert!(!s.cancel(&"a"));
        assert_eq!(s.deadline(&"a"), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.pop_due(secs(t0, 10), |_| true), Some("b"));
        // After a cancel a key can be scheduled later than before.
        s.schedule("a", secs(t0, 1));
        s.cancel(&"a");
        s.schedule("a", secs(t0, 40));
        assert_eq!(s.deadline(&"a"), Some(secs(t0, 40)));
    }

    #[test]
    fn scheduler_orders_ten_thousand_keys_by_deadline() {
        let t0 = Instant::now();
        let mut s = Scheduler::new();
        let n: u64 = 20_000;
        // Deadlines in a scrambled order, each key requested three times.
        for round in 0..3 {
            for i in 0..n {
                let d = (i * 7_919) % n;
                s.schedule(i, t0 + Duration::from_millis(d * 10 + 5 * (2 - round)));
            }
        }
        assert_eq!(s.len(), n as usize);
        let mut last = t0;
        let mut count = 0;
        while let Some(next) = s.next_deadline() {
            let k = s.pop_due(next, |_| true).unwrap();
            // The earliest of the three requests must have won.
            let expected = t0 + Duration::from_millis(((k * 7_919) % n) * 10);
            assert_eq!(next, expected, "wrong deadline for key {k}");
            assert!(next >= last, "out of order at key {k}");
            last = next;
            count += 1;
        }
        assert_eq!(count, n);
        assert!(s.is_empty());
    }
}
