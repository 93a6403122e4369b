//! The shipped service definitions are checked by the tools that run them:
//! `deploy/converge.service` is clean under `systemd-analyze verify` and
//! rated at most 3.5 by `systemd-analyze security --offline=true`, and
//! `deploy/nixos/module.nix` parses (`nix-instantiate --parse`).

use std::path::PathBuf;
use std::process::Command;

use super::support::desired::manifest_dir;

const BIN: &str = env!("CARGO_BIN_EXE_converge");

/// The unit with ExecStart pointing at the converge just built (verify
/// checks that the binary exists), in a fresh directory.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(manifest_dir().join("deploy/converge.service"))
        .expect("read deploy/converge.service");
    assert!(
        text.contains("ExecStart=/usr/local/bin/converge run"),
        "{text}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("converge.service");
    std::fs::write(&path, text.replace("/usr/local/bin/converge", BIN)).expect("write the unit");
    (dir, path)
}

#[test]
fn the_systemd_unit_verifies_clean_and_is_rated_at_most_3_5() {
    let (_dir, unit) = unit_copy();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze (apt-get install systemd; scripts/setup does)");
    let said = String::from_utf8_lossy(&verify.stderr).into_owned();
    assert!(
        verify.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    assert!(
        !said.contains("converge.service"),
        "verify has something to say about the unit:\n{said}"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let out = String::from_utf8_lossy(&security.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{out}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure level of {line:?}"));
    assert!(level <= 3.5, "exposure {level} > 3.5:\n{out}");
}

#[test]
fn the_nixos_module_parses() {
    let module = manifest_dir().join("deploy/nixos/module.nix");
    let parse = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&module)
        .output()
        .expect("run nix-instantiate (apt-get install nix-bin; scripts/setup does)");
    assert!(
        parse.status.success(),
        "{}",
        String::from_utf8_lossy(&parse.stderr)
    );
    let parsed = String::from_utf8_lossy(&parse.stdout);
    for option in [
        "enable",
        "package",
        "allowedSigners",
        "notify",
        "extraArgs",
        "branch",
    ] {
        assert!(parsed.contains(option), "the module declares {option}");
    }
}
