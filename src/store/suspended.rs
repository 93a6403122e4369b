//! Suspensions (`converge suspend`, `vm stop`, `vm delete`), in their own
//! tree so that no reconcile writing an object's status can drop one. What
//! a suspension means to a reconcile is decided by the controller.

impl super::Store {
    /// Suspends `key` (by the verb `by`); `false` when it already was (the
    /// first suspension is kept). Flushed.
    pub fn suspend(
        &self,
        key: &crate::spec::ObjectKey,
        by: &str,
    ) -> Result<bool, super::StoreError> {
        if self.suspension(key)?.is_some() {
            return Ok(false);
        }
        let by = by.to_owned();
        let record = super::records::Suspension {
            since_ms: super::records::now_ms(),
            by,
        };
        self.inner
            .suspended
            .put(&super::layout::object(key), key, &record)?;
        self.flush()?;
        Ok(true)
    }

    /// Resumes `key`; `false` when it was not suspended. Flushed.
    pub fn resume(&self, key: &crate::spec::ObjectKey) -> Result<bool, super::StoreError> {
        let was = self.suspension(key)?.is_some();
        self.inner
            .suspended
            .remove(&super::layout::object(key), key)?;
        self.flush()?;
        Ok(was)
    }

    /// The suspension of `key`, if it is suspended.
    pub fn suspension(
        &self,
        key: &crate::spec::ObjectKey,
    ) -> Result<Option<super::records::Suspension>, super::StoreError> {
        self.inner.suspended.get(&super::layout::object(key), key)
    }
}
