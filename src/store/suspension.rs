//! Suspended objects: an operator's `converge suspend KEY` (or `vm stop`)
//! kept in a tree of its own, so that no reconcile writing the object's
//! status can drop it. A suspended object is still observed (drift is
//! reported) but never changed, until `converge resume KEY`.
//!
//! This file must not decide what a suspension means to a reconcile.

use serde::{Deserialize, Serialize};

use super::codec::Versioned;
use super::layout;
use super::{Store, StoreError};
use crate::spec::ObjectKey;

/// Why and since when an object is suspended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suspension {
    pub since_ms: u64,
    /// The verb that suspended it: `suspend`, `vm stop`, `vm delete`.
    pub by: String,
}

impl Suspension {
    pub const FORMAT: u32 = 1;
}

impl Versioned for Suspension {
    const FORMAT: u32 = Suspension::FORMAT;
}

impl Store {
    /// Suspends `key`; `false` when it already was (the first suspension is
    /// kept). Flushed.
    pub fn suspend(&self, key: &ObjectKey, by: &str) -> Result<bool, StoreError> {
        if self.suspension(key)?.is_some() {
            return Ok(false);
        }
        let record = Suspension {
            since_ms: super::records::now_ms(),
            by: by.to_owned(),
        };
        self.inner
            .suspended
            .put(&layout::object(key), key, &record)?;
        self.flush()?;
        Ok(true)
    }

    /// Resumes `key`; `false` when it was not suspended. Flushed.
    pub fn resume(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        if self.suspension(key)?.is_none() {
            return Ok(false);
        }
        self.inner.suspended.remove(&layout::object(key), key)?;
        self.flush()?;
        Ok(true)
    }

    /// The suspension of `key`, if it is suspended.
    pub fn suspension(&self, key: &ObjectKey) -> Result<Option<Suspension>, StoreError> {
        self.inner.suspended.get(&layout::object(key), key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Name;

    #[test]
    fn a_suspension_is_kept_across_opens_until_resumed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ObjectKey::machine(Name::new("web").expect("name"));
        {
            let store = Store::open(dir.path()).expect("open");
            assert_eq!(store.suspension(&key).expect("read"), None);
            assert!(store.suspend(&key, "suspend").expect("suspend"));
            assert!(!store.suspend(&key, "vm stop").expect("again"), "kept");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let s = store.suspension(&key).expect("read").expect("suspended");
        assert_eq!(s.by, "suspend", "the first suspension is kept");
        assert!(store.resume(&key).expect("resume"));
        assert!(!store.resume(&key).expect("again"));
        assert_eq!(store.suspension(&key).expect("read"), None);
    }

    #[test]
    fn forgetting_an_object_ends_its_suspension() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let key = ObjectKey::machine(Name::new("web").expect("name"));
        store.suspend(&key, "suspend").expect("suspend");
        store.forget(&key).expect("forget");
        assert_eq!(store.suspension(&key).expect("read"), None);
    }
}
