//! Hosts whose sshd has no SFTP subsystem (sshd's compiled-in default,
//! hardened configs, dropbear without sftp-server) converge: the artifact
//! travels on a command's stdin. They converge, a second run is a no-op,
//! and a change of a service role's settings re-activates its machines.

use std::fs;

use crate::support::Converge as _;
use crate::support::ssh::fleet_with;

const N: usize = 2;

fn service(keepalive: u32) -> String {
    format!(
        "apiVersion: converge/v1\nkind: Service\nmetadata: {{name: vpn}}\nspec:\n  module: wireguard\n  settings: {{port: 51820}}\n  roles:\n    peer: {{machines: [host0, host1], settings: {{keepalive: {keepalive}}}}}\n"
    )
}

#[test]
fn hosts_without_an_sftp_subsystem_converge_noop_and_take_a_role_change() {
    let fleet = fleet_with(
        N,
        testbed::Options {
            sftp: false,
            ..testbed::Options::default()
        },
    );
    let config = fs::read_to_string(fleet.testbed.dir().join("h0/sshd_config")).expect("read");
    assert!(!config.contains("Subsystem"), "{config}");
    // The artifact depends on the roles document, as a real module's would.
    let build = fleet.dir().join("build.sh");
    let mut script = fs::read_to_string(&build).expect("read build.sh");
    script.push_str("cp \"$CONVERGE_ROLES\" \"$CONVERGE_OUT/roles.json\"\n");
    fs::write(&build, script).expect("write build.sh");
    fleet.write_all(N, &["v1"], "");
    fs::write(fleet.dir().join("vpn.yaml"), service(25)).expect("write service");

    fleet.reconcile_once(&[]).assert_code(0);
    let mut generations = Vec::new();
    for i in 0..N {
        let generation = fleet.assert_current_complete(i);
        assert_eq!(
            fleet.ledger(i),
            [format!("{generation} switch v1")],
            "host{i}"
        );
        let roles = fs::read_to_string(
            fleet
                .host_state(i)
                .join("generations")
                .join(&generation)
                .join("roles.json"),
        )
        .expect("roles.json");
        assert!(roles.contains("\"keepalive\":25"), "host{i}: {roles}");
        generations.push(generation);
    }
    let histories: Vec<usize> = (0..N)
        .map(|i| fleet.history(&format!("machine/host{i}")).len())
        .collect();

    fleet.reconcile_once(&[]).assert_code(0);
    for (i, generation) in generations.iter().enumerate() {
        assert_eq!(
            &fleet.assert_current_complete(i),
            generation,
            "host{i} moved"
        );
        assert_eq!(fleet.ledger(i).len(), 1, "host{i} activated again");
        assert_eq!(
            fleet.history(&format!("machine/host{i}")).len(),
            histories[i],
            "host{i}: a no-op run recorded an attempt"
        );
    }

    fs::write(fleet.dir().join("vpn.yaml"), service(30)).expect("write service");
    fleet.reconcile_once(&[]).assert_code(0);
    for i in 0..N {
        let generation = fleet.assert_current_complete(i);
        let ledger = fleet.ledger(i);
        assert_eq!(
            ledger.len(),
            2,
            "host{i}: the role change was not activated: {ledger:?}"
        );
        assert_eq!(ledger[1], format!("{generation} switch v1"), "host{i}");
        let roles = fs::read_to_string(
            fleet
                .host_state(i)
                .join("generations")
                .join(&generation)
                .join("roles.json"),
        )
        .expect("roles.json");
        assert!(roles.contains("\"keepalive\":30"), "host{i}: {roles}");
    }
    fleet.assert_ready(0..N);
    fleet.finish();
}
