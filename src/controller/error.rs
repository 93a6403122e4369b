//! Why a reconcile did not converge its object: [`ReconcileError`], one
//! variant per way it can fail, each saying by [`ReconcileError::is_transient`]
//! whether retrying the same spec can help and by [`ReconcileError::reason`]
//! which condition reason it sets. Nothing here matches on strings.

use super::placement::Unresolved;
use crate::driver::capability::DriverError;
use crate::spec::Name;
use crate::store::StoreError;
use crate::store::records::Reason;
use crate::telemetry::error_chain;

/// Why a reconcile failed. Messages are sentences for the status and logs;
/// a variant holding a `source` shows it through [`error_chain`].
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A step's driver call failed; whether a retry can help is the driver
    /// error's own answer.
    #[error("{what}")]
    Driver {
        reason: Reason,
        /// What was being done, like "build" or "install generation 3-ab12".
        what: String,
        #[source]
        source: Box<DriverError>,
    },
    /// The activation ran and exited with a failure code.
    #[error("activate {mode} of generation {generation} exited with code {code}")]
    ActivationExit {
        generation: String,
        mode: String,
        code: i32,
    },
    /// A health check failed, timed out, or could not reach the target.
    #[error("health check `{command}` failed")]
    HealthCheck {
        command: String,
        #[source]
        source: Box<DriverError>,
    },
    /// The target's watchdog rolled back before converge confirmed.
    #[error(
        "generation {generation} was not confirmed within confirmTimeout; the machine rolled itself back ({rollback})"
    )]
    NotConfirmed {
        generation: String,
        rollback: String,
    },
    /// The target could not be reached over a new connection after
    /// activating; its watchdog rolls it back.
    #[error(
        "could not reach the machine over a new connection after activating generation {generation}; it rolls itself back after confirmTimeout"
    )]
    ConfirmUnreachable {
        generation: String,
        #[source]
        source: Box<DriverError>,
    },
    /// A step failed and the previous generation was re-activated (by
    /// converge, or by the target's watchdog). The generation rolled back
    /// from is held: not activated again until its inputs change or an
    /// operator asks.
    #[error("{}; {outcome}", cause.message())]
    RolledBack {
        cause: Box<ReconcileError>,
        /// What the rollback did: "rolled back to generation 2-ab", or how
        /// it failed too.
        outcome: String,
        /// The generation number rolled back to, when known.
        to: Option<u64>,
    },
    /// The object's artifact is held (rolled back from, or its build wrote
    /// into the desired-state directory) and its inputs are unchanged.
    #[error("{message}; it is held until its inputs change or `converge reconcile {key} --retry`")]
    Held {
        key: String,
        reason: Reason,
        message: String,
    },
    /// The build changed files in the desired-state directory: it would
    /// rebuild itself forever.
    #[error(
        "the build changed files in the desired-state directory: {}; builds must write only to $CONVERGE_OUT",
        files.join(", ")
    )]
    BuildChangedDirectory { files: Vec<String> },
    /// A step failed and nothing was rolled back (`rollback: never`, no
    /// earlier generation, or the target could not be reached to do it).
    #[error("{}; {why}", cause.message())]
    NotRolledBack {
        cause: Box<ReconcileError>,
        why: String,
    },
    #[error("failed to read or write the store")]
    Store(#[source] Box<StoreError>),
    #[error("the machine has no resolved roles document")]
    RolesMissing,
    #[error(
        "it lives in vm/{vm}, whose spec says `state: stopped`; set it running to deploy this machine"
    )]
    HostVmStopped { vm: Name },
    /// A machine living in a VM whose guest did not answer in time.
    #[error("it lives in vm/{vm}; its guest did not answer within {within:?} of starting")]
    GuestUnreachable {
        vm: Name,
        within: std::time::Duration,
        #[source]
        source: Box<DriverError>,
    },
    /// A VM whose `host` changed while it exists where it ran.
    #[error(
        "its QEMU or disks are on {was}, and its spec now says {now}: converge does not move VMs; set `host` back, or remove the VM from the YAML (its onDelete applies there) and declare it again"
    )]
    HostChanged { was: String, now: String },
    #[error(
        "hypervisor machine {name} is neither declared nor ever converged, so there is no target to reach it at; declare it again"
    )]
    HypervisorUnknown { name: Name },
    #[error("{what} is not supported by this converge yet")]
    Unsupported { what: String },
}

impl ReconcileError {
    /// Whether trying again later can succeed without a spec change.
    pub fn is_transient(&self) -> bool {
        match self {
            ReconcileError::Driver { source, .. } => source.is_transient(),
            ReconcileError::ActivationExit { .. }
            | ReconcileError::HealthCheck { .. }
            | ReconcileError::NotConfirmed { .. }
            | ReconcileError::ConfirmUnreachable { .. }
            | ReconcileError::Store(_)
            | ReconcileError::GuestUnreachable { .. } => true,
            ReconcileError::NotRolledBack { cause, .. } => cause.is_transient(),
            ReconcileError::RolledBack { .. }
            | ReconcileError::Held { .. }
            | ReconcileError::BuildChangedDirectory { .. }
            | ReconcileError::RolesMissing
            | ReconcileError::HostVmStopped { .. }
            | ReconcileError::HostChanged { .. }
            | ReconcileError::HypervisorUnknown { .. }
            | ReconcileError::Unsupported { .. } => false,
        }
    }

    /// The condition reason this failure sets.
    pub fn reason(&self) -> Reason {
        match self {
            ReconcileError::Driver { reason, .. } => *reason,
            ReconcileError::ActivationExit { .. } => Reason::ActivationFailed,
            ReconcileError::HealthCheck { source, .. } if source.is_health_failure() => {
                Reason::HealthCheckFailed
            }
            ReconcileError::HealthCheck { .. }
            | ReconcileError::ConfirmUnreachable { .. }
            | ReconcileError::GuestUnreachable { .. } => Reason::Unreachable,
            ReconcileError::NotConfirmed { .. } => Reason::NotConfirmed,
            ReconcileError::RolledBack { .. } => Reason::RolledBack,
            ReconcileError::Held { reason, .. } => *reason,
            ReconcileError::BuildChangedDirectory { .. } => Reason::BuildChangedDirectory,
            ReconcileError::NotRolledBack { cause, .. } => cause.reason(),
            ReconcileError::Store(_) => Reason::StoreFailed,
            ReconcileError::RolesMissing => Reason::RolesMissing,
            ReconcileError::HostVmStopped { .. } => Reason::HostVmStopped,
            ReconcileError::HostChanged { .. } => Reason::HostChanged,
            ReconcileError::HypervisorUnknown { .. } => Reason::HypervisorUnknown,
            ReconcileError::Unsupported { .. } => Reason::Unsupported,
        }
    }

    /// The reason of what failed first: for a rollback, what made it roll back.
    pub fn cause_reason(&self) -> Reason {
        match self {
            ReconcileError::RolledBack { cause, .. }
            | ReconcileError::NotRolledBack { cause, .. } => cause.cause_reason(),
            other => other.reason(),
        }
    }

    /// The whole message: this error and its sources.
    pub fn message(&self) -> String {
        error_chain(self)
    }
}

impl From<StoreError> for ReconcileError {
    fn from(e: StoreError) -> ReconcileError {
        ReconcileError::Store(Box::new(e))
    }
}

impl From<Unresolved> for ReconcileError {
    fn from(e: Unresolved) -> ReconcileError {
        match e {
            Unresolved::Store(e) => ReconcileError::Store(Box::new(e)),
            Unresolved::Unknown { name } => ReconcileError::HypervisorUnknown { name },
        }
    }
}

impl crate::controller::applier::ReconcileError for ReconcileError {
    fn is_transient(&self) -> bool {
        ReconcileError::is_transient(self)
    }
}
