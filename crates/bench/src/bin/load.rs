//! Desired-state loading benchmark: generates a large directory and times
//! cold loads, reloads after one file changed, and where the time goes.
//!
//! Run in release: `cargo run --release -p converge-bench --bin bench-load`. Prints numbers;
//! BENCHMARKS.md records them. Options: `--all-service` adds one service
//! whose role selects every machine (`tags: [all]`); `--memory` only loads
//! once and prints what a loaded `Source` holds; `--bad-documents N` (default
//! 100,000) times loading and rendering the diagnostics of N invalid
//! documents instead, in one file and spread over files of 1,000.
//!
//! Reloads must give exactly what a cold load gives: after the reload runs,
//! the bench edits a service and a machine's tags, compares a digest of
//! everything the reload returned with a cold load's, and fails if they differ.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use converge::source::{LoadStats, Source};
use converge::spec::parse::{ParsedFile, ParsedObject, parse_file};
use converge::spec::roles::{self, Members};
use converge::spec::{Assembled, CheckedFile, Name, Resolution, ServiceSpec, assemble_with};

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

/// The files the reloads rewrite.
struct Generated {
    /// Machines m0112..m0127.
    machine_file: PathBuf,
    /// Services svc009..svc011; svc010 has an `observer` role (843 members).
    service_file: PathBuf,
}

/// The service file whose svc010 the service reloads edit.
const EDITED_SERVICE_FILE: usize = 3;

/// Writes the directory; returns the files to rewrite for reloads.
fn generate(root: &Path, all_service: bool) -> std::io::Result<Generated> {
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
    for f in 0..SERVICE_FILES {
        write(
            root,
            &format!("services/svc-{f:03}.yaml"),
            &service_file_text(f, all_service),
        )?;
    }
    assert_eq!(services_of(SERVICE_FILES - 1).end, SERVICES);
    // A checkout's files are older than the controller's last load.
    let old = SystemTime::now() - Duration::from_secs(3600);
    backdate(root, old)?;
    Ok(Generated {
        machine_file: root.join("machines/site-07/batch-007.yaml"),
        service_file: root.join(format!("services/svc-{EDITED_SERVICE_FILE:03}.yaml")),
    })
}

/// The services of service file `f`: 100 files of three services, then 100 of two.
fn services_of(f: usize) -> std::ops::Range<usize> {
    let threes = SERVICES - 2 * SERVICE_FILES;
    let start = if f < threes {
        3 * f
    } else {
        3 * threes + 2 * (f - threes)
    };
    let n = if f < threes { 3 } else { 2 };
    start..start + n
}

fn service_file_text(f: usize, all_service: bool) -> String {
    services_of(f)
        .map(|j| service_doc(j, all_service))
        .collect::<Vec<_>>()
        .join("---\n")
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

/// A memory figure of this process from /proc, like `VmHWM:` (peak RSS).
fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Identifies everything a load yields: diagnostics, spec hashes and roles
/// (documents, hashes, `after`, services).
fn result_digest(assembled: &Assembled) -> String {
    let mut digest = blake3::Hasher::new();
    for d in &assembled.diagnostics {
        digest.update(format!("{d:?}\n").as_bytes());
    }
    if let Some(desired) = &assembled.desired {
        for (key, hash) in desired.spec_hashes() {
            digest.update(format!("{key} {hash}\n").as_bytes());
        }
        for (name, r) in &desired.roles {
            digest.update(format!("{name} {} {:?} {:?}\n", r.hash, r.after, r.services).as_bytes());
            digest.update(&r.document);
        }
    }
    digest.finalize().to_hex().to_string()
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
    if let Some(n) = bad_documents_arg()? {
        return bad_documents(n);
    }
    let root = std::env::temp_dir().join(format!("converge-bench-load-{}", std::process::id()));
    let _guard = TempDir(root.clone());
    let started = Instant::now();
    let Generated {
        machine_file: changed_file,
        service_file,
    } = generate(&root, all_service)?;
    if std::env::args().any(|a| a == "--memory") {
        return memory(&root);
    }
    let edited_service = |port: usize| {
        service_file_text(EDITED_SERVICE_FILE, all_service).replacen(
            "port: 10010",
            &format!("port: {port}"),
            1,
        )
    };
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
    // Edits that change roles inputs: a service's settings (its 843 members
    // are resolved again), and one machine's tags (every role is selected
    // again, and the members of the four services it leaves or joins are
    // resolved again).
    let mut service_edit = Vec::new();
    for run in 0..10 {
        let port = if run % 2 == 0 { 9999 } else { 10_010 };
        std::fs::write(&service_file, edited_service(port))?;
        let t = Instant::now();
        let (assembled, _) = source.load()?;
        service_edit.push(t.elapsed());
        assert!(assembled.desired.is_some(), "reload stayed valid");
    }
    let _ = writeln!(
        report,
        "    reload, one service changed:   {}",
        summary(&mut service_edit)
    );
    let mut tag_edit = Vec::new();
    for run in 0..10 {
        let mut text = machine_file(7, "5m");
        if run % 2 == 0 {
            // m0112 moves from rack 112 to rack 113: it leaves two services'
            // client role and joins two others'.
            text = text.replacen("rack-112,", "rack-113,", 1);
        }
        std::fs::write(&changed_file, text)?;
        let t = Instant::now();
        let (assembled, _) = source.load()?;
        tag_edit.push(t.elapsed());
        assert!(assembled.desired.is_some(), "reload stayed valid");
    }
    let _ = writeln!(
        report,
        "    reload, one machine's tags:    {}",
        summary(&mut tag_edit)
    );
    // Back to the generated files, for the breakdown and the roles digest.
    std::fs::write(&service_file, edited_service(10_010))?;
    std::fs::write(&changed_file, machine_file(7, "5m"))?;
    source.load()?;
    // What loading needs; the breakdown below holds more at once.
    let _ = writeln!(
        report,
        "peak RSS of the loads and reloads above: {:.1} MiB",
        rss_mib("VmHWM:")
    );

    // Breakdown of one load, from outside the library.
    let t = Instant::now();
    let mut raw = Vec::new();
    read_all(&root, &root, &mut raw)?;
    let read_time = t.elapsed();
    let t = Instant::now();
    let parsed: Vec<ParsedFile> = raw.iter().map(|(p, b)| parse_file(p, b)).collect();
    let parse_time = t.elapsed();
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
    let objects: usize = parsed.iter().map(|f| f.objects.len()).sum();
    let t = Instant::now();
    let checked: Vec<CheckedFile> = parsed
        .into_iter()
        .map(|f| CheckedFile::new(&root, f))
        .collect();
    let check_time = t.elapsed();
    let t = Instant::now();
    let assembled = assemble_with(checked.iter(), &mut Resolution::default());
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
    let inputs: BTreeMap<&Name, (&ServiceSpec, &Members)> = services
        .iter()
        .map(|(name, (spec, members))| (name, (*spec, members)))
        .collect();
    let resolved = roles::resolve(&names, &inputs);
    let resolve_time = t.elapsed();
    let doc_bytes: usize = resolved.values().map(|r| r.document.len()).sum();
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
        "    CheckedFile::new (all):        {:8.2} ms  (build, hash, single-object checks)",
        ms(check_time)
    );
    let _ = writeln!(
        report,
        "    assemble_with, cold:           {:8.2} ms  (cross-object checks + roles)",
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
    let _ = writeln!(
        report,
        "peak RSS (VmHWM), with the breakdown (three copies of the roles documents): {:.1} MiB",
        rss_mib("VmHWM:")
    );
    drop((checked, desired, resolved, raw));

    // The incremental result must be the cold one, exactly.
    std::fs::write(&service_file, edited_service(9999))?;
    std::fs::write(
        &changed_file,
        machine_file(7, "7m").replacen("rack-112,", "rack-113,", 1),
    )?;
    let incremental = result_digest(&source.load()?.0);
    let cold_again = result_digest(&Source::new(&root).load()?.0);
    if incremental != cold_again {
        return Err("an incremental reload differs from a cold load".into());
    }
    let _ = writeln!(
        report,
        "    after these edits, the reloaded result equals a cold load's: {}",
        &incremental[..16]
    );
    print!("{report}");
    Ok(())
}

/// `--memory`: what one Source holds after one load (its cache and the
/// desired state it returned), over the process before loading.
fn memory(root: &Path) -> Result<(), Error> {
    let before = rss_mib("VmRSS:");
    let mut source = Source::new(root);
    let (assembled, _) = source.load()?;
    let desired = assembled
        .desired
        .ok_or("the generated directory is invalid")?;
    let after = rss_mib("VmRSS:");
    let objects = desired.len();
    let documents: usize = desired.roles.values().map(|r| r.document.len()).sum();
    println!(
        "RSS before loading {before:.1} MiB, after one load (Source + DesiredState) {after:.1} MiB, peak {:.1} MiB",
        rss_mib("VmHWM:")
    );
    println!(
        "held: {:.1} MiB for {objects} objects = {:.1} KiB per object, of which roles documents {:.1} MiB ({:.1} KiB per machine)",
        after - before,
        (after - before) * 1024.0 / objects as f64,
        documents as f64 / (1024.0 * 1024.0),
        documents as f64 / 1024.0 / desired.machines.len() as f64,
    );
    drop((desired, source));
    Ok(())
}

/// `--bad-documents [N]`: how many invalid documents to load, if asked.
fn bad_documents_arg() -> Result<Option<usize>, Error> {
    let args: Vec<String> = std::env::args().collect();
    let Some(at) = args.iter().position(|a| a == "--bad-documents") else {
        return Ok(None);
    };
    match args.get(at + 1) {
        Some(n) if !n.starts_with("--") => Ok(Some(n.replace([',', '_'], "").parse()?)),
        _ => Ok(Some(100_000)),
    }
}

/// A machine document with two errors: a misspelt enum value and an
/// unknown field.
fn bad_machine_doc(i: usize) -> String {
    format!(
        "apiVersion: converge/v1\nkind: Machine\nmetadata: {{name: bad{i:06}}}\nspec:\n  target: {{host: 10.0.{}.{}}}\n  build: {{command: [\"./build.sh\"]}}\n  drift: fix\n  colour: blue\n",
        i / 250 % 250,
        i % 250
    )
}

/// `--bad-documents N`: loading (`Source::load`) and rendering (every
/// diagnostic formatted, as `converge validate` prints them) N invalid
/// documents: (1) all in one file, each a two-line document of an unknown
/// kind (the most that fit under the 4 MiB limit); (2) machines with two
/// errors each, 1,000 documents per file.
fn bad_documents(n: usize) -> Result<(), Error> {
    let root = std::env::temp_dir().join(format!("converge-bench-bad-{}", std::process::id()));
    let _guard = TempDir(root.clone());
    let one = root.join("one");
    let short = "apiVersion: converge/v1\nkind: Pod\n";
    let text = vec![short; n].join("---\n");
    write(&one, "bad.yaml", &text)?;
    time_bad(
        &format!("{n} documents in one file ({} bytes)", text.len()),
        &one,
    )?;
    let spread = root.join("spread");
    for (f, start) in (0..n).step_by(1_000).enumerate() {
        let docs: Vec<String> = (start..n.min(start + 1_000)).map(bad_machine_doc).collect();
        write(&spread, &format!("bad-{f:04}.yaml"), &docs.join("---\n"))?;
    }
    time_bad(
        &format!("{n} machine documents with two errors each, 1,000 per file"),
        &spread,
    )
}

fn time_bad(what: &str, dir: &Path) -> Result<(), Error> {
    let t = Instant::now();
    let (assembled, stats) = Source::new(dir).load()?;
    let load = t.elapsed();
    let t = Instant::now();
    let mut rendered = String::new();
    for d in &assembled.diagnostics {
        let _ = writeln!(rendered, "{d}");
    }
    let render = t.elapsed();
    println!("{what}:");
    println!(
        "    load {:10.1} ms   render {:8.1} ms   ({} files, {} diagnostics, {:.1} MiB of text)",
        ms(load),
        ms(render),
        stats.files,
        assembled.diagnostics.len(),
        rendered.len() as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
