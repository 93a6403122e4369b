//! The executor of a machine's change: runs exactly the steps of the plan
//! (build, install, switch, activate, health checks, confirm, prune), each
//! through the driver with its timeout, and records each when it ends.
//! Consecutive install, switch and activate steps go to the driver as one
//! deploy (one round trip), and are recorded one by one from its report.
//!
//! It interprets steps, it never chooses them: what to do was decided by
//! `plan::diff`. What it adds is what happens when a step fails: the steps
//! after it are recorded as skipped, and a failure from `switch` on rolls
//! back to the change's `rollback_to` (the last generation the target
//! recorded as confirmed), after claiming the target's confirmation
//! watchdog, so converge and the watchdog never both act. A rolled-back
//! attempt is a failure, never a success, and its artifact is held: not
//! activated again until its inputs change or an operator asks.

use std::time::{Duration, Instant};

use super::attempt::Attempt;
use super::hold::hold;
use super::record::set_ready;
use crate::controller::context::{Context, Snapshot};
use crate::controller::error::ReconcileError;
use crate::driver::build::{Artifact, BuildRequest, cache_key};
use crate::driver::capability::{Activate, Deploy, DeployOutcome, DriverError, Drivers, Install};
use crate::driver::nix::NixRequest;
use crate::driver::protocol::{
    ConfirmOutcome, Confirmation, DeployPhase, GenerationId, InstallOutcome, MachineError,
    MachineFacts, Watchdog,
};
use crate::plan::{Change, Step};
use crate::spec::{HumanDuration, MachineSpec, Object, ObjectKey};
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
    /// Identity of the inputs (spec, roles, build input) an artifact held
    /// after a rollback is held for.
    pub inputs: String,
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
pub(super) struct Run<'a, D> {
    pub(super) ctx: &'a Context<D>,
    pub(super) snapshot: &'a Snapshot,
    pub(super) inputs: Inputs<'a>,
    pub(super) status: &'a StatusRecord,
    pub(super) change: &'a Change,
    pub(super) artifact: Option<Artifact>,
    /// The generation installed (or named by the plan's `switch`).
    pub(super) generation: Option<GenerationId>,
    /// The target's watchdog armed by `activate`, not yet claimed.
    pub(super) confirmation: Option<Confirmation>,
    /// A step from `switch` on ran: a failure now rolls back.
    pub(super) switched: bool,
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

/// Whether a step is one of those a deploy does in one round trip.
fn deploys(step: &Step) -> bool {
    matches!(
        step,
        Step::Install | Step::Switch { .. } | Step::Activate { .. }
    )
}

impl<D: Drivers> Run<'_, D> {
    pub(super) fn target(&self) -> &crate::spec::Target {
        &self.inputs.object.spec.target
    }

    fn generation(&self) -> Result<&GenerationId, ReconcileError> {
        self.generation.as_ref().ok_or(ReconcileError::Unsupported {
            what: "a plan that activates before it installs".to_owned(),
        })
    }

    /// Runs `steps`: one step, or a run of consecutive deploy steps. Returns
    /// how each of them ended, in order; a failure ends the list.
    async fn steps(
        &mut self,
        steps: &[Step],
        attempt: &mut Attempt<'_, D>,
    ) -> Vec<(Instant, Duration, Result<Done, ReconcileError>)> {
        if steps.len() == 1 && !deploys(&steps[0]) {
            let started = Instant::now();
            let done = self.step(&steps[0]).await;
            return vec![(started, started.elapsed(), done)];
        }
        self.deploy(steps, attempt).await
    }

    async fn step(&mut self, step: &Step) -> Result<Done, ReconcileError> {
        let ctx = self.ctx;
        match step {
            Step::Build => self.build().await,
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
                let generation = self.generation()?.clone();
                let Some(confirmation) = self.confirmation.clone() else {
                    ctx.driver
                        .record_confirmed(self.target(), &generation, ctx.config.switch_timeout)
                        .await
                        .map_err(|source| ReconcileError::ConfirmUnreachable {
                            generation: generation.to_string(),
                            source: Box::new(source),
                        })?;
                    return Ok(Done::Next(format!(
                        "generation {generation} recorded as confirmed"
                    )));
                };
                match ctx
                    .driver
                    .confirm(self.target(), &confirmation, ctx.config.switch_timeout)
                    .await
                {
                    Ok(ConfirmOutcome::Confirmed) => {
                        self.confirmation = None;
                        Ok(Done::Next(
                            "reached over a new connection; recorded as confirmed".to_owned(),
                        ))
                    }
                    Ok(ConfirmOutcome::AlreadyRolledBack { rollback }) => {
                        self.confirmation = None;
                        Err(ReconcileError::NotConfirmed {
                            generation: generation.to_string(),
                            rollback: format!("{rollback:?}"),
                        })
                    }
                    // The confirmation stays armed: the rollback claims it
                    // before acting, so converge and the watchdog never both act.
                    Err(source) => Err(ReconcileError::ConfirmUnreachable {
                        generation: generation.to_string(),
                        source: Box::new(source),
                    }),
                }
            }
            Step::Prune { keep } => {
                // What was observed before this attempt, plus the one it may
                // have installed, fits in `keep`: nothing to remove, and no
                // round trip to learn it (a first deploy's case).
                let facts = self.inputs.facts;
                if facts.incomplete.is_empty() && facts.generations.len() < *keep {
                    return Ok(Done::Next(format!(
                        "nothing to remove: at most {} generations, {keep} kept",
                        facts.generations.len() + 1
                    )));
                }
                let protect: Vec<GenerationId> = self
                    .generation
                    .iter()
                    .chain(self.inputs.facts.current_generation())
                    .chain(self.inputs.facts.confirmed.as_ref())
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

    /// Consecutive install, switch and activate steps, as one deploy.
    async fn deploy(
        &mut self,
        steps: &[Step],
        attempt: &mut Attempt<'_, D>,
    ) -> Vec<(Instant, Duration, Result<Done, ReconcileError>)> {
        let started = Instant::now();
        let ctx = self.ctx;
        let spec = &self.inputs.object.spec;
        let mut deploy = Deploy {
            install: None,
            switch: None,
            activate: None,
        };
        let proposed = self.artifact.as_ref().map(|artifact| {
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
            GenerationId::new(number, artifact.hash.clone())
        });
        for step in steps {
            match step {
                Step::Install => {
                    let (Some(artifact), Some(proposed)) = (&self.artifact, &proposed) else {
                        return vec![(
                            started,
                            Duration::ZERO,
                            Err(ReconcileError::Unsupported {
                                what: "a plan that installs before it builds".to_owned(),
                            }),
                        )];
                    };
                    let generation = match proposed {
                        Ok(g) => g.clone(),
                        Err(e) => {
                            let error = DriverError::Machine(MachineError::InvalidGeneration {
                                name: e.to_string(),
                            });
                            return vec![(
                                started,
                                Duration::ZERO,
                                Err(driver(Reason::BuildFailed, "name the new generation")(
                                    error,
                                )),
                            )];
                        }
                    };
                    deploy.install = Some(Install {
                        artifact,
                        roles_json: self.inputs.roles_document,
                        generation,
                        facts: self.inputs.facts,
                    });
                }
                Step::Switch { generation } => {
                    let named = match generation {
                        Some(name) => match GenerationId::from_dir_name(name) {
                            Some(g) => Some(g),
                            None => {
                                return vec![(
                                    started,
                                    Duration::ZERO,
                                    Err(ReconcileError::Unsupported {
                                        what: format!("the generation name {name:?}"),
                                    }),
                                )];
                            }
                        },
                        None => None,
                    };
                    if let Some(g) = &named {
                        self.generation = Some(g.clone());
                    }
                    deploy.switch = Some(named);
                }
                Step::Activate { mode } => {
                    let watchdog = self.change.steps.iter().find_map(|s| match s {
                        Step::Confirm {
                            timeout: Some(timeout),
                        } => Some(timeout.as_str()),
                        _ => None,
                    });
                    let watchdog = match watchdog.map(duration).transpose() {
                        Ok(w) => w,
                        Err(e) => return vec![(started, Duration::ZERO, Err(e))],
                    };
                    deploy.activate = Some(Activate {
                        mode: mode.clone(),
                        timeout: spec.activation.timeout.value.get(),
                        watchdog: watchdog.map(|confirm_timeout| Watchdog {
                            previous: self
                                .change
                                .rollback_to
                                .as_deref()
                                .and_then(GenerationId::from_dir_name),
                            confirm_timeout,
                        }),
                    });
                }
                _ => {}
            }
        }
        if deploy.switch.is_some() {
            self.switched = true;
        }
        let generation = deploy
            .install
            .as_ref()
            .map(|i| i.generation.clone())
            .or_else(|| deploy.switch.clone().flatten())
            .or_else(|| self.generation.clone());
        attempt.pending(
            steps,
            &format!(
                "sent to the target in one round trip{}; the controller stopped before the target answered (`converge facts` shows what it did)",
                generation.map(|g| format!(" (generation {g})")).unwrap_or_default()
            ),
        );
        let outcome = ctx
            .driver
            .deploy(self.target(), deploy, ctx.config.install_timeout)
            .await;
        let elapsed = started.elapsed();
        let outcome = match outcome {
            // What the target reported: a deploy refused before its switch
            // (another generation's activation runs) changed nothing.
            Ok(outcome) => {
                self.switched = outcome.switched;
                outcome
            }
            Err(source) => {
                let first = &steps[0];
                let error = driver(step_reason(first), first.name())(source);
                return vec![(started, elapsed, Err(error))];
            }
        };
        self.record_deploy(steps, outcome, started, elapsed)
    }

    /// Each deploy step's result from the deploy's report, in order; the
    /// first failure ends the list.
    fn record_deploy(
        &mut self,
        steps: &[Step],
        mut outcome: DeployOutcome,
        started: Instant,
        elapsed: Duration,
    ) -> Vec<(Instant, Duration, Result<Done, ReconcileError>)> {
        if let Some(generation) = outcome.generation.clone() {
            self.generation = Some(generation);
        }
        let mut results: Vec<(Instant, Duration, Result<Done, ReconcileError>)> = Vec::new();
        let mut failure = outcome.failure.take();
        for step in steps {
            let phase = match step {
                Step::Install => DeployPhase::Install,
                Step::Switch { .. } => DeployPhase::Switch,
                _ => DeployPhase::Activate,
            };
            if let Some((failed, _)) = &failure {
                if *failed == phase {
                    let Some((_, error)) = failure.take() else {
                        break;
                    };
                    let error = match (phase, &self.generation) {
                        _ if is_busy(&error) => ReconcileError::Driver {
                            reason: Reason::ActivationBusy,
                            what: "activate".to_owned(),
                            source: Box::new(error),
                        },
                        (_, Some(g)) => {
                            driver(step_reason(step), format!("{} {g}", step.name()))(error)
                        }
                        (_, None) => driver(step_reason(step), step.name())(error),
                    };
                    results.push((started, elapsed, Err(error)));
                    break;
                }
            }
            let done = match step {
                Step::Install => match &outcome.install {
                    Some(InstallOutcome::Reused { generation }) => format!(
                        "generation {generation} on the target has the same artifact and roles: reused"
                    ),
                    Some(how) => format!("{how:?}"),
                    None => "nothing reported".to_owned(),
                },
                Step::Switch { .. } => match &self.generation {
                    Some(g) => format!("current -> generations/{g}"),
                    None => "switched".to_owned(),
                },
                Step::Activate { mode } => {
                    let started_how = outcome.started.as_ref().map(|s| s.attached);
                    self.confirmation = outcome
                        .started
                        .as_ref()
                        .and_then(|s| s.confirmation.clone());
                    match outcome.result.take() {
                        Some(result) if result.succeeded() => {
                            if started_how == Some(true) {
                                format!(
                                    "attached to the activation a controller before this one started\n{}",
                                    result.log
                                )
                            } else {
                                result.log
                            }
                        }
                        Some(result) => {
                            tracing::info!(log = %result.log, "activation failed");
                            let generation = self
                                .generation
                                .as_ref()
                                .map(ToString::to_string)
                                .unwrap_or_default();
                            results.push((
                                started,
                                elapsed,
                                Err(ReconcileError::ActivationExit {
                                    generation,
                                    mode: mode.clone(),
                                    code: result.code,
                                }),
                            ));
                            break;
                        }
                        None => "started".to_owned(),
                    }
                }
                _ => String::new(),
            };
            results.push((started, elapsed, Ok(Done::Next(done))));
        }
        // One round trip did them all: its time is the last step's; the
        // ones before it say they ran in the same round trip.
        let last = results.len().saturating_sub(1);
        let names: Vec<&str> = steps.iter().take(results.len()).map(Step::name).collect();
        for (k, result) in results.iter_mut().enumerate() {
            if k < last {
                result.1 = Duration::ZERO;
                if let Ok(Done::Next(output)) = &mut result.2 {
                    *output = format!(
                        "{output} (one round trip with {})",
                        names[k + 1..].join(", ")
                    );
                }
            }
        }
        results
    }

    /// Builds `request` and lists the files of the desired-state directory
    /// `root` that changed meanwhile (none when the cache had the artifact).
    async fn build_watching(
        &self,
        request: &BuildRequest,
        root: &std::path::Path,
    ) -> (Result<Artifact, DriverError>, Vec<String>) {
        let list = |root: std::path::PathBuf| async move {
            tokio::task::spawn_blocking(move || crate::source::listing(&root))
                .await
                .unwrap_or_default()
        };
        let before = list(root.to_path_buf()).await;
        let built = self.ctx.driver.build(request).await;
        if !built.as_ref().is_ok_and(|a| !a.cached) {
            return (built, Vec::new());
        }
        let after = list(root.to_path_buf()).await;
        (built, crate::source::changed_files(&before, &after))
    }

    async fn build(&mut self) -> Result<Done, ReconcileError> {
        let Inputs {
            key,
            object,
            roles_document,
            roles_hash,
            ..
        } = &self.inputs;
        let spec = &object.spec;
        let root = self.snapshot.root.clone();
        let nix = spec
            .build
            .nix
            .as_ref()
            .map(|nix| NixRequest::for_machine(&nix.value.flake, key.name.as_str(), &root));
        let argv = spec
            .build
            .command
            .as_ref()
            .map(|c| c.value.clone())
            .unwrap_or_default();
        let build_section = serde_json::to_vec(&spec.build).unwrap_or_default();
        let request = BuildRequest {
            workdir: root.clone(),
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
            nix,
        };
        // A build that writes into the desired-state directory changes its
        // own inputs: it would rebuild itself forever. When the directory
        // changed during a build (another build, or a person, may have done
        // it), the build runs again alone; changed again, it is the culprit.
        let artifact = {
            let _gate = self.ctx.build_gate.read().await;
            let _permit = self.ctx.builds.acquire().await;
            self.build_watching(&request, &root).await
        };
        let artifact = match artifact {
            (built, changed) if changed.is_empty() => built,
            (first, changed) => {
                tracing::warn!(
                    files = %changed.join(", "),
                    "the desired-state directory changed during the build; building again alone to see whether the build changed it"
                );
                let _alone = self.ctx.build_gate.write().await;
                let again = BuildRequest {
                    cache_key: cache_key(&[request.cache_key.as_bytes(), b"built-alone"]),
                    ..request.clone()
                };
                // The first artifact stays the one its cache key names.
                match self.build_watching(&again, &root).await {
                    (_, changed) if changed.is_empty() => first,
                    (_, files) => return Err(ReconcileError::BuildChangedDirectory { files }),
                }
            }
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
            .inputs
            .facts
            .current_generation()
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
}

fn is_busy(error: &DriverError) -> bool {
    matches!(
        error,
        DriverError::Machine(MachineError::ActivationBusy { .. })
    )
}

/// The reason a failed step sets.
fn step_reason(step: &Step) -> Reason {
    match step {
        Step::Install => Reason::InstallFailed,
        Step::Switch { .. } => Reason::SwitchFailed,
        _ => Reason::ActivationFailed,
    }
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
    let held_inputs = inputs.inputs.clone();
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
    let mut i = 0;
    'steps: while i < change.steps.len() {
        // A run of deploy steps goes as one; any other step alone.
        let len = if deploys(&change.steps[i]) {
            change.steps[i..].iter().take_while(|s| deploys(s)).count()
        } else {
            1
        };
        let group = &change.steps[i..i + len];
        let results = run.steps(group, &mut attempt).await;
        for (j, (started, elapsed, done)) in results.into_iter().enumerate() {
            let step = &group[j];
            let index = i + j;
            match done {
                Ok(Done::Next(output)) => attempt.ended_after(step, started, elapsed, true, output),
                Ok(Done::Tolerated(output)) => {
                    attempt.ended_after(step, started, elapsed, false, output);
                }
                Ok(Done::Unchanged(output, current)) => {
                    attempt.ended_after(step, started, elapsed, true, output);
                    attempt.skipped(
                        &change.steps[index + 1..],
                        &format!("the artifact is unchanged: generation {current} is current"),
                    );
                    unchanged = Some(current);
                    break 'steps;
                }
                Err(e) => {
                    attempt.ended_after(step, started, elapsed, false, e.message());
                    attempt.skipped(
                        &change.steps[index + 1..],
                        &format!("not run: {} failed", step.name()),
                    );
                    failure = Some(e);
                    break 'steps;
                }
            }
        }
        i += len;
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
            status.last_applied = Some(Applied {
                generation: generation.number(),
                artifact: generation.hash().to_owned(),
                revision: Some(snapshot.revision.short()),
                spec_hash: object.spec_hash.clone(),
                roles_hash: Some(roles_hash.to_owned()),
                applied_ms: now,
            });
            status.held = None;
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
            attempt.finish(result_if_ok, Some(generation.number()), artifact, &status)?;
            tracing::info!(%generation, "converged");
            Ok(())
        }
        Err((result, error)) => {
            status.held = hold(
                &error,
                generation.as_ref(),
                held_inputs,
                &object.spec_hash,
                roles_hash,
                &snapshot.root,
                now,
            );
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
