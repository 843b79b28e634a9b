//! The boundary between the etcd front-end and the node that runs consensus.
//!
//! The front-end translates gRPC requests into calls on a [`Backend`]; the node runtime
//! implements it on top of a replication group, and [`crate::LocalBackend`] implements it
//! in one process for tests. Nothing in this trait knows about gRPC.
//!
//! Call order a node must honour:
//! * [`Backend::propose`] resolves only after the command was applied to the local store,
//!   so a read that follows on the same member sees the write.
//! * After applying a command that changed the revision, the node publishes its events to
//!   the [`EventFeed`] it hands out from [`Backend::events`], in apply order, *after* the
//!   store shows the new revision. Watchers rely on this order: a batch that is missing or
//!   late is detected (its revision skips ahead) and repaired from store history.

use std::future::Future;
use std::sync::Arc;

use concord_kv as kv;
use tokio::sync::broadcast;

/// Identity and term stamped into every etcd `ResponseHeader`.
pub use crate::convert::HeaderStamp;

/// Why a backend could not serve a request. Each variant maps to the gRPC code and
/// message that etcd uses for the same condition (see `crate::error`), which is what
/// etcd clients match on to decide whether to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// No leader is known (election in progress, or partitioned).
    NoLeader,
    /// The leader changed while the request was in flight; its outcome is unknown.
    LeaderChanged,
    /// This member is not the leader and cannot forward the request.
    NotLeader,
    /// The request was not committed and applied in time; its outcome is unknown.
    Timeout,
    /// The member is shutting down.
    Stopped,
    /// Too many proposals are pending; the caller should back off.
    TooManyRequests,
    /// The cluster cannot take a membership change now (it would lose quorum).
    Unhealthy,
    /// No member has that id.
    MemberNotFound,
    /// A member with that id already exists.
    MemberExists,
    /// Another member already uses one of those peer URLs.
    PeerUrlExists,
    /// The peer URLs are malformed or empty.
    MemberBadUrls,
    /// Only learners can be promoted.
    MemberNotLearner,
    /// The learner has not caught up with the leader yet.
    LearnerNotReady,
    /// The KV state machine refused the request.
    Kv(kv::KvError),
    /// The backend does not support this operation (answered as gRPC Unimplemented).
    Unsupported(&'static str),
    /// Anything else; the string says what, for the operator's log.
    Internal(String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Kv(e) => write!(f, "{e}"),
            BackendError::Unsupported(what) => write!(f, "unsupported: {what}"),
            BackendError::Internal(what) => write!(f, "internal error: {what}"),
            other => f.write_str(crate::error::backend_message(other)),
        }
    }
}

impl std::error::Error for BackendError {}

impl From<kv::KvError> for BackendError {
    fn from(e: kv::KvError) -> Self {
        BackendError::Kv(e)
    }
}

/// A cluster member as etcd's `Member` message describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    /// Empty while an added member has not started.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// What `Maintenance.Status` reports besides the store's own figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// Member id of the leader this member believes in, 0 if none.
    pub leader_id: u64,
    pub raft_term: u64,
    /// Highest log index known committed.
    pub raft_index: u64,
    /// Highest log index applied to the store.
    pub raft_applied_index: u64,
    pub is_learner: bool,
    /// Alarm or health problems, in words; empty when healthy.
    pub errors: Vec<String>,
}

/// The events one applied command produced, all at `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBatch {
    /// The store revision after the command (the revision of every event in `events`).
    pub revision: i64,
    /// Ordered by key, as `KvStore::apply` returns them.
    pub events: Vec<kv::Event>,
}

/// How many event batches a slow watch stream may fall behind the apply loop before it
/// stops receiving them and catches up from store history instead. Bounded so a stalled
/// client cannot make the node buffer without limit.
pub const EVENT_FEED_CAPACITY: usize = 1024;

/// Fan-out of applied events to watch streams. The node owns one per KV group and calls
/// [`EventFeed::publish`] after every apply that produced events. Publishing never blocks:
/// a receiver that falls more than [`EVENT_FEED_CAPACITY`] batches behind is told it lagged.
#[derive(Clone, Debug)]
pub struct EventFeed {
    tx: broadcast::Sender<Arc<EventBatch>>,
}

impl Default for EventFeed {
    fn default() -> Self {
        EventFeed::new()
    }
}

impl EventFeed {
    pub fn new() -> EventFeed {
        let (tx, _) = broadcast::channel(EVENT_FEED_CAPACITY);
        EventFeed { tx }
    }

    /// Hands the events of one applied command to every subscribed watch stream. Call it
    /// after the store shows `revision`, in apply order. Empty batches are skipped.
    pub fn publish(&self, revision: i64, events: Vec<kv::Event>) {
        if events.is_empty() {
            return;
        }
        debug_assert!(events.iter().all(|e| e.kv.mod_revision == revision));
        // An error only means nobody is watching right now.
        let _ = self.tx.send(Arc::new(EventBatch { revision, events }));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventBatch>> {
        self.tx.subscribe()
    }
}

/// What the etcd front-end needs from a member. Implemented by the node runtime.
///
/// All async methods return `Send` futures so tonic can run them on any worker thread.
pub trait Backend: Send + Sync + 'static {
    /// Cluster id, this member's id and the current term, for response headers. Cheap:
    /// called once per response.
    fn header(&self) -> HeaderStamp;

    /// Replicates `cmd` and resolves with the store's response once it has been applied
    /// on this member. A `KvError` from the state machine comes back inside
    /// `Response::result`, not as `Err`.
    ///
    /// Commands that carry a `now_ms` (lease grant, keep-alive) are built by the front-end
    /// with `now_ms = 0`: the backend stamps them with the leader's clock before the
    /// command enters the log, because lease time is the leader's time.
    fn propose(
        &self,
        cmd: kv::Command,
    ) -> impl Future<Output = Result<kv::Response, BackendError>> + Send;

    /// Resolves once this member's store has applied everything that was committed when
    /// the call was made (a ReadIndex barrier), so a read that follows is linearizable.
    /// Serializable reads skip it.
    fn read_barrier(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Runs a transaction and returns its response. `serializable` is true when every
    /// operation of both branches is a range the client marked serializable (etcd's
    /// rule), so a member may answer from its local state without a read barrier.
    ///
    /// The default replicates it like any write. A node may instead serve a transaction
    /// without puts or deletes (at any nesting level) from its local store, after a read
    /// barrier unless `serializable`, evaluating every compare and range at one revision.
    fn txn(
        &self,
        req: kv::TxnRequest,
        serializable: bool,
    ) -> impl Future<Output = Result<kv::TxnResponse, BackendError>> + Send {
        let _ = serializable;
        async move {
            let resp = self.propose(kv::Command::Txn(req)).await?;
            match resp.result {
                Ok(kv::ResponseBody::Txn(r)) => Ok(r),
                Ok(other) => Err(BackendError::Internal(format!(
                    "txn answered with {other:?}"
                ))),
                Err(e) => Err(BackendError::Kv(e)),
            }
        }
    }

    /// Runs `f` on the local store. Must not block for long: hold the store lock only
    /// for the duration of `f`.
    fn with_store<R>(&self, f: impl FnOnce(&kv::KvStore) -> R) -> R;

    /// The feed of applied events, for watch streams.
    fn events(&self) -> &EventFeed;

    /// Renews a lease to its full TTL. The default proposes a keep-alive command; the
    /// leader stamps its clock into it (see [`Backend::propose`]).
    fn lease_keep_alive(
        &self,
        id: kv::LeaseId,
    ) -> impl Future<Output = Result<kv::LeaseKeepAliveResponse, BackendError>> + Send {
        async move {
            let resp = self
                .propose(kv::Command::LeaseKeepAlive { id, now_ms: 0 })
                .await?;
            match resp.result {
                Ok(kv::ResponseBody::LeaseKeepAlive(r)) => Ok(r),
                Ok(other) => Err(BackendError::Internal(format!(
                    "keep-alive answered with {other:?}"
                ))),
                Err(e) => Err(BackendError::Kv(e)),
            }
        }
    }

    /// Remaining TTL of a lease, computed with the leader's clock (a follower forwards the
    /// question or answers with a read barrier and the leader's time).
    fn lease_time_to_live(
        &self,
        id: kv::LeaseId,
        keys: bool,
    ) -> impl Future<Output = Result<kv::LeaseTimeToLive, BackendError>> + Send;

    /// Current members, voters and learners.
    fn members(&self) -> impl Future<Output = Result<Vec<MemberInfo>, BackendError>> + Send;

    /// Adds a member (as a learner if asked); returns it and the new member list.
    fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> impl Future<Output = Result<(MemberInfo, Vec<MemberInfo>), BackendError>> + Send;

    /// Removes a member; returns the remaining members.
    fn member_remove(
        &self,
        id: u64,
    ) -> impl Future<Output = Result<Vec<MemberInfo>, BackendError>> + Send;

    /// Changes a member's peer URLs; returns the member list.
    fn member_update(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> impl Future<Output = Result<Vec<MemberInfo>, BackendError>> + Send;

    /// Promotes a learner to voter; returns the member list.
    fn member_promote(
        &self,
        id: u64,
    ) -> impl Future<Output = Result<Vec<MemberInfo>, BackendError>> + Send;

    /// Consensus status of this member.
    fn status(&self) -> impl Future<Output = Result<NodeStatus, BackendError>> + Send;
}
