//! A real Git remote for scenarios of converge's Git source: a bare
//! repository, a working clone that commits (signed with a real ed25519
//! key made by `ssh-keygen`, or not) and pushes (forced too), and
//! allowed-signers files. Needs git and ssh-keygen (openssh-client).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// An SSH signing key made with `ssh-keygen -t ed25519 -N ''`.
pub struct Signer {
    pub principal: String,
    /// The private key file (`user.signingkey`).
    pub key: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA… comment`).
    pub public: String,
}

impl Signer {
    /// Makes a key pair in `dir` for `principal` (an email address).
    pub fn new(dir: &Path, principal: &str) -> Signer {
        let key = dir.join(format!("key-{}", principal.replace(['@', '.'], "-")));
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", principal, "-f"])
            .arg(&key));
        let public = fs::read_to_string(key.with_extension("pub"))
            .or_else(|_| fs::read_to_string(format!("{}.pub", key.display())))
            .expect("read the public key")
            .trim()
            .to_owned();
        Signer {
            principal: principal.to_owned(),
            key,
            public,
        }
    }
}

/// Writes an allowed-signers file naming `signers` for git's namespace.
pub fn allowed_signers(path: &Path, signers: &[&Signer]) {
    let text: String = signers
        .iter()
        .map(|s| format!("{} namespaces=\"git\" {}\n", s.principal, s.public))
        .collect();
    fs::write(path, text).expect("write the allowed-signers file");
}

/// A bare repository (`remote`) and a working clone (`work`) that pushes
/// to its branch `main`.
pub struct GitRemote {
    pub remote: PathBuf,
    pub work: PathBuf,
}

impl GitRemote {
    /// Makes the bare repository at `remote` and turns the existing
    /// directory `work` (files may already be there) into its clone.
    pub fn new(remote: &Path, work: &Path) -> GitRemote {
        run(Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(remote));
        fs::create_dir_all(work).expect("create the working clone");
        let repo = GitRemote {
            remote: remote.to_path_buf(),
            work: work.to_path_buf(),
        };
        repo.git(&["init", "-q", "-b", "main"]);
        repo.git(&[
            "remote",
            "add",
            "origin",
            remote.to_str().expect("utf-8 path"),
        ]);
        repo
    }

    /// The URL converge fetches from.
    pub fn url(&self) -> String {
        self.remote.to_string_lossy().into_owned()
    }

    /// Commits every change in the working clone, signed by `signer` or
    /// not; returns the commit id.
    pub fn commit(&self, message: &str, signer: Option<&Signer>) -> String {
        self.git(&["add", "-A"]);
        let mut args = vec![
            "-c".to_owned(),
            "user.name=Test".to_owned(),
            "-c".to_owned(),
            format!(
                "user.email={}",
                signer.map_or("nobody@example.com", |s| s.principal.as_str())
            ),
        ];
        if let Some(signer) = signer {
            args.extend([
                "-c".to_owned(),
                "gpg.format=ssh".to_owned(),
                "-c".to_owned(),
                format!("user.signingkey={}", signer.key.display()),
            ]);
        }
        args.extend(["commit", "-q", "--allow-empty", "-m", message].map(str::to_owned));
        if signer.is_some() {
            args.push("-S".to_owned());
        } else {
            args.push("--no-gpg-sign".to_owned());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.git(&refs);
        self.head()
    }

    /// The working clone's HEAD.
    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }

    /// Pushes HEAD to `main` (a fast-forward).
    pub fn push(&self) {
        self.git(&["push", "-q", "origin", "HEAD:main"]);
    }

    /// Pushes HEAD to `main` whatever it was (`--force`).
    pub fn force_push(&self) {
        self.git(&["push", "-q", "--force", "origin", "HEAD:main"]);
    }

    /// Moves the working clone to `commit`, files included.
    pub fn reset_hard(&self, commit: &str) {
        self.git(&["reset", "-q", "--hard", commit]);
    }

    /// Runs git in the working clone; its trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        run(Command::new("git").arg("-C").arg(&self.work).args(args))
    }
}

fn run(command: &mut Command) -> String {
    let output = command
        .stdin(Stdio::null())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e} (install git and openssh-client)"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
