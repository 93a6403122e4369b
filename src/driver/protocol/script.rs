//! What every protocol step shares: the checked state directory and the
//! paths under it, one time budget for a step's round trips ([`Deadline`]),
//! running one embedded script with its inputs as positional arguments, and
//! judging its exit code and output. It must not know any particular step
//! or script, and must never build a shell string: the script is a constant
//! sent on stdin and every input is an argument or stdin.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::generation::{GenerationId, MachineError};
use crate::driver::target::{CommandOutput, Input, NO_INPUT, Target, TargetError};

/// Exit code of the switch and activate scripts for "generation not complete".
pub(super) const EXIT_NOT_INSTALLED: i32 = 3;

/// One time budget shared by the round trips of a step.
pub(super) struct Deadline {
    end: Instant,
    total: Duration,
}

impl Deadline {
    pub(super) fn new(total: Duration) -> Self {
        Self {
            end: Instant::now() + total,
            total,
        }
    }

    /// Time left, or the timeout error for `step` when none is.
    pub(super) fn left<T: Target>(&self, t: &T, step: &str) -> Result<Duration, MachineError> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(MachineError::Target {
                step: step.to_owned(),
                target: t.describe(),
                source: TargetError::Timeout {
                    target: t.describe(),
                    what: step.to_owned(),
                    after: self.total,
                },
            })
        } else {
            Ok(left)
        }
    }
}

/// The state directory without trailing slashes, when it is usable: an
/// absolute path, or one in the login's home (`~/…`, which the script's
/// bootstrap resolves on the target).
pub(super) fn checked_state_dir(state_dir: &str) -> Result<&str, MachineError> {
    let trimmed = state_dir.trim_end_matches('/');
    let rooted = trimmed.starts_with('/')
        || trimmed
            .strip_prefix("~/")
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    let valid = rooted && !trimmed.contains(['\n', '\0']);
    if valid {
        Ok(trimmed)
    } else {
        Err(MachineError::InvalidStateDir {
            state_dir: state_dir.to_owned(),
        })
    }
}

/// A protocol script: its text, which travels on stdin ahead of the
/// script's own input, and the name its shell runs under (`$0`, what `ps`
/// shows). Not argv: sshd's limit on a command's length is small on some
/// servers (dropbear: 9,000 bytes), and argv is readable by every user.
#[derive(Debug, Clone, Copy)]
pub(super) struct Script {
    pub(super) name: &'static str,
    pub(super) text: &'static str,
}

/// The whole command line of every protocol script: reads the script's
/// `$1` bytes from stdin (exactly: `dd` with `count_bytes,fullblock`, in
/// GNU coreutils and busybox; `head -c` of busybox reads ahead) and runs
/// them with the remaining arguments. A first argument `~/PATH` (a state
/// directory in the login's home) becomes `$HOME/PATH`. The script finds
/// its own text in `$converge_script`, to start itself detached.
const BOOTSTRAP: &str = r#"converge_script=$(dd bs=65536 count="$1" iflag=count_bytes,fullblock status=none) || {
	echo "converge: cannot read the protocol script from stdin (it needs dd with iflag=count_bytes,fullblock: GNU coreutils 8.16+ or busybox)" >&2
	exit 125
}
shift
case ${1-} in
"~/"*)
	converge_home=$HOME/${1#??}
	shift
	set -- "$converge_home" "$@"
	;;
esac
eval "$converge_script""#;

/// Runs a constant script on the target with `args` as `$1...`; any exit
/// code is returned for the caller to judge.
pub(super) async fn run_script<T: Target>(
    t: &T,
    step: &str,
    script: Script,
    args: &[&str],
    timeout: Duration,
) -> Result<CommandOutput, MachineError> {
    run_script_input(t, step, script, args, &NO_INPUT, timeout).await
}

/// [`run_script`] with `input` on its stdin after the script (documents
/// travel there, never in argv, where every user of the target could read
/// them).
pub(super) async fn run_script_input<T: Target>(
    t: &T,
    step: &str,
    script: Script,
    args: &[&str],
    input: &Input,
    timeout: Duration,
) -> Result<CommandOutput, MachineError> {
    let (argv, stdin) = script_command(script, args, input);
    t.run_input(&argv, &[], &stdin, timeout)
        .await
        .map_err(|source| MachineError::Target {
            step: step.to_owned(),
            target: t.describe(),
            source,
        })
}

/// The argv and stdin that run `script` with `args` as `$1...` and `input`
/// on its stdin after the script's text.
pub(super) fn script_command(script: Script, args: &[&str], input: &Input) -> (Vec<String>, Input) {
    let mut argv = Vec::with_capacity(args.len() + 5);
    argv.extend(["sh", "-c", BOOTSTRAP, script.name].map(str::to_owned));
    argv.push(script.text.len().to_string());
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    let mut stdin = Input::bytes(script.text);
    stdin.append(input);
    (argv, stdin)
}

/// Turns a non-zero exit into [`MachineError::Script`] (or `NotInstalled`).
pub(super) fn require_success<T: Target>(
    t: &T,
    step: &str,
    generation: Option<&GenerationId>,
    output: CommandOutput,
) -> Result<CommandOutput, MachineError> {
    match (output.code, generation) {
        (Some(0), _) => Ok(output),
        (Some(EXIT_NOT_INSTALLED), Some(generation)) => Err(MachineError::NotInstalled {
            target: t.describe(),
            generation: generation.clone(),
        }),
        (code, _) => Err(MachineError::Script {
            step: step.to_owned(),
            target: t.describe(),
            code,
            stderr: output.stderr.trim_end().to_owned(),
        }),
    }
}

pub(super) fn parse_error<T: Target>(t: &T, step: &str, output: &str) -> MachineError {
    MachineError::Parse {
        step: step.to_owned(),
        target: t.describe(),
        output: output.chars().take(2000).collect(),
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
