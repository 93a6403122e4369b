//! Incremental reloads: a `Source` that reloads after edits returns exactly
//! what a cold load of the same directory returns (diagnostics, objects,
//! roles documents and hashes), and reuses the roles documents that its
//! edits cannot have changed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use converge::source::Source;
use converge::spec::{Assembled, DesiredState, Diagnostic, MachineRoles, Name, ObjectKey};

use crate::support::desired::{render, write_dir};

/// Everything a load yields that a reload must reproduce.
#[derive(Debug, PartialEq)]
struct Outcome {
    diagnostics: Vec<Diagnostic>,
    /// Spec hash and file of every object, when the directory is valid.
    objects: Option<BTreeMap<ObjectKey, (String, String)>>,
    roles: Option<BTreeMap<Name, MachineRoles>>,
}

fn outcome(assembled: &Assembled) -> Outcome {
    let desired = assembled.desired.as_ref();
    Outcome {
        diagnostics: assembled.diagnostics.clone(),
        objects: desired.map(|d| {
            let file = |o: &Path| o.display().to_string();
            let machines = d
                .machines
                .values()
                .map(|o| (&o.key, &o.spec_hash, file(&o.origin.file)));
            let vms = d
                .vms
                .values()
                .map(|o| (&o.key, &o.spec_hash, file(&o.origin.file)));
            let services = d
                .services
                .values()
                .map(|o| (&o.key, &o.spec_hash, file(&o.origin.file)));
            machines
                .chain(vms)
                .chain(services)
                .map(|(key, hash, file)| (key.clone(), (hash.clone(), file)))
                .collect()
        }),
        roles: desired.map(|d| {
            d.roles
                .iter()
                .map(|(name, roles)| (name.clone(), MachineRoles::clone(roles)))
                .collect()
        }),
    }
}

fn cold(dir: &Path) -> Assembled {
    Source::new(dir).load().expect("load").0
}

fn reload(source: &mut Source) -> Assembled {
    source.load().expect("load").0
}

fn valid(assembled: Assembled) -> DesiredState {
    match assembled.desired {
        Some(desired) => desired,
        None => panic!("expected a valid directory, got:\n{}", render(&assembled)),
    }
}

/// Writes `text` to `path` with an mtime of its own in the past, so the
/// source sees a new fingerprint and other files stay outside its racy
/// window (and are reused).
fn write(path: &Path, text: &str, step: u64) {
    std::fs::write(path, text).expect("write a file in the tempdir");
    let mtime = SystemTime::now() - Duration::from_secs(3600) + Duration::from_secs(step);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(mtime))
        .expect("set a file's mtime");
}

fn machine(name: &str, tags: &[&str], interval: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: Machine
metadata: {{name: {name}, tags: [{}]}}
spec:
  target: {{host: {name}.lan}}
  build: {{command: [\"./build.sh\"]}}
  interval: {interval}
",
        tags.join(", ")
    )
}

/// A small deterministic generator (64-bit LCG), so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const TAGS: [&str; 5] = ["web", "db", "edge", "lab", "unused"];
const MACHINE_FILES: usize = 4;

/// One generated directory: machines spread over a few files, services
/// with roles by name, by tag and `all`, `after` (cycles across services
/// happen), per-machine settings (sometimes for a machine the role does not
/// select), and a VM hosted on a machine that may disappear.
struct Fleet {
    /// Per machine file: (name, tags, interval) of each machine.
    machines: Vec<Vec<(String, Vec<&'static str>, String)>>,
    /// Per service: its document.
    services: Vec<Option<String>>,
    /// Blank lines and comments before the first service, to move locations.
    service_padding: usize,
}

impl Fleet {
    fn new(rng: &mut Rng) -> Fleet {
        let mut machines = vec![Vec::new(); MACHINE_FILES];
        for i in 0..16 {
            let tags = vec![TAGS[i % 4], TAGS[(i / 4) % 4]];
            machines[i % MACHINE_FILES].push((format!("m{i}"), tags, "5m".to_owned()));
        }
        let services = (0..5).map(|s| Some(Fleet::service(rng, s, true))).collect();
        Fleet {
            machines,
            services,
            service_padding: 0,
        }
    }

    /// A service document; a simple one selects by tag only and waits for
    /// nothing, so it is always valid.
    fn service(rng: &mut Rng, s: usize, simple: bool) -> String {
        let mut roles = String::new();
        let role_names = ["a", "b", "c"];
        for (r, role) in role_names[..2 + rng.below(2)].iter().enumerate() {
            let named = [rng.below(17), rng.below(17)];
            let selector = match rng.below(8) {
                _ if simple => format!("tags: [{}]", rng.pick(&TAGS)),
                0 => "tags: [all]".to_owned(),
                1..=3 => format!("machines: [m{}, m{}]", named[0], named[1]),
                _ => format!("tags: [{}]", rng.pick(&TAGS)),
            };
            let after = match rng.below(3) {
                0 if r > 0 && !simple => format!(", after: [{}]", role_names[rng.below(r)]),
                _ => String::new(),
            };
            let per_machine = match rng.below(6) {
                0 if !simple => format!(
                    ", perMachine: {{m{}: {{weight: {}}}}}",
                    named[rng.below(2)],
                    rng.below(9)
                ),
                _ => String::new(),
            };
            roles.push_str(&format!(
                "    {role}: {{{selector}{after}, settings: {{level: {}}}{per_machine}}}\n",
                rng.below(3)
            ));
        }
        format!(
            "apiVersion: converge/v1
kind: Service
metadata: {{name: svc{s}}}
spec:
  module: mod{}
  settings: {{port: {}, nested: {{x: {}}}}}
  roles:
{roles}",
            rng.below(2),
            8000 + rng.below(3),
            rng.below(2)
        )
    }

    fn machine_file(&self, f: usize) -> String {
        self.machines[f]
            .iter()
            .map(|(name, tags, interval)| machine(name, tags, interval))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    fn services_file(&self, half: usize) -> String {
        let padding = if half == 0 {
            "# services\n\n".repeat(self.service_padding)
        } else {
            String::new()
        };
        let docs: Vec<&str> = self
            .services
            .iter()
            .enumerate()
            .filter(|(s, _)| s % 2 == half)
            .filter_map(|(_, doc)| doc.as_deref())
            .collect();
        format!("{padding}{}", docs.join("---\n"))
    }

    fn write_all(&self, dir: &Path, step: u64) {
        for f in 0..MACHINE_FILES {
            write(
                &dir.join(format!("machines-{f}.yaml")),
                &self.machine_file(f),
                step,
            );
        }
        for half in 0..2 {
            write(
                &dir.join(format!("services-{half}.yaml")),
                &self.services_file(half),
                step,
            );
        }
        let vm = "apiVersion: converge/v1
kind: VirtualMachine
metadata: {name: ci}
spec: {host: m3, memory: 1GiB}
";
        write(&dir.join("vms.yaml"), vm, step);
    }

    /// Applies one random edit and rewrites the file it touched.
    fn edit(&mut self, rng: &mut Rng, dir: &Path, step: u64) -> String {
        let f = rng.below(MACHINE_FILES);
        let what = rng.below(12);
        let description = match what {
            0..=1 if !self.machines[f].is_empty() => {
                let i = rng.below(self.machines[f].len());
                self.machines[f][i].2 = format!("{}m", 1 + rng.below(9));
                format!("interval of {}", self.machines[f][i].0)
            }
            2..=3 if !self.machines[f].is_empty() => {
                let i = rng.below(self.machines[f].len());
                let tag = rng.pick(&TAGS);
                let tags = &mut self.machines[f][i].1;
                match tags.iter().position(|t| *t == tag) {
                    Some(at) => {
                        tags.remove(at);
                    }
                    None => tags.push(tag),
                }
                format!("tags of {}", self.machines[f][i].0)
            }
            4 => {
                // Adding a name that exists elsewhere makes a duplicate.
                let name = format!("m{}", rng.below(24));
                self.machines[f].push((name.clone(), vec![rng.pick(&TAGS)], "5m".to_owned()));
                format!("add {name}")
            }
            5 | 6 if self.machines[f].len() > 2 => {
                let i = rng.below(self.machines[f].len());
                let (name, _, _) = self.machines[f].remove(i);
                format!("remove {name}")
            }
            7 if !self.machines[f].is_empty() => {
                self.machines[f].reverse();
                "reorder a machine file".to_owned()
            }
            8 => {
                self.service_padding = rng.below(3);
                let half = 0;
                write(
                    &dir.join(format!("services-{half}.yaml")),
                    &self.services_file(half),
                    step,
                );
                return "move the services of services-0.yaml down".to_owned();
            }
            9 | 10 => {
                let s = rng.below(self.services.len());
                self.services[s] = match rng.below(6) {
                    0 => None,
                    1 | 2 => Some(Fleet::service(rng, s, false)),
                    _ => Some(Fleet::service(rng, s, true)),
                };
                let half = s % 2;
                write(
                    &dir.join(format!("services-{half}.yaml")),
                    &self.services_file(half),
                    step,
                );
                return format!("rewrite or remove svc{s}");
            }
            11 => {
                // No role selects this tag: the machine gets an empty document.
                let name = format!("m{}", 16 + rng.below(32));
                self.machines[f].push((name.clone(), vec!["spare"], "5m".to_owned()));
                format!("add {name}, in no role")
            }
            _ => "touch a machine file".to_owned(),
        };
        write(
            &dir.join(format!("machines-{f}.yaml")),
            &self.machine_file(f),
            step,
        );
        description
    }
}

#[test]
fn a_reload_after_any_sequence_of_edits_equals_a_cold_load() {
    for seed in 1..=6 {
        let mut rng = Rng(seed);
        let mut fleet = Fleet::new(&mut rng);
        let dir = write_dir::<&str, &str>(&[]);
        fleet.write_all(dir.path(), 0);
        let mut source = Source::new(dir.path());
        assert_eq!(outcome(&reload(&mut source)), outcome(&cold(dir.path())));
        let mut history = Vec::new();
        let (mut valid_loads, mut invalid_loads) = (0, 0);
        for step in 1..=60 {
            history.push(fleet.edit(&mut rng, dir.path(), step));
            let reloaded = outcome(&reload(&mut source));
            let expected = outcome(&cold(dir.path()));
            if expected.objects.is_some() {
                valid_loads += 1;
            } else {
                invalid_loads += 1;
            }
            assert!(
                reloaded == expected,
                "seed {seed}, after edits {history:?}:\nreloaded {reloaded:#?}\ncold {expected:#?}"
            );
        }
        // The sequence exercises both outcomes, or it proves little.
        assert!(
            valid_loads > 5 && invalid_loads > 5,
            "seed {seed}: {valid_loads} valid, {invalid_loads} invalid loads"
        );
    }
}

/// Three machines in one file (and any `extra`), two services in another.
fn small_fleet(dir: &Path, web_tags: &[&str], interval: &str, vpn_port: u16, extra: &[&str]) {
    let mut machines = vec![
        machine("web1", web_tags, interval),
        machine("db1", &["db"], "5m"),
        machine("lab1", &["lab"], "5m"),
    ];
    machines.extend(extra.iter().map(|name| machine(name, &["idle"], "5m")));
    let machines = machines.join("---\n");
    write(&dir.join("machines.yaml"), &machines, 1);
    let services = format!(
        "apiVersion: converge/v1
kind: Service
metadata: {{name: shop}}
spec:
  module: shop
  roles:
    frontend: {{tags: [web], after: [store]}}
    store: {{tags: [db]}}
---
apiVersion: converge/v1
kind: Service
metadata: {{name: vpn}}
spec:
  module: wireguard
  settings: {{port: {vpn_port}}}
  roles:
    hub: {{machines: [db1]}}
    spoke: {{tags: [lab, vpn], after: [hub]}}
"
    );
    write(&dir.join("services.yaml"), &services, 1);
}

fn same_document(a: &DesiredState, b: &DesiredState, machine: &str) -> bool {
    Arc::ptr_eq(&a.roles[machine], &b.roles[machine])
}

#[test]
fn editing_only_a_machine_spec_reuses_every_roles_document() {
    let dir = write_dir::<&str, &str>(&[]);
    small_fleet(dir.path(), &["web"], "5m", 51820, &[]);
    let mut source = Source::new(dir.path());
    let before = valid(reload(&mut source));

    small_fleet(dir.path(), &["web"], "9m", 51820, &[]);
    let after_load = reload(&mut source);
    assert_eq!(outcome(&after_load), outcome(&cold(dir.path())));
    let after = valid(after_load);
    assert_ne!(
        before.machines["web1"].spec_hash,
        after.machines["web1"].spec_hash
    );
    for machine in ["web1", "db1", "lab1"] {
        assert!(
            same_document(&before, &after, machine),
            "{machine} was resolved again"
        );
    }
}

#[test]
fn editing_tags_or_a_service_resolves_its_members_again_like_a_cold_load() {
    let dir = write_dir::<&str, &str>(&[]);
    small_fleet(dir.path(), &["web"], "5m", 51820, &[]);
    let mut source = Source::new(dir.path());
    let before = valid(reload(&mut source));

    // web1 joins the vpn's spokes: its document and the hub's change; the
    // lab's spoke document lists only the hub, so it stays.
    small_fleet(dir.path(), &["web", "vpn"], "5m", 51820, &[]);
    let tagged_load = reload(&mut source);
    assert_eq!(outcome(&tagged_load), outcome(&cold(dir.path())));
    let tagged = valid(tagged_load);
    assert_ne!(before.roles["web1"].hash, tagged.roles["web1"].hash);
    assert_ne!(before.roles["db1"].hash, tagged.roles["db1"].hash);
    assert_eq!(before.roles["lab1"].hash, tagged.roles["lab1"].hash);

    // A vpn setting changes the documents of the vpn's members only; the
    // shop's members outside the vpn keep theirs, not even resolved again.
    small_fleet(dir.path(), &["web"], "5m", 51821, &[]);
    let untagged = valid(reload(&mut source));
    small_fleet(dir.path(), &["web"], "5m", 51999, &[]);
    let service_load = reload(&mut source);
    assert_eq!(outcome(&service_load), outcome(&cold(dir.path())));
    let edited = valid(service_load);
    assert_ne!(untagged.roles["db1"].hash, edited.roles["db1"].hash);
    assert_ne!(untagged.roles["lab1"].hash, edited.roles["lab1"].hash);
    assert!(
        same_document(&untagged, &edited, "web1"),
        "web1 is not in the vpn"
    );

    // A new machine in no role gets an empty document; the others keep theirs.
    small_fleet(dir.path(), &["web"], "5m", 51999, &["idle1"]);
    let added_load = reload(&mut source);
    assert_eq!(outcome(&added_load), outcome(&cold(dir.path())));
    let added = valid(added_load);
    assert_eq!(
        &*added.roles["idle1"].document,
        br#"{"machine":"idle1","services":{}}"#
    );
    for machine in ["web1", "db1", "lab1"] {
        assert!(
            same_document(&edited, &added, machine),
            "{machine} was resolved again"
        );
    }
}
