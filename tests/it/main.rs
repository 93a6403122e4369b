//! converge's one integration binary: the real `converge` binary and library
//! against real files, real child processes and signals, real sshd hosts in
//! network namespaces (the `testbed` crate) and real qemu. One scenario per
//! file; `support` holds the shared fleets, commands and polls. The SSH
//! scenarios need root, iproute2 and openssh-server (`scripts/setup`).

#![expect(
    clippy::expect_used,
    reason = "test code: a failed expectation fails the test with its message; clippy.toml's \
              allow-expect-in-tests covers #[test] functions, not the helpers they share"
)]

mod activation_failure;
mod activation_failure_rolls_back;
mod build_failure;
mod build_writes_directory;
mod change_then_noop;
mod crash_reattach;
mod crash_safety;
mod daemon_periodic_reread;
mod daemon_sighup;
mod daemon_stale_socket;
mod damaged_store;
mod deploy_units;
mod drift;
mod events_follow;
mod examples;
mod frozen_sshd;
mod fuzz;
mod git_source;
mod git_source_once;
mod git_source_tells;
mod guest_harness;
mod health_check_failure;
mod health_check_failure_rolls_back;
mod healthz;
mod hidden_parent_directory;
mod hostile_directory;
mod hung_activation;
mod incremental;
mod invalid_inputs;
mod invalid_yaml_while_daemon_runs;
mod keep_generations;
mod least_privilege;
mod link_down;
mod link_down_during_upload;
mod metrics_content_type;
mod nixos;
mod no_sftp;
mod notifications;
mod once_timeout_bounds_loading;
mod once_timeout_cuts_an_attempt;
mod plan_is_what_runs;
mod plan_other_dir_with_daemon;
mod progress_display;
mod protocol_over_ssh;
mod reconcile_unknown_key;
mod remote_hypervisor;
mod retry_held_through_the_daemon;
mod role_settings;
mod roles;
mod schemas;
mod service_members;
mod shutdown_signals;
mod soak_kills_during_activations;
mod source_cache;
mod ssh_control_dir;
mod sshd_killed_during_activation;
mod store_across_processes;
mod support;
mod suspend_resume;
mod testbed_harness;
mod tidy;
mod transient_retry_backoff;
mod twenty_hosts;
mod vm_bad_specs;
mod vm_guest_machine;
mod vm_power_verbs;
mod vm_quickstart;
mod vm_verbs;
mod wrong_host_key;
