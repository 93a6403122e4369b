//! Where ssh's control sockets and the client files converge generates for
//! ssh (its ssh_config, known_hosts lines, the pointers to kept masters)
//! live, and the checks that make that place private before anything is
//! written to it or read from it. A master socket gives whoever reaches it
//! a shell on the target, and the generated ssh_config decides what ssh
//! runs (a `ProxyCommand` runs as converge's user), so the directory must
//! be this user's own with mode 0700, and no other user may be able to
//! replace it or any directory above it. [`ControlDir`] is the
//! controller's choice of place: `STATE/ssh`, or a fresh temporary
//! directory that lives as long as the value when that would make socket
//! paths too long.
//!
//! It must not connect to targets; the only process it starts is `ssh -O
//! exit` for a master still listening in a temporary directory it removes.
//! It never changes the mode of a directory it did not just create, and
//! never follows a symbolic link in place of the directory itself.

use std::fs;
use std::io::{self, Read as _};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::error::SshError;
use super::options::{check_socket_dir, socket_dir_fits};
use crate::driver::command::unique_suffix;

/// The permission bits of a control directory, exactly.
const PRIVATE: u32 = 0o700;

/// The sticky bit: in a directory with it, only an entry's owner (or the
/// directory's, or root) may rename or remove the entry, as in /tmp.
const STICKY: u32 = 0o1000;

/// Random names tried for a temporary control directory before giving up.
const TEMPORARY_ATTEMPTS: usize = 16;

/// How long `ssh -O exit` may take for one master left in a temporary
/// control directory (it only talks to the local master).
const EXIT_REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// The directory the controller keeps ssh's control sockets and its
/// generated client files in: `STATE/ssh` under its state directory, where
/// a master kept for the next process ([`SshOptions::keep_master`]) is found
/// again; or, when socket paths under that would be too long for a Unix
/// socket, a fresh directory in the system's temporary directory (`$TMPDIR`,
/// else /tmp) with a random name.
///
/// Invariant: the path passed [`prepare_private_dir`]'s checks when this
/// value was made. A temporary one was created by this value, exclusively
/// (never one that existed before), and is removed when the value is
/// dropped, after any master still listening in it is told to exit; masters
/// there are never kept for another process. Targets using it hold it
/// ([`SshTarget::in_control_dir`]), so it goes after the last of them.
///
/// [`SshOptions::keep_master`]: super::options::SshOptions::keep_master
/// [`SshTarget::in_control_dir`]: super::master::SshTarget::in_control_dir
#[derive(Debug)]
pub struct ControlDir {
    path: PathBuf,
    temporary: bool,
}

impl ControlDir {
    /// `state/ssh` (created and checked), or a fresh private temporary
    /// directory when socket paths under `state/ssh` would be too long.
    /// Refuses a `state/ssh` that another user owns or could replace, that is
    /// a symbolic link, or whose mode is not 0700: it never falls back to a
    /// temporary directory for that.
    pub fn for_state(state: &Path) -> Result<ControlDir, SshError> {
        Self::for_state_in(state, &std::env::temp_dir())
    }

    /// [`ControlDir::for_state`] with temporary directories made in `tmp`.
    pub(super) fn for_state_in(state: &Path, tmp: &Path) -> Result<ControlDir, SshError> {
        let dir = state.join("ssh");
        if socket_dir_fits(&dir) {
            let path = prepare_private_dir(&dir)?;
            // Resolving a relative or linked state directory may lengthen it.
            if socket_dir_fits(&path) {
                return Ok(ControlDir {
                    path,
                    temporary: false,
                });
            }
        }
        Self::temporary_in(tmp)
    }

    /// A new directory in `tmp` with a random name, created with mode 0700
    /// by an exclusive create (a name that exists is never used), checked
    /// like any control directory.
    fn temporary_in(tmp: &Path) -> Result<ControlDir, SshError> {
        let uid = effective_uid()?;
        let root = fs::canonicalize(tmp).map_err(|source| SshError::ControlDir {
            action: "resolve the temporary directory",
            path: tmp.to_path_buf(),
            source,
        })?;
        for _ in 0..TEMPORARY_ATTEMPTS {
            let path = root.join(format!("cvssh-{}", random_name()));
            check_socket_dir(&path)?;
            check_parents(&path, &root, uid)?;
            match fs::DirBuilder::new().mode(PRIVATE).create(&path) {
                Ok(()) => {
                    // From here on dropping the value removes the directory.
                    let dir = ControlDir {
                        path,
                        temporary: true,
                    };
                    make_exactly_private(&dir.path, &dir.path, uid)?;
                    check_private(&dir.path, &dir.path, uid)?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(SshError::ControlDir {
                        action: "create a temporary ssh control directory",
                        path,
                        source,
                    });
                }
            }
        }
        Err(SshError::ControlDir {
            action: "create a temporary ssh control directory in",
            path: root,
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{TEMPORARY_ATTEMPTS} random names were all taken"),
            ),
        })
    }

    /// The directory, resolved: the path ssh is given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a temporary directory, removed when this value is dropped.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        if !self.temporary {
            return;
        }
        end_masters(&self.path);
        if let Err(error) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "could not remove the temporary ssh control directory");
        }
    }
}

/// Tells each master still listening in `dir` to exit (`ssh -O exit`),
/// each within [`EXIT_REQUEST_LIMIT`]. Normally none is: a master not kept
/// for the next process is told to stop when its last handle goes, and its
/// socket goes with it.
fn end_masters(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(".ssh-connection")
        {
            continue;
        }
        let socket = entry.path().join("master");
        if !fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            continue;
        }
        let child = Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-S"])
            .arg(&socket)
            .args(["-O", "exit", "converge-control-dir"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            continue;
        };
        let deadline = Instant::now() + EXIT_REQUEST_LIMIT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// 16 hex digits nobody can guess ahead (from /dev/urandom, with the pid
/// and clock mixed in). The exclusive create is what makes a temporary
/// directory safe; an unguessable name only keeps others from taking the
/// names first.
fn random_name() -> String {
    let mut seed = [0u8; 16];
    let _ = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed);
    hasher.update(unique_suffix().as_bytes());
    hasher.finalize().to_hex()[..16].to_owned()
}

/// This process's effective uid, which must own every control directory.
///
/// Read from the kernel's `/proc/self/status` (its `Uid:` line: real,
/// effective, saved and filesystem uid), which Linux always provides and
/// converge already relies on (`/proc/self/exe`): the crate forbids unsafe
/// code and has no libc binding for `geteuid`. The owner of a file converge
/// just created would tell the same on most filesystems, but not on one
/// that maps owners (NFS root squashing, vfat's `uid=`), and it needs a
/// writable place before anything is checked. New files get the filesystem
/// uid, equal to the effective one unless `setfsuid` was called, which
/// converge never does.
pub(super) fn effective_uid() -> Result<u32, SshError> {
    static UID: OnceLock<u32> = OnceLock::new();
    if let Some(uid) = UID.get() {
        return Ok(*uid);
    }
    let path = Path::new("/proc/self/status");
    let failed = |source| SshError::ControlDir {
        action: "read this process's effective uid from",
        path: path.to_path_buf(),
        source,
    };
    let text = fs::read_to_string(path).map_err(failed)?;
    let uid = parse_effective_uid(&text).ok_or_else(|| {
        failed(io::Error::new(
            io::ErrorKind::InvalidData,
            "no `Uid:` line with the effective uid",
        ))
    })?;
    Ok(*UID.get_or_init(|| uid))
}

/// The effective uid (the second number) of a `/proc/PID/status` text.
fn parse_effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Makes `dir` ready to hold control sockets and client files and returns
/// the path to use from now on: `dir`'s parent resolved once, here (so a
/// symbolic link above it cannot be re-pointed later), `dir`'s own name
/// kept. Missing directories are created with mode 0700, the parents
/// included.
///
/// Refused, with what is wrong and what to do: a `dir` that is a symbolic
/// link or not a directory, that this user does not own, or whose mode is
/// not exactly 0700; and one below a directory that a user other than root
/// and this one owns, or that group or others may write to without the
/// sticky bit (they could replace what is below it).
pub(super) fn prepare_private_dir(dir: &Path) -> Result<PathBuf, SshError> {
    let uid = effective_uid()?;
    let path = make_dir(dir, dir, uid)?;
    // Everything again, now that it all exists: a directory another process
    // created meanwhile was not checked yet.
    if let Some(parent) = path.parent() {
        check_parents(dir, parent, uid)?;
    }
    check_private(dir, &path, uid)?;
    Ok(path)
}

/// `dir` with its parent resolved and checked (created when missing), and
/// `dir` itself created with mode 0700 unless it exists. `control` is the
/// directory errors are about.
fn make_dir(control: &Path, dir: &Path, uid: u32) -> Result<PathBuf, SshError> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(refuse(
            control,
            format!("{} names no directory converge could create", dir.display()),
            "name a directory by a path that ends in its own name".to_owned(),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let parent = match fs::canonicalize(parent) {
        Ok(resolved) => {
            check_parents(control, &resolved, uid)?;
            resolved
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(control, parent, uid)?,
        Err(source) => {
            return Err(SshError::ControlDir {
                action: "resolve the parent of the ssh control directory",
                path: parent.to_path_buf(),
                source,
            });
        }
    };
    let path = parent.join(name);
    match fs::DirBuilder::new().mode(PRIVATE).create(&path) {
        Ok(()) => make_exactly_private(control, &path, uid)?,
        // Made before, or by another process just now: checked as it is.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(SshError::ControlDir {
                action: "create the ssh control directory",
                path,
                source,
            });
        }
    }
    Ok(path)
}

/// Sets mode 0700 on `path`, a directory this process just created (the
/// umask may have taken bits away, a setgid parent may have added one),
/// once it is seen to be a directory of its own: never a link, never
/// another user's.
fn make_exactly_private(control: &Path, path: &Path, uid: u32) -> Result<(), SshError> {
    let meta = lstat(path)?;
    if let Some(problem) = ownership_problem(path, &meta, uid) {
        return Err(refuse(control, problem, remove_it(path)));
    }
    if meta.mode() & 0o7777 != PRIVATE {
        fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE)).map_err(|source| {
            SshError::ControlDir {
                action: "make the ssh control directory private",
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Refuses `path` unless it is a directory (not a link to one) owned by
/// `uid` with permission bits exactly 0700.
fn check_private(control: &Path, path: &Path, uid: u32) -> Result<(), SshError> {
    let meta = lstat(path)?;
    if let Some(problem) = ownership_problem(path, &meta, uid) {
        return Err(refuse(control, problem, remove_it(path)));
    }
    let mode = meta.mode() & 0o777;
    if mode != PRIVATE {
        return Err(refuse(
            control,
            format!(
                "its mode is {mode:04o}, not 0700: other users may look into it or reach what is in it"
            ),
            format!(
                "remove it (`rm -r {0}`), converge creates it with mode 0700; or, if you made it yourself, `chmod 700 {0}`",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// What makes `meta` (of `path`, not followed) not a directory of `uid`'s own.
fn ownership_problem(path: &Path, meta: &fs::Metadata, uid: u32) -> Option<String> {
    if meta.file_type().is_symlink() {
        let to = fs::read_link(path)
            .map(|to| format!(" to {}", to.display()))
            .unwrap_or_default();
        return Some(format!("it is a symbolic link{to}, not a directory"));
    }
    if !meta.is_dir() {
        return Some("it is not a directory".to_owned());
    }
    if meta.uid() != uid {
        return Some(format!(
            "it is owned by uid {}, not by uid {uid} that converge runs as: that user could change the ssh_config ssh runs with or answer in place of a master",
            meta.uid()
        ));
    }
    None
}

/// Refuses the control directory `control` unless `dir` (resolved) and every
/// directory above it is owned by root or `uid`, and writable by group or
/// others only when sticky (as /tmp): otherwise another user could rename
/// the control directory away and put their own in its place.
fn check_parents(control: &Path, dir: &Path, uid: u32) -> Result<(), SshError> {
    for parent in dir.ancestors() {
        let meta = lstat(parent)?;
        let problem = if !meta.is_dir() {
            format!("{} above it is not a directory", parent.display())
        } else if meta.uid() != 0 && meta.uid() != uid {
            format!(
                "{} above it is owned by uid {}, neither root nor uid {uid} that converge runs as: that user could replace it",
                parent.display(),
                meta.uid()
            )
        } else if meta.mode() & 0o022 != 0 && meta.mode() & STICKY == 0 {
            format!(
                "{} above it may be written by group or others (mode {:04o}) and is not sticky: they could replace it",
                parent.display(),
                meta.mode() & 0o7777
            )
        } else {
            continue;
        };
        return Err(refuse(
            control,
            problem,
            format!(
                "use a state directory (or TMPDIR) whose every parent is owned by root or uid {uid} and writable by nobody else, or sticky like /tmp"
            ),
        ));
    }
    Ok(())
}

fn lstat(path: &Path) -> Result<fs::Metadata, SshError> {
    fs::symlink_metadata(path).map_err(|source| SshError::ControlDir {
        action: "inspect",
        path: path.to_path_buf(),
        source,
    })
}

fn refuse(control: &Path, problem: String, fix: String) -> SshError {
    SshError::UnsafeControlDir {
        path: control.to_path_buf(),
        problem,
        fix,
    }
}

fn remove_it(path: &Path) -> String {
    format!(
        "remove it (`rm -r {}`; another user may have put it there), converge creates it itself with mode 0700",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{chown, symlink};

    use super::*;

    /// The uid tests give planted directories: `nobody`, not the test's.
    const OTHER_UID: u32 = 65534;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).expect("lstat").mode() & 0o7777
    }

    fn entries(path: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(path)
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn unsafe_problem(result: Result<PathBuf, SshError>) -> String {
        match result {
            Err(e @ SshError::UnsafeControlDir { .. }) => {
                assert!(!e.is_transient(), "a person must act: {e}");
                e.to_string()
            }
            other => panic!("expected UnsafeControlDir, got {other:?}"),
        }
    }

    #[test]
    fn the_effective_uid_is_the_owner_of_a_file_this_process_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("probe");
        fs::write(&file, b"").expect("write");
        let owner = fs::metadata(&file).expect("stat").uid();
        assert_eq!(effective_uid().expect("effective uid"), owner);
        assert_eq!(
            parse_effective_uid("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n"),
            Some(0),
            "the second number is the effective uid"
        );
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn a_fresh_control_dir_and_its_missing_parents_are_created_0700_and_accepted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state/deeper/ssh");
        let path = prepare_private_dir(&dir).expect("a fresh directory is accepted");
        assert_eq!(
            path,
            fs::canonicalize(tmp.path())
                .expect("canonical")
                .join("state/deeper/ssh")
        );
        for created in ["state", "state/deeper", "state/deeper/ssh"] {
            assert_eq!(mode_of(&tmp.path().join(created)), 0o700, "{created}");
        }
        // Accepted again as it is, the next time.
        assert_eq!(prepare_private_dir(&dir).expect("accepted again"), path);
    }

    #[test]
    fn a_control_dir_owned_by_another_user_is_refused_and_left_as_it_is() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ssh");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .expect("mkdir");
        fs::write(dir.join("planted"), b"ProxyCommand touch /x\n").expect("plant");
        chown(&dir, Some(OTHER_UID), Some(OTHER_UID)).expect("chown (tests run as root)");

        let message = unsafe_problem(prepare_private_dir(&dir));
        assert!(
            message.contains(&format!("owned by uid {OTHER_UID}")),
            "{message}"
        );
        assert!(message.contains(&dir.display().to_string()), "{message}");
        assert!(message.contains("remove it"), "{message}");
        let meta = fs::symlink_metadata(&dir).expect("lstat");
        assert_eq!(meta.uid(), OTHER_UID, "not taken over");
        assert_eq!(meta.mode() & 0o7777, 0o700, "not chmod-ed");
        assert_eq!(entries(&dir), ["planted"]);
    }

    #[test]
    fn a_symlink_in_place_of_the_control_dir_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let elsewhere = tmp.path().join("elsewhere");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&elsewhere)
            .expect("mkdir");
        let dir = tmp.path().join("ssh");
        symlink(&elsewhere, &dir).expect("symlink");

        let message = unsafe_problem(prepare_private_dir(&dir));
        assert!(message.contains("symbolic link"), "{message}");
        assert!(entries(&elsewhere).is_empty());
        assert!(fs::symlink_metadata(&dir).expect("lstat").is_symlink());

        // A dangling link too: nothing is created where it points.
        let dangling = tmp.path().join("ssh2");
        symlink(tmp.path().join("nowhere"), &dangling).expect("symlink");
        let message = unsafe_problem(prepare_private_dir(&dangling));
        assert!(message.contains("symbolic link"), "{message}");
        assert!(!tmp.path().join("nowhere").exists());
    }

    #[test]
    fn a_control_dir_with_mode_0755_is_refused_and_not_chmod_ed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ssh");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");

        let message = unsafe_problem(prepare_private_dir(&dir));
        assert!(message.contains("its mode is 0755, not 0700"), "{message}");
        assert_eq!(mode_of(&dir), 0o755);
    }

    #[test]
    fn a_regular_file_in_place_of_the_control_dir_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ssh");
        fs::write(&dir, b"").expect("write");
        let message = unsafe_problem(prepare_private_dir(&dir));
        assert!(message.contains("not a directory"), "{message}");
    }

    #[test]
    fn a_parent_another_user_owns_or_anyone_may_write_is_refused_but_a_sticky_one_is_not() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let theirs = tmp.path().join("theirs");
        fs::create_dir(&theirs).expect("mkdir");
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o755)).expect("chmod");
        chown(&theirs, Some(OTHER_UID), Some(OTHER_UID)).expect("chown (tests run as root)");
        let message = unsafe_problem(prepare_private_dir(&theirs.join("ssh")));
        assert!(
            message.contains(&format!(
                "{} above it is owned by uid {OTHER_UID}",
                theirs.display()
            )),
            "{message}"
        );
        assert!(!theirs.join("ssh").exists(), "nothing created below it");

        let open = tmp.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let message = unsafe_problem(prepare_private_dir(&open.join("ssh")));
        assert!(
            message.contains("mode 0777) and is not sticky"),
            "{message}"
        );

        let sticky = tmp.path().join("sticky");
        fs::create_dir(&sticky).expect("mkdir");
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).expect("chmod");
        prepare_private_dir(&sticky.join("ssh")).expect("below a sticky directory, like /tmp");
    }

    #[test]
    fn the_control_dir_of_a_state_directory_is_its_ssh_subdirectory_and_stays() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let scratch = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().join("s");
        let dir = ControlDir::for_state_in(&state, scratch.path()).expect("control dir");
        assert!(!dir.is_temporary());
        assert_eq!(
            dir.path(),
            fs::canonicalize(&state).expect("state").join("ssh")
        );
        drop(dir);
        assert_eq!(
            mode_of(&state.join("ssh")),
            0o700,
            "kept for the next process"
        );
        assert!(entries(scratch.path()).is_empty(), "nothing in TMPDIR");
    }

    #[test]
    fn a_state_directory_too_long_for_sockets_gets_a_fresh_temporary_dir_removed_on_drop() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let scratch = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().join("s".repeat(70));
        let first = ControlDir::for_state_in(&state, scratch.path()).expect("control dir");
        let second = ControlDir::for_state_in(&state, scratch.path()).expect("control dir");
        assert!(first.is_temporary());
        assert_ne!(first.path(), second.path(), "never reused");
        assert_eq!(
            first.path().parent(),
            Some(
                fs::canonicalize(scratch.path())
                    .expect("canonical")
                    .as_path()
            )
        );
        let name = first.path().file_name().expect("name").to_string_lossy();
        assert!(name.starts_with("cvssh-") && name.len() == 22, "{name}");
        assert_eq!(mode_of(first.path()), 0o700);
        assert!(
            !state.join("ssh").exists(),
            "nothing made in the state directory"
        );
        fs::write(first.path().join("cfg-x"), b"").expect("a client file");
        drop(first);
        drop(second);
        assert!(entries(scratch.path()).is_empty(), "removed when dropped");
    }

    #[test]
    fn a_temporary_control_dir_is_never_made_in_an_unsafe_tmpdir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let theirs = tmp.path().join("theirs");
        fs::create_dir(&theirs).expect("mkdir");
        chown(&theirs, Some(OTHER_UID), Some(OTHER_UID)).expect("chown (tests run as root)");
        let state = tmp.path().join("s".repeat(70));
        let error = ControlDir::for_state_in(&state, &theirs).expect_err("refused");
        assert!(
            matches!(error, SshError::UnsafeControlDir { .. }),
            "{error}"
        );
        assert!(entries(&theirs).is_empty());
    }
}
