//! One attempt, recorded as it happens: begun in the store before its first
//! step, each step recorded when it ends (so a crash keeps the steps that
//! finished), planned steps that did not run recorded as skipped, and the
//! whole attempt finished with its result and the object's status in one
//! write.
//!
//! Every kind's executor records through this, so history names steps the
//! way the plan does ([`Step::name`], its fields as detail) for machines,
//! VMs and services alike.

use std::time::Instant;

use serde_json::Value;

use crate::controller::context::Context;
use crate::controller::error::ReconcileError;
use crate::plan::Step;
use crate::spec::ObjectKey;
use crate::store::records::now_ms;
use crate::store::records::{AttemptRecord, AttemptResult, StatusRecord, StepRecord, StepStatus};

/// An attempt under way on one object.
pub(crate) struct Attempt<'c, D> {
    ctx: &'c Context<D>,
    key: ObjectKey,
    id: u64,
    started_ms: u64,
    revision: String,
    spec_hash: String,
    steps: Vec<StepRecord>,
}

impl<'c, D> Attempt<'c, D> {
    /// Records the attempt as in progress (flushed: a crash from here on
    /// leaves it to be closed as interrupted on the next start).
    pub fn begin(
        ctx: &'c Context<D>,
        key: &ObjectKey,
        spec_hash: &str,
        revision: String,
    ) -> Result<Attempt<'c, D>, ReconcileError> {
        let id = ctx.store.begin_attempt(key, spec_hash, Some(&revision))?;
        Ok(Attempt {
            ctx,
            key: key.clone(),
            id,
            started_ms: now_ms(),
            revision,
            spec_hash: spec_hash.to_owned(),
            steps: Vec::new(),
        })
    }

    /// Records a planned step that ended.
    pub fn ended(&mut self, step: &Step, started: Instant, ok: bool, output: impl Into<String>) {
        let status = if ok {
            StepStatus::Succeeded
        } else {
            StepStatus::Failed
        };
        self.push(step.name(), step.detail(), status, started, output.into());
    }

    /// Records a planned step that ended, `elapsed` after `started` (steps
    /// done together in one round trip share their time: see the caller).
    pub fn ended_after(
        &mut self,
        step: &Step,
        started: Instant,
        elapsed: std::time::Duration,
        ok: bool,
        output: impl Into<String>,
    ) {
        let _ = started;
        let status = if ok {
            StepStatus::Succeeded
        } else {
            StepStatus::Failed
        };
        let record = StepRecord {
            name: step.name().to_owned(),
            status,
            detail: step.detail(),
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            output: output.into(),
        };
        self.save(record);
    }

    /// Records `steps` as sent to the target and not answered yet: if the
    /// controller dies before they are recorded as ended, the attempt is
    /// closed with them as interrupted (`note` says what they were doing).
    pub fn pending(&mut self, steps: &[Step], note: &str) {
        let records: Vec<StepRecord> = steps
            .iter()
            .map(|step| StepRecord {
                name: step.name().to_owned(),
                status: StepStatus::Interrupted,
                detail: step.detail(),
                duration_ms: 0,
                output: note.to_owned(),
            })
            .collect();
        if let Err(e) = self.ctx.store.record_pending(&self.key, self.id, &records) {
            tracing::error!(object = %self.key, error = %crate::telemetry::error_chain(&e), "failed to record steps sent to the target");
        }
    }

    /// Records planned steps that were not run, saying why.
    pub fn skipped<'s>(&mut self, steps: impl IntoIterator<Item = &'s Step>, why: &str) {
        for step in steps {
            let record = StepRecord {
                name: step.name().to_owned(),
                status: StepStatus::Skipped,
                detail: step.detail(),
                duration_ms: 0,
                output: why.to_owned(),
            };
            self.save(record);
        }
    }

    /// Records what was done because a step failed (a rollback), under its
    /// own `name`.
    pub fn contingency(
        &mut self,
        name: &str,
        detail: Value,
        started: Instant,
        ok: bool,
        output: impl Into<String>,
    ) {
        let status = if ok {
            StepStatus::Succeeded
        } else {
            StepStatus::Failed
        };
        self.push(name, detail, status, started, output.into());
    }

    fn push(
        &mut self,
        name: &str,
        detail: Value,
        status: StepStatus,
        started: Instant,
        output: String,
    ) {
        let record = StepRecord {
            name: name.to_owned(),
            status,
            detail,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            output,
        };
        self.save(record);
    }

    fn save(&mut self, record: StepRecord) {
        if let Err(e) = self.ctx.store.record_step(&self.key, self.id, &record) {
            tracing::error!(object = %self.key, error = %crate::telemetry::error_chain(&e), "failed to record a step");
        }
        self.steps.push(record);
    }

    /// Ends the attempt: writes its record and `status` in one transaction.
    pub fn finish(
        self,
        result: AttemptResult,
        generation: Option<u64>,
        artifact: Option<String>,
        status: &StatusRecord,
    ) -> Result<(), ReconcileError> {
        let record = AttemptRecord {
            id: self.id,
            key: self.key,
            started_ms: self.started_ms,
            finished_ms: now_ms(),
            revision: Some(self.revision),
            spec_hash: self.spec_hash,
            generation,
            artifact,
            steps: self.steps,
            result,
        };
        self.ctx.store.finish_attempt(&record, status)?;
        Ok(())
    }
}
