//! converge: a Kubernetes-style reconciliation controller for machines, QEMU
//! virtual machines and service roles, driven by YAML in a Git repository.
//!
//! The binary is a thin shell over this library; ARCHITECTURE.md maps the
//! modules and the rules between them.

pub mod api;
pub mod cli;
pub mod controller;
pub mod driver;
pub mod plan;
pub mod source;
pub mod spec;
pub mod store;
pub mod telemetry;
