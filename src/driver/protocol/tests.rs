//! The machine protocol's own tests, on a local target over real files and
//! processes: observe, install, switch, activate, health checks, rollback,
//! the confirmation watchdog and prune, the serialized forms, one
//! activation per state directory (attaching, refusing, taking over a dead
//! runner's lock) and ending an activation's process group; and the
//! helpers `tests_v2.rs` shares. Test code only.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::activation::activate;
use super::activation::{health_check, kill_activation, wait_activation};
use super::apply::split_status;
use super::apply::{
    ActivateRequest, DeployReport, DeployRequest, InstallRequest, InstallSource, WaitOutcome,
    Watchdog, arm_confirmation, deploy, install, start_activation, switch,
};
use super::confirm::{
    ConfirmOutcome, Confirmation, ConfirmationState, Rollback, RollbackAction, confirm,
    confirmation_state,
};
use super::generation::{
    ActivationAttempt, ActivationInProgress, ActivationResult, ActivationState, CurrentLink,
    GenerationId, InstallOutcome, MachineError, MachineFacts,
};
use super::observe::{observe, observe_local};
use super::prune::prune;
use crate::driver::build::tree_hash;
use crate::driver::local::LocalTarget;
use crate::driver::stream::Manifest;
use crate::driver::target::Target;

pub(super) const T: Duration = Duration::from_secs(20);

/// Switches back to `to` and activates it again (a new attempt), within one
/// timeout: what a rollback does, as two phases of one deploy.
async fn rollback<T: Target>(
    t: &T,
    state_dir: &str,
    to: &GenerationId,
    mode: &str,
    timeout: Duration,
) -> Result<ActivationResult, MachineError> {
    switch(t, state_dir, to, timeout).await?;
    activate(t, state_dir, to, mode, timeout).await
}

/// Records its arguments, environment and cwd, counts its runs in the
/// state directory, and exits with the code in the artifact's `exit-code`.
pub(super) const ACTIVATE: &str = r#"#!/bin/sh
echo "mode=$1 env_mode=$CONVERGE_MODE generation=$CONVERGE_GENERATION"
echo "roles=$(cat "$CONVERGE_ROLES")"
echo "cwd=$(pwd)"
echo "$CONVERGE_GENERATION" >> "${CONVERGE_ROLES%/generations/*}/activation-runs"
[ -e hang ] && exec sleep 600
read -r code < exit-code
echo "exiting with $code" >&2
exit "$code"
"#;

pub(super) struct Machine {
    pub(super) dir: tempfile::TempDir,
    pub(super) state_dir: String,
    pub(super) target: LocalTarget,
}

impl Machine {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_dir = dir.path().join("state").to_str().expect("utf-8").to_owned();
        Self {
            target: LocalTarget::new(state_dir.clone()),
            state_dir,
            dir,
        }
    }

    pub(super) fn state(&self) -> PathBuf {
        PathBuf::from(&self.state_dir)
    }

    /// A local artifact tree whose activate exits with `code`; `version`
    /// makes its hash differ from other artifacts.
    pub(super) fn artifact(&self, name: &str, version: &str, code: i32) -> (PathBuf, String) {
        let root = self.dir.path().join("artifacts").join(name);
        fs::create_dir_all(root.join("share")).expect("mkdir");
        fs::write(root.join("activate"), ACTIVATE).expect("write");
        fs::set_permissions(root.join("activate"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        fs::write(root.join("exit-code"), code.to_string()).expect("write");
        fs::write(root.join("share/version"), version).expect("write");
        std::os::unix::fs::symlink("share/version", root.join("version-link")).expect("symlink");
        let hash = tree_hash(&root).expect("hash");
        (root, hash)
    }

    pub(super) async fn installed(&self, number: u64, version: &str, code: i32) -> GenerationId {
        let (root, hash) = self.artifact(&format!("a{number}"), version, code);
        self.install(number, &root, hash).await
    }

    /// Installed as generation `number`, with an activate that never ends.
    pub(super) async fn installed_hanging(&self, number: u64) -> GenerationId {
        let name = format!("a{number}");
        let (root, _) = self.artifact(&name, "hangs", 0);
        fs::write(root.join("hang"), "").expect("write");
        let hash = tree_hash(&root).expect("hash");
        self.install(number, &root, hash).await
    }

    async fn install(&self, number: u64, root: &Path, hash: String) -> GenerationId {
        let generation = GenerationId::new(number, hash).expect("generation");
        install(
            &self.target,
            &self.state_dir,
            root,
            b"{\"r\":1}",
            &generation,
            T,
        )
        .await
        .expect("install");
        generation
    }

    pub(super) fn runs(&self) -> Vec<String> {
        fs::read_to_string(self.state().join("activation-runs"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test]
async fn observe_on_an_empty_state_dir_finds_no_generations() {
    let m = Machine::new();
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current, CurrentLink::Absent);
    assert!(facts.generations.is_empty() && facts.incomplete.is_empty());
    assert!(!facts.hostname.is_empty());
    assert_eq!(facts.boot_id.len(), 36, "{}", facts.boot_id);
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname");
    assert_eq!(facts.kernel, String::from_utf8_lossy(&uname.stdout).trim());
    assert!(facts.observed_ms > 1_600_000_000_000);
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(facts.boot_id, boot_id.trim());
}

/// Observes `m` through the script and in-process and asserts both
/// report the same facts (uptime may tick between the two reads).
async fn assert_observers_agree(m: &Machine, case: &str) -> MachineFacts {
    let script = observe(&m.target, &m.state_dir, T)
        .await
        .unwrap_or_else(|e| panic!("{case}: script observe: {e}"));
    let native = observe_local(&m.state_dir, T)
        .await
        .unwrap_or_else(|e| panic!("{case}: in-process observe: {e}"));
    assert!(
        native.uptime_secs.abs_diff(script.uptime_secs) <= 1,
        "{case}: uptime {} vs {}",
        native.uptime_secs,
        script.uptime_secs
    );
    let normalized = MachineFacts {
        observed_ms: script.observed_ms,
        uptime_secs: script.uptime_secs,
        ..native
    };
    assert_eq!(normalized, script, "{case}");
    normalized
}

#[tokio::test]
async fn observe_local_reports_exactly_what_the_observe_script_reports() {
    let m = Machine::new();
    let state = m.state();
    let facts = assert_observers_agree(&m, "state dir missing").await;
    assert_eq!(facts.current, CurrentLink::Absent);
    fs::create_dir_all(state.join("generations")).expect("mkdir");
    assert_observers_agree(&m, "empty").await;

    let good = m.installed(1, "v1", 0).await;
    switch(&m.target, &m.state_dir, &good, T)
        .await
        .expect("switch");
    let facts = assert_observers_agree(&m, "healthy").await;
    assert_eq!(facts.current_generation(), Some(&good));

    // Entries neither observer may count, and one incomplete generation.
    let generations = state.join("generations");
    fs::create_dir_all(generations.join("2-abc/artifact")).expect("mkdir");
    fs::create_dir_all(generations.join("not-ours")).expect("mkdir");
    fs::create_dir_all(generations.join(".5-hidden")).expect("mkdir");
    fs::write(generations.join("3-def"), "a file").expect("write");
    std::os::unix::fs::symlink(good.to_string(), generations.join("4-aaa")).expect("symlink");
    let facts = assert_observers_agree(&m, "incomplete and foreign entries").await;
    assert_eq!(facts.generations, std::slice::from_ref(&good));
    assert_eq!(facts.incomplete.len(), 1);

    let current = state.join("current");
    let relink = |target: &str| {
        fs::remove_file(&current).expect("rm current");
        std::os::unix::fs::symlink(target, &current).expect("symlink");
    };
    relink("generations/2-abc");
    assert_observers_agree(&m, "current -> incomplete").await;
    relink("generations/9-gone");
    assert_observers_agree(&m, "current -> missing").await;
    relink("/tmp");
    assert_observers_agree(&m, "current -> foreign").await;
    let absolute = format!("{}/generations/{good}/", m.state_dir);
    relink(&absolute);
    let facts = assert_observers_agree(&m, "current -> absolute path").await;
    assert_eq!(facts.current_generation(), Some(&good));
    fs::remove_file(&current).expect("rm current");
    fs::create_dir(&current).expect("mkdir current");
    let facts = assert_observers_agree(&m, "current is a directory").await;
    assert!(matches!(
        facts.current,
        CurrentLink::Broken {
            generation: None,
            ..
        }
    ));
}

#[tokio::test]
async fn install_switch_activate_runs_the_generation_and_records_it() {
    let m = Machine::new();
    let (root, hash) = m.artifact("a1", "v1", 0);
    let generation = GenerationId::new(1, hash).expect("generation");
    let outcome = install(
        &m.target,
        &m.state_dir,
        &root,
        b"{\"role\":\"peer\"}",
        &generation,
        T,
    )
    .await
    .expect("install");
    assert!(
        matches!(outcome, InstallOutcome::Uploaded { .. }),
        "{outcome:?}"
    );
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.generations, std::slice::from_ref(&generation));
    assert_eq!(facts.current, CurrentLink::Absent, "install never switches");

    switch(&m.target, &m.state_dir, &generation, T)
        .await
        .expect("switch");
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current_generation(), Some(&generation));

    let result = activate(&m.target, &m.state_dir, &generation, "switch", T)
        .await
        .expect("activate");
    assert_eq!(result.code, 0);
    let dir = m.state().join("generations").join(generation.to_string());
    assert_eq!(
        result.log,
        format!(
            "mode=switch env_mode=switch generation={generation}\nroles={{\"role\":\"peer\"}}\ncwd={}\nexiting with 0\n",
            dir.join("artifact").display()
        )
    );
    let current = m.state().join("current");
    assert_eq!(
        fs::read_link(&current).expect("link"),
        PathBuf::from(format!("generations/{generation}"))
    );
    assert_eq!(
        fs::read_to_string(current.join("activate.log")).expect("log"),
        result.log
    );
    assert_eq!(
        fs::read_to_string(current.join("activate.status")).expect("status"),
        "0\n"
    );
    assert_eq!(
        fs::read_to_string(current.join("roles.json")).expect("roles"),
        "{\"role\":\"peer\"}"
    );
    assert_eq!(
        tree_hash(&current.join("artifact")).expect("hash"),
        generation.hash()
    );
    assert_eq!(m.runs(), [generation.to_string()]);
}

#[tokio::test]
async fn a_failed_activation_is_a_result_with_its_code_and_log() {
    let m = Machine::new();
    let generation = m.installed(1, "v1", 4).await;
    let result = activate(&m.target, &m.state_dir, &generation, "test", T)
        .await
        .expect("activation ran");
    assert_eq!(result.code, 4);
    assert!(!result.succeeded());
    assert!(result.log.ends_with("exiting with 4\n"), "{}", result.log);
}

#[tokio::test]
async fn rollback_reactivates_an_older_generation_as_a_new_attempt() {
    let m = Machine::new();
    let good = m.installed(1, "v1", 0).await;
    let bad = m.installed(2, "v2", 1).await;
    switch(&m.target, &m.state_dir, &good, T)
        .await
        .expect("switch");
    assert_eq!(
        activate(&m.target, &m.state_dir, &good, "switch", T)
            .await
            .expect("activate")
            .code,
        0
    );
    switch(&m.target, &m.state_dir, &bad, T)
        .await
        .expect("switch");
    assert_eq!(
        activate(&m.target, &m.state_dir, &bad, "switch", T)
            .await
            .expect("activate")
            .code,
        1
    );

    let result = rollback(&m.target, &m.state_dir, &good, "switch", T)
        .await
        .expect("rollback");
    assert_eq!(result.code, 0);
    assert_eq!(
        m.runs(),
        [good.to_string(), bad.to_string(), good.to_string()]
    );
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current_generation(), Some(&good));
    let attempts = fs::read_dir(
        m.state()
            .join("generations")
            .join(good.to_string())
            .join("activations"),
    )
    .expect("list")
    .filter_map(Result::ok)
    .filter(|e| e.file_name().to_string_lossy().ends_with(".status"))
    .count();
    assert_eq!(attempts, 2, "each activation is its own attempt");
}

#[tokio::test]
async fn an_activation_can_be_waited_for_again_after_a_timeout() {
    let m = Machine::new();
    let generation = m.installed(1, "v1", 0).await;
    let artifact = m
        .state()
        .join("generations")
        .join(generation.to_string())
        .join("artifact");
    // Slow the activation down on the target itself.
    fs::write(artifact.join("exit-code"), "0").expect("write");
    let slow = format!(
        "#!/bin/sh\nsleep 0.6\n{}",
        ACTIVATE.trim_start_matches("#!/bin/sh\n")
    );
    fs::write(artifact.join("activate"), slow).expect("write");
    let started = Instant::now();
    let attempt = start_activation(&m.target, &m.state_dir, &generation, "switch", T)
        .await
        .expect("start");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "start must not wait"
    );
    let error = wait_activation(
        &m.target,
        &m.state_dir,
        &attempt,
        Duration::from_millis(150),
    )
    .await
    .expect_err("still running");
    assert!(
        matches!(error, MachineError::ActivationTimedOut { .. }),
        "{error:?}"
    );
    assert!(error.is_transient() && error.is_timeout());
    // The attempt survives serialization, as when the controller restarts.
    let stored = serde_json::to_string(&attempt).expect("serialize");
    let attempt: ActivationAttempt = serde_json::from_str(&stored).expect("deserialize");
    let result = wait_activation(&m.target, &m.state_dir, &attempt, T)
        .await
        .expect("wait");
    assert_eq!(result.code, 0);
}

#[tokio::test]
async fn an_activation_runs_in_its_own_session_so_it_outlives_its_starter() {
    let m = Machine::new();
    let generation = m.installed(1, "v1", 0).await;
    let artifact = m
        .state()
        .join("generations")
        .join(generation.to_string())
        .join("artifact");
    fs::write(
        artifact.join("activate"),
        "#!/bin/sh\nread -r _ _ _ _ _ sid _ < /proc/$$/stat\necho \"$sid\" > session\n",
    )
    .expect("write");
    let result = activate(&m.target, &m.state_dir, &generation, "switch", T)
        .await
        .expect("activate");
    assert_eq!(result.code, 0, "{}", result.log);
    let theirs = fs::read_to_string(artifact.join("session")).expect("session");
    let ours = fs::read_to_string("/proc/self/stat").expect("stat");
    let ours = ours
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(3))
        .expect("sid");
    assert_ne!(
        theirs.trim(),
        ours,
        "activate must not share the controller's session"
    );
}

#[test]
fn every_step_is_send_so_the_controller_can_spawn_it() {
    fn assert_send<F: std::future::Future + Send>(_: F) {}
    let t = LocalTarget::default();
    let generation = GenerationId::new(1, "ab").expect("generation");
    let attempt = ActivationAttempt {
        generation: generation.clone(),
        id: "1".to_owned(),
    };
    let path = Path::new("/x");
    assert_send(observe(&t, "/x", T));
    assert_send(install(&t, "/x", path, b"", &generation, T));
    assert_send(switch(&t, "/x", &generation, T));
    assert_send(start_activation(&t, "/x", &generation, "switch", T));
    assert_send(wait_activation(&t, "/x", &attempt, T));
    assert_send(activate(&t, "/x", &generation, "switch", T));
    assert_send(health_check(&t, &[], T));
    assert_send(rollback(&t, "/x", &generation, "switch", T));
    assert_send(prune(&t, "/x", 1, &[], T));
    let confirmation = Confirmation {
        id: "1".to_owned(),
        attempt: attempt.clone(),
        previous: None,
        mode: "switch".to_owned(),
        timeout: T,
        rollback_id: "2".to_owned(),
    };
    assert_send(arm_confirmation(&t, "/x", &attempt, None, "switch", T, T));
    assert_send(confirm(&t, "/x", &confirmation, T));
    assert_send(confirmation_state(&t, "/x", &confirmation, T));
}

#[tokio::test]
async fn an_activation_whose_runner_dies_is_reported_lost() {
    let m = Machine::new();
    let generation = m.installed(1, "v1", 0).await;
    let artifact = m
        .state()
        .join("generations")
        .join(generation.to_string())
        .join("artifact");
    // Kill the runner (this script's parent) before it can write a status.
    fs::write(
        artifact.join("activate"),
        "#!/bin/sh\nkill -9 $PPID\nsleep 0.2\n",
    )
    .expect("write");
    let error = activate(&m.target, &m.state_dir, &generation, "switch", T)
        .await
        .expect_err("lost");
    assert!(
        matches!(error, MachineError::ActivationLost { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn current_flips_atomically_under_a_concurrent_reader() {
    let m = Machine::new();
    let a = m.installed(1, "v1", 0).await;
    let b = m.installed(2, "v2", 0).await;
    switch(&m.target, &m.state_dir, &a, T)
        .await
        .expect("switch");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let current = m.state().join("current");
    let reader = {
        let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::SeqCst) {
                let link = fs::read_link(&current).map_err(|e| format!("read_link: {e}"))?;
                let text = link.to_string_lossy().into_owned();
                if !text.starts_with("generations/") {
                    return Err(format!("odd link {text}"));
                }
                fs::metadata(current.join(".complete"))
                    .map_err(|e| format!("marker via link: {e}"))?;
                reads.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    for i in 0..200 {
        let to = if i % 2 == 0 { &b } else { &a };
        switch(&m.target, &m.state_dir, to, T)
            .await
            .expect("switch");
    }
    stop.store(true, Ordering::SeqCst);
    reader
        .join()
        .expect("reader thread")
        .expect("current was always a valid link");
    assert!(
        reads.load(Ordering::SeqCst) > 200,
        "the reader must have raced the flips"
    );
    let leftovers = fs::read_dir(m.state())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("current.tmp"))
        .count();
    assert_eq!(leftovers, 0);
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current_generation(), Some(&a));
}

#[tokio::test]
async fn observe_reports_current_pointing_at_an_incomplete_or_missing_generation() {
    let m = Machine::new();
    let good = m.installed(1, "v1", 0).await;
    let half = GenerationId::new(2, "abc").expect("generation");
    fs::create_dir_all(m.state().join("generations/2-abc/artifact")).expect("mkdir");
    fs::create_dir_all(m.state().join("generations/not-ours")).expect("mkdir");
    std::os::unix::fs::symlink("generations/2-abc", m.state().join("current")).expect("symlink");
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(
        facts.current,
        CurrentLink::Broken {
            target: "generations/2-abc".to_owned(),
            generation: Some(half.clone())
        }
    );
    assert_eq!(facts.current_generation(), None);
    assert_eq!(facts.generations, [good]);
    assert_eq!(facts.incomplete, std::slice::from_ref(&half));

    let error = switch(&m.target, &m.state_dir, &half, T)
        .await
        .expect_err("not installed");
    assert!(
        matches!(error, MachineError::NotInstalled { .. }),
        "{error:?}"
    );

    fs::remove_file(m.state().join("current")).expect("rm");
    std::os::unix::fs::symlink("generations/9-gone", m.state().join("current")).expect("symlink");
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert!(
        matches!(&facts.current, CurrentLink::Broken { generation: Some(g), .. } if g.number() == 9),
        "{:?}",
        facts.current
    );
}

#[tokio::test]
async fn installing_a_hash_already_on_the_target_copies_instead_of_uploading() {
    let m = Machine::new();
    let (root, hash) = m.artifact("shared", "v1", 0);
    let first = GenerationId::new(1, hash.clone()).expect("generation");
    let outcome = install(&m.target, &m.state_dir, &root, b"{}", &first, T)
        .await
        .expect("install");
    assert!(
        matches!(outcome, InstallOutcome::Uploaded { .. }),
        "{outcome:?}"
    );
    // Running as root, permissions cannot make the source unreadable:
    // remove it, so an upload attempt could only fail.
    fs::remove_dir_all(&root).expect("rm artifact");
    let second = GenerationId::new(2, hash).expect("generation");
    let outcome = install(
        &m.target,
        &m.state_dir,
        &root,
        b"{\"second\":true}",
        &second,
        T,
    )
    .await
    .expect("install without the local artifact");
    assert_eq!(outcome, InstallOutcome::CopiedOnTarget);
    let dir = m.state().join("generations").join(second.to_string());
    assert_eq!(
        tree_hash(&dir.join("artifact")).expect("hash"),
        second.hash()
    );
    assert_eq!(
        fs::read_to_string(dir.join("roles.json")).expect("roles"),
        "{\"second\":true}"
    );
    let mode = fs::metadata(dir.join("artifact/activate"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "private to its user, executable");
    let outcome = install(&m.target, &m.state_dir, &root, b"{}", &second, T)
        .await
        .expect("install");
    assert_eq!(outcome, InstallOutcome::AlreadyPresent);
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.generations, [first, second]);
}

#[tokio::test]
async fn an_install_cut_short_is_started_over() {
    let m = Machine::new();
    let (root, hash) = m.artifact("a1", "v1", 0);
    let generation = GenerationId::new(1, hash).expect("generation");
    let dir = m.state().join("generations").join(generation.to_string());
    fs::create_dir_all(dir.join("artifact")).expect("mkdir");
    fs::write(dir.join("artifact/junk"), "half").expect("write");
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.incomplete, std::slice::from_ref(&generation));
    let outcome = install(&m.target, &m.state_dir, &root, b"{}", &generation, T)
        .await
        .expect("install");
    assert!(
        matches!(outcome, InstallOutcome::Uploaded { .. }),
        "{outcome:?}"
    );
    assert!(!dir.join("artifact/junk").exists());
    assert_eq!(
        tree_hash(&dir.join("artifact")).expect("hash"),
        generation.hash()
    );
    assert_eq!(
        fs::read_to_string(dir.join(".complete"))
            .expect("marker")
            .trim(),
        generation.hash()
    );
}

#[tokio::test]
async fn a_large_roles_document_travels_whole_and_an_identical_generation_is_reused() {
    let m = Machine::new();
    let roles = format!("{{\"pad\":\"{}\"}}", "x".repeat(200_000));
    let other_roles = format!("{{\"pad\":\"{}\"}}", "y".repeat(200_000));
    let (root, hash) = m.artifact("a1", "v1", 0);
    let first = GenerationId::new(1, hash.clone()).expect("generation");
    install(&m.target, &m.state_dir, &root, roles.as_bytes(), &first, T)
        .await
        .expect("install");
    let second = GenerationId::new(2, hash.clone()).expect("generation");
    let outcome = install(
        &m.target,
        &m.state_dir,
        &root,
        other_roles.as_bytes(),
        &second,
        T,
    )
    .await
    .expect("install");
    assert_eq!(outcome, InstallOutcome::CopiedOnTarget);
    for (generation, text) in [(&first, &roles), (&second, &other_roles)] {
        let dir = m.state().join("generations").join(generation.to_string());
        assert_eq!(
            &fs::read_to_string(dir.join("roles.json")).expect("roles"),
            text
        );
    }
    // The same artifact and roles as a complete generation: that one is used.
    let third = GenerationId::new(3, hash).expect("generation");
    let outcome = install(&m.target, &m.state_dir, &root, roles.as_bytes(), &third, T)
        .await
        .expect("install");
    assert_eq!(
        outcome,
        InstallOutcome::Reused {
            generation: first.clone()
        }
    );
    assert!(
        !m.state()
            .join("generations")
            .join(third.to_string())
            .exists()
    );
}

#[tokio::test]
async fn health_checks_pass_fail_and_time_out() {
    let m = Machine::new();
    let argv = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
    let ok = health_check(&m.target, &argv(&["sh", "-c", "echo healthy"]), T)
        .await
        .expect("pass");
    assert_eq!(ok.stdout, "healthy\n");

    let error = health_check(&m.target, &argv(&["sh", "-c", "echo down >&2; exit 2"]), T)
        .await
        .expect_err("fail");
    match &error {
        MachineError::HealthCheckFailed { output, .. } => {
            assert_eq!(output.code, Some(2));
            assert_eq!(output.stderr, "down\n");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(error.is_health_failure() && !error.is_transient());

    let started = Instant::now();
    let error = health_check(
        &m.target,
        &argv(&["sleep", "30"]),
        Duration::from_millis(300),
    )
    .await
    .expect_err("time out");
    assert!(
        matches!(error, MachineError::HealthCheckTimedOut { .. }),
        "{error:?}"
    );
    assert!(error.is_health_failure() && error.is_timeout());
    assert!(started.elapsed() < Duration::from_secs(5));

    let error = health_check(&m.target, &argv(&["/nonexistent/check"]), T)
        .await
        .expect_err("cannot run");
    assert!(!error.is_health_failure(), "{error:?}");
}

#[tokio::test]
async fn prune_keeps_the_newest_current_and_protected_generations() {
    let m = Machine::new();
    let mut all = Vec::new();
    for n in 1..=5 {
        all.push(m.installed(n, &format!("v{n}"), 0).await);
    }
    switch(&m.target, &m.state_dir, &all[2], T)
        .await
        .expect("switch");
    fs::create_dir_all(m.state().join("generations/6-abc")).expect("mkdir");
    let removed = prune(&m.target, &m.state_dir, 2, &[all[0].clone()], T)
        .await
        .expect("prune");
    let half = GenerationId::new(6, "abc").expect("generation");
    assert_eq!(removed, [all[1].clone(), half]);
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(
        facts.generations,
        [
            all[0].clone(),
            all[2].clone(),
            all[3].clone(),
            all[4].clone()
        ]
    );
    assert!(facts.incomplete.is_empty());
    assert_eq!(facts.current_generation(), Some(&all[2]));
    let removed = prune(&m.target, &m.state_dir, 0, &[], T)
        .await
        .expect("prune");
    assert_eq!(removed, [all[4].clone(), all[3].clone(), all[0].clone()]);
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(
        facts.generations,
        [all[2].clone()],
        "current is never pruned"
    );
}

#[tokio::test]
async fn invalid_inputs_are_refused_before_running_anything() {
    let m = Machine::new();
    for bad in ["relative/dir", "/", "", "/a\nb"] {
        let error = observe(&m.target, bad, T)
            .await
            .expect_err("invalid state dir");
        assert!(
            matches!(error, MachineError::InvalidStateDir { .. }),
            "{bad:?}"
        );
        assert!(!error.is_transient());
    }
    assert!(GenerationId::new(1, "ab/cd").is_err());
    assert!(GenerationId::new(1, "").is_err());
    let generation = m.installed(1, "v1", 0).await;
    let error = start_activation(&m.target, &m.state_dir, &generation, "switch; rm -rf /", T)
        .await
        .expect_err("invalid mode");
    assert!(matches!(error, MachineError::InvalidMode { .. }));
}

#[test]
fn generation_ids_and_facts_round_trip_through_json() {
    let generation = GenerationId::new(12, "abc123").expect("generation");
    let json = serde_json::to_string(&generation).expect("serialize");
    assert_eq!(json, r#"{"number":12,"hash":"abc123"}"#);
    assert_eq!(
        serde_json::from_str::<GenerationId>(&json).expect("deserialize"),
        generation
    );
    assert!(serde_json::from_str::<GenerationId>(r#"{"number":1,"hash":"../x"}"#).is_err());
    assert_eq!(
        GenerationId::from_dir_name("12-abc123"),
        Some(generation.clone())
    );
    for foreign in ["012-abc", "+1-abc", "1-", "abc", "1-a.b"] {
        assert_eq!(GenerationId::from_dir_name(foreign), None, "{foreign}");
    }
    let facts = MachineFacts {
        hostname: "web1".to_owned(),
        boot_id: "b".to_owned(),
        uptime_secs: 5,
        kernel: "6.1.0".to_owned(),
        current: CurrentLink::Broken {
            target: "generations/12-abc123".to_owned(),
            generation: Some(generation.clone()),
        },
        generations: vec![generation.clone()],
        incomplete: vec![],
        confirmed: Some(generation.clone()),
        activation: None,
        nixos: None,
        observed_ms: 1,
    };
    let json = serde_json::to_string(&facts).expect("serialize");
    assert_eq!(
        serde_json::from_str::<MachineFacts>(&json).expect("deserialize"),
        facts
    );
    let current =
        serde_json::to_string(&CurrentLink::Generation { generation }).expect("serialize");
    assert_eq!(
        current,
        r#"{"kind":"generation","generation":{"number":12,"hash":"abc123"}}"#
    );
}

#[test]
fn the_wait_output_splits_into_log_and_status() {
    assert_eq!(
        split_status("a\nb\n\nconverge-status=0\n"),
        Some(("a\nb\n", "0"))
    );
    assert_eq!(
        split_status("no newline\nconverge-status=3\n"),
        Some(("no newline", "3"))
    );
    assert_eq!(split_status("\nconverge-status=0\n"), Some(("", "0")));
    assert_eq!(
        split_status("converge-status=running\n"),
        Some(("", "running"))
    );
    assert_eq!(split_status("garbage\n"), None);
}

/// Polls until the watchdog has finished (fired and recorded), or panics.
pub(super) async fn wait_fired<T: Target>(t: &T, state_dir: &str, c: &Confirmation) -> Rollback {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match confirmation_state(t, state_dir, c, T).await.expect("state") {
            ConfirmationState::Fired { rollback }
                if rollback.action != RollbackAction::InProgress =>
            {
                return rollback;
            }
            other => assert!(Instant::now() < deadline, "never fired: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls every 20 ms until the watchdog of `c` has exited (or is a zombie),
/// after which it can no longer act; fails after 20 s with what /proc still
/// shows of it and the confirmation's files.
pub(super) async fn wait_watchdog_gone(m: &Machine, c: &Confirmation) {
    let pidfile = m.state().join("confirm").join(format!("{}.pid", c.id));
    let line = fs::read_to_string(&pidfile).expect("the watchdog's pid file");
    let pid = line.split_whitespace().next().expect("a pid").to_owned();
    let stat = || fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = stat()
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
        if !running {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog {pid} still runs after 20 s: {}; confirm files {:?}",
            stat(),
            confirm_files(m, c)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// g1 active and current; g2 installed, switched to and activated (its
/// activation started, not waited for).
async fn deployed_pair(m: &Machine) -> (GenerationId, GenerationId, ActivationAttempt) {
    let g1 = m.installed(1, "v1", 0).await;
    let g2 = m.installed(2, "v2", 0).await;
    switch(&m.target, &m.state_dir, &g1, T)
        .await
        .expect("switch");
    activate(&m.target, &m.state_dir, &g1, "switch", T)
        .await
        .expect("activate");
    switch(&m.target, &m.state_dir, &g2, T)
        .await
        .expect("switch");
    let attempt = start_activation(&m.target, &m.state_dir, &g2, "switch", T)
        .await
        .expect("start");
    (g1, g2, attempt)
}

fn confirm_files(m: &Machine, c: &Confirmation) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(m.state().join("confirm"))
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&c.id))
        .map(|n| n[c.id.len()..].to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_confirmation_in_time_means_no_rollback() {
    let m = Machine::new();
    let (g1, g2, attempt) = deployed_pair(&m).await;
    let c = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "switch",
        Duration::from_millis(700),
        T,
    )
    .await
    .expect("arm");
    assert_eq!(
        wait_activation(&m.target, &m.state_dir, &attempt, T)
            .await
            .expect("wait")
            .code,
        0
    );
    assert_eq!(
        confirmation_state(&m.target, &m.state_dir, &c, T)
            .await
            .expect("state"),
        ConfirmationState::Pending
    );
    assert_eq!(
        confirm(&m.target, &m.state_dir, &c, T)
            .await
            .expect("confirm"),
        ConfirmOutcome::Confirmed
    );
    // Repeating a confirm whose answer was lost is harmless.
    assert_eq!(
        confirm(&m.target, &m.state_dir, &c, T)
            .await
            .expect("confirm"),
        ConfirmOutcome::Confirmed
    );
    // Once the watchdog is gone, nothing can roll back any more.
    wait_watchdog_gone(&m, &c).await;
    assert_eq!(
        confirmation_state(&m.target, &m.state_dir, &c, T)
            .await
            .expect("state"),
        ConfirmationState::Confirmed
    );
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current_generation(), Some(&g2));
    assert_eq!(m.runs(), [g1.to_string(), g2.to_string()]);
    assert_eq!(confirm_files(&m, &c), [".confirmed", ".pid", ".rollback"]);
}

#[tokio::test]
async fn an_unconfirmed_activation_rolls_back_to_the_previous_generation() {
    let m = Machine::new();
    let (g1, g2, attempt) = deployed_pair(&m).await;
    let c = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "switch",
        Duration::from_millis(300),
        T,
    )
    .await
    .expect("arm");
    // The controller restarts: the confirmation comes back from the store.
    let c: Confirmation =
        serde_json::from_str(&serde_json::to_string(&c).expect("ser")).expect("de");
    let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
    let expected_attempt = c.rollback_attempt().expect("a previous generation");
    assert_eq!(
        rollback.action,
        RollbackAction::RolledBack {
            to: g1.clone(),
            attempt: expected_attempt.clone(),
            code: Some(0)
        }
    );
    assert_eq!(rollback.activation_code, Some(0));
    assert!(rollback.fired_unix.is_some());
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(
        facts.current_generation(),
        Some(&g1),
        "current is back at the previous generation"
    );
    assert_eq!(
        m.runs(),
        [g1.to_string(), g2.to_string(), g1.to_string()],
        "previous re-activated"
    );
    let result = wait_activation(&m.target, &m.state_dir, &expected_attempt, T)
        .await
        .expect("wait");
    assert!(
        result.log.contains(&format!("generation={g1}")),
        "{}",
        result.log
    );
    // A late confirm learns it lost: the deploy failed.
    match confirm(&m.target, &m.state_dir, &c, T)
        .await
        .expect("confirm")
    {
        ConfirmOutcome::AlreadyRolledBack { rollback: late } => assert_eq!(late, rollback),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        confirm_files(&m, &c),
        [".fired", ".pid", ".result", ".rollback"]
    );
}

#[tokio::test]
async fn a_watchdog_waits_for_a_hung_activation_no_longer_than_its_timeout() {
    let m = Machine::new();
    let g1 = m.installed(1, "v1", 0).await;
    switch(&m.target, &m.state_dir, &g1, T)
        .await
        .expect("switch");
    activate(&m.target, &m.state_dir, &g1, "switch", T)
        .await
        .expect("activate");
    let g2 = m.installed_hanging(2).await;
    switch(&m.target, &m.state_dir, &g2, T)
        .await
        .expect("switch");
    let attempt = start_activation(&m.target, &m.state_dir, &g2, "switch", T)
        .await
        .expect("start");
    // The activation hangs forever; the watchdog's wait for it is bounded
    // by the activation timeout (1 s here), then it rolls back.
    let c = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "switch",
        Duration::from_millis(200),
        Duration::from_secs(1),
    )
    .await
    .expect("arm");
    let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
    assert!(
        matches!(&rollback.action, RollbackAction::RolledBack { to, code: Some(0), .. } if *to == g1),
        "{rollback:?}"
    );
    assert_eq!(
        rollback.activation_code, None,
        "the hung activation has no exit code"
    );
    let result = fs::read_to_string(m.state().join("confirm").join(format!("{}.result", c.id)))
        .expect("the watchdog's record");
    assert!(result.contains("activation=timeout"), "{result}");
    // The watchdog ended the hung activation's process group before
    // rolling back: its runner recorded how it ended.
    let activations = m
        .state()
        .join("generations")
        .join(g2.to_string())
        .join("activations");
    let status = fs::read_to_string(activations.join(format!("{}.status", attempt.id)))
        .expect("the hung activation has a status");
    assert_eq!(status.trim(), "143", "ended by SIGTERM");
    let pgid = fs::read_to_string(activations.join(format!("{}.pgid", attempt.id)))
        .expect("its process group");
    let left = std::process::Command::new("kill")
        .args(["-0", "--", &format!("-{}", pgid.trim())])
        .status()
        .expect("kill -0");
    assert!(!left.success(), "nothing of its process group is left");
}

#[tokio::test]
async fn confirm_and_the_watchdog_racing_have_exactly_one_winner() {
    let m = Machine::new();
    let (g1, g2, first) = deployed_pair(&m).await;
    wait_activation(&m.target, &m.state_dir, &first, T)
        .await
        .expect("wait");
    let (mut confirmed, mut rolled_back) = (0, 0);
    for round in 0..16u64 {
        // current must point at g2 again for each round.
        switch(&m.target, &m.state_dir, &g2, T)
            .await
            .expect("switch");
        let attempt = start_activation(&m.target, &m.state_dir, &g2, "switch", T)
            .await
            .expect("start");
        wait_activation(&m.target, &m.state_dir, &attempt, T)
            .await
            .expect("wait");
        let runs_before = m.runs().len();
        let c = arm_confirmation(
            &m.target,
            &m.state_dir,
            &attempt,
            Some(&g1),
            "switch",
            Duration::from_millis(200),
            T,
        )
        .await
        .expect("arm");
        // Aim at the watchdog's deadline from both sides of it.
        tokio::time::sleep(Duration::from_millis(150 + round * 8)).await;
        let outcome = confirm(&m.target, &m.state_dir, &c, T)
            .await
            .expect("confirm");
        // Let a watchdog that might (wrongly) act as well do so: once it
        // has exited, whatever it did is on disk.
        wait_watchdog_gone(&m, &c).await;
        let files = confirm_files(&m, &c);
        let current = observe(&m.target, &m.state_dir, T)
            .await
            .expect("observe")
            .current;
        match outcome {
            ConfirmOutcome::Confirmed => {
                confirmed += 1;
                assert_eq!(files, [".confirmed", ".pid", ".rollback"], "round {round}");
                assert_eq!(
                    current,
                    CurrentLink::Generation {
                        generation: g2.clone()
                    },
                    "round {round}"
                );
                assert_eq!(
                    m.runs().len(),
                    runs_before,
                    "round {round}: nothing re-activated"
                );
            }
            ConfirmOutcome::AlreadyRolledBack { .. } => {
                rolled_back += 1;
                let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
                assert!(
                    matches!(rollback.action, RollbackAction::RolledBack { .. }),
                    "round {round}"
                );
                assert_eq!(
                    confirm_files(&m, &c),
                    [".fired", ".pid", ".result", ".rollback"],
                    "round {round}"
                );
                let current = observe(&m.target, &m.state_dir, T)
                    .await
                    .expect("observe")
                    .current;
                assert_eq!(
                    current,
                    CurrentLink::Generation {
                        generation: g1.clone()
                    },
                    "round {round}"
                );
                assert_eq!(
                    m.runs().len(),
                    runs_before + 1,
                    "round {round}: re-activated once"
                );
            }
        }
    }
    println!("race: {confirmed} confirmed, {rolled_back} rolled back");
    assert_eq!(confirmed + rolled_back, 16);
}

#[tokio::test]
async fn without_a_previous_generation_the_watchdog_removes_current() {
    let m = Machine::new();
    let g1 = m.installed(1, "v1", 0).await;
    switch(&m.target, &m.state_dir, &g1, T)
        .await
        .expect("switch");
    let attempt = start_activation(&m.target, &m.state_dir, &g1, "test", T)
        .await
        .expect("start");
    let c = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        None,
        "test",
        Duration::from_millis(200),
        T,
    )
    .await
    .expect("arm");
    assert_eq!(c.rollback_attempt(), None);
    let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
    assert_eq!(rollback.action, RollbackAction::CurrentRemoved);
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current, CurrentLink::Absent);
}

#[tokio::test]
async fn the_watchdog_leaves_a_current_that_moved_on_alone() {
    let m = Machine::new();
    let (g1, _g2, attempt) = deployed_pair(&m).await;
    let g3 = m.installed(3, "v3", 0).await;
    let c = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "switch",
        Duration::from_millis(400),
        T,
    )
    .await
    .expect("arm");
    switch(&m.target, &m.state_dir, &g3, T)
        .await
        .expect("switch");
    let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
    assert_eq!(
        rollback.action,
        RollbackAction::Superseded {
            current: format!("generations/{g3}")
        }
    );
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current_generation(), Some(&g3));
}

#[tokio::test]
async fn the_confirmation_window_starts_when_the_activation_ends() {
    let m = Machine::new();
    let g1 = m.installed(1, "v1", 0).await;
    let g2 = m.installed(2, "v2", 0).await;
    switch(&m.target, &m.state_dir, &g1, T)
        .await
        .expect("switch");
    activate(&m.target, &m.state_dir, &g1, "switch", T)
        .await
        .expect("activate");
    let artifact = m
        .state()
        .join("generations")
        .join(g2.to_string())
        .join("artifact");
    fs::write(artifact.join("activate"), GATED).expect("write");
    switch(&m.target, &m.state_dir, &g2, T)
        .await
        .expect("switch");
    let attempt = start_activation(&m.target, &m.state_dir, &g2, "switch", T)
        .await
        .expect("start");
    let armed = Instant::now();
    let window = Duration::from_millis(300);
    let c = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "switch",
        window,
        T,
    )
    .await
    .expect("arm");
    // The activation runs until released: twice the window after arming (or
    // later, on a busy machine), a window counted from arming would have
    // fired.
    tokio::time::sleep((window * 2).saturating_sub(armed.elapsed())).await;
    assert_eq!(
        confirmation_state(&m.target, &m.state_dir, &c, T)
            .await
            .expect("state"),
        ConfirmationState::Pending,
        "the window must not run while the activation does"
    );
    let released = Instant::now();
    fs::write(m.state().join("release"), "").expect("release");
    let rollback = wait_fired(&m.target, &m.state_dir, &c).await;
    assert_eq!(rollback.activation_code, Some(0));
    assert!(released.elapsed() >= window, "{:?}", released.elapsed());
}

#[tokio::test]
async fn a_killed_watchdog_is_reported_lost() {
    let m = Machine::new();
    let (g1, _g2, attempt) = deployed_pair(&m).await;
    let c = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "switch",
        Duration::from_secs(60),
        T,
    )
    .await
    .expect("arm");
    let pid =
        fs::read_to_string(m.state().join("confirm").join(format!("{}.pid", c.id))).expect("pid");
    let pid = pid.split_whitespace().next().expect("pid").to_owned();
    std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = confirmation_state(&m.target, &m.state_dir, &c, T)
            .await
            .expect("state");
        if state == ConfirmationState::WatchdogLost {
            break;
        }
        assert!(Instant::now() < deadline, "{state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Claiming still works, so the controller can roll back by itself.
    assert_eq!(
        confirm(&m.target, &m.state_dir, &c, T)
            .await
            .expect("confirm"),
        ConfirmOutcome::Confirmed
    );
}

#[tokio::test]
async fn arming_refuses_what_it_cannot_watch() {
    let m = Machine::new();
    let (g1, g2, attempt) = deployed_pair(&m).await;
    let window = Duration::from_secs(1);
    let error = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "boot",
        window,
        T,
    )
    .await
    .expect_err("boot changes nothing now");
    assert!(matches!(error, MachineError::NothingToConfirm { .. }) && !error.is_transient());
    switch(&m.target, &m.state_dir, &g1, T)
        .await
        .expect("switch");
    let error = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&g1),
        "switch",
        window,
        T,
    )
    .await
    .expect_err("current moved");
    assert!(
        matches!(error, MachineError::NotCurrent { .. }),
        "{error:?}"
    );
    switch(&m.target, &m.state_dir, &g2, T)
        .await
        .expect("switch");
    let missing = GenerationId::new(9, "abc").expect("generation");
    let error = arm_confirmation(
        &m.target,
        &m.state_dir,
        &attempt,
        Some(&missing),
        "switch",
        window,
        T,
    )
    .await
    .expect_err("previous not installed");
    assert!(
        matches!(&error, MachineError::NotInstalled { generation, .. } if generation == &missing),
        "{error:?}"
    );
    let bogus = Confirmation {
        id: "abc".to_owned(),
        attempt: attempt.clone(),
        previous: None,
        mode: "switch".to_owned(),
        timeout: window,
        rollback_id: "def".to_owned(),
    };
    let error = confirm(&m.target, &m.state_dir, &bogus, T)
        .await
        .expect_err("never armed");
    assert!(matches!(error, MachineError::ConfirmationMissing { .. }) && !error.is_transient());
    assert!(!m.state().join("confirm").exists(), "nothing was armed");
}

// ---------------------------------------------- protocol v2: one activation per state dir

/// Appends its generation to `activation-runs` in the state directory, then
/// waits (at most 30 s) until `release` appears there.
pub(super) const GATED: &str = r#"#!/bin/sh
echo "$CONVERGE_GENERATION" >> "$CONVERGE_STATE_DIR/activation-runs"
i=0
while [ ! -e "$CONVERGE_STATE_DIR/release" ] && [ "$i" -lt 1500 ]; do sleep 0.02; i=$((i + 1)); done
"#;

/// A local artifact tree `artifacts/<name>` holding `activate` (`script`,
/// mode 0755) and `files` (path, contents, mode), and its tree hash.
pub(super) fn tree(
    m: &Machine,
    name: &str,
    script: &str,
    files: &[(&str, &[u8], u32)],
) -> (PathBuf, String) {
    let root = m.dir.path().join("artifacts").join(name);
    fs::create_dir_all(&root).expect("mkdir");
    let activate: &[u8] = script.as_bytes();
    for (path, contents, mode) in [("activate", activate, 0o755)].iter().chain(files) {
        let file = root.join(path);
        fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        fs::write(&file, contents).expect("write");
        fs::set_permissions(&file, fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    let hash = tree_hash(&root).expect("hash");
    (root, hash)
}

/// Installs the tree with `script` as generation `number` (every file sent).
pub(super) async fn installed<T: Target>(
    t: &T,
    m: &Machine,
    number: u64,
    script: &str,
) -> GenerationId {
    let name = format!("g{number}");
    let (root, hash) = tree(m, &name, script, &[("name", name.as_bytes(), 0o600)]);
    let generation = GenerationId::new(number, hash).expect("generation");
    install(t, &m.state_dir, &root, b"{}", &generation, T)
        .await
        .expect("install");
    generation
}

/// Activation in mode switch within [`T`], with `watchdog`.
pub(super) fn switch_mode(
    watchdog: Option<Watchdog>,
) -> Option<(Option<GenerationId>, ActivateRequest)> {
    let request = ActivateRequest {
        mode: "switch".to_owned(),
        timeout: T,
        watchdog,
    };
    Some((None, request))
}

/// A deploy of `root` (read now) as generation `number`: install from
/// `source`, switch, activate (guarded by `watchdog`), wait up to `wait`.
pub(super) async fn deployed<T: Target>(
    t: &T,
    m: &Machine,
    (number, root, hash): (u64, &Path, &str),
    source: InstallSource<'_>,
    watchdog: Option<Watchdog>,
    wait: Duration,
) -> (GenerationId, DeployReport) {
    let generation = GenerationId::new(number, hash).expect("generation");
    let manifest = Manifest::of(root).expect("manifest");
    let request = DeployRequest {
        install: Some(InstallRequest {
            generation: generation.clone(),
            artifact: root,
            manifest: &manifest,
            roles_json: b"{\"r\":1}",
            source,
        }),
        switch: Some(None),
        activate: switch_mode(watchdog),
        wait: Some(wait),
    };
    let report = deploy(t, &m.state_dir, &request, T).await.expect("deploy");
    assert!(report.failure.is_none(), "{:?}", report.failure);
    (generation, report)
}

pub(super) fn watchdog(previous: Option<&GenerationId>, window: Duration) -> Option<Watchdog> {
    Some(Watchdog {
        previous: previous.cloned(),
        confirm_timeout: window,
    })
}

/// Polls `done` every 10 ms for up to 10 s.
pub(super) async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first number in the file at `path`, once the file has one.
pub(super) async fn number_in(path: &Path) -> u32 {
    let read = || {
        fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    until(&format!("a number in {}", path.display()), || {
        read().is_some()
    })
    .await;
    read().expect("number")
}

/// Live (not zombie) processes with their process group, from /proc.
pub(super) fn processes() -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        if let [state, _ppid, pgrp, ..] = fields[..] {
            if state != "Z" {
                found.push((pid, pgrp.parse().unwrap_or(0)));
            }
        }
    }
    found
}

pub(super) fn running(pid: u32) -> bool {
    processes().iter().any(|(p, _)| *p == pid)
}

pub(super) fn attempt_file(
    m: &Machine,
    generation: &GenerationId,
    attempt: &str,
    ext: &str,
) -> PathBuf {
    m.state()
        .join("generations")
        .join(generation.to_string())
        .join("activations")
        .join(format!("{attempt}.{ext}"))
}

#[tokio::test]
async fn one_activation_per_state_dir_attaching_to_its_own_generation_refusing_others() {
    let m = Machine::new();
    let g = installed(&m.target, &m, 1, GATED).await;
    let h = installed(&m.target, &m, 2, GATED).await;
    switch(&m.target, &m.state_dir, &g, T)
        .await
        .expect("switch");
    let first = start_activation(&m.target, &m.state_dir, &g, "switch", T)
        .await
        .expect("start");
    until("g's activate runs", || m.runs().len() == 1).await;

    let again = start_activation(&m.target, &m.state_dir, &g, "switch", T)
        .await
        .expect("attach");
    assert_eq!(again, first, "the running attempt is the one returned");
    let request = DeployRequest {
        switch: Some(Some(g.clone())),
        activate: switch_mode(None),
        wait: Some(Duration::from_millis(50)),
        ..DeployRequest::default()
    };
    let report = deploy(&m.target, &m.state_dir, &request, T)
        .await
        .expect("deploy");
    assert!(report.failure.is_none(), "{:?}", report.failure);
    let started = report.started.expect("started");
    assert!(started.attached && started.attempt == first, "{started:?}");
    assert_eq!(report.waited, Some(WaitOutcome::Running));

    let error = start_activation(&m.target, &m.state_dir, &h, "switch", T)
        .await
        .expect_err("another generation's activation runs");
    match &error {
        MachineError::ActivationBusy {
            wanted,
            running,
            attempt,
            ..
        } => {
            assert_eq!((wanted, running, attempt), (&h, &g.to_string(), &first.id));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(error.is_transient());
    // A deploy that would switch to h while g's activation runs is refused
    // before its switch: `current` still names g.
    let busy = DeployRequest {
        switch: Some(Some(h.clone())),
        activate: switch_mode(None),
        ..DeployRequest::default()
    };
    let report = deploy(&m.target, &m.state_dir, &busy, T)
        .await
        .expect("deploy");
    assert!(!report.switched, "{report:?}");
    assert!(
        matches!(
            report.failure,
            Some((
                super::DeployPhase::Switch,
                MachineError::ActivationBusy { .. }
            ))
        ),
        "{:?}",
        report.failure
    );
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.current_generation(), Some(&g), "current is unchanged");
    assert_eq!(m.runs(), [g.to_string()], "activate ran once");

    fs::write(m.state().join("release"), "").expect("release");
    let ended = wait_activation(&m.target, &m.state_dir, &first, T).await;
    assert_eq!(ended.expect("wait").code, 0);
    switch(&m.target, &m.state_dir, &h, T)
        .await
        .expect("switch");
    let second = start_activation(&m.target, &m.state_dir, &h, "switch", T)
        .await
        .expect("h starts once g ended");
    assert_ne!(second.id, first.id);
    let ended = wait_activation(&m.target, &m.state_dir, &second, T).await;
    assert_eq!(ended.expect("wait").code, 0);
    assert_eq!(m.runs(), [g.to_string(), h.to_string()]);
}

#[tokio::test]
async fn a_controller_back_after_an_unconfirmed_activation_attaches_to_it() {
    let m = Machine::new();
    let (root, hash) = m.artifact("a1", "v1", 0);
    let g = (1, root.as_path(), hash.as_str());
    let window = watchdog(None, Duration::from_secs(60));
    let (generation, first) =
        deployed(&m.target, &m, g, InstallSource::Stream, window.clone(), T).await;
    let first = first.started.expect("started");
    let c = first.confirmation.clone().expect("armed");
    assert!(!first.attached);

    // The controller died before confirming; the next one deploys again.
    let (_, again) = deployed(&m.target, &m, g, InstallSource::Stream, window, T).await;
    assert_eq!(again.install, Some(InstallOutcome::AlreadyPresent));
    let again = again.started.expect("started");
    assert!(again.attached, "{again:?}");
    assert_eq!(again.attempt, first.attempt);
    assert_eq!(again.confirmation.as_ref(), Some(&c), "the same canary");
    assert_eq!(m.runs(), [generation.to_string()], "activate ran once");

    assert_eq!(
        confirm(&m.target, &m.state_dir, &c, T)
            .await
            .expect("confirm"),
        ConfirmOutcome::Confirmed
    );
    wait_watchdog_gone(&m, &c).await;
    // Confirmed, the generation activates anew.
    let third = start_activation(&m.target, &m.state_dir, &generation, "switch", T)
        .await
        .expect("start");
    assert_ne!(third, first.attempt);
    wait_activation(&m.target, &m.state_dir, &third, T)
        .await
        .expect("wait");
    assert_eq!(m.runs().len(), 2);
}

#[tokio::test]
async fn the_lock_of_a_killed_runner_is_taken_over_and_reported_lost() {
    let m = Machine::new();
    let g = m.installed_hanging(1).await;
    let h = m.installed(2, "v2", 0).await;
    switch(&m.target, &m.state_dir, &g, T)
        .await
        .expect("switch");
    let attempt = start_activation(&m.target, &m.state_dir, &g, "switch", T)
        .await
        .expect("start");
    let runner = number_in(&attempt_file(&m, &g, &attempt.id, "pid")).await;
    let group = number_in(&attempt_file(&m, &g, &attempt.id, "pgid")).await;
    until("g's activate runs", || m.runs().len() == 1).await;
    for victim in [runner.to_string(), format!("-{group}")] {
        let killed = std::process::Command::new("kill")
            .args(["-KILL", "--", &victim])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill {victim}");
    }
    until("the runner and its activate are gone", || {
        !running(runner) && !processes().iter().any(|(_, pg)| *pg == group)
    })
    .await;
    assert!(m.state().join("activation/record").exists(), "lock left");

    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    let lost = ActivationInProgress {
        generation: g.clone(),
        attempt: attempt.id.clone(),
        state: ActivationState::Lost,
    };
    assert_eq!(facts.activation.as_ref(), Some(&lost));
    let local = observe_local(&m.state_dir, T).await.expect("observe");
    assert_eq!(local.activation, Some(lost));
    let error = wait_activation(&m.target, &m.state_dir, &attempt, T)
        .await
        .expect_err("lost");
    assert!(
        matches!(error, MachineError::ActivationLost { .. }),
        "{error:?}"
    );

    switch(&m.target, &m.state_dir, &h, T)
        .await
        .expect("switch");
    let next = start_activation(&m.target, &m.state_dir, &h, "switch", T)
        .await
        .expect("the stale lock is taken over");
    let ended = wait_activation(&m.target, &m.state_dir, &next, T).await;
    assert_eq!(ended.expect("wait").code, 0);
    assert_eq!(m.runs(), [g.to_string(), h.to_string()]);
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.activation, None);
    let names: Vec<String> = fs::read_dir(m.state())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let lock = |n: &String| n == "activation" || n.starts_with("activation.");
    assert!(!names.iter().any(lock), "{names:?}");
}

#[tokio::test]
async fn ending_an_activation_ends_its_whole_process_group() {
    let m = Machine::new();
    let script = "#!/bin/sh\nsleep 600 &\necho $! > \"$CONVERGE_STATE_DIR/child\"\nwait\n";
    let g = installed(&m.target, &m, 1, script).await;
    switch(&m.target, &m.state_dir, &g, T)
        .await
        .expect("switch");
    let attempt = start_activation(&m.target, &m.state_dir, &g, "switch", T)
        .await
        .expect("start");
    let group = number_in(&attempt_file(&m, &g, &attempt.id, "pgid")).await;
    let child = number_in(&m.state().join("child")).await;
    let members: Vec<u32> = processes()
        .into_iter()
        .filter(|(_, pg)| *pg == group)
        .map(|(p, _)| p)
        .collect();
    assert!(
        members.contains(&group) && members.contains(&child),
        "{members:?}"
    );

    let killed = kill_activation(&m.target, &m.state_dir, &attempt).await;
    assert!(killed.expect("kill"), "it was running");
    let left: Vec<_> = processes()
        .into_iter()
        .filter(|(_, pg)| *pg == group)
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
    let status = fs::read_to_string(attempt_file(&m, &g, &attempt.id, "status"));
    assert_eq!(status.expect("status").trim(), "143", "ended by SIGTERM");
    let facts = observe(&m.target, &m.state_dir, T).await.expect("observe");
    assert_eq!(facts.activation, None, "the lock is released");
    let again = kill_activation(&m.target, &m.state_dir, &attempt).await;
    assert!(!again.expect("kill"), "nothing left to end");
}
