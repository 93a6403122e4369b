//! Observing a machine: its facts (host, boot, kernel, where `current`
//! points, which generations are complete or cut short) in one round trip of
//! `observe.sh`, or read in-process on the controller's own host; both judge
//! the same raw report the same way. It must not change anything on the
//! machine.

use std::path::Path;
use std::time::Duration;

use super::generation::{
    ActivationInProgress, ActivationState, CurrentLink, GenerationId, MachineError, MachineFacts,
    NixosFacts,
};
use super::script::{Script, checked_state_dir, now_ms, parse_error, require_success, run_script};
use crate::driver::target::{Target, TargetError};

const OBSERVE_SCRIPT: Script = Script {
    name: "converge-observe.sh",
    text: concat!(
        include_str!("scripts/lib.sh"),
        include_str!("scripts/observe.sh")
    ),
};

/// Reads the machine's facts in one round trip. A state directory that does
/// not exist yet is an empty one (`current` absent, no generations).
pub async fn observe<T: Target>(
    t: &T,
    state_dir: &str,
    timeout: Duration,
) -> Result<MachineFacts, MachineError> {
    const STEP: &str = "observe facts";
    let state_dir = checked_state_dir(state_dir)?;
    let output = run_script(t, STEP, OBSERVE_SCRIPT, &[state_dir], timeout).await?;
    let output = require_success(t, STEP, None, output)?;
    RawFacts::parse(&output.stdout)
        .into_facts(state_dir, now_ms())
        .ok_or_else(|| parse_error(t, STEP, &output.stdout))
}

/// [`observe`] for a state directory on the controller's own host, without
/// a process: the same facts `observe.sh` prints, read in-process (a few
/// small files and one directory listing, tens of microseconds instead of
/// a `sh` spawn of milliseconds). The reads run on tokio's blocking pool
/// within `timeout`, so a hung filesystem cannot stall the runtime.
pub async fn observe_local(
    state_dir: &str,
    timeout: Duration,
) -> Result<MachineFacts, MachineError> {
    const STEP: &str = "observe facts";
    const TARGET: &str = "local";
    let state_dir = checked_state_dir(state_dir)?.to_owned();
    let dir = state_dir.clone();
    let read = tokio::task::spawn_blocking(move || RawFacts::read_local(Path::new(&dir)));
    let raw = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(join_error)) => {
            return Err(MachineError::Target {
                step: STEP.to_owned(),
                target: TARGET.to_owned(),
                source: TargetError::Io {
                    target: TARGET.to_owned(),
                    action: "read facts under",
                    path: state_dir.into(),
                    source: std::io::Error::other(join_error),
                },
            });
        }
        Err(_elapsed) => {
            return Err(MachineError::Target {
                step: STEP.to_owned(),
                target: TARGET.to_owned(),
                source: TargetError::Timeout {
                    target: TARGET.to_owned(),
                    what: STEP.to_owned(),
                    after: timeout,
                },
            });
        }
    };
    // A host fact that could not be read fails as the script's output would.
    let unreadable = |what: String| MachineError::Parse {
        step: STEP.to_owned(),
        target: TARGET.to_owned(),
        output: what,
    };
    let missing: Vec<&str> = [
        ("hostname", raw.hostname.is_none()),
        ("boot_id", raw.boot_id.is_none()),
        ("uptime", raw.uptime_secs.is_none()),
        ("kernel", raw.kernel.is_none()),
    ]
    .into_iter()
    .filter_map(|(name, missing)| missing.then_some(name))
    .collect();
    if !missing.is_empty() {
        return Err(unreadable(format!("could not read {}", missing.join(", "))));
    }
    raw.into_facts(&state_dir, now_ms())
        .ok_or_else(|| unreadable("incomplete facts".to_owned()))
}

/// What `observe.sh` reports, before it is judged: one field per key of its
/// output. Filled either by parsing the script's output or, on the
/// controller's own host, by reading the same files in-process; both end in
/// [`RawFacts::into_facts`], so they cannot judge differently.
#[derive(Debug, Default)]
struct RawFacts {
    hostname: Option<String>,
    boot_id: Option<String>,
    uptime_secs: Option<u64>,
    kernel: Option<String>,
    /// The link text of `current`, when it is a symlink.
    current_text: Option<String>,
    /// `current/.complete` exists (through the link).
    current_complete: bool,
    /// `current` exists and is not a symlink.
    current_not_link: bool,
    /// The link text of `confirmed`, when it is a symlink.
    confirmed_text: Option<String>,
    /// `generation attempt state` of an activation in progress.
    activation: Option<String>,
    /// Directory names under `generations/` with `.complete`, and without.
    generations: Vec<String>,
    incomplete: Vec<String>,
    /// `readlink -f` of /run/current-system and /run/booted-system, when
    /// they name existing store paths.
    nixos_current: Option<String>,
    nixos_booted: Option<String>,
    nixos_needs_reboot: bool,
    /// The first line of `current/artifact/nixos-toplevel`.
    nixos_generation: Option<String>,
}

/// Whether `pid` names a live, not zombie, process of the boot `boot`, as
/// `alive` in lib.sh judges it.
fn process_alive(pid: &str, boot: &str, this_boot: Option<&str>) -> bool {
    if this_boot != Some(boot) {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// "12345.67": whole seconds are enough.
fn uptime_secs(text: &str) -> Option<u64> {
    text.split('.').next().and_then(|s| s.parse().ok())
}

impl RawFacts {
    /// Reads `observe.sh`'s `key=value` lines; unknown keys are ignored.
    fn parse(stdout: &str) -> RawFacts {
        let mut raw = RawFacts::default();
        for line in stdout.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "hostname" => raw.hostname = Some(value.to_owned()),
                "boot_id" => raw.boot_id = Some(value.to_owned()),
                "uptime" => raw.uptime_secs = uptime_secs(value),
                "kernel" => raw.kernel = Some(value.to_owned()),
                "current" => raw.current_text = Some(value.to_owned()),
                "current_complete" => raw.current_complete = value == "1",
                "current_not_link" => raw.current_not_link = value == "1",
                "confirmed" => raw.confirmed_text = Some(value.to_owned()),
                "activation" => raw.activation = Some(value.to_owned()),
                "generation" => raw.generations.push(value.to_owned()),
                "incomplete" => raw.incomplete.push(value.to_owned()),
                "nixos_current" => raw.nixos_current = Some(value.to_owned()),
                "nixos_booted" => raw.nixos_booted = Some(value.to_owned()),
                "nixos_needs_reboot" => raw.nixos_needs_reboot = value == "1",
                "nixos_generation" => raw.nixos_generation = Some(value.to_owned()),
                _ => {}
            }
        }
        raw
    }

    /// What `observe.sh` would print for `state_dir` on this host, read
    /// in-process. Mirrors the script line by line: a file it cannot read
    /// leaves its field empty (and the facts unparseable), an unreadable
    /// `generations/` lists nothing, names are whole directory entries.
    fn read_local(state_dir: &Path) -> RawFacts {
        use std::fs;
        // `read -r` and `$(...)` drop surrounding blanks and trailing newlines.
        let first_line = |path: &str| {
            fs::read_to_string(path)
                .ok()
                .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
        };
        let mut raw = RawFacts {
            // `uname -n` and `uname -r` read the UTS namespace these files show.
            hostname: first_line("/proc/sys/kernel/hostname"),
            boot_id: first_line("/proc/sys/kernel/random/boot_id"),
            uptime_secs: first_line("/proc/uptime")
                .and_then(|l| l.split_whitespace().next().and_then(uptime_secs)),
            kernel: first_line("/proc/sys/kernel/osrelease"),
            ..RawFacts::default()
        };
        let current = state_dir.join("current");
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let text = fs::read_link(&current)
                    .map(|t| t.to_string_lossy().trim_end_matches('\n').to_owned())
                    .unwrap_or_default();
                raw.current_text = Some(text);
                raw.current_complete = current.join(".complete").exists();
            }
            Ok(_) => raw.current_not_link = true,
            Err(_) => {}
        }
        let confirmed = state_dir.join("confirmed");
        if fs::symlink_metadata(&confirmed).is_ok_and(|m| m.file_type().is_symlink()) {
            raw.confirmed_text = fs::read_link(&confirmed)
                .ok()
                .map(|t| t.to_string_lossy().into_owned());
        }
        if let Ok(record) = fs::read_to_string(state_dir.join("activation/record")) {
            let words: Vec<&str> = record.split_whitespace().collect();
            if let [generation, attempt, pid, boot, ..] = words[..] {
                let state = if process_alive(pid, boot, raw.boot_id.as_deref()) {
                    "running"
                } else if state_dir
                    .join("generations")
                    .join(generation)
                    .join("activations")
                    .join(format!("{attempt}.status"))
                    .exists()
                {
                    "ended"
                } else {
                    "lost"
                };
                raw.activation = Some(format!("{generation} {attempt} {state}"));
            }
        }
        raw.read_local_nixos();
        raw.nixos_generation = std::fs::read_to_string(current.join("artifact/nixos-toplevel"))
            .ok()
            .and_then(|t| t.lines().next().map(|l| l.trim().to_owned()))
            .filter(|t| !t.is_empty());
        let Ok(entries) = fs::read_dir(state_dir.join("generations")) else {
            return raw;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            // The glob `*` skips hidden entries; `[ -d ] && [ ! -L ]` keeps real directories.
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || name.contains('\n') || name.contains(".partial-") {
                continue;
            }
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir {
                continue;
            }
            if entry.path().join(".complete").exists() {
                raw.generations.push(name.to_owned());
            } else {
                raw.incomplete.push(name.to_owned());
            }
        }
        raw
    }

    /// The NixOS lines of `observe.sh`, read in-process.
    fn read_local_nixos(&mut self) {
        let store_path = |link: &str| {
            std::fs::canonicalize(link)
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
                .filter(|p| p.starts_with("/nix/store/") && p.len() > "/nix/store/".len())
        };
        let Some(current) = store_path("/run/current-system") else {
            return;
        };
        if let Some(booted) = store_path("/run/booted-system") {
            let part =
                |system: &str, part: &str| std::fs::canonicalize(format!("{system}/{part}")).ok();
            self.nixos_needs_reboot = ["kernel", "initrd", "kernel-modules"]
                .iter()
                .any(|p| part(&current, p) != part(&booted, p));
            self.nixos_booted = Some(booted);
        }
        self.nixos_current = Some(current);
    }

    /// Judges the raw report: generations named `<n>-<hash>` only (other
    /// directories are not converge's), `current` healthy only when it links
    /// to a complete generation. `None` when a host fact is missing.
    fn into_facts(self, state_dir: &str, observed_ms: u64) -> Option<MachineFacts> {
        let mut generations: Vec<GenerationId> = self
            .generations
            .iter()
            .filter_map(|n| GenerationId::from_dir_name(n))
            .collect();
        let mut incomplete: Vec<GenerationId> = self
            .incomplete
            .iter()
            .filter_map(|n| GenerationId::from_dir_name(n))
            .collect();
        generations.sort();
        incomplete.sort();
        let current = match self.current_text {
            None if self.current_not_link => CurrentLink::Broken {
                target: "<not a symlink>".to_owned(),
                generation: None,
            },
            None => CurrentLink::Absent,
            Some(text) => {
                let absolute_prefix = format!("{state_dir}/generations/");
                let generation = text
                    .strip_prefix("generations/")
                    .or_else(|| text.strip_prefix(absolute_prefix.as_str()))
                    .and_then(|name| GenerationId::from_dir_name(name.trim_end_matches('/')));
                match generation {
                    Some(generation) if self.current_complete => {
                        CurrentLink::Generation { generation }
                    }
                    generation => CurrentLink::Broken {
                        target: text,
                        generation,
                    },
                }
            }
        };
        let generation_of = |text: &str| {
            let absolute_prefix = format!("{state_dir}/generations/");
            text.strip_prefix("generations/")
                .or_else(|| text.strip_prefix(absolute_prefix.as_str()))
                .and_then(|name| GenerationId::from_dir_name(name.trim_end_matches('/')))
        };
        let confirmed = self.confirmed_text.as_deref().and_then(generation_of);
        let activation = self.activation.as_deref().and_then(|text| {
            let mut words = text.split_whitespace();
            let generation = GenerationId::from_dir_name(words.next()?)?;
            let attempt = words.next()?.to_owned();
            let state = match words.next()? {
                "running" => ActivationState::Running,
                "ended" => ActivationState::Ended,
                _ => ActivationState::Lost,
            };
            Some(ActivationInProgress {
                generation,
                attempt,
                state,
            })
        });
        let nixos = self.nixos_current.map(|current_system| NixosFacts {
            current_system,
            booted_system: self.nixos_booted,
            generation_system: self.nixos_generation,
            needs_reboot: self.nixos_needs_reboot,
        });
        Some(MachineFacts {
            nixos,
            confirmed,
            activation,
            hostname: self.hostname?,
            boot_id: self.boot_id?,
            uptime_secs: self.uptime_secs?,
            kernel: self.kernel?,
            current,
            generations,
            incomplete,
            observed_ms,
        })
    }
}
