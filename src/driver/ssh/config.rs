//! The client files ssh reads, generated from [`SshOptions`] into the
//! control directory: the ssh_config whose fixed options come before the
//! user's (with the probe that decides whether the cheap key exchange goes
//! first), the known_hosts line for a spec's host key, and the helper that
//! writes them privately (0600 files written by rename; the directory is
//! checked by `control_dir.rs`).
//! It must not connect to or run anything on a target; the only process it
//! starts is the local `ssh -G` probe, once per process.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio as StdStdio;

use super::error::SshError;
use super::options::SshOptions;
use crate::driver::command::unique_suffix;

/// The known_hosts line trusting `key` (its first two words) for host:port.
pub(super) fn known_hosts_line(host: &str, port: u16, key: &str) -> Result<String, SshError> {
    let mut words = key.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(SshError::InvalidOption {
            option: "hostKey",
            value: key.to_owned(),
            why: "must be `<type> <base64>`, e.g. `ssh-ed25519 AAAA...`",
        });
    };
    let kind_ok = kind
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'@' | b'.'));
    let blob_ok = blob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !kind_ok || !blob_ok {
        return Err(SshError::InvalidOption {
            option: "hostKey",
            value: key.to_owned(),
            why: "must be `<type> <base64>`, e.g. `ssh-ed25519 AAAA...`",
        });
    }
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    Ok(format!("{name} {kind} {blob}\n"))
}

/// The generated ssh_config. ssh keeps the first value it reads for each
/// option, and command-line options come first, so the crate's `-o` options
/// (BatchMode, StrictHostKeyChecking, ConnectTimeout, ServerAliveInterval,
/// UserKnownHostsFile) win; the options the crate has no setter for are set
/// here, before the user's config is included.
pub(super) fn client_config(o: &SshOptions, own_known_hosts: bool) -> Result<String, SshError> {
    let mut c = String::new();
    let mut line = |text: &str| {
        c.push_str(text);
        c.push('\n');
    };
    line(
        "# converge: generated ssh_config; these options come first so they win, then the user's config",
    );
    line(&format!(
        "ServerAliveCountMax {}",
        o.server_alive_count_max.max(1)
    ));
    line("PasswordAuthentication no");
    line("KbdInteractiveAuthentication no");
    line("UpdateHostKeys no");
    line("CheckHostIP no");
    line("HashKnownHosts no");
    if own_known_hosts {
        line("GlobalKnownHostsFile /dev/null");
    }
    match &o.ssh_config {
        Some(user_config) => line(&format!("Include \"{}\"", user_config.display())),
        None => {
            line("Include ~/.ssh/config");
            line("Include /etc/ssh/ssh_config");
        }
    }
    // Defaults below the user's config, so a KexAlgorithms there wins.
    // The post-quantum hybrid OpenSSH picks first costs ~70 ms of client CPU
    // per handshake (sntrup761 key generation), curve25519 ~5 ms: a fleet of
    // 20 connects 10× cheaper. This gives up protection of recorded traffic
    // against a future quantum computer; set KexAlgorithms in the ssh_config
    // converge reads to keep it (ARCHITECTURE.md, "SSH").
    if default_kex_is_costly_hybrid() {
        line("Match all");
        line("KexAlgorithms ^curve25519-sha256,curve25519-sha256@libssh.org");
    }
    Ok(c)
}

/// Whether this OpenSSH client's default key exchange starts with the
/// sntrup761 hybrid (OpenSSH 9.0 to 9.8) and it offers curve25519: only
/// then is curve25519 put first. Older clients may not understand the `^`
/// syntax, FIPS builds lack curve25519, and from 9.9 the default
/// mlkem768x25519 is cheap already. Asked once per process (`ssh -G` reads
/// configuration only; it does not connect).
pub(super) fn default_kex_is_costly_hybrid() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        let Ok(out) = std::process::Command::new("ssh")
            .args(["-G", "-F", "/dev/null", "converge-kex-probe"])
            .stdin(StdStdio::null())
            .stderr(StdStdio::null())
            .output()
        else {
            return false;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("kexalgorithms "))
            .is_some_and(|list| {
                list.starts_with("sntrup761x25519")
                    && list.split(',').any(|a| a == "curve25519-sha256")
            })
    })
}

/// 16 hex digits naming a generated file after its content.
pub(super) fn short_hash(bytes: &[u8]) -> String {
    let hash = blake3::hash(bytes).to_hex();
    hash.as_str()[..16].to_owned()
}

/// Writes `bytes` to `path` (mode 0600) by a rename, so concurrent writers of
/// the same content never expose a half-written file. Follows no symbolic
/// link: the temporary file is created exclusively (`O_EXCL` fails on a
/// link), and the rename replaces whatever is at `path`, a link included,
/// rather than writing through it. `path`'s directory is a checked control
/// directory (`control_dir.rs`), so no other user can put anything there.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SshError> {
    let prepare = |source| SshError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", unique_suffix()));
    let tmp = PathBuf::from(tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(prepare)
}
