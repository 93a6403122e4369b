//! The store: what converge remembers between runs, in sled.
//!
//! One sled database in one directory, with a tree per kind of record: the
//! spec last seen, facts, status, per-object attempt history, events, and
//! `meta` for counters. This module is the only code that touches sled, and
//! no sled type appears in its API. It stores and retrieves records; it must
//! not decide anything (which condition to set, when to retry): that is the
//! controller's job.
//!
//! Durability: plain writes (`put_*`, `append_event`, `forget`) are cheap and
//! reach the disk with sled's background flush (every 500 ms) or the next
//! explicit flush. [`Store::begin_attempt`] and [`Store::finish_attempt`]
//! flush before they return, so a crash mid-reconcile is visible on restart
//! and a finished attempt is never lost, not even to SIGKILL.
//!
//! The calls are synchronous and take microseconds, except the two that
//! flush (an fsync); async callers run those in `spawn_blocking`.

mod codec;
mod error;
mod layout;
pub mod records;
mod suspended;

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionError, Transactional};

use crate::spec::ObjectKey;
use codec::{Versioned, decode, encode};
pub use error::{DbError, StoreError};
use error::{open_error, transaction_error};
use layout::{AttemptName, RawKey};
pub use records::*;

/// Attempts kept per object; older ones are trimmed when a new one is recorded.
pub const HISTORY_PER_OBJECT: usize = 100;
/// Events kept in the store; older ones are trimmed when a new one is appended.
pub const EVENTS_KEPT: u64 = 10_000;

/// sled's page cache bound. sled's default (1 GiB) would only let an idle
/// daemon's memory grow for nothing. Not lower: with 4 MiB the SIGKILL
/// crash test once failed to reopen the store ("Read corrupted data") in CI,
/// never with 64 MiB; until that is understood, the proven value stays.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long [`Store::open`] retries a held lock before it reports
/// [`StoreError::Locked`].
const LOCK_WAIT: Duration = Duration::from_secs(1);
const LOCK_RETRY: Duration = Duration::from_millis(25);

/// Mode of the store directory and of directories inside it: owner only.
const DIR_MODE: u32 = 0o700;
/// The file in the store directory that says the store was created and its
/// layout version reached the disk: a marked store without one is damaged.
/// Stores created before it existed are marked when next opened.
const CREATED_MARK: &str = "converge-created";

/// Mode of every file in the store directory: owner only.
const FILE_MODE: u32 = 0o600;

/// A handle on the store directory. Cloning is cheap and every clone is the
/// same store; it is `Send + Sync`. The directory stays locked against other
/// processes until the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: sled::Db,
    specs: Tree,
    facts: Tree,
    status: Tree,
    history: Tree,
    events: Tree,
    meta: Tree,
    suspended: Tree,
    /// Serializes [`Store::append_event`]: the next sequence number is the
    /// last one stored plus one, and trimming must see its own append.
    event_append: Mutex<()>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// A sled tree with its name, so that every error says which tree failed.
struct Tree {
    name: &'static str,
    tree: sled::Tree,
}

impl Tree {
    fn open(db: &sled::Db, path: &Path, name: &'static str) -> Result<Tree, StoreError> {
        let tree = db.open_tree(name).map_err(|e| open_error(path, e))?;
        Ok(Tree { name, tree })
    }

    fn get<T: Versioned>(
        &self,
        key: &[u8],
        name: &dyn fmt::Display,
    ) -> Result<Option<T>, StoreError> {
        let bytes = self.tree.get(key).map_err(|e| StoreError::Read {
            tree: self.name,
            key: name.to_string(),
            source: DbError(e),
        })?;
        bytes.map(|b| decode(self.name, name, &b)).transpose()
    }

    fn put<T: Versioned>(
        &self,
        key: &[u8],
        name: &dyn fmt::Display,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = encode(self.name, name, value)?;
        self.tree
            .insert(key, bytes)
            .map_err(|e| self.write_error(name, e))?;
        Ok(())
    }

    fn remove(&self, key: &[u8], name: &dyn fmt::Display) -> Result<(), StoreError> {
        self.tree
            .remove(key)
            .map_err(|e| self.write_error(name, e))?;
        Ok(())
    }

    fn write_error(&self, name: &dyn fmt::Display, e: sled::Error) -> StoreError {
        StoreError::Write {
            tree: self.name,
            key: name.to_string(),
            source: DbError(e),
        }
    }

    fn scan_error(&self, e: sled::Error) -> StoreError {
        StoreError::Scan {
            tree: self.name,
            source: DbError(e),
        }
    }
}

/// Turns the result of decoding one record of a scan into "skip it" when the
/// value is corrupt: one damaged record must not hide every other object, and
/// the controller treats a missing record as "never seen" and reconciles
/// again. A newer format still fails the whole call: carrying on would
/// overwrite records a newer converge wrote.
fn skip_corrupt<T>(result: Result<T, StoreError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e @ StoreError::Decode { .. }) => {
            tracing::warn!(error = %e, "skipping a corrupt record in the store");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn warn_corrupt_key(tree: &'static str, key: &[u8]) {
    tracing::warn!(tree, key = %RawKey(key), "skipping a corrupt key in the store");
}

impl Store {
    /// Opens the store in `dir`, creating it if needed.
    ///
    /// The directory gets mode 0700 (a looser existing mode is tightened) and
    /// every file and directory in it 0600/0700. sled creates its files with
    /// the process umask and the crate forbids the unsafe code that changing
    /// the umask would take, so the modes are fixed after opening and again
    /// after every explicit flush; a file sled creates in between (a
    /// snapshot) keeps the umask's mode until then, but the 0700 directory
    /// already keeps other users out.
    ///
    /// Fails with [`StoreError::Locked`] while another process, or another
    /// open [`Store`] in this one, holds the directory; a lock is waited for
    /// up to one second first. Fails with [`StoreError::Damaged`] when sled
    /// cannot read the files, or when a store marked as created (the file
    /// `CREATED_MARK`, written once its layout version is on disk) comes
    /// up without its layout version: sled recovers a damaged log by
    /// dropping everything after the damage, and at the very start that is
    /// every record. converge writes nothing to a damaged store.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        set_mode(dir, DIR_MODE)?;
        let marked = dir.join(CREATED_MARK).exists();

        let config = sled::Config::new().path(dir).cache_capacity(CACHE_BYTES);
        // sled's worker threads may hold the database file for a moment
        // after the last handle of an earlier open in this process is
        // dropped (https://github.com/spacejam/sled/issues/1234), so a held
        // lock is retried briefly before it is reported.
        let deadline = Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open().map_err(|e| open_error(dir, e)) {
                Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(LOCK_RETRY);
                }
                other => break other?,
            }
        };
        let path = dir.to_owned();
        let store = Store {
            inner: Arc::new(Inner {
                specs: Tree::open(&db, &path, layout::SPECS)?,
                facts: Tree::open(&db, &path, layout::FACTS)?,
                status: Tree::open(&db, &path, layout::STATUS)?,
                history: Tree::open(&db, &path, layout::HISTORY)?,
                events: Tree::open(&db, &path, layout::EVENTS)?,
                meta: Tree::open(&db, &path, layout::META)?,
                suspended: Tree::open(&db, &path, layout::SUSPENDED)?,
                db,
                path,
                event_append: Mutex::new(()),
            }),
        };
        store.check_layout(marked)?;
        if !marked {
            let mark = dir.join(CREATED_MARK);
            fs::write(&mark, b"").map_err(|source| StoreError::Mark { path: mark, source })?;
        }
        restrict_tree(&store.inner.path)?;
        Ok(store)
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Refuses a store whose key layout is newer than this build's, and one
    /// `marked` as created that lost its layout version (damaged); gives a
    /// new store the current layout version, on disk before it is marked,
    /// so that a store killed while it was created is never taken for a
    /// damaged one.
    fn check_layout(&self, marked: bool) -> Result<(), StoreError> {
        let meta = &self.inner.meta;
        let name = RawKey(layout::LAYOUT);
        match meta.get::<u64>(layout::LAYOUT, &name)? {
            Some(version) if version > layout::LAYOUT_VERSION => {
                Err(StoreError::UnsupportedFormat {
                    tree: meta.name,
                    key: name.to_string(),
                    version: u32::try_from(version).unwrap_or(u32::MAX),
                    supported: u32::try_from(layout::LAYOUT_VERSION).unwrap_or(u32::MAX),
                })
            }
            Some(_) => Ok(()),
            None if marked => Err(StoreError::Damaged {
                path: self.inner.path.clone(),
                cause: "sled recovered none of its records, not even the layout version \
                        every store holds from its creation"
                    .to_owned(),
            }),
            None => {
                meta.put(layout::LAYOUT, &name, &layout::LAYOUT_VERSION)?;
                self.inner.db.flush().map_err(|e| StoreError::Flush {
                    path: self.inner.path.clone(),
                    source: DbError(e),
                })?;
                Ok(())
            }
        }
    }

    /// Writes everything written so far to disk (fsync) and re-applies the
    /// owner-only modes to files sled created since.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush().map_err(|e| StoreError::Flush {
            path: self.inner.path.clone(),
            source: DbError(e),
        })?;
        restrict_tree(&self.inner.path)
    }

    /// The spec last seen for `key`.
    pub fn spec(&self, key: &ObjectKey) -> Result<Option<SpecRecord>, StoreError> {
        self.inner.specs.get(&layout::object(key), key)
    }

    /// Records the spec seen for `key`. Not flushed.
    pub fn put_spec(&self, key: &ObjectKey, spec: &SpecRecord) -> Result<(), StoreError> {
        self.inner.specs.put(&layout::object(key), key, spec)
    }

    /// The facts last observed for `key`.
    pub fn facts(&self, key: &ObjectKey) -> Result<Option<FactsRecord>, StoreError> {
        self.inner.facts.get(&layout::object(key), key)
    }

    /// Records facts observed for `key`. Not flushed: facts are observed
    /// again after a crash.
    pub fn put_facts(&self, key: &ObjectKey, facts: &FactsRecord) -> Result<(), StoreError> {
        self.inner.facts.put(&layout::object(key), key, facts)
    }

    /// The status of `key`.
    pub fn status(&self, key: &ObjectKey) -> Result<Option<StatusRecord>, StoreError> {
        self.inner.status.get(&layout::object(key), key)
    }

    /// Records the status of `key`. Not flushed. `in_progress` is written as
    /// given: only [`Store::begin_attempt`] and [`Store::finish_attempt`]
    /// should change it.
    pub fn put_status(&self, key: &ObjectKey, status: &StatusRecord) -> Result<(), StoreError> {
        self.inner.status.put(&layout::object(key), key, status)
    }

    /// Every status in the store, in key order. Corrupt keys and values are
    /// skipped with a warning.
    pub fn statuses(&self) -> Result<Vec<(ObjectKey, StatusRecord)>, StoreError> {
        let tree = &self.inner.status;
        let mut out = Vec::new();
        for entry in tree.tree.iter() {
            let (k, v) = entry.map_err(|e| tree.scan_error(e))?;
            let Some(key) = layout::parse_object(&k) else {
                warn_corrupt_key(tree.name, &k);
                continue;
            };
            if let Some(status) = skip_corrupt(decode(tree.name, &key, &v))? {
                out.push((key, status));
            }
        }
        Ok(out)
    }

    /// Starts an attempt on `key`: allocates its id, records it as
    /// `in_progress` in the status (creating a default status if there is
    /// none) together with `last_attempt_id`, and flushes before returning.
    /// Ids increase across the store's life, also across restarts and
    /// crashes.
    pub fn begin_attempt(
        &self,
        key: &ObjectKey,
        spec_hash: &str,
        revision: Option<&str>,
    ) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let status_key = layout::object(key);
        let started_ms = now_ms();
        let id_name = RawKey(layout::NEXT_ATTEMPT_ID);
        let result = (&inner.status.tree, &inner.meta.tree).transaction(|(status, meta)| {
            let abort = ConflictableTransactionError::Abort;
            let id = match meta.get(layout::NEXT_ATTEMPT_ID)? {
                Some(bytes) => decode::<u64>(inner.meta.name, &id_name, &bytes).map_err(abort)?,
                None => 1,
            };
            let next = encode(inner.meta.name, &id_name, &(id + 1)).map_err(abort)?;
            meta.insert(layout::NEXT_ATTEMPT_ID, next)?;
            let mut record = match status.get(&status_key)? {
                Some(bytes) => {
                    decode::<StatusRecord>(inner.status.name, key, &bytes).map_err(abort)?
                }
                None => StatusRecord::default(),
            };
            record.in_progress = Some(InProgress {
                attempt_id: id,
                started_ms,
                spec_hash: spec_hash.to_owned(),
                revision: revision.map(str::to_owned),
                steps: Vec::new(),
                pending: Vec::new(),
            });
            record.last_attempt_id = Some(id);
            let bytes = encode(inner.status.name, key, &record).map_err(abort)?;
            status.insert(status_key.as_slice(), bytes)?;
            Ok(id)
        });
        let id = result.map_err(|e| transaction_error("status,meta", key, e))?;
        self.flush()?;
        Ok(id)
    }

    /// Records one step of the attempt `attempt_id` on `key` that just
    /// ended, in the status's `in_progress`, and flushes before returning:
    /// an attempt a crash cuts short keeps the steps it finished. Does
    /// nothing when that attempt is no longer in progress.
    pub fn record_step(
        &self,
        key: &ObjectKey,
        attempt_id: u64,
        step: &StepRecord,
    ) -> Result<(), StoreError> {
        self.update_in_progress(key, attempt_id, |in_progress| {
            in_progress.pending.retain(|p| p.name != step.name);
            in_progress.steps.push(step.clone());
        })
    }

    /// Records steps of attempt `attempt_id` that were sent to the target
    /// and have not answered yet (replacing the ones recorded before); each
    /// leaves the list when it is recorded as ended. Flushed, like a step.
    pub fn record_pending(
        &self,
        key: &ObjectKey,
        attempt_id: u64,
        steps: &[StepRecord],
    ) -> Result<(), StoreError> {
        self.update_in_progress(key, attempt_id, |in_progress| {
            in_progress.pending = steps.to_vec();
        })
    }

    /// Changes the in-progress record of attempt `attempt_id` of `key` in
    /// one transaction, then flushes; nothing when that attempt is no
    /// longer in progress.
    fn update_in_progress(
        &self,
        key: &ObjectKey,
        attempt_id: u64,
        change: impl Fn(&mut InProgress),
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let status_key = layout::object(key);
        let result = inner.status.tree.transaction(|status| {
            let abort = ConflictableTransactionError::Abort;
            let Some(bytes) = status.get(&status_key)? else {
                return Ok(());
            };
            let mut record =
                decode::<StatusRecord>(inner.status.name, key, &bytes).map_err(abort)?;
            match &mut record.in_progress {
                Some(in_progress) if in_progress.attempt_id == attempt_id => {
                    change(in_progress);
                }
                _ => return Ok(()),
            }
            let bytes = encode(inner.status.name, key, &record).map_err(abort)?;
            status.insert(status_key.as_slice(), bytes)?;
            Ok(())
        });
        result.map_err(|e| transaction_error("status", key, e))?;
        self.flush()
    }

    /// Records a finished attempt: writes `attempt` to the history and
    /// `status` (with `in_progress` cleared and `last_attempt_id` set to
    /// `attempt.id`) in one transaction, trims the object's history to the
    /// newest [`HISTORY_PER_OBJECT`], and flushes before returning. Call it
    /// for the attempt [`Store::begin_attempt`] started last on the key, or
    /// for the one [`Store::interrupted`] found.
    pub fn finish_attempt(
        &self,
        attempt: &AttemptRecord,
        status: &StatusRecord,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let key = &attempt.key;
        let history_key = layout::history(key, attempt.id);
        let attempt_name = AttemptName(key, attempt.id);
        let attempt_bytes = sled::IVec::from(encode(inner.history.name, &attempt_name, attempt)?);
        let mut status = status.clone();
        status.in_progress = None;
        status.last_attempt_id = Some(attempt.id);
        let status_key = layout::object(key);
        let status_bytes = sled::IVec::from(encode(inner.status.name, key, &status)?);
        let result = (&inner.history.tree, &inner.status.tree).transaction(|(history, status)| {
            history.insert(history_key.as_slice(), attempt_bytes.clone())?;
            status.insert(status_key.as_slice(), status_bytes.clone())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        });
        result.map_err(|e| transaction_error("history,status", key, e))?;
        self.trim_history(key)?;
        self.flush()
    }

    /// Removes all but the newest [`HISTORY_PER_OBJECT`] attempts of `key`.
    fn trim_history(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let tree = &self.inner.history;
        let keys = tree
            .tree
            .scan_prefix(layout::history_prefix(key))
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tree.scan_error(e))?;
        let excess = keys.len().saturating_sub(HISTORY_PER_OBJECT);
        for k in &keys[..excess] {
            tree.remove(k, &RawKey(k))?;
        }
        Ok(())
    }

    /// The newest `limit` attempts of `key`, newest first. Corrupt records
    /// are skipped with a warning.
    pub fn history(&self, key: &ObjectKey, limit: usize) -> Result<Vec<AttemptRecord>, StoreError> {
        let tree = &self.inner.history;
        let mut out = Vec::new();
        for entry in tree.tree.scan_prefix(layout::history_prefix(key)).rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(|e| tree.scan_error(e))?;
            let Some((_, id)) = layout::parse_history(&k) else {
                warn_corrupt_key(tree.name, &k);
                continue;
            };
            if let Some(attempt) = skip_corrupt(decode(tree.name, &AttemptName(key, id), &v))? {
                out.push(attempt);
            }
        }
        Ok(out)
    }

    /// One attempt of `key`, if it is still in the history.
    pub fn attempt(&self, key: &ObjectKey, id: u64) -> Result<Option<AttemptRecord>, StoreError> {
        self.inner
            .history
            .get(&layout::history(key, id), &AttemptName(key, id))
    }

    /// Keys whose status has `in_progress` set: left mid-reconcile by a
    /// process that died. Meaningful right after [`Store::open`], before this
    /// process begins attempts of its own.
    pub fn interrupted(&self) -> Result<Vec<ObjectKey>, StoreError> {
        Ok(self
            .statuses()?
            .into_iter()
            .filter(|(_, status)| status.in_progress.is_some())
            .map(|(key, _)| key)
            .collect())
    }

    /// Appends an event and returns its sequence number, one more than the
    /// newest stored. Keeps the newest [`EVENTS_KEPT`] events. Not flushed.
    pub fn append_event(
        &self,
        key: impl Into<EventSubject>,
        severity: Severity,
        reason: Reason,
        message: &str,
    ) -> Result<u64, StoreError> {
        let tree = &self.inner.events;
        // A panic while holding the lock leaves nothing half-done that the
        // lock protects (the tree is consistent on its own), so poisoning is
        // ignored.
        let _guard = self
            .inner
            .event_append
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = tree.tree.last().map_err(|e| tree.scan_error(e))?;
        let seq = match last {
            Some((k, _)) => match layout::parse_event(&k) {
                Some(seq) => seq.saturating_add(1),
                None => {
                    warn_corrupt_key(tree.name, &k);
                    // Corrupt keys have another length than 8 and cannot be
                    // told from the newest; start after every valid one.
                    self.newest_event_seq()?.saturating_add(1)
                }
            },
            None => 1,
        };
        let event = EventRecord {
            seq,
            time_ms: now_ms(),
            key: key.into(),
            severity,
            reason,
            message: message.to_owned(),
        };
        tree.put(&layout::event(seq), &seq, &event)?;
        if let Some(oldest_kept) = seq.checked_sub(EVENTS_KEPT - 1).filter(|&s| s > 1) {
            let old = tree
                .tree
                .range(..layout::event(oldest_kept))
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tree.scan_error(e))?;
            for k in &old {
                tree.remove(k, &RawKey(k))?;
            }
        }
        Ok(seq)
    }

    /// The highest valid event sequence number, 0 if there is none.
    fn newest_event_seq(&self) -> Result<u64, StoreError> {
        let tree = &self.inner.events;
        for entry in tree.tree.iter().keys().rev() {
            let k = entry.map_err(|e| tree.scan_error(e))?;
            if let Some(seq) = layout::parse_event(&k) {
                return Ok(seq);
            }
        }
        Ok(0)
    }

    /// The newest `limit` events, newest first.
    pub fn events(&self, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.scan_events(limit, |_| true)
    }

    /// The newest `limit` events whose sequence number is above `after`
    /// (about `key`, when given), newest first: what a follower that saw
    /// `after` has not seen yet.
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
        key: Option<&EventSubject>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.scan_events_until(limit, after, |e| key.is_none_or(|k| &e.key == k))
    }

    /// The newest `limit` events about `key`, newest first.
    pub fn events_for(
        &self,
        key: &ObjectKey,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.scan_events(limit, |e| e.key == *key)
    }

    /// The Git source's record (`run --git`), if one was ever written.
    pub fn source(&self) -> Result<Option<SourceRecord>, StoreError> {
        self.inner.meta.get(layout::SOURCE, &RawKey(layout::SOURCE))
    }

    /// Records the Git source's state and flushes before returning: the
    /// applied commit is the base the next start fast-forwards from.
    pub fn put_source(&self, record: &SourceRecord) -> Result<(), StoreError> {
        self.inner
            .meta
            .put(layout::SOURCE, &RawKey(layout::SOURCE), record)?;
        self.flush()
    }

    fn scan_events(
        &self,
        limit: usize,
        keep: impl Fn(&EventRecord) -> bool,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.scan_events_until(limit, 0, keep)
    }

    /// Newest first, stopping at the first valid sequence number at or
    /// below `until`.
    fn scan_events_until(
        &self,
        limit: usize,
        until: u64,
        keep: impl Fn(&EventRecord) -> bool,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let tree = &self.inner.events;
        let mut out = Vec::new();
        for entry in tree.tree.iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(|e| tree.scan_error(e))?;
            let Some(seq) = layout::parse_event(&k) else {
                warn_corrupt_key(tree.name, &k);
                continue;
            };
            if seq <= until {
                break;
            }
            if let Some(event) = skip_corrupt(decode(tree.name, &seq, &v))? {
                if keep(&event) {
                    out.push(event);
                }
            }
        }
        Ok(out)
    }

    /// Removes the spec, facts, status, suspension and history of `key`, for an object
    /// that left the desired state. Its events stay. Not flushed.
    pub fn forget(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let inner = &self.inner;
        let k = layout::object(key);
        inner.specs.remove(&k, key)?;
        inner.facts.remove(&k, key)?;
        inner.status.remove(&k, key)?;
        inner.suspended.remove(&k, key)?;
        let history = &inner.history;
        let keys = history
            .tree
            .scan_prefix(layout::history_prefix(key))
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| history.scan_error(e))?;
        for k in &keys {
            history.remove(k, &RawKey(k))?;
        }
        Ok(())
    }

    /// Every key with a status or a spec in the store, sorted. Corrupt keys
    /// are skipped with a warning.
    pub fn keys(&self) -> Result<Vec<ObjectKey>, StoreError> {
        let mut keys = BTreeSet::new();
        for tree in [&self.inner.status, &self.inner.specs] {
            for entry in tree.tree.iter().keys() {
                let k = entry.map_err(|e| tree.scan_error(e))?;
                match layout::parse_object(&k) {
                    Some(key) => {
                        keys.insert(key);
                    }
                    None => warn_corrupt_key(tree.name, &k),
                }
            }
        }
        Ok(keys.into_iter().collect())
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        StoreError::Permissions {
            path: path.to_owned(),
            source,
        }
    })
}

/// Gives every file under `dir` mode 0600 and every directory 0700, `dir`
/// included. Symlinks are left alone (sled makes none). A file that vanishes
/// meanwhile (sled removes old snapshots in the background) is skipped.
fn restrict_tree(dir: &Path) -> Result<(), StoreError> {
    let permissions_err = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Permissions { path, source }
    };
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        set_mode_if_needed(&dir, DIR_MODE)?;
        let entries = fs::read_dir(&dir).map_err(permissions_err(&dir))?;
        for entry in entries {
            let entry = entry.map_err(permissions_err(&dir))?;
            let file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(permissions_err(&entry.path())(e)),
            };
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                set_mode_if_needed(&entry.path(), FILE_MODE)?;
            }
        }
    }
    Ok(())
}

fn set_mode_if_needed(path: &Path, mode: u32) -> Result<(), StoreError> {
    let current = match fs::symlink_metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Permissions {
                path: path.to_owned(),
                source,
            });
        }
    };
    if current == mode {
        return Ok(());
    }
    match fs::set_permissions(path, fs::Permissions::from_mode(mode)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Permissions {
            path: path.to_owned(),
            source,
        }),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
