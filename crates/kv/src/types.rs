//! Public request, response and event types. They mirror etcd v3's protobuf messages
//! (`etcdserverpb.RangeRequest`, `mvccpb.KeyValue`, ...) field for field where etcd has the
//! field, so the gRPC front-end translates by copying.

use serde::{Deserialize, Serialize};

use crate::error::KvError;

/// A store revision. Revision 1 is the empty store; each write transaction that changes
/// something adds one. Signed like etcd's `int64` so the front-end copies it unchanged.
pub type Revision = i64;
/// A lease id. `0` means "no lease".
pub type LeaseId = i64;

/// "No lease" in `PutRequest::lease` and `KeyValue::lease`.
pub const NO_LEASE: LeaseId = 0;

/// One version of one key, as etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "crate::codec::bytes")]
    pub key: Vec<u8>,
    /// Revision of the last creation of this key (0 for a deletion event's `kv`).
    pub create_revision: Revision,
    /// Revision of the last modification.
    pub mod_revision: Revision,
    /// Number of modifications since creation; 1 on creation, reset by a delete.
    pub version: i64,
    /// Empty when the request was `keys_only`, and for a deletion event's `kv`.
    #[serde(with = "crate::codec::bytes")]
    pub value: Vec<u8>,
    pub lease: LeaseId,
}

/// What kind of change an [`Event`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One committed change to one key, as etcd's `mvccpb.Event`.
///
/// For a `Delete`, `kv` holds only `key` and `mod_revision` (the deleting revision), as in etcd.
/// `prev_kv` is the key's version just before this change, when it exists and has not been
/// compacted away; the watch hub strips it for watchers that did not ask for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    /// The revision at which this change was committed.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// etcd's `ResponseHeader`, less the cluster fields the front-end fills in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHeader {
    /// The store's revision when the response was produced (after the request's own write).
    pub revision: Revision,
}

// ---------------------------------------------------------------------------------------
// Range

/// How a range result is ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SortOrder {
    /// Key order, except when `sort_target` is not `Key`: then ascending (as etcd).
    #[default]
    None,
    Ascend,
    Descend,
}

/// What a range result is ordered by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// A read, as etcd's `RangeRequest`.
///
/// Key conventions: `range_end` empty means the single key `key`; `range_end == [0]` means
/// every key `>= key` (and `key == [0]` with it means every key); otherwise the half-open
/// interval `[key, range_end)`; a prefix `p` is `key = p, range_end = p` with its last byte
/// plus one (see [`prefix_end`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    #[serde(with = "crate::codec::bytes")]
    pub key: Vec<u8>,
    #[serde(with = "crate::codec::bytes")]
    pub range_end: Vec<u8>,
    /// Maximum number of keys returned; 0 means no limit.
    pub limit: i64,
    /// Read the store as of this revision; 0 or below means the current revision.
    pub revision: Revision,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    /// Filters on the returned keys; 0 means no filter. They do not change `count`.
    pub min_mod_revision: Revision,
    pub max_mod_revision: Revision,
    pub min_create_revision: Revision,
    pub max_create_revision: Revision,
}

/// The answer to a [`RangeRequest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub header: ResponseHeader,
    pub kvs: Vec<KeyValue>,
    /// True when `limit` cut the (filtered) result short.
    pub more: bool,
    /// Number of keys in the range at the read revision, before filters and limit.
    pub count: i64,
}

// ---------------------------------------------------------------------------------------
// Put / DeleteRange

/// A write of one key, as etcd's `PutRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    #[serde(with = "crate::codec::bytes")]
    pub key: Vec<u8>,
    #[serde(with = "crate::codec::bytes")]
    pub value: Vec<u8>,
    /// Lease to attach the key to; 0 detaches it.
    pub lease: LeaseId,
    /// Return the key's previous version.
    pub prev_kv: bool,
    /// Keep the current value (the key must exist and `value` must be empty).
    pub ignore_value: bool,
    /// Keep the current lease (the key must exist and `lease` must be 0).
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub header: ResponseHeader,
    pub prev_kv: Option<KeyValue>,
}

/// A deletion of a key or range, as etcd's `DeleteRangeRequest` (same key conventions as
/// [`RangeRequest`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    #[serde(with = "crate::codec::bytes")]
    pub key: Vec<u8>,
    #[serde(with = "crate::codec::bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    pub header: ResponseHeader,
    pub deleted: i64,
    /// The deleted keys' last versions, in key order, when `prev_kv` was set.
    pub prev_kvs: Vec<KeyValue>,
}

// ---------------------------------------------------------------------------------------
// Txn

/// How a [`Compare`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

/// What a [`Compare`] looks at, with the operand to compare against.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    CreateRevision(Revision),
    ModRevision(Revision),
    Value(#[serde(with = "crate::codec::bytes")] Vec<u8>),
    Lease(LeaseId),
}

/// One guard of a transaction, as etcd's `Compare`. With a `range_end` every key in the
/// range must satisfy it. A missing key compares as version/revisions/lease 0, and fails
/// every `Value` comparison (as etcd).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "crate::codec::bytes")]
    pub key: Vec<u8>,
    #[serde(with = "crate::codec::bytes")]
    pub range_end: Vec<u8>,
    pub result: CompareResult,
    pub target: CompareTarget,
}

/// One operation of a transaction branch, as etcd's `RequestOp`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

/// The result of one [`RequestOp`], as etcd's `ResponseOp`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

/// A transaction, as etcd's `TxnRequest`: if every compare holds, run `success`, else
/// `failure`. All writes of one transaction share one revision; reads inside it see the
/// writes of earlier operations in it.
///
/// Deserialising counts nesting depth and refuses more than [`crate::TXN_DEPTH_MAX`] levels,
/// so hostile bytes cannot overflow the stack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub header: ResponseHeader,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

// ---------------------------------------------------------------------------------------
// Compaction and leases

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactResponse {
    pub header: ResponseHeader,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrantResponse {
    pub header: ResponseHeader,
    pub id: LeaseId,
    /// The granted TTL (the requested one raised to `KvConfig::lease_ttl_min_secs`).
    pub ttl_secs: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRevokeResponse {
    pub header: ResponseHeader,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseKeepAliveResponse {
    pub header: ResponseHeader,
    pub id: LeaseId,
    /// The TTL the lease was renewed to.
    pub ttl_secs: i64,
}

/// Leases revoked by a `LeaseExpire`/`LeaseExpireIds` command (ids that were already gone
/// are skipped silently: the command may race with a revoke).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseExpireResponse {
    pub header: ResponseHeader,
    pub expired: Vec<LeaseId>,
}

/// Answer of [`crate::KvStore::lease_time_to_live`], as etcd's `LeaseTimeToLiveResponse`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTimeToLive {
    pub header: ResponseHeader,
    pub id: LeaseId,
    /// Remaining seconds, rounded up; 0 once expired but not yet revoked.
    pub ttl_secs: i64,
    pub granted_ttl_secs: i64,
    /// Attached keys in key order (empty unless asked for).
    pub keys: Vec<Vec<u8>>,
}

/// Store status for `etcdctl endpoint status` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStatus {
    pub revision: Revision,
    pub compact_revision: Revision,
    pub applied_index: u64,
    /// Live (not deleted) keys at the current revision.
    pub key_count: u64,
    /// Stored versions across all keys, including history and tombstones.
    pub version_count: u64,
    /// Estimated in-memory size in bytes: payload plus a per-version overhead estimate.
    pub db_size_bytes: u64,
    pub lease_count: u64,
}

/// Answer of [`crate::KvStore::hash_kv`], as etcd's `HashKVResponse`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashKv {
    pub hash: u32,
    /// The revision the hash covers up to.
    pub revision: Revision,
    pub compact_revision: Revision,
}

// ---------------------------------------------------------------------------------------
// Commands and responses

/// A replicated command: what a log entry's `data` decodes into.
///
/// Time enters only through the `now_ms` fields, which the proposing leader fills from its
/// clock; `apply` never reads a clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    /// Drop history below `revision` (reads and watches at `revision` itself stay possible).
    Compact {
        revision: Revision,
    },
    /// Create a lease; `id == 0` lets the store choose an id deterministically from the
    /// log index.
    LeaseGrant {
        id: LeaseId,
        ttl_secs: i64,
        now_ms: u64,
    },
    /// Delete a lease and, in one revision, every key attached to it.
    LeaseRevoke {
        id: LeaseId,
    },
    /// Renew a lease to its full TTL from `now_ms`.
    LeaseKeepAlive {
        id: LeaseId,
        now_ms: u64,
    },
    /// Revoke every lease whose deadline is at or before `now_ms`, at most
    /// `KvConfig::lease_expire_batch_max` of them (lowest deadline first).
    LeaseExpire {
        now_ms: u64,
    },
    /// Revoke the listed leases (the leader found them expired with
    /// [`crate::KvStore::expired_leases`]). Ids that are gone, or whose replicated deadline
    /// is after `now_ms` (a keep-alive was committed first), are skipped: this is what
    /// keeps a keep-alive racing with expiry from losing the lease's keys.
    LeaseExpireIds {
        ids: Vec<LeaseId>,
        now_ms: u64,
    },
    /// Proposed by a new leader: restart every lease's TTL from `now_ms`, as etcd's lessor
    /// does on promotion, so that a leader change (whose clock may differ, and which may
    /// have been away while the old leader renewed) never expires a lease early.
    LeasePromote {
        now_ms: u64,
    },
}

/// What the successful application of a [`Command`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseKeepAlive(LeaseKeepAliveResponse),
    LeaseExpire(LeaseExpireResponse),
    LeasePromote(ResponseHeader),
}

/// What [`crate::KvStore::apply`] returns for one log entry.
///
/// `events` are the changes the command committed, ordered by key within the revision
/// (the order history replay also produces); feed them to
/// [`crate::WatchHub::publish`]. A failed command changes nothing and has no events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub index: u64,
    /// The store's revision after applying.
    pub revision: Revision,
    pub result: Result<ResponseBody, KvError>,
    pub events: Vec<Event>,
}

/// The smallest key greater than every key that starts with `prefix`: the `range_end` for a
/// prefix range. Returns `[0]` (every key) when `prefix` is empty or all `0xff`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
