//! Desired-state loading benchmark: generates a large directory and times
//! cold loads, reloads after one file changed, and where the time goes.
//!
//! Run in release: `cargo run --release --bin bench-load`. Prints numbers;
//! BENCHMARKS.md records them. Options: `--all-service` adds one service
//! whose role selects every machine (`tags: [all]`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use converge::source::{LoadStats, Source};
use converge::spec::parse::{ParsedFile, ParsedObject, parse_file};
use converge::spec::roles::{self, Members};
use converge::spec::{Name, ServiceSpec, assemble};

const MACHINE_FILES: usize = 500;
const MACHINES_PER_FILE: usize = 16;
const VM_FILES: usize = 300;
const VMS_PER_FILE: usize = 5;
const SERVICE_FILES: usize = 200;
const SERVICES: usize = 500;
/// Machines m0000..m0299 are infrastructure: servers of services, never clients.
const INFRA: usize = 300;
const SITES: usize = 20;
const RACKS: usize = 200;
const KINDS: [&str; 10] = [
    "web", "db", "cache", "queue", "worker", "storage", "edge", "build", "hv", "misc",
];
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMzF7DriQ4T2pY6rNprVCreoHiN39UEyrA0sXYy4MI/Z";

/// Removes the generated directory, also on panic.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn machine_name(i: usize) -> String {
    format!("m{i:04}")
}

fn kind_of(i: usize) -> &'static str {
    KINDS[(i / 7) % KINDS.len()]
}

fn machine_doc(i: usize, interval: &str) -> String {
    let name = machine_name(i);
    let site = i % SITES;
    let tags = if i < INFRA {
        format!("infra, site-{site}")
    } else {
        let monitored = if i % 3 == 0 { "" } else { ", monitored" };
        format!(
            "site-{site}, rack-{}, kind-{}{monitored}",
            i % RACKS,
            kind_of(i)
        )
    };
    let build = if i % 4 == 0 {
        format!("{{nix: {{flake: \".#{name}\"}}}}")
    } else {
        "{command: [\"./build/machine.sh\"], timeout: 20m}".to_owned()
    };
    format!(
        "# machine {name}: site {site}
apiVersion: converge/v1
kind: Machine
metadata:
  name: {name}
  tags: [{tags}]
spec:
  target: {{host: {name}.dc{site}.example.org, user: root, port: 22, hostKey: \"{HOST_KEY}\"}}
  build: {build}
  activation:
    mode: switch
    healthChecks:
      - exec: [\"systemctl\", \"is-system-running\", \"--wait\"]
        timeout: 60s
    rollback: auto
  drift: correct
  interval: {interval}
"
    )
}

fn machine_file(file: usize, interval: &str) -> String {
    (0..MACHINES_PER_FILE)
        .map(|k| machine_doc(file * MACHINES_PER_FILE + k, interval))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn vm_doc(v: usize, hypervisors: &[usize]) -> String {
    let host = hypervisors[v % hypervisors.len()];
    let slot = v / hypervisors.len();
    format!(
        "apiVersion: converge/v1
kind: VirtualMachine
metadata: {{name: vm{v:04}}}
spec:
  host: {host}
  state: running
  cpus: {cpus}
  memory: {mem}GiB
  disks:
    - {{name: root, size: 20GiB, backingImage: images/debian-12.qcow2}}
    - {{name: data, size: 100GiB}}
  network:
    mode: user
    forwards:
      - {{host: {port}, guest: 22}}
  onDelete: keep-disks
",
        host = machine_name(host),
        cpus = 1 + v % 4,
        mem = 1 + v % 8,
        port = 20_000 + slot,
    )
}

fn service_doc(j: usize, all_service: bool) -> String {
    let servers: Vec<String> = (0..3).map(|k| machine_name((j * 3 + k) % INFRA)).collect();
    let rack = j % RACKS;
    // A machine of that rack outside the infrastructure range.
    let special = machine_name(rack + RACKS * 2);
    let observer = if j % 10 == 0 {
        format!(
            "    observer:\n      tags: [kind-{}]\n      after: [server]\n      settings: {{mode: passive}}\n",
            KINDS[(j / 10) % KINDS.len()]
        )
    } else {
        String::new()
    };
    let everyone = if all_service && j == 0 {
        "    agent: {tags: [all], settings: {port: 9100}}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: converge/v1
kind: Service
metadata: {{name: svc{j:03}}}
spec:
  module: module-{module}
  settings:
    port: {port}
    tls: {{enabled: true, ciphers: [TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384]}}
    limits: {{cpu: 2, memory: 512Mi}}
  roles:
    server:
      machines: [{servers}]
      settings: {{replicas: 3, tls: {{cert: /etc/ssl/svc{j:03}.pem}}}}
    client:
      tags: [rack-{rack}]
      after: [server]
      settings: {{retries: 5, limits: {{cpu: 1}}}}
      perMachine:
        {special}: {{retries: 9}}
{observer}{everyone}",
        module = j % 25,
        port = 10_000 + j,
        servers = servers.join(", "),
    )
}

type Error = Box<dyn std::error::Error>;

fn write(root: &Path, relative: &str, text: &str) -> std::io::Result<()> {
    let path = root.join(relative);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, text)
}

/// Writes the directory; returns the machine file to rewrite for reloads.
fn generate(root: &Path, all_service: bool) -> std::io::Result<PathBuf> {
    for f in 0..MACHINE_FILES {
        write(
            root,
            &format!("machines/site-{:02}/batch-{f:03}.yaml", f % SITES),
            &machine_file(f, "5m"),
        )?;
    }
    let hypervisors: Vec<usize> = (INFRA..MACHINE_FILES * MACHINES_PER_FILE)
        .filter(|i| kind_of(*i) == "hv")
        .collect();
    for f in 0..VM_FILES {
        let docs: Vec<String> = (0..VMS_PER_FILE)
            .map(|k| vm_doc(f * VMS_PER_FILE + k, &hypervisors))
            .collect();
        write(root, &format!("vms/vms-{f:03}.yaml"), &docs.join("---\n"))?;
    }
    // 100 files of three services and 100 of two.
    let mut j = 0;
    for f in 0..SERVICE_FILES {
        let n = if f < SERVICES - 2 * SERVICE_FILES {
            3
        } else {
            2
        };
        let docs: Vec<String> = (j..j + n).map(|s| service_doc(s, all_service)).collect();
        j += n;
        write(
            root,
            &format!("services/svc-{f:03}.yaml"),
            &docs.join("---\n"),
        )?;
    }
    assert_eq!(j, SERVICES);
    // A checkout's files are older than the controller's last load.
    let old = SystemTime::now() - Duration::from_secs(3600);
    backdate(root, old)?;
    Ok(root.join("machines/site-07/batch-007.yaml"))
}

fn backdate(dir: &Path, when: SystemTime) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            backdate(&path, when)?;
        } else {
            std::fs::File::options()
                .write(true)
                .open(&path)?
                .set_modified(when)?;
        }
    }
    Ok(())
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    let min = samples[0];
    format!(
        "median {:8.2} ms   max {:8.2} ms   min {:8.2} ms   (n={})",
        ms(median),
        ms(max),
        ms(min),
        samples.len()
    )
}

fn read_all(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) -> Result<(), Error> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_all(root, &path, out)?;
        } else {
            let bytes = std::fs::read(&path)?;
            out.push((path.strip_prefix(root)?.to_path_buf(), bytes));
        }
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let all_service = std::env::args().any(|a| a == "--all-service");
    let root = std::env::temp_dir().join(format!("converge-bench-load-{}", std::process::id()));
    let _guard = TempDir(root.clone());
    let started = Instant::now();
    let changed_file = generate(&root, all_service)?;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "generated {} in {:.0} ms{}",
        root.display(),
        ms(started.elapsed()),
        if all_service {
            " (with one `tags: [all]` role)"
        } else {
            ""
        }
    );

    // (a) Cold: a fresh Source each run.
    let mut cold = Vec::new();
    let mut last: Option<LoadStats> = None;
    let mut counts = (0, 0, 0, 0);
    for _ in 0..5 {
        let mut source = Source::new(&root);
        let t = Instant::now();
        let (assembled, stats) = source.load()?;
        cold.push(t.elapsed());
        let Some(desired) = &assembled.desired else {
            for d in assembled.errors().take(5) {
                eprintln!("{d}");
            }
            return Err("the generated directory is invalid".into());
        };
        counts = (
            desired.machines.len(),
            desired.vms.len(),
            desired.services.len(),
            assembled.diagnostics.len(),
        );
        last = Some(stats);
    }
    let stats = last.ok_or("no cold run")?;
    let _ = writeln!(
        report,
        "objects: {} machines, {} VMs, {} services in {} files; {} diagnostics",
        counts.0, counts.1, counts.2, stats.files, counts.3
    );
    let _ = writeln!(
        report,
        "(a) cold load+validate+resolve:    {}",
        summary(&mut cold)
    );

    // (b) Reload after one file changed; the Source is reused.
    let mut source = Source::new(&root);
    source.load()?;
    let mut reload = Vec::new();
    let mut reload_stats = LoadStats::default();
    for run in 0..20 {
        let interval = if run % 2 == 0 { "6m" } else { "5m" };
        std::fs::write(&changed_file, machine_file(7, interval))?;
        let t = Instant::now();
        let (assembled, stats) = source.load()?;
        reload.push(t.elapsed());
        assert!(assembled.desired.is_some(), "reload stayed valid");
        reload_stats = stats;
    }
    let _ = writeln!(
        report,
        "(b) reload, one file changed:      {}",
        summary(&mut reload)
    );
    let _ = writeln!(
        report,
        "    last reload: {} files, {} parsed, {} reused",
        reload_stats.files, reload_stats.parsed, reload_stats.reused
    );
    let mut unchanged = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        source.load()?;
        unchanged.push(t.elapsed());
    }
    let _ = writeln!(
        report,
        "    reload, nothing changed:       {}",
        summary(&mut unchanged)
    );

    // Breakdown of one load, from outside the library.
    let t = Instant::now();
    let mut raw = Vec::new();
    read_all(&root, &root, &mut raw)?;
    let read_time = t.elapsed();
    let t = Instant::now();
    let parsed: Vec<ParsedFile> = raw.iter().map(|(p, b)| parse_file(p, b)).collect();
    let parse_time = t.elapsed();
    let t = Instant::now();
    let assembled = assemble(&root, parsed.iter());
    let assemble_time = t.elapsed();
    let desired = assembled
        .desired
        .ok_or("the generated directory is invalid")?;
    // Roles resolution alone, given each role's members (selected here the
    // way assemble does: through a tag index).
    let names: Vec<&Name> = desired.machines.keys().collect();
    let t = Instant::now();
    let mut by_tag: BTreeMap<&Name, Vec<&Name>> = BTreeMap::new();
    for (name, machine) in &desired.machines {
        for tag in &machine.tags {
            by_tag.entry(tag).or_default().push(name);
        }
    }
    let services: BTreeMap<Name, (&ServiceSpec, Members)> = desired
        .services
        .iter()
        .map(|(name, object)| {
            let members: Members = object
                .spec
                .roles
                .iter()
                .map(|(role, r)| {
                    let mut selected: BTreeSet<Name> =
                        r.machines.iter().map(|m| m.value.clone()).collect();
                    for tag in &r.tags {
                        if tag.value.as_str() == "all" {
                            selected.extend(names.iter().map(|m| (*m).clone()));
                        } else if let Some(tagged) = by_tag.get(&tag.value) {
                            selected.extend(tagged.iter().map(|m| (*m).clone()));
                        }
                    }
                    (role.value.clone(), selected)
                })
                .collect();
            (name.clone(), (&object.spec, members))
        })
        .collect();
    let select_time = t.elapsed();
    let t = Instant::now();
    let resolved = roles::resolve(&names, &services);
    let resolve_time = t.elapsed();
    let doc_bytes: usize = resolved.values().map(|r| r.document.len()).sum();
    let objects: usize = parsed.iter().map(|f| f.objects.len()).sum();
    let _ = writeln!(
        report,
        "breakdown of one load (single-threaded, from outside):"
    );
    let _ = writeln!(
        report,
        "    read {} files:                 {:8.2} ms",
        raw.len(),
        ms(read_time)
    );
    let _ = writeln!(
        report,
        "    parse_file (all):              {:8.2} ms  ({objects} objects)",
        ms(parse_time)
    );
    let _ = writeln!(
        report,
        "    assemble (validate + roles):   {:8.2} ms",
        ms(assemble_time)
    );
    let _ = writeln!(
        report,
        "    role selection alone:          {:8.2} ms",
        ms(select_time)
    );
    let _ = writeln!(
        report,
        "    roles::resolve alone:          {:8.2} ms  ({} documents, {:.1} MiB of JSON)",
        ms(resolve_time),
        resolved.len(),
        doc_bytes as f64 / (1024.0 * 1024.0)
    );
    let kinds = parsed
        .iter()
        .flat_map(|f| f.objects.iter())
        .fold([0usize; 3], |mut acc, o| {
            match o.object {
                ParsedObject::Machine(_) => acc[0] += 1,
                ParsedObject::VirtualMachine(_) => acc[1] += 1,
                ParsedObject::Service(_) => acc[2] += 1,
            }
            acc
        });
    let _ = writeln!(
        report,
        "    parsed kinds: {} machines, {} VMs, {} services",
        kinds[0], kinds[1], kinds[2]
    );
    // Identifies the resolved output, to check that an optimization changed nothing.
    let mut digest = blake3::Hasher::new();
    for (name, r) in &desired.roles {
        digest.update(name.as_str().as_bytes());
        digest.update(r.hash.as_bytes());
    }
    let _ = writeln!(
        report,
        "roles digest: {}",
        &digest.finalize().to_hex()[..16]
    );
    let _ = writeln!(report, "peak RSS (VmHWM): {:.1} MiB", peak_rss_mib());
    print!("{report}");
    Ok(())
}
