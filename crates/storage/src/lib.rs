//! Durable storage for replicas: a segmented write-ahead log and snapshot files.
//!
//! One narrow boundary, [`LogStore`], with three implementations:
//! - `wal::Wal` (files, CRC32C per record, group commit) for real nodes,
//! - `mem::MemStore` for unit tests,
//! - `faulty::FaultyStore` for the simulator: it separates written bytes from durable bytes
//!   and, on a simulated crash, loses everything not synced (and can corrupt records).
//!
//! Underneath: [`record`] (the WAL record codec), [`snapshot`] (snapshot files),
//! [`disk`] (the file-IO trait, real and simulated). Format and rules: docs/storage.md.
//!
//! The driver calls, for each `Ready` of a replica: `install_snapshot` (if any), `append`,
//! `set_hard_state`, then `sync`; only after `sync` returns may the Ready's messages go out.

use concord_consensus::{Entry, HardState, Recovered, Snapshot};
pub use snapshot::{SnapshotWriter, WrittenSnapshot};
use std::fmt;

/// A storage failure. Corruption names the file and byte offset and what to do.
#[derive(Debug)]
pub enum StorageError {
    Io {
        path: String,
        source: std::io::Error,
    },
    Corrupt {
        path: String,
        offset: u64,
        detail: String,
    },
    /// A caller broke the contract (e.g. appended a gap); a bug above, reported not panicked.
    Invalid(String),
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io { path, source } => write!(f, "I/O error on {path}: {source}"),
            StorageError::Corrupt {
                path,
                offset,
                detail,
            } => write!(
                f,
                "corrupt data in {path} at byte offset {offset}: {detail}. Refusing to start: \
                 remove this node's data folder and let it rejoin from its peers"
            ),
            StorageError::Invalid(m) => write!(f, "invalid storage request: {m}"),
        }
    }
}

impl std::error::Error for StorageError {}

pub type Result<T> = std::result::Result<T, StorageError>;

/// The durable state of one replica of one group.
pub trait LogStore {
    /// Appends entries. If `entries[0].index <= last_index()`, the stored log is first
    /// truncated from that index. Entries must be contiguous and follow the log (or the
    /// snapshot) without a gap. Written, not yet durable.
    fn append(&mut self, entries: &[Entry]) -> Result<()>;

    /// Records a new hard state. Written, not yet durable.
    fn set_hard_state(&mut self, hs: HardState) -> Result<()>;

    /// Stores a snapshot and drops every entry it covers (and, if the log does not
    /// continue from it with a matching term, the whole log). Durable on return.
    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<()>;

    /// A handle that writes snapshot files on another thread, for stores that can (the
    /// file-based WAL); `None` means: use [`LogStore::install_snapshot`].
    fn snapshot_writer(&self) -> Option<SnapshotWriter> {
        None
    }

    /// Makes a snapshot file written by [`LogStore::snapshot_writer`] the stored snapshot
    /// and drops the entries it covers, like `install_snapshot` without writing the file.
    /// Durable on return. Returns false (and changes nothing) when a snapshot at or past
    /// its index is already stored, e.g. one installed from the leader meanwhile.
    fn adopt_snapshot(&mut self, written: WrittenSnapshot) -> Result<bool> {
        Err(StorageError::Invalid(format!(
            "this store cannot adopt snapshot {} written elsewhere",
            written.meta().index
        )))
    }

    /// Drops entries up to and including `index` (covered by a snapshot already stored).
    fn compact(&mut self, index: u64) -> Result<()>;

    /// Makes everything written so far durable (group commit: one fsync for many appends).
    /// Returns the last durable index.
    fn sync(&mut self) -> Result<u64>;

    /// Reads back what is durable, as a replica needs it on restart. `applied` in the
    /// result is the snapshot index (the state machine restarts from the snapshot).
    fn recover(&mut self) -> Result<Recovered>;

    /// First and last index held (after compaction). `(snapshot_index + 1, snapshot_index)`
    /// when empty.
    fn first_index(&self) -> u64;
    fn last_index(&self) -> u64;
}

pub mod disk;
pub mod faulty;
pub mod mem;
pub mod record;
pub mod snapshot;
pub mod wal;
