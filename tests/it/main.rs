//! The reconcile loop, end to end: the real `converge` binary against real
//! files in temporary directories, real child processes and real signals.
//! One scenario per file; `support` holds the shared fleet, command and
//! daemon helpers.

#![expect(
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test with its message; clippy.toml's \
              allow-expect-in-tests covers #[test] functions, not the helpers they share"
)]

mod activation_failure_rolls_back;
mod build_failure;
mod change_then_noop;
mod crash_safety;
mod drift;
mod health_check_failure_rolls_back;
mod invalid_yaml_while_daemon_runs;
mod role_settings;
mod shutdown_signals;
mod support;
mod transient_retry_backoff;
mod vm_bad_specs;
mod vm_guest_machine;
mod vm_quickstart;
mod vm_verbs;
