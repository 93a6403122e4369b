//! The SSH fleet, end to end: the real `converge` binary against real sshd
//! hosts in network namespaces (the crate's testbed, included by path), with
//! real faults: link down, sshd frozen, wrong host key, failing activation
//! and health checks. One scenario per file; `support` holds the fleet,
//! command and poll helpers. Needs root, iproute2 and openssh-server.

#![expect(
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test with its message; clippy.toml's \
              allow-expect-in-tests covers #[test] functions, not the helpers they share"
)]

/// The testbed's `use crate::driver::ssh::SshOptions;` resolves through this.
mod driver {
    pub use converge::driver::ssh;
}

#[path = "../../src/testbed.rs"]
#[allow(
    unfulfilled_lint_expectations,
    reason = "the testbed expects dead code for accessors this binary may use"
)]
#[allow(dead_code, reason = "not every testbed helper is used here")]
mod testbed;

mod activation_failure;
mod bench;
mod bench_remote_vm;
mod frozen_sshd;
mod health_check_failure;
mod link_down;
mod link_down_during_upload;
mod remote_hypervisor;
mod sshd_killed_during_activation;
mod support;
mod twenty_hosts;
mod wrong_host_key;
