//! The `command` builder: runs a machine's build command on the controller
//! host and turns its output directory into a content-addressed artifact in a
//! local cache, so one input is never built twice. It owns the cache layout
//! (`<cache_dir>/<key>/` plus the `<key>.done` marker written last) and the
//! tree hash that names artifacts. It must not decide when to build (the
//! controller does), must not touch a target, and must never expose a
//! half-built tree as an artifact.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::command::{argv_summary, exit_text, io_is_transient, trim_front, unique_suffix};
use super::local::run_process;
use super::nix::{NixError, NixRequest};
use super::target::{OUTPUT_LIMIT, TargetError};

/// Runs the build command with stderr merged into stdout, in order. The
/// command is `"$@"`: no argument is ever re-parsed by the shell.
const MERGE_STDERR_SCRIPT: &str = "# converge: build (stderr merged into stdout)\nexec \"$@\" 2>&1";

/// Builds artifacts by running a user command, caching them under `cache_dir`.
///
/// Cache layout: `<key>/` is an artifact tree that appeared by one rename, so
/// it is complete whenever it exists; `<key>.done` holds its tree hash and is
/// written after it. `<key>.tmp-*` are builds in progress (or left by a crash:
/// safe to delete when no build runs).
#[derive(Debug, Clone)]
pub struct CommandBuilder {
    cache_dir: PathBuf,
}

/// One build: what to run, where, and for which machine.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The desired-state directory; the command's working directory.
    pub workdir: PathBuf,
    /// The build command, e.g. `["./build.sh"]`; resolved against `PATH` and
    /// relative to `workdir`.
    pub argv: Vec<String>,
    /// Exposed to the command as `CONVERGE_MACHINE`.
    pub machine: String,
    /// The roles document; written to a file whose path is `CONVERGE_ROLES`.
    pub roles_json: Vec<u8>,
    /// Names the artifact in the cache. The caller derives it (with
    /// [`cache_key`]) from everything that affects the output: build section,
    /// machine, roles hash, revision. Characters: `[A-Za-z0-9_-]`, at most 128.
    pub cache_key: String,
    /// Kills the command's process group when it runs longer.
    pub timeout: Duration,
    /// Build this NixOS system with Nix instead of running `argv`.
    pub nix: Option<NixRequest>,
}

/// A complete build output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The artifact tree; has an executable `activate` at its top.
    pub path: PathBuf,
    /// Lowercase hex blake3 [`tree_hash`] of `path`.
    pub hash: String,
    /// The command's stdout and stderr interleaved, last [`OUTPUT_LIMIT`]
    /// bytes; empty when `cached`.
    pub output: String,
    /// True when the cache already held the artifact and nothing ran.
    pub cached: bool,
}

/// Why a build produced no artifact.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("build: cache key {key:?} is not 1-128 characters of [A-Za-z0-9_-]")]
    InvalidCacheKey { key: String },
    #[error("build: the build command is empty")]
    EmptyCommand,
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("run build command `{}`", argv_summary(.argv))]
    Run {
        argv: Vec<String>,
        #[source]
        source: TargetError,
    },
    #[error("build with `{}`: {}", argv_summary(.argv), exit_text(*.code))]
    Failed {
        argv: Vec<String>,
        code: Option<i32>,
        /// The combined log, bounded like [`Artifact::output`].
        output: String,
    },
    #[error("build with `{}` within {after:?}", argv_summary(.argv))]
    Timeout {
        argv: Vec<String>,
        after: Duration,
        /// What the command printed before it was killed.
        output: String,
    },
    #[error("find an executable `activate` at {path}")]
    NoActivate { path: PathBuf },
    #[error("build the NixOS system {installable}")]
    Nix {
        installable: String,
        #[source]
        source: NixError,
    },
}

impl BuildError {
    /// True when running the same build again may succeed.
    ///
    /// A failed or timed-out command counts as transient: build commands
    /// fetch from networks, and the controller's backoff bounds the cost of
    /// retrying a deterministic failure. A bad cache key, an empty command and
    /// an output without `activate` are terminal until the spec changes.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::InvalidCacheKey { .. } | Self::EmptyCommand | Self::NoActivate { .. } => false,
            Self::Io { source, .. } => io_is_transient(source),
            Self::Run { source, .. } => source.is_transient(),
            Self::Failed { .. } | Self::Timeout { .. } => true,
            Self::Nix { source, .. } => source.is_transient(),
        }
    }

    /// The build log, for the variants that have one.
    pub fn output(&self) -> Option<&str> {
        match self {
            Self::Failed { output, .. } | Self::Timeout { output, .. } => Some(output),
            Self::Nix { source, .. } => source.output(),
            _ => None,
        }
    }
}

fn io_at(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildError {
    move |source| BuildError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A cache key from parts: blake3 over each part's length (u64, little
/// endian) followed by its bytes, so `["ab", "c"]` and `["a", "bc"]` differ.
/// Returns 64 lowercase hex characters.
pub fn cache_key(parts: &[&[u8]]) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        put(&mut hasher, part);
    }
    hasher.finalize().to_hex().to_string()
}

fn put(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// The content hash of a directory tree, as 64 lowercase hex characters.
///
/// Covers, for every entry below `root` in byte order of relative path: the
/// path, the entry type (directory, regular file, symlink), for files the
/// executable bit (any of `0o111`) and the contents, for symlinks the link
/// text. Ignores other permission bits, owners and times, so equal trees hash
/// equal on any host. Other file types are an error. Blocking: call it from
/// `spawn_blocking`.
pub fn tree_hash(root: &Path) -> io::Result<String> {
    let mut entries = Vec::new();
    collect_entries(root, Path::new(""), &mut entries)?;
    entries.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"converge-tree-v1\0");
    for relative in entries {
        let path = root.join(&relative);
        put(&mut hasher, relative.as_os_str().as_bytes());
        let meta = fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            hasher.update(b"d");
        } else if kind.is_symlink() {
            hasher.update(b"l");
            put(&mut hasher, fs::read_link(&path)?.as_os_str().as_bytes());
        } else if kind.is_file() {
            let executable = meta.permissions().mode() & 0o111 != 0;
            hasher.update(if executable { b"x" } else { b"f" });
            let mut contents = blake3::Hasher::new();
            contents.update_reader(fs::File::open(&path)?)?;
            hasher.update(contents.finalize().as_bytes());
        } else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} is not a regular file, directory or symlink",
                    path.display()
                ),
            ));
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

fn collect_entries(root: &Path, relative: &Path, into: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(root.join(relative))? {
        let entry = entry?;
        let child = relative.join(entry.file_name());
        let is_dir = entry.file_type()?.is_dir();
        into.push(child.clone());
        if is_dir {
            collect_entries(root, &child, into)?;
        }
    }
    Ok(())
}

async fn hash_tree(path: &Path) -> Result<String, BuildError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || tree_hash(&owned))
        .await
        .map_err(io::Error::other)
        .and_then(|hashed| hashed)
        .map_err(io_at("hash", path))
}

fn is_valid_cache_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_valid_hash(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

impl CommandBuilder {
    /// A builder caching under `cache_dir` (created on first build).
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
        }
    }

    /// The cached artifact tree whose tree hash is `hash`, if the cache still
    /// holds one (a scan of the `.done` markers: a few hundred small files).
    pub fn find(&self, hash: &str) -> Option<PathBuf> {
        let entries = fs::read_dir(&self.cache_dir).ok()?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".done")) else {
                continue;
            };
            let marked = fs::read_to_string(entry.path()).unwrap_or_default();
            if marked.trim() == hash {
                let dir = self.cache_dir.join(key);
                if dir.is_dir() {
                    return Some(dir);
                }
            }
        }
        None
    }

    /// Prunes the cache: an artifact whose tree hash is not in `used` (the
    /// generations targets keep, what machines last applied) goes, then, while
    /// the cache is larger than `max_bytes`, used ones too, least recently
    /// used first; an artifact used (built or found) within `recent` always
    /// stays, and so does every tree of a build in progress. Trees of builds
    /// cut short go once older than `recent`. Never fails halfway silently:
    /// what could not be removed is counted as kept.
    pub fn prune(
        &self,
        used: &HashSet<String>,
        max_bytes: u64,
        recent: Duration,
    ) -> Result<CachePruned, BuildError> {
        self.prune_io(used, max_bytes, recent)
            .map_err(io_at("prune the build cache", &self.cache_dir))
    }

    fn prune_io(
        &self,
        used: &HashSet<String>,
        max_bytes: u64,
        recent: Duration,
    ) -> io::Result<CachePruned> {
        let now = SystemTime::now();
        let age = |path: &Path| {
            fs::symlink_metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or(Duration::ZERO)
        };
        let mut entries = Vec::new();
        let mut pruned = CachePruned::default();
        let listing = match fs::read_dir(&self.cache_dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(pruned),
            Err(e) => return Err(e),
        };
        for entry in listing {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.contains(".tmp-") {
                if age(&path) > recent {
                    let bytes = tree_bytes(&path);
                    if remove_any(&path).is_ok() {
                        pruned.removed += 1;
                        pruned.freed_bytes += bytes;
                    }
                }
                continue;
            }
            let Some(key) = name.strip_suffix(".done") else {
                continue;
            };
            let hash = fs::read_to_string(&path).unwrap_or_default();
            let dir = self.cache_dir.join(key);
            entries.push(CacheEntry {
                used: used.contains(hash.trim()),
                idle: age(&path),
                bytes: tree_bytes(&dir),
                marker: path,
                dir,
            });
        }
        // Unused first, then least recently used first.
        entries.sort_by(|a, b| a.used.cmp(&b.used).then(b.idle.cmp(&a.idle)));
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        for entry in entries {
            let goes = entry.idle > recent && (!entry.used || total > max_bytes);
            // The marker first: a tree without one is never taken for an artifact.
            if goes && fs::remove_file(&entry.marker).is_ok() && remove_any(&entry.dir).is_ok() {
                pruned.removed += 1;
                pruned.freed_bytes += entry.bytes;
                total -= entry.bytes;
            } else {
                pruned.kept += 1;
                pruned.kept_bytes += entry.bytes;
            }
        }
        Ok(pruned)
    }

    /// Returns the artifact for `req.cache_key`, running the command only when
    /// the cache lacks it.
    ///
    /// The command runs with cwd `req.workdir` and env `CONVERGE_MACHINE`,
    /// `CONVERGE_ROLES` (path of the roles file) and `CONVERGE_OUT` (an empty
    /// directory it must fill; absolute paths). A non-zero exit is
    /// [`BuildError::Failed`]; an output without an executable `activate` at
    /// its top is [`BuildError::NoActivate`]. Two builds of one key at once
    /// both run, and the one that renames second discards its tree and
    /// returns the first one's.
    pub async fn build(&self, req: &BuildRequest) -> Result<Artifact, BuildError> {
        if !is_valid_cache_key(&req.cache_key) {
            return Err(BuildError::InvalidCacheKey {
                key: req.cache_key.clone(),
            });
        }
        if req.argv.is_empty() && req.nix.is_none() {
            return Err(BuildError::EmptyCommand);
        }

        tokio::fs::create_dir_all(&self.cache_dir)
            .await
            .map_err(io_at("create", &self.cache_dir))?;
        let cache_dir = tokio::fs::canonicalize(&self.cache_dir)
            .await
            .map_err(io_at("resolve", &self.cache_dir))?;
        let final_dir = cache_dir.join(&req.cache_key);
        let marker = cache_dir.join(format!("{}.done", req.cache_key));
        if let Some(hash) = complete_hash(&cache_dir, &final_dir, &marker).await? {
            touch(&marker);
            return Ok(Artifact {
                path: final_dir,
                hash,
                output: String::new(),
                cached: true,
            });
        }

        let work = cache_dir.join(format!("{}.tmp-{}", req.cache_key, unique_suffix()));
        let built = self
            .build_in(req, &cache_dir, &work, &final_dir, &marker)
            .await;
        // The tree was renamed away on success; what is left is scratch.
        if let Err(error) = tokio::fs::remove_dir_all(&work).await {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %work.display(), %error, "could not remove a build's scratch directory");
            }
        }
        built
    }

    async fn build_in(
        &self,
        req: &BuildRequest,
        cache_dir: &Path,
        work: &Path,
        final_dir: &Path,
        marker: &Path,
    ) -> Result<Artifact, BuildError> {
        let roles = work.join("roles.json");
        let out = work.join("out");
        tokio::fs::create_dir(work)
            .await
            .map_err(io_at("create", work))?;
        tokio::fs::write(&roles, &req.roles_json)
            .await
            .map_err(io_at("write", &roles))?;
        tokio::fs::create_dir(&out)
            .await
            .map_err(io_at("create", &out))?;

        if let Some(nix) = &req.nix {
            let installable = format!("{}#{}", nix.flake, nix.attribute);
            let nix_error = |source| BuildError::Nix {
                installable: installable.clone(),
                source,
            };
            let toplevel = super::nix::build_toplevel(nix, req.timeout)
                .await
                .map_err(nix_error)?;
            super::nix::write_artifact(&out, &toplevel)
                .await
                .map_err(io_at("write the artifact of", &out))?;
            return self
                .finish(cache_dir, &out, final_dir, marker, toplevel)
                .await;
        }
        let mut argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            MERGE_STDERR_SCRIPT.to_owned(),
            "converge-build".to_owned(),
        ];
        argv.extend(req.argv.iter().cloned());
        let env = [
            ("CONVERGE_MACHINE".to_owned(), req.machine.clone()),
            (
                "CONVERGE_ROLES".to_owned(),
                roles.to_string_lossy().into_owned(),
            ),
            (
                "CONVERGE_OUT".to_owned(),
                out.to_string_lossy().into_owned(),
            ),
        ];
        let finished = run_process(
            "local",
            &argv,
            &env,
            &crate::driver::target::NO_INPUT,
            Some(&req.workdir),
            req.timeout,
        )
        .await
        .map_err(|source| BuildError::Run {
            argv: req.argv.clone(),
            source,
        })?;
        // stderr only carries the wrapper shell's own complaints ("not found").
        let mut log = finished.output.stdout.into_bytes();
        log.extend_from_slice(finished.output.stderr.as_bytes());
        trim_front(&mut log, OUTPUT_LIMIT);
        let output = String::from_utf8_lossy(&log).into_owned();
        if finished.timed_out {
            return Err(BuildError::Timeout {
                argv: req.argv.clone(),
                after: req.timeout,
                output,
            });
        }
        if finished.output.code != Some(0) {
            return Err(BuildError::Failed {
                argv: req.argv.clone(),
                code: finished.output.code,
                output,
            });
        }

        let activate = out.join("activate");
        let executable = tokio::fs::metadata(&activate)
            .await
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0);
        if !executable {
            return Err(BuildError::NoActivate { path: activate });
        }
        self.finish(cache_dir, &out, final_dir, marker, output)
            .await
    }

    /// Names the tree `out` by its hash and renames it into place.
    async fn finish(
        &self,
        cache_dir: &Path,
        out: &Path,
        final_dir: &Path,
        marker: &Path,
        output: String,
    ) -> Result<Artifact, BuildError> {
        let hash = hash_tree(out).await?;

        match tokio::fs::rename(out, final_dir).await {
            Ok(()) => {
                write_marker(cache_dir, marker, &hash).await?;
                Ok(Artifact {
                    path: final_dir.to_path_buf(),
                    hash,
                    output,
                    cached: false,
                })
            }
            Err(error) => match complete_hash(cache_dir, final_dir, marker).await? {
                // Another build of this key renamed first: its tree is the artifact.
                Some(winner) => Ok(Artifact {
                    path: final_dir.to_path_buf(),
                    hash: winner,
                    output,
                    cached: false,
                }),
                None => Err(BuildError::Io {
                    action: "rename into place",
                    path: final_dir.to_path_buf(),
                    source: error,
                }),
            },
        }
    }
}

/// What pruning the build cache did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachePruned {
    /// Artifacts and leftover build trees removed, and their bytes.
    pub removed: usize,
    pub freed_bytes: u64,
    /// Artifacts kept, and their bytes.
    pub kept: usize,
    pub kept_bytes: u64,
}

struct CacheEntry {
    used: bool,
    /// Since the artifact was last built or found.
    idle: Duration,
    bytes: u64,
    marker: PathBuf,
    dir: PathBuf,
}

/// Bytes of the regular files under `path` (symlinks not followed).
fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| tree_bytes(&entry.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Marks a cached artifact used now (its marker's mtime), for pruning.
fn touch(marker: &Path) {
    if let Ok(file) = fs::File::options().write(true).open(marker) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// The hash of the cached tree `final_dir` if it is there, repairing the
/// marker when a crash (or a concurrent build) left the tree without one,
/// and dropping a marker whose tree is gone.
async fn complete_hash(
    cache_dir: &Path,
    final_dir: &Path,
    marker: &Path,
) -> Result<Option<String>, BuildError> {
    let tree_exists = tokio::fs::metadata(final_dir)
        .await
        .is_ok_and(|meta| meta.is_dir());
    match tokio::fs::read_to_string(marker).await {
        Ok(text) if tree_exists && is_valid_hash(text.trim()) => {
            return Ok(Some(text.trim().to_owned()));
        }
        Ok(_) => {
            tokio::fs::remove_file(marker)
                .await
                .map_err(io_at("remove a stale marker", marker))?;
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_at("read", marker)(error)),
    }
    if !tree_exists {
        return Ok(None);
    }
    // Trees only appear by rename of a finished build, so this one is whole.
    let hash = hash_tree(final_dir).await?;
    write_marker(cache_dir, marker, &hash).await?;
    Ok(Some(hash))
}

async fn write_marker(cache_dir: &Path, marker: &Path, hash: &str) -> Result<(), BuildError> {
    let temporary = cache_dir.join(format!(".marker.tmp-{}", unique_suffix()));
    tokio::fs::write(&temporary, format!("{hash}\n"))
        .await
        .map_err(io_at("write", &temporary))?;
    tokio::fs::rename(&temporary, marker)
        .await
        .map_err(io_at("rename into place", marker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    struct Fixture {
        _dir: tempfile::TempDir,
        workdir: PathBuf,
        builder: CommandBuilder,
        cache: PathBuf,
    }

    fn fixture(build_sh: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let workdir = dir.path().join("desired");
        fs::create_dir(&workdir).expect("mkdir");
        let script = workdir.join("build.sh");
        fs::write(&script, format!("#!/bin/sh\n{build_sh}")).expect("write build.sh");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
        let cache = dir.path().join("cache");
        Fixture {
            builder: CommandBuilder::new(&cache),
            cache,
            workdir,
            _dir: dir,
        }
    }

    fn request(f: &Fixture, key: &str) -> BuildRequest {
        BuildRequest {
            workdir: f.workdir.clone(),
            argv: vec!["./build.sh".to_owned()],
            machine: "web1".to_owned(),
            roles_json: br#"{"wireguard":{"peer":{"port":51820}}}"#.to_vec(),
            cache_key: key.to_owned(),
            timeout: Duration::from_secs(30),
            nix: None,
        }
    }

    const MINIMAL: &str = "printf '#!/bin/sh\\necho activated\\n' > \"$CONVERGE_OUT/activate\"\n\
                           chmod +x \"$CONVERGE_OUT/activate\"\n\
                           echo built >> counter\n";

    fn count(f: &Fixture) -> usize {
        fs::read_to_string(f.workdir.join("counter"))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    fn cache_entries(f: &Fixture) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&f.cache)
            .expect("list cache")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn build_gives_the_command_machine_roles_and_an_empty_out_dir() {
        let f = fixture(
            "set -e\n\
             n=$(ls -A \"$CONVERGE_OUT\" | wc -l | tr -d ' ')\n\
             echo \"$n\" > \"$CONVERGE_OUT/entries-at-start\"\n\
             echo \"$CONVERGE_MACHINE\" > \"$CONVERGE_OUT/machine\"\n\
             cp \"$CONVERGE_ROLES\" \"$CONVERGE_OUT/roles-copy\"\n\
             pwd > \"$CONVERGE_OUT/cwd\"\n\
             echo to-stdout; echo to-stderr >&2\n\
             printf '#!/bin/sh\\n' > \"$CONVERGE_OUT/activate\"; chmod +x \"$CONVERGE_OUT/activate\"\n",
        );
        let artifact = f.builder.build(&request(&f, "k1")).await.expect("build");
        let read = |name: &str| fs::read_to_string(artifact.path.join(name)).expect("read");
        assert_eq!(read("machine"), "web1\n");
        assert_eq!(read("entries-at-start"), "0\n");
        assert_eq!(
            read("roles-copy").as_bytes(),
            br#"{"wireguard":{"peer":{"port":51820}}}"#
        );
        assert_eq!(
            PathBuf::from(read("cwd").trim()),
            fs::canonicalize(&f.workdir).expect("canonicalize")
        );
        assert_eq!(artifact.output, "to-stdout\nto-stderr\n");
        assert!(!artifact.cached);
        assert_eq!(
            artifact.path,
            fs::canonicalize(&f.cache).expect("cache").join("k1")
        );
        assert_eq!(artifact.hash, tree_hash(&artifact.path).expect("hash"));
        assert_eq!(cache_entries(&f), ["k1", "k1.done"]);
        assert_eq!(
            fs::read_to_string(f.cache.join("k1.done"))
                .expect("marker")
                .trim(),
            artifact.hash
        );
    }

    #[tokio::test]
    async fn a_cache_hit_does_not_run_the_command_again() {
        let f = fixture(MINIMAL);
        let first = f.builder.build(&request(&f, "k1")).await.expect("build");
        let second = f.builder.build(&request(&f, "k1")).await.expect("build");
        assert_eq!(count(&f), 1);
        assert!(!first.cached);
        assert!(second.cached);
        assert_eq!(first.hash, second.hash);
        assert_eq!(first.path, second.path);
        let other = f.builder.build(&request(&f, "k2")).await.expect("build");
        assert_eq!(count(&f), 2);
        assert_eq!(other.hash, first.hash, "same content, same hash");
    }

    #[tokio::test]
    async fn a_tree_left_without_its_marker_is_reused_and_marked() {
        let f = fixture(MINIMAL);
        let first = f.builder.build(&request(&f, "k1")).await.expect("build");
        fs::remove_file(f.cache.join("k1.done")).expect("remove marker");
        let again = f.builder.build(&request(&f, "k1")).await.expect("build");
        assert!(again.cached);
        assert_eq!(again.hash, first.hash);
        assert_eq!(count(&f), 1);
        assert!(f.cache.join("k1.done").exists());
    }

    #[tokio::test]
    async fn a_marker_without_its_tree_is_rebuilt() {
        let f = fixture(MINIMAL);
        f.builder.build(&request(&f, "k1")).await.expect("build");
        fs::remove_dir_all(f.cache.join("k1")).expect("remove tree");
        let again = f.builder.build(&request(&f, "k1")).await.expect("build");
        assert!(!again.cached);
        assert_eq!(count(&f), 2);
    }

    #[tokio::test]
    async fn tree_hash_is_deterministic_and_sees_content_and_exec_bit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let make = |name: &str| {
            let root = dir.path().join(name);
            fs::create_dir_all(root.join("sub")).expect("mkdir");
            fs::write(root.join("activate"), "#!/bin/sh\n").expect("write");
            fs::set_permissions(root.join("activate"), fs::Permissions::from_mode(0o755))
                .expect("chmod");
            fs::write(root.join("sub/file"), "one").expect("write");
            std::os::unix::fs::symlink("sub/file", root.join("link")).expect("symlink");
            root
        };
        let a = make("a");
        let b = make("b");
        let hash_a = tree_hash(&a).expect("hash");
        assert_eq!(hash_a, tree_hash(&b).expect("hash"));
        assert_eq!(hash_a.len(), 64);

        fs::write(b.join("sub/file"), "two").expect("write");
        let changed_content = tree_hash(&b).expect("hash");
        assert_ne!(hash_a, changed_content);

        fs::write(b.join("sub/file"), "one").expect("write");
        assert_eq!(hash_a, tree_hash(&b).expect("hash"));
        fs::set_permissions(b.join("sub/file"), fs::Permissions::from_mode(0o744)).expect("chmod");
        assert_ne!(hash_a, tree_hash(&b).expect("hash"), "exec bit must count");

        fs::set_permissions(b.join("sub/file"), fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            hash_a,
            tree_hash(&b).expect("hash"),
            "other mode bits do not"
        );

        fs::remove_file(b.join("link")).expect("rm");
        std::os::unix::fs::symlink("sub", b.join("link")).expect("symlink");
        assert_ne!(hash_a, tree_hash(&b).expect("hash"), "link text must count");
    }

    #[tokio::test]
    async fn a_failed_build_returns_its_output_and_caches_nothing() {
        let f = fixture("echo compiling; echo 'error: bad' >&2; exit 3\n");
        let error = f
            .builder
            .build(&request(&f, "k1"))
            .await
            .expect_err("must fail");
        match &error {
            BuildError::Failed { code, output, .. } => {
                assert_eq!(*code, Some(3));
                assert_eq!(output, "compiling\nerror: bad\n");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(error.to_string(), "build with `./build.sh`: exit code 3");
        assert!(cache_entries(&f).is_empty(), "{:?}", cache_entries(&f));
    }

    #[tokio::test]
    async fn a_missing_build_command_fails_with_the_shells_message() {
        let f = fixture(MINIMAL);
        let mut req = request(&f, "k1");
        req.argv = vec!["./no-such-build.sh".to_owned()];
        let error = f.builder.build(&req).await.expect_err("must fail");
        let output = error.output().expect("has output");
        assert!(output.contains("no-such-build.sh"), "{output}");
    }

    #[tokio::test]
    async fn an_output_without_executable_activate_is_a_terminal_error() {
        let f = fixture("echo hi > \"$CONVERGE_OUT/readme\"\n");
        let error = f
            .builder
            .build(&request(&f, "k1"))
            .await
            .expect_err("must fail");
        assert!(matches!(error, BuildError::NoActivate { .. }), "{error:?}");
        assert!(!error.is_transient());

        let f = fixture("echo hi > \"$CONVERGE_OUT/activate\"\n");
        let error = f
            .builder
            .build(&request(&f, "k1"))
            .await
            .expect_err("must fail");
        assert!(matches!(error, BuildError::NoActivate { .. }), "{error:?}");
        assert!(cache_entries(&f).is_empty());
    }

    #[tokio::test]
    async fn a_build_timeout_kills_the_process_group_and_keeps_the_log() {
        let f = fixture("echo started\nsleep 300 &\necho $! > sleeper.pid\nwait\n");
        let mut req = request(&f, "k1");
        req.timeout = Duration::from_millis(500);
        let started = Instant::now();
        let error = f.builder.build(&req).await.expect_err("must time out");
        assert!(started.elapsed() < Duration::from_secs(5));
        match &error {
            BuildError::Timeout { output, .. } => assert_eq!(output, "started\n"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(error.is_transient());
        let pid = fs::read_to_string(f.workdir.join("sleeper.pid")).expect("pid");
        let alive = || {
            std::process::Command::new("kill")
                .args(["-0", pid.trim()])
                .stderr(std::process::Stdio::null())
                .status()
                .expect("kill -0")
                .success()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "the build's sleep survived");
        assert!(cache_entries(&f).is_empty());
    }

    #[tokio::test]
    async fn two_builds_of_one_key_at_once_both_succeed_with_one_tree() {
        let f = fixture(&format!("sleep 0.2\n{MINIMAL}"));
        let req = request(&f, "k1");
        let (a, b) = tokio::join!(f.builder.build(&req), f.builder.build(&req));
        let (a, b) = (a.expect("first"), b.expect("second"));
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.path, b.path);
        assert_eq!(count(&f), 2, "both ran: neither saw a complete cache");
        assert_eq!(cache_entries(&f), ["k1", "k1.done"]);
        assert_eq!(tree_hash(&a.path).expect("hash"), a.hash);
    }

    #[tokio::test]
    async fn invalid_cache_keys_are_refused_before_running() {
        let f = fixture(MINIMAL);
        for key in ["", "../escape", "a.done", "has space"] {
            let error = f
                .builder
                .build(&request(&f, key))
                .await
                .expect_err("must refuse");
            assert!(matches!(error, BuildError::InvalidCacheKey { .. }));
        }
        assert_eq!(count(&f), 0);
    }

    #[test]
    fn build_futures_are_send() {
        fn assert_send<F: std::future::Future + Send>(_: F) {}
        let f = fixture(MINIMAL);
        let req = request(&f, "k1");
        assert_send(f.builder.build(&req));
    }

    #[test]
    fn cache_key_separates_parts() {
        assert_ne!(cache_key(&[b"ab", b"c"]), cache_key(&[b"a", b"bc"]));
        assert_eq!(cache_key(&[b"ab", b"c"]), cache_key(&[b"ab", b"c"]));
        assert!(is_valid_cache_key(&cache_key(&[b"x"])));
    }

    /// Sets when the artifact under `key` was last used.
    fn used_ago(f: &Fixture, key: &str, ago: Duration) {
        let marker = f.cache.join(format!("{key}.done"));
        let file = fs::File::options()
            .write(true)
            .open(&marker)
            .expect("open marker");
        file.set_modified(SystemTime::now() - ago)
            .expect("set mtime");
    }

    #[tokio::test]
    async fn pruning_keeps_what_is_used_or_recent_and_bounds_the_rest() {
        // Each build writes a different file, so each artifact differs.
        let f = fixture(
            "printf '#!/bin/sh\\n' > \"$CONVERGE_OUT/activate\"\n\
             chmod +x \"$CONVERGE_OUT/activate\"\n\
             head -c 1000 /dev/zero > \"$CONVERGE_OUT/data-$(date +%N)\"\n",
        );
        let hour = Duration::from_secs(3600);
        let mut hashes = Vec::new();
        for key in ["a", "b", "c", "d"] {
            hashes.push(
                f.builder
                    .build(&request(&f, key))
                    .await
                    .expect("build")
                    .hash,
            );
        }
        used_ago(&f, "a", 4 * hour);
        used_ago(&f, "b", 3 * hour);
        used_ago(&f, "c", 2 * hour);
        // d was just built: recent. A build cut short two hours ago left a tree.
        let leftover = f.cache.join("e.tmp-1-2");
        fs::create_dir(&leftover).expect("mkdir");
        let old = fs::File::open(&leftover).expect("open");
        old.set_modified(SystemTime::now() - 2 * hour)
            .expect("mtime");

        // a and b are used by kept generations; c is not; under the bound.
        let used: HashSet<String> = hashes[..2].iter().cloned().collect();
        let pruned = f.builder.prune(&used, u64::MAX, hour).expect("prune");
        assert_eq!(pruned.removed, 2, "{pruned:?}: c and the leftover tree");
        assert_eq!(pruned.kept, 3, "{pruned:?}");
        assert_eq!(
            cache_entries(&f),
            ["a", "a.done", "b", "b.done", "d", "d.done"],
        );
        assert!(f.builder.find(&hashes[2]).is_none());

        // Past the bound, used artifacts go too, least recently used first,
        // until it fits; the recent one never does.
        let one = tree_bytes(&f.cache.join("a"));
        let pruned = f.builder.prune(&used, 2 * one, hour).expect("prune");
        assert_eq!(pruned.removed, 1, "{pruned:?}");
        assert_eq!(cache_entries(&f), ["b", "b.done", "d", "d.done"]);
        let pruned = f.builder.prune(&used, 0, hour).expect("prune");
        assert_eq!(cache_entries(&f), ["d", "d.done"], "{pruned:?}");
        // What is left is still a working cache entry.
        let again = f.builder.build(&request(&f, "d")).await.expect("cached");
        assert!(again.cached);
        assert_eq!(again.hash, hashes[3]);
    }
}
