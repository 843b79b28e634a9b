//! Raft, following Ongaro's thesis ("Consensus: Bridging Theory and Practice", 2014).
//!
//! The core is pure: it never sends, writes, sleeps or draws randomness of its own. See the
//! crate docs for the `Ready`/`advance` loop. Design decisions worth knowing:
//!
//! - **Roles** change only in `become_follower`, `become_pre_candidate`,
//!   `become_candidate` and `become_leader`. [`Raft::step`] applies the term rules once,
//!   then hands the message to one function per role.
//! - **Durability.** Messages produced while handling a step go out in the same `Ready`
//!   as the entries/hard state they depend on, and the driver sends them only once those
//!   are durable. The leader counts its *own* entries toward commit only after
//!   `advance()` confirms them durable (`RaftLog::stable`).
//! - **Membership** takes effect when a ConfChange entry is *appended* (thesis §4.1),
//!   is rolled back if that entry is truncated, and is recomputed on restart from the
//!   snapshot's configuration plus the ConfChange entries in the recovered log. One
//!   change at a time: a new one is refused until the previous one commits.
//! - **Reads.** `read_index` on a follower is forwarded to the leader it knows (or fails
//!   with `NotLeader` when it knows none); see [`read_only`].
//! - **Replication** to followers is flushed when `ready()` is built, so many proposals
//!   made between two `Ready`s share one append message per follower.

mod conf;
mod follower;
mod log;
pub mod msg;
mod progress;
mod quorum;
mod read_only;
mod reads;
mod replication;

use crate::{
    ConfChange, ConfChangeItem, ConfState, Config, ConfigError, DecodeError, Entry, EntryKind,
    HardState, NodeId, Outgoing, Prng, ProposeError, ReadMode, ReadState, Ready, Recovered,
    Replica, Role, Snapshot, SnapshotMeta, Status, NO_NODE,
};
use conf::ConfHistory;
use log::RaftLog;
pub use msg::{Body, Message};
use progress::{Progress, ProgressState};
use quorum::VoteResult;
use read_only::ReadOnly;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Most committed entries handed out in one `Ready`; the rest follow in the next one.
pub const MAX_COMMITTED_PER_READY: usize = 4096;
/// Largest snapshot a follower will assemble from chunks (a bound on memory).
pub const MAX_SNAPSHOT_BYTES: usize = 4 << 30;

/// Bugs that can be planted for the simulator to catch (see [`Config::inject_bug`]).
pub const KNOWN_BUGS: &[&str] = &[
    "commit_old_term",
    "vote_without_persist",
    "lease_without_check_quorum",
    "skip_log_up_to_date_check",
    "count_own_unpersisted",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// Counts replicas of entries from earlier terms toward commit (breaks Figure 8), and,
    /// like implementations that make this mistake, sees no need for a no-op on election.
    CommitOldTerm,
    /// Grants a vote without putting it in `Ready::hard_state`: a crash forgets it and the
    /// node can vote twice in one term.
    VoteWithoutPersist,
    /// Serves lease reads although the lease is never checked and the leader never steps
    /// down for lack of a quorum.
    LeaseWithoutCheckQuorum,
    /// Grants (pre-)votes without the §5.4.1 up-to-date check.
    SkipLogUpToDateCheck,
    /// A leader counts the copy of its entries that the `Ready` being handed out is only
    /// about to persist toward the commit quorum, so a driver that applies committed
    /// entries before persisting (docs/consensus.md, rule 3) may apply an entry that a
    /// crash then loses.
    CountOwnUnpersisted,
}

impl Bug {
    fn parse(name: &str) -> Option<Bug> {
        Some(match name {
            "commit_old_term" => Bug::CommitOldTerm,
            "vote_without_persist" => Bug::VoteWithoutPersist,
            "lease_without_check_quorum" => Bug::LeaseWithoutCheckQuorum,
            "skip_log_up_to_date_check" => Bug::SkipLogUpToDateCheck,
            "count_own_unpersisted" => Bug::CountOwnUnpersisted,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StateRole {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// A snapshot being assembled from chunks on a follower.
#[derive(Clone, Debug)]
struct IncomingSnapshot {
    term: u64,
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// A Raft replica. See the module docs.
pub struct Raft {
    cfg: Config,
    id: NodeId,
    bug: Option<Bug>,
    prng: Prng,

    // Persistent state (thesis Figure 3.1), plus the log.
    term: u64,
    vote: NodeId,
    log: RaftLog,
    commit: u64,

    role: StateRole,
    leader: NodeId,
    /// Ticks since the last election timeout reset (on a leader: since the last
    /// check-quorum round).
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    /// This round's election timeout, in `[election_ticks, 2 * election_ticks)`.
    randomized_timeout: u32,
    /// After a restart we do not know whether we promised a leader not to vote for others
    /// (its lease relies on it), so with check_quorum we act as if we had just heard from a
    /// leader for one election timeout.
    lease_guard: bool,
    /// Ticks since creation: the leader's lease clock.
    ticks: u64,
    votes: BTreeMap<NodeId, bool>,

    conf: ConfHistory,
    /// Leader: the other nodes' progress.
    progress: BTreeMap<NodeId, Progress>,
    /// Index of the last ConfChange entry appended (leader); a new change waits for it
    /// to commit.
    pending_conf_index: u64,
    /// Leader: payload bytes proposed in this term and not yet committed.
    uncommitted_bytes: usize,
    /// Leader: the index of this term's no-op.
    term_start_index: u64,
    lead_transferee: NodeId,
    transfer_elapsed: u32,
    /// This candidacy was started by TimeoutNow (its vote requests say so).
    campaign_transfer: bool,
    reads: ReadOnly,
    /// Follower: reads forwarded to the leader and not yet answered.
    /// Follower: when each read forwarded to the leader and not yet answered was sent.
    /// Entries older than two election timeouts are presumed lost (dropped by a full leader
    /// queue or the network; the caller has timed out) so the bound cannot fill up forever.
    forwarded_reads: VecDeque<u64>,

    /// The newest snapshot, kept to send to lagging followers (shared with the transfers
    /// in progress).
    snapshot: Option<Arc<Snapshot>>,
    incoming: Option<IncomingSnapshot>,
    /// A snapshot to hand to the driver in the next `Ready`.
    pending_snapshot: Option<Snapshot>,

    msgs: Vec<Outgoing<Message>>,
    read_states: Vec<ReadState>,
    /// The hard state last handed out (or recovered).
    prev_hs: HardState,
    applied: u64,
    /// Last index handed out in `Ready::committed`.
    applying: u64,
    ready_outstanding: bool,
    /// Leader: appends may be due (new entries, acks, or a commit to announce).
    replicate_dirty: bool,
    /// vote_without_persist bug: the vote is hidden from `Ready::hard_state`.
    bug_hide_vote: bool,
    /// Peer messages dropped because their content was impossible (see `drop_bad`).
    bad_messages: u64,
}

impl Raft {
    fn bug(&self, b: Bug) -> bool {
        self.bug == Some(b)
    }

    fn conf_state(&self) -> &ConfState {
        self.conf.current()
    }

    fn promotable(&self) -> bool {
        self.conf_state().is_voter(self.id)
    }

    fn e(&self) -> u32 {
        self.cfg.election_ticks
    }

    fn send(&mut self, to: NodeId, body: Body) {
        debug_assert_ne!(to, self.id);
        self.msgs.push(Outgoing {
            to,
            msg: Message {
                term: self.term,
                body,
            },
        });
    }

    fn set_term(&mut self, term: u64) {
        assert!(
            term >= self.term,
            "term must never decrease ({} -> {term})",
            self.term
        );
        if term > self.term {
            self.term = term;
            self.vote = NO_NODE;
            self.bug_hide_vote = false;
        }
    }

    fn reset_timers(&mut self) {
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let e = u64::from(self.e());
        self.randomized_timeout = self.prng.range(e, 2 * e) as u32;
    }

    /// Common reset on every role change.
    fn reset(&mut self, term: u64) {
        self.set_term(term);
        self.reset_timers();
        self.votes.clear();
        self.progress.clear();
        self.lead_transferee = NO_NODE;
        self.transfer_elapsed = 0;
        self.campaign_transfer = false;
        self.reads.clear();
        self.forwarded_reads.clear();
        self.replicate_dirty = false;
    }

    // ----- role changes -----------------------------------------------------------------

    fn become_follower(&mut self, term: u64, leader: NodeId) {
        self.reset(term);
        self.role = StateRole::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        assert_ne!(
            self.role,
            StateRole::Leader,
            "a leader does not pre-campaign"
        );
        // Pre-vote (thesis §9.6) leaves term and vote alone: a partitioned node that keeps
        // failing pre-votes never inflates its term and so cannot disrupt the cluster when
        // it rejoins.
        let term = self.term;
        self.reset(term);
        self.role = StateRole::PreCandidate;
        self.leader = NO_NODE;
        self.votes.insert(self.id, true);
        if self.poll() == VoteResult::Won {
            self.become_candidate(false);
            return;
        }
        self.send_vote_requests();
    }

    fn become_candidate(&mut self, transfer: bool) {
        assert_ne!(self.role, StateRole::Leader, "a leader does not campaign");
        let term = self.term + 1;
        self.reset(term);
        self.role = StateRole::Candidate;
        self.leader = NO_NODE;
        self.vote = self.id;
        self.votes.insert(self.id, true);
        if self.poll() == VoteResult::Won {
            self.become_leader();
            return;
        }
        self.campaign_transfer = transfer;
        self.send_vote_requests();
    }

    fn become_leader(&mut self) {
        assert_eq!(
            self.role,
            StateRole::Candidate,
            "only a candidate becomes leader"
        );
        let term = self.term;
        self.reset(term);
        self.role = StateRole::Leader;
        self.leader = self.id;
        let next = self.log.last_index() + 1;
        for id in self.conf_state().all_nodes() {
            if id != self.id {
                self.progress
                    .insert(id, Progress::new(next, self.cfg.max_inflight_msgs));
            }
        }
        // Any ConfChange still uncommitted in our log is already in effect (on append);
        // no new change until everything up to here, including the no-op, commits.
        self.pending_conf_index = self.log.last_index();
        self.uncommitted_bytes = 0;
        // Thesis §6.4: an entry of our own term lets us commit (and learn) everything before
        // it and is a prerequisite for serving reads. Normally a no-op; but the very first
        // entry of a group records the founding configuration (as a ConfChange that changes
        // nothing for the founders), so a replica that joins later with an empty log and
        // replays it from index 1 learns whom the later ConfChange entries apply to.
        if self.log.last_index() == 0 {
            let founding = self.conf_state();
            let changes = founding
                .voters
                .iter()
                .map(|&v| ConfChangeItem::AddVoter(v))
                .chain(
                    founding
                        .learners
                        .iter()
                        .map(|&l| ConfChangeItem::AddLearner(l)),
                )
                .collect();
            self.append_entry(EntryKind::ConfChange, ConfChange { changes }.encode());
        } else if !self.bug(Bug::CommitOldTerm) {
            self.append_entry(EntryKind::Noop, Vec::new());
        }
        self.term_start_index = self.log.last_index();
        self.pending_conf_index = self.term_start_index;
        self.replicate_dirty = true;
    }

    /// Who receives our (pre-)vote requests: every other node of the configuration,
    /// learners included. Only voters' answers count, but a node we list as a learner may
    /// in fact have been promoted (our configuration can be stale); if it never heard of our
    /// campaigns it could keep campaigning in terms we already used and never win
    /// (observed in simulation with a stale voter and a lagging configuration).
    fn campaign_targets(&self) -> Vec<NodeId> {
        self.conf_state()
            .all_nodes()
            .into_iter()
            .filter(|&id| id != self.id)
            .collect()
    }

    /// Sends (pre-)vote requests to every campaign target that has not answered yet.
    /// Called when the campaign starts and again every heartbeat interval while it lasts:
    /// requests are idempotent and retried like any Raft RPC, so a lost request or a voter
    /// that was down does not cost a whole election timeout.
    fn send_vote_requests(&mut self) {
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let transfer = self.campaign_transfer;
        for to in self.campaign_targets() {
            if self.votes.contains_key(&to) {
                continue;
            }
            let (term, body) = match self.role {
                StateRole::PreCandidate => (
                    self.term + 1,
                    Body::PreVote {
                        last_index,
                        last_term,
                    },
                ),
                StateRole::Candidate => (
                    self.term,
                    Body::Vote {
                        last_index,
                        last_term,
                        transfer,
                    },
                ),
                _ => return,
            };
            self.msgs.push(Outgoing {
                to,
                msg: Message { term, body },
            });
        }
    }

    fn poll(&self) -> VoteResult {
        quorum::joint_vote(self.conf_state(), &self.votes)
    }

    fn campaign(&mut self) {
        if !self.promotable() {
            return;
        }
        if self.cfg.pre_vote {
            self.become_pre_candidate();
        } else {
            self.become_candidate(false);
        }
    }

    // ----- log and membership -----------------------------------------------------------

    /// Leader: appends a new entry of the current term.
    fn append_entry(&mut self, kind: EntryKind, data: Vec<u8>) {
        let e = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            kind,
            data,
        };
        if kind == EntryKind::ConfChange {
            self.pending_conf_index = e.index;
        }
        self.on_appended(&e);
        self.log.append(e);
        self.replicate_dirty = true;
    }

    /// Applies a ConfChange entry's configuration as it is appended (thesis §4.1).
    fn on_appended(&mut self, e: &Entry) {
        if e.kind != EntryKind::ConfChange {
            return;
        }
        let Ok(cc) = ConfChange::decode(&e.data) else {
            return; // Applies as nothing on every replica alike.
        };
        let Ok(next) = conf::apply_change(self.conf_state(), &cc) else {
            return;
        };
        self.conf.push(e.index, next);
        self.on_conf_changed();
    }

    /// Keeps leader bookkeeping in line with the configuration now in effect.
    fn on_conf_changed(&mut self) {
        if self.role != StateRole::Leader {
            return;
        }
        let all = self.conf_state().all_nodes();
        self.progress.retain(|id, _| all.contains(id));
        let next = self.log.last_index() + 1;
        for id in all {
            if id != self.id && !self.progress.contains_key(&id) {
                self.progress
                    .insert(id, Progress::new(next, self.cfg.max_inflight_msgs));
            }
        }
        if self.lead_transferee != NO_NODE && !self.conf_state().is_voter(self.lead_transferee) {
            self.lead_transferee = NO_NODE;
        }
    }

    fn truncate_from(&mut self, index: u64) {
        assert!(index > self.commit, "never truncate committed entries");
        self.log.truncate_from(index);
        let before = self.conf.current_index();
        self.conf.truncate_from(index);
        if self.conf.current_index() != before {
            self.on_conf_changed();
        }
    }

    fn commit_to(&mut self, index: u64) {
        if index <= self.commit {
            return;
        }
        assert!(index <= self.log.last_index(), "commit beyond the log");
        self.commit = index;
    }

    // Leader-side replication lives in replication.rs, follower-side in follower.rs and
    // reads in reads.rs.

    // ----- step --------------------------------------------------------------------------

    /// Whether we promised a leader (by hearing from it within an election timeout) not to
    /// support anyone else yet (thesis §4.2.3, §9.6).
    fn in_lease(&self, pre_vote: bool) -> bool {
        let heard = self.leader != NO_NODE || (self.lease_guard && self.cfg.check_quorum);
        (self.cfg.check_quorum || pre_vote) && heard && self.election_elapsed < self.e()
    }

    /// Peer messages dropped so far because their content was impossible.
    pub fn bad_messages(&self) -> u64 {
        self.bad_messages
    }

    /// Drops a peer message whose content no correct peer could have sent (forged,
    /// corrupt, or from a buggy peer). Messages are input: they may be wrong, they must
    /// never crash us or make us act on them. Counted for the operator and for tests.
    pub(super) fn drop_bad(&mut self) {
        self.bad_messages += 1;
    }

    fn step_inner(&mut self, from: NodeId, m: Message) {
        if from == NO_NODE || from == self.id || !m.within_bounds() {
            self.drop_bad();
            return;
        }
        let known = self.conf_state().all_nodes().contains(&from);
        let from_leader_or_candidate = matches!(
            m.body,
            Body::Append { .. }
                | Body::Heartbeat { .. }
                | Body::Snapshot { .. }
                | Body::TimeoutNow
                | Body::Vote { .. }
                | Body::PreVote { .. }
        );
        // Requests from a node outside our configuration are still processed (thesis §4.1:
        // servers do not consult their configuration for incoming RPCs): we may simply
        // not have the ConfChange that added it yet, and a candidate that needs our vote
        // must get an answer or the group can deadlock. Disruption by removed servers is
        // contained by pre-vote and leader stickiness (§4.2.3). Anything else from a
        // stranger (answers to requests we never sent) is ignored.
        if !known && !from_leader_or_candidate {
            return;
        }

        // The term rules, once, for every message (thesis Figure 3.1).
        if m.term > self.term {
            match &m.body {
                Body::Vote { transfer, .. } => {
                    if !transfer && self.in_lease(false) {
                        return;
                    }
                    self.become_follower(m.term, NO_NODE);
                }
                Body::PreVote { .. } => {
                    if self.in_lease(true) {
                        return;
                    }
                    // A pre-vote never changes our term.
                }
                Body::PreVoteResp { reject: false } => {
                    // A grant carries the term we would campaign in; not a newer term.
                }
                Body::Append { .. } | Body::Heartbeat { .. } | Body::Snapshot { .. } => {
                    self.become_follower(m.term, from);
                }
                _ => self.become_follower(m.term, NO_NODE),
            }
        } else if m.term < self.term {
            match m.body {
                Body::Append { .. } | Body::Heartbeat { .. }
                    if self.cfg.check_quorum || self.cfg.pre_vote =>
                {
                    // A stale leader (e.g. back from a partition) must learn our term,
                    // otherwise with pre-vote nobody ever tells it and it never steps down.
                    self.send(from, Body::append_reject(0, 0, 0));
                }
                Body::PreVote { .. } => self.send(from, Body::PreVoteResp { reject: true }),
                // Figure 3.1: the reply carries our term so a stale candidate catches up. It
                // may hear of newer terms from nobody else (e.g. we are the only other
                // voter in its configuration while ours no longer lists it).
                Body::Vote { .. } => self.send(from, Body::VoteResp { reject: true }),
                _ => {}
            }
            return;
        }

        match m.body {
            Body::Vote {
                last_index,
                last_term,
                ..
            } => self.handle_vote(from, m.term, last_index, last_term, false),
            Body::PreVote {
                last_index,
                last_term,
            } => self.handle_vote(from, m.term, last_index, last_term, true),
            body => match self.role {
                StateRole::Leader => self.step_leader(from, body),
                StateRole::Candidate | StateRole::PreCandidate => {
                    self.step_candidate(from, m.term, body)
                }
                StateRole::Follower => self.step_follower(from, body),
            },
        }
    }

    fn handle_vote(&mut self, from: NodeId, term: u64, last_index: u64, last_term: u64, pre: bool) {
        // No check that we are a voter ourselves: we may have been promoted (or re-added)
        // without having the entry yet, and the candidate only counts votes of nodes in its
        // own configuration anyway.
        let can_vote = self.vote == from
            || (self.vote == NO_NODE && self.leader == NO_NODE)
            || (pre && term > self.term);
        let up_to_date =
            self.log.is_up_to_date(last_index, last_term) || self.bug(Bug::SkipLogUpToDateCheck);
        let grant = can_vote && up_to_date;
        if pre {
            // A grant echoes the pre-vote's term; a refusal carries ours.
            let t = if grant { term } else { self.term };
            self.msgs.push(Outgoing {
                to: from,
                msg: Message {
                    term: t,
                    body: Body::PreVoteResp { reject: !grant },
                },
            });
            return;
        }
        if grant {
            self.vote = from;
            self.election_elapsed = 0;
            if self.bug(Bug::VoteWithoutPersist) {
                self.bug_hide_vote = true;
            }
        }
        self.send(from, Body::VoteResp { reject: !grant });
    }

    fn step_candidate(&mut self, from: NodeId, msg_term: u64, body: Body) {
        match body {
            Body::Append { .. } | Body::Heartbeat { .. } | Body::Snapshot { .. } => {
                // Someone won this term: follow it.
                self.become_follower(msg_term, from);
                self.step_follower(from, body);
            }
            Body::PreVoteResp { reject } if self.role == StateRole::PreCandidate => {
                self.votes.insert(from, !reject);
                match self.poll() {
                    VoteResult::Won => self.become_candidate(false),
                    VoteResult::Lost => {
                        let term = self.term;
                        self.become_follower(term, NO_NODE);
                    }
                    VoteResult::Pending => {}
                }
            }
            Body::VoteResp { reject } if self.role == StateRole::Candidate => {
                self.votes.insert(from, !reject);
                match self.poll() {
                    VoteResult::Won => self.become_leader(),
                    VoteResult::Lost => {
                        let term = self.term;
                        self.become_follower(term, NO_NODE);
                    }
                    VoteResult::Pending => {}
                }
            }
            Body::TimeoutNow => self.on_timeout_now(),
            _ => {}
        }
    }

    fn on_timeout_now(&mut self) {
        if self.promotable() && self.role != StateRole::Leader {
            self.become_candidate(true);
        }
    }

    fn step_follower(&mut self, from: NodeId, body: Body) {
        match body {
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                self.election_elapsed = 0;
                self.leader = from;
                self.handle_append(from, prev_index, prev_term, entries, commit);
            }
            Body::Heartbeat {
                commit,
                read_seq,
                sent_tick,
            } => {
                self.election_elapsed = 0;
                self.leader = from;
                // The leader caps `commit` at our match index, so this never commits an
                // entry we hold that differs from the leader's.
                let c = commit.min(self.log.last_index());
                self.commit_to(c);
                self.send(
                    from,
                    Body::HeartbeatResp {
                        read_seq,
                        sent_tick,
                    },
                );
            }
            Body::Snapshot {
                meta,
                offset,
                data,
                done,
            } => {
                self.election_elapsed = 0;
                self.leader = from;
                self.handle_snapshot_chunk(from, meta, offset, data, done);
            }
            Body::TimeoutNow => self.on_timeout_now(),
            Body::ReadIndexResp { index, ctx } => {
                self.forwarded_reads.pop_front();
                self.read_states.push(ReadState { index, ctx });
            }
            _ => {}
        }
    }

    fn step_leader(&mut self, from: NodeId, body: Body) {
        match body {
            Body::AppendResp {
                index,
                reject,
                hint_index,
                hint_term,
            } => self.handle_append_resp(from, index, reject, hint_index, hint_term),
            Body::HeartbeatResp {
                read_seq,
                sent_tick,
            } => self.handle_heartbeat_resp(from, read_seq, sent_tick),
            Body::SnapshotResp { index, next_offset } => {
                let Some(pr) = self.progress.get_mut(&from) else {
                    return;
                };
                pr.recent_active = true;
                if pr.state != ProgressState::Snapshot || pr.snapshot_index() != index {
                    return;
                }
                let snap_len = pr.snapshot.as_ref().map_or(0, |s| s.data.len() as u64);
                // Each answer moves the stream by at most one chunk; a duplicate answer
                // (same offset) must not start a second stream.
                let next_offset = next_offset.min(snap_len);
                if next_offset == pr.snapshot_offset {
                    return;
                }
                pr.snapshot_offset = next_offset;
                self.send_snapshot_chunk(from);
            }
            // A full queue drops the read; the follower's client times out.
            Body::ReadIndex { ctx } if self.progress.contains_key(&from) => {
                let _ = self.leader_read(from, ctx);
            }
            _ => {}
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.lead_transferee != NO_NODE {
            self.transfer_elapsed += 1;
            if self.transfer_elapsed >= self.e() {
                // Thesis §3.10: abort a transfer that did not finish within an election
                // timeout so clients are not refused forever.
                self.lead_transferee = NO_NODE;
            }
        }
        if self.election_elapsed >= self.e() {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.bug(Bug::LeaseWithoutCheckQuorum) {
                let (id, progress) = (self.id, &self.progress);
                let active = quorum::joint_active(self.conf_state(), |v| {
                    v == id || progress.get(&v).is_some_and(|p| p.recent_active)
                });
                if !active {
                    // Thesis §6.2: step down so clients can find the real leader.
                    let term = self.term;
                    self.become_follower(term, NO_NODE);
                    return;
                }
            }
            for p in self.progress.values_mut() {
                p.recent_active = false;
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            let seq = self.reads.broadcast_seq();
            self.broadcast_heartbeat(seq);
        }
    }

    fn tick_other(&mut self) {
        let expiry = 2 * u64::from(self.e());
        while self
            .forwarded_reads
            .front()
            .is_some_and(|&t| self.ticks.saturating_sub(t) >= expiry)
        {
            self.forwarded_reads.pop_front();
        }
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        if self.election_elapsed >= self.e() {
            self.lease_guard = false;
        }
        if self.election_elapsed >= self.randomized_timeout && self.promotable() {
            self.campaign();
        } else if matches!(self.role, StateRole::PreCandidate | StateRole::Candidate)
            && self.election_elapsed.checked_rem(self.cfg.heartbeat_ticks) == Some(0)
        {
            self.send_vote_requests();
        }
    }

    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: if self.bug_hide_vote {
                NO_NODE
            } else {
                self.vote
            },
            commit: self.commit,
        }
    }

    fn check_invariants(&self) {
        assert!(
            self.commit <= self.log.last_index(),
            "commit beyond the log"
        );
        assert!(self.applied <= self.commit, "applied beyond commit");
        assert!(self.applying <= self.commit, "applying beyond commit");
        assert!(self.log.stable() <= self.log.persisting());
        assert!(self.log.persisting() <= self.log.last_index());
        assert!(
            self.commit >= self.log.snapshot_index(),
            "commit behind the snapshot"
        );
        if self.role == StateRole::Leader {
            assert_eq!(self.leader, self.id);
            assert!(
                self.log.last_term() == self.term || self.bug(Bug::CommitOldTerm),
                "leader's last entry is of its term"
            );
        }
    }
}

impl Replica for Raft {
    type Message = Message;

    fn create(
        config: Config,
        initial: ConfState,
        recovered: Recovered,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        config.validate_bug(KNOWN_BUGS)?;
        let (snap_index, snap_term, base_conf) = recovered.base(initial);
        let log = RaftLog::new(snap_index, snap_term, recovered.entries.clone())
            .map_err(|r| ConfigError::new("recovered.entries", r))?;
        let mut hs = recovered.hard_state;
        if hs.term < log.last_term() {
            // The entries and the hard state of one Ready were written together, and a
            // crash before the fsync kept the entries but not the hard state. We learned
            // that term from its leader without voting in it (a vote is always made durable
            // before its answer leaves, in an earlier Ready), so adopting the term with no
            // vote is exactly the state we were in.
            hs.term = log.last_term();
            hs.vote = NO_NODE;
        }
        // `commit` may have been persisted lazily (behind) but never ahead of the log;
        // entries already applied are committed by definition.
        let applied = recovered.applied.clamp(snap_index, log.last_index());
        let commit = hs.commit.clamp(snap_index, log.last_index()).max(applied);
        let bug = config.inject_bug.as_deref().and_then(Bug::parse);
        let mut r = Raft {
            id: config.id,
            bug,
            prng: Prng::new(config.seed),
            term: hs.term,
            vote: hs.vote,
            log,
            commit,
            role: StateRole::Follower,
            leader: NO_NODE,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_timeout: config.election_ticks,
            // A brand-new replica never acknowledged any leader, so it owes nobody.
            // Only leases depend on that promise, so the guard is only needed with lease
            // reads.
            lease_guard: config.check_quorum && config.read_mode == ReadMode::Lease && hs.term > 0,
            ticks: 1,
            votes: BTreeMap::new(),
            conf: ConfHistory::new(base_conf),
            progress: BTreeMap::new(),
            pending_conf_index: 0,
            uncommitted_bytes: 0,
            term_start_index: 0,
            lead_transferee: NO_NODE,
            transfer_elapsed: 0,
            campaign_transfer: false,
            reads: ReadOnly::new(config.max_pending_reads),
            forwarded_reads: VecDeque::new(),
            snapshot: recovered.snapshot.clone().map(Arc::new),
            incoming: None,
            pending_snapshot: None,
            msgs: Vec::new(),
            read_states: Vec::new(),
            // What is on disk; an adjusted hard state is written with the first Ready.
            prev_hs: recovered.hard_state,
            applied,
            applying: applied,
            ready_outstanding: false,
            replicate_dirty: false,
            bug_hide_vote: false,
            bad_messages: 0,
            cfg: config,
        };
        // Recompute the configuration from the ConfChange entries after the snapshot.
        for e in recovered.entries {
            r.on_appended(&e);
        }
        r.reset_timers();
        r.check_invariants();
        Ok(r)
    }

    fn known_bugs() -> &'static [&'static str] {
        KNOWN_BUGS
    }

    fn id(&self) -> NodeId {
        self.id
    }

    fn tick(&mut self) {
        self.ticks += 1;
        if self.role == StateRole::Leader {
            self.tick_leader();
        } else {
            self.tick_other();
        }
        self.check_invariants();
    }

    fn step(&mut self, from: NodeId, msg: Message) {
        let term_before = self.term;
        let commit_before = self.commit;
        self.step_inner(from, msg);
        assert!(self.term >= term_before, "term decreased");
        assert!(self.commit >= commit_before, "commit decreased");
        self.check_invariants();
    }

    fn propose(&mut self, data: Vec<u8>) -> Result<(), ProposeError> {
        if self.role != StateRole::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.lead_transferee != NO_NODE {
            return Err(ProposeError::Transferring);
        }
        if data.len() > self.cfg.max_entry_bytes {
            return Err(ProposeError::TooLarge {
                size: data.len(),
                max: self.cfg.max_entry_bytes,
            });
        }
        if self.uncommitted_bytes + data.len() > self.cfg.max_uncommitted_bytes {
            return Err(ProposeError::Busy);
        }
        self.uncommitted_bytes += data.len();
        self.append_entry(EntryKind::Normal, data);
        self.check_invariants();
        Ok(())
    }

    fn propose_conf_change(&mut self, change: ConfChange) -> Result<(), ProposeError> {
        if self.role != StateRole::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.lead_transferee != NO_NODE {
            return Err(ProposeError::Transferring);
        }
        if self.pending_conf_index > self.commit {
            return Err(ProposeError::ConfChangeRejected(
                "another membership change is in flight",
            ));
        }
        if change.changes.is_empty() {
            return Err(ProposeError::ConfChangeRejected(
                "empty change (leaving a joint configuration is automatic)",
            ));
        }
        conf::apply_change(self.conf_state(), &change).map_err(ProposeError::ConfChangeRejected)?;
        let data = change.encode();
        self.uncommitted_bytes += data.len();
        self.append_entry(EntryKind::ConfChange, data);
        self.check_invariants();
        Ok(())
    }

    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        match self.role {
            StateRole::Leader => self.leader_read(self.id, ctx),
            _ if self.leader != NO_NODE => {
                if self.forwarded_reads.len() >= self.cfg.max_pending_reads {
                    return Err(ProposeError::Busy);
                }
                self.forwarded_reads.push_back(self.ticks);
                let leader = self.leader;
                self.send(leader, Body::ReadIndex { ctx });
                Ok(())
            }
            _ => Err(ProposeError::NotLeader { leader: NO_NODE }),
        }
    }

    fn transfer_leader(&mut self, to: NodeId) {
        if self.role != StateRole::Leader || to == self.id || self.lead_transferee == to {
            return;
        }
        if !self.conf_state().is_voter(to) || !self.progress.contains_key(&to) {
            return;
        }
        self.lead_transferee = to;
        self.transfer_elapsed = 0;
        let pr = self.progress.get_mut(&to).expect("checked above");
        if pr.matched == self.log.last_index() {
            self.send(to, Body::TimeoutNow);
        } else {
            // Catch the target up now rather than at the next heartbeat answer: probe
            // from its match point (appends in flight may have been lost).
            if pr.state != ProgressState::Snapshot {
                let next = pr.matched + 1;
                pr.become_probe(next);
            }
            self.replicate_dirty = true;
        }
    }

    fn compact(&mut self, index: u64, data: Vec<u8>) {
        // Ignore requests that are stale or ahead of what was applied (a driver bug we
        // refuse to turn into data loss).
        if index <= self.log.snapshot_index() || index > self.applied || index > self.log.stable() {
            return;
        }
        let term = self.log.term(index).expect("applied index is in the log");
        let conf = self.conf.at(index).clone();
        self.log.compact_to(index);
        self.conf.compact_to(index);
        self.snapshot = Some(Arc::new(Snapshot {
            meta: SnapshotMeta { index, term, conf },
            data,
        }));
    }

    fn has_ready(&self) -> bool {
        if self.ready_outstanding {
            return false;
        }
        !self.msgs.is_empty()
            || self.log.has_unpersisted()
            || self.pending_snapshot.is_some()
            || self.hard_state() != self.prev_hs
            || self.applying < self.commit
            || !self.read_states.is_empty()
            || (self.role == StateRole::Leader
                && (self.replicate_dirty || self.reads.needs_broadcast()))
    }

    fn ready(&mut self) -> Ready<Message> {
        assert!(
            !self.ready_outstanding,
            "Raft::ready called again before advance()"
        );
        if self.role == StateRole::Leader {
            self.flush_replication();
            if let Some(seq) = self.reads.take_broadcast() {
                self.broadcast_heartbeat(seq);
            }
        }
        let snapshot = self.pending_snapshot.take();
        let entries = self.log.take_unpersisted();
        let hs = self.hard_state();
        let hard_state = (hs != self.prev_hs).then_some(hs);
        // The commit index need not be durable before anything is sent (a restarted
        // replica learns it again), so a Ready that only moves it is written without an
        // fsync (as etcd's raft does): one fsync per write on each replica instead of two.
        let must_sync = snapshot.is_some()
            || !entries.is_empty()
            || hs.term != self.prev_hs.term
            || hs.vote != self.prev_hs.vote;
        let (prev_term, prev_vote) = (self.prev_hs.term, self.prev_hs.vote);
        self.prev_hs = hs;
        // `committed` holds entries committed on a quorum of persisted copies (our own
        // counts only from `stable`, set in `advance`), each in our log up to `persisting`:
        // the driver may apply them before it persists this Ready.
        if self.bug(Bug::CountOwnUnpersisted) && self.role == StateRole::Leader {
            // Planted: count our copy of what this very Ready is about to persist.
            let saved = self.log.stable();
            self.log.set_stable_for_bug(self.log.last_index());
            self.maybe_commit();
            self.log.set_stable_for_bug(saved);
        }
        let hi = self.commit.min(self.log.persisting());
        let committed = self
            .log
            .slice(self.applying + 1, hi, MAX_COMMITTED_PER_READY, usize::MAX);
        if let Some(last) = committed.last() {
            assert_eq!(
                committed[0].index,
                self.applying + 1,
                "apply must be contiguous"
            );
            self.applying = last.index;
        }
        // A leader's appends, heartbeats and snapshot chunks may leave before its own
        // entries are durable: its own copy counts toward commit only from `advance` on
        // (`maybe_commit` uses `log.stable()`), and its term was made durable when it
        // campaigned. Not in a Ready that changes the term or vote.
        let mut messages = std::mem::take(&mut self.msgs);
        let send_before_persist = if self.role == StateRole::Leader
            && hard_state.is_none_or(|h| (h.term, h.vote) == (prev_term, prev_vote))
        {
            crate::partition_early(&mut messages, |m: &Message| {
                m.term == self.term
                    && matches!(
                        m.body,
                        Body::Append { .. } | Body::Heartbeat { .. } | Body::Snapshot { .. }
                    )
            })
        } else {
            0
        };
        self.ready_outstanding = true;
        Ready {
            snapshot,
            entries,
            hard_state,
            must_sync,
            messages,
            send_before_persist,
            committed,
            read_states: std::mem::take(&mut self.read_states),
        }
    }

    fn advance(&mut self) {
        assert!(self.ready_outstanding, "advance() without a ready()");
        self.ready_outstanding = false;
        self.log.mark_stable();
        self.applied = self.applying;
        // Our own entries are durable now and count toward commit.
        self.maybe_commit();
        self.check_invariants();
    }

    fn status(&self) -> Status {
        let conf = self.conf_state().clone();
        let role = match self.role {
            StateRole::Follower if !conf.is_voter(self.id) && conf.learners.contains(&self.id) => {
                Role::Learner
            }
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        };
        Status {
            id: self.id,
            role,
            term: self.term,
            leader: self.leader,
            commit: self.commit,
            applied: self.applied,
            first_index: self.log.first_index(),
            last_index: self.log.last_index(),
            conf,
        }
    }

    fn conf_at(&self, index: u64) -> ConfState {
        self.conf.at(index).clone()
    }

    fn match_index(&self, id: NodeId) -> Option<u64> {
        if self.role != StateRole::Leader {
            return None;
        }
        if id == self.id {
            return Some(self.log.last_index());
        }
        self.progress.get(&id).map(|p| p.matched)
    }

    fn encode_message(msg: &Message) -> Vec<u8> {
        postcard::to_allocvec(msg).expect("encoding an in-memory message cannot fail")
    }

    fn decode_message(bytes: &[u8]) -> Result<Message, DecodeError> {
        match postcard::take_from_bytes::<Message>(bytes) {
            Ok((m, [])) => Ok(m),
            Ok(_) => Err(DecodeError("raft message: trailing bytes")),
            Err(_) => Err(DecodeError("raft message: malformed")),
        }
    }
}

impl Raft {
    /// The configuration currently in effect (on append).
    pub fn conf(&self) -> &ConfState {
        self.conf_state()
    }

    /// Entries in `lo..=hi` still in memory (for tests and tools).
    pub fn log_entries(&self, lo: u64, hi: u64) -> Vec<Entry> {
        self.log
            .slice(lo.max(self.log.first_index()), hi, usize::MAX, usize::MAX)
    }

    /// A one-line dump of the leader's view of its followers (for test failures).
    pub fn debug_progress(&self) -> String {
        let mut out = format!(
            "role={:?} elapsed={}/{} transferee={} pending_conf={} stable={} ",
            self.role,
            self.election_elapsed,
            self.randomized_timeout,
            self.lead_transferee,
            self.pending_conf_index,
            self.log.stable()
        );
        for (id, p) in &self.progress {
            out.push_str(&format!(
                "[{id}: {:?} m={} n={} paused={} infl={} active={}] ",
                p.state,
                p.matched,
                p.next,
                p.paused,
                p.inflights.is_empty(),
                p.recent_active
            ));
        }
        out
    }

    /// The leader's transfer target, if a transfer is in progress.
    pub fn transferee(&self) -> NodeId {
        self.lead_transferee
    }
}

#[cfg(test)]
mod tests;
