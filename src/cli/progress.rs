//! The progress display of `reconcile --once` on a terminal: a line per
//! object while it runs (its elapsed time, the steps it finished, the steps
//! sent to the target and not answered yet), a line when it ends, and a
//! total. Off when stderr is not a terminal (plain log lines then) or the
//! output is JSON.
//!
//! It reads the store from a thread of its own every [`POLL`]: each attempt
//! records its steps as they end ([`crate::store::records::InProgress`]), so
//! the display shows what the store says and nothing the controller does not
//! record. Log lines are written through it (`telemetry::set_suspender`), so
//! they never tear it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::spec::ObjectKey;
use crate::store::Store;
use crate::store::records::{ConditionKind, InProgress, StepStatus, now_ms};

/// How often the store is read.
const POLL: Duration = Duration::from_millis(150);

/// A running display; [`Progress::finish`] ends it.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    multi: MultiProgress,
}

/// What the display knows of one object.
enum Seen {
    /// No attempt of this run seen yet.
    Waiting,
    Running(ProgressBar),
    Done,
}

impl Progress {
    /// Starts the display over `keys`, when stderr is a terminal.
    pub fn start(store: Store, keys: Vec<ObjectKey>) -> Option<Progress> {
        let target = ProgressDrawTarget::stderr();
        if target.is_hidden() {
            return None;
        }
        let multi = MultiProgress::with_draw_target(target);
        let total = multi.add(ProgressBar::new(keys.len() as u64));
        total.set_style(
            ProgressStyle::with_template("{spinner} {pos}/{len} objects ended, {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let suspending = multi.clone();
        crate::telemetry::set_suspender(Some(Arc::new(move |write: &mut dyn FnMut()| {
            suspending.suspend(&mut *write);
        })));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let multi = multi.clone();
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || watch(&store, &keys, &multi, &total, &stop))
                .ok()
        };
        Some(Progress {
            stop,
            thread,
            multi,
        })
    }

    /// Ends the display: the lines of objects still shown are finished and
    /// the drawing is cleared, so the summary follows on a clean terminal.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        crate::telemetry::set_suspender(None);
        let _ = self.multi.clear();
    }
}

fn watch(
    store: &Store,
    keys: &[ObjectKey],
    multi: &MultiProgress,
    total: &ProgressBar,
    stop: &AtomicBool,
) {
    // Attempts recorded before this run are not this run's.
    let before: HashMap<&ObjectKey, Option<u64>> = keys
        .iter()
        .map(|k| {
            let last = store
                .status(k)
                .ok()
                .flatten()
                .and_then(|s| s.last_attempt_id);
            (k, last)
        })
        .collect();
    let mut seen: HashMap<&ObjectKey, Seen> = keys.iter().map(|k| (k, Seen::Waiting)).collect();
    let width = keys.iter().map(|k| k.to_string().len()).max().unwrap_or(0);
    let style = ProgressStyle::with_template("  {spinner} {prefix} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut running = 0;
        for key in keys {
            let Ok(Some(status)) = store.status(key) else {
                continue;
            };
            let entry = seen.entry(key).or_insert(Seen::Waiting);
            match (&status.in_progress, &*entry) {
                (Some(attempt), Seen::Waiting) => {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(style.clone());
                    bar.set_prefix(format!("{:width$}", key.to_string()));
                    bar.set_message(running_line(attempt));
                    *entry = Seen::Running(bar);
                    running += 1;
                }
                (Some(attempt), Seen::Running(bar)) => {
                    bar.set_message(running_line(attempt));
                    bar.tick();
                    running += 1;
                }
                (None, Seen::Running(bar)) => {
                    bar.finish_and_clear();
                    multi.remove(bar);
                    let _ = multi.println(ended_line(key, width, &status));
                    total.inc(1);
                    *entry = Seen::Done;
                }
                (None, Seen::Waiting) if status.last_attempt_id != before[key] => {
                    let _ = multi.println(ended_line(key, width, &status));
                    total.inc(1);
                    *entry = Seen::Done;
                }
                _ => {}
            }
        }
        total.set_message(format!("{running} running"));
        total.tick();
        if stopping {
            break;
        }
        std::thread::sleep(POLL);
    }
    for entry in seen.into_values() {
        if let Seen::Running(bar) = entry {
            bar.finish_and_clear();
        }
    }
    total.finish_and_clear();
}

/// `4.2s  build ✓ install ✓ → switch activate`.
fn running_line(attempt: &InProgress) -> String {
    let elapsed = now_ms().saturating_sub(attempt.started_ms);
    let mut line = format!("{:>5.1}s ", elapsed as f64 / 1000.0);
    for step in &attempt.steps {
        let mark = match step.status {
            StepStatus::Failed => "✗",
            StepStatus::Skipped => "-",
            _ => "✓",
        };
        line.push_str(&format!(" {}{mark}", step.name));
    }
    if attempt.pending.is_empty() {
        line.push_str(" …");
    } else {
        line.push_str(" →");
        for step in &attempt.pending {
            line.push(' ');
            line.push_str(&step.name);
        }
    }
    line
}

/// `✓ machine/web  Converged: generation 3-ab12 is current`.
fn ended_line(key: &ObjectKey, width: usize, status: &crate::store::StatusRecord) -> String {
    let ready = status.condition(ConditionKind::Ready);
    let mark = if status.is_ready() { "✓" } else { "✗" };
    let (reason, message) = ready.map_or(("", ""), |c| (c.reason.as_str(), c.message.as_str()));
    let message: String = message.chars().take(100).collect();
    format!("  {mark} {:width$} {reason}: {message}", key.to_string())
}
