//! The key layout of each tree: how object keys, attempt ids and event
//! sequence numbers become sled keys and back.
//!
//! sled orders keys by their bytes, so the layout is chosen for the scans the
//! store needs: one object's attempts in id order, events in sequence order.
//! This file must not read or write trees or decode values.

use std::fmt;

use crate::spec::ObjectKey;

pub(crate) const SPECS: &str = "specs";
pub(crate) const FACTS: &str = "facts";
pub(crate) const STATUS: &str = "status";
pub(crate) const HISTORY: &str = "history";
pub(crate) const EVENTS: &str = "events";
pub(crate) const META: &str = "meta";
pub(crate) const SUSPENDED: &str = "suspended";

/// `meta` key: the next attempt id [`super::Store::begin_attempt`] hands out.
pub(crate) const NEXT_ATTEMPT_ID: &[u8] = b"next_attempt_id";
/// `meta` key: the Git source's record (`run --git`).
pub(crate) const SOURCE: &[u8] = b"source";
/// `meta` key: the version of this key layout, checked on open.
pub(crate) const LAYOUT: &[u8] = b"layout";
/// The key layout this build writes and reads.
pub(crate) const LAYOUT_VERSION: u64 = 1;

/// Separates the object key from the attempt id in a history key. Object keys
/// are `kind/dns-label` and never contain it, so the prefix `machine/a\0`
/// never matches an attempt of `machine/ab`.
const HISTORY_SEPARATOR: u8 = 0;

/// Key of an object in `specs`, `facts` and `status`: its text form.
pub(crate) fn object(key: &ObjectKey) -> Vec<u8> {
    key.to_string().into_bytes()
}

/// Parses a key of `specs`, `facts` or `status`; `None` if it is corrupt.
pub(crate) fn parse_object(bytes: &[u8]) -> Option<ObjectKey> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// The prefix every history key of `key` starts with, and no other key does.
pub(crate) fn history_prefix(key: &ObjectKey) -> Vec<u8> {
    let mut bytes = object(key);
    bytes.push(HISTORY_SEPARATOR);
    bytes
}

/// `<object key> 0x00 <id, 8 bytes big-endian>`: big-endian so that byte
/// order is id order.
pub(crate) fn history(key: &ObjectKey, id: u64) -> Vec<u8> {
    let mut bytes = history_prefix(key);
    bytes.extend_from_slice(&id.to_be_bytes());
    bytes
}

/// Parses a history key; `None` if it is corrupt.
pub(crate) fn parse_history(bytes: &[u8]) -> Option<(ObjectKey, u64)> {
    let split = bytes.len().checked_sub(9)?;
    let (head, id) = bytes.split_at(split);
    let (&sep, id) = id.split_first()?;
    if sep != HISTORY_SEPARATOR {
        return None;
    }
    Some((parse_object(head)?, u64::from_be_bytes(id.try_into().ok()?)))
}

/// Key of an event: its sequence number, 8 bytes big-endian.
pub(crate) fn event(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Parses an event key; `None` if it is corrupt.
pub(crate) fn parse_event(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// How a history entry is named in errors and logs: `machine/web1#42`.
pub(crate) struct AttemptName<'a>(pub &'a ObjectKey, pub u64);

impl fmt::Display for AttemptName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.0, self.1)
    }
}

/// How a raw sled key is named in errors and logs when it may be corrupt.
pub(crate) struct RawKey<'a>(pub &'a [u8]);

impl fmt::Display for RawKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ObjectKey {
        s.parse().unwrap()
    }

    #[test]
    fn history_keys_sort_by_id_and_parse_back() {
        let a = key("machine/a");
        let ids = [0, 1, 255, 256, 1 << 40, u64::MAX];
        let mut keys: Vec<_> = ids.iter().rev().map(|&id| history(&a, id)).collect();
        keys.sort();
        let parsed: Vec<_> = keys.iter().map(|k| parse_history(k).unwrap().1).collect();
        assert_eq!(parsed, ids);
        assert_eq!(parse_history(&history(&a, 7)), Some((a, 7)));
    }

    #[test]
    fn history_prefix_of_a_key_never_matches_a_longer_key() {
        let a = key("machine/a");
        let ab = key("machine/ab");
        assert!(!history(&ab, 1).starts_with(&history_prefix(&a)));
        assert!(history(&a, 1).starts_with(&history_prefix(&a)));
    }

    #[test]
    fn corrupt_keys_parse_as_none() {
        assert_eq!(parse_object(b"machine/Bad_Name"), None);
        assert_eq!(parse_object(&[0xff, 0xfe]), None);
        assert_eq!(parse_history(b"machine/a"), None);
        assert_eq!(parse_history(b"machine/a\x01\0\0\0\0\0\0\0\x01"), None);
        assert_eq!(parse_event(b"short"), None);
        assert_eq!(parse_event(&event(5)), Some(5));
    }
}
