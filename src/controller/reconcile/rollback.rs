//! Rolling a machine back after a failure from `switch` on: claim the
//! target's confirmation watchdog first (so converge and the watchdog never
//! both act; when it fired already, the machine rolled itself back), then
//! switch back to the change's `rollback_to` and activate it as one deploy.
//! Records the `rollback` contingency step; it must not decide whether to
//! roll back (the executor does) or hold anything (`hold` does).

use std::time::Instant;

use serde_json::json;

use super::attempt::Attempt;
use super::deploy::Run;
use crate::controller::error::ReconcileError;
use crate::driver::capability::{Activate, Deploy, Drivers};
use crate::driver::protocol::{ConfirmOutcome, GenerationId};
use crate::plan::ROLLBACK_STEP;
use crate::spec::RollbackPolicy;
use crate::store::records::AttemptResult;
use crate::telemetry::error_chain;

impl<D: Drivers> Run<'_, D> {
    /// After a failure from `switch` on: claim the watchdog, then re-activate
    /// `rollback_to`. Returns the attempt's result and its error.
    pub(super) async fn roll_back(
        &mut self,
        failure: ReconcileError,
        attempt: &mut Attempt<'_, D>,
    ) -> (AttemptResult, ReconcileError) {
        let target = self
            .change
            .rollback_to
            .as_deref()
            .and_then(GenerationId::from_dir_name);
        let target_number = target.as_ref().map(GenerationId::number);
        if matches!(failure, ReconcileError::NotConfirmed { .. }) {
            // The target's watchdog already re-activated the generation before.
            return rolled_back(
                failure,
                "the machine rolled itself back".to_owned(),
                target_number,
            );
        }
        let started = Instant::now();
        let mut claimed = String::new();
        if let Some(confirmation) = self.confirmation.take() {
            match self
                .ctx
                .driver
                .confirm(self.target(), &confirmation, self.ctx.config.switch_timeout)
                .await
            {
                Ok(ConfirmOutcome::Confirmed) => {
                    claimed = "watchdog disarmed; ".to_owned();
                }
                Ok(ConfirmOutcome::AlreadyRolledBack { rollback }) => {
                    return rolled_back(
                        failure,
                        format!("the machine rolled itself back ({rollback:?})"),
                        target_number,
                    );
                }
                Err(e) => {
                    let why = format!(
                        "could not reach the machine to roll back ({}); its watchdog rolls it back after confirmTimeout",
                        error_chain(&e)
                    );
                    attempt.contingency(ROLLBACK_STEP, json!({}), started, false, why.clone());
                    return not_rolled_back(failure, why);
                }
            }
        }
        let generation = self.generation.clone();
        let Some(to) = target.filter(|p| Some(p) != generation.as_ref()) else {
            let why = if self.inputs.object.spec.activation.rollback == RollbackPolicy::Never {
                "not rolled back (rollback: never)"
            } else {
                "not rolled back (no earlier generation to roll back to)"
            };
            return not_rolled_back(failure, why.to_owned());
        };
        let rolled = self.reactivate(&to).await;
        let detail = json!({"to": to.to_string()});
        let (ok, outcome) = match &rolled {
            Ok(()) => (true, format!("rolled back to generation {to}")),
            Err(e) => (
                false,
                format!("rollback to generation {to} failed too: {e}"),
            ),
        };
        attempt.contingency(
            ROLLBACK_STEP,
            detail,
            started,
            ok,
            format!("{claimed}{outcome}"),
        );
        rolled_back(failure, outcome, Some(to.number()))
    }

    /// Switches back to `to` and activates it, as one deploy.
    async fn reactivate(&self, to: &GenerationId) -> Result<(), String> {
        let ctx = self.ctx;
        let activation = &self.inputs.object.spec.activation;
        let deploy = Deploy {
            install: None,
            switch: Some(Some(to.clone())),
            activate: Some(Activate {
                mode: activation.mode.as_arg().to_owned(),
                timeout: activation.timeout.value.get(),
                watchdog: None,
            }),
        };
        let outcome = ctx
            .driver
            .deploy(self.target(), deploy, ctx.config.switch_timeout)
            .await
            .map_err(|e| error_chain(&e))?;
        if let Some((_, error)) = outcome.failure {
            return Err(error_chain(&error));
        }
        match outcome.result {
            Some(r) if r.succeeded() => Ok(()),
            Some(r) => Err(format!("activate exited with code {}", r.code)),
            None => Err("the activation did not report how it ended".to_owned()),
        }
    }
}

fn rolled_back(
    cause: ReconcileError,
    outcome: String,
    to: Option<u64>,
) -> (AttemptResult, ReconcileError) {
    let error = ReconcileError::RolledBack {
        cause: Box::new(cause),
        outcome,
        to,
    };
    let result = AttemptResult::RolledBack {
        reason: error.cause_reason(),
        message: error.message(),
        to_generation: to,
    };
    (result, error)
}

fn not_rolled_back(cause: ReconcileError, why: String) -> (AttemptResult, ReconcileError) {
    let error = ReconcileError::NotRolledBack {
        cause: Box::new(cause),
        why,
    };
    let result = AttemptResult::Failed {
        reason: error.reason(),
        message: error.message(),
    };
    (result, error)
}
