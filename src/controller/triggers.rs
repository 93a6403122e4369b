//! Triggers that come from outside the loop: the desired-state directory's
//! file changes, debounced.
//!
//! notify's debouncer collapses a burst of events (an editor's save, a
//! `git pull`) into one batch after a quiet window; the batch is forwarded
//! as the set of changed paths. Hidden files, editor backups and temporary
//! files are ignored by the rule loading uses, applied to the part of each
//! path below the watched directory (which may itself lie under a hidden
//! one, like `~/.config/gitops`). What a change means (which objects' specs
//! changed) is decided by the daemon after reloading.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use crate::source::is_ignored_name;

/// Why the directory could not be watched.
#[derive(Debug, thiserror::Error)]
#[error("watch {path} for changes")]
pub struct WatchError {
    path: PathBuf,
    #[source]
    source: notify::Error,
}

/// Keeps the watch alive; dropping it stops watching.
pub struct DirWatch {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirWatch")
    }
}

/// The watched directory, as given and as its canonical path: the watcher
/// may report changed paths under either.
#[derive(Debug, Clone)]
struct Watched {
    root: PathBuf,
    canonical: Option<PathBuf>,
}

impl Watched {
    fn new(root: &Path) -> Watched {
        Watched {
            root: root.to_path_buf(),
            canonical: std::fs::canonicalize(root).ok(),
        }
    }

    /// Whether a change of `path` can matter to loading: no part of it
    /// below the watched directory is a name loading ignores (hidden
    /// entries, editor backups, temporary files). Only the part below the
    /// directory counts, so a directory under a hidden one
    /// (`~/.config/gitops`) is watched like any other. A path not below it
    /// counts as relevant: a needless reload is cheap, a missed one is not.
    fn relevant(&self, path: &Path) -> bool {
        let below = path.strip_prefix(&self.root).ok().or_else(|| {
            self.canonical
                .as_deref()
                .and_then(|canonical| path.strip_prefix(canonical).ok())
        });
        let Some(below) = below else {
            return true;
        };
        !below.components().any(|c| match c {
            Component::Normal(name) => is_ignored_name(&name.to_string_lossy()),
            _ => false,
        })
    }
}

/// Watches `root` recursively; sends each debounced batch of relevant changed paths.
pub fn watch_dir(
    root: &Path,
    debounce: Duration,
    tx: mpsc::UnboundedSender<BTreeSet<PathBuf>>,
) -> Result<DirWatch, WatchError> {
    let watched = Watched::new(root);
    let handler = move |result: DebounceEventResult| match result {
        Ok(events) => {
            // Reading the files (our own reload) produces access events;
            // reacting to them would reload forever.
            let paths: BTreeSet<PathBuf> = events
                .into_iter()
                .filter(|e| !matches!(e.event.kind, notify::EventKind::Access(_)))
                .flat_map(|e| e.event.paths)
                .filter(|p| watched.relevant(p))
                .collect();
            if !paths.is_empty() {
                let _ = tx.send(paths);
            }
        }
        Err(errors) => {
            for e in errors {
                tracing::warn!(error = %e, "file watch error");
            }
        }
    };
    // notify checks for quiet windows every tick; its default (a quarter of
    // the window) adds up to 25% of the window to every reload's delay.
    let tick = (debounce / 10)
        .max(std::time::Duration::from_millis(5))
        .min(debounce);
    let mut debouncer =
        new_debouncer(debounce, Some(tick), handler).map_err(|source| WatchError {
            path: root.to_path_buf(),
            source,
        })?;
    debouncer
        .watch(root, RecursiveMode::Recursive)
        .map_err(|source| WatchError {
            path: root.to_path_buf(),
            source,
        })?;
    Ok(DirWatch {
        _debouncer: debouncer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_and_temporary_paths_are_not_relevant() {
        let watched = Watched::new(Path::new("/repo"));
        assert!(watched.relevant(Path::new("/repo/machines/web.yaml")));
        assert!(watched.relevant(Path::new("/repo/build.sh")));
        assert!(!watched.relevant(Path::new("/repo/.git/index")));
        assert!(!watched.relevant(Path::new("/repo/web.yaml~")));
        assert!(!watched.relevant(Path::new("/repo/.web.yaml.swp")));
        assert!(!watched.relevant(Path::new("/repo/machines/web.yaml.bak")));
    }

    #[test]
    fn only_the_part_below_the_watched_directory_decides() {
        for root in [
            "/home/u/.config/gitops",
            "/home/u/.config/gitops/",
            "./.state/d",
        ] {
            let watched = Watched::new(Path::new(root));
            let root = Path::new(root);
            assert!(watched.relevant(&root.join("web.yaml")), "{root:?}");
            assert!(watched.relevant(&root.join("vms/builder.yaml")), "{root:?}");
            assert!(!watched.relevant(&root.join(".git/index")), "{root:?}");
            assert!(
                !watched.relevant(&root.join("vms/.builder.yaml.swp")),
                "{root:?}"
            );
        }
        // Reported under the canonical path of a directory given otherwise.
        let dir = tempfile::tempdir().unwrap();
        let hidden = dir.path().join(".config/gitops");
        std::fs::create_dir_all(&hidden).unwrap();
        let watched = Watched::new(&hidden.join("../gitops"));
        let canonical = hidden.canonicalize().unwrap();
        assert!(watched.relevant(&canonical.join("web.yaml")));
        assert!(!watched.relevant(&canonical.join(".git/HEAD")));
        // Elsewhere: a reload too many rather than one missed.
        assert!(watched.relevant(Path::new("/elsewhere/.x")));
    }
}
