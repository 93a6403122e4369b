//! Which entries of the desired-state directory converge never reads: hidden
//! files and directories (`.git`), editor backups and swap files, temporary
//! files. One rule for the loader and the build-input hash alike, so saving
//! a file in an editor neither reloads nor rebuilds anything.

/// Hidden files, editor backups and temporary files.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with('#')
        || name.ends_with('~')
        || [".swp", ".swx", ".swo", ".bak", ".orig", ".tmp", ".rej"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}
