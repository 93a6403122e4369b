//! Helpers shared by the scenarios: desired-state directories in tempdirs.

use std::path::{Path, PathBuf};

use converge::source::Source;
use converge::spec::{Assembled, DesiredState};

/// The crate's root, where `examples/` and `schemas/` live.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary desired-state directory holding `files` (relative path, bytes).
pub fn write_dir<P: AsRef<Path>, B: AsRef<[u8]>>(files: &[(P, B)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    for (path, bytes) in files {
        let full = dir.path().join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).expect("create a directory in the tempdir");
        }
        std::fs::write(&full, bytes).expect("write a file in the tempdir");
    }
    dir
}

/// Loads a directory with a fresh [`Source`].
pub fn load(dir: &Path) -> Assembled {
    let (assembled, _stats) = Source::new(dir).load().expect("the directory exists");
    assembled
}

/// Every diagnostic rendered as the CLI shows it, joined.
pub fn render(assembled: &Assembled) -> String {
    assembled
        .diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads text files and returns the desired state, failing with the
/// rendered diagnostics when the directory is invalid.
pub fn load_valid(files: &[(&str, &str)]) -> DesiredState {
    let dir = write_dir(files);
    let assembled = load(dir.path());
    match assembled.desired {
        Some(desired) => desired,
        None => panic!("expected a valid directory, got:\n{}", render(&assembled)),
    }
}
