//! Triggers that come from outside the loop: the desired-state directory's
//! file changes, debounced.
//!
//! notify's debouncer collapses a burst of events (an editor's save, a
//! `git pull`) into one batch after a quiet window; the batch is forwarded
//! as the set of changed paths. Hidden files, editor backups and temporary
//! files are ignored, as loading ignores them. What a change means (which
//! objects' specs changed) is decided by the daemon after reloading.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

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

fn relevant(path: &Path) -> bool {
    !path.components().any(|c| {
        let part = c.as_os_str().to_string_lossy();
        part.starts_with('.') && part != "." && part != ".."
    }) && path
        .file_name()
        .map(|n| {
            let n = n.to_string_lossy();
            !(n.ends_with('~')
                || n.starts_with('#')
                || n.ends_with(".swp")
                || n.ends_with(".swx")
                || n.ends_with(".tmp"))
        })
        .unwrap_or(true)
}

/// Watches `root` recursively; sends each debounced batch of relevant changed paths.
pub fn watch_dir(
    root: &Path,
    debounce: Duration,
    tx: mpsc::UnboundedSender<BTreeSet<PathBuf>>,
) -> Result<DirWatch, WatchError> {
    let handler = move |result: DebounceEventResult| match result {
        Ok(events) => {
            // Reading the files (our own reload) produces access events;
            // reacting to them would reload forever.
            let paths: BTreeSet<PathBuf> = events
                .into_iter()
                .filter(|e| !matches!(e.event.kind, notify::EventKind::Access(_)))
                .flat_map(|e| e.event.paths)
                .filter(|p| relevant(p))
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
        assert!(relevant(Path::new("/repo/machines/web.yaml")));
        assert!(relevant(Path::new("/repo/build.sh")));
        assert!(!relevant(Path::new("/repo/.git/index")));
        assert!(!relevant(Path::new("/repo/web.yaml~")));
        assert!(!relevant(Path::new("/repo/.web.yaml.swp")));
    }
}
