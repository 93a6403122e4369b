//! A deploy in one round trip: `apply.sh` installs a generation (its
//! roles document and only the files the target lacks, on stdin), switches
//! `current` to it, starts its activation detached (or attaches to the one
//! already running: never two at once per state directory), arms the
//! confirmation watchdog, and waits for the activation a first window, each
//! phase only when asked. The report says which phases ended and how, and
//! which failed, so the controller records each step as it happened. It
//! must not decide what a result means, and never sends a document in argv.

use std::path::Path;
use std::time::Duration;

use super::confirm::{CONFIRM_TICK_MS, Confirmation};
use super::generation::{
    ActivationAttempt, ActivationResult, GenerationId, InstallOutcome, MachineError,
};
use super::script::{EXIT_NOT_INSTALLED, Script, checked_state_dir, parse_error, run_script_input};
use crate::driver::command::unique_suffix;
use crate::driver::stream::{self, Manifest};
use crate::driver::target::{Input, Target};

/// The protocol's main script: its phases after the shared functions, the
/// stream reader and the confirmation watchdog (a phase it starts detached).
pub(super) const APPLY_SCRIPT: Script = Script {
    name: "converge-apply.sh",
    text: concat!(
        include_str!("scripts/lib.sh"),
        include_str!("../stream.sh"),
        include_str!("scripts/confirm_watchdog.sh"),
        include_str!("scripts/apply.sh")
    ),
};
/// The unit in which `wait` counts its window.
pub(super) const WAIT_TICK_MS: u128 = 10;
/// Exit code of `activate` when another generation's activation runs.
const EXIT_BUSY: i32 = 6;
/// Exit code of `install` when the stream on stdin was not what it expects.
const EXIT_BAD_STREAM: i32 = 7;
/// Exit code of `arm` when `current` does not point at the activation's generation.
const EXIT_NOT_CURRENT: i32 = 4;

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallRequest<'a> {
    /// The name a new generation gets.
    pub generation: GenerationId,
    /// The local artifact tree (its tree hash is `generation.hash()`).
    pub artifact: &'a Path,
    pub manifest: &'a Manifest,
    pub roles_json: &'a [u8],
    pub source: InstallSource<'a>,
}

/// Where the generation's files come from.
#[derive(Debug, Clone)]
pub enum InstallSource<'a> {
    /// Every file travels.
    Stream,
    /// Files equal to those of complete generation `generation` (whose
    /// manifest is `manifest`) are taken from it on the target.
    Base {
        generation: GenerationId,
        manifest: &'a Manifest,
    },
    /// Complete generation `GenerationId` has the same artifact: used as it
    /// is when its roles document is the same, else its artifact is copied.
    Same(GenerationId),
}

/// What to activate. With `watchdog`, a confirmation watchdog is armed for
/// the activation right after it starts.
#[derive(Debug, Clone)]
pub struct ActivateRequest {
    pub mode: String,
    /// The most the activation may take; the watchdog waits no longer.
    pub timeout: Duration,
    pub watchdog: Option<Watchdog>,
}

/// How a confirmation watchdog rolls back.
#[derive(Debug, Clone)]
pub struct Watchdog {
    /// What it goes back to; `None`: it removes `current`.
    pub previous: Option<GenerationId>,
    /// The window for the confirmation, counted from the activation's end.
    pub confirm_timeout: Duration,
}

/// One `apply.sh` run's phases.
#[derive(Debug, Clone, Default)]
pub struct DeployRequest<'a> {
    pub install: Option<InstallRequest<'a>>,
    /// Switch to this generation; `None` with `install`: to the installed one.
    pub switch: Option<Option<GenerationId>>,
    /// Activate the generation switched to (or installed, or this one).
    pub activate: Option<(Option<GenerationId>, ActivateRequest)>,
    /// Wait this long for the activation before returning (a first window).
    pub wait: Option<Duration>,
}

/// A phase of a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployPhase {
    Install,
    Switch,
    Activate,
}

/// How the activation stood when the run returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    Ended(ActivationResult),
    /// Still running after the window.
    Running,
    /// Its runner is gone without a status.
    Lost,
}

/// An activation started or attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationStarted {
    pub attempt: ActivationAttempt,
    /// It was already running (a controller that restarted re-attached).
    pub attached: bool,
    pub confirmation: Option<Confirmation>,
}

/// What one deploy did, phase by phase.
#[derive(Debug)]
pub struct DeployReport {
    pub install: Option<InstallOutcome>,
    /// The generation installed (a reused one keeps its name).
    pub generation: Option<GenerationId>,
    pub switched: bool,
    pub started: Option<ActivationStarted>,
    pub waited: Option<WaitOutcome>,
    /// The phase that failed, and why; the phases after it did not run.
    pub failure: Option<(DeployPhase, MachineError)>,
}

/// Runs the asked phases of `apply.sh` in one round trip, bounded by
/// `timeout`. `Err` only when the run's outcome is unknown (the command
/// could not be run or its connection died): then none of its phases can
/// be counted on.
pub async fn deploy<T: Target>(
    t: &T,
    state_dir: &str,
    request: &DeployRequest<'_>,
    timeout: Duration,
) -> Result<DeployReport, MachineError> {
    let state_dir = checked_state_dir(state_dir)?;
    let step = "deploy".to_owned();
    let mut args: Vec<String> = vec![state_dir.to_owned()];
    let mut input = Input::default();
    let mut sent = stream::Sent::default();
    let mut planned = None;
    if let Some(install) = &request.install {
        let source = match &install.source {
            InstallSource::Stream => "stream".to_owned(),
            InstallSource::Base { generation, .. } => format!("base:{generation}"),
            InstallSource::Same(generation) => format!("same:{generation}"),
        };
        args.extend([
            "install".to_owned(),
            install.generation.to_string(),
            install.generation.hash().to_owned(),
            source,
        ]);
        stream::push_roles(&mut input, install.roles_json);
        sent = match &install.source {
            InstallSource::Same(_) => stream::Sent::default(),
            InstallSource::Stream => {
                stream::push_tree(&mut input, install.artifact, install.manifest, None)
            }
            InstallSource::Base { manifest, .. } => stream::push_tree(
                &mut input,
                install.artifact,
                install.manifest,
                Some(manifest),
            ),
        };
        stream::push_end(&mut input, sent.entries + 1);
        planned = Some(install.generation.clone());
    }
    if let Some(switch) = &request.switch {
        let name = switch
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        args.extend(["switch".to_owned(), name]);
    }
    let mut watchdog = None;
    if let Some((generation, activate)) = &request.activate {
        let mode = checked_mode(&activate.mode)?;
        let id = unique_suffix();
        let name = generation
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string);
        args.extend(["activate".to_owned(), name, mode.to_owned(), id.clone()]);
        if let Some(w) = &activate.watchdog {
            args.extend(arm_args(w, mode, activate.timeout));
            watchdog = Some(w.clone());
        }
    }
    if let Some(window) = request.wait {
        let ticks = (window.as_millis() / WAIT_TICK_MS).max(1).to_string();
        args.extend(["wait".to_owned(), ticks]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run_script_input(t, &step, APPLY_SCRIPT, &arg_refs, &input, timeout).await?;

    // Read what each phase reported before the run ended.
    let mut report = DeployReport {
        install: None,
        generation: None,
        switched: false,
        started: None,
        waited: None,
        failure: None,
    };
    let mut rollback_id = None;
    let mut log_start = 0;
    for (offset, line) in line_offsets(&output.stdout) {
        let Some(rest) = line.strip_prefix("converge-step ") else {
            continue;
        };
        log_start = offset + line.len() + 1;
        let words: Vec<&str> = rest.split_whitespace().collect();
        match words[..] {
            ["install", "present", name] | ["install", "reused", name] => {
                let generation = GenerationId::from_dir_name(name)
                    .ok_or_else(|| parse_error(t, &step, &output.stdout))?;
                report.install = Some(if words[1] == "present" {
                    InstallOutcome::AlreadyPresent
                } else {
                    InstallOutcome::Reused {
                        generation: generation.clone(),
                    }
                });
                report.generation = Some(generation);
            }
            ["install", "copied", name] | ["install", "uploaded", name] => {
                report.install = Some(if words[1] == "copied" {
                    InstallOutcome::CopiedOnTarget
                } else {
                    InstallOutcome::Uploaded {
                        files: sent.files,
                        kept: sent.kept,
                        bytes: sent.bytes,
                    }
                });
                report.generation = GenerationId::from_dir_name(name).or(planned.clone());
            }
            ["switch", "ok", _] => report.switched = true,
            ["activate", how @ ("started" | "attached"), generation, id] => {
                let generation = GenerationId::from_dir_name(generation)
                    .ok_or_else(|| parse_error(t, &step, &output.stdout))?;
                report.started = Some(ActivationStarted {
                    attempt: ActivationAttempt {
                        generation,
                        id: id.to_owned(),
                    },
                    attached: how == "attached",
                    confirmation: None,
                });
            }
            ["arm", "armed" | "existing", _, rollback] => rollback_id = Some(rollback.to_owned()),
            _ => return Err(parse_error(t, &step, &output.stdout)),
        }
    }
    if let (Some(started), Some(w)) = (report.started.as_mut(), watchdog) {
        if let Some(rollback_id) = rollback_id {
            started.confirmation = Some(Confirmation {
                id: started.attempt.id.clone(),
                attempt: started.attempt.clone(),
                previous: w.previous,
                mode: request
                    .activate
                    .as_ref()
                    .map(|(_, a)| a.mode.clone())
                    .unwrap_or_default(),
                timeout: w.confirm_timeout,
                rollback_id,
            });
        }
    }
    if output.succeeded() {
        if request.wait.is_some() {
            let rest = output.stdout.get(log_start..).unwrap_or("");
            let Some((log, status)) = split_status(rest) else {
                return Err(parse_error(t, &step, &output.stdout));
            };
            report.waited = Some(match status {
                "running" => WaitOutcome::Running,
                "lost" => WaitOutcome::Lost,
                code => WaitOutcome::Ended(ActivationResult {
                    code: code
                        .parse()
                        .map_err(|_| parse_error(t, &step, &output.stdout))?,
                    log: log.to_owned(),
                }),
            });
        }
        return Ok(report);
    }
    // The first asked phase that did not report is the one that failed.
    let phase = if request.install.is_some() && report.install.is_none() {
        DeployPhase::Install
    } else if request.switch.is_some() && !report.switched {
        DeployPhase::Switch
    } else {
        DeployPhase::Activate
    };
    let generation = report
        .generation
        .clone()
        .or_else(|| request.switch.clone().flatten())
        .or_else(|| request.activate.as_ref().and_then(|(g, _)| g.clone()))
        .or(planned);
    let stderr = output.stderr.trim_end().to_owned();
    let error = match (output.code, generation) {
        (Some(EXIT_NOT_INSTALLED), Some(generation)) => MachineError::NotInstalled {
            target: t.describe(),
            generation,
        },
        (Some(EXIT_BUSY), Some(wanted)) => {
            let (running, attempt) = busy_of(&stderr);
            MachineError::ActivationBusy {
                target: t.describe(),
                wanted,
                running,
                attempt,
            }
        }
        (code, _) => MachineError::Script {
            step: match (phase, code) {
                (DeployPhase::Install, Some(EXIT_BAD_STREAM)) => {
                    "install (the artifact stream was refused)".to_owned()
                }
                (DeployPhase::Install, _) => "install".to_owned(),
                (DeployPhase::Switch, _) => "switch".to_owned(),
                (DeployPhase::Activate, _) => "activate".to_owned(),
            },
            target: t.describe(),
            code,
            stderr,
        },
    };
    report.failure = Some((phase, error));
    Ok(report)
}

/// The `arm` phase's words for `watchdog` over an activation in `mode`
/// bounded by `timeout`.
pub(super) fn arm_args(watchdog: &Watchdog, mode: &str, timeout: Duration) -> Vec<String> {
    let ticks = |d: Duration| d.as_millis().div_ceil(CONFIRM_TICK_MS).max(1).to_string();
    vec![
        "arm".to_owned(),
        watchdog
            .previous
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string),
        ticks(watchdog.confirm_timeout),
        ticks(timeout),
        unique_suffix(),
        mode.to_owned(),
    ]
}

/// The activation mode, when it is one word of at most 32 characters.
pub(super) fn checked_mode(mode: &str) -> Result<&str, MachineError> {
    let valid = !mode.is_empty()
        && mode.len() <= 32
        && mode
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(mode)
    } else {
        Err(MachineError::InvalidMode {
            mode: mode.to_owned(),
        })
    }
}

/// Splits the wait phase's output into (log, status word).
pub(super) fn split_status(stdout: &str) -> Option<(&str, &str)> {
    const MARK: &str = "converge-status=";
    let body = stdout.strip_suffix('\n').unwrap_or(stdout);
    let (log, line) = match body.rfind(&format!("\n{MARK}")) {
        Some(at) => (&body[..at], &body[at + 1..]),
        None => ("", body),
    };
    line.strip_prefix(MARK).map(|status| (log, status))
}

/// (generation, attempt) from "generation G is being activated (attempt A)".
fn busy_of(stderr: &str) -> (String, String) {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    let generation = words.get(1).map_or("?", |w| w).to_owned();
    let attempt = words
        .last()
        .map_or("?", |w| w.trim_end_matches(')'))
        .to_owned();
    (generation, attempt)
}

/// Each line of `text` with the byte offset it starts at.
fn line_offsets(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut offset = 0;
    text.split('\n').map(move |line| {
        let at = offset;
        offset += line.len() + 1;
        (at, line)
    })
}

/// The failure of a single-phase deploy as its error.
fn only_phase(report: DeployReport) -> Result<DeployReport, MachineError> {
    match report.failure {
        Some((_, error)) => Err(error),
        None => Ok(report),
    }
}

/// Installs `generation` alone (after observing the target: one deploy
/// with only its install phase). Every file of `artifact` travels, unless a
/// complete generation with the same hash is on the target already (then
/// nothing of it is read). Never touches `current`.
pub async fn install<T: Target>(
    t: &T,
    state_dir: &str,
    artifact: &Path,
    roles_json: &[u8],
    generation: &GenerationId,
    timeout: Duration,
) -> Result<InstallOutcome, MachineError> {
    let facts = super::observe::observe(t, state_dir, timeout).await?;
    let same = facts
        .generations
        .iter()
        .rev()
        .find(|g| *g == generation)
        .or_else(|| {
            facts
                .generations
                .iter()
                .rev()
                .find(|g| g.hash() == generation.hash())
        })
        .cloned();
    let manifest = match same {
        Some(_) => Manifest::default(),
        None => Manifest::of(artifact).map_err(|source| MachineError::Artifact {
            path: artifact.to_path_buf(),
            source,
        })?,
    };
    let request = DeployRequest {
        install: Some(InstallRequest {
            generation: generation.clone(),
            artifact,
            manifest: &manifest,
            roles_json,
            source: same.map_or(InstallSource::Stream, InstallSource::Same),
        }),
        ..DeployRequest::default()
    };
    let report = only_phase(deploy(t, state_dir, &request, timeout).await?)?;
    report.install.ok_or_else(|| parse_error(t, "install", ""))
}

/// Points `current` at `generation` alone, in one rename.
pub async fn switch<T: Target>(
    t: &T,
    state_dir: &str,
    generation: &GenerationId,
    timeout: Duration,
) -> Result<(), MachineError> {
    let request = DeployRequest {
        switch: Some(Some(generation.clone())),
        ..DeployRequest::default()
    };
    only_phase(deploy(t, state_dir, &request, timeout).await?)?;
    Ok(())
}

/// Starts (or attaches to) `generation`'s activation alone and returns at
/// once; wait with `activation::wait_activation`.
pub async fn start_activation<T: Target>(
    t: &T,
    state_dir: &str,
    generation: &GenerationId,
    mode: &str,
    timeout: Duration,
) -> Result<ActivationAttempt, MachineError> {
    let request = DeployRequest {
        activate: Some((
            Some(generation.clone()),
            ActivateRequest {
                mode: mode.to_owned(),
                timeout,
                watchdog: None,
            },
        )),
        ..DeployRequest::default()
    };
    let report = only_phase(deploy(t, state_dir, &request, timeout).await?)?;
    report
        .started
        .map(|s| s.attempt)
        .ok_or_else(|| parse_error(t, "activate", ""))
}

/// Arms the confirmation watchdog for `attempt` (started by a deploy), as a
/// deploy's `arm` phase does right after the start.
pub async fn arm_confirmation<T: Target>(
    t: &T,
    state_dir: &str,
    attempt: &ActivationAttempt,
    previous: Option<&GenerationId>,
    mode: &str,
    confirm_timeout: Duration,
    timeout: Duration,
) -> Result<Confirmation, MachineError> {
    let state_dir = checked_state_dir(state_dir)?;
    let mode = checked_mode(mode)?;
    if !super::confirm::needs_confirmation(mode) {
        return Err(MachineError::NothingToConfirm {
            mode: mode.to_owned(),
        });
    }
    let watchdog = Watchdog {
        previous: previous.cloned(),
        confirm_timeout,
    };
    let name = attempt.generation.to_string();
    let mut args: Vec<String> = vec![
        state_dir.to_owned(),
        "attach".to_owned(),
        name,
        attempt.id.clone(),
    ];
    args.extend(arm_args(&watchdog, mode, timeout));
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let step = format!("arm confirmation of generation {}", attempt.generation);
    let output = run_script_input(
        t,
        &step,
        APPLY_SCRIPT,
        &arg_refs,
        &Input::default(),
        timeout,
    )
    .await?;
    if output.code == Some(EXIT_NOT_CURRENT) {
        return Err(MachineError::NotCurrent {
            target: t.describe(),
            generation: attempt.generation.clone(),
        });
    }
    let not_installed = previous
        .filter(|p| {
            output.code == Some(EXIT_NOT_INSTALLED) && output.stderr.contains(&p.to_string())
        })
        .unwrap_or(&attempt.generation);
    let output = super::script::require_success(t, &step, Some(not_installed), output)?;
    let rollback_id = output
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("converge-step arm "))
        .and_then(|rest| rest.split_whitespace().nth(2))
        .ok_or_else(|| parse_error(t, &step, &output.stdout))?;
    Ok(Confirmation {
        id: attempt.id.clone(),
        attempt: attempt.clone(),
        previous: previous.cloned(),
        mode: mode.to_owned(),
        timeout: confirm_timeout,
        rollback_id: rollback_id.to_owned(),
    })
}
