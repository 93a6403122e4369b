//! Sizes (`512MiB`, `2GiB`), durations (`90s`, `5m`, `1h30m`) and ports.
//!
//! Each is a newtype validated when built; serde and the JSON Schema go
//! through the same rules, so a value that parsed is always in range for its
//! type. Range checks that depend on the field (a VM's memory, an interval)
//! live in validation, which knows the field.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a size, duration or port is malformed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error(
        "size `{input}` is malformed: write a whole number and one of the units B, KiB, MiB, GiB, TiB, like 512MiB or 2GiB"
    )]
    Size { input: String },
    #[error("size `{input}` is too large")]
    SizeOverflow { input: String },
    #[error(
        "duration `{input}` is malformed: write whole numbers with units ms, s, m, h or d, like 90s, 5m or 1h30m"
    )]
    Duration { input: String },
    #[error("duration `{input}` is too long")]
    DurationOverflow { input: String },
    #[error("port {value} is out of range: use 1 to 65535")]
    Port { value: i128 },
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(40).flat_map(char::escape_debug).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// A number of bytes, written with a binary unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

impl ByteSize {
    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;
    pub const TIB: u64 = 1 << 40;

    pub fn from_bytes(bytes: u64) -> ByteSize {
        ByteSize(bytes)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Whole mebibytes, rounded down (what qemu's `-m` takes).
    pub fn mib(self) -> u64 {
        self.0 / Self::MIB
    }
}

impl FromStr for ByteSize {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || QuantityError::Size { input: shorten(s) };
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(digits_end);
        if digits.is_empty() || digits.len() > 20 {
            return Err(malformed());
        }
        let factor = match unit {
            "B" => 1,
            "KiB" => Self::KIB,
            "MiB" => Self::MIB,
            "GiB" => Self::GIB,
            "TiB" => Self::TIB,
            _ => return Err(malformed()),
        };
        let n: u64 = digits.parse().map_err(|_| malformed())?;
        n.checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| QuantityError::SizeOverflow { input: shorten(s) })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (Self::TIB, "TiB"),
            (Self::GIB, "GiB"),
            (Self::MIB, "MiB"),
            (Self::KIB, "KiB"),
        ];
        for (factor, unit) in units {
            if self.0 >= factor && self.0 % factor == 0 {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A duration, written as whole numbers with units (`90s`, `5m`, `1h30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> HumanDuration {
        HumanDuration(Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> HumanDuration {
        HumanDuration(Duration::from_millis(ms))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || QuantityError::Duration { input: shorten(s) };
        let overflow = || QuantityError::DurationOverflow { input: shorten(s) };
        if s.is_empty() {
            return Err(malformed());
        }
        let mut rest = s;
        let mut total_ms: u64 = 0;
        while !rest.is_empty() {
            let digits_end = rest
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(malformed)?;
            let (digits, tail) = rest.split_at(digits_end);
            if digits.is_empty() || digits.len() > 12 {
                return Err(malformed());
            }
            let n: u64 = digits.parse().map_err(|_| malformed())?;
            let unit_end = tail
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(tail.len());
            let (unit, next) = tail.split_at(unit_end);
            let factor_ms: u64 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(malformed()),
            };
            let part = n.checked_mul(factor_ms).ok_or_else(overflow)?;
            total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
            rest = next;
        }
        Ok(HumanDuration(Duration::from_millis(total_ms)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0s");
        }
        for (factor, unit) in [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
            (1, "ms"),
        ] {
            if ms >= factor {
                write!(f, "{}{unit}", ms / factor)?;
                ms %= factor;
            }
        }
        Ok(())
    }
}

/// A TCP or UDP port, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    pub fn new(value: i128) -> Result<Port, QuantityError> {
        match u16::try_from(value) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(QuantityError::Port { value }),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! string_quantity_serde {
    ($ty:ty, $schema_name:literal, $pattern:literal, $description:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $schema_name.into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $description,
                })
            }
        }
    };
}

string_quantity_serde!(
    ByteSize,
    "ByteSize",
    "^[0-9]+(B|KiB|MiB|GiB|TiB)$",
    "A size: a whole number and a binary unit, like 512MiB or 2GiB."
);
string_quantity_serde!(
    HumanDuration,
    "Duration",
    "^([0-9]+(ms|s|m|h|d))+$",
    "A duration: whole numbers with units ms, s, m, h, d, like 90s, 5m or 1h30m."
);

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i128::deserialize(d)?;
        Port::new(n).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Port {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Port".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "integer",
            "minimum": 1,
            "maximum": 65535,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary_units_and_print_back() {
        for (text, bytes) in [
            ("512MiB", 512 * ByteSize::MIB),
            ("2GiB", 2 * ByteSize::GIB),
            ("1TiB", ByteSize::TIB),
            ("4096B", 4096),
            ("0B", 0),
        ] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.bytes(), bytes, "{text}");
            assert_eq!(
                size.to_string(),
                if text == "4096B" { "4KiB" } else { text }
            );
        }
    }

    #[test]
    fn sizes_reject_malformed_and_overflowing_input() {
        for bad in ["", "2", "2GB", "2 GiB", "-1GiB", "1.5GiB", "GiB", "2gib"] {
            assert!(
                matches!(bad.parse::<ByteSize>(), Err(QuantityError::Size { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            "99999999999TiB".parse::<ByteSize>(),
            Err(QuantityError::SizeOverflow { .. })
        ));
    }

    #[test]
    fn durations_parse_compound_units_and_print_back() {
        for (text, ms) in [
            ("90s", 90_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("2d", 172_800_000),
        ] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.get(), Duration::from_millis(ms), "{text}");
        }
        assert_eq!("90s".parse::<HumanDuration>().unwrap().to_string(), "1m30s");
    }

    #[test]
    fn durations_reject_malformed_and_overflowing_input() {
        for bad in ["", "5", "s", "5 m", "5min", "-5s", "1.5h", "5m3"] {
            assert!(
                matches!(
                    bad.parse::<HumanDuration>(),
                    Err(QuantityError::Duration { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            "999999999999d".parse::<HumanDuration>(),
            Err(QuantityError::DurationOverflow { .. })
        ));
    }

    #[test]
    fn ports_are_one_to_65535() {
        assert!(Port::new(0).is_err());
        assert!(Port::new(65536).is_err());
        assert!(Port::new(-1).is_err());
        assert_eq!(Port::new(22).unwrap().get(), 22);
    }
}
