//! What every reconcile shares: the store, the drivers, the current desired
//! state snapshot, the limits for heavy work, and the timeouts.
//!
//! The snapshot is swapped whole when a valid desired state is loaded; a
//! reconcile takes an `Arc` of it at its start and works on that, so one
//! reconcile never sees half of two revisions.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

use crate::driver::git::Revision;
use crate::spec::{DesiredState, Name, ObjectKey};
use crate::store::Store;

/// A valid desired state and where it came from.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub desired: DesiredState,
    pub revision: Revision,
    /// The desired-state directory (builds run there).
    pub root: PathBuf,
}

/// Reconciles at once by default: the whole fleet, up to this bound. A
/// reconcile of a machine mostly waits on its SSH round trips, which cost
/// the controller little, so a slow or dead host holds one slot of many.
pub const DEFAULT_CONCURRENCY: usize = 256;

/// Builds at once by default: one per CPU (builds are the heavy work,
/// limited apart from reconciles).
pub fn default_builds() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

/// Timeouts and limits of the loop.
#[derive(Debug, Clone)]
pub struct Config {
    /// Reconciles running at once.
    pub concurrency: usize,
    /// Builds running at once (heavy work).
    pub builds: usize,
    pub observe_timeout: Duration,
    pub install_timeout: Duration,
    pub switch_timeout: Duration,
    /// How soon a machine waiting for its `after` dependencies looks again.
    pub dependency_poll: Duration,
    /// How long a VM has to power down (ACPI) before it is quit, then killed.
    pub vm_stop_grace: Duration,
    /// How long qemu has to answer on QMP after launch.
    pub vm_start_timeout: Duration,
    /// How often a VM is observed again.
    pub vm_resync: Duration,
    /// Complete generations kept on a target, besides the ones `current`
    /// and `confirmed` point at (never removed).
    pub keep_generations: usize,
    /// The build cache's bound, in bytes: past it, artifacts no kept
    /// generation uses go first, then the least recently used.
    pub build_cache_max: u64,
    /// How long after its VM started a Machine living inside it may take to
    /// answer over SSH (the guest boots); retried every `guest_poll`.
    pub guest_boot_timeout: Duration,
    pub guest_poll: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            concurrency: DEFAULT_CONCURRENCY,
            builds: default_builds(),
            observe_timeout: Duration::from_secs(30),
            install_timeout: Duration::from_secs(600),
            switch_timeout: Duration::from_secs(30),
            dependency_poll: Duration::from_secs(5),
            vm_stop_grace: Duration::from_secs(30),
            vm_start_timeout: Duration::from_secs(30),
            vm_resync: Duration::from_secs(60),
            keep_generations: 5,
            build_cache_max: 2 << 30,
            guest_boot_timeout: Duration::from_secs(180),
            guest_poll: Duration::from_secs(2),
        }
    }
}

/// Shared by all reconciles.
#[derive(Debug)]
pub struct Context<D> {
    pub store: Store,
    pub driver: D,
    pub config: Config,
    /// Where build artifacts are cached.
    pub build_cache: PathBuf,
    /// One directory per VM on the controller's host.
    pub vm_root: PathBuf,
    snapshot: RwLock<Arc<Snapshot>>,
    pub builds: Semaphore,
    /// Builds run under its read side; a build that saw the desired-state
    /// directory change runs again under its write side, alone, so the
    /// change is pinned on the build that made it (or on none).
    pub build_gate: tokio::sync::RwLock<()>,
    /// Where a VM's exit is reported at once (the daemon requeues it).
    pub wakeups: Option<mpsc::UnboundedSender<ObjectKey>>,
    /// VM processes already watched for exit, by key.
    pub watched: Mutex<HashMap<ObjectKey, u32>>,
    /// Held by a VM's reconcile and by operator verbs on it.
    pub vm_locks: VmLocks,
    /// Objects an operator asked to try again (`reconcile KEY --retry`):
    /// the next reconcile of each releases its held artifact, inside the
    /// reconcile, so no concurrent status write can undo the release.
    pub retries: Retries,
    /// VMs an operator asked to restart (`converge vm restart`): their next
    /// reconcile plans a restart.
    pub restarts: Retries,
    /// Where condition transitions are told (disabled unless the daemon
    /// was given `--notify` or `--notify-exec`).
    pub notifier: super::notify::Notifier,
    /// What `GET /healthz` answers from: the daemon's loop and source
    /// reads report here.
    pub health: Arc<super::health::Health>,
}

/// Keys whose held artifact their next reconcile releases.
pub type Retries = Arc<Mutex<HashSet<ObjectKey>>>;

impl<D> Context<D> {
    /// Whether an operator asked to restart VM `key` since its last
    /// reconcile; asking consumes the request.
    pub fn take_restart(&self, key: &ObjectKey) -> bool {
        self.restarts
            .lock()
            .map(|mut keys| keys.remove(key))
            .unwrap_or(false)
    }

    /// Whether an operator asked to try `key` again since its last
    /// reconcile; asking consumes the request.
    pub fn take_retry(&self, key: &ObjectKey) -> bool {
        self.retries
            .lock()
            .map(|mut keys| keys.remove(key))
            .unwrap_or(false)
    }
}

impl<D> Context<D> {
    /// `state` is the controller's state directory: builds are cached in
    /// `state/builds`, VMs live in `state/vms/NAME`.
    pub fn new(
        store: Store,
        driver: D,
        config: Config,
        state: &Path,
        snapshot: Snapshot,
    ) -> Context<D> {
        let builds = Semaphore::new(config.builds.max(1));
        Context {
            store,
            driver,
            config,
            build_cache: state.join("builds"),
            vm_root: vm_root(state),
            snapshot: RwLock::new(Arc::new(snapshot)),
            builds,
            build_gate: tokio::sync::RwLock::new(()),
            wakeups: None,
            watched: Mutex::new(HashMap::new()),
            vm_locks: VmLocks::default(),
            retries: Retries::default(),
            restarts: Retries::default(),
            notifier: super::notify::Notifier::default(),
            health: Arc::default(),
        }
    }

    /// Tells condition transitions through `notifier`.
    pub fn with_notifier(mut self, notifier: super::notify::Notifier) -> Context<D> {
        self.notifier = notifier;
        self
    }

    /// Reports VM exits to `wakeups` (the daemon); without it, exits are
    /// noticed at the next resync.
    pub fn with_wakeups(mut self, wakeups: mpsc::UnboundedSender<ObjectKey>) -> Context<D> {
        self.wakeups = Some(wakeups);
        self
    }

    /// The desired state in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(guard) => guard.clone(),
            // A panic while holding the lock cannot leave a half-written Arc.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts a new valid desired state in force.
    pub fn replace_snapshot(&self, snapshot: Snapshot) {
        let new = Arc::new(snapshot);
        match self.snapshot.write() {
            Ok(mut guard) => *guard = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}

/// One lock per VM name, shared by its reconcile and operator verbs.
#[derive(Debug, Default)]
pub struct VmLocks {
    locks: Mutex<HashMap<Name, Arc<tokio::sync::Mutex<()>>>>,
}

impl VmLocks {
    /// Waits for, then holds, the lock of VM `name`.
    pub async fn lock(&self, name: &Name) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = match self.locks.lock() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            Arc::clone(locks.entry(name.clone()).or_default())
        };
        lock.lock_owned().await
    }
}

/// The state directory's layout.
pub fn store_dir(state: &Path) -> std::path::PathBuf {
    state.join("store")
}

/// Where builds are cached under the state directory.
pub fn build_cache_dir(state: &Path) -> std::path::PathBuf {
    state.join("builds")
}

/// Where local VMs live under the state directory, one directory each.
pub fn vm_root(state: &Path) -> std::path::PathBuf {
    state.join("vms")
}
