//! Data-driven plan tests: each case renders the plan as text and compares it
//! with an insta snapshot.

use serde_json::json;

use super::*;

fn key(s: &str) -> ObjectKey {
    s.parse().unwrap()
}

fn machine_doc(mode: &str, host: &str) -> Value {
    json!({"apiVersion": "converge/v1", "kind": "Machine", "metadata": {"name": "web"},
           "spec": {"target": {"host": host}, "build": {"command": ["./build.sh"]},
                    "activation": {"mode": mode}}})
}

fn desired<'a>(document: Value, spec_hash: &'a str, roles: &'a str, rev: &'a str) -> Desired<'a> {
    Desired {
        document,
        spec_hash,
        roles_hash: Some(roles),
        build_input: Some(rev),
        activation_mode: Some("switch"),
        health_checks: 1,
        vm_running: None,
        drift_policy: "correct",
        delete_on_removal: false,
    }
}

fn applied<'a>(
    document: &'a Value,
    spec_hash: &'a str,
    roles: &'a str,
    rev: &'a str,
) -> Applied<'a> {
    Applied {
        document: Some(document),
        spec_hash,
        roles_hash: Some(roles),
        build_input: Some(rev),
        generation: Some("3-aaaa".to_owned()),
        delete_on_removal: false,
    }
}

fn plan_of(items: Vec<(Option<Change>, Vec<Drift>)>) -> Plan {
    let mut plan = Plan::default();
    for (change, drift) in items {
        plan.changes.extend(change);
        plan.drift.extend(drift);
    }
    plan
}

#[test]
fn plan_creates_a_machine_never_applied() {
    let k = key("machine/web");
    let d = desired(machine_doc("switch", "10.0.0.5"), "h1", "r1", "rev1");
    let plan = plan_of(vec![diff(&k, Some(&d), None, None)]);
    assert_eq!(plan.summary(), (1, 0, 0));
    insta::assert_snapshot!(render_text(&plan));
}

#[test]
fn plan_is_empty_when_nothing_changed_and_nothing_drifted() {
    let k = key("machine/web");
    let doc = machine_doc("switch", "10.0.0.5");
    let d = desired(doc.clone(), "h1", "r1", "rev1");
    let a = applied(&doc, "h1", "r1", "rev1");
    let o = Observed {
        current_generation: Some("3-aaaa".to_owned()),
        ..Observed::default()
    };
    let (change, drift) = diff(&k, Some(&d), Some(&a), Some(&o));
    assert!(change.is_none());
    assert!(drift.is_empty());
    insta::assert_snapshot!(render_text(&Plan::default()));
}

#[test]
fn plan_names_the_fields_that_changed() {
    let k = key("machine/web");
    let before = machine_doc("switch", "10.0.0.5");
    let d = desired(machine_doc("boot", "10.0.0.5"), "h2", "r2", "rev1");
    let a = applied(&before, "h1", "r1", "rev1");
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), None)]);
    assert_eq!(plan.summary(), (0, 1, 0));
    insta::assert_snapshot!(render_text(&plan));
}

#[test]
fn plan_replaces_a_machine_whose_target_moved() {
    let k = key("machine/web");
    let before = machine_doc("switch", "10.0.0.5");
    let d = desired(machine_doc("switch", "10.0.0.6"), "h2", "r1", "rev1");
    let a = applied(&before, "h1", "r1", "rev1");
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), None)]);
    assert_eq!(plan.summary(), (1, 0, 1));
    insta::assert_snapshot!(render_text(&plan));
}

#[test]
fn plan_reports_drift_separately_and_corrects_per_policy() {
    let k = key("machine/web");
    let doc = machine_doc("switch", "10.0.0.5");
    let d = desired(doc.clone(), "h1", "r1", "rev1");
    let a = applied(&doc, "h1", "r1", "rev1");
    let o = Observed {
        current_generation: Some("2-bbbb".to_owned()),
        ..Observed::default()
    };
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), Some(&o))]);
    assert_eq!(plan.drift.len(), 1);
    insta::assert_snapshot!(render_text(&plan));

    let mut warn_only = d.clone();
    warn_only.drift_policy = "warn";
    let (change, drift) = diff(&k, Some(&warn_only), Some(&a), Some(&o));
    assert!(change.is_none(), "warn reports drift but plans no action");
    assert_eq!(drift[0].action, "warn");

    let mut ignore = d;
    ignore.drift_policy = "ignore";
    let (change, drift) = diff(&k, Some(&ignore), Some(&a), Some(&o));
    assert!(change.is_none() && drift.is_empty());
}

#[test]
fn plan_forgets_removed_machines_and_destroys_removed_vms_per_on_delete() {
    let doc = machine_doc("switch", "10.0.0.5");
    let a = applied(&doc, "h1", "r1", "rev1");
    let mut vm_delete = a.clone();
    vm_delete.delete_on_removal = true;
    let plan = plan_of(vec![
        diff(&key("machine/old"), None, Some(&a), None),
        diff(&key("vm/keep"), None, Some(&a), None),
        diff(&key("vm/gone"), None, Some(&vm_delete), None),
    ]);
    assert_eq!(plan.summary(), (0, 0, 3));
    insta::assert_snapshot!(render_text(&plan));
}

#[test]
fn plan_marks_vm_fields_that_force_a_restart() {
    let k = key("vm/builder");
    let before = json!({"apiVersion": "converge/v1", "kind": "VirtualMachine", "metadata": {"name": "builder"},
        "spec": {"host": "local", "memory": "1GiB", "cpus": 1, "disks": [{"name": "root", "size": "1GiB"}]}});
    let after = json!({"apiVersion": "converge/v1", "kind": "VirtualMachine", "metadata": {"name": "builder"},
        "spec": {"host": "local", "memory": "2GiB", "cpus": 1, "disks": [{"name": "root", "size": "2GiB"}]}});
    let d = Desired {
        document: after,
        spec_hash: "h2",
        roles_hash: None,
        build_input: None,
        activation_mode: None,
        health_checks: 0,
        vm_running: Some(true),
        drift_policy: "correct",
        delete_on_removal: false,
    };
    let a = Applied {
        document: Some(&before),
        spec_hash: "h1",
        roles_hash: None,
        build_input: None,
        generation: None,
        delete_on_removal: false,
    };
    let o = Observed {
        vm_running: Some(true),
        vm_disks: vec!["root".to_owned()],
        ..Observed::default()
    };
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), Some(&o))]);
    insta::assert_snapshot!(render_text(&plan));
    assert!(plan.changes[0].steps.iter().any(Step::is_disruptive));
}
