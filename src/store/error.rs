//! Why a store operation failed: [`StoreError`], with the database's own
//! errors kept opaque ([`DbError`]) so that no sled type leaves the store,
//! and the mapping of sled's failures to open (a held lock, a damaged
//! store) onto the variants users act on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use sled::transaction::TransactionError;

use crate::spec::ObjectKey;

/// Why a store operation failed. Messages read after "failed to".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("create store directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mark {} as a created store", path.display())]
    Mark {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("restrict {} to its owner", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "open store {}: another process holds its lock, probably a running converge daemon; \
         stop it, or ask it through its API instead",
        path.display()
    )]
    Locked { path: PathBuf },
    /// The store's files are damaged. The cause is written into the
    /// message (not kept as a source) because what to do must come after
    /// it, as the last words a user reads.
    #[error(
        "open the store at {path}: it is damaged ({cause}); move it aside \
         (mv {path} {path}.damaged) and run again: converge observes every object again; \
         its history is lost",
        path = path.display()
    )]
    Damaged { path: PathBuf, cause: String },
    #[error("open store {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: DbError,
    },
    #[error("read {key} from tree {tree}")]
    Read {
        tree: &'static str,
        key: String,
        #[source]
        source: DbError,
    },
    #[error("write {key} to tree {tree}")]
    Write {
        tree: &'static str,
        key: String,
        #[source]
        source: DbError,
    },
    #[error("scan tree {tree}")]
    Scan {
        tree: &'static str,
        #[source]
        source: DbError,
    },
    #[error("flush store {} to disk", path.display())]
    Flush {
        path: PathBuf,
        #[source]
        source: DbError,
    },
    #[error("encode {key} for tree {tree}")]
    Encode {
        tree: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("decode {key} in tree {tree}: the stored value is corrupt")]
    Decode {
        tree: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "read {key} in tree {tree}: it has format version {version} and this converge reads \
         up to version {supported}; was the store written by a newer converge?"
    )]
    UnsupportedFormat {
        tree: &'static str,
        key: String,
        version: u32,
        supported: u32,
    },
}

/// An error from the database underneath, kept opaque so that the store's
/// API names no sled type. Its message and source chain are sled's.
#[derive(Debug)]
pub struct DbError(pub(super) sled::Error);

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Maps sled's failure to open, telling a held lock from other failures.
/// A damaged store, as sled reports it at open: a `conf` it cannot parse
/// (`Corruption`, or `Unsupported` when the file is not even UTF-8), a
/// corrupt log, or data that ends early. A log damaged further in is not
/// reported by sled at all (it recovers up to the damage, silently); the
/// store notices when that left none of its records (see `Store::open`).
pub(super) fn open_error(path: &Path, e: sled::Error) -> StoreError {
    // sled 0.34.7 (config.rs, `try_lock`) takes an exclusive flock on the
    // `db` file and, when that fails, returns an `Other` io error with the
    // text "could not acquire lock on ..."; the WouldBlock kind is only in
    // its text.
    if let sled::Error::Io(io) = &e {
        if io.kind() == io::ErrorKind::WouldBlock
            || io.to_string().contains("could not acquire lock")
        {
            return StoreError::Locked {
                path: path.to_owned(),
            };
        }
    }
    let damaged = match &e {
        sled::Error::Corruption { .. }
        | sled::Error::Unsupported(_)
        | sled::Error::ReportableBug(_) => true,
        sled::Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    };
    if damaged {
        return StoreError::Damaged {
            path: path.to_owned(),
            cause: format!("sled: {e}"),
        };
    }
    StoreError::Open {
        path: path.to_owned(),
        source: DbError(e),
    }
}

pub(super) fn transaction_error(
    trees: &'static str,
    key: &ObjectKey,
    e: TransactionError<StoreError>,
) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Write {
            tree: trees,
            key: key.to_string(),
            source: DbError(e),
        },
    }
}
