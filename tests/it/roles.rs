//! Roles resolution through the public API: which machines a role selects,
//! how settings merge, what `after` makes machines wait for, and when a
//! machine's roles hash changes (exactly when its roles document's meaning
//! does).

use std::collections::{BTreeMap, BTreeSet};

use converge::spec::{DesiredState, Name};
use serde_json::{Value, json};

use crate::support::desired::load_valid;

fn n(s: &str) -> Name {
    Name::new(s).expect("a valid name in the test")
}

fn set(names: &[&str]) -> BTreeSet<Name> {
    names.iter().map(|s| n(s)).collect()
}

fn machine(name: &str, tags: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: Machine
metadata: {{name: {name}, tags: [{tags}]}}
spec:
  target: {{host: {name}.lan}}
  build: {{command: [\"./build.sh\"]}}
"
    )
}

const VPN: &str = "apiVersion: converge/v1
kind: Service
metadata: {name: vpn}
spec:
  module: wireguard
  settings:
    port: 51820
    nested: {a: 1, b: 2}
    list: [1, 2, 3]
  roles:
    controller:
      machines: [gw]
      settings: {endpoint: vpn.example.org, nested: {b: 3}}
    peer:
      tags: [monitored, backed-up]
      after: [controller]
      settings: {keepalive: 25, nested: {c: 4}, list: [9]}
      perMachine:
        laptop: {keepalive: 10, nested: {a: 9}}
";

const BACKUPS: &str = "apiVersion: converge/v1
kind: Service
metadata: {name: backups}
spec:
  module: borgbackup
  settings: {retention: 7}
  roles:
    server: {machines: [nas]}
    client: {tags: [backed-up], after: [server]}
";

const MONITORING: &str = "apiVersion: converge/v1
kind: Service
metadata: {name: monitoring}
spec:
  module: prometheus
  roles:
    agent: {tags: [all]}
";

const VM: &str = "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: ci}
spec:
  host: nas
  memory: 2GiB
";

/// The base fixture: five machines, three services, one VM, over four files.
fn fixture() -> Vec<(&'static str, String)> {
    vec![
        (
            "machines.yaml",
            [
                machine("gw", "gateway"),
                machine("nas", "storage, monitored"),
                machine("media", "monitored, backed-up"),
                machine("laptop", "backed-up, roaming"),
                machine("pi", "iot"),
            ]
            .join("---\n"),
        ),
        ("services/vpn.yaml", VPN.to_owned()),
        ("services/more.yaml", format!("{BACKUPS}---\n{MONITORING}")),
        ("vms.yaml", VM.to_owned()),
    ]
}

fn load(files: &[(&str, String)]) -> DesiredState {
    let borrowed: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
    load_valid(&borrowed)
}

fn document(desired: &DesiredState, machine: &str) -> Value {
    let roles = desired
        .roles
        .get(machine)
        .unwrap_or_else(|| panic!("machine {machine} has no roles entry"));
    serde_json::from_slice(&roles.document).expect("the roles document is JSON")
}

/// Roles hash of every machine.
fn hashes(desired: &DesiredState) -> BTreeMap<String, String> {
    desired
        .roles
        .iter()
        .map(|(name, r)| (name.to_string(), r.hash.clone()))
        .collect()
}

/// Machines whose roles hash differs between two loads.
fn changed(before: &DesiredState, after: &DesiredState) -> BTreeSet<Name> {
    let (a, b) = (hashes(before), hashes(after));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the set of machines changed"
    );
    a.iter()
        .filter(|(m, h)| b.get(*m) != Some(*h))
        .map(|(m, _)| n(m))
        .collect()
}

fn edit(
    files: &[(&'static str, String)],
    path: &str,
    from: &str,
    to: &str,
) -> Vec<(&'static str, String)> {
    let mut out = files.to_vec();
    let file = out
        .iter_mut()
        .find(|(p, _)| *p == path)
        .unwrap_or_else(|| panic!("no file {path} in the fixture"));
    assert!(file.1.contains(from), "{path} does not contain {from:?}");
    file.1 = file.1.replacen(from, to, 1);
    out
}

#[test]
fn roles_select_machines_by_name_by_tag_and_by_all() {
    let desired = load(&fixture());
    let services_of = |m: &str| -> BTreeMap<String, Vec<String>> {
        let doc = document(&desired, m);
        assert_eq!(doc["machine"], json!(m));
        doc["services"]
            .as_object()
            .expect("services is a mapping")
            .iter()
            .map(|(s, entry)| {
                let roles = entry["roles"]
                    .as_object()
                    .expect("roles is a mapping")
                    .keys()
                    .cloned()
                    .collect();
                (s.clone(), roles)
            })
            .collect()
    };
    let expect = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(s, roles)| (s.to_string(), roles.iter().map(|r| r.to_string()).collect()))
            .collect()
    };
    assert_eq!(
        services_of("gw"),
        expect(&[("monitoring", &["agent"]), ("vpn", &["controller"])])
    );
    assert_eq!(
        services_of("nas"),
        expect(&[
            ("backups", &["server"]),
            ("monitoring", &["agent"]),
            ("vpn", &["peer"])
        ])
    );
    assert_eq!(
        services_of("laptop"),
        expect(&[
            ("backups", &["client"]),
            ("monitoring", &["agent"]),
            ("vpn", &["peer"])
        ])
    );
    assert_eq!(services_of("pi"), expect(&[("monitoring", &["agent"])]));

    // Every member of a service sees who plays the roles it does not play:
    // a peer learns its controller, the controller its peers; members of a
    // machine's own role are not listed (that would grow quadratically).
    let doc = document(&desired, "laptop");
    assert_eq!(
        doc["services"]["vpn"]["otherRoles"],
        json!({"controller": ["gw"]})
    );
    assert_eq!(doc["services"]["monitoring"]["otherRoles"], json!({}));
    let hub = document(&desired, "gw");
    assert_eq!(
        hub["services"]["vpn"]["otherRoles"],
        json!({"peer": ["laptop", "media", "nas"]})
    );
    assert_eq!(doc["services"]["vpn"]["module"], json!("wireguard"));
}

#[test]
fn machines_without_roles_get_an_empty_document() {
    let mut files = fixture();
    files[0]
        .1
        .push_str(&format!("---\n{}", machine("spare", "unused")));
    files.retain(|(p, _)| *p != "services/more.yaml");
    let desired = load(&files);
    let doc = document(&desired, "spare");
    assert_eq!(doc, json!({"machine": "spare", "services": {}}));
    assert!(desired.roles["spare"].after.is_empty());
    assert_eq!(desired.roles.len(), desired.machines.len());
}

#[test]
fn settings_merge_deeply_instance_then_role_then_machine() {
    let desired = load(&fixture());
    let settings = |m: &str, service: &str, role: &str| {
        document(&desired, m)["services"][service]["roles"][role]["settings"].clone()
    };
    assert_eq!(
        settings("gw", "vpn", "controller"),
        json!({"port": 51820, "nested": {"a": 1, "b": 3}, "list": [1, 2, 3], "endpoint": "vpn.example.org"})
    );
    // Role over instance: mappings merge key by key, lists are replaced.
    assert_eq!(
        settings("nas", "vpn", "peer"),
        json!({"port": 51820, "nested": {"a": 1, "b": 2, "c": 4}, "list": [9], "keepalive": 25})
    );
    // perMachine over role, for that machine only.
    assert_eq!(
        settings("laptop", "vpn", "peer"),
        json!({"port": 51820, "nested": {"a": 9, "b": 2, "c": 4}, "list": [9], "keepalive": 10})
    );
    assert_eq!(
        settings("media", "vpn", "peer"),
        settings("nas", "vpn", "peer")
    );
    // A role without settings of its own carries the instance's.
    assert_eq!(
        settings("laptop", "backups", "client"),
        json!({"retention": 7})
    );
    assert_eq!(settings("pi", "monitoring", "agent"), json!({}));
}

#[test]
fn after_gives_the_machines_each_machine_waits_for() {
    let desired = load(&fixture());
    let after = |m: &str| desired.roles[m].after.clone();
    // vpn peers wait for the controller; backup clients for the server.
    assert_eq!(after("laptop"), set(&["gw", "nas"]));
    assert_eq!(after("media"), set(&["gw", "nas"]));
    assert_eq!(after("nas"), set(&["gw"]));
    assert_eq!(after("gw"), set(&[]));
    assert_eq!(after("pi"), set(&[]));
    // The role's own `after` is in the document.
    assert_eq!(
        document(&desired, "laptop")["services"]["vpn"]["roles"]["peer"]["after"],
        json!(["controller"])
    );
}

#[test]
fn a_machine_never_waits_for_itself() {
    // nas is both server and client of backups: it must not wait for itself.
    let files = edit(
        &fixture(),
        "machines.yaml",
        "tags: [storage, monitored]",
        "tags: [storage, monitored, backed-up]",
    );
    let desired = load(&files);
    assert_eq!(desired.roles["nas"].after, set(&["gw"]));
    assert_eq!(desired.roles["laptop"].after, set(&["gw", "nas"]));
}

#[test]
fn the_same_input_gives_the_same_hashes() {
    let a = load(&fixture());
    let b = load(&fixture());
    assert_eq!(hashes(&a), hashes(&b));
    assert_eq!(a.spec_hashes(), b.spec_hashes());
    for r in a.roles.values() {
        assert_eq!(r.hash, blake3::hash(&r.document).to_hex().to_string());
        assert_eq!(r.hash.len(), 64);
    }
    // Different machines' documents differ (they carry the machine's name).
    let distinct: BTreeSet<&String> = a.roles.values().map(|r| &r.hash).collect();
    assert_eq!(distinct.len(), a.roles.len());
}

#[test]
fn reordering_documents_and_files_or_adding_comments_keeps_every_hash() {
    let base = load(&fixture());
    // One file per document, in another order and other directories, with
    // comments, blank lines, other key order and flow/block style changes.
    let mut machines: Vec<String> = fixture()[0]
        .1
        .split("---\n")
        .map(|d| format!("# a machine\n\n{d}# the end\n"))
        .collect();
    machines.reverse();
    let reordered_vpn = VPN
        .replace(
            "    port: 51820\n    nested: {a: 1, b: 2}\n",
            "    nested:\n      b: 2   # comment\n      a: 1\n    port: 51820\n",
        )
        .replace("kind: Service\n", "kind: Service # a service\n");
    let files: Vec<(&'static str, String)> = vec![
        ("z/machines-a.yaml", machines[..2].join("---\n")),
        (
            "a/machines-b.yaml",
            format!("---\n{}...\n", machines[2..].join("---\n")),
        ),
        (
            "all.yaml",
            format!("{VM}---\n{MONITORING}---\n{reordered_vpn}---\n{BACKUPS}"),
        ),
    ];
    let moved = load(&files);
    assert_eq!(hashes(&base), hashes(&moved));
    assert_eq!(base.spec_hashes(), moved.spec_hashes());
}

#[test]
fn changing_a_roles_settings_changes_exactly_the_machines_it_selects() {
    let base = load(&fixture());
    let files = edit(
        &fixture(),
        "services/vpn.yaml",
        "nested: {c: 4}",
        "nested: {c: 5}",
    );
    let after = load(&files);
    // The peers changed; the controller of the same service and machines in
    // other services only did not.
    assert_eq!(changed(&base, &after), set(&["laptop", "media", "nas"]));
    // A role setting that laptop overrides per machine: laptop's merged
    // settings stay the same, and so does its hash.
    let files = edit(
        &fixture(),
        "services/vpn.yaml",
        "keepalive: 25",
        "keepalive: 30",
    );
    assert_eq!(changed(&base, &load(&files)), set(&["media", "nas"]));
    // perMachine settings: only that machine.
    let files = edit(
        &fixture(),
        "services/vpn.yaml",
        "keepalive: 10",
        "keepalive: 11",
    );
    assert_eq!(changed(&base, &load(&files)), set(&["laptop"]));
    // The controller role: only gw.
    let files = edit(
        &fixture(),
        "services/vpn.yaml",
        "vpn.example.org",
        "vpn.example.net",
    );
    assert_eq!(changed(&base, &load(&files)), set(&["gw"]));
    // Instance-wide settings: every member of the instance.
    let files = edit(
        &fixture(),
        "services/vpn.yaml",
        "port: 51820",
        "port: 51821",
    );
    assert_eq!(
        changed(&base, &load(&files)),
        set(&["gw", "laptop", "media", "nas"])
    );
}

#[test]
fn unrelated_changes_leave_roles_hashes_alone() {
    let base = load(&fixture());
    // Another service's settings: only its members change.
    let files = edit(
        &fixture(),
        "services/more.yaml",
        "retention: 7",
        "retention: 14",
    );
    assert_eq!(
        changed(&base, &load(&files)),
        set(&["laptop", "media", "nas"])
    );
    // A VM: no roles hash changes, and no machine's spec hash either.
    let files = edit(&fixture(), "vms.yaml", "memory: 2GiB", "memory: 4GiB");
    let after = load(&files);
    assert_eq!(changed(&base, &after), set(&[]));
    let spec_changed: Vec<String> = base
        .spec_hashes()
        .iter()
        .filter(|(k, h)| after.spec_hashes().get(*k) != Some(*h))
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(spec_changed, vec!["vm/ci".to_owned()]);
    // A machine's own spec: its spec hash changes, its roles hash does not.
    let files = edit(&fixture(), "machines.yaml", "host: pi.lan", "host: pi2.lan");
    let after = load(&files);
    assert_eq!(changed(&base, &after), set(&[]));
    assert_ne!(
        base.machines[&n("pi")].spec_hash,
        after.machines[&n("pi")].spec_hash
    );
}

#[test]
fn joining_a_role_changes_the_new_member_and_the_members_it_is_listed_to() {
    let base = load(&fixture());
    // pi gets the `backed-up` tag: it becomes a vpn peer and a backups client.
    let files = edit(
        &fixture(),
        "machines.yaml",
        "tags: [iot]",
        "tags: [iot, backed-up]",
    );
    let after = load(&files);
    // pi's document changes, and so do those of the machines that list
    // vpn peers (the controller, gw) and backups clients (the server, nas).
    // Fellow peers and clients do not list each other, so they stay.
    assert_eq!(changed(&base, &after), set(&["gw", "nas", "pi"]));
    assert_eq!(after.roles[&n("pi")].after, set(&["gw", "nas"]));
    let files = edit(
        &fixture(),
        "services/more.yaml",
        "server: {machines: [nas]}",
        "server: {machines: [nas, pi]}",
    );
    // pi joins backups.server only: the clients (laptop, media), which list
    // the servers, change; nas, a fellow server, and vpn-only gw do not.
    assert_eq!(
        changed(&base, &load(&files)),
        set(&["laptop", "media", "pi"])
    );
}
