//! Checks of the machines' targets against each other: two machines must
//! not share one state directory on one host (the same SSH host and port,
//! or both the controller's own host, and the same `stateDir`). Their
//! generations, `current` link and activation records would overwrite each
//! other, and each would roll the other back. Hosts and paths are compared
//! as written, normalized lexically (case of host names, trailing dots and
//! slashes); two names for one host (a name and its address) are not
//! noticed. It must not check anything but targets.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::spec::at::Loc;
use crate::spec::desired::Object;
use crate::spec::diagnostic::Diagnostic;
use crate::spec::model::{MachineSpec, Target};
use crate::spec::names::Name;

/// Where a target's state directory is: on which host, at which path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    /// `None` for the controller's own host.
    host: Option<(String, u16)>,
    state_dir: PathBuf,
}

impl Place {
    fn of(target: &Target) -> Option<Place> {
        let host = if target.is_local() {
            None
        } else {
            let host = target.host.as_ref()?;
            let port = target.port.as_ref().map_or(22, |p| p.value.get());
            Some((normalize_host(host.value.as_str()), port))
        };
        // A directory in a login's home is that login's: two users' defaults differ.
        let state_dir = match target.state_dir().strip_prefix("~/") {
            Some(rest) => {
                let user = target.user.as_ref().map_or("root", |u| u.value.as_str());
                normalize_path(&format!("~{user}/{rest}"))
            }
            None => normalize_path(target.state_dir()),
        };
        Some(Place { host, state_dir })
    }

    fn describe(&self) -> String {
        let dir = self.state_dir.display();
        match &self.host {
            None => format!("{dir} on the controller's own host"),
            Some((host, port)) => format!("{dir} on {host} port {port}"),
        }
    }
}

/// One host written two ways the same: case, a trailing dot, an IPv6
/// address in another notation.
fn normalize_host(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.trim_end_matches('.').to_ascii_lowercase(),
    }
}

/// One path written two ways the same: repeated or trailing slashes, `.`.
fn normalize_path(path: &str) -> PathBuf {
    Path::new(path)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Where a diagnostic about a machine's target points: its `stateDir`,
/// else its `host` or `local`, else its name.
fn target_loc(object: &Object<MachineSpec>) -> Loc {
    let target = &object.spec.target;
    target
        .state_dir
        .as_ref()
        .map(|d| d.loc)
        .or(target.host.as_ref().map(|h| h.loc))
        .or(target.local.as_ref().map(|l| l.loc))
        .unwrap_or(object.name_loc)
}

pub(super) fn check_shared_state_dirs(
    machines: &BTreeMap<Name, Arc<Object<MachineSpec>>>,
    diags: &mut Vec<Diagnostic>,
) {
    let mut by_place: BTreeMap<Place, Vec<&Object<MachineSpec>>> = BTreeMap::new();
    for machine in machines.values() {
        if let Some(place) = Place::of(&machine.spec.target) {
            by_place.entry(place).or_default().push(machine);
        }
    }
    for (place, mut sharing) in by_place.into_iter().filter(|(_, m)| m.len() > 1) {
        // The first is the one the user reads first: by file, then position.
        sharing.sort_by_key(|m| (m.origin.file.clone(), m.origin.position(m.name_loc)));
        let Some((first, others)) = sharing.split_first() else {
            continue;
        };
        for machine in others {
            diags.push(
                machine
                    .origin
                    .error(
                        target_loc(machine),
                        format!(
                            "machines `{}` and `{}` share the state directory {}: their generations would overwrite each other; give one of them another `stateDir`",
                            first.key.name,
                            machine.key.name,
                            place.describe()
                        ),
                    )
                    .with_related(first.origin.related(
                        target_loc(first),
                        format!("machine `{}` uses it", first.key.name),
                    )),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::spec::parse::parse_file;
    use crate::spec::validate::assemble;

    fn machine(name: &str, target: &str) -> String {
        format!(
            "apiVersion: converge/v1\nkind: Machine\nmetadata: {{name: {name}}}\nspec:\n  target: {target}\n  build: {{command: [./build.sh]}}\n"
        )
    }

    /// The state-directory errors of `files`: (file:line:col, message, note).
    fn clashes(files: &[(&str, Vec<String>)]) -> Vec<(String, String, String)> {
        let parsed: Vec<_> = files
            .iter()
            .map(|(path, docs)| parse_file(Path::new(path), docs.join("---\n").as_bytes()))
            .collect();
        assemble(Path::new("/d"), &parsed)
            .diagnostics
            .into_iter()
            .filter(|d| d.message.contains("share the state directory"))
            .map(|d| {
                let note = d
                    .related
                    .first()
                    .map(|r| format!("{} {}:{}:{}", r.message, r.file.display(), r.line, r.column))
                    .unwrap_or_default();
                (
                    format!("{}:{}:{}", d.file.display(), d.line, d.column),
                    d.message,
                    note,
                )
            })
            .collect()
    }

    #[test]
    fn one_host_written_two_ways_is_one_host() {
        let same = [
            (
                "{host: web.example.org}",
                "{host: WEB.example.org., port: 22}",
            ),
            ("{host: \"::1\"}", "{host: \"0:0:0:0:0:0:0:1\"}"),
            (
                "{host: 10.0.0.5}",
                "{host: 10.0.0.5, stateDir: /var/lib//converge/./}",
            ),
            (
                "{local: true}",
                "{local: true, stateDir: /var/lib/converge}",
            ),
        ];
        for (a, b) in same {
            let found = clashes(&[("m.yaml", vec![machine("a", a), machine("b", b)])]);
            assert_eq!(found.len(), 1, "{a} and {b}: {found:?}");
        }
        let apart = [
            ("{host: 10.0.0.5}", "{host: 10.0.0.6}"),
            ("{host: 10.0.0.5}", "{host: 10.0.0.5, port: 2222}"),
            ("{host: 10.0.0.5}", "{host: 10.0.0.5, stateDir: /srv/b}"),
            ("{local: true}", "{host: 10.0.0.5}"),
            (
                "{local: true, stateDir: /srv/a}",
                "{local: true, stateDir: /srv/b}",
            ),
        ];
        for (a, b) in apart {
            let found = clashes(&[("m.yaml", vec![machine("a", a), machine("b", b)])]);
            assert_eq!(found, [], "{a} and {b}");
        }
    }

    #[test]
    fn logins_without_sudo_default_to_their_own_home_and_sudo_to_the_system_directory() {
        // Two non-root logins on one host: two homes.
        let found = clashes(&[(
            "m.yaml",
            vec![
                machine("a", "{host: h, user: alice}"),
                machine("b", "{host: h, user: bob}"),
            ],
        )]);
        assert_eq!(found, []);
        // One login twice, or sudo and root: one directory.
        for (a, b) in [
            ("{host: h, user: alice}", "{host: h, user: alice, port: 22}"),
            ("{host: h, user: alice, sudo: true}", "{host: h}"),
        ] {
            let found = clashes(&[("m.yaml", vec![machine("a", a), machine("b", b)])]);
            assert_eq!(found.len(), 1, "{a} and {b}: {found:?}");
        }
    }

    #[test]
    fn sudo_is_refused_on_a_local_target_and_with_the_root_login() {
        for (target, expected) in [
            (
                "{local: true, sudo: true}",
                "do not apply to a `local: true` target",
            ),
            (
                "{host: h, sudo: true}",
                "`sudo: true` with the root login does nothing",
            ),
            (
                "{host: h, user: root, sudo: true}",
                "`sudo: true` with the root login",
            ),
        ] {
            let parsed = parse_file(Path::new("m.yaml"), machine("a", target).as_bytes());
            let messages: Vec<String> = assemble(Path::new("/d"), &[parsed])
                .diagnostics
                .into_iter()
                .map(|d| d.message)
                .collect();
            assert!(
                messages.iter().any(|m| m.contains(expected)),
                "{target}: {messages:?}"
            );
        }
        let parsed = parse_file(
            Path::new("m.yaml"),
            machine("a", "{host: h, user: deploy, sudo: true}").as_bytes(),
        );
        assert_eq!(assemble(Path::new("/d"), &[parsed]).diagnostics.len(), 0);
    }

    #[test]
    fn a_hypervisor_machine_without_root_needs_an_absolute_state_dir() {
        let vm = "apiVersion: converge/v1\nkind: VirtualMachine\nmetadata: {name: v}\nspec: {host: h, memory: 64MiB, cpus: 1}\n";
        let messages = |target: &str| -> Vec<String> {
            let docs = [machine("h", target), vm.to_owned()].join("---\n");
            let parsed = parse_file(Path::new("m.yaml"), docs.as_bytes());
            assemble(Path::new("/d"), &[parsed])
                .diagnostics
                .into_iter()
                .map(|d| d.message)
                .collect()
        };
        let found = messages("{host: x, user: deploy}");
        assert!(
            found.iter().any(|m| m.contains("absolute `stateDir`")),
            "{found:?}"
        );
        for fine in [
            "{host: x, user: deploy, stateDir: /srv/converge}",
            "{host: x, user: deploy, sudo: true}",
            "{host: x}",
        ] {
            let found = messages(fine);
            assert!(
                !found.iter().any(|m| m.contains("stateDir")),
                "{fine}: {found:?}"
            );
        }
    }

    #[test]
    fn the_later_machine_in_reading_order_is_the_one_reported_pointing_at_the_first() {
        // `zz` comes first in the files, `aa` later; the name order is the reverse.
        let found = clashes(&[
            ("a.yaml", vec![machine("zz", "{local: true}")]),
            (
                "b.yaml",
                vec![
                    machine("aa", "{local: true}"),
                    machine("mm", "{local: true, stateDir: /var/lib/converge/}"),
                ],
            ),
        ]);
        assert_eq!(
            found,
            [
                (
                    "b.yaml:5:19".to_owned(),
                    "machines `zz` and `aa` share the state directory /var/lib/converge on the controller's own host: their generations would overwrite each other; give one of them another `stateDir`".to_owned(),
                    "machine `zz` uses it a.yaml:5:19".to_owned(),
                ),
                (
                    "b.yaml:12:35".to_owned(),
                    "machines `zz` and `mm` share the state directory /var/lib/converge on the controller's own host: their generations would overwrite each other; give one of them another `stateDir`".to_owned(),
                    "machine `zz` uses it a.yaml:5:19".to_owned(),
                ),
            ]
        );
    }
}
