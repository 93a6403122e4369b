//! The SSH target and the machine protocol over it, per host, on 20 testbed
//! hosts (real sshd in network namespaces): a fresh connect with its first
//! command, then 10 commands and 10 observes over the multiplexed master on
//! each host (median, min, max over all), observe on all 20 at once with
//! warm masters, and a first command on all 20 at once with fresh masters.
//! Needs root, iproute2, util-linux and OpenSSH (the testbed's
//! prerequisites).
//!
//! Run in release: `cargo run --release -p converge-bench --bin bench-ssh`.
//! Prints numbers; asserts only that every command and observe succeeded.

use std::time::{Duration, Instant};

use converge::driver::Target;
use converge::driver::protocol;
use converge::driver::ssh::{SshOptions, SshTarget};
use testbed::{REMOTE_STATE_DIR, Testbed};

const HOSTS: usize = 20;
const ROUNDS: usize = 10;
const T: Duration = Duration::from_secs(30);

/// converge's client options for host `i` of `testbed`: its key and host
/// key, an empty user ssh_config, a short control directory.
fn options(testbed: &Testbed, i: usize) -> SshOptions {
    let client = testbed.client(i);
    let mut options = SshOptions::new(client.address.clone(), client.control_dir.clone());
    options.port = client.port;
    options.host_key = Some(client.host_key.clone());
    options.identity_file = Some(client.identity_file.clone());
    options.ssh_config = Some(client.ssh_config.clone());
    options
}

fn print_times(name: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{name:26} median {:>9.2?} min {:>9.2?} max {:>9.2?}",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let testbed = Testbed::new(HOSTS);
    let targets = (0..HOSTS)
        .map(|i| SshTarget::new(options(&testbed, i)))
        .collect::<Result<Vec<_>, _>>()?;
    let argv = ["true".to_owned()];
    let (mut connect, mut command, mut observe) = (vec![], vec![], vec![]);
    for t in &targets {
        let s = Instant::now();
        t.run(&argv, &[], T).await?;
        connect.push(s.elapsed());
        for _ in 0..ROUNDS {
            let s = Instant::now();
            t.run(&argv, &[], T).await?;
            command.push(s.elapsed());
            let s = Instant::now();
            protocol::observe(t, REMOTE_STATE_DIR, T).await?;
            observe.push(s.elapsed());
        }
    }

    let fleet = Instant::now();
    let observes = targets
        .iter()
        .map(|t| protocol::observe(t, REMOTE_STATE_DIR, T));
    for observed in futures::future::join_all(observes).await {
        observed?;
    }
    let fleet_observe = fleet.elapsed();

    let fresh: Vec<SshTarget> = targets.iter().map(SshTarget::fresh).collect();
    let fleet = Instant::now();
    for ran in futures::future::join_all(fresh.iter().map(|t| t.run(&argv, &[], T))).await {
        ran?;
    }
    let fleet_connect = fleet.elapsed();

    println!("SSH targets on {HOSTS} testbed hosts, {ROUNDS} rounds each");
    print_times("fresh connect + command", connect);
    print_times("command over master", command);
    print_times("observe over master", observe);
    println!("observe {HOSTS} hosts at once (warm masters): {fleet_observe:.2?}");
    println!("connect {HOSTS} hosts at once (fresh masters): {fleet_connect:.2?}");
    Ok(())
}
