//! The real [`MachineDriver`]: the command builder plus the machine protocol
//! on the target a spec names.
//!
//! `target: {local: true}` runs on the controller's own host through
//! [`LocalTarget`]. SSH targets plug in here (a later release); until then
//! they are refused with a terminal error rather than guessed at.

use std::path::PathBuf;
use std::time::Duration;

use super::build::{Artifact, BuildRequest, CommandBuilder};
use super::capability::{DriverError, MachineDriver};
use super::local::LocalTarget;
use super::machine::{self, ActivationResult, GenerationId, InstallOutcome, MachineFacts};
use super::CommandOutput;
use crate::spec::Target as TargetSpec;

/// Builds in `cache_dir`; reaches targets as their spec says.
#[derive(Debug, Clone)]
pub struct HostDriver {
    builder: CommandBuilder,
    local: LocalTarget,
}

impl HostDriver {
    pub fn new(cache_dir: impl Into<PathBuf>) -> HostDriver {
        HostDriver {
            builder: CommandBuilder::new(cache_dir),
            local: LocalTarget::new("local"),
        }
    }

    fn local_for(&self, target: &TargetSpec) -> Result<&LocalTarget, DriverError> {
        if target.is_local() {
            Ok(&self.local)
        } else {
            Err(DriverError::Unsupported {
                what: "SSH targets (target.host)".to_owned(),
            })
        }
    }
}

impl MachineDriver for HostDriver {
    async fn observe(&self, target: &TargetSpec, timeout: Duration) -> Result<MachineFacts, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::observe(t, target.state_dir(), timeout).await?)
    }

    async fn build(&self, request: &BuildRequest) -> Result<Artifact, DriverError> {
        Ok(self.builder.build(request).await?)
    }

    async fn install(
        &self,
        target: &TargetSpec,
        artifact: &Artifact,
        roles_json: &[u8],
        generation: &GenerationId,
        timeout: Duration,
    ) -> Result<InstallOutcome, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::install(t, target.state_dir(), &artifact.path, roles_json, generation, timeout).await?)
    }

    async fn switch(&self, target: &TargetSpec, generation: &GenerationId, timeout: Duration) -> Result<(), DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::switch(t, target.state_dir(), generation, timeout).await?)
    }

    async fn activate(
        &self,
        target: &TargetSpec,
        generation: &GenerationId,
        mode: &str,
        timeout: Duration,
    ) -> Result<ActivationResult, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::activate(t, target.state_dir(), generation, mode, timeout).await?)
    }

    async fn health_check(&self, target: &TargetSpec, argv: &[String], timeout: Duration) -> Result<CommandOutput, DriverError> {
        let t = self.local_for(target)?;
        Ok(machine::health_check(t, argv, timeout).await?)
    }
}
