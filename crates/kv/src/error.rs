//! Errors of the key-value service.
//!
//! Every variant that etcd also has carries etcd's exact message in [`KvError::etcd_message`],
//! so the gRPC front-end can map errors mechanically (the message is what etcd clients match
//! on, e.g. `clientv3` turns "mvcc: required revision has been compacted" into
//! `rpctypes.ErrCompacted`).

use std::fmt;

/// A request that cannot be served, or input that cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KvError {
    /// The requested revision is strictly below the compaction point.
    /// `compact_revision` is the oldest revision that can still be read or watched.
    Compacted { compact_revision: i64 },
    /// The requested revision is above the store's current revision.
    FutureRevision { current_revision: i64 },
    /// A put, keep-alive, revoke or time-to-live names a lease that does not exist.
    LeaseNotFound { id: i64 },
    /// A grant names an id that is already in use.
    LeaseExists { id: i64 },
    /// A grant asks for a TTL above `KvConfig::lease_ttl_max_secs`.
    LeaseTtlTooLarge { ttl_secs: i64, max_secs: i64 },
    /// A put with `ignore_value` or `ignore_lease` names a key that does not exist.
    KeyNotFound,
    /// `ignore_value` was set together with a non-empty value.
    ValueProvided,
    /// `ignore_lease` was set together with a non-zero lease.
    LeaseProvided,
    /// A transaction has more operations (per branch, or compares) than allowed.
    TooManyOps { max: usize },
    /// Transactions are nested deeper than allowed.
    TxnTooDeep { max: usize },
    /// The same key is written twice (or written and deleted) in one transaction branch.
    DuplicateKey,
    /// The request has an empty key.
    EmptyKey,
    /// The key is longer than `KvConfig::key_bytes_max`.
    KeyTooLarge { size: usize, max: usize },
    /// The value is longer than `KvConfig::value_bytes_max`.
    ValueTooLarge { size: usize, max: usize },
    /// The log entry was already applied (index at or below `applied_index`); nothing changed.
    AlreadyApplied { index: u64, applied_index: u64 },
    /// Bytes that do not decode into a command (what was wrong is in the string).
    Decode(String),
    /// A snapshot that fails its checks (what was wrong is in the string).
    CorruptSnapshot(String),
    /// A watch id that is not registered (never was, or was cancelled).
    WatchNotFound { id: u64 },
    /// The hub already has `WatchConfig::watchers_max` watchers.
    TooManyWatchers { max: usize },
    /// A configuration value is out of range (the string names the field).
    InvalidConfig(String),
}

impl KvError {
    /// The message etcd v3 gives for the same condition (without the gRPC code), or for
    /// Concord-only conditions a message in the same style.
    pub fn etcd_message(&self) -> &'static str {
        match self {
            KvError::Compacted { .. } => "mvcc: required revision has been compacted",
            KvError::FutureRevision { .. } => "mvcc: required revision is a future revision",
            KvError::LeaseNotFound { .. } => "etcdserver: requested lease not found",
            KvError::LeaseExists { .. } => "etcdserver: lease already exists",
            KvError::LeaseTtlTooLarge { .. } => "etcdserver: too large lease TTL",
            KvError::KeyNotFound => "etcdserver: key not found",
            KvError::ValueProvided => "etcdserver: value is provided",
            KvError::LeaseProvided => "etcdserver: lease is provided",
            KvError::TooManyOps { .. } => "etcdserver: too many operations in txn request",
            KvError::TxnTooDeep { .. } => "etcdserver: txn nested too deeply",
            KvError::DuplicateKey => "etcdserver: duplicate key given in txn request",
            KvError::EmptyKey => "etcdserver: key is not provided",
            KvError::KeyTooLarge { .. } => "etcdserver: request is too large",
            KvError::ValueTooLarge { .. } => "etcdserver: request is too large",
            KvError::AlreadyApplied { .. } => "concord: log entry already applied",
            KvError::Decode(_) => "concord: malformed kv command",
            KvError::CorruptSnapshot(_) => "concord: corrupt kv snapshot",
            KvError::WatchNotFound { .. } => "etcdserver: watch id not found",
            KvError::TooManyWatchers { .. } => "etcdserver: too many watchers",
            KvError::InvalidConfig(_) => "concord: invalid kv configuration",
        }
    }

    /// The gRPC status code etcd uses for this error, so the front-end need not repeat the
    /// table: the numbers are `tonic::Code`/gRPC codes (3 InvalidArgument, 5 NotFound,
    /// 6 AlreadyExists, 8 ResourceExhausted, 9 FailedPrecondition, 11 OutOfRange,
    /// 13 Internal).
    pub fn grpc_code(&self) -> i32 {
        match self {
            KvError::Compacted { .. } | KvError::FutureRevision { .. } => 11,
            KvError::LeaseNotFound { .. } | KvError::WatchNotFound { .. } => 5,
            KvError::LeaseExists { .. } => 9,
            KvError::LeaseTtlTooLarge { .. } => 11,
            KvError::KeyNotFound => 3,
            KvError::ValueProvided | KvError::LeaseProvided => 3,
            KvError::TooManyOps { .. } | KvError::TxnTooDeep { .. } => 3,
            KvError::DuplicateKey | KvError::EmptyKey => 3,
            KvError::KeyTooLarge { .. } | KvError::ValueTooLarge { .. } => 3,
            KvError::TooManyWatchers { .. } => 8,
            KvError::InvalidConfig(_) => 3,
            KvError::AlreadyApplied { .. } | KvError::Decode(_) | KvError::CorruptSnapshot(_) => 13,
        }
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.etcd_message())?;
        match self {
            KvError::Compacted { compact_revision } => {
                write!(f, " (compact revision {compact_revision})")
            }
            KvError::FutureRevision { current_revision } => {
                write!(f, " (current revision {current_revision})")
            }
            KvError::LeaseNotFound { id } | KvError::LeaseExists { id } => {
                write!(f, " (lease {id:x})")
            }
            KvError::LeaseTtlTooLarge { ttl_secs, max_secs } => {
                write!(f, " ({ttl_secs}s > {max_secs}s)")
            }
            KvError::TooManyOps { max } => write!(f, " (max {max})"),
            KvError::TxnTooDeep { max } => write!(f, " (max depth {max})"),
            KvError::KeyTooLarge { size, max } => write!(f, " (key {size}B > {max}B)"),
            KvError::ValueTooLarge { size, max } => write!(f, " (value {size}B > {max}B)"),
            KvError::AlreadyApplied {
                index,
                applied_index,
            } => write!(f, " (index {index} <= applied {applied_index})"),
            KvError::Decode(what)
            | KvError::CorruptSnapshot(what)
            | KvError::InvalidConfig(what) => write!(f, ": {what}"),
            KvError::WatchNotFound { id } => write!(f, " (watch {id})"),
            KvError::TooManyWatchers { max } => write!(f, " (max {max})"),
            KvError::KeyNotFound
            | KvError::ValueProvided
            | KvError::LeaseProvided
            | KvError::DuplicateKey
            | KvError::EmptyKey => Ok(()),
        }
    }
}

impl std::error::Error for KvError {}
