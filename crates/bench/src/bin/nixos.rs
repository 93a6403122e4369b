//! `bench-nixos`: NixOS machines on 10 testbed hosts, each with its own
//! /nix (root; Debian's nix-bin). Fake systems built by real Nix (no
//! nixpkgs offline): each closure is 50 store paths, ~20 MB, of which an
//! update changes one (the toplevel). Measures converge's first deploy,
//! one-path update, no-op run and plan of the unchanged fleet (with the
//! `nix` calls each made, counted by a wrapper on PATH), evaluation cold
//! against Nix's own warm store, and beside them the floor in the same run:
//! a parallel shell loop of `nix copy` then `ssh switch-to-configuration`,
//! and the same loop serial, each on fresh hosts. Runs the converge binary
//! `CONVERGE_BIN` names (default target/debug/converge). Prints numbers;
//! asserts only that the work was done.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testbed::fleet::SshFleet as Fleet;
use testbed::nix::{
    FakeSystem, OFFLINE_NIX_CONFIG, build_system, calls, counting_wrapper, fake_flake,
    link_run_systems, resolve_in,
};
use testbed::run::Converge as _;
use testbed::{REMOTE_STATE_DIR, Testbed};

const N: usize = 10;
/// Blobs per closure; with the kernel and the toplevel, 50 paths.
const BLOBS: usize = 48;
/// Size of each blob: 48 x 420 KiB is about 20 MB (plus a few KiB that
/// differ per run, so the first deploy evaluates and builds cold).
const KIB: usize = 420;

fn kib() -> usize {
    KIB + std::process::id() as usize % 16
}

fn systems(variant: &str) -> Vec<FakeSystem> {
    (0..N)
        .map(|i| FakeSystem {
            paths: BLOBS,
            kib: kib(),
            ..FakeSystem::new(&format!("host{i}"), variant)
        })
        .collect()
}

fn machine(fleet: &Fleet, i: usize) -> String {
    let host = fleet.testbed.host(i);
    format!(
        "apiVersion: converge/v1\nkind: Machine\nmetadata:\n  name: host{i}\nspec:\n  target: {{host: {addr}, port: {port}, user: root, hostKey: {key:?}, identityFile: {identity:?}, stateDir: {REMOTE_STATE_DIR}}}\n  build: {{nix: {{flake: \".\"}}, timeout: 10m}}\n",
        addr = host.address,
        port = host.port,
        key = host.host_key,
        identity = fleet
            .testbed
            .client(i)
            .identity_file
            .to_str()
            .expect("utf-8"),
    )
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The floor: per host, `nix copy` of its system then `ssh` running
/// `nix-env --set` and `switch-to-configuration switch`, over one master
/// per host, all hosts at once (`parallel`) or one after another.
fn floor(testbed: &Testbed, systems: &[String], parallel: bool) -> Duration {
    let dir = testbed.dir().join("floor");
    fs::create_dir_all(&dir).expect("mkdir");
    let known_hosts = dir.join("known_hosts");
    let lines: String = testbed
        .hosts()
        .iter()
        .map(|h| format!("{} {}\n", h.address, h.host_key))
        .collect();
    fs::write(&known_hosts, lines).expect("write known_hosts");
    let client = testbed.client(0);
    let ssh_options = format!(
        "-F {} -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o ControlMaster=auto -o ControlPath={}/%C -o ControlPersist=30",
        client.ssh_config.display(),
        client.identity_file.display(),
        known_hosts.display(),
        dir.display(),
    );
    let script = "set -e\nnix --extra-experimental-features 'nix-command flakes' copy --to ssh://root@$1 $2\nssh $NIX_SSHOPTS -n root@$1 \"nix-env -p /nix/var/nix/profiles/system --set $2 && $2/bin/switch-to-configuration switch\"\n";
    let started = Instant::now();
    let run = |i: usize| {
        Command::new("sh")
            .args(["-c", script, "floor", &testbed.host(i).address, &systems[i]])
            .env("NIX_SSHOPTS", &ssh_options)
            .env("NIX_CONFIG", OFFLINE_NIX_CONFIG)
            .stdin(Stdio::null())
            .spawn()
            .expect("run the floor's loop")
    };
    let ok = |mut child: std::process::Child| {
        assert!(child.wait().expect("wait").success(), "the floor failed");
    };
    if parallel {
        let children: Vec<_> = (0..N).map(run).collect();
        children.into_iter().for_each(ok);
    } else {
        (0..N).map(run).for_each(ok);
    }
    started.elapsed()
}

fn main() {
    link_run_systems();
    let bin = std::env::var("CONVERGE_BIN").unwrap_or_else(|_| "target/debug/converge".to_owned());
    let fleet = Fleet::with_private_nix(bin, N);
    let wrapper = fleet.root().join("bin");
    fleet.set_env("PATH", &counting_wrapper(&wrapper));
    fleet.set_env("NIX_CONFIG", OFFLINE_NIX_CONFIG);
    let dir = fleet.dir();
    fs::write(dir.join("flake.nix"), fake_flake(&systems("v1"))).expect("write flake.nix");
    for i in 0..N {
        fleet.write_machine(i, &machine(&fleet, i));
    }
    let args = ["--concurrency", "10"];

    let first = fleet.reconcile_once(&args);
    first.assert_code(0);
    let first_calls = calls(&wrapper).len();
    let v1: Vec<String> = (0..N)
        .map(|i| build_system(&dir, &format!("host{i}")))
        .collect();
    for (i, system) in v1.iter().enumerate() {
        let nix = fleet.testbed.host(i).dir().join("nix");
        assert_eq!(
            resolve_in(&nix, "/nix/var/nix/current-system").as_ref(),
            Some(system)
        );
    }

    let noop = fleet.reconcile_once(&args);
    noop.assert_code(0);
    let noop_calls = calls(&wrapper).len() - first_calls;
    let state = fleet.state();
    let ssh_config = fleet.ssh_config();
    let plan_args = [
        "plan",
        "--dir",
        dir.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
        "--ssh-config",
        ssh_config.to_str().expect("utf-8"),
    ];
    let plan = fleet.converge_within(&plan_args, testbed::fleet::COMMAND_LIMIT);
    assert_eq!(plan.code, Some(0), "{}", plan.stderr);
    let plan_calls = calls(&wrapper).len() - first_calls - noop_calls;

    // Evaluation: every system's `nix build` with its outputs in the store
    // (what a commit costs converge per machine) against converge's cache.
    let started = Instant::now();
    for i in 0..N {
        build_system(&dir, &format!("host{i}"));
    }
    let warm_eval = started.elapsed();

    fs::write(dir.join("flake.nix"), fake_flake(&systems("v2"))).expect("write flake.nix");
    let before = calls(&wrapper).len();
    let update = fleet.reconcile_once(&args);
    update.assert_code(0);
    let update_calls = calls(&wrapper).len() - before;
    let v2: Vec<String> = (0..N)
        .map(|i| build_system(&dir, &format!("host{i}")))
        .collect();
    for (i, system) in v2.iter().enumerate() {
        let nix = fleet.testbed.host(i).dir().join("nix");
        assert_eq!(
            resolve_in(&nix, "/nix/var/nix/current-system").as_ref(),
            Some(system)
        );
    }

    if std::env::var_os("BENCH_STEPS").is_some() {
        let attempt = &fleet.history("machine/host0")[0];
        println!("{}", serde_json::to_string_pretty(attempt).expect("json"));
    }

    // Cold evaluation and build of one system none of whose 50 paths
    // exist yet (other blob sizes), then the same with all of them built.
    let mut cold = systems("v3");
    cold[0].kib = kib() + 16;
    fs::write(dir.join("flake.nix"), fake_flake(&cold)).expect("write flake.nix");
    let started = Instant::now();
    build_system(&dir, "host0");
    let cold_one = started.elapsed();
    let started = Instant::now();
    build_system(&dir, "host0");
    let warm_one = started.elapsed();

    // The floor on fresh hosts, same systems (already built here).
    let parallel_bed = Testbed::with_private_nix(N);
    let floor_first = floor(&parallel_bed, &v1, true);
    let floor_update = floor(&parallel_bed, &v2, true);
    drop(parallel_bed);
    let serial_bed = Testbed::with_private_nix(N);
    let serial_first = floor(&serial_bed, &v1, false);
    let serial_update = floor(&serial_bed, &v2, false);
    drop(serial_bed);

    let ratio = |c: Duration, f: Duration| c.as_secs_f64() / f.as_secs_f64();
    println!(
        "| run ({N} hosts, 50 paths / ~20 MB each) | converge | nix calls | parallel floor | ratio | serial loop |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| first deploy (converge evaluates and builds too) | {} | {first_calls} | {} | {:.2}x | {} |",
        secs(first.elapsed),
        secs(floor_first),
        ratio(first.elapsed, floor_first),
        secs(serial_first)
    );
    println!(
        "| one-path update (every host's toplevel) | {} | {update_calls} | {} | {:.2}x | {} |",
        secs(update.elapsed),
        secs(floor_update),
        ratio(update.elapsed, floor_update),
        secs(serial_update)
    );
    println!(
        "| no-op run | {} | {noop_calls} | - | - | - |",
        secs(noop.elapsed)
    );
    println!(
        "| plan of the unchanged fleet | {} | {plan_calls} | - | - | - |",
        secs(plan.elapsed)
    );
    println!();
    println!(
        "evaluation: one system cold (evaluate, build 50 new paths) {}; the same again, outputs in the store (evaluation only) {}; all {N} systems evaluated with outputs in the store {}; converge's cache of an unchanged directory: 0 nix calls",
        secs(cold_one),
        secs(warm_one),
        secs(warm_eval)
    );
    fleet.finish();
}
