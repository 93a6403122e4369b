//! The tiny guest harness: it boots, answers converge's SSH client, and
//! leaves no QEMU behind.

use converge::driver::Target as _;
use converge::driver::protocol::{self, CurrentLink};
use converge::driver::ssh::{SshOptions, SshTarget};
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use testbed::guest::*;

const BOOT_LIMIT: Duration = Duration::from_secs(120);
const T: Duration = Duration::from_secs(60);

fn booted_guest() -> Guest {
    let image = GuestImage::get();
    let mut guest = Guest::boot(&image, free_port());
    let took = guest.wait_ssh(BOOT_LIMIT);
    println!("guest on port {}: boot to SSH in {took:.1?}", guest.port);
    guest
}

/// converge's own SSH client for the guest; its control directory lives
/// in `control` (short, under /tmp).
fn converge_target(guest: &Guest, control: &Path) -> SshTarget {
    let mut options = SshOptions::new("127.0.0.1", control.join("c"));
    options.port = guest.port;
    options.host_key = Some(guest.image.host_key.clone());
    options.identity_file = Some(guest.image.client_key.clone());
    options.ssh_config = Some(guest.ssh_config.clone());
    SshTarget::new(options).expect("ssh target")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| (*p).to_owned()).collect()
}

#[test]
fn a_tiny_guest_boots_and_answers_ssh_through_the_forward() {
    let guest = booted_guest();
    let control = tempfile::tempdir_in("/tmp").expect("tempdir");
    let local = tempfile::tempdir().expect("tempdir");
    let src = local.path().join("tree");
    fs::create_dir_all(src.join("bin")).expect("mkdir");
    fs::write(src.join("hello.txt"), "hello guest\n").expect("write");
    fs::write(src.join("bin/tool"), "#!/bin/sh\necho tool ran\n").expect("write");
    fs::set_permissions(src.join("bin/tool"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("bin/tool", src.join("tool-link")).expect("symlink");

    runtime().block_on(async {
        let t = converge_target(&guest, control.path());
        let started = Instant::now();
        let uname = t.run(&argv(&["uname", "-r"]), &[], T).await.expect("uname");
        println!("first command over converge's client: {:.1?}", started.elapsed());
        assert!(uname.succeeded(), "{uname:?}");
        assert_eq!(uname.stdout.trim(), guest.image.kernel_release);
        let host = t.run(&argv(&["hostname"]), &[], T).await.expect("hostname");
        assert_eq!(host.stdout.trim(), "guest", "{host:?}");

        t.upload_dir(&src, "/var/lib/uploaded", T)
            .await
            .expect("upload on a command's stdin");
        let check = t
            .run(
                &argv(&[
                    "sh",
                    "-c",
                    "cat /var/lib/uploaded/hello.txt; stat -c %a /var/lib/uploaded/bin/tool; readlink /var/lib/uploaded/tool-link; /var/lib/uploaded/tool-link; ls -a /var/lib",
                ]),
                &[],
                T,
            )
            .await
            .expect("check upload");
        assert_eq!(
            check.stdout,
            "hello guest\n700\nbin/tool\ntool ran\n.\n..\nuploaded\n",
            "{check:?}"
        );
        t.disconnect().await;
    });
}

#[test]
fn converge_observes_the_guest_over_its_machine_protocol() {
    let guest = booted_guest();
    let control = tempfile::tempdir_in("/tmp").expect("tempdir");
    runtime().block_on(async {
        let t = converge_target(&guest, control.path());
        let facts = protocol::observe(&t, "/var/lib/converge", T)
            .await
            .expect("observe");
        assert_eq!(facts.hostname, "guest");
        assert_eq!(facts.kernel, guest.image.kernel_release);
        assert_eq!(facts.current, CurrentLink::Absent);
        assert!(facts.generations.is_empty() && facts.incomplete.is_empty());
        assert!(facts.uptime_secs < 600, "{facts:?}");
        t.disconnect().await;
    });

    let dir = guest.dir().to_path_buf();
    let pid = fs::read_to_string(dir.join("qemu.pid")).expect("qemu pidfile");
    drop(guest);
    assert!(!dir.exists(), "the guest directory is removed");
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "qemu is gone"
    );
}

#[test]
fn a_guest_whose_test_process_died_is_reaped() {
    let dir = tempfile::Builder::new()
        .prefix(DIR_PREFIX)
        .tempdir_in("/tmp")
        .expect("tempdir")
        .keep();
    // No live process has this identity: the owner is gone.
    fs::write(dir.join("owner"), "4194304 1").expect("write");
    // Stands in for the orphaned QEMU: its command line names the directory.
    let mut orphan = Command::new("tail")
        .arg("-f")
        .arg(dir.join("owner"))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    fs::write(dir.join("qemu.pid"), orphan.id().to_string()).expect("write");
    reap_orphans();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match orphan.try_wait().expect("wait") {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => break None,
            None => thread::sleep(Duration::from_millis(20)),
        }
    };
    if status.is_none() {
        let _ = orphan.kill();
        let _ = orphan.wait();
        let _ = fs::remove_dir_all(&dir);
    }
    assert!(status.is_some_and(|s| !s.success()), "killed: {status:?}");
    assert!(!dir.exists());
}
