//! Per-key error backoff: how long a key that keeps failing with transient
//! errors waits before its next attempt. It owns the failure count of each key
//! and the delay sequence (exponential, capped, jittered). It must not sleep,
//! schedule or decide whether an error is transient: the applier calls
//! [`ErrorBackoff::on_failure`] only for attempts that actually ran and failed
//! transiently, so requests that arrive during a backoff window never count as
//! failures (kubernetes/kubernetes#132805).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt::Debug;
use std::hash::{BuildHasher, Hash};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Shape of the delay sequence after consecutive transient failures.
///
/// The n-th consecutive failure (n = 1, 2, ...) yields a base delay of
/// `min(min_delay * factor^(n-1), max_delay)`, then jitter adds a random
/// `[0, jitter)` fraction of that base. So every delay lies in
/// `[base, base * (1 + jitter))` and never reaches `max_delay * (1 + jitter)`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffConfig {
    /// Delay after the first failure. Clamped to `max_delay`.
    pub min_delay: Duration,
    /// Growth per further failure. Values below 1.0 (or NaN) are treated as 1.0.
    pub factor: f32,
    /// Largest base delay; jitter may add at most `jitter * max_delay` on top.
    pub max_delay: Duration,
    /// Largest fraction of the base delay added at random, clamped to
    /// `[0.0, 1.0]`. 0.0 disables jitter and makes delays exact.
    pub jitter: f32,
    /// Seed of the jitter; `None` seeds from the process's random hasher keys
    /// so that two controllers do not retry in lockstep.
    pub jitter_seed: Option<u64>,
}

impl Default for BackoffConfig {
    /// 2 s doubling to 15 min (Flux's cap), with up to +10% jitter.
    fn default() -> Self {
        Self {
            min_delay: Duration::from_secs(2),
            factor: 2.0,
            max_delay: Duration::from_secs(15 * 60),
            jitter: 0.1,
            jitter_seed: None,
        }
    }
}

/// The failure count and delay sequence of one failing key.
#[derive(Debug)]
struct KeyBackoff {
    delays: backon::ExponentialBackoff,
    failures: u32,
}

/// Per-key exponential backoff that resets on success.
///
/// Invariants: a key has state only between its first transient failure and
/// its next success, so memory is proportional to the number of failing keys;
/// the delays returned for one key never shrink until
/// [`ErrorBackoff::on_success`] resets it (up to jitter), and never reach
/// `max_delay * (1 + jitter)`.
#[derive(Debug)]
pub struct ErrorBackoff<K> {
    /// Builds a fresh, non-jittered delay sequence for a key's first failure.
    builder: ExponentialBuilder,
    config: BackoffConfig,
    /// Random fractions in `[0, 1)`: backon's jitter applied to a constant
    /// 1 s sequence. backon's own jitter adds up to +100% of the delay, more
    /// than we want at a 15 min cap, so it is used only as the random source.
    jitter_source: backon::ExponentialBackoff,
    keys: HashMap<K, KeyBackoff>,
}

impl<K> ErrorBackoff<K>
where
    K: Clone + Eq + Hash + Ord + Debug + Send + Sync + 'static,
{
    /// A backoff with no failing keys.
    pub fn new(config: BackoffConfig) -> Self {
        let max_delay = config.max_delay;
        let min_delay = config.min_delay.min(max_delay);
        // Written so that NaN, which fails every comparison, also becomes 1.0.
        let factor = if config.factor >= 1.0 {
            config.factor
        } else {
            1.0
        };
        let builder = ExponentialBuilder::new()
            .with_min_delay(min_delay)
            .with_max_delay(max_delay)
            .with_factor(factor)
            .without_max_times();
        // Without backon's `std` feature its generator has a fixed seed, so
        // take one from std's randomly keyed hasher instead.
        let seed = config
            .jitter_seed
            .unwrap_or_else(|| RandomState::new().hash_one(0x636f_6e76_u64));
        let jitter_source = ExponentialBuilder::new()
            .with_min_delay(Duration::from_secs(1))
            .with_factor(1.0)
            .with_jitter()
            .with_jitter_seed(seed)
            .without_max_times()
            .build();
        Self {
            builder,
            config: BackoffConfig {
                min_delay,
                factor,
                jitter: config.jitter.clamp(0.0, 1.0),
                ..config
            },
            jitter_source,
            keys: HashMap::new(),
        }
    }

    /// Records one transient failure of `key` and returns how long to wait
    /// before its next attempt. Consecutive calls for one key grow the delay
    /// until it reaches the cap; the sequence never runs out.
    pub fn on_failure(&mut self, key: &K) -> Duration {
        let builder = self.builder;
        let state = self.keys.entry(key.clone()).or_insert_with(|| KeyBackoff {
            delays: builder.build(),
            failures: 0,
        });
        state.failures = state.failures.saturating_add(1);
        // The sequence is built without a retry limit, so `None` cannot
        // happen; the cap is the right answer if it ever did.
        let base = state
            .delays
            .next()
            .unwrap_or(self.config.max_delay)
            .min(self.config.max_delay);
        base + base.mul_f32(self.config.jitter * self.jitter_fraction())
    }

    /// Forgets `key`'s failures: its next failure waits `min_delay` again.
    pub fn on_success(&mut self, key: &K) {
        self.keys.remove(key);
    }

    /// The number of consecutive transient failures of `key` since its last
    /// success (0 if it has none).
    pub fn failures(&self, key: &K) -> u32 {
        self.keys.get(key).map_or(0, |state| state.failures)
    }

    /// A random number in `[0, 1)`.
    fn jitter_fraction(&mut self) -> f32 {
        let one = Duration::from_secs(1);
        let sample = self.jitter_source.next().unwrap_or(one);
        sample.saturating_sub(one).as_secs_f32().clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact() -> BackoffConfig {
        BackoffConfig {
            jitter: 0.0,
            ..BackoffConfig::default()
        }
    }

    #[test]
    fn backoff_doubles_from_min_and_caps_at_max_without_jitter() {
        let mut b = ErrorBackoff::new(exact());
        let got: Vec<u64> = (0..12).map(|_| b.on_failure(&"a").as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900]);
        assert_eq!(b.failures(&"a"), 12);
    }

    #[test]
    fn backoff_jitter_stays_within_bounds_and_varies() {
        let config = BackoffConfig {
            jitter: 0.1,
            ..BackoffConfig::default()
        };
        let mut seen = Vec::new();
        for _ in 0..50 {
            let mut b = ErrorBackoff::new(config.clone());
            for n in 0..15 {
                let base = Duration::from_secs((2u64 << n).min(900));
                let got = b.on_failure(&"a");
                assert!(got >= base, "failure {n}: {got:?} < {base:?}");
                assert!(got < base.mul_f32(1.1), "failure {n}: {got:?} too large");
                if n == 0 {
                    seen.push(got);
                }
            }
        }
        seen.sort();
        seen.dedup();
        assert!(
            seen.len() > 10,
            "jitter produced only {} values",
            seen.len()
        );
    }

    #[test]
    fn backoff_with_seed_is_reproducible() {
        let config = BackoffConfig {
            jitter_seed: Some(7),
            ..BackoffConfig::default()
        };
        let mut a = ErrorBackoff::new(config.clone());
        let mut b = ErrorBackoff::new(config);
        let xs: Vec<_> = (0..5).map(|_| a.on_failure(&1)).collect();
        let ys: Vec<_> = (0..5).map(|_| b.on_failure(&1)).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    fn backoff_resets_on_success() {
        let mut b = ErrorBackoff::new(exact());
        b.on_failure(&"a");
        b.on_failure(&"a");
        assert_eq!(b.on_failure(&"a"), Duration::from_secs(8));
        b.on_success(&"a");
        assert_eq!(b.failures(&"a"), 0);
        assert_eq!(b.on_failure(&"a"), Duration::from_secs(2));
        assert_eq!(b.failures(&"a"), 1);
    }

    #[test]
    fn backoff_keys_do_not_share_failures() {
        let mut b = ErrorBackoff::new(exact());
        b.on_failure(&"a");
        b.on_failure(&"a");
        assert_eq!(b.on_failure(&"b"), Duration::from_secs(2));
        assert_eq!(b.failures(&"a"), 2);
        assert_eq!(b.failures(&"b"), 1);
        b.on_success(&"a");
        assert_eq!(b.failures(&"b"), 1);
    }

    #[test]
    fn backoff_never_runs_out_and_clamps_odd_configs() {
        let mut b = ErrorBackoff::new(BackoffConfig {
            min_delay: Duration::from_secs(60),
            factor: 0.5,
            max_delay: Duration::from_secs(10),
            jitter: 5.0,
            jitter_seed: Some(1),
        });
        for _ in 0..1_000 {
            let d = b.on_failure(&"a");
            assert!(
                d >= Duration::from_secs(10) && d < Duration::from_secs(20),
                "{d:?}"
            );
        }
        assert_eq!(b.failures(&"a"), 1_000);
    }
}
