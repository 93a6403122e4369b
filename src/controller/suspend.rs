//! `converge suspend KEY` and `converge resume KEY`: an object suspended is
//! still observed (drift is reported) but never changed; the reconciles of
//! machines and VMs check [`crate::store::Store::suspension`] between plan
//! and execution. Done by the daemon when one runs, by the CLI otherwise.
//! Each suspension and resumption is an event.

use crate::spec::ObjectKey;
use crate::store::records::{Reason, Severity};
use crate::store::{Store, StoreError};

/// Why a suspension or resumption was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    #[error(
        "{key}: converge has no record of it in this state directory; check the key (`converge status` lists the objects converge knows)"
    )]
    Unknown { key: ObjectKey },
    #[error(
        "{key}: only machines and VMs can be suspended (a service changes nothing itself); suspend its machines"
    )]
    NotSuspendable { key: ObjectKey },
    #[error("{key}: the store")]
    Store {
        key: ObjectKey,
        #[source]
        source: StoreError,
    },
}

/// Suspends `key` (by the verb `by`) and records the event; the message
/// says what happened.
pub fn suspend(store: &Store, key: &ObjectKey, by: &str) -> Result<String, SuspendError> {
    check(store, key)?;
    let store_error = |source| SuspendError::Store {
        key: key.clone(),
        source,
    };
    if !store.suspend(key, by).map_err(store_error)? {
        return Ok(format!("{key} was already suspended"));
    }
    let message = format!(
        "{key} suspended: it is observed, drift is reported, nothing is changed until `converge resume {key}`"
    );
    event(store, key, &message);
    Ok(message)
}

/// Resumes `key` and records the event.
pub fn resume(store: &Store, key: &ObjectKey) -> Result<String, SuspendError> {
    check(store, key)?;
    let resumed = store.resume(key).map_err(|source| SuspendError::Store {
        key: key.clone(),
        source,
    })?;
    if !resumed {
        return Ok(format!("{key} was not suspended"));
    }
    let message = format!("{key} resumed: it converges to its spec again");
    event(store, key, &message);
    Ok(message)
}

fn check(store: &Store, key: &ObjectKey) -> Result<(), SuspendError> {
    if key.kind == crate::spec::Kind::Service {
        return Err(SuspendError::NotSuspendable { key: key.clone() });
    }
    let store_error = |source| SuspendError::Store {
        key: key.clone(),
        source,
    };
    let known = store.status(key).map_err(store_error)?.is_some()
        || store.spec(key).map_err(store_error)?.is_some();
    if known {
        Ok(())
    } else {
        Err(SuspendError::Unknown { key: key.clone() })
    }
}

fn event(store: &Store, key: &ObjectKey, message: &str) {
    tracing::info!(object = %key, "{message}");
    if let Err(error) = store.append_event(key, Severity::Info, Reason::Suspension, message) {
        tracing::warn!(object = %key, %error, "recording the event failed");
    }
    if let Err(error) = store.flush() {
        tracing::warn!(object = %key, %error, "flushing the store failed");
    }
}
