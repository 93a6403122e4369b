//! Installing a generation: its artifact (uploaded only when no complete
//! generation on the target has the same hash) and its roles document
//! (inline, or uploaded when large), then `.complete` last. It must never
//! touch `current`, and must never leave a generation directory that looks
//! complete but is not.

use std::path::Path;
use std::time::Duration;

use super::generation::{GenerationId, InstallOutcome, MachineError};
use super::script::{
    Deadline, checked_state_dir, generation_dir, parse_error, require_success, run_script,
};
use crate::driver::command::unique_suffix;
use crate::driver::target::Target;

/// Roles documents up to this size travel as a command argument (one round
/// trip); larger ones are uploaded. Kept well under Linux's 128 KiB limit on
/// one argument, which also bounds a whole command line sent over SSH.
const INLINE_ROLES_LIMIT: usize = 64 * 1024;
const INSTALL_SCRIPT: &str = include_str!("scripts/install.sh");

/// Puts `generation` on the target: its artifact (the local tree `artifact`,
/// whose tree hash the caller vouches is `generation.hash()`) and the roles
/// document, then the `.complete` marker last. Never touches `current`.
///
/// Nothing happens when the generation is already complete. When another
/// complete generation with the same hash exists, its artifact is copied on
/// the target instead of uploading. An incomplete directory left by an
/// earlier attempt is removed first. One round trip when nothing needs
/// uploading; otherwise two plus the upload (three for a roles document over
/// 64 KiB, which is uploaded too).
pub async fn install<T: Target>(
    t: &T,
    state_dir: &str,
    artifact: &Path,
    roles_json: &[u8],
    generation: &GenerationId,
    timeout: Duration,
) -> Result<InstallOutcome, MachineError> {
    let step = format!("install generation {generation}");
    let state_dir = checked_state_dir(state_dir)?;
    let roles = std::str::from_utf8(roles_json).map_err(|source| MachineError::InvalidRoles {
        generation: generation.clone(),
        source,
    })?;
    let deadline = Deadline::new(timeout);
    let name = generation.to_string();
    let dir = generation_dir(state_dir, generation);
    let inline = roles.len() <= INLINE_ROLES_LIMIT;
    let mut args = vec![
        "prepare",
        state_dir,
        name.as_str(),
        generation.hash(),
        if inline { "inline" } else { "staged" },
    ];
    if inline {
        args.push(roles);
    }

    let prepared = run_script(t, &step, INSTALL_SCRIPT, &args, deadline.left(t, &step)?).await?;
    let prepared = require_success(t, &step, None, prepared)?;
    let outcome = match prepared.stdout.trim() {
        "present" => return Ok(InstallOutcome::AlreadyPresent),
        "installed" => return Ok(InstallOutcome::CopiedOnTarget),
        "copied" => InstallOutcome::CopiedOnTarget,
        "upload" => {
            let dest = format!("{dir}/artifact");
            t.upload_dir(artifact, &dest, deadline.left(t, &step)?)
                .await
                .map_err(|source| MachineError::Target {
                    step: step.clone(),
                    target: t.describe(),
                    source,
                })?;
            InstallOutcome::Uploaded
        }
        _ => return Err(parse_error(t, &step, &prepared.stdout)),
    };
    if !inline {
        upload_roles(t, &step, roles_json, &dir, &deadline).await?;
    }
    args[0] = "finish";
    let finished = run_script(t, &step, INSTALL_SCRIPT, &args, deadline.left(t, &step)?).await?;
    require_success(t, &step, None, finished)?;
    Ok(outcome)
}

/// Uploads a large roles document as `<dir>/.roles-staged/roles.json`.
async fn upload_roles<T: Target>(
    t: &T,
    step: &str,
    roles_json: &[u8],
    dir: &str,
    deadline: &Deadline,
) -> Result<(), MachineError> {
    let staging = std::env::temp_dir().join(format!("converge-roles-{}", unique_suffix()));
    let stage = async {
        tokio::fs::create_dir(&staging).await?;
        tokio::fs::write(staging.join("roles.json"), roles_json).await
    };
    let staged = stage.await.map_err(|source| MachineError::Stage {
        path: staging.clone(),
        source,
    });
    let uploaded = match staged {
        Ok(()) => {
            let dest = format!("{dir}/.roles-staged");
            match deadline.left(t, step) {
                Ok(left) => t.upload_dir(&staging, &dest, left).await.map_err(|source| {
                    MachineError::Target {
                        step: step.to_owned(),
                        target: t.describe(),
                        source,
                    }
                }),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };
    if let Err(error) = tokio::fs::remove_dir_all(&staging).await {
        tracing::warn!(path = %staging.display(), %error, "could not remove a staged roles document");
    }
    uploaded
}
