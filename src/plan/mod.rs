//! Plans: what converge would do to take facts to spec, object by object.
//!
//! `diff` compares, for one object, the spec in the YAML with the spec last
//! applied (from the store) and the facts just observed, and returns the
//! change to make (create, update, replace, destroy, forget, correct) with
//! the fields that changed and the exact [`Step`]s it takes, plus any drift.
//! `converge plan` renders the whole plan; reconcile executes the same
//! change's steps and records them under the same names, so the preview and
//! the action cannot disagree. Pure and deterministic: no IO, no tokio.
//!
//! This file only gathers the parts: `model` (the types), `diff` (the
//! decisions), `render` (the text form).

mod diff;
mod model;
mod render;

pub use diff::{
    Applied, Desired, DesiredKind, MachineDesired, Observed, VmDesired, VmObserved, diff,
};
pub use model::{Change, ChangeKind, Drift, FieldChange, NixosChange, Plan, ROLLBACK_STEP, Step};
pub use render::render_text;

#[cfg(test)]
mod tests;
