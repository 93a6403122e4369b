//! The capabilities the controller uses, as traits, and their one error type.
//!
//! The controller is generic over [`MachineDriver`]: the real one
//! ([`super::host::HostDriver`]) builds with the command builder and runs the
//! machine protocol on a local (or, later, SSH) target; tests use fakes.
//! Errors keep their source and answer `is_transient()`; the controller's
//! error policy decides what to do with that.

use std::future::Future;
use std::time::Duration;

use super::build::{Artifact, BuildError, BuildRequest};
use super::machine::{ActivationResult, GenerationId, InstallOutcome, MachineError, MachineFacts};
use super::{CommandOutput, TargetError};
use crate::spec::Target as TargetSpec;

/// Why a driver step failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("use {what}: not supported by this converge yet")]
    Unsupported { what: String },
}

impl DriverError {
    /// Whether trying again later can succeed without a spec change.
    pub fn is_transient(&self) -> bool {
        match self {
            DriverError::Target(e) => e.is_transient(),
            DriverError::Build(e) => e.is_transient(),
            DriverError::Machine(e) => e.is_transient(),
            DriverError::Unsupported { .. } => false,
        }
    }

    /// A health check that failed or timed out (as opposed to a transport error).
    pub fn is_health_failure(&self) -> bool {
        matches!(self, DriverError::Machine(e) if e.is_health_failure())
    }

    /// The build's output, when a build failed.
    pub fn build_output(&self) -> Option<&str> {
        match self {
            DriverError::Build(e) => e.output(),
            _ => None,
        }
    }
}

/// Everything the controller does to a machine.
pub trait MachineDriver: Send + Sync + 'static {
    /// Reads the machine's facts (one round trip).
    fn observe(
        &self,
        target: &TargetSpec,
        timeout: Duration,
    ) -> impl Future<Output = Result<MachineFacts, DriverError>> + Send;

    /// Builds (or finds in the cache) the machine's artifact.
    fn build(&self, request: &BuildRequest) -> impl Future<Output = Result<Artifact, DriverError>> + Send;

    /// Writes a generation to the target (uploading only what it lacks).
    fn install(
        &self,
        target: &TargetSpec,
        artifact: &Artifact,
        roles_json: &[u8],
        generation: &GenerationId,
        timeout: Duration,
    ) -> impl Future<Output = Result<InstallOutcome, DriverError>> + Send;

    /// Points `current` at a generation, atomically.
    fn switch(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), DriverError>> + Send;

    /// Runs the generation's `activate MODE`, detached on the target, and waits for its result.
    fn activate(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        mode: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<ActivationResult, DriverError>> + Send;

    /// Runs one health check; Ok only for exit code 0.
    fn health_check(
        &self,
        target: &TargetSpec,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<CommandOutput, DriverError>> + Send;
}
