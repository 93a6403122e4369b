//! Invalid desired-state directories: every one is rejected (or, for the two
//! warning-only cases, accepted) with diagnostics that name the file, line and
//! column and say what to do.
//!
//! Each case is a small directory written into a tempdir and loaded with
//! [`converge::source::Source`]. The snapshot holds the input (with line
//! numbers, so a reviewer can check every `file:line:col`) and the rendered
//! diagnostics. Besides the snapshot, each case lists fragments its output
//! must contain, so a wrong snapshot cannot be accepted by accident.

use std::panic::{AssertUnwindSafe, catch_unwind};

use converge::spec::diagnostic::escape_text;
use converge::spec::parse::MAX_FILE_BYTES;

use crate::support::desired::{load, render, write_dir};

/// What loading a case must yield.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// No desired state; at least one error.
    Invalid,
    /// A desired state (warnings allowed).
    Valid,
}

struct Case {
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    expect: Expect,
    /// Fragments the rendered diagnostics must contain.
    must_contain: Vec<&'static str>,
}

fn case(
    name: &'static str,
    expect: Expect,
    files: &[(&'static str, &str)],
    must_contain: &[&'static str],
) -> Case {
    Case {
        name,
        files: files
            .iter()
            .map(|(path, text)| (*path, text.as_bytes().to_vec()))
            .collect(),
        expect,
        must_contain: must_contain.to_vec(),
    }
}

fn bytes_case(
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    must_contain: &[&'static str],
) -> Case {
    Case {
        name,
        files,
        expect: Expect::Invalid,
        must_contain: must_contain.to_vec(),
    }
}

use Expect::{Invalid, Valid};

/// A valid machine `web1`, for cases that break something else.
const WEB1: &str = "\
apiVersion: converge/v1
kind: Machine
metadata: {name: web1}
spec:
  target: {host: 10.0.0.5}
  build: {command: [\"./build.sh\"]}
";

/// A machine named `name` with `tags`, as one document.
fn machine(name: &str, tags: &str) -> String {
    format!(
        "apiVersion: converge/v1\nkind: Machine\nmetadata: {{name: {name}, tags: [{tags}]}}\nspec:\n  target: {{host: {name}.lan}}\n  build: {{nix: {{flake: \".#{name}\"}}}}\n"
    )
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[allow(clippy::too_many_lines)]
fn cases() -> Vec<Case> {
    let long_name = "a".repeat(64);
    let hypervisors = leak(format!(
        "{}---\n{}",
        machine("hyper1", "hv"),
        machine("hyper2", "hv")
    ));
    vec![
        // ------------------------------------------------ structure and keys
        case(
            "unknown_field_top_level",
            Invalid,
            &[("m.yaml", &format!("{WEB1}status: {{ready: true}}\n"))],
            &["m.yaml:7:1", "status"],
        ),
        case(
            "unknown_field_in_spec",
            Invalid,
            &[("m.yaml", &format!("{WEB1}  colour: blue\n"))],
            &["m.yaml:7:3", "colour"],
        ),
        case(
            "unknown_field_nested_in_target",
            Invalid,
            &[(
                "m.yaml",
                "apiVersion: converge/v1
kind: Machine
metadata: {name: web1}
spec:
  target:
    host: 10.0.0.5
    hots: example
  build: {command: [\"./build.sh\"]}
",
            )],
            &["m.yaml:7:5", "hots"],
        ),
        case(
            "wrong_type_scalar",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  cpus: two
",
            )],
            &["vm.yaml:6:9", "whole number"],
        ),
        case(
            "wrong_type_string_for_list",
            Invalid,
            &[(
                "m.yaml",
                "apiVersion: converge/v1
kind: Machine
metadata:
  name: web1
  tags: web
spec:
  target: {host: 10.0.0.5}
  build: {command: [\"./build.sh\"]}
",
            )],
            &["m.yaml:5:9", "expected a list"],
        ),
        case(
            "duplicate_key",
            Invalid,
            &[("m.yaml", &format!("{WEB1}  target: {{host: 10.0.0.6}}\n"))],
            &["m.yaml:7:3", "duplicate", "target"],
        ),
        case(
            "yaml_syntax_error",
            Invalid,
            &[(
                "m.yaml",
                "apiVersion: converge/v1
kind: Machine
metadata: {name: web1
spec:
  target: {host: 10.0.0.5}
",
            )],
            &["m.yaml:"],
        ),
        case(
            "document_not_a_mapping",
            Invalid,
            &[("m.yaml", "- apiVersion: converge/v1\n- kind: Machine\n")],
            &["m.yaml:1:1", "expected a mapping"],
        ),
        case(
            "duplicate_name_in_one_file",
            Invalid,
            &[("m.yaml", &format!("{WEB1}---\n{WEB1}"))],
            &[
                "duplicate Machine name `web1`",
                "m.yaml:10:18",
                "first defined at m.yaml:3:18",
            ],
        ),
        case(
            "duplicate_name_across_files",
            Invalid,
            &[("a.yaml", WEB1), ("sub/b.yaml", WEB1)],
            &[
                "duplicate Machine name `web1`",
                "sub/b.yaml:3:18",
                "first defined at a.yaml:3:18",
            ],
        ),
        // ------------------------------------------------ envelope
        case(
            "unknown_kind",
            Invalid,
            &[("m.yaml", &WEB1.replace("kind: Machine", "kind: Pod"))],
            &["m.yaml:2:7", "unknown kind `Pod`"],
        ),
        case(
            "unknown_api_version",
            Invalid,
            &[("m.yaml", &WEB1.replace("converge/v1", "converge/v2"))],
            &["m.yaml:1:13", "unknown apiVersion `converge/v2`"],
        ),
        case(
            "missing_api_version",
            Invalid,
            &[(
                "m.yaml",
                &format!(
                    "# the web server\n{}",
                    WEB1.replace("apiVersion: converge/v1\n", "")
                ),
            )],
            &["m.yaml:2:1", "no `apiVersion`"],
        ),
        case(
            "missing_kind",
            Invalid,
            &[("m.yaml", &WEB1.replace("kind: Machine\n", ""))],
            &["m.yaml:1:1", "no `kind`"],
        ),
        // ------------------------------------------------ names
        case(
            "name_uppercase",
            Invalid,
            &[("m.yaml", &WEB1.replace("web1", "Web1"))],
            &["m.yaml:3:18", "`Web1`", "DNS label"],
        ),
        case(
            "name_underscore",
            Invalid,
            &[("m.yaml", &WEB1.replace("web1", "web_1"))],
            &["m.yaml:3:18", "`web_1`", "DNS label"],
        ),
        case(
            "name_shell_substitution",
            Invalid,
            &[("m.yaml", &WEB1.replace("web1", "\"$(reboot)\""))],
            &["m.yaml:3:18", "`$(reboot)`", "DNS label"],
        ),
        case(
            "name_too_long",
            Invalid,
            &[("m.yaml", &WEB1.replace("web1", &long_name))],
            &["m.yaml:3:18", "longer than 63"],
        ),
        case(
            "reserved_machine_name_local",
            Invalid,
            &[("m.yaml", &WEB1.replace("web1", "local"))],
            &["m.yaml:3:18", "`local` is reserved"],
        ),
        // ------------------------------------------------ quantities
        case(
            "size_malformed",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 2GB
",
            )],
            &["vm.yaml:5:11", "`2GB`", "GiB"],
        ),
        case(
            "memory_out_of_range",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 8MiB
---
apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm2}
spec:
  memory: 8TiB
",
            )],
            &["vm.yaml:5:11", "vm.yaml:11:11", "out of range"],
        ),
        case(
            "duration_malformed",
            Invalid,
            &[("m.yaml", &format!("{WEB1}  interval: 5min\n"))],
            &["m.yaml:7:13", "`5min`"],
        ),
        case(
            "interval_out_of_range",
            Invalid,
            &[(
                "m.yaml",
                &format!(
                    "{WEB1}  interval: 0s\n---\n{}  interval: 60d\n",
                    WEB1.replace("web1", "web2").replace("10.0.0.5", "10.0.0.6")
                ),
            )],
            &["m.yaml:7:13", "m.yaml:15:13", "interval", "out of range"],
        ),
        case(
            "port_zero",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace("{host: 10.0.0.5}", "{host: 10.0.0.5, port: 0}"),
            )],
            &["m.yaml:5:34", "port 0"],
        ),
        case(
            "port_too_large",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  network:
    forwards:
      - {host: 99999, guest: 22}
",
            )],
            &["vm.yaml:8:16", "port 99999"],
        ),
        // ------------------------------------------------ required and exclusive fields
        case(
            "missing_memory",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  cpus: 2
",
            )],
            &["vm.yaml:", "memory"],
        ),
        case(
            "missing_target",
            Invalid,
            &[("m.yaml", &WEB1.replace("  target: {host: 10.0.0.5}\n", ""))],
            &["m.yaml:", "target"],
        ),
        case(
            "target_both_local_and_host",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace("{host: 10.0.0.5}", "{local: true, host: 10.0.0.5}"),
            )],
            &["m.yaml:5:31", "both `local: true` and `host`"],
        ),
        case(
            "target_neither_local_nor_host",
            Invalid,
            &[("m.yaml", &WEB1.replace("{host: 10.0.0.5}", "{user: root}"))],
            &["m.yaml:3:18", "neither `host` nor `local: true`"],
        ),
        case(
            "local_target_with_ssh_settings",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace("{host: 10.0.0.5}", "{local: true, port: 2222}"),
            )],
            &["m.yaml:5:31", "do not apply to a `local: true` target"],
        ),
        case(
            "build_both_command_and_nix",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace(
                    "{command: [\"./build.sh\"]}",
                    "{command: [\"./build.sh\"], nix: {flake: \".#web1\"}}",
                ),
            )],
            &["m.yaml:6:", "both `command` and `nix`"],
        ),
        case(
            "nix_build_on_target_is_not_supported_yet",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace(
                    "{command: [\"./build.sh\"]}",
                    "{nix: {flake: \".#web1\", buildOn: target}}",
                ),
            )],
            &["m.yaml:6:", "`buildOn: target` are not supported"],
        ),
        case(
            "nix_with_sudo_is_not_supported_yet",
            Invalid,
            &[(
                "m.yaml",
                &WEB1
                    .replace("{command: [\"./build.sh\"]}", "{nix: {flake: \".#web1\"}}")
                    .replace(
                        "{host: 10.0.0.5}",
                        "{host: 10.0.0.5, user: deploy, sudo: true}",
                    ),
            )],
            &[
                "m.yaml:5:",
                "`sudo: true` is not supported",
                "trusted-users",
            ],
        ),
        case(
            "nix_flake_outside_the_directory_is_not_supported_yet",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace(
                    "{command: [\"./build.sh\"]}",
                    "{nix: {flake: \"github:me/fleet#web1\"}}",
                ),
            )],
            &["m.yaml:6:", "outside the desired-state directory"],
        ),
        case(
            "build_command_empty",
            Invalid,
            &[("m.yaml", &WEB1.replace("[\"./build.sh\"]", "[]"))],
            &["m.yaml:6:20", "build command is empty"],
        ),
        // ------------------------------------------------ references
        case(
            "vm_host_does_not_exist",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  host: hyper1
  memory: 1GiB
",
            )],
            &["vm.yaml:5:9", "VM host `hyper1` is not a Machine"],
        ),
        case(
            "vm_machine_does_not_exist",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  machine: guest1
",
            )],
            &["vm.yaml:6:12", "`guest1` is not a Machine"],
        ),
        case(
            "role_machine_does_not_exist",
            Invalid,
            &[
                ("m.yaml", WEB1),
                (
                    "s.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: site}
spec:
  module: nginx
  roles:
    server: {machines: [web1, web9]}
",
                ),
            ],
            &["s.yaml:7:31", "names machine `web9`"],
        ),
        case(
            "tag_selects_nothing_is_a_warning",
            Valid,
            &[
                ("m.yaml", WEB1),
                (
                    "s.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: site}
spec:
  module: nginx
  roles:
    server: {machines: [web1]}
    cache: {tags: [varnish]}
",
                ),
            ],
            &[
                "warning:",
                "s.yaml:8:20",
                "tag `varnish` of role `cache` selects no machine",
            ],
        ),
        case(
            "role_after_unknown_role",
            Invalid,
            &[
                ("m.yaml", WEB1),
                (
                    "s.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: site}
spec:
  module: nginx
  roles:
    server: {machines: [web1], after: [database]}
",
                ),
            ],
            &[
                "s.yaml:7:40",
                "`database`, which is not a role of this service",
            ],
        ),
        case(
            "role_cycle",
            Invalid,
            &[
                ("m.yaml", WEB1),
                (
                    "s.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: site}
spec:
  module: nginx
  roles:
    a: {machines: [web1], after: [b]}
    b: {machines: [web1], after: [a]}
",
                ),
            ],
            &["s.yaml:7:", "a -> b -> a"],
        ),
        case(
            "machine_cycle_across_services",
            Invalid,
            &[
                (
                    "m.yaml",
                    leak(format!("{}---\n{}", machine("m1", "x"), machine("m2", "x"))),
                ),
                (
                    "s1.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: s1}
spec:
  module: one
  roles:
    first: {machines: [m1]}
    second: {machines: [m2], after: [first]}
",
                ),
                (
                    "s2.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: s2}
spec:
  module: two
  roles:
    first: {machines: [m2]}
    second: {machines: [m1], after: [first]}
",
                ),
            ],
            &["machines wait for each other in a cycle", "m1 -> m2 -> m1"],
        ),
        case(
            "per_machine_outside_the_role",
            Invalid,
            &[
                (
                    "m.yaml",
                    leak(format!(
                        "{WEB1}---\n{}",
                        WEB1.replace("web1", "web2").replace("10.0.0.5", "10.0.0.6")
                    )),
                ),
                (
                    "s.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: site}
spec:
  module: nginx
  roles:
    server:
      machines: [web1]
      perMachine:
        web2: {workers: 4}
",
                ),
            ],
            &[
                "s.yaml:10:9",
                "perMachine names `web2`, which role `server` does not select",
            ],
        ),
        // ------------------------------------------------ VMs and networks
        case(
            "machines_share_a_state_directory",
            Invalid,
            &[
                (
                    "a.yaml",
                    leak(format!(
                        "{WEB1}---\n{}---\n{}",
                        WEB1.replace("web1", "web2").replace(
                            "{host: 10.0.0.5}",
                            "{host: 10.0.0.5, port: 22, stateDir: /var/lib/converge/}"
                        ),
                        WEB1.replace("web1", "web3")
                            .replace("{host: 10.0.0.5}", "{host: 10.0.0.5, port: 2222}"),
                    )),
                ),
                (
                    "b.yaml",
                    leak(format!(
                        "{}---\n{}---\n{}",
                        WEB1.replace("web1", "local1")
                            .replace("{host: 10.0.0.5}", "{local: true}"),
                        WEB1.replace("web1", "local2").replace(
                            "{host: 10.0.0.5}",
                            "{local: true, stateDir: /var/lib/converge}"
                        ),
                        WEB1.replace("web1", "local3")
                            .replace("{host: 10.0.0.5}", "{local: true, stateDir: /srv/converge}"),
                    )),
                ),
            ],
            &[
                "machines `web1` and `web2` share the state directory /var/lib/converge on 10.0.0.5 port 22",
                "a.yaml:12:48",
                "machine `web1` uses it at a.yaml:5:18",
                "machines `local1` and `local2` share the state directory /var/lib/converge on the controller's own host",
                "b.yaml:12:35",
                "machine `local1` uses it at b.yaml:5:19",
            ],
        ),
        case(
            "forward_clash_on_one_host",
            Invalid,
            &[(
                "vms.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  network: {forwards: [{host: 2222, guest: 22}]}
---
apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm2}
spec:
  memory: 1GiB
  network: {forwards: [{host: 2222, guest: 22}]}
",
            )],
            &[
                "vms.yaml:13:31",
                "already forwarded by VM `vm1`",
                "first forwarded at vms.yaml:6:31",
            ],
        ),
        case(
            "same_forward_on_different_hosts_is_fine",
            Valid,
            &[
                ("hosts.yaml", hypervisors),
                (
                    "vms.yaml",
                    "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  host: hyper1
  memory: 1GiB
  network: {forwards: [{host: 2222, guest: 22}]}
---
apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm2}
spec:
  host: hyper2
  memory: 1GiB
  network: {forwards: [{host: 2222, guest: 22}]}
---
apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm3}
spec:
  host: local
  memory: 1GiB
  network: {forwards: [{host: 2222, guest: 22}]}
",
                ),
            ],
            &[],
        ),
        case(
            "bridge_mode_without_bridge",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  network: {mode: bridge}
",
            )],
            &["vm.yaml:6:19", "needs `bridge: <interface>`"],
        ),
        case(
            "forwards_in_bridge_mode",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  network: {mode: bridge, bridge: br0, forwards: [{host: 2222, guest: 22}]}
",
            )],
            &["vm.yaml:6:58", "`forwards` need `mode: user`"],
        ),
        // ------------------------------------------------ paths
        case(
            "backing_image_climbs_out",
            Invalid,
            &[(
                "vms/vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  disks: [{name: root, size: 8GiB, backingImage: ../images/base.qcow2}]
",
            )],
            &[
                "vms/vm.yaml:6:50",
                "backing image `../images/base.qcow2` climbs out",
            ],
        ),
        case(
            "kernel_and_initrd_climb_out",
            Invalid,
            &[(
                "vm.yaml",
                "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  boot:
    kernel: images/../../vmlinuz
    initrd: ../initrd.img
",
            )],
            &["vm.yaml:7:13", "vm.yaml:8:13", "kernel", "initrd"],
        ),
        case(
            "build_script_climbs_out",
            Invalid,
            &[("m.yaml", &WEB1.replace("./build.sh", "../build.sh"))],
            &["m.yaml:6:", "build program `../build.sh` climbs out"],
        ),
        case(
            "absolute_paths_are_allowed",
            Valid,
            &[
                (
                    "m.yaml",
                    &WEB1.replace("./build.sh", "/usr/local/bin/build-web"),
                ),
                (
                    "vm.yaml",
                    "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 1GiB
  disks: [{name: root, size: 8GiB, backingImage: /srv/images/base.qcow2}]
  boot: {kernel: /boot/vmlinuz, initrd: /boot/initrd.img}
",
                ),
            ],
            &[],
        ),
        case(
            "build_neither_command_nor_nix",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace("{command: [\"./build.sh\"]}", "{timeout: 5m}"),
            )],
            &["m.yaml:3:18", "neither `command` nor `nix`"],
        ),
        case(
            "wrong_type_port_word",
            Invalid,
            &[(
                "m.yaml",
                &WEB1.replace("{host: 10.0.0.5}", "{host: 10.0.0.5, port: ssh}"),
            )],
            &["m.yaml:5:34", "whole number"],
        ),
        case(
            "wrong_type_mapping_for_scalar",
            Invalid,
            &[("m.yaml", &format!("{WEB1}  drift: {{mode: warn}}\n"))],
            &["m.yaml:7:11", "expected one of correct, warn, ignore"],
        ),
        case(
            "unknown_enum_value",
            Invalid,
            &[("m.yaml", &format!("{WEB1}  drift: fix\n"))],
            &["m.yaml:7:10", "`fix`", "correct, warn, ignore"],
        ),
        case(
            "nesting_beyond_the_limit",
            Invalid,
            &[(
                "s.yaml",
                leak(format!(
                    "apiVersion: converge/v1\nkind: Service\nmetadata: {{name: deep}}\nspec:\n  module: m\n  settings: {{x: {}{}}}\n  roles: {{r: {{tags: [all]}}}}\n",
                    "[".repeat(100),
                    "]".repeat(100)
                )),
            )],
            &["s.yaml:6:", "too deeply nested"],
        ),
        case(
            "valid_yaml_edge_cases",
            Valid,
            &[
                ("bom.yaml", leak(format!("\u{feff}{WEB1}"))),
                (
                    "crlf.yaml",
                    leak(
                        WEB1.replace("web1", "web2")
                            .replace("10.0.0.5", "10.0.0.6")
                            .replace('\n', "\r\n"),
                    ),
                ),
                (
                    "directive.yaml",
                    leak(format!(
                        "%YAML 1.2\n---\n{}...\n",
                        WEB1.replace("web1", "web3").replace("10.0.0.5", "10.0.0.7")
                    )),
                ),
                (
                    "markers.yml",
                    leak(format!(
                        "# only comments here\n---\n---\n# and here\n--- {}\n...\n# trailing comment\n",
                        "{apiVersion: converge/v1, kind: Machine, metadata: {name: web4}, spec: {target: {local: true}, build: {nix: {flake: .#web4}}}}"
                    )),
                ),
                ("empty.yaml", ""),
                ("comments.yaml", "# nothing yet\n"),
            ],
            &[],
        ),
        // ------------------------------------------------ hostile files
        bytes_case(
            "binary_file",
            vec![(
                "blob.yaml",
                b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00>\x00".to_vec(),
            )],
            &["blob.yaml:1:1", "NUL byte"],
        ),
        bytes_case(
            "non_utf8_file",
            vec![(
                "m.yaml",
                b"# caf\xe9 latin-1\napiVersion: converge/v1\n".to_vec(),
            )],
            &["m.yaml:1:6", "not UTF-8"],
        ),
        bytes_case(
            "nul_byte",
            vec![("m.yaml", WEB1.replace("10.0.0.5", "10.0.\0.5").into_bytes())],
            &["m.yaml:5:1", "NUL byte"],
        ),
        case(
            "alias_bomb",
            Invalid,
            &[(
                "bomb.yaml",
                "apiVersion: converge/v1
kind: Service
metadata: {name: bomb}
spec:
  module: lol
  settings:
    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
  roles: {all: {tags: [all]}}
",
            )],
            &["bomb.yaml:", "too many aliases", "simplify it"],
        ),
        bytes_case(
            "deeply_nested_document",
            vec![("deep.yaml", "[".repeat(10_000).into_bytes())],
            &["deep.yaml:1:", "too deeply nested"],
        ),
        case(
            "control_characters_in_a_value_are_escaped",
            Invalid,
            &[(
                "m.yaml",
                &format!("{WEB1}  drift: \"\\e]0;owned\\a\\e[2J\\u009b31mfix\"\n"),
            )],
            &[
                "m.yaml:7:10",
                "\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{9b}31mfix",
            ],
        ),
        bytes_case(
            "control_characters_in_the_source_are_escaped",
            vec![(
                "m.yaml",
                format!("{WEB1}  \u{1b}[2Jcolour: \"r\u{1b}[31mé\u{202e}d\"\n").into_bytes(),
            )],
            &["m.yaml:7:", "\\u{1b}[2Jcolour"],
        ),
        bytes_case(
            "huge_file",
            vec![("huge.yaml", huge_file())],
            &["huge.yaml", "more than the limit of 4194304 bytes"],
        ),
        // ------------------------------------------------ many errors at once
        case(
            "several_errors_in_one_document",
            Invalid,
            &[
                (
                    "m.yaml",
                    "apiVersion: converge/v1
kind: Machine
metadata: {name: web1, tags: [web, Prod]}
spec:
  target: {host: 10.0.0.5, port: 0, usr: root}
  build: {command: [\"./build.sh\"]}
  activation:
    mode: swich
    healthChecks: [{timeout: 60s}]
  drift: fix
  colour: blue
",
                ),
                (
                    "vm.yaml",
                    "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  cpus: many
  memory: 2GB
  disks: [{name: root, size: 20GiB, backing: base.qcow2}]
  network: {mode: nat, forwards: [{host: 2222, guest: 22, protocol: sctp}]}
  onDelete: shred
",
                ),
                (
                    "s.yaml",
                    "apiVersion: converge/v1
kind: Service
metadata: {name: vpn}
spec:
  module: wireguard
  roles:
    Peer: {tags: [all], after: controller}
    controller: {machine: [gw]}
",
                ),
            ],
            &[
                "m.yaml:3:36",
                "m.yaml:5:34",
                "m.yaml:5:37",
                "m.yaml:8:11",
                "m.yaml:9:21",
                "m.yaml:10:10",
                "m.yaml:11:3",
                "vm.yaml:5:9",
                "vm.yaml:6:11",
                "vm.yaml:7:37",
                "vm.yaml:8:19",
                "vm.yaml:8:69",
                "vm.yaml:9:13",
                "s.yaml:7:5",
                "s.yaml:7:32",
                "s.yaml:8:18",
            ],
        ),
        case(
            "every_bad_file_is_reported",
            Invalid,
            &[
                ("a.yaml", &WEB1.replace("web1", "Web1")),
                ("b/c.yaml", &format!("{WEB1}  colour: blue\n")),
                (
                    "d.yaml",
                    "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  memory: 2GB
",
                ),
                ("e.yaml", &WEB1.replace("kind: Machine", "kind: Pod")),
            ],
            &["a.yaml:3:18", "b/c.yaml:7:3", "d.yaml:5:11", "e.yaml:2:7"],
        ),
        case(
            "bad_document_does_not_hide_the_next",
            Invalid,
            &[(
                "m.yaml",
                leak(format!(
                    "{}---\n{}---\n{WEB1}",
                    WEB1.replace("web1", "web_1"),
                    WEB1.replace("10.0.0.5", "10.0.0.6, hots: x")
                        .replace("web1", "web2"),
                )),
            )],
            &["m.yaml:3:18", "m.yaml:12:", "hots"],
        ),
    ]
}

/// A file over the size limit that is otherwise a valid document.
fn huge_file() -> Vec<u8> {
    let mut text = String::from(WEB1);
    let comment = format!("# {}\n", "x".repeat(1021));
    while text.len() <= MAX_FILE_BYTES {
        text.push_str(&comment);
    }
    text.into_bytes()
}

/// The input as a reviewer needs it: each file with line numbers; binary or
/// large files summarized.
fn describe_input(files: &[(&'static str, Vec<u8>)]) -> String {
    let mut out = String::new();
    for (path, bytes) in files {
        match std::str::from_utf8(bytes) {
            Ok(text) if bytes.len() <= 4096 && !text.contains('\0') => {
                out.push_str(&format!("=== {path}\n"));
                for (i, line) in text.lines().enumerate() {
                    out.push_str(&format!("{:>3} | {}\n", i + 1, escape_text(line)));
                }
            }
            _ => out.push_str(&format!("=== {path} ({} bytes, not shown)\n", bytes.len())),
        }
    }
    out
}

fn check(case: &Case) -> Result<(), String> {
    let dir = write_dir(&case.files);
    let started = std::time::Instant::now();
    let assembled = load(dir.path());
    let elapsed = started.elapsed();
    let diagnostics = render(&assembled);
    let mut problems = Vec::new();
    if elapsed > std::time::Duration::from_secs(5) {
        problems.push(format!("loading took {elapsed:?}"));
    }
    match (case.expect, &assembled.desired) {
        (Invalid, Some(_)) => problems.push("loaded as valid, expected errors".to_owned()),
        (Valid, None) => problems.push("rejected, expected a valid directory".to_owned()),
        _ => {}
    }
    if case.expect == Invalid && assembled.errors().next().is_none() {
        problems.push("no error diagnostic".to_owned());
    }
    if let Some(c) = diagnostics
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\t'))
    {
        problems.push(format!(
            "diagnostics print the control character {c:?} as it is"
        ));
    }
    let root = dir.path().to_string_lossy();
    if diagnostics.contains(root.as_ref()) {
        problems.push("diagnostics contain the temporary directory's path".to_owned());
    }
    for fragment in &case.must_contain {
        if !diagnostics.contains(fragment) {
            problems.push(format!("diagnostics lack `{fragment}`"));
        }
    }
    let snapshot = format!(
        "{}--- {} ---\n{}",
        describe_input(&case.files),
        if assembled.desired.is_some() {
            "valid"
        } else {
            "invalid"
        },
        diagnostics
    );
    let snapshot_result = catch_unwind(AssertUnwindSafe(|| {
        insta::assert_snapshot!(case.name, snapshot);
    }));
    if snapshot_result.is_err() {
        problems.push("snapshot differs (see above)".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "case {}: {}\n{diagnostics}",
            case.name,
            problems.join("; ")
        ))
    }
}

#[test]
fn invalid_inputs_are_reported_with_file_line_column_and_advice() {
    let cases = cases();
    assert!(cases.len() >= 30, "the table shrank to {}", cases.len());
    let mut names = std::collections::BTreeSet::new();
    for c in &cases {
        assert!(names.insert(c.name), "case name {} used twice", c.name);
    }
    let failures: Vec<String> = cases.iter().filter_map(|c| check(c).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn a_directory_with_several_bad_files_reports_every_error() {
    let bad_name = WEB1.replace("web1", "Web1");
    let unknown_field = format!("{}  colour: blue\n", WEB1.replace("web1", "web2"));
    let bad_ref = "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm1}
spec:
  host: ghost
  memory: 2GB
---
apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: vm2}
spec:
  host: ghost
  memory: 1GiB
";
    let dir = write_dir(&[
        ("a.yaml", bad_name.as_str()),
        ("b/c.yaml", unknown_field.as_str()),
        ("d.yaml", bad_ref),
        ("ok.yaml", WEB1),
    ]);
    let assembled = load(dir.path());
    assert!(assembled.desired.is_none());
    let files: std::collections::BTreeSet<String> = assembled
        .errors()
        .map(|d| d.file.display().to_string())
        .collect();
    let expected: std::collections::BTreeSet<String> = ["a.yaml", "b/c.yaml", "d.yaml"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(files, expected, "{}", render(&assembled));
    // d.yaml: vm1's bad size (a parse error) and vm2's dangling host (a
    // cross-object error found although vm1 did not parse).
    let in_d: Vec<(u32, u32)> = assembled
        .errors()
        .filter(|d| d.file.as_os_str() == "d.yaml")
        .map(|d| (d.line, d.column))
        .collect();
    assert_eq!(in_d, vec![(6, 11), (12, 9)], "{}", render(&assembled));
}

#[test]
fn one_bad_document_does_not_hide_errors_in_the_next() {
    let text = format!(
        "{}---\n{}---\n{}",
        WEB1.replace("web1", "web_1"),
        WEB1.replace("web1", "web2")
            .replace("kind: Machine", "kind: Pod"),
        WEB1.replace("web1", "web3")
            .replace("10.0.0.5", "10.0.0.5, port: 0"),
    );
    let dir = write_dir(&[("m.yaml", text.as_str())]);
    let assembled = load(dir.path());
    let positions: Vec<(u32, u32)> = assembled.errors().map(|d| (d.line, d.column)).collect();
    assert_eq!(
        positions,
        vec![(3, 18), (9, 7), (19, 34)],
        "{}",
        render(&assembled)
    );
}

#[test]
fn validate_reports_every_error_of_a_document_in_one_run() {
    use crate::support::Fleet;
    let fleet = Fleet::new();
    fleet.write(
        "m.yaml",
        &format!(
            "{}  drift: fix\n  colour: blue\n",
            fleet.machine("web", &[], &[], "")
        ),
    );
    let dir = fleet.dir();
    let run = fleet.converge(&["validate", "--dir", dir.to_str().expect("utf-8")]);
    run.assert_code(1);
    for fragment in [
        "unknown variant `fix`, expected one of correct, warn, ignore",
        "--> m.yaml:9:10",
        "unknown field `colour`, expected one of target, build, activation, drift, interval",
        "--> m.yaml:10:3",
        "invalid: 2 errors",
    ] {
        assert!(
            run.stdout.contains(fragment),
            "no `{fragment}` in:\n{}",
            run.stdout
        );
    }
}
