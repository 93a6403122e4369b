//! Data-driven plan tests: each case renders the plan as text and compares it
//! with an insta snapshot, and checks the steps the diff decided.

use serde_json::{Value, json};

use super::*;
use crate::spec::{
    Activation, At, ByteSize, Disk, DriftPolicy, HealthCheck, HumanDuration, Name, ObjectKey,
};

fn key(s: &str) -> ObjectKey {
    s.parse().unwrap()
}

fn machine_doc(mode: &str, host: &str) -> Value {
    json!({"apiVersion": "converge/v1", "kind": "Machine", "metadata": {"name": "web"},
           "spec": {"target": {"host": host}, "build": {"command": ["./build.sh"]},
                    "activation": {"mode": mode}}})
}

fn activation() -> Activation {
    Activation {
        health_checks: vec![HealthCheck {
            exec: At::unplaced(vec!["true".to_owned()]),
            timeout: At::unplaced(HumanDuration::from_secs(30)),
        }],
        ..Activation::default()
    }
}

fn machine<'a>(activation: &'a Activation, roles: &'a str, rev: &'a str) -> MachineDesired<'a> {
    MachineDesired {
        roles_hash: roles,
        build_input: rev,
        activation,
        remote: true,
        drift: DriftPolicy::Correct,
        keep_generations: 5,
    }
}

fn desired<'a>(document: Value, spec_hash: &'a str, machine: MachineDesired<'a>) -> Desired<'a> {
    Desired {
        document,
        spec_hash,
        kind: DesiredKind::Machine(machine),
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

fn observed_machine(current: &str, generations: &[&str]) -> Observed {
    Observed::Machine {
        current: Some(current.to_owned()),
        confirmed: Some(current.to_owned()),
        generations: generations.iter().map(|g| (*g).to_owned()).collect(),
        nixos: None,
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

fn confirm_of(change: Option<Change>) -> Step {
    change
        .expect("a change")
        .steps
        .into_iter()
        .find(|s| s.name() == "confirm")
        .expect("a confirm step")
}

fn names(change: &Change) -> Vec<&'static str> {
    change.steps.iter().map(Step::name).collect()
}

#[test]
fn plan_creates_a_machine_never_applied() {
    let k = key("machine/web");
    let act = activation();
    let d = desired(
        machine_doc("switch", "10.0.0.5"),
        "h1",
        machine(&act, "r1", "rev1"),
    );
    let plan = plan_of(vec![diff(&k, Some(&d), None, None)]);
    assert_eq!(plan.summary(), (1, 0, 0));
    assert_eq!(
        names(&plan.changes[0]),
        [
            "build",
            "install",
            "switch",
            "activate",
            "health-check",
            "confirm",
            "prune"
        ]
    );
    insta::assert_snapshot!(render_text(&plan));
}

#[test]
fn plan_guards_only_remote_activations_that_change_the_running_system_with_a_watchdog() {
    let k = key("machine/web");
    let mut act = activation();
    let mut local = machine(&act, "r1", "rev1");
    local.remote = false;
    let d = desired(machine_doc("switch", "10.0.0.5"), "h1", local);
    let (change, _) = diff(&k, Some(&d), None, None);
    assert_eq!(
        confirm_of(change),
        Step::Confirm { timeout: None },
        "a local activation is recorded as confirmed, with no watchdog"
    );

    act.mode = crate::spec::ActivationMode::Boot;
    let d = desired(
        machine_doc("boot", "10.0.0.5"),
        "h1",
        machine(&act, "r1", "rev1"),
    );
    let (change, _) = diff(&k, Some(&d), None, None);
    assert_eq!(confirm_of(change), Step::Confirm { timeout: None });
}

#[test]
fn plan_is_empty_when_nothing_changed_and_nothing_drifted() {
    let k = key("machine/web");
    let doc = machine_doc("switch", "10.0.0.5");
    let act = activation();
    let d = desired(doc.clone(), "h1", machine(&act, "r1", "rev1"));
    let a = applied(&doc, "h1", "r1", "rev1");
    let o = observed_machine("3-aaaa", &["3-aaaa"]);
    let (change, drift) = diff(&k, Some(&d), Some(&a), Some(&o));
    assert!(change.is_none());
    assert!(drift.is_empty());
    insta::assert_snapshot!(render_text(&Plan::default()));
}

#[test]
fn plan_names_the_fields_that_changed() {
    let k = key("machine/web");
    let before = machine_doc("switch", "10.0.0.5");
    let mut act = activation();
    act.mode = crate::spec::ActivationMode::Boot;
    let d = desired(
        machine_doc("boot", "10.0.0.5"),
        "h2",
        machine(&act, "r2", "rev1"),
    );
    let a = applied(&before, "h1", "r1", "rev1");
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), None)]);
    assert_eq!(plan.summary(), (0, 1, 0));
    assert!(
        !plan.changes[0].only_if_artifact_changed,
        "an activation change activates even an unchanged artifact"
    );
    insta::assert_snapshot!(render_text(&plan));
}

#[test]
fn plan_replaces_a_machine_whose_target_moved() {
    let k = key("machine/web");
    let before = machine_doc("switch", "10.0.0.5");
    let act = activation();
    let d = desired(
        machine_doc("switch", "10.0.0.6"),
        "h2",
        machine(&act, "r1", "rev1"),
    );
    let a = applied(&before, "h1", "r1", "rev1");
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), None)]);
    assert_eq!(plan.summary(), (1, 0, 1));
    insta::assert_snapshot!(render_text(&plan));
}

#[test]
fn plan_reports_drift_separately_and_corrects_per_policy() {
    let k = key("machine/web");
    let doc = machine_doc("switch", "10.0.0.5");
    let act = activation();
    let d = desired(doc.clone(), "h1", machine(&act, "r1", "rev1"));
    let a = applied(&doc, "h1", "r1", "rev1");
    let o = observed_machine("2-bbbb", &["2-bbbb", "3-aaaa"]);
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), Some(&o))]);
    assert_eq!(plan.drift.len(), 1);
    assert_eq!(
        names(&plan.changes[0]),
        ["switch", "activate", "health-check", "confirm"],
        "the applied generation is still there: re-activated, not rebuilt"
    );
    assert_eq!(plan.changes[0].rollback_to.as_deref(), Some("2-bbbb"));
    insta::assert_snapshot!(render_text(&plan));

    let gone = observed_machine("2-bbbb", &["2-bbbb"]);
    let (change, _) = diff(&k, Some(&d), Some(&a), Some(&gone));
    assert_eq!(
        names(&change.unwrap())[..2],
        ["build", "install"],
        "the applied generation is gone from the target: built and installed again"
    );

    let mut warn = machine(&act, "r1", "rev1");
    warn.drift = DriftPolicy::Warn;
    let warn_only = desired(doc.clone(), "h1", warn);
    let (change, drift) = diff(&k, Some(&warn_only), Some(&a), Some(&o));
    assert!(change.is_none(), "warn reports drift but plans no action");
    assert_eq!(drift[0].action, "warn");

    let mut ignore = machine(&act, "r1", "rev1");
    ignore.drift = DriftPolicy::Ignore;
    let ignore = desired(doc.clone(), "h1", ignore);
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

fn vm_doc(memory: &str, disk: &str) -> Value {
    json!({"apiVersion": "converge/v1", "kind": "VirtualMachine", "metadata": {"name": "builder"},
        "spec": {"host": "local", "memory": memory, "cpus": 1, "disks": [{"name": "root", "size": disk}]}})
}

fn disks(size: u64) -> Vec<Disk> {
    vec![Disk {
        name: At::unplaced(Name::new("root").unwrap()),
        size: At::unplaced(ByteSize::from_bytes(size)),
        backing_image: None,
    }]
}

const GIB: u64 = 1 << 30;

#[test]
fn plan_marks_vm_fields_that_force_a_restart() {
    let k = key("vm/builder");
    let before = vm_doc("1GiB", "1GiB");
    let spec_disks = disks(2 * GIB);
    let d = Desired {
        document: vm_doc("2GiB", "2GiB"),
        spec_hash: "h2",
        kind: DesiredKind::Vm(VmDesired {
            running: true,
            disks: &spec_disks,
            launch: "launch-2",
            restart: false,
        }),
    };
    let a = Applied {
        document: Some(&before),
        spec_hash: "h1",
        roles_hash: None,
        build_input: None,
        generation: None,
        delete_on_removal: false,
    };
    let o = Observed::Vm(VmObserved {
        running: true,
        launched: Some("launch-1".to_owned()),
        disks: vec![("root".to_owned(), Some(GIB))],
    });
    let plan = plan_of(vec![diff(&k, Some(&d), Some(&a), Some(&o))]);
    insta::assert_snapshot!(render_text(&plan));
    assert_eq!(names(&plan.changes[0]), ["grow-disk", "restart-vm"]);
    assert!(plan.changes[0].steps.iter().any(Step::is_disruptive));
}

#[test]
fn a_vm_restarts_exactly_when_its_launch_differs_from_what_runs() {
    let k = key("vm/builder");
    let doc = vm_doc("1GiB", "1GiB");
    let spec_disks = disks(GIB);
    let d = Desired {
        document: doc.clone(),
        spec_hash: "h1",
        kind: DesiredKind::Vm(VmDesired {
            running: true,
            disks: &spec_disks,
            launch: "launch-1",
            restart: false,
        }),
    };
    let a = Applied {
        document: Some(&doc),
        spec_hash: "h1",
        roles_hash: None,
        build_input: None,
        generation: None,
        delete_on_removal: false,
    };
    let running = |launched: &str| {
        Observed::Vm(VmObserved {
            running: true,
            launched: Some(launched.to_owned()),
            disks: vec![("root".to_owned(), Some(GIB))],
        })
    };
    let (same, _) = diff(&k, Some(&d), Some(&a), Some(&running("launch-1")));
    assert!(same.is_none(), "{same:?}");
    let (other, _) = diff(&k, Some(&d), Some(&a), Some(&running("launch-0")));
    assert_eq!(names(&other.unwrap()), ["restart-vm"]);
    let dead = Observed::Vm(VmObserved {
        running: false,
        launched: None,
        disks: vec![("root".to_owned(), Some(GIB))],
    });
    let (change, drift) = diff(&k, Some(&d), Some(&a), Some(&dead));
    assert_eq!(names(&change.unwrap()), ["start-vm"]);
    assert_eq!(drift[0].field, "running");
}

#[test]
fn an_operator_restart_restarts_a_running_vm_and_starts_a_stopped_one() {
    let k = key("vm/builder");
    let doc = vm_doc("1GiB", "1GiB");
    let spec_disks = disks(GIB);
    let d = Desired {
        document: doc.clone(),
        spec_hash: "h1",
        kind: DesiredKind::Vm(VmDesired {
            running: true,
            disks: &spec_disks,
            launch: "launch-1",
            restart: true,
        }),
    };
    let a = Applied {
        document: Some(&doc),
        spec_hash: "h1",
        roles_hash: None,
        build_input: None,
        generation: None,
        delete_on_removal: false,
    };
    let observed = |running: bool| {
        Observed::Vm(VmObserved {
            running,
            launched: running.then(|| "launch-1".to_owned()),
            disks: vec![("root".to_owned(), Some(GIB))],
        })
    };
    let (change, _) = diff(&k, Some(&d), Some(&a), Some(&observed(true)));
    assert_eq!(names(&change.unwrap()), ["restart-vm"]);
    let (change, _) = diff(&k, Some(&d), Some(&a), Some(&observed(false)));
    assert_eq!(names(&change.unwrap()), ["start-vm"]);
}

#[test]
fn a_nixos_system_that_is_not_the_applied_one_is_drift_only_for_modes_that_switch() {
    let k = key("machine/web");
    let doc = machine_doc("switch", "10.0.0.5");
    let mut act = activation();
    let nixos = |running: &str| Observed::Machine {
        current: Some("3-aaaa".to_owned()),
        confirmed: Some("3-aaaa".to_owned()),
        generations: vec!["3-aaaa".to_owned()],
        nixos: Some(("/nix/store/a-sys".to_owned(), running.to_owned())),
    };
    let a = applied(&doc, "h1", "r1", "rev1");
    let d = desired(doc.clone(), "h1", machine(&act, "r1", "rev1"));
    let (change, drift) = diff(&k, Some(&d), Some(&a), Some(&nixos("/nix/store/a-sys")));
    assert!(
        change.is_none() && drift.is_empty(),
        "the applied system runs"
    );

    let (change, drift) = diff(&k, Some(&d), Some(&a), Some(&nixos("/nix/store/b-sys")));
    assert_eq!(drift.len(), 1);
    assert_eq!(drift[0].field, "nixos_system");
    assert_eq!(drift[0].observed, "/nix/store/b-sys");
    let change = change.expect("corrected");
    assert_eq!(
        names(&change),
        ["switch", "activate", "health-check", "confirm"],
        "re-activates the applied generation"
    );

    act.mode = crate::spec::ActivationMode::Boot;
    let d = desired(doc.clone(), "h1", machine(&act, "r1", "rev1"));
    let (_, drift) = diff(&k, Some(&d), Some(&a), Some(&nixos("/nix/store/b-sys")));
    assert!(
        drift.is_empty(),
        "mode boot never changes the running system"
    );
}
