//! The executor of a machine's change: runs exactly the steps of the plan
//! (build, install, switch, activate, health checks, confirm, prune), each
//! through the driver with its timeout, and records each when it ends.
//!
//! It interprets steps, it never chooses them: what to do was decided by
//! `plan::diff`. What it adds is what happens when a step fails: the steps
//! after it are recorded as skipped, and a failure from `switch` on rolls
//! back to the change's `rollback_to` (after claiming the target's
//! confirmation watchdog, so converge and the watchdog never both act). A
//! rolled-back attempt is a failure, never a success.

use std::time::{Duration, Instant};

use serde_json::json;

use super::attempt::Attempt;
use super::record::set_ready;
use crate::controller::context::{Context, Snapshot};
use crate::controller::error::ReconcileError;
use crate::driver::build::{Artifact, BuildRequest, cache_key};
use crate::driver::capability::{DriverError, Drivers};
use crate::driver::protocol::{ConfirmOutcome, Confirmation, GenerationId, MachineFacts};
use crate::plan::{Change, ROLLBACK_STEP, Step};
use crate::spec::{HumanDuration, MachineSpec, Object, ObjectKey, RollbackPolicy};
use crate::store::records::{
    Applied, AttemptResult, ConditionKind, Reason, SpecRecord, StatusRecord, now_ms,
};
use crate::telemetry::error_chain;

/// What a machine's change works on besides the plan.
pub struct Inputs<'a> {
    pub key: &'a ObjectKey,
    pub object: &'a Object<MachineSpec>,
    pub roles_document: &'a [u8],
    pub roles_hash: &'a str,
    /// What was observed right before planning.
    pub facts: &'a MachineFacts,
    /// The machine's document as recorded once applied.
    pub document: serde_json::Value,
}

/// How one step ended, when it did not fail the attempt.
enum Done {
    /// Go on with the next step; the output is recorded.
    Next(String),
    /// The artifact equals the one current and applied: the remaining
    /// steps are skipped and nothing changes.
    Unchanged(String, GenerationId),
    /// The step failed without failing the attempt (pruning).
    Tolerated(String),
}

/// The state one change's steps build up as they run.
struct Run<'a, D> {
    ctx: &'a Context<D>,
    snapshot: &'a Snapshot,
    inputs: Inputs<'a>,
    status: &'a StatusRecord,
    change: &'a Change,
    artifact: Option<Artifact>,
    /// The generation installed (or named by the plan's `switch`).
    generation: Option<GenerationId>,
    /// The target's watchdog armed by `activate`, not yet claimed.
    confirmation: Option<Confirmation>,
    /// A step from `switch` on ran: a failure now rolls back.
    switched: bool,
}

fn driver(reason: Reason, what: impl Into<String>) -> impl FnOnce(DriverError) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Driver {
        reason,
        what,
        source: Box::new(source),
    }
}

fn duration(text: &str) -> Result<Duration, ReconcileError> {
    text.parse::<HumanDuration>()
        .map(HumanDuration::get)
        .map_err(|_| ReconcileError::Unsupported {
            what: format!("the step duration {text:?}"),
        })
}

impl<D: Drivers> Run<'_, D> {
    fn target(&self) -> &crate::spec::Target {
        &self.inputs.object.spec.target
    }

    /// The generation `current` pointed at before this change.
    fn previous(&self) -> Option<&GenerationId> {
        self.inputs.facts.current_generation()
    }

    fn generation(&self) -> Result<&GenerationId, ReconcileError> {
        self.generation.as_ref().ok_or(ReconcileError::Unsupported {
            what: "a plan that activates before it installs".to_owned(),
        })
    }

    async fn step(&mut self, step: &Step) -> Result<Done, ReconcileError> {
        let ctx = self.ctx;
        match step {
            Step::Build => self.build().await,
            Step::Install => self.install().await,
            Step::Switch { generation } => {
                if let Some(name) = generation {
                    let named = GenerationId::from_dir_name(name).ok_or_else(|| {
                        ReconcileError::Unsupported {
                            what: format!("the generation name {name:?}"),
                        }
                    })?;
                    self.generation = Some(named);
                }
                let generation = self.generation()?.clone();
                self.switched = true;
                ctx.driver
                    .switch(self.target(), &generation, ctx.config.switch_timeout)
                    .await
                    .map_err(driver(
                        Reason::SwitchFailed,
                        format!("switch to generation {generation}"),
                    ))?;
                Ok(Done::Next(format!("current -> generations/{generation}")))
            }
            Step::Activate { mode } => {
                let generation = self.generation()?.clone();
                let watchdog = self.change.steps.iter().find_map(|s| match s {
                    Step::Confirm { timeout } => Some(timeout.as_str()),
                    _ => None,
                });
                let watchdog = watchdog.map(duration).transpose()?;
                let previous = self.previous().filter(|p| **p != generation).cloned();
                let (result, confirmation) = ctx
                    .driver
                    .activate_watched(
                        self.target(),
                        &generation,
                        previous.as_ref(),
                        mode,
                        self.inputs.object.spec.activation.timeout.value.get(),
                        watchdog,
                    )
                    .await
                    .map_err(driver(
                        Reason::ActivationFailed,
                        format!("activate {mode} of generation {generation}"),
                    ))?;
                self.confirmation = confirmation;
                if result.succeeded() {
                    Ok(Done::Next(result.log))
                } else {
                    tracing::info!(log = %result.log, "activation failed");
                    Err(ReconcileError::ActivationExit {
                        generation: generation.to_string(),
                        mode: mode.clone(),
                        code: result.code,
                    })
                }
            }
            Step::HealthCheck { command, timeout } => {
                let output = ctx
                    .driver
                    .health_check(self.target(), command, duration(timeout)?)
                    .await
                    .map_err(|source| ReconcileError::HealthCheck {
                        command: command.join(" "),
                        source: Box::new(source),
                    })?;
                Ok(Done::Next(format!("{}{}", output.stdout, output.stderr)))
            }
            Step::Confirm { .. } => {
                let Some(confirmation) = self.confirmation.clone() else {
                    return Ok(Done::Next("no watchdog was armed".to_owned()));
                };
                let generation = self.generation()?.to_string();
                match ctx
                    .driver
                    .confirm(self.target(), &confirmation, ctx.config.switch_timeout)
                    .await
                {
                    Ok(ConfirmOutcome::Confirmed) => {
                        self.confirmation = None;
                        Ok(Done::Next("reached over a new connection".to_owned()))
                    }
                    Ok(ConfirmOutcome::AlreadyRolledBack { rollback }) => {
                        self.confirmation = None;
                        Err(ReconcileError::NotConfirmed {
                            generation,
                            rollback: format!("{rollback:?}"),
                        })
                    }
                    // The confirmation stays armed: the rollback claims it
                    // before acting, so converge and the watchdog never both act.
                    Err(source) => Err(ReconcileError::ConfirmUnreachable {
                        generation,
                        source: Box::new(source),
                    }),
                }
            }
            Step::Prune { keep } => {
                let protect: Vec<GenerationId> = self
                    .generation
                    .iter()
                    .chain(self.previous())
                    .cloned()
                    .collect();
                match ctx
                    .driver
                    .prune(self.target(), *keep, &protect, ctx.config.switch_timeout)
                    .await
                {
                    Ok(removed) if removed.is_empty() => {
                        Ok(Done::Next("nothing to remove".to_owned()))
                    }
                    Ok(removed) => {
                        let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
                        Ok(Done::Next(format!("removed {}", names.join(", "))))
                    }
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), "failed to prune old generations");
                        Ok(Done::Tolerated(error_chain(&e)))
                    }
                }
            }
            other => Err(ReconcileError::Unsupported {
                what: format!("the step {} on a machine", other.name()),
            }),
        }
    }

    async fn build(&mut self) -> Result<Done, ReconcileError> {
        let Inputs {
            key,
            object,
            roles_document,
            roles_hash,
            ..
        } = self.inputs;
        let spec = &object.spec;
        let Some(argv) = spec.build.command.as_ref().map(|c| c.value.clone()) else {
            return Err(ReconcileError::Unsupported {
                what: "build.nix (use build.command)".to_owned(),
            });
        };
        let build_section = serde_json::to_vec(&spec.build).unwrap_or_default();
        let request = BuildRequest {
            workdir: self.snapshot.root.clone(),
            argv,
            machine: key.name.to_string(),
            roles_json: roles_document.to_vec(),
            cache_key: cache_key(&[
                b"converge-build-v1",
                &build_section,
                key.name.as_str().as_bytes(),
                roles_hash.as_bytes(),
                self.snapshot.revision.build_input.as_bytes(),
            ]),
            timeout: spec.build.timeout.value.get(),
        };
        let artifact = {
            let _permit = self.ctx.builds.acquire().await;
            self.ctx.driver.build(&request).await
        };
        let artifact = match artifact {
            Ok(a) => a,
            Err(source) => {
                if let Some(output) = source.build_output() {
                    tracing::info!(%output, "build failed");
                }
                return Err(ReconcileError::Driver {
                    reason: Reason::BuildFailed,
                    what: match source.build_output() {
                        Some(output) => format!("build\n{output}"),
                        None => "build".to_owned(),
                    },
                    source: Box::new(source),
                });
            }
        };
        let output = if artifact.cached {
            "cached: nothing ran".to_owned()
        } else {
            artifact.output.clone()
        };
        // Only the revision changed and the artifact is the one current and
        // applied: nothing to install or activate.
        let current = self
            .previous()
            .filter(|p| p.hash() == artifact.hash)
            .cloned();
        let applied = self
            .status
            .last_applied
            .as_ref()
            .is_some_and(|a| a.artifact == artifact.hash);
        self.artifact = Some(artifact);
        match current {
            Some(current) if self.change.only_if_artifact_changed && applied => {
                Ok(Done::Unchanged(output, current))
            }
            _ => Ok(Done::Next(output)),
        }
    }

    async fn install(&mut self) -> Result<Done, ReconcileError> {
        let Some(artifact) = self.artifact.clone() else {
            return Err(ReconcileError::Unsupported {
                what: "a plan that installs before it builds".to_owned(),
            });
        };
        let facts = self.inputs.facts;
        let number = facts
            .generations
            .iter()
            .chain(facts.incomplete.iter())
            .map(GenerationId::number)
            .chain(self.status.last_applied.as_ref().map(|a| a.generation))
            .max()
            .unwrap_or(0)
            + 1;
        let generation = GenerationId::new(number, artifact.hash.clone())
            .map_err(DriverError::from)
            .map_err(driver(Reason::BuildFailed, "name the new generation"))?;
        let how = self
            .ctx
            .driver
            .install(
                self.target(),
                &artifact,
                self.inputs.roles_document,
                &generation,
                self.ctx.config.install_timeout,
            )
            .await
            .map_err(driver(
                Reason::InstallFailed,
                format!("install generation {generation}"),
            ))?;
        self.generation = Some(generation);
        Ok(Done::Next(format!("{how:?}")))
    }

    /// After a failure from `switch` on: claim the watchdog, then re-activate
    /// `rollback_to`. Returns the attempt's result and its error.
    async fn roll_back(
        &mut self,
        failure: ReconcileError,
        attempt: &mut Attempt<'_, D>,
    ) -> (AttemptResult, ReconcileError) {
        let previous_number = self.previous().map(GenerationId::number);
        if matches!(failure, ReconcileError::NotConfirmed { .. }) {
            // The target's watchdog already re-activated the generation before.
            return rolled_back(
                failure,
                "the machine rolled itself back".to_owned(),
                previous_number,
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
                        previous_number,
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
        let target = self
            .change
            .rollback_to
            .as_deref()
            .and_then(GenerationId::from_dir_name)
            .filter(|p| Some(p) != generation.as_ref());
        let Some(to) = target else {
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

    async fn reactivate(&self, to: &GenerationId) -> Result<(), String> {
        let ctx = self.ctx;
        ctx.driver
            .switch(self.target(), to, ctx.config.switch_timeout)
            .await
            .map_err(|e| error_chain(&e))?;
        let activation = &self.inputs.object.spec.activation;
        match ctx
            .driver
            .activate(
                self.target(),
                to,
                activation.mode.as_arg(),
                activation.timeout.value.get(),
            )
            .await
        {
            Ok(r) if r.succeeded() => Ok(()),
            Ok(r) => Err(format!("activate exited with code {}", r.code)),
            Err(e) => Err(error_chain(&e)),
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

/// Executes `change` on the machine and records the attempt and the
/// machine's status.
pub async fn execute<D: Drivers>(
    ctx: &Context<D>,
    snapshot: &Snapshot,
    inputs: Inputs<'_>,
    mut status: StatusRecord,
    change: &Change,
) -> Result<(), ReconcileError> {
    let key = inputs.key;
    let object = inputs.object;
    let roles_hash = inputs.roles_hash;
    let document = inputs.document.clone();
    let mut attempt = Attempt::begin(ctx, key, &object.spec_hash, snapshot.revision.short())?;
    let mut run = Run {
        ctx,
        snapshot,
        inputs,
        status: &status,
        change,
        artifact: None,
        generation: None,
        confirmation: None,
        switched: false,
    };
    let mut failure = None;
    let mut unchanged = None;
    for (i, step) in change.steps.iter().enumerate() {
        let started = Instant::now();
        match run.step(step).await {
            Ok(Done::Next(output)) => attempt.ended(step, started, true, output),
            Ok(Done::Tolerated(output)) => attempt.ended(step, started, false, output),
            Ok(Done::Unchanged(output, current)) => {
                attempt.ended(step, started, true, output);
                attempt.skipped(
                    &change.steps[i + 1..],
                    &format!("the artifact is unchanged: generation {current} is current"),
                );
                unchanged = Some(current);
                break;
            }
            Err(e) => {
                attempt.ended(step, started, false, e.message());
                attempt.skipped(
                    &change.steps[i + 1..],
                    &format!("not run: {} failed", step.name()),
                );
                failure = Some(e);
                break;
            }
        }
    }
    let outcome = match failure {
        None => Ok(()),
        Some(e) if run.switched => Err(run.roll_back(e, &mut attempt).await),
        Some(e) => {
            let result = AttemptResult::Failed {
                reason: e.reason(),
                message: e.message(),
            };
            Err((result, e))
        }
    };
    let artifact = run
        .artifact
        .as_ref()
        .map(|a| a.hash.clone())
        .or_else(|| run.generation.as_ref().map(|g| g.hash().to_owned()));
    let result_if_ok = if unchanged.is_some() {
        AttemptResult::NoChange
    } else {
        AttemptResult::Succeeded
    };
    let generation = unchanged.or(run.generation);
    let now = now_ms();
    status.observed_spec_hash = Some(object.spec_hash.clone());
    match outcome {
        Ok(()) => {
            let Some(generation) = generation else {
                // A change without steps that name a generation (none today).
                attempt.finish(AttemptResult::NoChange, None, artifact, &status)?;
                return Ok(());
            };
            let result = result_if_ok;
            status.last_applied = Some(Applied {
                generation: generation.number(),
                artifact: generation.hash().to_owned(),
                revision: Some(snapshot.revision.short()),
                spec_hash: object.spec_hash.clone(),
                roles_hash: Some(roles_hash.to_owned()),
                applied_ms: now,
            });
            set_ready(
                &mut status,
                Reason::Converged,
                format!("generation {generation} is current"),
                &object.spec_hash,
            );
            status.set_condition(ConditionKind::Drifted, false, Reason::NoDrift, "", now);
            ctx.store.put_spec(
                key,
                &SpecRecord {
                    spec_hash: object.spec_hash.clone(),
                    revision: Some(snapshot.revision.build_input.clone()),
                    spec: document,
                    seen_ms: now,
                },
            )?;
            attempt.finish(result, Some(generation.number()), artifact, &status)?;
            tracing::info!(%generation, "converged");
            Ok(())
        }
        Err((result, error)) => {
            status.set_condition(
                ConditionKind::Ready,
                false,
                error.reason(),
                error.message(),
                now,
            );
            attempt.finish(result, generation.map(|g| g.number()), artifact, &status)?;
            tracing::warn!(reason = %error.reason(), "{}", error.message());
            Err(error)
        }
    }
}
