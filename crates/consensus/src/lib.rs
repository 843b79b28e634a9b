//! Pure ("sans-IO") consensus replicas.
//!
//! This crate has no tokio, no sockets, no files, no clock and no randomness of its own.
//! A replica is driven entirely from outside through the [`Replica`] trait:
//!
//! ```text
//!   loop {
//!       on timer          -> replica.tick()
//!       on peer message   -> replica.step(from, msg)
//!       on client request -> replica.propose(data) / replica.read_index(ctx)
//!       if replica.has_ready() {
//!           let rd = replica.ready();
//!           1. persist: rd.snapshot, then rd.entries (truncating the log from the first
//!              entry's index), then rd.hard_state; fsync if rd.must_sync
//!           0. (optional) send rd.messages[..rd.send_before_persist] at once
//!          0b. (optional) if there is no rd.snapshot: apply the leading non-ConfChange
//!              entries of rd.committed now (they are durable on a quorum already)
//!           2. send rd.messages                 (only after step 1 is durable)
//!           3. apply rd.committed in order; answer rd.read_states once applied >= index
//!           4. replica.advance()
//!       }
//!   }
//! ```
//!
//! Raft ([`raft::Raft`]) and Multi-Paxos ([`paxos::Paxos`]) both implement [`Replica`], so the
//! node runtime and the simulator drive them the same way and a group picks one from config.

use serde::{Deserialize, Serialize};
use std::fmt;

#[cfg(test)]
mod bytes_encoding_tests;
pub mod paxos;
pub mod raft;

/// Identifies a replica. `0` is never a valid node id (it means "none").
pub type NodeId = u64;
/// Identifies a replication group. Group 0 is the metadata group.
pub type GroupId = u64;

/// "No node" (no vote cast, no known leader).
pub const NO_NODE: NodeId = 0;

/// The highest term (Raft) or ballot (Multi-Paxos) a peer message may carry. Terms grow by
/// one per election, so no honest node gets anywhere near it; a message above it is forged
/// or corrupt and is dropped, which also keeps `term + 1` and ballot arithmetic from
/// overflowing.
pub const MAX_TERM: u64 = 1 << 62;
/// The highest log index or slot a peer message may name, for the same reason: no real log
/// grows that long, and staying below it keeps `index + 1` from overflowing.
pub const MAX_INDEX: u64 = 1 << 62;

/// What an entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// An opaque command for the state machine above.
    Normal,
    /// Appended by a new leader (Raft) or to fill a gap (Paxos); applies as nothing.
    Noop,
    /// A membership change; `data` is an encoded [`ConfChange`] (see [`ConfChange::encode`]).
    ConfChange,
}

/// One log entry / one chosen slot.
///
/// `term` is the Raft term, or for Multi-Paxos the ballot under which the value was accepted
/// (each engine documents its encoding). Indices start at 1; index 0 is "before the log".
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub kind: EntryKind,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}:{:?}({}B)",
            self.index,
            self.term,
            self.kind,
            self.data.len()
        )
    }
}

/// State that must be durable before any message that depends on it is sent.
///
/// For Raft: current term, vote in that term, commit index. For Multi-Paxos: `term` is the
/// highest promised ballot, `vote` the node that owns it, `commit` the highest index known
/// chosen. `commit` may be persisted lazily (losing it is safe); `term` and `vote` may not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    pub term: u64,
    pub vote: NodeId,
    pub commit: u64,
}

/// The membership of a group.
///
/// While `voters_outgoing` is non-empty the group is in a joint configuration: every
/// decision (election, commit) needs a majority of `voters` AND of `voters_outgoing`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfState {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub voters_outgoing: Vec<NodeId>,
}

impl ConfState {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        let mut voters: Vec<NodeId> = voters.into_iter().collect();
        voters.sort_unstable();
        voters.dedup();
        ConfState {
            voters,
            learners: Vec::new(),
            voters_outgoing: Vec::new(),
        }
    }

    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Every node that receives the log: voters (both halves) and learners, sorted, unique.
    pub fn all_nodes(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .voters
            .iter()
            .chain(&self.voters_outgoing)
            .chain(&self.learners)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }
}

/// A requested membership change, proposed through the log.
///
/// A change that touches more than one voter enters a joint configuration first and leaves
/// it automatically once the joint entry commits (Raft thesis section 4.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfChange {
    pub changes: Vec<ConfChangeItem>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfChangeItem {
    AddVoter(NodeId),
    AddLearner(NodeId),
    /// Removes a voter or a learner.
    Remove(NodeId),
}

impl ConfChange {
    /// Encoding used in the `data` of a [`EntryKind::ConfChange`] entry.
    ///
    /// Format: `u8 version(=1) | u32 count LE | count * (u8 tag | u64 node LE)`;
    /// tags: 1 = AddVoter, 2 = AddLearner, 3 = Remove. An empty change (count 0) marks
    /// "leave the joint configuration".
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + 9 * self.changes.len());
        out.push(1);
        out.extend_from_slice(&(self.changes.len() as u32).to_le_bytes());
        for c in &self.changes {
            let (tag, id) = match *c {
                ConfChangeItem::AddVoter(id) => (1u8, id),
                ConfChangeItem::AddLearner(id) => (2u8, id),
                ConfChangeItem::Remove(id) => (3u8, id),
            };
            out.push(tag);
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Decodes what [`ConfChange::encode`] wrote. Never panics on bad input.
    pub fn decode(data: &[u8]) -> Result<ConfChange, DecodeError> {
        if data.len() < 5 || data[0] != 1 {
            return Err(DecodeError("conf change: bad header"));
        }
        let count = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let body = &data[5..];
        if body.len()
            != count
                .checked_mul(9)
                .ok_or(DecodeError("conf change: count"))?
        {
            return Err(DecodeError("conf change: length does not match count"));
        }
        let mut changes = Vec::with_capacity(count);
        for chunk in body.chunks_exact(9) {
            let mut id = [0u8; 8];
            id.copy_from_slice(&chunk[1..9]);
            let id = u64::from_le_bytes(id);
            if id == NO_NODE {
                return Err(DecodeError("conf change: node id 0"));
            }
            changes.push(match chunk[0] {
                1 => ConfChangeItem::AddVoter(id),
                2 => ConfChangeItem::AddLearner(id),
                3 => ConfChangeItem::Remove(id),
                _ => return Err(DecodeError("conf change: unknown tag")),
            });
        }
        Ok(ConfChange { changes })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for DecodeError {}

/// Describes a snapshot: it replaces every entry up to and including `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub conf: ConfState,
}

/// A state-machine snapshot plus its metadata. `data` is opaque to the core.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Snapshot({:?}, {}B)", self.meta, self.data.len())
    }
}

/// A linearizable read that is now safe: once the state machine has applied `index`,
/// the read identified by `ctx` may be served from local state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub index: u64,
    pub ctx: Vec<u8>,
}

/// A message for a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing<M> {
    pub to: NodeId,
    pub msg: M,
}

/// Everything the driver must do, in order (see the crate docs).
#[derive(Debug)]
pub struct Ready<M> {
    /// A snapshot received from the leader: persist it and restore the state machine from it
    /// before applying `committed`. Entries up to `snapshot.meta.index` are discarded.
    pub snapshot: Option<Snapshot>,
    /// Entries to make durable. If the first entry's index is at or below the stored last
    /// index, the stored log is first truncated from that index (a conflicting suffix).
    pub entries: Vec<Entry>,
    /// New hard state to make durable, if it changed.
    pub hard_state: Option<HardState>,
    /// True when `entries`, `hard_state` or `snapshot` must be fsynced before `messages`
    /// are sent. False when nothing changed but (at most) the hard state's commit index:
    /// that is written (`set_hard_state`) but needs no fsync of its own; the next sync
    /// covers it, and a replica that loses it learns the commit index again.
    pub must_sync: bool,
    /// Messages to send, only after the above is durable, except for the first
    /// `send_before_persist` of them.
    pub messages: Vec<Outgoing<M>>,
    /// How many of the leading `messages` do not depend on this Ready being durable and may
    /// be sent before (or while) it is persisted: a leader's replication of its own log
    /// (Raft thesis §10.2.1), so followers write the entries in parallel with the leader's
    /// own fsync. The replica counts its own copy toward commit only after `advance`, and
    /// it never puts a message here in a Ready that changes its term or vote. A driver may
    /// ignore this and send everything after persisting.
    pub send_before_persist: usize,
    /// Entries now committed/chosen, to apply in index order. Every one is already durable
    /// on a quorum counting only persisted copies (this replica's own copy only after an
    /// `advance`), so a driver may apply them before persisting this Ready, as long as
    /// there is no `snapshot` to install first; the node runtime does that for the entries
    /// up to the first membership change, whose bookkeeping stays after the persist.
    pub committed: Vec<Entry>,
    /// Reads that are safe once `applied >= index`.
    pub read_states: Vec<ReadState>,
}

impl<M> Default for Ready<M> {
    fn default() -> Self {
        Ready {
            snapshot: None,
            entries: Vec::new(),
            hard_state: None,
            must_sync: false,
            messages: Vec::new(),
            send_before_persist: 0,
            committed: Vec::new(),
            read_states: Vec::new(),
        }
    }
}

impl<M> Ready<M> {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.messages.is_empty()
            && self.committed.is_empty()
            && self.read_states.is_empty()
    }
}

/// Moves the messages `early` accepts to the front of `msgs`, keeping the relative order
/// within both parts, and returns how many there are (for `Ready::send_before_persist`).
pub(crate) fn partition_early<M>(msgs: &mut Vec<Outgoing<M>>, early: impl Fn(&M) -> bool) -> usize {
    let (mut first, rest): (Vec<_>, Vec<_>) = msgs.drain(..).partition(|o| early(&o.msg));
    let n = first.len();
    first.extend(rest);
    *msgs = first;
    n
}

/// What survived on disk, handed to a replica when it restarts.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// The newest durable snapshot, if any. The state machine was restored from it.
    pub snapshot: Option<Snapshot>,
    /// Durable entries after the snapshot, contiguous, in index order.
    pub entries: Vec<Entry>,
    /// The index the state machine has applied up to (at least the snapshot's index).
    /// A replica re-delivers committed entries after this index.
    pub applied: u64,
}

impl Recovered {
    /// Where the log starts: the snapshot's (index, term, configuration), or `(0, 0,
    /// initial)` when there is no snapshot (a new group, or one never compacted).
    pub fn base(&self, initial: ConfState) -> (u64, u64, ConfState) {
        match &self.snapshot {
            Some(s) => (s.meta.index, s.meta.term, s.meta.conf.clone()),
            None => (0, 0, initial),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    Learner,
}

/// A snapshot of a replica's state for status pages, metrics and checkers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub role: Role,
    /// Raft term, or the current ballot for Multi-Paxos.
    pub term: u64,
    pub leader: NodeId,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub conf: ConfState,
}

/// Why a request was refused. Each is a normal outcome, never a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposeError {
    /// This replica is not the leader; `leader` is a hint (`NO_NODE` if unknown).
    NotLeader { leader: NodeId },
    /// A bounded queue is full (uncommitted bytes, pending reads); retry later.
    Busy,
    /// A membership change is already in flight, or the change is invalid.
    ConfChangeRejected(&'static str),
    /// A leadership transfer is in progress; proposals pause until it finishes.
    Transferring,
    /// The payload exceeds `max_entry_bytes`.
    TooLarge { size: usize, max: usize },
}

impl fmt::Display for ProposeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProposeError::NotLeader { leader } => write!(f, "not leader (leader hint: {leader})"),
            ProposeError::Busy => f.write_str("too many requests in flight"),
            ProposeError::ConfChangeRejected(why) => write!(f, "membership change rejected: {why}"),
            ProposeError::Transferring => f.write_str("leadership transfer in progress"),
            ProposeError::TooLarge { size, max } => {
                write!(
                    f,
                    "request of {size} bytes exceeds the limit of {max} bytes"
                )
            }
        }
    }
}
impl std::error::Error for ProposeError {}

/// A bad configuration value, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config `{}`: {}", self.field, self.reason)
    }
}
impl std::error::Error for ConfigError {}

/// How linearizable reads are confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// Confirm leadership with a heartbeat round to a quorum (ReadIndex).
    Safe,
    /// Trust the leader lease (requires `check_quorum`); falls back to `Safe` otherwise.
    Lease,
}

/// Configuration shared by both engines. Validate with [`Config::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub id: NodeId,
    /// Ticks between heartbeats. Must be at least 1.
    pub heartbeat_ticks: u32,
    /// Base election timeout; the effective timeout is randomized in
    /// `[election_ticks, 2 * election_ticks)`. Must exceed `heartbeat_ticks`.
    pub election_ticks: u32,
    /// Seed for the replica's deterministic PRNG (election jitter). The core owns no
    /// randomness: the driver chooses the seed.
    pub seed: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub read_mode: ReadMode,
    /// Most in-flight append messages per follower (the pipeline window).
    pub max_inflight_msgs: usize,
    /// Most entries in one append message.
    pub max_batch_entries: usize,
    /// Most payload bytes in one append message (at least one entry is always sent).
    pub max_batch_bytes: usize,
    /// Largest single proposal payload.
    pub max_entry_bytes: usize,
    /// Most uncommitted payload bytes a leader accepts before refusing with `Busy`.
    pub max_uncommitted_bytes: usize,
    /// Most pending read_index requests before refusing with `Busy`.
    pub max_pending_reads: usize,
    /// Snapshot chunk size for InstallSnapshot.
    pub snapshot_chunk_bytes: usize,
    /// Testing only: plant a known bug by name (see [`Replica::known_bugs`]) so the
    /// simulator can show its checkers catch it. `None` in every real deployment.
    pub inject_bug: Option<String>,
}

impl Config {
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            heartbeat_ticks: 1,
            election_ticks: 10,
            seed: id,
            pre_vote: true,
            check_quorum: true,
            read_mode: ReadMode::Safe,
            max_inflight_msgs: 64,
            max_batch_entries: 256,
            max_batch_bytes: 1 << 20,
            max_entry_bytes: 1536 * 1024,
            max_uncommitted_bytes: 64 << 20,
            max_pending_reads: 4096,
            snapshot_chunk_bytes: 256 * 1024,
            inject_bug: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| Err(ConfigError::new(field, reason));
        if self.id == NO_NODE {
            return bad("id", "must be non-zero");
        }
        if self.heartbeat_ticks == 0 {
            return bad("heartbeat_ticks", "must be at least 1");
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return bad("election_ticks", "must be greater than heartbeat_ticks");
        }
        if self.read_mode == ReadMode::Lease && !self.check_quorum {
            return bad("read_mode", "lease reads require check_quorum = true");
        }
        if self.max_inflight_msgs == 0 {
            return bad("max_inflight_msgs", "must be at least 1");
        }
        if self.max_batch_entries == 0 {
            return bad("max_batch_entries", "must be at least 1");
        }
        if self.max_batch_bytes == 0 {
            return bad("max_batch_bytes", "must be at least 1");
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > self.max_uncommitted_bytes {
            return bad("max_entry_bytes", "must be in 1..=max_uncommitted_bytes");
        }
        if self.max_pending_reads == 0 {
            return bad("max_pending_reads", "must be at least 1");
        }
        if self.snapshot_chunk_bytes == 0 {
            return bad("snapshot_chunk_bytes", "must be at least 1");
        }
        Ok(())
    }

    /// Checks `inject_bug` against the engine's list of known bugs.
    pub fn validate_bug(&self, known: &[&str]) -> Result<(), ConfigError> {
        match &self.inject_bug {
            Some(b) if !known.contains(&b.as_str()) => Err(ConfigError::new(
                "inject_bug",
                format!("unknown bug {b:?}; known: {}", known.join(", ")),
            )),
            _ => Ok(()),
        }
    }
}

/// A small deterministic PRNG (SplitMix64) so a core's jitter is reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Self {
        Prng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`. Panics if `lo >= hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo < hi, "empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }
}

/// The contract every consensus engine implements. See the crate docs for the driving loop.
///
/// Persistence rules (both engines): nothing in `Ready::messages` may leave the node before
/// `Ready::snapshot`, `Ready::entries` and `Ready::hard_state` of the same `Ready` are
/// durable. `committed` entries are only ever entries that are durable on this node.
pub trait Replica {
    /// The engine's peer message type. The runtime encodes it with [`Replica::encode_message`].
    type Message: Clone + fmt::Debug + Send + 'static;

    /// Creates a replica. For a brand-new group `recovered` is default and `initial` lists
    /// the founding members; on restart `recovered` is what storage returned and the
    /// membership comes from the snapshot and the log (`initial` is then ignored if the
    /// recovered state carries a configuration). Fails on an invalid config.
    fn create(
        config: Config,
        initial: ConfState,
        recovered: Recovered,
    ) -> Result<Self, ConfigError>
    where
        Self: Sized;

    /// Names of the bugs this engine can plant via `Config::inject_bug` (for the simulator).
    fn known_bugs() -> &'static [&'static str]
    where
        Self: Sized;

    fn id(&self) -> NodeId;

    /// Advances logical time by one tick (elections, heartbeats, leases are in ticks).
    fn tick(&mut self);

    /// Handles a message from a peer. Stale or malformed messages are ignored, never panic.
    fn step(&mut self, from: NodeId, msg: Self::Message);

    /// Proposes an opaque command. On success it will be committed unless leadership is
    /// lost first; the caller correlates by the payload (e.g. a request id), not by index.
    fn propose(&mut self, data: Vec<u8>) -> Result<(), ProposeError>;

    /// Proposes a membership change. At most one may be in flight.
    fn propose_conf_change(&mut self, change: ConfChange) -> Result<(), ProposeError>;

    /// Requests a linearizable read; a [`ReadState`] with the same `ctx` appears in a later
    /// `Ready` once safe. Lost if leadership is lost (the caller times out and retries).
    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError>;

    /// Asks the leader to hand leadership to `to` (Raft: TimeoutNow). Ignored if not leader.
    fn transfer_leader(&mut self, to: NodeId);

    /// The state machine took a snapshot covering everything up to `index` (which must be
    /// applied). The replica keeps it to send to lagging peers and compacts its log.
    fn compact(&mut self, index: u64, data: Vec<u8>);

    fn has_ready(&self) -> bool;

    /// Takes the pending work. Call [`Replica::advance`] after handling it.
    fn ready(&mut self) -> Ready<Self::Message>;

    /// The last `Ready` was persisted, sent and applied.
    fn advance(&mut self);

    fn status(&self) -> Status;

    /// Leader only: the highest log index known to match the leader's log on `id` (its
    /// replication progress, "match index"); for the leader itself, its own last index.
    /// `None` when this replica is not the leader or `id` is not in its configuration.
    /// The runtime uses it to refuse promoting a learner that has not caught up.
    fn match_index(&self, id: NodeId) -> Option<u64>;

    /// The configuration in force after applying the entry at `index` (at or after the
    /// last compaction point, at or before the commit index): what a snapshot taken at
    /// `index` must record. `status().conf` may already include later, uncommitted
    /// changes (Raft adopts a change when it is appended).
    fn conf_at(&self, index: u64) -> ConfState;

    /// Encodes a message for the wire. Decoding never panics on bad input.
    fn encode_message(msg: &Self::Message) -> Vec<u8>;
    fn decode_message(bytes: &[u8]) -> Result<Self::Message, DecodeError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_change_round_trips_and_rejects_garbage() {
        let cc = ConfChange {
            changes: vec![ConfChangeItem::AddVoter(4), ConfChangeItem::Remove(1)],
        };
        assert_eq!(ConfChange::decode(&cc.encode()).unwrap(), cc);
        assert!(ConfChange::decode(&[]).is_err());
        assert!(ConfChange::decode(&[1, 255, 255, 255, 255]).is_err());
        let mut bad = cc.encode();
        bad[5] = 9;
        assert!(ConfChange::decode(&bad).is_err());
    }

    #[test]
    fn config_validation_names_the_field() {
        let mut c = Config::new(1);
        assert!(c.validate().is_ok());
        c.election_ticks = 1;
        assert_eq!(c.validate().unwrap_err().field, "election_ticks");
        let mut c = Config::new(1);
        c.check_quorum = false;
        c.read_mode = ReadMode::Lease;
        assert_eq!(c.validate().unwrap_err().field, "read_mode");
        assert_eq!(Config::new(0).validate().unwrap_err().field, "id");
    }
}
