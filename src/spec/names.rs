//! Validated names: objects, tags, roles, disks.
//!
//! Every name a user writes is an RFC 1123 DNS label: lowercase letters,
//! digits and `-`, 1 to 63 characters, starting and ending with a letter or
//! digit. Such a name is safe as a path component, a log field, a systemd unit
//! suffix or an argv element: nothing a shell or a path could misread gets
//! through. serde goes through the same constructor, so an invalid name can
//! never exist in memory.

use std::borrow::Borrow;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid name.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name `{name}` is longer than 63 characters")]
    TooLong { name: String },
    #[error(
        "name `{name}` is not a DNS label: use lowercase letters, digits and `-`, starting and ending with a letter or digit"
    )]
    NotDnsLabel { name: String },
}

/// A DNS label (RFC 1123): the name of an object, tag, role or disk.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Validates `s` as a DNS label.
    pub fn new(s: &str) -> Result<Name, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 63 {
            return Err(NameError::TooLong {
                name: truncate_for_message(s),
            });
        }
        let bytes = s.as_bytes();
        let inner_ok = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !inner_ok || !edge_ok(bytes[0]) || !edge_ok(bytes[bytes.len() - 1]) {
            return Err(NameError::NotDnsLabel {
                name: truncate_for_message(s),
            });
        }
        Ok(Name(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Keeps error messages readable when the offending input is huge or binary.
fn truncate_for_message(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Name {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Name".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A DNS label: lowercase letters, digits and '-', 1 to 63 characters, starting and ending with a letter or digit.",
            "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_accepts_dns_labels_only() {
        for ok in ["a", "web1", "home-vpn", "0", &"a".repeat(63)] {
            assert!(Name::new(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "a b",
            "$(reboot)",
            "a;b",
            "../x",
            &"a".repeat(64),
        ] {
            assert!(Name::new(bad).is_err(), "{bad:?} should be invalid");
        }
    }
}
