//! SSH fleets for scenarios: the testbed's fleet with this build's binary.

pub use testbed::fleet::*;

/// A fleet of `n` fresh SSH hosts running this build's `converge`.
pub fn fleet(n: usize) -> SshFleet {
    SshFleet::new(super::BIN, n)
}

/// converge's client options for host `i` of `testbed`: its key and host
/// key, an empty user ssh_config, a short control directory.
pub fn options(testbed: &testbed::Testbed, i: usize) -> converge::driver::ssh::SshOptions {
    let client = testbed.client(i);
    let mut options =
        converge::driver::ssh::SshOptions::new(client.address.clone(), client.control_dir.clone());
    options.port = client.port;
    options.host_key = Some(client.host_key.clone());
    options.identity_file = Some(client.identity_file.clone());
    options.ssh_config = Some(client.ssh_config.clone());
    options
}

/// A fleet of `n` fresh SSH hosts whose sshd is configured by `options`.
pub fn fleet_with(n: usize, options: testbed::Options) -> SshFleet {
    SshFleet::on(super::BIN, testbed::Testbed::with_options(n, options))
}
