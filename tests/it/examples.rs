//! The shipped examples load valid, and `converge validate` says so (and says
//! what is wrong with an invalid directory).

use std::process::Command;

use crate::support::desired::{load, manifest_dir, render, write_dir};

#[test]
fn quickstart_is_valid_without_warnings() {
    let assembled = load(&manifest_dir().join("examples/quickstart"));
    assert!(assembled.diagnostics.is_empty(), "{}", render(&assembled));
    let desired = assembled.desired.expect("quickstart is valid");
    assert_eq!(desired.machines.len(), 1);
    assert_eq!(desired.vms.len(), 1);
    assert_eq!(desired.services.len(), 1);
    // The one machine plays the one role.
    let doc: serde_json::Value =
        serde_json::from_slice(&desired.roles["web"].document).expect("JSON");
    assert_eq!(
        doc["services"]["hello"]["roles"]["server"]["settings"]["greeting"],
        "hello from converge"
    );
}

#[test]
fn homelab_is_valid_without_warnings() {
    let assembled = load(&manifest_dir().join("examples/homelab"));
    assert!(assembled.diagnostics.is_empty(), "{}", render(&assembled));
    let desired = assembled.desired.expect("homelab is valid");
    assert!(
        desired.machines.len() >= 5,
        "{} machines",
        desired.machines.len()
    );
    assert_eq!(desired.vms.len(), 2);
    assert_eq!(desired.services.len(), 3);
    // Every machine takes part in at least one service.
    for (name, roles) in &desired.roles {
        let doc: serde_json::Value = serde_json::from_slice(&roles.document).expect("JSON");
        assert!(
            doc["services"].as_object().is_some_and(|s| !s.is_empty()),
            "machine {name} plays no role"
        );
    }
}

fn validate(dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_converge"))
        .args(["validate", "--dir"])
        .arg(dir)
        .env_remove("CONVERGE_DIR")
        .env_remove("CONVERGE_LOG_FORMAT")
        .output()
        .expect("run the converge binary")
}

#[test]
fn validate_exits_0_on_the_examples() {
    for example in ["examples/quickstart", "examples/homelab"] {
        let out = validate(&manifest_dir().join(example));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{example}: stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("valid: "), "{example}: {stdout}");
        assert!(stdout.contains("(0 warnings)"), "{example}: {stdout}");
    }
}

#[test]
fn validate_exits_1_on_an_invalid_directory_with_the_error_on_stdout() {
    let dir = write_dir(&[(
        "vm.yaml",
        "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 2GB
",
    )]);
    let out = validate(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{stdout}");
    assert!(
        stdout.contains("error: size `2GB` is malformed"),
        "{stdout}"
    );
    assert!(stdout.contains("--> vm.yaml:5:11"), "{stdout}");
    assert!(stdout.contains("invalid: 1 errors"), "{stdout}");
}

#[test]
fn nixos_example_is_valid_and_builds_with_nix() {
    let assembled = load(&manifest_dir().join("examples/nixos"));
    assert!(assembled.diagnostics.is_empty(), "{}", render(&assembled));
    let desired = assembled.desired.expect("the NixOS example is valid");
    assert_eq!(desired.machines.len(), 2);
    for machine in desired.machines.values() {
        assert!(
            machine.spec.build.nix.is_some(),
            "every machine of examples/nixos is a Nix build"
        );
    }
}
