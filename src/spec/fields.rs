//! Validated text fields of a spec: host addresses, user names, host keys,
//! paths, bridge names.
//!
//! Each is checked when deserialized, so the drivers can hand them to ssh,
//! qemu or the filesystem as argv elements without quoting worries. Whether a
//! relative path stays inside the desired-state directory is checked in
//! validation, which knows where the document lives.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a text field is malformed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    #[error(
        "host `{input}` is not a host name or IP address: use letters, digits, `-` and `.`, or an IPv4/IPv6 address"
    )]
    Host { input: String },
    #[error(
        "user `{input}` is not a valid user name: use lowercase letters, digits, `_` and `-`, starting with a letter or `_`"
    )]
    User { input: String },
    #[error(
        "host key `{input}` is malformed: write it as in known_hosts without the host, like `ssh-ed25519 AAAAC3Nza…`"
    )]
    HostKey { input: String },
    #[error("path is empty")]
    EmptyPath,
    #[error("path `{input}` contains a NUL byte or a line break")]
    PathChars { input: String },
    #[error("path `{input}` must be absolute")]
    NotAbsolute { input: String },
    #[error(
        "bridge `{input}` is not a network interface name: 1 to 15 letters, digits, `-`, `_` or `.`"
    )]
    Bridge { input: String },
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(60).flat_map(char::escape_debug).collect();
    if s.chars().count() > 60 {
        out.push('…');
    }
    out
}

macro_rules! validated_string {
    ($(#[$doc:meta])* $ty:ident, $check:path, $schema:tt) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            pub fn new(s: &str) -> Result<$ty, FieldError> {
                $check(s)?;
                Ok($ty(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $ty::new(&s).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!($schema)
            }
        }
    };
}

fn check_host(s: &str) -> Result<(), FieldError> {
    let err = || FieldError::Host { input: shorten(s) };
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if s.is_empty() || s.len() > 253 || s.starts_with(['-', '.']) || s.ends_with('-') {
        return Err(err());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if s.trim_end_matches('.').split('.').all(label_ok) {
        Ok(())
    } else {
        Err(err())
    }
}

fn check_user(s: &str) -> Result<(), FieldError> {
    let bytes = s.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 32
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::User { input: shorten(s) })
    }
}

const KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

fn check_host_key(s: &str) -> Result<(), FieldError> {
    let err = || FieldError::HostKey { input: shorten(s) };
    let mut parts = s.split_ascii_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(err());
    };
    let blob_ok = blob.len() >= 16
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    // A trailing comment is allowed, as in known_hosts; line breaks are not.
    if KEY_TYPES.contains(&kind) && blob_ok && !s.contains(['\n', '\r', '\0']) {
        Ok(())
    } else {
        Err(err())
    }
}

fn check_path(s: &str) -> Result<(), FieldError> {
    if s.is_empty() {
        return Err(FieldError::EmptyPath);
    }
    if s.contains(['\0', '\n', '\r']) {
        return Err(FieldError::PathChars { input: shorten(s) });
    }
    Ok(())
}

fn check_abs_path(s: &str) -> Result<(), FieldError> {
    check_path(s)?;
    if Path::new(s).is_absolute() {
        Ok(())
    } else {
        Err(FieldError::NotAbsolute { input: shorten(s) })
    }
}

fn check_bridge(s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(FieldError::Bridge { input: shorten(s) })
    }
}

validated_string!(
    /// A host name or an IP address to reach a machine at.
    HostAddr, check_host,
    {"type": "string", "description": "A host name or an IPv4/IPv6 address."}
);
validated_string!(
    /// A POSIX user name.
    UserName, check_user,
    {"type": "string", "pattern": "^[a-z_][a-z0-9_-]{0,31}$"}
);
validated_string!(
    /// An SSH public host key as in known_hosts, without the host field.
    HostKey, check_host_key,
    {"type": "string", "description": "An SSH host key, like 'ssh-ed25519 AAAAC3Nza...'."}
);
validated_string!(
    /// A file path in a spec: absolute, or relative to the file's directory-state root.
    SpecPath, check_path,
    {"type": "string", "description": "An absolute path, or a path relative to the desired-state directory that stays inside it."}
);
validated_string!(
    /// An absolute path on a target.
    AbsPath, check_abs_path,
    {"type": "string", "pattern": "^/"}
);
validated_string!(
    /// A Linux network interface name.
    BridgeName, check_bridge,
    {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$"}
);

impl SpecPath {
    /// Resolves the path against the desired-state directory, or `None` when a
    /// relative path climbs out of it. The check is lexical: a symlink inside
    /// the directory is the user's own business.
    pub fn resolve(&self, root: &Path) -> Option<PathBuf> {
        let path = Path::new(&self.0);
        if path.is_absolute() {
            return Some(path.to_path_buf());
        }
        let mut depth: usize = 0;
        let mut out = root.to_path_buf();
        for component in path.components() {
            match component {
                Component::Normal(part) => {
                    depth += 1;
                    out.push(part);
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    depth = depth.checked_sub(1)?;
                    out.pop();
                }
                Component::RootDir | Component::Prefix(_) => return None,
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_accept_names_and_addresses_only() {
        for ok in [
            "10.0.0.5",
            "::1",
            "fe80::1",
            "web1.lan",
            "web-1",
            "localhost",
        ] {
            assert!(HostAddr::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-oProxyCommand=x", "a b", "a;b", "host_1", ".x", "x..y"] {
            assert!(HostAddr::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_may_not_climb_out_of_the_directory() {
        let root = Path::new("/repo");
        let p = |s: &str| SpecPath::new(s).unwrap();
        assert_eq!(
            p("images/a.qcow2").resolve(root),
            Some(PathBuf::from("/repo/images/a.qcow2"))
        );
        assert_eq!(p("a/../b").resolve(root), Some(PathBuf::from("/repo/b")));
        assert_eq!(p("/srv/x").resolve(root), Some(PathBuf::from("/srv/x")));
        assert_eq!(p("../x").resolve(root), None);
        assert_eq!(p("a/../../x").resolve(root), None);
    }

    #[test]
    fn host_keys_need_a_known_type_and_a_base64_blob() {
        assert!(HostKey::new("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0 comment").is_ok());
        assert!(HostKey::new("ssh-ed25519").is_err());
        assert!(HostKey::new("rsa AAAAC3NzaC1lZDI1NTE5AAAAIJ0").is_err());
        assert!(HostKey::new("ssh-ed25519 AAAA$(x)AAAAAAAAAAAAAA").is_err());
    }
}
