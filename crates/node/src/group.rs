//! The group driver: one task per replication group, driving a [`Replica`] generically.
//!
//! Each round of the loop waits for one input (a tick, a peer frame, a client request),
//! then drains whatever else is already queued (bounded by `drain_per_round_max`) before
//! taking one `Ready`, so a single fsync covers every proposal that arrived meanwhile
//! (group commit). A `Ready` is handled strictly in the contract's order:
//!
//! 0. send the messages the replica marks as not depending on this `Ready`
//!    (`send_before_persist`: a leader's appends), so followers write in parallel;
//!    then, unless the `Ready` carries a snapshot or a serialization holds applies back,
//!    apply the committed entries before the first membership change and answer their
//!    clients (they are durable on a quorum already; docs/consensus.md, rule 3);
//! 1. persist the snapshot, entries and hard state, then `sync` when `must_sync`;
//! 2. send the messages (only now may anything that depends on them leave the node);
//! 3. apply the other committed entries, answer the clients waiting on them, release reads whose
//!    index is now applied;
//! 4. `advance`.
//!
//! The driver runs on its own OS thread with a current-thread tokio runtime because
//! `sync` blocks on fsync: blocking there must not stall the network tasks, and a group
//! has nothing useful to do while its log is being made durable anyway.
//!
//! Requests to a follower work: proposals are forwarded to the leader in a `Forward` frame
//! and answered locally when the entry is applied here (see `envelope`); reads ask the
//! leader for a read index and then wait until this node has applied it.

use crate::config::{Limits, NodeConfig};
use crate::envelope::{self, EnvelopeKind, NackCode};
use crate::metrics::GroupMetrics;
use crate::transport::{Frame, FrameKind, Transport};
use bytes::Bytes;
use concord_consensus::{
    ConfChange, ConfChangeItem, ConfState, Config as ReplicaConfig, Entry, EntryKind, GroupId,
    NodeId, Outgoing, ProposeError, Ready, Replica, Role, Snapshot, SnapshotMeta, Status, NO_NODE,
};
use concord_storage::{LogStore, SnapshotWriter, WrittenSnapshot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// A deterministic state machine replicated by a group.
pub trait StateMachine: Send + 'static {
    type Response: Send + 'static;
    /// Applies a committed command. Must be deterministic: every replica calls it with the
    /// same bytes in the same order. Bad bytes yield an error response, never a panic.
    fn apply(&mut self, index: u64, cmd: &[u8]) -> Self::Response;
    /// Records that `index` was applied without a command for this machine (no-ops,
    /// membership changes), so its applied index stays exact.
    fn skip(&mut self, index: u64);
    fn snapshot(&self) -> Vec<u8>;
    /// The state now, to serialize later without the state machine's lock: a closure that
    /// returns what `snapshot()` returns now. The snapshot thread calls this under the lock
    /// (applies are held back meanwhile) and the closure after releasing it. The default
    /// serializes at once; a machine that copies faster than it serializes returns a copy.
    fn snapshot_later(&self) -> Box<dyn FnOnce() -> Vec<u8> + Send> {
        let data = self.snapshot();
        Box::new(move || data)
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
    /// Called by the leader before a command enters the log: may return a rewritten
    /// command (e.g. stamped with the leader's clock). `None` keeps it as is.
    fn prepare(_cmd: &[u8]) -> Option<Vec<u8>>
    where
        Self: Sized,
    {
        None
    }
}

/// Rewrites an envelope's command with [`StateMachine::prepare`], keeping its header.
fn prepare_payload<SM: StateMachine>(payload: &[u8]) -> Option<Vec<u8>> {
    let env = envelope::decode(payload).ok()?;
    if env.kind != EnvelopeKind::Command {
        return None;
    }
    let body = SM::prepare(env.body)?;
    Some(envelope::encode(
        env.kind,
        env.origin,
        env.incarnation,
        env.seq,
        &body,
    ))
}

/// Whether a `Member` entry's body is its sender describing itself (the only member entry
/// a follower may forward; adds are proposed by the leader).
fn is_self_publish(body: &[u8], from: NodeId) -> bool {
    serde_json::from_slice::<MemberInfo>(body).is_ok_and(|m| m.id == from)
}

/// Why a request failed. Each is a normal outcome. Serialisable because a leader sends
/// the outcome of a forwarded membership change back to the member that forwarded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeError {
    /// No leader is known right now (an election is in progress).
    NoLeader,
    /// A bounded queue is full.
    TooManyRequests,
    /// Not answered within `request_timeout_ms`; the request may or may not have applied.
    Timeout,
    TooLarge {
        size: usize,
        max: usize,
    },
    /// The node is shutting down.
    Stopped,
    /// The leader the request went through lost its leadership before the request was
    /// known to be applied. The request may still commit under the next leader: its
    /// outcome is unknown, as with a timeout, but the client learns it at once.
    LeaderChanged,
    /// A membership change names a member that does not exist.
    MemberNotFound,
    /// Only a learner can be promoted.
    MemberNotLearner,
    /// The learner's log is too far behind the leader's to promote it safely.
    LearnerNotReady,
    /// Another member already uses that peer address.
    PeerUrlExists,
    /// Refused for a reason given (e.g. an invalid membership change).
    Rejected(String),
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::NoLeader => f.write_str("no leader"),
            NodeError::TooManyRequests => f.write_str("too many requests"),
            NodeError::Timeout => f.write_str("request timed out"),
            NodeError::TooLarge { size, max } => {
                write!(
                    f,
                    "request of {size} bytes exceeds the limit of {max} bytes"
                )
            }
            NodeError::Stopped => f.write_str("node is stopping"),
            NodeError::LeaderChanged => f.write_str("leader changed"),
            NodeError::MemberNotFound => f.write_str("member not found"),
            NodeError::MemberNotLearner => f.write_str("can only promote a learner member"),
            NodeError::LearnerNotReady => {
                f.write_str("can only promote a learner member which is in sync with leader")
            }
            NodeError::PeerUrlExists => f.write_str("peer address already in use"),
            NodeError::Rejected(why) => write!(f, "rejected: {why}"),
        }
    }
}
impl std::error::Error for NodeError {}

/// A member's name and addresses (consensus knows only ids).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub name: String,
    pub peer_addr: String,
    pub client_addr: String,
}

/// A membership change as a client asks for it. Any member accepts one; a follower
/// forwards it to the leader, which checks it against the configuration and the
/// replication progress it alone knows, picks the new member's id, and proposes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberOp {
    /// Adds a member reachable at `peer_addr` (`host:port`), as a learner if asked.
    Add { peer_addr: String, learner: bool },
    /// Removes a voter or a learner.
    Remove { id: NodeId },
    /// Makes a learner a voter, once its log is close enough to the leader's.
    Promote { id: NodeId },
}

/// A learner may be promoted once its match index is at least this share (in percent) of
/// the leader's own: etcd's rule (90%). A voter that must first copy a long log would
/// leave the group one vote short of a healthy majority meanwhile.
pub const PROMOTE_READY_PERCENT: u64 = 90;

/// Whether a learner whose log matches the leader's up to `learner_match` is close enough
/// to the leader's `leader_match` to become a voter.
pub fn learner_ready(learner_match: u64, leader_match: u64) -> bool {
    u128::from(learner_match) * 100 >= u128::from(leader_match) * u128::from(PROMOTE_READY_PERCENT)
}

/// What `/status`, `/health` and the API's status calls show. Refreshed every round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupStatus {
    pub group: GroupId,
    pub id: NodeId,
    pub role: String,
    pub term: u64,
    pub leader: NodeId,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub snapshot_index: u64,
    pub pending_proposals: usize,
    pub pending_reads: usize,
    /// Milliseconds since the last round that found a leader and was applying (for /health).
    pub ms_since_progress: u64,
    pub stopped: bool,
}

pub(crate) enum Request<T> {
    Propose {
        cmd: Vec<u8>,
        reply: oneshot::Sender<Result<T, NodeError>>,
    },
    Read {
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    Member {
        op: MemberOp,
        reply: oneshot::Sender<Result<NodeId, NodeError>>,
    },
    TransferLeader {
        to: NodeId,
    },
}

/// A cheap, cloneable handle to a running group.
pub struct GroupHandle<SM: StateMachine> {
    pub group: GroupId,
    tx: mpsc::Sender<Request<SM::Response>>,
    /// The state machine; lock it to read local state after a read barrier.
    pub sm: Arc<Mutex<SM>>,
    pub status: Arc<Mutex<GroupStatus>>,
    pub members: Arc<Mutex<BTreeMap<NodeId, MemberInfo>>>,
    pub metrics: Arc<GroupMetrics>,
    max_request_bytes: usize,
}

impl<SM: StateMachine> Clone for GroupHandle<SM> {
    fn clone(&self) -> Self {
        GroupHandle {
            group: self.group,
            tx: self.tx.clone(),
            sm: self.sm.clone(),
            status: self.status.clone(),
            members: self.members.clone(),
            metrics: self.metrics.clone(),
            max_request_bytes: self.max_request_bytes,
        }
    }
}

impl<SM: StateMachine> GroupHandle<SM> {
    fn enqueue(&self, r: Request<SM::Response>) -> Result<(), NodeError> {
        self.tx.try_send(r).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NodeError::TooManyRequests,
            mpsc::error::TrySendError::Closed(_) => NodeError::Stopped,
        })
    }

    /// Proposes a command and waits until it is applied on this node; returns the state
    /// machine's response.
    pub async fn propose(&self, cmd: Vec<u8>) -> Result<SM::Response, NodeError> {
        let start = Instant::now();
        self.metrics.proposals_total.fetch_add(1, Ordering::Relaxed);
        let res = self.propose_inner(cmd).await;
        match &res {
            Ok(_) => self.metrics.write_latency.observe(start.elapsed()),
            Err(_) => {
                self.metrics
                    .proposals_failed_total
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        res
    }

    async fn propose_inner(&self, cmd: Vec<u8>) -> Result<SM::Response, NodeError> {
        if cmd.len() > self.max_request_bytes {
            return Err(NodeError::TooLarge {
                size: cmd.len(),
                max: self.max_request_bytes,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.enqueue(Request::Propose { cmd, reply })?;
        rx.await.unwrap_or(Err(NodeError::Stopped))
    }

    /// A linearizable read barrier: returns once this node's state machine reflects every
    /// write acknowledged before the call (the returned value is the read index).
    pub async fn read_barrier(&self) -> Result<u64, NodeError> {
        let start = Instant::now();
        self.metrics.reads_total.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let res = match self.enqueue(Request::Read { reply }) {
            Ok(()) => rx.await.unwrap_or(Err(NodeError::Stopped)),
            Err(e) => Err(e),
        };
        match &res {
            Ok(_) => self.metrics.read_latency.observe(start.elapsed()),
            Err(_) => {
                self.metrics
                    .reads_failed_total
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        res
    }

    /// Asks for a membership change, through the leader wherever it is, and waits until
    /// the change is applied on this node. Returns the id of the member it concerns (the
    /// new id for an add). On success this node's member table and status already show it.
    pub async fn member_change(&self, op: MemberOp) -> Result<NodeId, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Request::Member { op, reply })?;
        rx.await.unwrap_or(Err(NodeError::Stopped))
    }

    pub fn transfer_leader(&self, to: NodeId) -> Result<(), NodeError> {
        self.enqueue(Request::TransferLeader { to })
    }

    pub fn status(&self) -> GroupStatus {
        self.status.lock().expect("status lock").clone()
    }
}

/// Everything a group needs at start.
pub struct GroupParams<SM: StateMachine> {
    pub group: GroupId,
    pub config: NodeConfig,
    pub store: Box<dyn LogStore + Send>,
    pub sm: SM,
    pub transport: Arc<Transport>,
    pub members: BTreeMap<NodeId, MemberInfo>,
    pub shutdown: watch::Receiver<bool>,
}

/// Starts a group driver on its own thread. Fails (before spawning) if the stored state
/// cannot be recovered or the replica refuses its config.
pub fn spawn_group<R, SM>(
    p: GroupParams<SM>,
) -> Result<(GroupHandle<SM>, std::thread::JoinHandle<()>), String>
where
    R: Replica + Send + 'static,
    SM: StateMachine,
{
    let GroupParams {
        group,
        config,
        mut store,
        mut sm,
        transport,
        mut members,
        shutdown,
    } = p;
    let recovered = store
        .recover()
        .map_err(|e| format!("group {group}: recovering storage: {e}"))?;
    // What this node says about itself (name, client address), published through the log
    // until every member's table shows it (see `Driver::publish_self`).
    let own_info = members.get(&config.id).cloned();
    let mut snapshot_index = 0;
    if let Some(snap) = &recovered.snapshot {
        let (m, data) = unwrap_snapshot(&snap.data)
            .map_err(|e| format!("group {group}: snapshot at index {}: {e}", snap.meta.index))?;
        sm.restore(data)
            .map_err(|e| format!("group {group}: restoring snapshot {}: {e}", snap.meta.index))?;
        if !m.is_empty() {
            members = m;
        }
        snapshot_index = snap.meta.index;
    }
    let applied = recovered.applied;
    let applied_term = recovered
        .snapshot
        .as_ref()
        .map(|s| s.meta.term)
        .unwrap_or(0);
    let mut rc = ReplicaConfig::new(config.id);
    rc.heartbeat_ticks = config.heartbeat_ticks;
    rc.election_ticks = config.election_ticks;
    rc.seed = config.id ^ now_nanos();
    rc.max_entry_bytes = config.limits.max_request_bytes + envelope::ENVELOPE_HEADER_LEN;
    rc.max_pending_reads = config.limits.pending_reads_max;
    let initial = ConfState::new(config.peers.keys().copied());
    let replica = R::create(rc, initial, recovered).map_err(|e| format!("group {group}: {e}"))?;
    for (id, m) in &members {
        if let Ok(a) = crate::config::parse_addr("peer", &m.peer_addr) {
            transport.add_peer(*id, a);
        }
    }

    let (in_tx, in_rx) = mpsc::channel(config.limits.inbound_queue_max);
    transport.register_group(group, in_tx);
    let (req_tx, req_rx) = mpsc::channel(config.limits.request_queue_max);
    let sm = Arc::new(Mutex::new(sm));
    let status = Arc::new(Mutex::new(GroupStatus {
        group,
        id: config.id,
        ..GroupStatus::default()
    }));
    // This node's position among the members, for spreading the group's snapshots.
    let rank = members.keys().position(|&m| m == config.id).unwrap_or(0);
    let members = Arc::new(Mutex::new(members));
    let metrics = Arc::new(GroupMetrics::default());
    let handle = GroupHandle {
        group,
        tx: req_tx,
        sm: sm.clone(),
        status: status.clone(),
        members: members.clone(),
        metrics: metrics.clone(),
        max_request_bytes: config.limits.max_request_bytes,
    };
    let (snap_writer, snap_done, snap_thread) = match store.snapshot_writer() {
        Some(w) => {
            let (tx, done, thread) = spawn_snapshot_writer(w, group, config.id)?;
            (Some(tx), Some(done), Some(thread))
        }
        None => (None, None, None),
    };
    let driver = Driver {
        id: config.id,
        group,
        limits: config.limits.clone(),
        tick: Duration::from_millis(config.tick_ms),
        snapshot_every: config.snapshot_every_entries,
        replica,
        store,
        sm,
        transport,
        incarnation: now_nanos() | 1,
        next_seq: 1,
        pending: HashMap::new(),
        unproposed: VecDeque::new(),
        reads_new: Vec::new(),
        reads_by_ctx: HashMap::new(),
        reads_by_index: BTreeMap::new(),
        reads_waiting: 0,
        next_read_ctx: 1,
        conf_waiters: Vec::new(),
        member_forwarded: HashMap::new(),
        member_applying: Vec::new(),
        next_member_seq: 1,
        seen: (0, NO_NODE),
        stale: Stale::Idle,
        applied,
        applied_term,
        snapshot_index,
        snap_writer,
        serializing: None,
        apply_backlog: VecDeque::new(),
        apply_backlog_bytes: 0,
        snapshot_in_flight: None,
        next_snapshot_at: snapshot_index
            + config.snapshot_every_entries
            + snapshot_stagger(rank, config.snapshot_every_entries),
        status,
        members,
        metrics,
        last_progress: Instant::now(),
        own_info,
        ticks: 0,
        next_expire_scan: EXPIRE_SCAN_TICKS,
    };
    let thread = std::thread::Builder::new()
        .name(format!("group-{group}-n{}", config.id))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread runtime");
            rt.block_on(driver.run(in_rx, req_rx, snap_done, shutdown));
            // `run` dropped both ends of the snapshot thread's channels: it finishes the
            // snapshot it may be writing and ends. Waiting for it means that once this
            // group's thread is joined, nothing touches its data folder any more.
            if let Some(t) = snap_thread {
                let _ = t.join();
            }
        })
        .map_err(|e| format!("group {group}: spawning its thread: {e}"))?;
    Ok((handle, thread))
}

/// A snapshot written off-thread (or the error that stopped it), with the snapshot itself.
type SnapshotDone = (concord_storage::Result<WrittenSnapshot>, Snapshot);

/// Work for the snapshot thread: serialize the state machine (holding its lock, while the
/// group applies nothing) and return the snapshot to write.
type SnapshotJob = Box<dyn FnOnce() -> Snapshot + Send>;

/// Committed entries held back while the snapshot thread serializes the state machine;
/// beyond this many, or `APPLY_BACKLOG_BYTES_MAX` bytes of entry data, the group waits for
/// the serialization to finish (back-pressure).
const APPLY_BACKLOG_MAX: usize = 65_536;
const APPLY_BACKLOG_BYTES_MAX: usize = 64 << 20;

/// The snapshot thread's job queue, its results, and the thread itself.
type SnapshotThread = (
    std::sync::mpsc::SyncSender<SnapshotJob>,
    mpsc::Receiver<SnapshotDone>,
    std::thread::JoinHandle<()>,
);

/// Starts the thread that serializes and writes this group's own snapshots. It takes one
/// snapshot at a time (the group takes no new one while one is in flight) and ends when
/// the group drops its sender.
fn spawn_snapshot_writer(
    writer: SnapshotWriter,
    group: GroupId,
    id: NodeId,
) -> Result<SnapshotThread, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<SnapshotJob>(1);
    let (done_tx, done_rx) = mpsc::channel::<SnapshotDone>(1);
    let thread = std::thread::Builder::new()
        .name(format!("snap-{group}-n{id}"))
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let snap = job();
                let r = writer.write(&snap);
                if done_tx.blocking_send((r, snap)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("group {group}: spawning its snapshot writer: {e}"))?;
    Ok((tx, done_rx, thread))
}

/// Receives from an optional channel; never resolves without one.
async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// Snapshot layout: `u32 LE members_json_len | members json | state machine bytes`.
/// How much later than `every` a node takes its first snapshot, given its `rank` (its
/// position among the group's member ids, in order): members of a group apply the same
/// entries at about the same time, and if all of them wrote a snapshot at once (tens of
/// megabytes each, on machines that may share a disk) their log fsyncs would all stall
/// together. Ranks spread them over up to 3/8 of the interval (ranks, not ids: ids are
/// not dense after members are replaced); later snapshots follow each node's own
/// previous one, so they stay apart.
pub fn snapshot_stagger(rank: usize, every: u64) -> u64 {
    (rank as u64 % 4) * (every / 8)
}

fn wrap_snapshot(members: &BTreeMap<NodeId, MemberInfo>, sm: &[u8]) -> Vec<u8> {
    let m = serde_json::to_vec(members).expect("members serialise");
    let mut out = Vec::with_capacity(4 + m.len() + sm.len());
    out.extend_from_slice(&(m.len() as u32).to_le_bytes());
    out.extend_from_slice(&m);
    out.extend_from_slice(sm);
    out
}

fn unwrap_snapshot(data: &[u8]) -> Result<(BTreeMap<NodeId, MemberInfo>, &[u8]), String> {
    if data.len() < 4 {
        return Err("snapshot shorter than its header".into());
    }
    let n = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    let body = &data[4..];
    if body.len() < n {
        return Err("snapshot member table truncated".into());
    }
    let members =
        serde_json::from_slice(&body[..n]).map_err(|e| format!("snapshot member table: {e}"))?;
    Ok((members, &body[n..]))
}

/// Where the loop is in proving that requests handed to an earlier term cannot commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stale {
    Idle,
    /// The term changed: wait until `commit` (the commit index seen then) is applied and an
    /// entry of the current term has been applied here.
    WaitTerm {
        commit: u64,
    },
    /// Then wait until `last` (this node's last log index at that moment) is applied, and
    /// fail what is still waiting from a term before `term`.
    WaitLog {
        last: u64,
        term: u64,
    },
}

/// The term and leader a request was handed to. When the node observes another pair,
/// requests handed to the old one may never commit (see `Driver::check_leadership`).
type Via = (u64, NodeId);

struct Pending<T> {
    reply: oneshot::Sender<Result<T, NodeError>>,
    deadline: Instant,
    payload: Vec<u8>,
    proposed: bool,
    /// Where it was proposed (locally or forwarded); meaningful while `proposed`.
    via: Via,
}

enum ReadWaiter {
    Local(oneshot::Sender<Result<u64, NodeError>>, Instant),
    /// A follower's read: answer with the index, it waits for its own apply.
    Remote(NodeId, u64),
}

/// Who asked for a membership change the leader proposed.
enum ConfWho {
    Local(oneshot::Sender<Result<NodeId, NodeError>>),
    /// Forwarded by a follower; answered with a `MemberResp` frame.
    Remote {
        node: NodeId,
        incarnation: u64,
        seq: u64,
    },
}

/// Leader side: a membership change proposed and waiting to apply.
struct ConfWaiter {
    change: ConfChange,
    /// The member the change concerns.
    id: NodeId,
    who: ConfWho,
    deadline: Instant,
    /// The term it was proposed in.
    term: u64,
}

/// Follower side: a membership change forwarded to the leader, awaiting its answer.
struct MemberForwarded {
    reply: oneshot::Sender<Result<NodeId, NodeError>>,
    deadline: Instant,
    via: Via,
    /// For remove and promote the change (and id) are known in advance: seeing it applied
    /// here answers the request even if the leader's reply is lost (e.g. a member removing
    /// itself, whose links the leader drops on apply).
    expect: Option<(ConfChange, NodeId)>,
}

/// A membership change the leader applied, waiting until this node applied `index` too.
struct MemberApplying {
    index: u64,
    id: NodeId,
    reply: oneshot::Sender<Result<NodeId, NodeError>>,
    deadline: Instant,
}

struct Driver<R: Replica, SM: StateMachine> {
    id: NodeId,
    group: GroupId,
    limits: Limits,
    tick: Duration,
    snapshot_every: u64,
    replica: R,
    store: Box<dyn LogStore + Send>,
    sm: Arc<Mutex<SM>>,
    transport: Arc<Transport>,
    incarnation: u64,
    next_seq: u64,
    pending: HashMap<u64, Pending<SM::Response>>,
    /// Sequence numbers of proposals waiting for a leader to take them.
    unproposed: VecDeque<u64>,
    reads_new: Vec<ReadWaiter>,
    reads_by_ctx: HashMap<u64, (Instant, Vec<ReadWaiter>)>,
    reads_by_index: BTreeMap<u64, Vec<oneshot::Sender<Result<u64, NodeError>>>>,
    reads_waiting: usize,
    next_read_ctx: u64,
    conf_waiters: Vec<ConfWaiter>,
    member_forwarded: HashMap<u64, MemberForwarded>,
    member_applying: Vec<MemberApplying>,
    next_member_seq: u64,
    /// The (term, leader) seen at the end of the previous round.
    seen: Via,
    /// Progress towards failing requests handed to an earlier term's leader (see
    /// `check_leadership`).
    stale: Stale,
    applied: u64,
    applied_term: u64,
    snapshot_index: u64,
    /// Where this group's own snapshots go to be serialized and written off-thread (file
    /// stores only).
    snap_writer: Option<std::sync::mpsc::SyncSender<SnapshotJob>>,
    /// Set while the snapshot thread serializes the state machine: it says (or hangs up)
    /// once the state is captured. Until then nothing is applied; committed entries wait
    /// in `apply_backlog`, so consensus (heartbeats, fsyncs, acks) goes on meanwhile.
    serializing: Option<std::sync::mpsc::Receiver<()>>,
    /// Committed entries not applied yet because a serialization is running (in order,
    /// right after `applied`; at most `APPLY_BACKLOG_MAX`).
    apply_backlog: VecDeque<Entry>,
    /// Data bytes in `apply_backlog`.
    apply_backlog_bytes: usize,
    /// Index of the snapshot being written off-thread, if one is.
    snapshot_in_flight: Option<u64>,
    /// Applied index at which the next own snapshot is taken.
    next_snapshot_at: u64,
    status: Arc<Mutex<GroupStatus>>,
    members: Arc<Mutex<BTreeMap<NodeId, MemberInfo>>>,
    metrics: Arc<GroupMetrics>,
    last_progress: Instant,
    /// This node's own name and client address, until its publish of this incarnation is
    /// applied (then `None`).
    own_info: Option<MemberInfo>,
    ticks: u64,
    next_expire_scan: u64,
}

/// Ticks between scans for timed-out requests.
const EXPIRE_SCAN_TICKS: u64 = 10;
/// Ticks between attempts to publish this node's own name and client address.
const PUBLISH_EVERY_TICKS: u64 = 50;
/// Most membership-change requests waiting at once (each of: proposed by this leader,
/// forwarded by this follower, waiting for the local apply).
const CONF_WAITERS_MAX: usize = 16;

impl<R: Replica, SM: StateMachine> Driver<R, SM> {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Frame>,
        mut requests: mpsc::Receiver<Request<SM::Response>>,
        mut snap_done: Option<mpsc::Receiver<SnapshotDone>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.on_tick(),
                f = inbound.recv() => match f {
                    Some(f) => self.on_frame(f),
                    None => break,
                },
                r = requests.recv() => match r {
                    Some(r) => self.on_request(r),
                    None => break,
                },
                d = recv_opt(&mut snap_done) => match d {
                    Some(d) => {
                        if let Err(e) = self.on_snapshot_written(d) {
                            tracing::error!(node = self.id, group = self.group, "stopping: {e}");
                            self.fail_all(NodeError::Stopped);
                            self.publish_status(true);
                            return;
                        }
                    }
                    None => {
                        // The snapshot thread is gone (it panicked): take snapshots on this
                        // thread from now on rather than never compact again.
                        tracing::error!(
                            node = self.id,
                            group = self.group,
                            "snapshot thread ended; writing snapshots on the group thread"
                        );
                        snap_done = None;
                        self.snap_writer = None;
                        self.snapshot_in_flight = None;
                    }
                },
                _ = shutdown.changed() => break,
            }
            // Drain what is already queued so one Ready (one fsync) covers all of it.
            let mut n = 0;
            while n < self.limits.drain_per_round_max {
                if let Ok(f) = inbound.try_recv() {
                    self.on_frame(f);
                } else if let Ok(r) = requests.try_recv() {
                    self.on_request(r);
                } else {
                    break;
                }
                n += 1;
            }
            self.flush_reads();
            // A Ready's apply can enable another (e.g. read states); bounded so the loop
            // still reaches the next tick.
            let mut rounds = 0;
            while self.replica.has_ready() && rounds < 8 {
                if let Err(e) = self.handle_ready() {
                    // A storage failure leaves the durable state unknown: continuing could
                    // acknowledge writes that are not durable. Stop this group loudly.
                    tracing::error!(node = self.id, group = self.group, "stopping: {e}");
                    self.fail_all(NodeError::Stopped);
                    self.publish_status(true);
                    return;
                }
                rounds += 1;
            }
            self.resume_apply();
            self.check_leadership();
            self.publish_status(false);
        }
        // Every sync above completed in-line, so what was acknowledged is durable.
        self.fail_all(NodeError::Stopped);
        self.publish_status(true);
        tracing::debug!(node = self.id, group = self.group, "group stopped");
    }

    fn leader(&self) -> NodeId {
        self.replica.status().leader
    }

    fn on_tick(&mut self) {
        self.replica.tick();
        self.ticks += 1;
        if !self.unproposed.is_empty() && self.leader() != NO_NODE {
            let seqs: Vec<u64> = self.unproposed.drain(..).collect();
            for seq in seqs {
                self.submit(seq);
            }
        }
        if self.ticks >= self.next_expire_scan {
            self.next_expire_scan = self.ticks + EXPIRE_SCAN_TICKS;
            self.expire();
        }
        if self.ticks.is_multiple_of(PUBLISH_EVERY_TICKS) {
            self.publish_self();
        }
    }

    /// Like etcd's member publish: a node proposes its own name and client address (a
    /// `Member` entry with itself as origin) until it sees that entry of this incarnation
    /// applied (once per start: its own table always shows its config, the others' do
    /// not), so a member added at run time (whose entry starts with only its
    /// peer address) and members of a `concord start` cluster (which know only each
    /// other's peer addresses) appear in `member list` with their client URLs. Retried
    /// every `PUBLISH_EVERY_TICKS` until applied; a lost attempt costs nothing.
    fn publish_self(&mut self) {
        let Some(own) = &self.own_info else {
            return;
        };
        let st = self.replica.status();
        if st.leader == NO_NODE || !st.conf.all_nodes().contains(&self.id) {
            return;
        }
        let body = serde_json::to_vec(own).expect("member serialises");
        let data = envelope::encode(EnvelopeKind::Member, self.id, self.incarnation, 0, &body);
        if st.leader == self.id {
            let _ = self.replica.propose(data);
        } else {
            self.transport.send(Frame {
                group: self.group,
                from: self.id,
                to: st.leader,
                kind: FrameKind::Forward,
                payload: Bytes::from(data),
            });
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            if let Some(p) = self.pending.remove(&seq) {
                let err = if p.proposed || self.leader() != NO_NODE {
                    NodeError::Timeout
                } else {
                    NodeError::NoLeader
                };
                let _ = p.reply.send(Err(err));
            }
        }
        self.unproposed.retain(|s| self.pending.contains_key(s));
        let no_leader = self.leader() == NO_NODE;
        let err = || {
            if no_leader {
                NodeError::NoLeader
            } else {
                NodeError::Timeout
            }
        };
        let mut keep = Vec::new();
        for w in self.reads_new.drain(..) {
            match w {
                ReadWaiter::Local(tx, d) if d <= now => {
                    let _ = tx.send(Err(err()));
                    self.reads_waiting -= 1;
                }
                w => keep.push(w),
            }
        }
        self.reads_new = keep;
        let stale: Vec<u64> = self
            .reads_by_ctx
            .iter()
            .filter(|(_, (d, _))| *d <= now)
            .map(|(c, _)| *c)
            .collect();
        for ctx in stale {
            if let Some((_, ws)) = self.reads_by_ctx.remove(&ctx) {
                for w in ws {
                    if let ReadWaiter::Local(tx, _) = w {
                        let _ = tx.send(Err(err()));
                        self.reads_waiting -= 1;
                    }
                }
            }
        }
        // Reads waiting for their index to apply are bounded by the apply rate; they are
        // released by apply, or failed on stop.
        let (old, keep): (Vec<ConfWaiter>, Vec<ConfWaiter>) =
            std::mem::take(&mut self.conf_waiters)
                .into_iter()
                .partition(|w| w.deadline <= now);
        self.conf_waiters = keep;
        for w in old {
            self.answer_conf(w.who, Err(NodeError::Timeout));
        }
        let old: Vec<u64> = self
            .member_forwarded
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in old {
            if let Some(f) = self.member_forwarded.remove(&seq) {
                let _ = f.reply.send(Err(NodeError::Timeout));
            }
        }
        let (old, keep): (Vec<MemberApplying>, Vec<MemberApplying>) =
            std::mem::take(&mut self.member_applying)
                .into_iter()
                .partition(|w| w.deadline <= now);
        self.member_applying = keep;
        for w in old {
            let _ = w.reply.send(Err(NodeError::Timeout));
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.limits.request_timeout_ms)
    }

    fn on_request(&mut self, r: Request<SM::Response>) {
        match r {
            Request::Propose { cmd, reply } => {
                if self.pending.len() >= self.limits.pending_proposals_max {
                    let _ = reply.send(Err(NodeError::TooManyRequests));
                    return;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let payload =
                    envelope::encode(EnvelopeKind::Command, self.id, self.incarnation, seq, &cmd);
                let deadline = self.deadline();
                self.pending.insert(
                    seq,
                    Pending {
                        reply,
                        deadline,
                        payload,
                        proposed: false,
                        via: (0, NO_NODE),
                    },
                );
                self.submit(seq);
            }
            Request::Read { reply } => {
                if self.reads_waiting >= self.limits.pending_reads_max {
                    let _ = reply.send(Err(NodeError::TooManyRequests));
                    return;
                }
                self.reads_waiting += 1;
                let d = self.deadline();
                self.reads_new.push(ReadWaiter::Local(reply, d));
            }
            Request::Member { op, reply } => {
                let leader = self.leader();
                if leader == self.id {
                    self.member_op_as_leader(op, ConfWho::Local(reply));
                } else if leader == NO_NODE {
                    let _ = reply.send(Err(NodeError::NoLeader));
                } else {
                    self.forward_member(leader, op, reply);
                }
            }
            Request::TransferLeader { to } => self.replica.transfer_leader(to),
        }
    }

    /// Hands a pending proposal to the leader: locally, or forwarded over the transport.
    fn submit(&mut self, seq: u64) {
        let st = self.replica.status();
        let leader = st.leader;
        let Some(p) = self.pending.get_mut(&seq) else {
            return;
        };
        p.via = (st.term, leader);
        if leader == self.id {
            let data = prepare_payload::<SM>(&p.payload).unwrap_or_else(|| p.payload.clone());
            match self.replica.propose(data) {
                Ok(()) => p.proposed = true,
                Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Transferring) => {
                    self.unproposed.push_back(seq)
                }
                Err(e) => {
                    let p = self.pending.remove(&seq).expect("present");
                    let _ = p.reply.send(Err(map_propose_error(e)));
                }
            }
        } else if leader != NO_NODE {
            let sent = self.transport.send(Frame {
                group: self.group,
                from: self.id,
                to: leader,
                kind: FrameKind::Forward,
                payload: Bytes::from(p.payload.clone()),
            });
            if sent {
                p.proposed = true;
            } else {
                self.unproposed.push_back(seq);
            }
        } else {
            self.unproposed.push_back(seq);
        }
    }

    fn on_frame(&mut self, f: Frame) {
        debug_assert_eq!(f.to, self.id);
        match f.kind {
            FrameKind::Consensus => match R::decode_message(&f.payload) {
                Ok(m) => self.replica.step(f.from, m),
                Err(e) => tracing::warn!(
                    node = self.id,
                    from = f.from,
                    "dropping undecodable consensus message: {e}"
                ),
            },
            FrameKind::Forward => self.on_forward(f.from, &f.payload),
            FrameKind::ForwardNack => match envelope::decode_nack(&f.payload) {
                Ok((inc, seq, code)) if inc == self.incarnation => {
                    if code == NackCode::NotLeader {
                        if let Some(p) = self.pending.get_mut(&seq) {
                            p.proposed = false;
                            self.unproposed.push_back(seq);
                        }
                    } else if let Some(p) = self.pending.remove(&seq) {
                        let err = match code {
                            NackCode::Busy => NodeError::TooManyRequests,
                            NackCode::TooLarge => NodeError::TooLarge {
                                size: p.payload.len(),
                                max: self.limits.max_request_bytes,
                            },
                            _ => NodeError::Rejected("leader could not decode the request".into()),
                        };
                        let _ = p.reply.send(Err(err));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(node = self.id, from = f.from, "bad nack: {e}"),
            },
            FrameKind::ReadIndexReq => match envelope::decode_u64s::<1>(&f.payload) {
                Ok([ctx]) => {
                    if self.reads_new.len() < self.limits.pending_reads_max {
                        self.reads_new.push(ReadWaiter::Remote(f.from, ctx));
                    }
                }
                Err(e) => tracing::warn!(node = self.id, from = f.from, "bad read request: {e}"),
            },
            FrameKind::ReadIndexResp => match envelope::decode_u64s::<2>(&f.payload) {
                Ok([ctx, index]) => {
                    if let Some((_, ws)) = self.reads_by_ctx.remove(&ctx) {
                        for w in ws {
                            if let ReadWaiter::Local(tx, _) = w {
                                self.reads_by_index.entry(index).or_default().push(tx);
                            }
                        }
                        self.release_reads();
                    }
                }
                Err(e) => tracing::warn!(node = self.id, from = f.from, "bad read reply: {e}"),
            },
            FrameKind::MemberReq => match envelope::decode_member::<MemberOp>(&f.payload) {
                Ok((incarnation, seq, op)) => {
                    let who = ConfWho::Remote {
                        node: f.from,
                        incarnation,
                        seq,
                    };
                    if self.leader() == self.id {
                        self.member_op_as_leader(op, who);
                    } else {
                        // Sent to us as leader; we no longer are. The asker retries.
                        self.answer_conf(who, Err(NodeError::LeaderChanged));
                    }
                }
                Err(e) => tracing::warn!(node = self.id, from = f.from, "bad member request: {e}"),
            },
            FrameKind::MemberResp => {
                type Answer = Result<(u64, NodeId), NodeError>;
                match envelope::decode_member::<Answer>(&f.payload) {
                    Ok((inc, seq, answer)) if inc == self.incarnation => {
                        self.on_member_answer(seq, answer)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(node = self.id, from = f.from, "bad member reply: {e}")
                    }
                }
            }
        }
    }

    /// The leader answered a membership change this node forwarded.
    fn on_member_answer(&mut self, seq: u64, answer: Result<(u64, NodeId), NodeError>) {
        let Some(f) = self.member_forwarded.remove(&seq) else {
            return; // Already answered (expected change applied here, timeout, ...).
        };
        match answer {
            Err(e) => {
                let _ = f.reply.send(Err(e));
            }
            Ok((_, id)) if f.expect.as_ref().is_some_and(|(_, eid)| *eid != id) => {
                let _ = f.reply.send(Err(NodeError::Rejected(format!(
                    "leader answered for member {id}"
                ))));
            }
            Ok((index, id)) if index <= self.applied => {
                let _ = f.reply.send(Ok(id));
            }
            Ok((index, id)) => self.member_applying.push(MemberApplying {
                index,
                id,
                reply: f.reply,
                deadline: f.deadline,
            }),
        }
    }

    /// Follower: sends a membership change to the leader and remembers who waits for it.
    fn forward_member(
        &mut self,
        leader: NodeId,
        op: MemberOp,
        reply: oneshot::Sender<Result<NodeId, NodeError>>,
    ) {
        if self.member_forwarded.len() + self.member_applying.len() >= CONF_WAITERS_MAX {
            let _ = reply.send(Err(NodeError::TooManyRequests));
            return;
        }
        let seq = self.next_member_seq;
        self.next_member_seq += 1;
        let expect = match op {
            MemberOp::Add { .. } => None,
            MemberOp::Remove { id } => Some((
                ConfChange {
                    changes: vec![ConfChangeItem::Remove(id)],
                },
                id,
            )),
            MemberOp::Promote { id } => Some((
                ConfChange {
                    changes: vec![ConfChangeItem::AddVoter(id)],
                },
                id,
            )),
        };
        let sent = self.transport.send(Frame {
            group: self.group,
            from: self.id,
            to: leader,
            kind: FrameKind::MemberReq,
            payload: Bytes::from(envelope::encode_member(self.incarnation, seq, &op)),
        });
        if !sent {
            let _ = reply.send(Err(NodeError::NoLeader));
            return;
        }
        let term = self.replica.status().term;
        let deadline = self.deadline();
        self.member_forwarded.insert(
            seq,
            MemberForwarded {
                reply,
                deadline,
                via: (term, leader),
                expect,
            },
        );
    }

    /// Leader: checks a membership change, proposes it, and waits for it to apply.
    fn member_op_as_leader(&mut self, op: MemberOp, who: ConfWho) {
        match self.start_member_change(op) {
            Ok((change, id)) => {
                let deadline = self.deadline();
                let term = self.replica.status().term;
                self.conf_waiters.push(ConfWaiter {
                    change,
                    id,
                    who,
                    deadline,
                    term,
                });
            }
            Err(e) => self.answer_conf(who, Err(e)),
        }
    }

    /// Leader: validates `op` against the configuration and the replication progress,
    /// then proposes it. Returns the proposed change and the member it concerns.
    fn start_member_change(&mut self, op: MemberOp) -> Result<(ConfChange, NodeId), NodeError> {
        if self.conf_waiters.len() >= CONF_WAITERS_MAX {
            return Err(NodeError::TooManyRequests);
        }
        // The core takes one change at a time. Refusing here, before the `Member` entry of
        // an add is proposed, keeps the member table free of members never added.
        if !self.conf_waiters.is_empty() {
            return Err(NodeError::Rejected(
                "another membership change is in progress; retry".into(),
            ));
        }
        let conf = self.replica.status().conf;
        let all = conf.all_nodes();
        let (item, id) = match op {
            MemberOp::Add { peer_addr, learner } => {
                if crate::config::parse_addr("peer-urls", &peer_addr).is_err() {
                    return Err(NodeError::Rejected(format!(
                        "invalid peer address {peer_addr:?}"
                    )));
                }
                let members = self.members.lock().expect("members").clone();
                if members
                    .values()
                    .any(|m| all.contains(&m.id) && m.peer_addr == peer_addr)
                {
                    return Err(NodeError::PeerUrlExists);
                }
                // Above every id in use or recorded, so a new member never inherits the
                // id (and the log position) of another.
                let id = all.iter().chain(members.keys()).copied().max().unwrap_or(0) + 1;
                let meta = MemberInfo {
                    id,
                    name: String::new(),
                    peer_addr,
                    client_addr: String::new(),
                };
                // The member's addresses enter the log just before the change that adds
                // it, so every node can dial it as soon as it is a member.
                let body = serde_json::to_vec(&meta).expect("member serialises");
                let data =
                    envelope::encode(EnvelopeKind::Member, self.id, self.incarnation, 0, &body);
                self.replica.propose(data).map_err(map_propose_error)?;
                let item = if learner {
                    ConfChangeItem::AddLearner(id)
                } else {
                    ConfChangeItem::AddVoter(id)
                };
                (item, id)
            }
            MemberOp::Remove { id } => {
                if !all.contains(&id) {
                    return Err(NodeError::MemberNotFound);
                }
                (ConfChangeItem::Remove(id), id)
            }
            MemberOp::Promote { id } => {
                if !all.contains(&id) {
                    return Err(NodeError::MemberNotFound);
                }
                if conf.is_voter(id) {
                    return Err(NodeError::MemberNotLearner);
                }
                let learner = self.replica.match_index(id).unwrap_or(0);
                let leader = self.replica.match_index(self.id).unwrap_or(0);
                if !learner_ready(learner, leader) {
                    tracing::info!(
                        node = self.id,
                        learner = id,
                        learner_match = learner,
                        leader_match = leader,
                        "refusing to promote a learner that has not caught up"
                    );
                    return Err(NodeError::LearnerNotReady);
                }
                (ConfChangeItem::AddVoter(id), id)
            }
        };
        let change = ConfChange {
            changes: vec![item],
        };
        self.replica
            .propose_conf_change(change.clone())
            .map_err(map_propose_error)?;
        Ok((change, id))
    }

    /// Answers whoever asked for a membership change: `Ok((index, id))` once applied.
    fn answer_conf(&mut self, who: ConfWho, answer: Result<(u64, NodeId), NodeError>) {
        match who {
            ConfWho::Local(tx) => {
                let _ = tx.send(answer.map(|(_, id)| id));
            }
            ConfWho::Remote {
                node,
                incarnation,
                seq,
            } => {
                self.transport.send(Frame {
                    group: self.group,
                    from: self.id,
                    to: node,
                    kind: FrameKind::MemberResp,
                    payload: Bytes::from(envelope::encode_member(incarnation, seq, &answer)),
                });
            }
        }
    }

    /// Answers forwarded membership changes whose index this node has now applied.
    fn release_members(&mut self) {
        if self.member_applying.is_empty() {
            return;
        }
        let applied = self.applied;
        let (done, keep): (Vec<MemberApplying>, Vec<MemberApplying>) =
            std::mem::take(&mut self.member_applying)
                .into_iter()
                .partition(|w| w.index <= applied);
        self.member_applying = keep;
        for w in done {
            let _ = w.reply.send(Ok(w.id));
        }
    }

    /// Called once per round after the `Ready`s.
    ///
    /// Requests handed to the leader of an earlier term are failed with `LeaderChanged`
    /// (etcd's "leader changed") once they provably can no longer commit, instead of
    /// waiting for their deadline:
    ///
    /// 1. The term changed: wait until the commit index seen then is applied and an entry
    ///    of the current term has been applied here (a new Raft leader's first entry, a
    ///    slot chosen in the new Multi-Paxos ballot).
    /// 2. Then wait until this node's last log index at that moment is applied. With Raft
    ///    every earlier-term entry that will ever commit lies before the new term's first
    ///    entry, so step 1 already suffices. A new Multi-Paxos leader re-proposes values
    ///    of earlier ballots in its own ballot, at slots it holds in its log; a follower
    ///    holds the values it accepted (an acceptor never forgets one of a later slot), so
    ///    applying its whole log covers them.
    ///
    /// Everything that commits is then applied and answered with its real result, so a
    /// request known committed is never failed. If the log never reaches that index (no
    /// new writes after a lost suffix) requests wait for their deadline as before. A leader
    /// that merely becomes unknown, with no new term, fails nothing: the old one may still
    /// be alive. Reads have no effect, so those waiting on the old leader are re-issued at
    /// once.
    fn check_leadership(&mut self) {
        let st = self.replica.status();
        let now = (st.term, st.leader);
        if now != self.seen {
            if now.0 > self.seen.0 {
                tracing::debug!(
                    node = self.id,
                    group = self.group,
                    term = now.0,
                    leader = now.1,
                    "term changed"
                );
                self.stale = Stale::WaitTerm { commit: st.commit };
            }
            self.seen = now;
            for (_, (_, ws)) in std::mem::take(&mut self.reads_by_ctx) {
                // A remote reader re-asks the new leader itself once it sees the change.
                self.reads_new.extend(
                    ws.into_iter()
                        .filter(|w| matches!(w, ReadWaiter::Local(..))),
                );
            }
        }
        if let Stale::WaitTerm { commit } = self.stale {
            if self.applied >= commit && self.applied_term >= st.term {
                self.stale = Stale::WaitLog {
                    last: st.last_index,
                    term: st.term,
                };
            }
        }
        if let Stale::WaitLog { last, term } = self.stale {
            if self.applied >= last {
                self.stale = Stale::Idle;
                self.fail_stale(term);
            }
        }
    }

    /// Fails every request handed to a leader of a term before `term`.
    fn fail_stale(&mut self, term: u64) {
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.proposed && p.via.0 < term)
            .map(|(s, _)| *s)
            .collect();
        for seq in stale {
            if let Some(p) = self.pending.remove(&seq) {
                let _ = p.reply.send(Err(NodeError::LeaderChanged));
            }
        }
        let (old, keep): (Vec<ConfWaiter>, Vec<ConfWaiter>) =
            std::mem::take(&mut self.conf_waiters)
                .into_iter()
                .partition(|w| w.term < term);
        self.conf_waiters = keep;
        for w in old {
            self.answer_conf(w.who, Err(NodeError::LeaderChanged));
        }
        let old: Vec<u64> = self
            .member_forwarded
            .iter()
            .filter(|(_, f)| f.via.0 < term)
            .map(|(s, _)| *s)
            .collect();
        for seq in old {
            if let Some(f) = self.member_forwarded.remove(&seq) {
                let _ = f.reply.send(Err(NodeError::LeaderChanged));
            }
        }
        // `member_applying` holds changes the leader already applied: they are committed
        // and will apply here, whoever leads now.
    }

    fn on_forward(&mut self, from: NodeId, payload: &[u8]) {
        let nack = |code| {
            envelope::decode(payload)
                .ok()
                .map(|e| envelope::encode_nack(e.incarnation, e.seq, code))
        };
        let code = match envelope::decode(payload) {
            Ok(e)
                if e.origin == from
                    && (e.kind == EnvelopeKind::Command
                        || (is_self_publish(e.body, from)
                            && self.replica.status().conf.all_nodes().contains(&from))) =>
            {
                let data = prepare_payload::<SM>(payload).unwrap_or_else(|| payload.to_vec());
                match self.replica.propose(data) {
                    Ok(()) => return,
                    Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Transferring) => {
                        NackCode::NotLeader
                    }
                    Err(ProposeError::TooLarge { .. }) => NackCode::TooLarge,
                    Err(_) => NackCode::Busy,
                }
            }
            _ => {
                tracing::warn!(
                    node = self.id,
                    from,
                    "dropping malformed forwarded proposal"
                );
                NackCode::Malformed
            }
        };
        if let Some(n) = nack(code) {
            self.transport.send(Frame {
                group: self.group,
                from: self.id,
                to: from,
                kind: FrameKind::ForwardNack,
                payload: Bytes::from(n),
            });
        }
    }

    /// Issues one read_index for every read gathered this round (reads share a barrier).
    fn flush_reads(&mut self) {
        if self.reads_new.is_empty() {
            return;
        }
        let leader = self.leader();
        if leader == self.id {
            let ctx = self.next_read_ctx;
            self.next_read_ctx += 1;
            match self.replica.read_index(ctx.to_le_bytes().to_vec()) {
                Ok(()) => {
                    let ws = std::mem::take(&mut self.reads_new);
                    let d = self.deadline();
                    self.reads_by_ctx.insert(ctx, (d, ws));
                }
                Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Transferring) => {}
                Err(e) => {
                    let err = map_propose_error(e);
                    for w in std::mem::take(&mut self.reads_new) {
                        if let ReadWaiter::Local(tx, _) = w {
                            let _ = tx.send(Err(err.clone()));
                            self.reads_waiting -= 1;
                        }
                    }
                }
            }
        } else if leader != NO_NODE {
            // Remote waiters were addressed to us as leader; we no longer are: they time
            // out at their origin and retry.
            let locals: Vec<ReadWaiter> = std::mem::take(&mut self.reads_new)
                .into_iter()
                .filter(|w| matches!(w, ReadWaiter::Local(..)))
                .collect();
            if locals.is_empty() {
                return;
            }
            let ctx = self.next_read_ctx;
            self.next_read_ctx += 1;
            let sent = self.transport.send(Frame {
                group: self.group,
                from: self.id,
                to: leader,
                kind: FrameKind::ReadIndexReq,
                payload: Bytes::from(envelope::encode_u64s(&[ctx])),
            });
            if sent {
                let d = self.deadline();
                self.reads_by_ctx.insert(ctx, (d, locals));
            } else {
                self.reads_new = locals;
            }
        }
    }

    fn release_reads(&mut self) {
        while let Some(entry) = self.reads_by_index.first_entry() {
            if *entry.key() > self.applied {
                break;
            }
            let index = *entry.key();
            for tx in entry.remove() {
                let _ = tx.send(Ok(index));
                self.reads_waiting -= 1;
            }
        }
    }

    fn handle_ready(&mut self) -> Result<(), String> {
        let mut rd: Ready<R::Message> = self.replica.ready();
        self.metrics.readies_total.fetch_add(1, Ordering::Relaxed);
        // 0. A leader's replication leaves first, so followers write while we fsync (the
        // replica counts its own copy only after `advance`).
        let early = rd.send_before_persist.min(rd.messages.len());
        for out in rd.messages.drain(..early) {
            self.send_consensus(out);
        }
        // 0b. Committed entries are durable on a quorum already (the replica counts its own
        // copy only once persisted), so their clients need not wait for this Ready's fsync of
        // newer entries: apply them first. Not with a snapshot (it replaces the state they
        // apply to) and not past a membership change (its bookkeeping stays after persist).
        // Also not while a snapshot serialization holds applies back: a full backlog would
        // wait for it here, before this Ready's fsync and acknowledgements.
        if rd.snapshot.is_none() && self.serialization_done() {
            let n = rd
                .committed
                .iter()
                .take_while(|e| e.kind != EntryKind::ConfChange)
                .count();
            self.apply_committed(rd.committed.drain(..n));
            self.release_reads();
        }
        // 1. Persist.
        if let Some(snap) = &rd.snapshot {
            // Everything committed before it is applied first (waiting for a running
            // serialization), so the restore replaces a state machine at rest.
            self.wait_serialized();
            self.apply_backlog_now();
            self.store
                .install_snapshot(snap)
                .map_err(|e| format!("installing snapshot: {e}"))?;
            let (members, data) = unwrap_snapshot(&snap.data)?;
            self.sm
                .lock()
                .expect("sm lock")
                .restore(data)
                .map_err(|e| format!("restoring snapshot {}: {e}", snap.meta.index))?;
            if !members.is_empty() {
                self.set_members(members);
            }
            self.applied = snap.meta.index;
            self.applied_term = snap.meta.term;
            self.snapshot_index = snap.meta.index;
            self.next_snapshot_at = snap.meta.index + self.snapshot_every;
        }
        if !rd.entries.is_empty() {
            self.store
                .append(&rd.entries)
                .map_err(|e| format!("appending entries: {e}"))?;
            self.metrics
                .entries_persisted_total
                .fetch_add(rd.entries.len() as u64, Ordering::Relaxed);
        }
        if let Some(hs) = rd.hard_state {
            self.store
                .set_hard_state(hs)
                .map_err(|e| format!("saving hard state: {e}"))?;
        }
        if rd.must_sync {
            let t = Instant::now();
            self.store.sync().map_err(|e| format!("fsync: {e}"))?;
            self.metrics.syncs_total.fetch_add(1, Ordering::Relaxed);
            self.metrics.sync_latency.observe(t.elapsed());
        }
        // 2. Send, now that everything they depend on is durable.
        for out in rd.messages {
            self.send_consensus(out);
        }
        // 3. Apply what step 0b left (or hold back while the snapshot thread serializes).
        self.apply_committed(rd.committed);
        for rs in rd.read_states {
            let Ok([ctx]) = envelope::decode_u64s::<1>(&rs.ctx) else {
                continue;
            };
            if let Some((_, ws)) = self.reads_by_ctx.remove(&ctx) {
                for w in ws {
                    match w {
                        ReadWaiter::Local(tx, _) => {
                            self.reads_by_index.entry(rs.index).or_default().push(tx)
                        }
                        ReadWaiter::Remote(node, rctx) => {
                            self.transport.send(Frame {
                                group: self.group,
                                from: self.id,
                                to: node,
                                kind: FrameKind::ReadIndexResp,
                                payload: Bytes::from(envelope::encode_u64s(&[rctx, rs.index])),
                            });
                        }
                    }
                }
            }
        }
        self.release_reads();
        self.release_members();
        // 4. Advance.
        self.replica.advance();
        self.maybe_snapshot()?;
        Ok(())
    }

    /// Applies committed entries in order (or holds them back while the snapshot thread
    /// serializes the state machine).
    fn apply_committed(&mut self, committed: impl IntoIterator<Item = Entry>) {
        for e in committed {
            let last = self.apply_backlog.back().map_or(self.applied, |b| b.index);
            if e.index <= last {
                continue; // Covered by a snapshot restored above.
            }
            assert_eq!(
                e.index,
                last + 1,
                "committed entries apply in order without gaps"
            );
            self.apply_or_defer(e);
        }
    }

    /// Whether no serialization holds the state machine (polls the snapshot thread).
    fn serialization_done(&mut self) -> bool {
        let Some(rx) = &self.serializing else {
            return true;
        };
        match rx.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => false,
            // Captured, or the job was dropped (thread gone): either way it is over.
            Ok(()) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.serializing = None;
                true
            }
        }
    }

    /// Blocks until a running serialization has captured the state machine.
    fn wait_serialized(&mut self) {
        if let Some(rx) = self.serializing.take() {
            let t = Instant::now();
            let _ = rx.recv();
            tracing::debug!(
                node = self.id,
                group = self.group,
                "waited {:?} for a snapshot serialization",
                t.elapsed()
            );
        }
    }

    /// Applies every held-back entry. Only when no serialization is running.
    fn apply_backlog_now(&mut self) {
        debug_assert!(self.serializing.is_none());
        while let Some(e) = self.apply_backlog.pop_front() {
            self.apply_entry(e.index, e.term, e.kind, &e.data);
        }
        self.apply_backlog_bytes = 0;
    }

    /// Applies `e` now, or holds it back while the snapshot thread serializes the state
    /// machine (the snapshot must be the state at its index exactly). A full backlog
    /// waits for the serialization instead of growing.
    fn apply_or_defer(&mut self, e: Entry) {
        if !self.serialization_done() {
            if self.apply_backlog.len() < APPLY_BACKLOG_MAX
                && self.apply_backlog_bytes + e.data.len() <= APPLY_BACKLOG_BYTES_MAX
            {
                self.apply_backlog_bytes += e.data.len();
                self.apply_backlog.push_back(e);
                return;
            }
            self.wait_serialized();
        }
        self.apply_backlog_now();
        self.apply_entry(e.index, e.term, e.kind, &e.data);
    }

    /// Once a serialization is over, applies what it held back and releases what waited.
    fn resume_apply(&mut self) {
        if self.apply_backlog.is_empty() || !self.serialization_done() {
            return;
        }
        self.apply_backlog_now();
        self.release_reads();
        self.release_members();
    }

    fn send_consensus(&self, out: Outgoing<R::Message>) {
        self.transport.send(Frame {
            group: self.group,
            from: self.id,
            to: out.to,
            kind: FrameKind::Consensus,
            payload: Bytes::from(R::encode_message(&out.msg)),
        });
    }

    fn apply_entry(&mut self, index: u64, term: u64, kind: EntryKind, data: &[u8]) {
        self.applied = index;
        self.applied_term = term;
        match kind {
            EntryKind::Normal if !data.is_empty() => match envelope::decode(data) {
                Ok(env) if env.kind == EnvelopeKind::Command => {
                    let resp = self.sm.lock().expect("sm lock").apply(index, env.body);
                    if env.origin == self.id && env.incarnation == self.incarnation {
                        if let Some(p) = self.pending.remove(&env.seq) {
                            let _ = p.reply.send(Ok(resp));
                        }
                    }
                    return;
                }
                Ok(env) => {
                    debug_assert_eq!(env.kind, EnvelopeKind::Member);
                    match serde_json::from_slice::<MemberInfo>(env.body) {
                        // A member publishing itself: only its name and client address
                        // change, and only while it is in the table (a removed member's
                        // late publish does not bring it back).
                        Ok(m) if m.id == env.origin => {
                            if m.id == self.id && env.incarnation == self.incarnation {
                                self.own_info = None;
                            }
                            let mut all = self.members.lock().expect("members");
                            if let Some(e) = all.get_mut(&m.id) {
                                e.name = m.name;
                                e.client_addr = m.client_addr;
                            }
                        }
                        Ok(m) => {
                            let mut all = self.members.lock().expect("members").clone();
                            all.insert(m.id, m);
                            self.set_members(all);
                        }
                        Err(e) => tracing::warn!(node = self.id, index, "bad member entry: {e}"),
                    }
                }
                Err(e) => {
                    // Every replica skips the same committed bytes, so state stays identical.
                    tracing::warn!(node = self.id, index, "skipping undecodable entry: {e}");
                }
            },
            EntryKind::ConfChange => {
                if let Ok(cc) = ConfChange::decode(data) {
                    // Show the new configuration before answering anyone: the caller reads
                    // the member list right after its answer.
                    let conf = self.replica.status().conf;
                    {
                        let mut st = self.status.lock().expect("status lock");
                        st.voters = conf.voters;
                        st.learners = conf.learners;
                    }
                    if let Some(pos) = self.conf_waiters.iter().position(|w| w.change == cc) {
                        let w = self.conf_waiters.remove(pos);
                        self.answer_conf(w.who, Ok((index, w.id)));
                    }
                    let seen_here: Vec<u64> = self
                        .member_forwarded
                        .iter()
                        .filter(|(_, f)| f.expect.as_ref().is_some_and(|(c, _)| *c == cc))
                        .map(|(s, _)| *s)
                        .collect();
                    for seq in seen_here {
                        if let Some(f) = self.member_forwarded.remove(&seq) {
                            let id = f.expect.map_or(NO_NODE, |(_, id)| id);
                            let _ = f.reply.send(Ok(id));
                        }
                    }
                    for item in &cc.changes {
                        if let ConfChangeItem::Remove(id) = item {
                            if *id != self.id {
                                self.members.lock().expect("members").remove(id);
                                // Stop dialling a removed member: if it comes back under a
                                // new id at the same address, the old link would keep
                                // knocking on it with the wrong id.
                                self.transport.remove_peer(*id);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        self.sm.lock().expect("sm lock").skip(index);
    }

    fn set_members(&mut self, members: BTreeMap<NodeId, MemberInfo>) {
        for (id, m) in &members {
            match crate::config::parse_addr("peer", &m.peer_addr) {
                Ok(a) => self.transport.add_peer(*id, a),
                Err(e) => tracing::warn!(node = self.id, member = id, "bad peer address: {e}"),
            }
        }
        *self.members.lock().expect("members") = members;
    }

    /// Takes a snapshot of the state machine every `snapshot_every` applied entries. With a
    /// file store the snapshot thread both serializes it (holding the state machine's lock,
    /// while this loop holds committed entries back instead of applying them) and writes it
    /// (see [`Driver::on_snapshot_written`]), so a large state stalls neither this loop's
    /// heartbeats and fsyncs nor its acknowledgements: serializing a million keys takes
    /// about a second, longer than an election timeout's worth of missed heartbeats.
    fn maybe_snapshot(&mut self) -> Result<(), String> {
        if self.applied < self.next_snapshot_at
            || self.snapshot_in_flight.is_some()
            || !self.apply_backlog.is_empty()
        {
            return Ok(());
        }
        self.next_snapshot_at = self.applied + self.snapshot_every;
        let t = Instant::now();
        let meta = SnapshotMeta {
            index: self.applied,
            term: self.applied_term,
            // The membership as of `applied`, not the newest one: a change appended but
            // not yet committed must not reach the snapshot file.
            conf: self.replica.conf_at(self.applied),
        };
        let members = self.members.lock().expect("members").clone();
        let sm = self.sm.clone();
        let (captured_tx, captured_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let job: SnapshotJob = Box::new(move || {
            let later = sm.lock().expect("sm lock").snapshot_later();
            // The state is captured: the group may apply again while we serialize (if the
            // machine copied itself), wrap and write.
            let _ = captured_tx.send(());
            let sm_data = later();
            Snapshot {
                meta,
                data: wrap_snapshot(&members, &sm_data),
            }
        });
        let index = self.applied;
        let job = match &self.snap_writer {
            Some(tx) => match tx.try_send(job) {
                Ok(()) => {
                    // Nothing is applied until the thread has the state (see `apply_or_defer`).
                    self.serializing = Some(captured_rx);
                    self.snapshot_in_flight = Some(index);
                    tracing::debug!(
                        node = self.id,
                        group = self.group,
                        index,
                        "snapshot handed to the snapshot thread"
                    );
                    return Ok(());
                }
                Err(std::sync::mpsc::TrySendError::Full(_)) => {
                    tracing::warn!(
                        node = self.id,
                        group = self.group,
                        index,
                        "snapshot writer busy; skipping this snapshot"
                    );
                    return Ok(());
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(job)) => {
                    tracing::error!(
                        node = self.id,
                        group = self.group,
                        "snapshot thread ended; writing snapshots on the group thread"
                    );
                    self.snap_writer = None;
                    job
                }
            },
            None => job,
        };
        // No snapshot thread (in-memory stores, or it died): serialize and write here.
        let snap = job();
        self.store
            .install_snapshot(&snap)
            .map_err(|e| format!("saving snapshot at {index}: {e}"))?;
        self.snapshot_taken(snap, t);
        Ok(())
    }

    /// The snapshot thread finished. A failed write leaves the log untouched (the next
    /// snapshot is tried `snapshot_every` entries later); a failed adoption is a storage
    /// failure like any other and stops the group.
    fn on_snapshot_written(&mut self, (written, snap): SnapshotDone) -> Result<(), String> {
        self.snapshot_in_flight = None;
        let t = Instant::now();
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(
                    node = self.id,
                    group = self.group,
                    index = snap.meta.index,
                    "writing snapshot failed, the log is kept whole: {e}"
                );
                return Ok(());
            }
        };
        if !self
            .store
            .adopt_snapshot(written)
            .map_err(|e| format!("adopting snapshot at {}: {e}", snap.meta.index))?
        {
            return Ok(()); // A newer snapshot (from the leader) was installed meanwhile.
        }
        self.snapshot_taken(snap, t);
        Ok(())
    }

    /// The stored log now starts after `snap`: let the replica compact too.
    fn snapshot_taken(&mut self, snap: Snapshot, t: Instant) {
        let index = snap.meta.index;
        self.replica.compact(index, snap.data);
        self.snapshot_index = self.snapshot_index.max(index);
        self.metrics.snapshots_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            node = self.id,
            group = self.group,
            index,
            "snapshot taken (log compacted in {:?})",
            t.elapsed()
        );
    }

    fn fail_all(&mut self, err: NodeError) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(err.clone()));
        }
        self.unproposed.clear();
        for w in self.reads_new.drain(..) {
            if let ReadWaiter::Local(tx, _) = w {
                let _ = tx.send(Err(err.clone()));
            }
        }
        for (_, (_, ws)) in self.reads_by_ctx.drain() {
            for w in ws {
                if let ReadWaiter::Local(tx, _) = w {
                    let _ = tx.send(Err(err.clone()));
                }
            }
        }
        for (_, ws) in std::mem::take(&mut self.reads_by_index) {
            for tx in ws {
                let _ = tx.send(Err(err.clone()));
            }
        }
        self.reads_waiting = 0;
        for w in std::mem::take(&mut self.conf_waiters) {
            self.answer_conf(w.who, Err(err.clone()));
        }
        for (_, f) in self.member_forwarded.drain() {
            let _ = f.reply.send(Err(err.clone()));
        }
        for w in self.member_applying.drain(..) {
            let _ = w.reply.send(Err(err.clone()));
        }
    }

    fn publish_status(&mut self, stopped: bool) {
        let s: Status = self.replica.status();
        if s.leader != NO_NODE {
            self.last_progress = Instant::now();
        }
        let mut st = self.status.lock().expect("status lock");
        st.role = format!("{:?}", s.role);
        if s.role == Role::Leader {
            debug_assert_eq!(s.leader, self.id);
        }
        st.term = s.term;
        st.leader = s.leader;
        st.commit = s.commit;
        st.applied = self.applied;
        st.first_index = s.first_index;
        st.last_index = s.last_index;
        st.voters = s.conf.voters.clone();
        st.learners = s.conf.learners.clone();
        st.snapshot_index = self.snapshot_index;
        st.pending_proposals = self.pending.len();
        st.pending_reads = self.reads_waiting;
        st.ms_since_progress = self.last_progress.elapsed().as_millis() as u64;
        st.stopped = stopped;
    }
}

fn map_propose_error(e: ProposeError) -> NodeError {
    match e {
        ProposeError::NotLeader { .. } => NodeError::NoLeader,
        ProposeError::Busy => NodeError::TooManyRequests,
        ProposeError::TooLarge { size, max } => NodeError::TooLarge { size, max },
        ProposeError::Transferring => NodeError::NoLeader,
        ProposeError::ConfChangeRejected(why) => NodeError::Rejected(why.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::snapshot_stagger;

    #[test]
    fn members_of_a_three_node_group_snapshot_apart() {
        let every = 100_000;
        let offsets: Vec<u64> = (0..3).map(|rank| snapshot_stagger(rank, every)).collect();
        assert_eq!(offsets, vec![0, 12_500, 25_000]);
        // Never as much as half an interval, so no member waits much longer than `every`.
        assert!((0..64).all(|rank| snapshot_stagger(rank, every) < every / 2));
    }
}
