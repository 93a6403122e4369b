//! How a machine's `build.nix.flake` reads: which flake, which attribute.
//! Pure: the desired-state directory is given, never looked at, and the
//! result is only text for `nix` to read.
//!
//! The rules follow `nixos-rebuild --flake`: `<flakeref>#<name>` builds
//! `nixosConfigurations.<name>.config.system.build.toplevel`; a fragment
//! that starts with `nixosConfigurations.` is the whole attribute path; no
//! fragment means the machine's own name. A relative path (`.`, `./x`,
//! `../x`, also after `path:`) is resolved against the desired-state
//! directory, so the controller's working directory never matters.

use std::path::{Component, Path, PathBuf};

/// The prefix of every NixOS system's attribute path.
const CONFIGURATIONS: &str = "nixosConfigurations.";
/// What follows a machine's name in its attribute path.
const TOPLEVEL: &str = ".config.system.build.toplevel";

/// A flake reference resolved for one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedFlake {
    /// The flake reference without fragment, with a relative path made
    /// absolute (`/srv/gitops`, `path:/srv/gitops/sub`, `github:o/r`).
    pub flake: String,
    /// The attribute path of the system's toplevel derivation.
    pub attribute: String,
    /// True when the flake is a path inside the desired-state directory:
    /// the directory's build-input hash then covers everything it reads
    /// but its inputs, which its lock file (also in the directory) pins.
    pub in_directory: bool,
}

impl ResolvedFlake {
    /// `flake#attribute`, what `nix build` is given.
    pub fn installable(&self) -> String {
        format!("{}#{}", self.flake, self.attribute)
    }
}

/// Resolves `reference` for the machine `machine` against the
/// desired-state directory `root` (absolute). An empty flake part means
/// `root` itself, so `#web1` reads like `.#web1`.
pub fn resolve(reference: &str, machine: &str, root: &Path) -> ResolvedFlake {
    let (flake, fragment) = match reference.split_once('#') {
        Some((flake, fragment)) => (flake.trim(), Some(fragment.trim())),
        None => (reference.trim(), None),
    };
    let attribute = match fragment {
        None | Some("") => format!("{CONFIGURATIONS}{machine}{TOPLEVEL}"),
        Some(full) if full.starts_with(CONFIGURATIONS) => full.to_owned(),
        Some(name) => format!("{CONFIGURATIONS}{name}{TOPLEVEL}"),
    };
    let (scheme, path) = match flake.strip_prefix("path:") {
        Some(path) => ("path:", path),
        None => ("", flake),
    };
    let relative = path.is_empty()
        || path == "."
        || path == ".."
        || path.starts_with("./")
        || path.starts_with("../");
    let (flake, in_directory) = if relative {
        let absolute = normalize(&root.join(path));
        let inside = absolute.starts_with(normalize(root));
        (format!("{scheme}{}", absolute.display()), inside)
    } else {
        let inside =
            path.starts_with('/') && normalize(Path::new(path)).starts_with(normalize(root));
        (flake.to_owned(), inside)
    };
    ResolvedFlake {
        flake,
        attribute,
        in_directory,
    }
}

/// `a/./b/../c` as `a/c`, without asking the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(reference: &str) -> ResolvedFlake {
        resolve(reference, "web1", Path::new("/srv/gitops"))
    }

    #[test]
    fn a_name_fragment_means_that_configurations_toplevel() {
        let got = r(".#db");
        assert_eq!(got.flake, "/srv/gitops");
        assert_eq!(
            got.attribute,
            "nixosConfigurations.db.config.system.build.toplevel"
        );
        assert!(got.in_directory);
        assert_eq!(
            got.installable(),
            "/srv/gitops#nixosConfigurations.db.config.system.build.toplevel"
        );
    }

    #[test]
    fn no_fragment_means_the_machines_own_name() {
        for reference in [".", "./", "#", ""] {
            let got = r(reference);
            assert_eq!(got.flake, "/srv/gitops", "{reference:?}");
            assert_eq!(
                got.attribute,
                "nixosConfigurations.web1.config.system.build.toplevel"
            );
        }
    }

    #[test]
    fn a_fragment_starting_with_nixos_configurations_is_used_as_is() {
        let got = r("./sub#nixosConfigurations.x.config.system.build.vm");
        assert_eq!(got.flake, "/srv/gitops/sub");
        assert_eq!(
            got.attribute,
            "nixosConfigurations.x.config.system.build.vm"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_directory_and_may_leave_it() {
        let got = r("path:./fleet/../nix#a");
        assert_eq!(got.flake, "path:/srv/gitops/nix");
        assert!(got.in_directory);
        let outside = r("../shared#a");
        assert_eq!(outside.flake, "/srv/shared");
        assert!(!outside.in_directory);
    }

    #[test]
    fn other_references_are_kept_and_are_outside_the_directory() {
        let got = r("github:me/fleet#a");
        assert_eq!(got.flake, "github:me/fleet");
        assert!(!got.in_directory);
        assert!(r("/srv/gitops/nix#a").in_directory);
        assert!(!r("/srv/other#a").in_directory);
    }
}
