//! Pruning generations: keeps the newest complete ones, the protected ones
//! and the one `current` points at, and removes the rest (incomplete ones
//! included) after one observation. It must not run while an install on the
//! same state directory runs, and must never remove what `current` names.

use std::time::Duration;

use super::generation::{CurrentLink, GenerationId, MachineError};
use super::observe::observe;
use super::script::{Deadline, Script, checked_state_dir, require_success, run_script};
use crate::driver::target::Target;

const PRUNE_SCRIPT: Script = Script {
    name: "converge-prune.sh",
    text: include_str!("scripts/prune.sh"),
};

/// Removes old generations and returns the ones removed: keeps the `keep`
/// newest complete generations, every generation in `protect` and the one
/// `current` points at (even through a broken link); removes the other
/// complete ones and every incomplete one. Two round trips (observe, remove).
/// Must not run while an install on the same state directory runs.
pub async fn prune<T: Target>(
    t: &T,
    state_dir: &str,
    keep: usize,
    protect: &[GenerationId],
    timeout: Duration,
) -> Result<Vec<GenerationId>, MachineError> {
    const STEP: &str = "prune generations";
    let deadline = Deadline::new(timeout);
    let facts = observe(t, state_dir, timeout).await?;
    let state_dir = checked_state_dir(state_dir)?;
    let current = match &facts.current {
        CurrentLink::Generation { generation } => Some(generation),
        CurrentLink::Broken { generation, .. } => generation.as_ref(),
        CurrentLink::Absent => None,
    };
    let mut complete = facts.generations.clone();
    complete.sort_by(|a, b| b.cmp(a));
    let removed: Vec<GenerationId> = complete
        .into_iter()
        .skip(keep)
        .chain(facts.incomplete.iter().cloned())
        .filter(|generation| Some(generation) != current && !protect.contains(generation))
        .collect();
    if removed.is_empty() {
        return Ok(removed);
    }
    let names: Vec<String> = removed.iter().map(ToString::to_string).collect();
    let mut args = vec![state_dir];
    args.extend(names.iter().map(String::as_str));
    let output = run_script(t, STEP, PRUNE_SCRIPT, &args, deadline.left(t, STEP)?).await?;
    require_success(t, STEP, None, output)?;
    Ok(removed)
}
