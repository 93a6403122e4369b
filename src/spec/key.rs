//! Object keys: `machine/web1`, `vm/builder`, `service/home-vpn`.
//!
//! A key names one object across the whole program: the store's records, the
//! scheduler's queue, log fields and the CLI all use it. It is built only from
//! a [`Kind`] and a validated [`Name`], so it never holds anything a shell or a
//! path could misread.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::names::{Name, NameError};

/// The three kinds of object converge reconciles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Machine,
    VirtualMachine,
    Service,
}

impl Kind {
    /// Every kind, in the order objects of a directory are listed.
    pub const ALL: [Kind; 3] = [Kind::Machine, Kind::VirtualMachine, Kind::Service];

    /// The `kind:` value of a YAML document.
    pub fn yaml_name(self) -> &'static str {
        match self {
            Kind::Machine => "Machine",
            Kind::VirtualMachine => "VirtualMachine",
            Kind::Service => "Service",
        }
    }

    /// The prefix of an object key (`machine/…`).
    pub fn key_prefix(self) -> &'static str {
        match self {
            Kind::Machine => "machine",
            Kind::VirtualMachine => "vm",
            Kind::Service => "service",
        }
    }

    /// Parses the `kind:` value of a YAML document.
    pub fn from_yaml_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.yaml_name() == s)
    }

    fn from_key_prefix(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.key_prefix() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.yaml_name())
    }
}

/// `kind/name`: the identity of one object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub name: Name,
}

impl ObjectKey {
    pub fn new(kind: Kind, name: Name) -> Self {
        ObjectKey { kind, name }
    }

    pub fn machine(name: Name) -> Self {
        ObjectKey::new(Kind::Machine, name)
    }

    pub fn vm(name: Name) -> Self {
        ObjectKey::new(Kind::VirtualMachine, name)
    }

    pub fn service(name: Name) -> Self {
        ObjectKey::new(Kind::Service, name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.key_prefix(), self.name)
    }
}

/// Why a string is not an object key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("parse object key `{input}`: expected machine/NAME, vm/NAME or service/NAME")]
    Shape { input: String },
    #[error("parse object key `{input}`")]
    Name {
        input: String,
        #[source]
        source: NameError,
    },
}

impl FromStr for ObjectKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || KeyError::Shape {
            input: s.to_owned(),
        };
        let (prefix, name) = s.split_once('/').ok_or_else(shape)?;
        let kind = Kind::from_key_prefix(prefix).ok_or_else(shape)?;
        let name = Name::new(name).map_err(|source| KeyError::Name {
            input: s.to_owned(),
            source,
        })?;
        Ok(ObjectKey { kind, name })
    }
}

impl Serialize for ObjectKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ObjectKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_through_its_text_form() {
        for text in ["machine/web1", "vm/builder", "service/home-vpn"] {
            let key: ObjectKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
    }

    #[test]
    fn key_rejects_unknown_kinds_and_bad_names() {
        assert!(matches!(
            "pod/x".parse::<ObjectKey>(),
            Err(KeyError::Shape { .. })
        ));
        assert!(matches!(
            "machine/Web_1".parse::<ObjectKey>(),
            Err(KeyError::Name { .. })
        ));
        assert!(matches!(
            "machine".parse::<ObjectKey>(),
            Err(KeyError::Shape { .. })
        ));
    }
}
