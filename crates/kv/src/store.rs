//! The MVCC keyspace: per-key version histories under one global revision.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::TXN_DEPTH_MAX;
use crate::error::KvError;
use crate::types::*;

/// Limits and lease bounds of a store. Every replica of a group must use the same values,
/// because they decide whether a command succeeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvConfig {
    /// Longest key accepted by a put. etcd bounds keys only by its request limit
    /// (1.5 MiB), so the default is the same: nothing etcd accepts is refused here.
    pub key_bytes_max: usize,
    /// Longest value accepted by a put (etcd's default request limit is 1.5 MiB).
    pub value_bytes_max: usize,
    /// Most compares, and most operations per branch, in one transaction (etcd: 128).
    pub txn_ops_max: usize,
    /// Granted TTLs below this are raised to it.
    pub lease_ttl_min_secs: i64,
    /// Grants above this fail (etcd's `MaxLeaseTTL`).
    pub lease_ttl_max_secs: i64,
    /// Most leases one `LeaseExpire` command revokes, and most ids
    /// [`KvStore::expired_leases`] returns.
    pub lease_expire_batch_max: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            key_bytes_max: 3 * 512 * 1024,
            value_bytes_max: 3 * 512 * 1024,
            txn_ops_max: 128,
            lease_ttl_min_secs: 1,
            lease_ttl_max_secs: 9_000_000_000,
            lease_expire_batch_max: 1000,
        }
    }
}

impl KvConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), KvError> {
        let bad = |what: &str| Err(KvError::InvalidConfig(what.to_string()));
        if self.key_bytes_max == 0 {
            return bad("key_bytes_max must be > 0");
        }
        if self.txn_ops_max == 0 {
            return bad("txn_ops_max must be > 0");
        }
        if self.lease_ttl_min_secs < 1 {
            return bad("lease_ttl_min_secs must be >= 1");
        }
        if self.lease_ttl_max_secs < self.lease_ttl_min_secs {
            return bad("lease_ttl_max_secs must be >= lease_ttl_min_secs");
        }
        if self.lease_expire_batch_max == 0 {
            return bad("lease_expire_batch_max must be > 0");
        }
        Ok(())
    }
}

/// Debug builds check every invariant after each apply while the store holds at most
/// this many keys.
pub const INVARIANT_CHECK_KEYS_MAX: usize = 1000;

/// Histories shorter than this grow one slot at a time (see `put_in`).
const HISTORY_EXACT_GROWTH_MAX: usize = 4;

/// Estimated bytes a stored key costs beyond its own bytes (map slot, boxed key header,
/// history vector header, allocator rounding). Used by [`KvStatus::db_size_bytes`].
pub const KEY_OVERHEAD_BYTES: u64 = 112;
/// Estimated bytes one stored version costs beyond its value bytes (history slot, the
/// shared value's two reference counts, allocator rounding).
pub const VERSION_OVERHEAD_BYTES: u64 = 80;

/// One version of a key. A tombstone (`value == None`) records a deletion at `mod_rev` and
/// has `create_rev == 0`, `version == 0`, `lease == 0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Version {
    pub(crate) mod_rev: Revision,
    pub(crate) create_rev: Revision,
    pub(crate) version: i64,
    pub(crate) lease: LeaseId,
    /// Shared, so copying the store for a snapshot (under the state-machine lock, with
    /// applies held back) copies a pointer per version instead of every value.
    #[serde(with = "crate::codec::bytes::option")]
    pub(crate) value: Option<Arc<[u8]>>,
}

impl Version {
    fn is_live(&self) -> bool {
        self.value.is_some()
    }

    fn to_kv(&self, key: &[u8], keys_only: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_rev,
            mod_revision: self.mod_rev,
            version: self.version,
            value: if keys_only {
                Vec::new()
            } else {
                self.value.as_deref().unwrap_or_default().to_vec()
            },
            lease: self.lease,
        }
    }
}

/// Versions of one key in ascending `mod_rev` order; never empty while stored.
pub(crate) type History = Vec<Version>;

/// Index of the version visible at `rev` (the last with `mod_rev <= rev`), if any.
fn visible_at(hist: &History, rev: Revision) -> Option<usize> {
    let n = hist.partition_point(|v| v.mod_rev <= rev);
    n.checked_sub(1)
}

/// The live version visible at `rev`.
fn live_at(hist: &History, rev: Revision) -> Option<&Version> {
    visible_at(hist, rev)
        .map(|i| &hist[i])
        .filter(|v| v.is_live())
}

/// A lease as replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lease {
    pub(crate) id: LeaseId,
    pub(crate) ttl_secs: i64,
    /// Leader-clock milliseconds at or after which the lease is expired.
    pub(crate) deadline_ms: u64,
    /// Attached keys; derived from the keys' latest versions (not snapshotted).
    #[serde(skip)]
    pub(crate) keys: BTreeSet<Box<[u8]>>,
}

/// Map bounds of a key range.
pub(crate) type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// Turns etcd's `key`/`range_end` conventions into map bounds; `None` for an empty range.
pub(crate) fn key_bounds<'a>(key: &'a [u8], range_end: &'a [u8]) -> Option<KeyBounds<'a>> {
    if range_end.is_empty() {
        return Some((Bound::Included(key), Bound::Included(key)));
    }
    if range_end == [0] {
        return Some((Bound::Included(key), Bound::Unbounded));
    }
    if range_end <= key {
        return None;
    }
    Some((Bound::Included(key), Bound::Excluded(range_end)))
}

/// Whether `k` falls in etcd's `key`/`range_end` range.
pub fn key_in_range(k: &[u8], key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return k == key;
    }
    if range_end == [0] {
        return k >= key;
    }
    k >= key && k < range_end
}

/// The MVCC key-value store: a deterministic state machine fed by [`KvStore::apply`].
///
/// Invariants (checked by [`KvStore::check_invariants`] and on restore):
/// every stored history is non-empty and strictly ascending in `mod_rev`, all at or below
/// `revision`; a key's latest version names a lease only if that lease exists and lists the
/// key; `key_count` is the number of keys whose latest version is live.
#[derive(Clone, Debug)]
pub struct KvStore {
    pub(crate) config: KvConfig,
    pub(crate) keys: BTreeMap<Box<[u8]>, History>,
    pub(crate) revision: Revision,
    pub(crate) compact_revision: Revision,
    pub(crate) applied_index: u64,
    pub(crate) leases: BTreeMap<LeaseId, Lease>,
    /// (deadline, id) for every lease: expiry scans are ordered by deadline.
    pub(crate) lease_deadlines: BTreeSet<(u64, LeaseId)>,
    pub(crate) key_count: u64,
    pub(crate) version_count: u64,
    /// Sum of key bytes over stored keys plus value bytes over stored versions.
    pub(crate) payload_bytes: u64,
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore::new()
    }
}

/// One write transaction in progress: every write in it lands at `rev`.
struct WriteCtx {
    rev: Revision,
    events: Vec<Event>,
}

impl KvStore {
    /// An empty store at revision 1 with the default configuration.
    pub fn new() -> KvStore {
        KvStore::with_config(KvConfig::default()).expect("default config is valid")
    }

    /// An empty store at revision 1.
    pub fn with_config(config: KvConfig) -> Result<KvStore, KvError> {
        config.validate()?;
        Ok(KvStore {
            config,
            keys: BTreeMap::new(),
            revision: 1,
            compact_revision: 0,
            applied_index: 0,
            leases: BTreeMap::new(),
            lease_deadlines: BTreeSet::new(),
            key_count: 0,
            version_count: 0,
            payload_bytes: 0,
        })
    }

    pub fn config(&self) -> &KvConfig {
        &self.config
    }

    /// The current revision (1 for an empty store).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The revision history was last compacted to (0 if never).
    pub fn compact_revision(&self) -> Revision {
        self.compact_revision
    }

    /// Index of the last log entry applied (0 if none).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn status(&self) -> KvStatus {
        KvStatus {
            revision: self.revision,
            compact_revision: self.compact_revision,
            applied_index: self.applied_index,
            key_count: self.key_count,
            version_count: self.version_count,
            db_size_bytes: self.payload_bytes
                + self.keys.len() as u64 * KEY_OVERHEAD_BYTES
                + self.version_count * VERSION_OVERHEAD_BYTES,
            lease_count: self.leases.len() as u64,
        }
    }

    /// Records that the entry at `index` carried no KV command (a no-op or membership
    /// change), so `applied_index` stays in step with the log. Returns false, changing
    /// nothing, when `index` was already applied.
    pub fn advance_applied(&mut self, index: u64) -> bool {
        if index <= self.applied_index {
            return false;
        }
        self.applied_index = index;
        true
    }

    /// Applies the committed command at log `index`. Deterministic: it depends only on the
    /// store's state, `index` and `cmd`. A command that fails changes nothing except
    /// `applied_index`; an `index` at or below `applied_index` changes nothing at all and
    /// answers [`KvError::AlreadyApplied`] (replay after restart is harmless).
    pub fn apply(&mut self, index: u64, cmd: Command) -> Response {
        if index <= self.applied_index {
            return Response {
                index,
                revision: self.revision,
                result: Err(KvError::AlreadyApplied {
                    index,
                    applied_index: self.applied_index,
                }),
                events: Vec::new(),
            };
        }
        self.applied_index = index;
        let revision_before = self.revision;
        let mut events = Vec::new();
        let result = self.apply_command(index, cmd, &mut events);
        // Cheap exit checks, kept in release builds: a failed command changed nothing, and
        // every event lies in the revisions this command added, in order.
        assert!(
            result.is_ok() || (events.is_empty() && self.revision == revision_before),
            "failed command changed the store"
        );
        assert!(
            events
                .windows(2)
                .all(|w| (w[0].revision(), &w[0].kv.key) < (w[1].revision(), &w[1].kv.key))
                && events
                    .iter()
                    .all(|e| e.revision() > revision_before && e.revision() <= self.revision),
            "events out of order or outside the command's revisions"
        );
        // The full check is O(keys); in debug builds it runs while the store is small
        // (unit, model and simulator tests) and stays out of the way of large ones.
        if cfg!(debug_assertions) && self.keys.len() <= INVARIANT_CHECK_KEYS_MAX {
            self.check_invariants();
        }
        Response {
            index,
            revision: self.revision,
            result,
            events,
        }
    }

    /// Decodes a committed entry's bytes and applies them. Bytes that do not decode fail
    /// the same way on every replica: the entry counts as applied and the answer is the
    /// [`KvError::Decode`] error.
    pub fn apply_entry(&mut self, index: u64, data: &[u8]) -> Response {
        match Command::decode(data) {
            Ok(cmd) => self.apply(index, cmd),
            Err(e) => {
                let result = if self.advance_applied(index) {
                    Err(e)
                } else {
                    Err(KvError::AlreadyApplied {
                        index,
                        applied_index: self.applied_index,
                    })
                };
                Response {
                    index,
                    revision: self.revision,
                    result,
                    events: Vec::new(),
                }
            }
        }
    }

    fn apply_command(
        &mut self,
        index: u64,
        cmd: Command,
        events: &mut Vec<Event>,
    ) -> Result<ResponseBody, KvError> {
        match cmd {
            Command::Put(req) => {
                self.check_put(&req)?;
                let mut ctx = self.begin();
                let resp = self.put_in(&mut ctx, req);
                self.commit(ctx, events);
                Ok(ResponseBody::Put(PutResponse {
                    header: self.header(),
                    ..resp
                }))
            }
            Command::DeleteRange(req) => {
                check_key(&req.key)?;
                let mut ctx = self.begin();
                let resp = self.delete_in(&mut ctx, &req);
                self.commit(ctx, events);
                Ok(ResponseBody::DeleteRange(DeleteRangeResponse {
                    header: self.header(),
                    ..resp
                }))
            }
            Command::Txn(req) => {
                let resp = self.txn(req, events)?;
                Ok(ResponseBody::Txn(resp))
            }
            Command::Compact { revision } => {
                self.compact(revision)?;
                Ok(ResponseBody::Compact(CompactResponse {
                    header: self.header(),
                }))
            }
            Command::LeaseGrant {
                id,
                ttl_secs,
                now_ms,
            } => self.lease_grant(index, id, ttl_secs, now_ms),
            Command::LeaseRevoke { id } => {
                if !self.leases.contains_key(&id) {
                    return Err(KvError::LeaseNotFound { id });
                }
                self.revoke(id, events);
                Ok(ResponseBody::LeaseRevoke(LeaseRevokeResponse {
                    header: self.header(),
                }))
            }
            Command::LeaseKeepAlive { id, now_ms } => self.lease_keep_alive(id, now_ms),
            Command::LeaseExpire { now_ms } => {
                let ids = self.expired_leases(now_ms);
                Ok(self.expire_ids(&ids, now_ms, events))
            }
            Command::LeaseExpireIds { ids, now_ms } => Ok(self.expire_ids(&ids, now_ms, events)),
            Command::LeasePromote { now_ms } => {
                let ids: Vec<LeaseId> = self.leases.keys().copied().collect();
                for id in ids {
                    let ttl = self.leases[&id].ttl_secs;
                    self.set_deadline(id, deadline_after(now_ms, ttl));
                }
                Ok(ResponseBody::LeasePromote(self.header()))
            }
        }
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            revision: self.revision,
        }
    }

    // -----------------------------------------------------------------------------------
    // Write transactions

    fn begin(&self) -> WriteCtx {
        WriteCtx {
            rev: self.revision + 1,
            events: Vec::new(),
        }
    }

    /// Ends a write transaction: bumps the revision once if anything changed and hands the
    /// events, ordered by key (the order history replay produces), to the caller.
    fn commit(&mut self, mut ctx: WriteCtx, events: &mut Vec<Event>) {
        if ctx.events.is_empty() {
            return;
        }
        assert_eq!(ctx.rev, self.revision + 1, "write txn revision");
        self.revision = ctx.rev;
        ctx.events.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
        events.append(&mut ctx.events);
    }

    /// Checks a put against the current state: what can make it fail.
    fn check_put(&self, req: &PutRequest) -> Result<(), KvError> {
        check_key(&req.key)?;
        if req.key.len() > self.config.key_bytes_max {
            return Err(KvError::KeyTooLarge {
                size: req.key.len(),
                max: self.config.key_bytes_max,
            });
        }
        if req.value.len() > self.config.value_bytes_max {
            return Err(KvError::ValueTooLarge {
                size: req.value.len(),
                max: self.config.value_bytes_max,
            });
        }
        if req.ignore_value && !req.value.is_empty() {
            return Err(KvError::ValueProvided);
        }
        if req.ignore_lease && req.lease != NO_LEASE {
            return Err(KvError::LeaseProvided);
        }
        if req.ignore_value || req.ignore_lease {
            let exists = self
                .keys
                .get(req.key.as_slice())
                .and_then(|h| h.last())
                .is_some_and(Version::is_live);
            if !exists {
                return Err(KvError::KeyNotFound);
            }
        }
        if req.lease != NO_LEASE && !self.leases.contains_key(&req.lease) {
            return Err(KvError::LeaseNotFound { id: req.lease });
        }
        Ok(())
    }

    /// Writes one key at `ctx.rev`. The request was checked by [`Self::check_put`].
    fn put_in(&mut self, ctx: &mut WriteCtx, req: PutRequest) -> PutResponse {
        let rev = ctx.rev;
        let key: Box<[u8]> = req.key.into_boxed_slice();
        // One search of the map (a copy of a short key costs less than a second search of
        // a large map); the copy is dropped unless the key is new.
        let hist = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| Vec::with_capacity(1));
        let is_new_key = hist.is_empty();
        // A key is written at most once per transaction (the duplicate-key check), but if a
        // path slipped through, replacing the version in place keeps the history valid.
        if hist.last().is_some_and(|v| v.mod_rev == rev) {
            let replaced = hist.pop().expect("checked non-empty");
            self.version_count -= 1;
            self.payload_bytes -= replaced.value.as_deref().map_or(0, |v| v.len()) as u64;
            if replaced.is_live() {
                self.key_count -= 1;
            }
            ctx.events.retain(|e| e.kv.key.as_slice() != &*key);
        }
        // What the new version needs from the live previous one; its value is copied only
        // for `ignore_value` and for the event (one copy, shared with the response below).
        let prev = hist.last().filter(|v| v.is_live());
        let (create_rev, version) = match prev {
            Some(p) => (p.create_rev, p.version + 1),
            None => (rev, 1),
        };
        let value: Arc<[u8]> = match (prev, req.ignore_value) {
            (Some(p), true) => p.value.clone().expect("live version has a value"),
            _ => Arc::from(req.value),
        };
        let old_lease = prev.map_or(NO_LEASE, |p| p.lease);
        let lease = match (prev, req.ignore_lease) {
            (Some(p), true) => p.lease,
            _ => req.lease,
        };
        let prev_kv = prev.map(|p| p.to_kv(&key, false));
        let new = Version {
            mod_rev: rev,
            create_rev,
            version,
            lease,
            value: Some(value),
        };
        let new_kv = new.to_kv(&key, false);
        self.payload_bytes += new.value.as_deref().map_or(0, |v| v.len()) as u64;
        if is_new_key {
            self.payload_bytes += key.len() as u64;
        }
        // Most keys hold one or two versions between compactions: grow short histories
        // exactly (an empty Vec's first push would reserve room for four versions, 144
        // wasted bytes per key), longer ones geometrically.
        if hist.len() < HISTORY_EXACT_GROWTH_MAX {
            hist.reserve_exact(1);
        }
        hist.push(new);
        self.version_count += 1;
        if prev_kv.is_none() {
            self.key_count += 1;
        }
        if old_lease != lease {
            self.detach(old_lease, &key);
            if lease != NO_LEASE {
                let l = self
                    .leases
                    .get_mut(&lease)
                    .expect("put checked that its lease exists");
                l.keys.insert(key.clone());
            }
        }
        let resp_prev = if req.prev_kv { prev_kv.clone() } else { None };
        ctx.events.push(Event {
            kind: EventKind::Put,
            kv: new_kv,
            prev_kv,
        });
        PutResponse {
            header: ResponseHeader::default(),
            prev_kv: resp_prev,
        }
    }

    fn detach(&mut self, lease: LeaseId, key: &[u8]) {
        if lease == NO_LEASE {
            return;
        }
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
    }

    /// Deletes every live key in the range at `ctx.rev`.
    fn delete_in(&mut self, ctx: &mut WriteCtx, req: &DeleteRangeRequest) -> DeleteRangeResponse {
        let mut resp = DeleteRangeResponse::default();
        let Some(bounds) = key_bounds(&req.key, &req.range_end) else {
            return resp;
        };
        let rev = ctx.rev;
        let mut detached = Vec::new();
        for (key, hist) in self.keys.range_mut::<[u8], _>(bounds) {
            let Some(last) = hist.last().filter(|v| v.is_live()).cloned() else {
                continue;
            };
            if last.mod_rev == rev {
                // Written earlier in this transaction; the duplicate-key check forbids
                // deleting it too, so leave it rather than stack two versions at one rev.
                continue;
            }
            if hist.len() < HISTORY_EXACT_GROWTH_MAX {
                hist.reserve_exact(1);
            }
            hist.push(Version {
                mod_rev: rev,
                create_rev: 0,
                version: 0,
                lease: NO_LEASE,
                value: None,
            });
            self.version_count += 1;
            self.key_count -= 1;
            if last.lease != NO_LEASE {
                detached.push((last.lease, key.clone()));
            }
            let prev_kv = last.to_kv(key, false);
            ctx.events.push(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.to_vec(),
                    mod_revision: rev,
                    ..KeyValue::default()
                },
                prev_kv: Some(prev_kv.clone()),
            });
            resp.deleted += 1;
            if req.prev_kv {
                resp.prev_kvs.push(prev_kv);
            }
        }
        for (lease, key) in detached {
            self.detach(lease, &key);
        }
        resp
    }

    // -----------------------------------------------------------------------------------
    // Transactions

    fn txn(&mut self, req: TxnRequest, events: &mut Vec<Event>) -> Result<TxnResponse, KvError> {
        self.check_txn_shape(&req, 1)?;
        // Every compare on the taken path is evaluated against the state before the
        // transaction (as etcd does), then the path's operations are checked, then run.
        let mut path = Vec::new();
        self.txn_path(&req, &mut path);
        let mut cursor = 0;
        self.check_txn_ops(&req, &path, &mut cursor)?;
        let mut ctx = self.begin();
        let mut cursor = 0;
        let mut resp = self.run_txn(&mut ctx, req, &path, &mut cursor);
        self.commit(ctx, events);
        set_txn_headers(&mut resp, self.header());
        Ok(resp)
    }

    /// Static checks independent of state: sizes, depth, empty keys, duplicate writes.
    fn check_txn_shape(&self, req: &TxnRequest, depth: usize) -> Result<(), KvError> {
        if depth > TXN_DEPTH_MAX {
            return Err(KvError::TxnTooDeep { max: TXN_DEPTH_MAX });
        }
        let max = self.config.txn_ops_max;
        if req.compare.len() > max || req.success.len() > max || req.failure.len() > max {
            return Err(KvError::TooManyOps { max });
        }
        for c in &req.compare {
            check_key(&c.key)?;
        }
        for branch in [&req.success, &req.failure] {
            for op in branch.iter() {
                match op {
                    RequestOp::Range(r) => check_key(&r.key)?,
                    RequestOp::Put(p) => check_key(&p.key)?,
                    RequestOp::DeleteRange(d) => check_key(&d.key)?,
                    RequestOp::Txn(t) => self.check_txn_shape(t, depth + 1)?,
                }
            }
            let mut puts = BTreeSet::new();
            let mut dels = Vec::new();
            collect_writes(branch, &mut puts, &mut dels)?;
        }
        Ok(())
    }

    /// Evaluates compares along the path the transaction will take, appending one bool per
    /// transaction visited (outer first, nested in execution order).
    fn txn_path(&self, req: &TxnRequest, path: &mut Vec<bool>) {
        let ok = req.compare.iter().all(|c| self.compare_holds(c));
        path.push(ok);
        let branch = if ok { &req.success } else { &req.failure };
        for op in branch {
            if let RequestOp::Txn(t) = op {
                self.txn_path(t, path);
            }
        }
    }

    fn compare_holds(&self, c: &Compare) -> bool {
        let Some(bounds) = key_bounds(&c.key, &c.range_end) else {
            return compare_version(c, None);
        };
        let mut any = false;
        for (_, hist) in self.keys.range::<[u8], _>(bounds) {
            if let Some(v) = hist.last().filter(|v| v.is_live()) {
                any = true;
                if !compare_version(c, Some(v)) {
                    return false;
                }
            }
        }
        any || compare_version(c, None)
    }

    /// Checks the operations on the taken path against the pre-transaction state.
    fn check_txn_ops(
        &self,
        req: &TxnRequest,
        path: &[bool],
        cursor: &mut usize,
    ) -> Result<(), KvError> {
        let ok = path[*cursor];
        *cursor += 1;
        let branch = if ok { &req.success } else { &req.failure };
        for op in branch {
            match op {
                RequestOp::Range(r) => {
                    self.check_read_revision(r.revision)?;
                }
                RequestOp::Put(p) => self.check_put(p)?,
                RequestOp::DeleteRange(_) => {}
                RequestOp::Txn(t) => self.check_txn_ops(t, path, cursor)?,
            }
        }
        Ok(())
    }

    fn run_txn(
        &mut self,
        ctx: &mut WriteCtx,
        req: TxnRequest,
        path: &[bool],
        cursor: &mut usize,
    ) -> TxnResponse {
        let ok = path[*cursor];
        *cursor += 1;
        let branch = if ok { req.success } else { req.failure };
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            let r = match op {
                RequestOp::Range(r) => ResponseOp::Range(
                    self.range_inner(&r, true)
                        .expect("txn range revision was checked"),
                ),
                RequestOp::Put(p) => ResponseOp::Put(self.put_in(ctx, p)),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete_in(ctx, &d)),
                RequestOp::Txn(t) => ResponseOp::Txn(self.run_txn(ctx, t, path, cursor)),
            };
            responses.push(r);
        }
        TxnResponse {
            header: ResponseHeader::default(),
            succeeded: ok,
            responses,
        }
    }

    // -----------------------------------------------------------------------------------
    // Reads

    fn check_read_revision(&self, rev: Revision) -> Result<(), KvError> {
        if rev > self.revision {
            return Err(KvError::FutureRevision {
                current_revision: self.revision,
            });
        }
        if rev > 0 && rev < self.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        Ok(())
    }

    /// Reads a key or range, at the current revision or an older one still in history.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        check_key(&req.key)?;
        self.check_read_revision(req.revision)?;
        self.range_inner(req, false)
    }

    /// The current version of one key, if it exists.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        let hist = self.keys.get(key)?;
        hist.last()
            .filter(|v| v.is_live())
            .map(|v| v.to_kv(key, false))
    }

    /// `in_txn`: a read inside a write transaction at "current" sees the transaction's own
    /// writes, which are already in the histories at `revision + 1`.
    fn range_inner(&self, req: &RangeRequest, in_txn: bool) -> Result<RangeResponse, KvError> {
        let read_rev = if req.revision > 0 {
            req.revision
        } else if in_txn {
            Revision::MAX
        } else {
            self.revision
        };
        let mut resp = RangeResponse::default();
        let Some(bounds) = key_bounds(&req.key, &req.range_end) else {
            return Ok(resp);
        };
        let sort_order = match (req.sort_order, req.sort_target) {
            (SortOrder::None, SortTarget::Key) => SortOrder::None,
            (SortOrder::None, _) => SortOrder::Ascend,
            (o, _) => o,
        };
        let sorted = sort_order != SortOrder::None
            && !(sort_order == SortOrder::Ascend && req.sort_target == SortTarget::Key);
        let limit = if req.limit > 0 {
            Some(req.limit as usize)
        } else {
            None
        };
        let mut count: i64 = 0;
        // Sorted results are chosen on references and only the kept ones are copied out, so
        // "newest 10 of a million keys" does not clone a million values.
        let mut picked: Vec<(&[u8], &Version)> = Vec::new();
        for (key, hist) in self.keys.range::<[u8], _>(bounds) {
            let Some(v) = live_at(hist, read_rev) else {
                continue;
            };
            count += 1;
            if req.count_only {
                continue;
            }
            let passes = (req.min_mod_revision <= 0 || v.mod_rev >= req.min_mod_revision)
                && (req.max_mod_revision <= 0 || v.mod_rev <= req.max_mod_revision)
                && (req.min_create_revision <= 0 || v.create_rev >= req.min_create_revision)
                && (req.max_create_revision <= 0 || v.create_rev <= req.max_create_revision);
            if !passes {
                continue;
            }
            // Without sorting, keys arrive in order, so one past the limit is enough to
            // know there are more; the scan goes on only to count.
            if !sorted && limit.is_some_and(|l| picked.len() >= l) {
                resp.more = true;
                continue;
            }
            picked.push((key, v));
        }
        resp.count = count;
        if sorted {
            let num = |v: &Version| match req.sort_target {
                SortTarget::Version => v.version,
                SortTarget::Create => v.create_rev,
                SortTarget::Mod => v.mod_rev,
                SortTarget::Key | SortTarget::Value => 0,
            };
            // Stable sorts: ties stay in key order.
            match (req.sort_target, sort_order) {
                (SortTarget::Key, SortOrder::Descend) => picked.reverse(),
                (SortTarget::Value, SortOrder::Descend) => {
                    picked.sort_by(|a, b| b.1.value.cmp(&a.1.value))
                }
                (SortTarget::Value, _) => picked.sort_by(|a, b| a.1.value.cmp(&b.1.value)),
                (_, SortOrder::Descend) => picked.sort_by_key(|a| std::cmp::Reverse(num(a.1))),
                _ => picked.sort_by_key(|a| num(a.1)),
            }
            if let Some(l) = limit {
                if picked.len() > l {
                    picked.truncate(l);
                    resp.more = true;
                }
            }
        }
        resp.kvs = picked
            .into_iter()
            .map(|(key, v)| v.to_kv(key, req.keys_only))
            .collect();
        resp.header = self.header();
        Ok(resp)
    }

    // -----------------------------------------------------------------------------------
    // Compaction

    /// Drops history below `revision`: for every key the version visible at `revision` is
    /// kept (a tombstone only if it is exactly at `revision`, so a watch from the compact
    /// revision still sees that deletion), everything older goes.
    fn compact(&mut self, revision: Revision) -> Result<(), KvError> {
        if revision > self.revision {
            return Err(KvError::FutureRevision {
                current_revision: self.revision,
            });
        }
        if revision <= self.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        self.compact_revision = revision;
        let mut dropped_versions = 0u64;
        let mut dropped_bytes = 0u64;
        self.keys.retain(|key, hist| {
            let Some(keep) = visible_at(hist, revision) else {
                return true;
            };
            let drop_keep = !hist[keep].is_live() && hist[keep].mod_rev < revision;
            let cut = if drop_keep { keep + 1 } else { keep };
            for v in hist.drain(..cut) {
                dropped_versions += 1;
                dropped_bytes += v.value.as_deref().map_or(0, |v| v.len()) as u64;
            }
            if hist.is_empty() {
                dropped_bytes += key.len() as u64;
                return false;
            }
            if hist.capacity() > 2 * hist.len() {
                hist.shrink_to_fit();
            }
            true
        });
        self.version_count -= dropped_versions;
        self.payload_bytes -= dropped_bytes;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Leases

    fn lease_grant(
        &mut self,
        index: u64,
        id: LeaseId,
        ttl_secs: i64,
        now_ms: u64,
    ) -> Result<ResponseBody, KvError> {
        if ttl_secs > self.config.lease_ttl_max_secs {
            return Err(KvError::LeaseTtlTooLarge {
                ttl_secs,
                max_secs: self.config.lease_ttl_max_secs,
            });
        }
        let ttl_secs = ttl_secs.max(self.config.lease_ttl_min_secs);
        let id = if id == NO_LEASE {
            self.choose_lease_id(index)
        } else if self.leases.contains_key(&id) {
            return Err(KvError::LeaseExists { id });
        } else {
            id
        };
        let deadline_ms = deadline_after(now_ms, ttl_secs);
        self.leases.insert(
            id,
            Lease {
                id,
                ttl_secs,
                deadline_ms,
                keys: BTreeSet::new(),
            },
        );
        self.lease_deadlines.insert((deadline_ms, id));
        Ok(ResponseBody::LeaseGrant(LeaseGrantResponse {
            header: self.header(),
            id,
            ttl_secs,
        }))
    }

    /// A positive id derived from the log index (same on every replica), stepping past ids
    /// in use. The mix spreads ids so they do not look sequential, like etcd's.
    fn choose_lease_id(&self, index: u64) -> LeaseId {
        let mut x = index;
        loop {
            x = splitmix64(x);
            let id = (x >> 1) as i64;
            if id != NO_LEASE && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    fn set_deadline(&mut self, id: LeaseId, deadline_ms: u64) {
        let lease = self.leases.get_mut(&id).expect("lease exists");
        let removed = self.lease_deadlines.remove(&(lease.deadline_ms, id));
        assert!(removed, "lease deadline index out of step");
        lease.deadline_ms = deadline_ms;
        self.lease_deadlines.insert((deadline_ms, id));
    }

    fn lease_keep_alive(&mut self, id: LeaseId, now_ms: u64) -> Result<ResponseBody, KvError> {
        let Some(lease) = self.leases.get(&id) else {
            return Err(KvError::LeaseNotFound { id });
        };
        // An expired lease is as good as gone (its revoke is on the way), as in etcd.
        if lease.deadline_ms <= now_ms {
            return Err(KvError::LeaseNotFound { id });
        }
        let ttl_secs = lease.ttl_secs;
        self.set_deadline(id, deadline_after(now_ms, ttl_secs));
        Ok(ResponseBody::LeaseKeepAlive(LeaseKeepAliveResponse {
            header: self.header(),
            id,
            ttl_secs,
        }))
    }

    /// Removes a lease and deletes its keys in one revision (none if it had no keys).
    fn revoke(&mut self, id: LeaseId, events: &mut Vec<Event>) {
        let lease = self.leases.remove(&id).expect("revoke of existing lease");
        let removed = self.lease_deadlines.remove(&(lease.deadline_ms, id));
        assert!(removed, "lease deadline index out of step");
        let mut ctx = self.begin();
        for key in &lease.keys {
            let req = DeleteRangeRequest {
                key: key.to_vec(),
                range_end: Vec::new(),
                prev_kv: false,
            };
            let resp = self.delete_in(&mut ctx, &req);
            assert_eq!(resp.deleted, 1, "lease listed a key that is not live");
        }
        self.commit(ctx, events);
    }

    fn expire_ids(
        &mut self,
        ids: &[LeaseId],
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> ResponseBody {
        let mut expired = Vec::new();
        for &id in ids {
            let due = self
                .leases
                .get(&id)
                .is_some_and(|l| l.deadline_ms <= now_ms);
            if due {
                self.revoke(id, events);
                expired.push(id);
            }
        }
        ResponseBody::LeaseExpire(LeaseExpireResponse {
            header: self.header(),
            expired,
        })
    }

    /// Leases whose deadline is at or before `now_ms`, earliest first, at most
    /// `KvConfig::lease_expire_batch_max`. The leader proposes them as `LeaseExpireIds`.
    pub fn expired_leases(&self, now_ms: u64) -> Vec<LeaseId> {
        self.lease_deadlines
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ms)
            .take(self.config.lease_expire_batch_max)
            .map(|&(_, id)| id)
            .collect()
    }

    /// The earliest lease deadline, so the leader knows when to look again.
    pub fn next_lease_deadline_ms(&self) -> Option<u64> {
        self.lease_deadlines.first().map(|&(d, _)| d)
    }

    /// Remaining TTL of a lease as seen at `now_ms`, with its keys if `keys` is set.
    pub fn lease_time_to_live(
        &self,
        id: LeaseId,
        now_ms: u64,
        keys: bool,
    ) -> Result<LeaseTimeToLive, KvError> {
        let lease = self.leases.get(&id).ok_or(KvError::LeaseNotFound { id })?;
        let remaining_ms = lease.deadline_ms.saturating_sub(now_ms);
        Ok(LeaseTimeToLive {
            header: self.header(),
            id,
            ttl_secs: remaining_ms.div_ceil(1000) as i64,
            granted_ttl_secs: lease.ttl_secs,
            keys: if keys {
                lease.keys.iter().map(|k| k.to_vec()).collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Every lease id, ascending.
    pub fn lease_list(&self) -> Vec<LeaseId> {
        self.leases.keys().copied().collect()
    }

    // -----------------------------------------------------------------------------------
    // History for watches

    /// Events on keys in `key`/`range_end` with revision `>= start_revision`, oldest first
    /// (by revision, then key), at most `limit`. `prev_kv` is filled when the previous
    /// version is still in history. Errors with `Compacted` when `start_revision` is below
    /// the compact revision (events there may be gone).
    pub fn events_since(
        &self,
        key: &[u8],
        range_end: &[u8],
        start_revision: Revision,
        limit: usize,
    ) -> Result<Vec<Event>, KvError> {
        self.events_from(key, range_end, start_revision.max(1), &[], limit)
    }

    /// Like [`Self::events_since`], but starting at position `(revision, from_key)`:
    /// events at `revision` on keys below `from_key` are skipped (a watcher's cursor when a
    /// revision's events were split between deliveries). An empty `from_key` skips none.
    pub fn events_from(
        &self,
        key: &[u8],
        range_end: &[u8],
        revision: Revision,
        from_key: &[u8],
        limit: usize,
    ) -> Result<Vec<Event>, KvError> {
        if revision < self.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        let Some(bounds) = key_bounds(key, range_end) else {
            return Ok(Vec::new());
        };
        // Nothing after the head yet: spare a new watcher a scan of its whole range.
        if limit == 0 || revision > self.revision {
            return Ok(Vec::new());
        }
        // Keep the `limit` smallest (revision, key) positions: a max-heap whose top is the
        // worst candidate so far.
        let mut heap: BinaryHeap<(Revision, &[u8], usize)> = BinaryHeap::new();
        for (k, hist) in self.keys.range::<[u8], _>(bounds) {
            let start = hist.partition_point(|v| v.mod_rev < revision);
            for (i, v) in hist.iter().enumerate().skip(start) {
                if v.mod_rev == revision && &**k < from_key {
                    continue;
                }
                let cand = (v.mod_rev, &**k, i);
                if heap.len() < limit {
                    heap.push(cand);
                } else if heap.peek().is_some_and(|top| cand < *top) {
                    heap.pop();
                    heap.push(cand);
                } else {
                    // Later versions of this key are at higher revisions: no better.
                    break;
                }
            }
        }
        let mut picked = heap.into_vec();
        picked.sort();
        let events = picked
            .into_iter()
            .map(|(_, k, i)| {
                let hist = self.keys.get(k).expect("key seen above");
                history_event(k, hist, i)
            })
            .collect();
        Ok(events)
    }

    // -----------------------------------------------------------------------------------
    // Consistency checking between replicas

    /// A checksum of the keyspace history up to `revision` (0 = current), as etcd's
    /// `Maintenance.HashKV`: replicas that applied the same log agree on it (the value is
    /// not etcd's, only comparable between Concord members). Covers every stored version
    /// with `mod_rev <= revision`: key, revisions, version, lease, value or tombstone.
    pub fn hash_kv(&self, revision: Revision) -> Result<HashKv, KvError> {
        self.check_read_revision(revision)?;
        let rev = if revision > 0 {
            revision
        } else {
            self.revision
        };
        let mut crc = 0u32;
        for (key, hist) in &self.keys {
            for v in hist.iter().take_while(|v| v.mod_rev <= rev) {
                crc = crc32c::crc32c_append(crc, &(key.len() as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, key);
                for n in [v.mod_rev, v.create_rev, v.version, v.lease] {
                    crc = crc32c::crc32c_append(crc, &n.to_le_bytes());
                }
                match &v.value {
                    Some(val) => {
                        crc = crc32c::crc32c_append(crc, &[1]);
                        crc = crc32c::crc32c_append(crc, &(val.len() as u64).to_le_bytes());
                        crc = crc32c::crc32c_append(crc, val);
                    }
                    None => crc = crc32c::crc32c_append(crc, &[0]),
                }
            }
        }
        Ok(HashKv {
            hash: crc,
            revision: rev,
            compact_revision: self.compact_revision,
        })
    }

    // -----------------------------------------------------------------------------------
    // Invariants

    /// Asserts the store's invariants (see the type's doc). O(keys); run after every apply
    /// in debug builds and on restore.
    pub fn check_invariants(&self) {
        if let Err(e) = self.verify() {
            panic!("kv store invariant broken: {e}");
        }
    }

    /// The invariant check as a result, used on restore to reject corrupt snapshots.
    pub(crate) fn verify(&self) -> Result<(), String> {
        let mut key_count = 0u64;
        let mut version_count = 0u64;
        let mut payload = 0u64;
        let mut lease_keys: BTreeMap<LeaseId, BTreeSet<&[u8]>> = BTreeMap::new();
        if self.revision < 1 {
            return Err(format!("revision {} < 1", self.revision));
        }
        if self.compact_revision < 0 || self.compact_revision > self.revision {
            return Err(format!(
                "compact revision {} outside 0..={}",
                self.compact_revision, self.revision
            ));
        }
        for (key, hist) in &self.keys {
            if key.is_empty() {
                return Err("empty key stored".into());
            }
            if hist.is_empty() {
                return Err(format!("key {key:?} has no versions"));
            }
            payload += key.len() as u64;
            let mut prev_rev = 0;
            for v in hist {
                if v.mod_rev <= prev_rev || v.mod_rev > self.revision {
                    return Err(format!(
                        "key {key:?}: version at rev {} out of order",
                        v.mod_rev
                    ));
                }
                prev_rev = v.mod_rev;
                match &v.value {
                    None => {
                        if v.create_rev != 0 || v.version != 0 || v.lease != NO_LEASE {
                            return Err(format!("key {key:?}: tombstone with fields set"));
                        }
                    }
                    Some(val) => {
                        if v.create_rev < 1 || v.create_rev > v.mod_rev || v.version < 1 {
                            return Err(format!("key {key:?}: bad create/version"));
                        }
                        payload += val.len() as u64;
                    }
                }
                version_count += 1;
            }
            let last = hist.last().expect("non-empty");
            if last.is_live() {
                key_count += 1;
                if last.lease != NO_LEASE {
                    lease_keys.entry(last.lease).or_default().insert(key);
                }
            }
        }
        if key_count != self.key_count
            || version_count != self.version_count
            || payload != self.payload_bytes
        {
            return Err(format!(
                "counters out of step: keys {key_count}/{} versions {version_count}/{} bytes {payload}/{}",
                self.key_count, self.version_count, self.payload_bytes
            ));
        }
        if self.lease_deadlines.len() != self.leases.len() {
            return Err("lease deadline index size differs".into());
        }
        for (id, lease) in &self.leases {
            if *id == NO_LEASE || lease.id != *id {
                return Err(format!("lease {id} stored under wrong id"));
            }
            if !self.lease_deadlines.contains(&(lease.deadline_ms, *id)) {
                return Err(format!("lease {id} missing from deadline index"));
            }
            let want = lease_keys.remove(id).unwrap_or_default();
            if lease.keys.len() != want.len() || lease.keys.iter().any(|k| !want.contains(&**k)) {
                return Err(format!("lease {id} key set differs from the keys"));
            }
        }
        if let Some((id, _)) = lease_keys.into_iter().next() {
            return Err(format!("keys attached to missing lease {id}"));
        }
        Ok(())
    }
}

/// The event that version `i` of `key`'s history records.
fn history_event(key: &[u8], hist: &History, i: usize) -> Event {
    let v = &hist[i];
    let prev_kv = i
        .checked_sub(1)
        .map(|p| &hist[p])
        .filter(|p| p.is_live())
        .map(|p| p.to_kv(key, false));
    if v.is_live() {
        Event {
            kind: EventKind::Put,
            kv: v.to_kv(key, false),
            prev_kv,
        }
    } else {
        Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_vec(),
                mod_revision: v.mod_rev,
                ..KeyValue::default()
            },
            prev_kv,
        }
    }
}

fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

/// Collects the keys a branch writes, failing on a key put twice or put inside a deleted
/// range, looking into nested transactions (either of whose branches may run).
fn collect_writes(
    ops: &[RequestOp],
    puts: &mut BTreeSet<Vec<u8>>,
    dels: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> Result<(), KvError> {
    for op in ops {
        match op {
            RequestOp::Put(p) => {
                if !puts.insert(p.key.clone()) {
                    return Err(KvError::DuplicateKey);
                }
            }
            RequestOp::DeleteRange(d) => dels.push((d.key.clone(), d.range_end.clone())),
            RequestOp::Range(_) => {}
            RequestOp::Txn(t) => {
                // Each nested branch is checked on its own, then its writes join ours: the
                // two nested branches are alternatives, but either conflicts with us.
                let mut union_puts = BTreeSet::new();
                let mut union_dels = Vec::new();
                for branch in [&t.success, &t.failure] {
                    let mut bp = BTreeSet::new();
                    let mut bd = Vec::new();
                    collect_writes(branch, &mut bp, &mut bd)?;
                    union_puts.extend(bp);
                    union_dels.extend(bd);
                }
                for k in union_puts {
                    if !puts.insert(k) {
                        return Err(KvError::DuplicateKey);
                    }
                }
                dels.extend(union_dels);
            }
        }
    }
    for k in puts.iter() {
        if dels.iter().any(|(dk, de)| key_in_range(k, dk, de)) {
            return Err(KvError::DuplicateKey);
        }
    }
    Ok(())
}

fn compare_version(c: &Compare, v: Option<&Version>) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match (&c.target, v) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(want), Some(v)) => {
            v.value.as_deref().unwrap_or_default().cmp(want.as_slice())
        }
        (CompareTarget::Version(want), v) => v.map_or(0, |v| v.version).cmp(want),
        (CompareTarget::CreateRevision(want), v) => v.map_or(0, |v| v.create_rev).cmp(want),
        (CompareTarget::ModRevision(want), v) => v.map_or(0, |v| v.mod_rev).cmp(want),
        (CompareTarget::Lease(want), v) => v.map_or(NO_LEASE, |v| v.lease).cmp(want),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::Greater => ord == Ordering::Greater,
    }
}

fn set_txn_headers(resp: &mut TxnResponse, header: ResponseHeader) {
    resp.header = header;
    for r in &mut resp.responses {
        match r {
            ResponseOp::Range(x) => x.header = header,
            ResponseOp::Put(x) => x.header = header,
            ResponseOp::DeleteRange(x) => x.header = header,
            ResponseOp::Txn(x) => set_txn_headers(x, header),
        }
    }
}

fn deadline_after(now_ms: u64, ttl_secs: i64) -> u64 {
    now_ms.saturating_add((ttl_secs.max(0) as u64).saturating_mul(1000))
}

/// SplitMix64: a fixed bijective mixer, so lease ids depend only on the log index.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
