//! Tests of protocol v2's promises that need a target in between, with the
//! real scripts on a local target (real processes, files and signals):
//! privacy under any umask, documents never in argv, streams that send only
//! what the base lacks and refuse lies, and the whole protocol on busybox
//! alone. Commands go through [`Through`], a [`LocalTarget`] that prefixes
//! argv, records what it ran, or lies on stdin. Test code only (kept apart
//! from `tests.rs` for its length).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::activation::{kill_activation, wait_activation};
use super::apply::{
    APPLY_SCRIPT, DeployPhase, DeployRequest, InstallRequest, InstallSource, WaitOutcome, deploy,
    install, start_activation, switch,
};
use super::confirm::{ConfirmOutcome, RollbackAction, confirm, confirmation_state};
use super::generation::{GenerationId, InstallOutcome, MachineError};
use super::observe::observe;
use super::prune::prune;
use super::tests::{
    ACTIVATE, GATED, Machine, T, attempt_file, deployed, number_in, running, switch_mode, tree,
    until, wait_fired, wait_watchdog_gone, watchdog,
};
use crate::driver::build::tree_hash;
use crate::driver::local::LocalTarget;
use crate::driver::stream::Manifest;
use crate::driver::target::{CommandOutput, Input, Target, TargetError};

/// A [`LocalTarget`] whose commands run as `prefix... argv...`, recording
/// each argv the protocol asked for with its stdin's length; with
/// `stream`, the apply script gets those bytes after its text on stdin
/// instead of what the protocol sent.
#[derive(Default)]
struct Through {
    inner: LocalTarget,
    prefix: Vec<String>,
    stream: Option<Vec<u8>>,
    seen: Mutex<Vec<(Vec<String>, u64)>>,
}

impl Through {
    fn new(prefix: &[&str]) -> Self {
        Self {
            prefix: prefix.iter().map(|p| (*p).to_owned()).collect(),
            ..Self::default()
        }
    }

    fn lying(stream: &[u8]) -> Self {
        Self {
            stream: Some(stream.to_vec()),
            ..Self::default()
        }
    }

    fn seen(&self) -> Vec<(Vec<String>, u64)> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Target for Through {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn run_input(
        &self,
        argv: &[String],
        env: &[(String, String)],
        input: &Input,
        timeout: Duration,
    ) -> Result<CommandOutput, TargetError> {
        self.seen
            .lock()
            .expect("lock")
            .push((argv.to_vec(), input.len()));
        let mut full = self.prefix.clone();
        full.extend_from_slice(argv);
        match &self.stream {
            Some(stream) if argv.get(3).map(String::as_str) == Some(APPLY_SCRIPT.name) => {
                let mut lie = Input::bytes(APPLY_SCRIPT.text);
                lie.push_bytes(stream.clone());
                self.inner.run_input(&full, env, &lie, timeout).await
            }
            _ => self.inner.run_input(&full, env, input, timeout).await,
        }
    }

    async fn upload_dir(
        &self,
        src: &Path,
        dest: &str,
        timeout: Duration,
    ) -> Result<(), TargetError> {
        self.inner.upload_dir(src, dest, timeout).await
    }
}

/// Every file and directory under `root` (symlinks aside) with its mode.
fn modes(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = vec![];
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = fs::symlink_metadata(&path).expect("stat");
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).expect("list") {
                todo.push(entry.expect("entry").path());
            }
        }
        found.push((path, meta.permissions().mode() & 0o7777));
    }
    found
}

#[tokio::test]
async fn everything_written_on_the_target_is_private_under_any_umask() {
    let m = Machine::new();
    let t = Through::new(&["sh", "-c", "umask 000; exec \"$@\"", "sh"]);
    let probe = t
        .run(&["sh".into(), "-c".into(), "umask".into()], &[], T)
        .await;
    assert_eq!(probe.expect("umask").stdout.trim(), "0000", "the premise");
    let open: &[(&str, &[u8], u32)] = &[
        ("bin/tool", b"#!/bin/sh\n", 0o777),
        ("share/doc", b"doc", 0o666),
        ("share/setuid", b"x", 0o4755),
        ("exit-code", b"0", 0o666),
    ];
    let (root, _) = tree(&m, "g1", ACTIVATE, open);
    for dir in ["bin", "share", ""] {
        fs::set_permissions(root.join(dir), fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let hash1 = tree_hash(&root).expect("hash");
    let g1 = (1, root.as_path(), hash1.as_str());
    let armed = watchdog(None, Duration::from_secs(60));
    let (g1, report) = deployed(&t, &m, g1, InstallSource::Stream, armed, T).await;
    let c = report
        .started
        .expect("started")
        .confirmation
        .expect("armed");
    assert_eq!(
        confirm(&t, &m.state_dir, &c, T).await.expect("confirm"),
        ConfirmOutcome::Confirmed
    );
    wait_watchdog_gone(&m, &c).await;
    // A second generation from the first (hard links), and a third copied
    // from the second on the target.
    let m1 = Manifest::of(&root).expect("manifest");
    fs::write(root.join("share/doc"), "doc 2").expect("write");
    let hash2 = tree_hash(&root).expect("hash");
    let base = InstallSource::Base {
        generation: g1.clone(),
        manifest: &m1,
    };
    deployed(&t, &m, (2, &root, &hash2), base, None, T).await;
    let g3 = GenerationId::new(3, hash2).expect("generation");
    let copied = install(&t, &m.state_dir, &root, b"{\"3\":3}", &g3, T).await;
    assert_eq!(copied.expect("install"), InstallOutcome::CopiedOnTarget);
    observe(&t, &m.state_dir, T).await.expect("observe");

    let state = m.state();
    let found = modes(&state);
    assert!(found.len() > 30, "{found:?}");
    let open: Vec<_> = found
        .iter()
        .filter(|(_, mode)| mode & 0o7077 != 0)
        .map(|(path, mode)| format!("{} {mode:o}", path.display()))
        .collect();
    assert!(open.is_empty(), "readable by others: {open:?}");
    let mode = |path: &str| {
        fs::metadata(state.join(path))
            .expect(path)
            .permissions()
            .mode()
            & 0o7777
    };
    for generation in ["1", "2", "3"] {
        let dir = fs::read_dir(state.join("generations"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(&format!("{generation}-")))
            .expect("generation");
        let dir = format!("generations/{dir}");
        assert_eq!(mode(&dir), 0o700, "{dir}");
        assert_eq!(mode(&format!("{dir}/roles.json")), 0o600, "{dir}");
        assert_eq!(mode(&format!("{dir}/artifact/activate")), 0o700, "{dir}");
        assert_eq!(mode(&format!("{dir}/artifact/bin/tool")), 0o700, "{dir}");
        assert_eq!(
            mode(&format!("{dir}/artifact/share/setuid")),
            0o700,
            "{dir}"
        );
        assert_eq!(mode(&format!("{dir}/artifact/share/doc")), 0o600, "{dir}");
    }
    for dir in ["", "generations", "confirm"] {
        assert_eq!(mode(dir), 0o700, "{dir:?}");
    }
}

#[tokio::test]
async fn a_stream_cannot_reopen_modes_the_umask_closed() {
    let m = Machine::new();
    let activate = "#!/bin/sh\n";
    let stream = format!(
        "R 2\n{{}}D 755 bin\nF 4777 {} activate\n{activate}F 644 2 bin/data\nokE 4\n",
        activate.len()
    );
    let t = Through::lying(stream.as_bytes());
    let (root, hash) = tree(&m, "g1", activate, &[]);
    let generation = GenerationId::new(1, hash).expect("generation");
    install(&t, &m.state_dir, &root, b"{}", &generation, T)
        .await
        .expect("install");
    let dir = m.state().join(format!("generations/{generation}/artifact"));
    for (path, expected) in [("bin", 0o700), ("activate", 0o700), ("bin/data", 0o600)] {
        let mode = fs::metadata(dir.join(path))
            .expect(path)
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, expected, "{path}");
    }
}

#[tokio::test]
async fn documents_never_travel_in_argv_and_argv_stays_short() {
    let m = Machine::new();
    let t = Through::new(&[]);
    let (roles_marker, file_marker) = ("roles-marker-5c1d9e", "artifact-marker-77b0fa");
    let roles = format!("{{\"secret\":\"{roles_marker}\"}}");
    let files: &[(&str, &[u8], u32)] = &[("data", file_marker.as_bytes(), 0o644)];
    let (root, hash) = tree(&m, "g1", GATED, files);
    let generation = GenerationId::new(1, hash).expect("generation");
    let manifest = Manifest::of(&root).expect("manifest");
    let request = DeployRequest {
        install: Some(InstallRequest {
            generation: generation.clone(),
            artifact: &root,
            manifest: &manifest,
            roles_json: roles.as_bytes(),
            source: InstallSource::Stream,
        }),
        switch: Some(None),
        activate: switch_mode(watchdog(None, Duration::from_secs(60))),
        wait: Some(Duration::from_millis(50)),
    };
    let report = deploy(&t, &m.state_dir, &request, T).await.expect("deploy");
    assert!(report.failure.is_none(), "{:?}", report.failure);
    let started = report.started.expect("started");
    let c = started.confirmation.expect("armed");
    let dir = m.state().join(format!("generations/{generation}"));
    let roles_there = fs::read_to_string(dir.join("roles.json")).expect("roles");
    assert!(roles_there.contains(roles_marker), "the roles travelled");
    let data = fs::read_to_string(dir.join("artifact/data")).expect("data");
    assert!(data.contains(file_marker), "the artifact travelled");

    // What runs on the target holds no document either.
    let attempt = &started.attempt;
    let mut pids = vec![
        number_in(&attempt_file(&m, &generation, &attempt.id, "pid")).await,
        number_in(&attempt_file(&m, &generation, &attempt.id, "pgid")).await,
        number_in(&m.state().join(format!("confirm/{}.pid", c.id))).await,
    ];
    pids.retain(|pid| running(*pid));
    assert_eq!(pids.len(), 3, "runner, activate and watchdog run");
    for pid in pids {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(roles_marker) && !cmdline.contains(file_marker));
    }
    fs::write(m.state().join("release"), "").expect("release");
    let ended = wait_activation(&t, &m.state_dir, attempt, T).await;
    assert_eq!(ended.expect("wait").code, 0);
    assert!(
        !kill_activation(&t, &m.state_dir, attempt)
            .await
            .expect("kill")
    );
    assert_eq!(
        confirm(&t, &m.state_dir, &c, T).await.expect("confirm"),
        ConfirmOutcome::Confirmed
    );
    confirmation_state(&t, &m.state_dir, &c, T)
        .await
        .expect("state");
    observe(&t, &m.state_dir, T).await.expect("observe");
    prune(&t, &m.state_dir, 0, &[], T).await.expect("prune");
    wait_watchdog_gone(&m, &c).await;

    let seen = t.seen();
    assert!(seen.len() >= 6, "{seen:?}");
    for (argv, _) in &seen {
        for arg in argv {
            assert!(
                !arg.contains(roles_marker) && !arg.contains(file_marker),
                "{argv:?}"
            );
        }
        // As a shell command line (what sshd gets), with room to spare for
        // the SSH driver's own wrapper: dropbear refuses over 9,000 bytes.
        let quoted: usize = argv
            .iter()
            .map(|a| a.replace('\'', "'\\''").len() + 3)
            .sum();
        assert!(quoted < 8_000, "{quoted} bytes: {argv:?}");
    }
}

#[tokio::test]
async fn an_install_over_a_base_sends_only_what_changed_and_lands_byte_for_byte() {
    let m = Machine::new();
    let t = Through::new(&[]);
    let big: Vec<Vec<u8>> = (0..9u8).map(|i| vec![b'a' + i; 100_000]).collect();
    let names: Vec<String> = (0..9).map(|i| format!("files/f{i}")).collect();
    let files: Vec<(&str, &[u8], u32)> = names
        .iter()
        .zip(&big)
        .map(|(n, b)| (n.as_str(), b.as_slice(), 0o644))
        .collect();
    let (root, _) = tree(&m, "g", ACTIVATE, &files);
    fs::write(root.join("exit-code"), "0").expect("write");
    let hash1 = tree_hash(&root).expect("hash");
    let (g1, _) = deployed(&t, &m, (1, &root, &hash1), InstallSource::Stream, None, T).await;
    let m1 = Manifest::of(&root).expect("manifest");
    // One file changed, one made executable, one removed, one added.
    fs::write(root.join("files/f3"), "changed").expect("write");
    fs::set_permissions(root.join("files/f7"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::remove_file(root.join("files/f5")).expect("rm");
    fs::write(root.join("files/new"), "new").expect("write");
    let hash2 = tree_hash(&root).expect("hash");
    let base = InstallSource::Base {
        generation: g1.clone(),
        manifest: &m1,
    };
    let (g2, report) = deployed(&t, &m, (2, &root, &hash2), base, None, T).await;
    assert_eq!(
        report.install,
        Some(InstallOutcome::Uploaded {
            files: 3,
            kept: 8,
            bytes: 7 + 100_000 + 3
        })
    );
    let (_, stdin) = t.seen().last().cloned().expect("the deploy ran");
    // f7 travels (100 kB: its mode changed); the six big files kept do not.
    assert!(stdin < 200_000, "a kept file travelled: {stdin} bytes");
    let installed = |g: &GenerationId| m.state().join(format!("generations/{g}/artifact"));
    assert_eq!(tree_hash(&installed(&g2)).expect("hash"), hash2);
    assert_eq!(
        tree_hash(&installed(&g1)).expect("hash"),
        hash1,
        "base intact"
    );
    let inode = |g: &GenerationId, f: &str| fs::metadata(installed(g).join(f)).expect(f).ino();
    for (file, kept) in [("files/f0", true), ("files/f3", false), ("files/f7", false)] {
        assert_eq!(inode(&g1, file) == inode(&g2, file), kept, "{file}");
    }
}

/// Deploys generation 9 through a target that sends `stream` in place of
/// its artifact, and asserts the stream was refused and nothing of
/// generation 9 is left (complete or partial).
async fn refused(stream: &[u8], m: &Machine, base: Option<&GenerationId>) {
    let t = Through::lying(stream);
    let (root, hash) = tree(m, "lie", "#!/bin/sh\n", &[]);
    let generation = GenerationId::new(9, hash).expect("generation");
    let (manifest, empty) = (Manifest::of(&root).expect("manifest"), Manifest::default());
    let source = base.map_or(InstallSource::Stream, |b| InstallSource::Base {
        generation: b.clone(),
        manifest: &empty,
    });
    let request = DeployRequest {
        install: Some(InstallRequest {
            generation: generation.clone(),
            artifact: &root,
            manifest: &manifest,
            roles_json: b"{}",
            source,
        }),
        switch: Some(None),
        ..DeployRequest::default()
    };
    let report = deploy(&t, &m.state_dir, &request, T).await.expect("deploy");
    let what = String::from_utf8_lossy(stream);
    match &report.failure {
        Some((DeployPhase::Install, MachineError::Script { step, code, .. })) => {
            assert_eq!(step, "install (the artifact stream was refused)", "{what}");
            assert_eq!(*code, Some(7), "{what}");
        }
        other => panic!("{what}: {other:?}"),
    }
    assert!(!report.switched && report.install.is_none(), "{what}");
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert!(!facts.generations.contains(&generation), "{what}");
    let left: Vec<String> = fs::read_dir(m.state().join("generations"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("9-"))
        .collect();
    assert!(left.is_empty(), "{what}: {left:?}");
}

#[tokio::test]
async fn a_stream_that_lies_is_refused_and_leaves_no_generation() {
    let m = Machine::new();
    let base = m.installed(1, "v1", 0).await;
    let outside = m.dir.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    let out = outside.to_str().expect("utf-8");
    let lies = [
        "R 2\n{}F 700 100 activate\n#!/bin/sh\n".to_owned(),
        "R 2\n{}F 700 50 activate\n#!/bin/sh\nE 2\n".to_owned(),
        "R 2\n{}F 600 3 ../../../../outside/f\nabcE 2\n".to_owned(),
        "R 2\n{}D 700 a/../../..\nE 2\n".to_owned(),
        format!("R 2\n{{}}F 600 3 {out}/abs\nabcE 2\n"),
        format!("R 2\n{{}}S link\t{out}\nF 600 3 link/through\nabcE 3\n"),
        format!("R 2\n{{}}S link\t{out}/over\nF 600 3 link\nabcE 3\n"),
        format!("R 2\n{{}}S link\t{out}\nD 700 link/sub\nE 3\n"),
        "R 2\n{}K ../../../generations/1-x/roles.json\nE 2\n".to_owned(),
        "R 2\n{}K version-link\nE 2\n".to_owned(),
        "R 2\n{}F 700 10 activate\n#!/bin/sh\nE 9\n".to_owned(),
        "R 2\n{}X what\nE 2\n".to_owned(),
        "R 20\n{}E 1\n".to_owned(),
    ];
    for lie in &lies {
        refused(lie.as_bytes(), &m, Some(&base)).await;
    }
    refused(b"R 2\n{}K activate\nE 2\n", &m, None).await;
    let escaped: Vec<_> = fs::read_dir(&outside).expect("list").collect();
    assert!(escaped.is_empty(), "written outside the tree: {escaped:?}");
}

/// A directory of busybox's applets, to run with as the only PATH.
fn busybox_applets(root: &Path) -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("busybox"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file());
    let busybox = found
        .expect("busybox is not installed: apt-get install busybox-static (scripts/setup does)");
    let list = std::process::Command::new(&busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    let bin = root.join("busybox-bin");
    fs::create_dir(&bin).expect("mkdir");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        std::os::unix::fs::symlink(&busybox, bin.join(applet)).expect("symlink");
    }
    bin
}

#[tokio::test]
async fn deploy_confirm_rollback_kill_observe_and_prune_run_on_busybox_alone() {
    let m = Machine::new();
    let bin = busybox_applets(m.dir.path());
    let path = format!("PATH={}", bin.display());
    let env = bin.join("env");
    let t = Through::new(&[env.to_str().expect("utf-8"), &path]);
    let argv = ["sh", "-c", "readlink /proc/$$/exe; dd --version"].map(str::to_owned);
    let probe = t.run(&argv, &[], T).await.expect("probe");
    assert!(probe.stdout.trim().ends_with("busybox"), "{probe:?}");
    assert!(
        !probe.succeeded(),
        "GNU dd must not be reachable: {probe:?}"
    );

    let (root, hash1) = m.artifact("a", "v1", 0);
    let g1 = (1, root.as_path(), hash1.as_str());
    let armed = watchdog(None, Duration::from_secs(60));
    let (g1, report) = deployed(&t, &m, g1, InstallSource::Stream, armed, T).await;
    let started = report.started.expect("started");
    assert!(matches!(report.waited, Some(WaitOutcome::Ended(ref r)) if r.code == 0));
    let c = started.confirmation.expect("armed");
    assert_eq!(
        confirm(&t, &m.state_dir, &c, T).await.expect("confirm"),
        ConfirmOutcome::Confirmed
    );

    let m1 = Manifest::of(&root).expect("manifest");
    fs::write(root.join("share/version"), "v2").expect("write");
    let hash2 = tree_hash(&root).expect("hash");
    let base = InstallSource::Base {
        generation: g1.clone(),
        manifest: &m1,
    };
    let window = watchdog(Some(&g1), Duration::from_millis(200));
    let (g2, report) = deployed(&t, &m, (2, &root, &hash2), base, window, T).await;
    assert!(matches!(
        report.install,
        Some(InstallOutcome::Uploaded {
            files: 1,
            kept: 2,
            ..
        })
    ));
    let installed = m.state().join(format!("generations/{g2}/artifact"));
    assert_eq!(tree_hash(&installed).expect("hash"), hash2);
    let c = report
        .started
        .expect("started")
        .confirmation
        .expect("armed");
    let rollback = wait_fired(&t, &m.state_dir, &c).await;
    assert!(
        matches!(&rollback.action, RollbackAction::RolledBack { to, code: Some(0), .. } if *to == g1),
        "{rollback:?}"
    );

    let g3 = installed_hanging_via(&t, &m).await;
    switch(&t, &m.state_dir, &g3, T).await.expect("switch");
    let attempt = start_activation(&t, &m.state_dir, &g3, "switch", T)
        .await
        .expect("start");
    until("g3's activate runs", || m.runs().len() == 4).await;
    assert!(
        kill_activation(&t, &m.state_dir, &attempt)
            .await
            .expect("kill")
    );
    let status = fs::read_to_string(attempt_file(&m, &g3, &attempt.id, "status"));
    assert_eq!(status.expect("status").trim(), "143");
    switch(&t, &m.state_dir, &g1, T).await.expect("switch");

    let facts = observe(&t, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current_generation(), Some(&g1));
    assert_eq!(facts.confirmed.as_ref(), Some(&g1));
    assert_eq!(facts.generations, [g1.clone(), g2.clone(), g3.clone()]);
    assert_eq!(facts.activation, None);
    let removed = prune(&t, &m.state_dir, 0, &[], T).await.expect("prune");
    assert_eq!(removed, [g3, g2.clone()]);
    let facts = observe(&t, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.generations, std::slice::from_ref(&g1));
    let runs = [&g1, &g2, &g1].map(ToString::to_string);
    assert_eq!(m.runs()[..3], runs);
}

/// A generation whose activate hangs, installed through `t`.
async fn installed_hanging_via<T: Target>(t: &T, m: &Machine) -> GenerationId {
    let (root, _) = m.artifact("hangs", "hangs", 0);
    fs::write(root.join("hang"), "").expect("write");
    let hash = tree_hash(&root).expect("hash");
    let generation = GenerationId::new(3, hash).expect("generation");
    install(t, &m.state_dir, &root, b"{}", &generation, T)
        .await
        .expect("install");
    generation
}
