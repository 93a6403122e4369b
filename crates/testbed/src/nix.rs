//! Real Nix for scenarios and benchmarks: the offline settings every test
//! run of Nix uses, a fake NixOS flake (no nixpkgs: systems built by
//! `/bin/sh` whose `switch-to-configuration` records each call), `nix
//! build` of one of its systems, and a `nix` wrapper that counts calls.
//! It must not need the network.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// NIX_CONFIG for offline runs here: no binary cache, no build users, no sandbox.
pub const OFFLINE_NIX_CONFIG: &str = "substituters =\nbuild-users-group =\nsandbox = false";

/// Where a fake system's `switch-to-configuration` appends
/// `MODE NAME VARIANT` (on the host that runs it, so in its own /nix).
pub const LEDGER: &str = "/nix/var/nix/converge-test-ledger";
/// Where a fake system's `switch-to-configuration` appends the same line
/// when it starts (a variant that starts with `slow` then sleeps 4 s).
pub const STARTED: &str = "/nix/var/nix/converge-test-started";
/// The link a fake system's successful `switch-to-configuration` points
/// at itself; `/run/current-system` on test hosts points here.
pub const CURRENT_SYSTEM: &str = "/nix/var/nix/current-system";

/// The link a test makes a host's booted system (`/run/booted-system`
/// on test hosts points here).
pub const BOOTED_SYSTEM: &str = "/nix/var/nix/booted-system";

/// Makes `/run/current-system` and `/run/booted-system` on this machine
/// links to [`CURRENT_SYSTEM`] and [`BOOTED_SYSTEM`], so each namespace
/// host, seeing its own /nix, has its own current and booted system.
/// Leaves links that are there already (another run made them).
pub fn link_run_systems() {
    for (link, target) in [
        ("/run/current-system", CURRENT_SYSTEM),
        ("/run/booted-system", BOOTED_SYSTEM),
    ] {
        match fs::read_link(link) {
            Ok(existing) if existing == Path::new(target) => {}
            Ok(existing) => panic!(
                "{link} points at {}, not {target}: this machine is not a test machine",
                existing.display()
            ),
            Err(_) => {
                if let Err(error) = std::os::unix::fs::symlink(target, link) {
                    assert!(
                        error.kind() == std::io::ErrorKind::AlreadyExists,
                        "link {link} -> {target}: {error}"
                    );
                }
            }
        }
    }
}

/// One fake system: a machine name, a variant (in its store path; a
/// variant that starts with `fail` makes its `switch-to-configuration`
/// exit 1, one that starts with `slow` makes it take 4 s), its kernel's name, and `paths` extra store paths of `kib` KiB
/// each in its closure (`extra` names them, so two systems can share them).
#[derive(Debug, Clone)]
pub struct FakeSystem {
    pub name: String,
    pub variant: String,
    pub kernel: String,
    pub paths: usize,
    pub kib: usize,
}

impl FakeSystem {
    pub fn new(name: &str, variant: &str) -> FakeSystem {
        FakeSystem {
            name: name.to_owned(),
            variant: variant.to_owned(),
            kernel: "k1".to_owned(),
            paths: 0,
            kib: 0,
        }
    }
}

const FLAKE_HEAD: &str = r#"{
  outputs = { self }:
    let
      sh = name: script: builtins.derivation {
        inherit name;
        system = "x86_64-linux";
        builder = "/bin/sh";
        PATH = "/bin:/usr/bin";
        args = [ "-c" script ];
      };
      blob = i: kib: sh "blob-${toString i}" "head -c ${toString (kib * 1024)} /dev/zero | tr '\\0' ${toString i} > $out";
      boot = kernel: sh "linux-${kernel}" "mkdir -p $out/lib/modules; echo ${kernel} > $out/bzImage; echo initrd-${kernel} > $out/initrd";
      system = name: variant: kernel: blobs:
        let
          deps = builtins.concatStringsSep " " (map toString blobs);
          k = boot kernel;
        in {
        config.system.build.toplevel = sh "nixos-system-${name}-${variant}" ''
          mkdir -p $out/bin
          ln -s ${k}/bzImage $out/kernel
          ln -s ${k}/initrd $out/initrd
          ln -s ${k}/lib $out/kernel-modules
          echo ${deps} > $out/deps
          cat > $out/bin/switch-to-configuration <<EOF
          #!/bin/sh
          echo "\$1 ${name} ${variant}" >> STARTED
          case ${variant} in slow*) sleep 4 ;; esac
          echo "\$1 ${name} ${variant}" >> LEDGER
          case ${variant} in fail*) echo "switch of ${variant} fails on purpose" >&2; exit 1 ;; esac
          if [ "\$1" = switch ] || [ "\$1" = test ]; then ln -sfn $out CURRENT.tmp && mv -T CURRENT.tmp CURRENT; fi
          EOF
          chmod +x $out/bin/switch-to-configuration
        '';
      };
    in {
      nixosConfigurations = {
"#;

/// The text of a `flake.nix` with `systems` as `nixosConfigurations`.
pub fn fake_flake(systems: &[FakeSystem]) -> String {
    let mut text = FLAKE_HEAD
        .replace("LEDGER", LEDGER)
        .replace("STARTED", STARTED)
        .replace("CURRENT", CURRENT_SYSTEM);
    for s in systems {
        let blobs: Vec<String> = (0..s.paths)
            .map(|i| format!("(blob {i} {})", s.kib))
            .collect();
        text.push_str(&format!(
            "        {name} = system \"{name}\" \"{variant}\" \"{kernel}\" [ {blobs} ];\n",
            name = s.name,
            variant = s.variant,
            kernel = s.kernel,
            blobs = blobs.join(" "),
        ));
    }
    text.push_str("      };\n    };\n}\n");
    text
}

/// `nix build` of `nixosConfigurations.NAME`'s toplevel in the flake at
/// `dir`; its store path.
pub fn build_system(dir: &Path, name: &str) -> String {
    let installable = format!(
        "{}#nixosConfigurations.{name}.config.system.build.toplevel",
        dir.display()
    );
    let output = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "build",
            "--no-link",
            "--json",
            &installable,
        ])
        .env("NIX_CONFIG", OFFLINE_NIX_CONFIG)
        .output()
        .expect("run nix: apt-get install -y nix-bin (scripts/setup does)");
    assert!(
        output.status.success(),
        "nix build {installable}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("nix build --json output");
    value[0]["outputs"]["out"]
        .as_str()
        .expect("an out path")
        .to_owned()
}

/// Writes `<dir>/nix`, a wrapper that appends a line to `<dir>/nix-calls`
/// and runs the real `nix`; returns PATH with `dir` first.
pub fn counting_wrapper(dir: &Path) -> String {
    let real = [
        "/usr/bin/nix",
        "/run/current-system/sw/bin/nix",
        "/nix/var/nix/profiles/default/bin/nix",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("nix is installed: apt-get install -y nix-bin");
    fs::create_dir_all(dir).expect("create the wrapper directory");
    let wrapper = dir.join("nix");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec {real} \"$@\"\n",
            dir.join("nix-calls").display()
        ),
    )
    .expect("write the nix wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod +x");
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_owned())
    )
}

/// The calls the wrapper of [`counting_wrapper`] in `dir` counted.
pub fn calls(dir: &Path) -> Vec<String> {
    crate::run::read_lines(&dir.join("nix-calls"))
}

/// Where `link` (a path inside a host's /nix, as the host sees it) points,
/// read through `nix_dir`, the host's /nix as this process sees it;
/// followed to the end like `readlink -f`.
pub fn resolve_in(nix_dir: &Path, link: &str) -> Option<String> {
    let mut path = PathBuf::from(link);
    for _ in 0..40 {
        let local = nix_dir.join(path.strip_prefix("/nix").ok()?);
        match fs::read_link(&local) {
            Ok(target) if target.is_absolute() => path = target,
            Ok(target) => path = path.parent()?.join(target),
            Err(_) => return local.exists().then(|| path.display().to_string()),
        }
    }
    None
}
