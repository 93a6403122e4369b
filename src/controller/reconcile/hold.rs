//! Holding a machine's artifact: after a rollback, or a build that wrote
//! into the desired-state directory, the artifact is not activated again
//! until its inputs (spec, roles document, build input) change or an
//! operator releases it (`reconcile --retry`). This file says what a hold
//! records and whether it still holds; it must not run or plan anything.

use std::path::Path;

use crate::controller::error::ReconcileError;
use crate::driver::protocol::GenerationId;
use crate::store::records::{Held, Reason};

/// The identity of what an artifact is built from: spec, roles document and
/// build input. A held artifact stays held while this is the same.
pub(super) fn inputs_identity(spec_hash: &str, roles_hash: &str, build_input: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [spec_hash, roles_hash, build_input] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().to_hex()[..32].to_owned()
}

/// Whether `held` still holds for inputs whose identity is `inputs` (for a
/// hold that leaves files out, the build input is computed again without
/// them).
pub(super) fn still_held(
    held: &Held,
    spec_hash: &str,
    roles_hash: &str,
    inputs: &str,
    root: &Path,
) -> bool {
    if held.excluded.is_empty() {
        return held.inputs == inputs;
    }
    // A directory that cannot be hashed cannot be the one the hold was for.
    match crate::source::content_hash_excluding(root, &held.excluded) {
        Ok(build_input) => held.inputs == inputs_identity(spec_hash, roles_hash, &build_input),
        Err(_) => false,
    }
}

/// The hold a failed attempt leaves, when its error is one that holds:
/// `inputs` is the identity the attempt ran with (recomputed without the
/// files a build wrote, which change at every build).
pub(super) fn hold(
    error: &ReconcileError,
    generation: Option<&GenerationId>,
    inputs: String,
    spec_hash: &str,
    roles_hash: &str,
    root: &Path,
    now_ms: u64,
) -> Option<Held> {
    let (reason, message, excluded) = match error {
        ReconcileError::RolledBack { .. } => (
            Reason::RolledBack,
            format!(
                "generation {} was rolled back ({})",
                generation.map(ToString::to_string).unwrap_or_default(),
                error.cause_reason()
            ),
            Vec::new(),
        ),
        ReconcileError::BuildChangedDirectory { files } => (
            Reason::BuildChangedDirectory,
            format!(
                "its build changed files in the desired-state directory ({})",
                files.join(", ")
            ),
            files.clone(),
        ),
        _ => return None,
    };
    let inputs = if excluded.is_empty() {
        inputs
    } else {
        match crate::source::content_hash_excluding(root, &excluded) {
            Ok(build_input) => inputs_identity(spec_hash, roles_hash, &build_input),
            Err(_) => inputs,
        }
    };
    Some(Held {
        reason,
        message,
        generation: generation.map(ToString::to_string),
        inputs,
        excluded,
        since_ms: now_ms,
    })
}
