//! The daemon's health, as `GET /healthz` answers it: healthy while the
//! loop turns and the desired-state source was last read successfully
//! within three of its read intervals.
//!
//! The daemon beats [`Health::beat`] on every turn of its loop (and on a
//! timer, so an idle loop still beats) and reports each read of the source
//! ([`Health::source_read`], [`Health::source_failed`]); a Git source
//! reports its fetches the same way and sets its poll interval with
//! [`Health::set_source_interval`]. Plain atomics and a mutex: no IO, and
//! [`Health::check`] takes the time so tests need no clock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::spec::HumanDuration;
use crate::store::records::now_ms;

/// How long the loop may go without a beat before it counts as stuck.
pub const LOOP_STALE: Duration = Duration::from_secs(60);

/// How often an idle daemon beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(10);

/// Shared between the daemon (which writes) and the API (which reads).
#[derive(Debug, Default)]
pub struct Health {
    running: AtomicBool,
    beat_ms: AtomicU64,
    /// 0: never read.
    read_ms: AtomicU64,
    /// 0: no interval (the directory is read on file changes only), so
    /// the age of the last read says nothing.
    interval_ms: AtomicU64,
    /// Why the last read failed, if it did.
    read_error: Mutex<Option<String>>,
}

impl Health {
    /// The loop started (`true`) or is stopping (`false`).
    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::SeqCst);
        self.beat();
    }

    /// The loop turned.
    pub fn beat(&self) {
        self.beat_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// The source is read again at least this often (`None`: only on
    /// changes); the last successful read may be three of these old.
    pub fn set_source_interval(&self, interval: Option<Duration>) {
        let ms = interval.map_or(0, |i| u64::try_from(i.as_millis()).unwrap_or(u64::MAX));
        self.interval_ms.store(ms, Ordering::SeqCst);
    }

    /// The source was read (valid or not: an invalid desired state is not
    /// applied, and says so in logs and events, but the source answered).
    pub fn source_read(&self) {
        self.read_ms.store(now_ms(), Ordering::SeqCst);
        *self
            .read_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Reading the source failed; `error` says why (no secrets: a path or
    /// a URL without credentials).
    pub fn source_failed(&self, error: &str) {
        *self
            .read_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_owned());
    }

    /// `Ok(sentence)` when healthy at `now`, `Err(reason)` otherwise.
    pub fn check(&self, now: u64) -> Result<String, String> {
        if !self.running.load(Ordering::SeqCst) {
            return Err("the reconcile loop is not running (starting or stopping)".to_owned());
        }
        let beat = self.beat_ms.load(Ordering::SeqCst);
        let stale = u64::try_from(LOOP_STALE.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(beat) > stale {
            return Err(format!(
                "the daemon's loop has not turned for {}",
                HumanDuration::from_millis(now.saturating_sub(beat) / 1000 * 1000)
            ));
        }
        let read = self.read_ms.load(Ordering::SeqCst);
        let interval = self.interval_ms.load(Ordering::SeqCst);
        let error = self
            .read_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let age = now.saturating_sub(read);
        if read == 0 {
            return Err("the desired-state source was never read successfully".to_owned());
        }
        let ago = HumanDuration::from_millis(age / 1000 * 1000);
        if interval > 0 && age > interval.saturating_mul(3) {
            let mut reason = format!(
                "the desired-state source was last read successfully {ago} ago, more than three read intervals ({} each)",
                HumanDuration::from_millis(interval)
            );
            if let Some(error) = error {
                reason.push_str(&format!("; the last read failed: {error}"));
            }
            return Err(reason);
        }
        let mut ok = format!("the loop runs; the desired-state source was read {ago} ago");
        if let Some(error) = error {
            ok.push_str(&format!(" (the last read failed: {error})"));
        }
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy_at(health: &Health) -> u64 {
        health.set_running(true);
        health.source_read();
        now_ms()
    }

    #[test]
    fn healthy_while_running_and_read_within_three_intervals() {
        let health = Health::default();
        health.set_source_interval(Some(Duration::from_secs(10)));
        let now = healthy_at(&health);
        assert!(health.check(now).is_ok());
        health.source_failed("cannot read /srv/fleet: permission denied");
        let ok = health.check(now + 29_000).unwrap();
        assert!(ok.contains("permission denied"), "{ok}");
        // Past three intervals the failure makes it unhealthy, saying why.
        health.beat_ms.store(now + 31_000, Ordering::SeqCst);
        let reason = health.check(now + 31_000).unwrap_err();
        assert!(
            reason.contains("more than three read intervals"),
            "{reason}"
        );
        assert!(reason.contains("permission denied"), "{reason}");
        health.source_read();
        assert!(health.check(now_ms()).is_ok());
    }

    #[test]
    fn unhealthy_when_stopped_stuck_or_never_read() {
        let health = Health::default();
        assert!(health.check(now_ms()).unwrap_err().contains("not running"));
        health.set_running(true);
        assert!(health.check(now_ms()).unwrap_err().contains("never read"));
        let now = healthy_at(&health);
        let reason = health.check(now + 61_000).unwrap_err();
        assert!(reason.contains("has not turned"), "{reason}");
        health.set_running(false);
        assert!(health.check(now).is_err());
    }

    #[test]
    fn without_an_interval_an_old_read_is_fine() {
        let health = Health::default();
        let now = healthy_at(&health);
        health.beat_ms.store(now + 3_600_000, Ordering::SeqCst);
        assert!(health.check(now + 3_600_000).is_ok());
    }
}
