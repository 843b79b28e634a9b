//! Multi-Paxos with a distinguished leader (Lamport, "Paxos Made Simple", section 3;
//! van Renesse and Altinbuken, "Paxos Made Moderately Complex").
//!
//! # Roles
//!
//! Every replica is an acceptor. A replica whose election timer fires becomes a
//! *candidate*: it picks a ballot above every ballot it has seen and runs phase 1 for every
//! slot above its commit index at once. Once a quorum has promised, it becomes the *leader*:
//! it re-proposes, in its own ballot, the highest-ballot value reported for each slot, fills
//! gaps with [`EntryKind::Noop`], and from then on runs only phase 2 (pipelined, batched)
//! for new proposals. Followers learn chosen slots from the commit index carried by
//! `Accept` and `Heartbeat` messages.
//!
//! # Mapping onto the shared persistence types
//!
//! - A ballot is `(round, node)` packed as `round << 16 | node` (see [`ballot`]); node ids
//!   must be below 65536 (checked in [`Paxos::create`]).
//! - `HardState.term` is the highest promised ballot, `HardState.vote` its owner and
//!   `HardState.commit` the highest slot known chosen (every slot up to it is chosen).
//! - Each accepted slot is an [`Entry`] whose `index` is the slot and whose `term` is the
//!   ballot it was accepted in. The stored log is contiguous from the snapshot.
//! - Because the driver truncates its stored log from the first index of `Ready::entries`,
//!   re-accepting slot `s` under a higher ballot re-emits the whole held suffix `s..=last`
//!   (see [`log::SlotLog`]); an acceptor never forgets an accepted value of a later slot.
//! - Acceptors keep the slots accepted under the current ballot contiguous: an `Accept` for
//!   slots starting at `prev + 1` is taken only if every slot up to `prev` is already
//!   chosen or accepted under that same ballot; otherwise the acceptor answers `Reject` with
//!   how far it got and the leader resends from there. That makes the `matched` index in
//!   `Accepted` trustworthy: every slot up to it holds this leader's value, so the leader
//!   counts it towards a quorum and the acceptor may take the leader's commit index up to
//!   it.
//!
//! # Membership changes
//!
//! A `ConfChange` entry at slot `s` governs slots `> s` (the configuration of slot `i` is
//! given by the chosen conf changes below `i`). The leader proposes at most one change at a
//! time and proposes nothing after it until it is chosen (`propose` answers `Busy`
//! meanwhile), so a change never takes effect for a slot that was proposed before the change
//! was chosen. Phase 1 must cover every configuration that can govern an unchosen slot: a
//! candidate needs promises from a majority of the configuration after its commit index,
//! and for each conf change found among the reported values (in slot order) also from a
//! majority of the configuration it creates. When the leader's own change is chosen and
//! its phase-1 quorum is not also a majority of the new configuration, it immediately
//! starts phase 1 again with a higher ballot under the new configuration. Because of this,
//! any change (several nodes at once) is safe without a joint phase.
//!
//! # Reads
//!
//! After phase 1, every value chosen before the leader took over lies at or below the
//! highest slot reported in phase 1 (`recovery_max`). A read gets the index
//! `max(commit, recovery_max)` and is answered once a heartbeat round started after the
//! request was acknowledged by a quorum (the leader still holds the highest ballot) and
//! the commit index has reached it. With `ReadMode::Lease` (needs `check_quorum`) the leader
//! answers at once while its lease holds: the lease runs from the send time of the last
//! heartbeat a quorum acknowledged for `election_ticks - heartbeat_ticks` ticks, and
//! acceptors ignore non-forced prepares for `election_ticks` after hearing from a leader
//! (and after a restart), so no other ballot can win phase 1 while the lease holds.
//!
//! # Planted bugs
//!
//! See [`KNOWN_BUGS`]; each is realistic and makes faulty simulations break safety.

pub mod ballot;
mod log;
mod message;
mod quorum;

pub use message::Message;

use crate::{
    ConfChange, ConfState, Config, ConfigError, DecodeError, Entry, EntryKind, HardState, NodeId,
    Outgoing, Prng, ProposeError, ReadMode, ReadState, Ready, Recovered, Replica, Role, Snapshot,
    SnapshotMeta, Status, NO_NODE,
};
use ballot::MAX_NODE_ID;
use log::SlotLog;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Bugs that can be planted with `Config::inject_bug`.
pub const KNOWN_BUGS: &[&str] = &[
    // The acceptor takes phase-2 messages whose ballot is below its promise.
    "accept_below_promise",
    // A node taking over with a new ballot ignores the values reported in phase 1 and
    // proposes from its own log only.
    "skip_phase1_after_ballot_change",
    // Promises are never written to `Ready::hard_state`, so a crash forgets them.
    "forget_promise_on_restart",
    // The leader answers every read at once from its commit index, as if its lease never
    // expired.
    "stale_lease_read",
];

#[derive(Clone, Copy, Debug, Default)]
struct Bugs {
    accept_below_promise: bool,
    skip_phase1: bool,
    forget_promise: bool,
    stale_lease_read: bool,
}

impl Bugs {
    fn from(name: Option<&str>) -> Bugs {
        Bugs {
            accept_below_promise: name == Some("accept_below_promise"),
            skip_phase1: name == Some("skip_phase1_after_ballot_change"),
            forget_promise: name == Some("forget_promise_on_restart"),
            stale_lease_read: name == Some("stale_lease_read"),
        }
    }
    fn any(&self) -> bool {
        self.accept_below_promise
            || self.skip_phase1
            || self.forget_promise
            || self.stale_lease_read
    }
}

/// Phase-1 state of a candidate.
#[derive(Debug, Default)]
struct Candidate {
    /// Nodes whose promise is complete (all pages received).
    promised: BTreeSet<NodeId>,
    /// Commit index each promiser reported.
    promiser_commit: BTreeMap<NodeId, u64>,
    /// Highest-ballot value reported per slot above our commit index.
    merged: BTreeMap<u64, Entry>,
    /// Nodes a prepare was sent to.
    asked: BTreeSet<NodeId>,
    /// The page each unfinished promiser was last asked for (resent while it is silent).
    next_page: BTreeMap<NodeId, u64>,
    /// Whether the prepares bypass the lease guard (leadership transfer).
    force: bool,
}

/// Snapshot transfer to one peer (one chunk in flight).
#[derive(Debug, Clone, Copy)]
struct SnapSend {
    index: u64,
    offset: u64,
    sent_at: u64,
}

/// The leader's view of one peer.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every slot up to `matched` holds our value (or a chosen one) at the peer.
    matched: u64,
    /// Next slot to send.
    next: u64,
    /// Accept messages sent and not yet answered (bounded by `max_inflight_msgs`).
    inflight: usize,
    /// Tick of the last Accept sent (to detect lost accepts via heartbeat acks).
    accept_sent_at: u64,
    /// Highest heartbeat round acknowledged (read barrier).
    acked_seq: u64,
    /// Send tick of the latest acknowledged heartbeat (lease).
    acked_sent_at: Option<u64>,
    snap: Option<SnapSend>,
}

#[derive(Debug)]
struct PendingRead {
    ctx: Vec<u8>,
    index: u64,
    seq: u64,
}

/// State of a leader (phase 1 done for its ballot).
#[derive(Debug, Default)]
struct Leader {
    peers: BTreeMap<NodeId, Progress>,
    /// The phase-1 quorum (frozen when phase 1 completed).
    promisers: BTreeSet<NodeId>,
    /// Highest slot reported in phase 1; every value chosen before we led is at or below.
    recovery_max: u64,
    /// Our own slots written under our ballot and durable.
    self_match: u64,
    hb_elapsed: u32,
    cq_elapsed: u32,
    hb_seq: u64,
    /// Peers heard from since the last check-quorum round.
    active: BTreeSet<NodeId>,
    reads: VecDeque<PendingRead>,
    /// Leadership transfer target and ticks left before giving up.
    transfer: Option<(NodeId, u32)>,
    /// Slot of our conf change not yet chosen.
    pending_conf: Option<u64>,
    uncommitted_bytes: usize,
}

/// Snapshot being received in chunks.
#[derive(Debug)]
struct Incoming {
    meta: SnapshotMeta,
    total: u64,
    data: Vec<u8>,
}

/// A Multi-Paxos replica. See the module docs.
pub struct Paxos {
    cfg: Config,
    id: NodeId,
    prng: Prng,
    bugs: Bugs,
    role: Role,
    /// Highest ballot promised (our own when candidate or leader).
    promised: u64,
    leader: NodeId,
    max_round_seen: u64,
    log: SlotLog,
    commit: u64,
    /// Committed entries handed to the driver up to here.
    delivered: u64,
    applied: u64,
    /// Committed configurations: `confs[k].1` governs slots above `confs[k].0`.
    confs: Vec<(u64, ConfState)>,
    /// Latest snapshot (to send to lagging peers).
    snapshot: Option<Snapshot>,
    pending_snapshot: Option<Snapshot>,
    incoming: Option<Incoming>,
    /// Slots up to `bmatch` are chosen or accepted under `bmatch_ballot` (see module docs).
    bmatch_ballot: u64,
    bmatch: u64,
    ticks: u64,
    elapsed: u32,
    timeout: u32,
    /// Ticks left during which non-forced prepares from others are ignored (lease guard).
    guard: u32,
    cand: Option<Candidate>,
    lead: Option<Leader>,
    msgs: Vec<Outgoing<Message>>,
    read_states: Vec<ReadState>,
    /// Hard state last handed out in a Ready.
    last_hs: HardState,
    /// (ballot, last index) of the entries in the last Ready, made durable by `advance`.
    pending_stable: Option<(u64, u64)>,
    pending_applied: u64,
    /// Peer messages dropped because their content was impossible (see `drop_bad`).
    bad_messages: u64,
}

impl std::fmt::Debug for Paxos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paxos")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("promised", &self.promised)
            .field("commit", &self.commit)
            .field("last", &self.log.last_index())
            .finish()
    }
}

fn data_len(e: &Entry) -> usize {
    e.data.len()
}

impl Paxos {
    /// Peer messages dropped so far because their content was impossible.
    pub fn bad_messages(&self) -> u64 {
        self.bad_messages
    }

    /// Drops a peer message whose content no correct peer could have sent (forged,
    /// corrupt, or from a buggy peer). Messages are input: they may be wrong, they must
    /// never crash us or make us act on them. Counted for the operator and for tests.
    fn drop_bad(&mut self) {
        self.bad_messages += 1;
    }

    fn strict(&self) -> bool {
        // Invariant checks that a planted bug is meant to break are left to the simulator's
        // checkers, so a planted-bug run reports a violation instead of a panic.
        !self.bugs.any()
    }

    /// The configuration governing slot `slot` according to chosen conf changes.
    fn conf_for(&self, slot: u64) -> &ConfState {
        let mut cur = &self.confs[0].1;
        for (s, c) in &self.confs {
            if *s < slot {
                cur = c;
            } else {
                break;
            }
        }
        cur
    }

    /// The newest committed configuration.
    fn conf(&self) -> &ConfState {
        &self.confs.last().expect("at least one configuration").1
    }

    fn is_voter(&self) -> bool {
        self.conf().is_voter(self.id)
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        if to != self.id && to != NO_NODE {
            self.msgs.push(Outgoing { to, msg });
        }
    }

    fn reset_timeout(&mut self) {
        self.elapsed = 0;
        let e = u64::from(self.cfg.election_ticks);
        self.timeout = self.prng.range(e, 2 * e) as u32;
    }

    fn set_promised(&mut self, b: u64) {
        assert!(
            b >= self.promised || !self.strict(),
            "promised ballot decreased from {} to {b}",
            self.promised
        );
        self.promised = b;
        self.max_round_seen = self.max_round_seen.max(ballot::round(b));
    }

    fn hard_state(&self) -> HardState {
        if self.bugs.forget_promise {
            // Planted bug: only the commit index reaches storage.
            return HardState {
                commit: self.commit,
                ..self.last_hs
            };
        }
        HardState {
            term: self.promised,
            vote: ballot::owner(self.promised),
            commit: self.commit,
        }
    }

    // ----- role changes -------------------------------------------------------------

    fn become_follower(&mut self, leader: NodeId) {
        self.role = if self.is_voter() {
            Role::Follower
        } else {
            Role::Learner
        };
        self.cand = None;
        self.lead = None;
        self.leader = leader;
        self.reset_timeout();
    }

    /// Starts phase 1 with a ballot above everything seen.
    fn campaign(&mut self, force: bool) {
        if !self.is_voter() {
            return;
        }
        let round = ballot::round(self.promised).max(self.max_round_seen) + 1;
        if round > ballot::MAX_ROUND {
            return; // Ballots exhausted; cannot happen in practice (2^48 rounds).
        }
        let b = ballot::make(round, self.id);
        self.set_promised(b);
        self.role = Role::Candidate;
        self.lead = None;
        self.leader = NO_NODE;
        self.reset_timeout();
        let mut cand = Candidate::default();
        for e in self.log.slice(self.commit + 1, self.log.last_index()) {
            cand.merged.insert(e.index, e.clone());
        }
        cand.promised.insert(self.id);
        cand.promiser_commit.insert(self.id, self.commit);
        cand.asked.insert(self.id);
        cand.force = force;
        self.cand = Some(cand);
        self.ask_promises(force);
        self.check_phase1();
    }

    /// The configurations phase 1 must cover: the committed one, then one per conf change
    /// among the reported values, in slot order.
    fn phase1_chain(&self, cand: &Candidate) -> Vec<ConfState> {
        let mut chain = vec![self.conf_for(self.commit + 1).clone()];
        for e in cand.merged.values() {
            if e.kind == EntryKind::ConfChange {
                if let Ok(cc) = ConfChange::decode(&e.data) {
                    let next = quorum::apply(chain.last().expect("non-empty"), &cc);
                    chain.push(next);
                }
            }
        }
        chain
    }

    /// Sends prepares to every voter of the phase-1 chain not asked yet.
    fn ask_promises(&mut self, force: bool) {
        let Some(cand) = self.cand.as_ref() else {
            return;
        };
        let mut todo = Vec::new();
        for conf in self.phase1_chain(cand) {
            for v in conf.voters.iter().chain(&conf.voters_outgoing) {
                if !cand.asked.contains(v) && !todo.contains(v) {
                    todo.push(*v);
                }
            }
        }
        let (b, commit) = (self.promised, self.commit);
        for v in todo {
            if let Some(c) = self.cand.as_mut() {
                c.asked.insert(v);
                c.next_page.insert(v, commit + 1);
            }
            self.send(
                v,
                Message::Prepare {
                    ballot: b,
                    commit,
                    from: commit + 1,
                    force,
                },
            );
        }
    }

    /// Every two heartbeat intervals of a campaign.
    fn resend_due(&self) -> bool {
        self.elapsed.is_multiple_of(2 * self.cfg.heartbeat_ticks)
    }

    /// A lost prepare or promise would otherwise cost a whole election timeout: ask the
    /// silent acceptors again for the page they owe.
    fn resend_prepares(&mut self) {
        let Some(cand) = self.cand.as_ref() else {
            return;
        };
        let (b, commit, force) = (self.promised, self.commit, cand.force);
        let todo: Vec<(NodeId, u64)> = cand.next_page.iter().map(|(&n, &f)| (n, f)).collect();
        for (n, from) in todo {
            self.send(
                n,
                Message::Prepare {
                    ballot: b,
                    commit,
                    from,
                    force,
                },
            );
        }
    }

    fn check_phase1(&mut self) {
        let Some(cand) = self.cand.as_ref() else {
            return;
        };
        let done = self
            .phase1_chain(cand)
            .iter()
            .all(|c| quorum::has_quorum(c, |n| cand.promised.contains(&n)));
        if done {
            self.become_leader();
        }
    }

    fn become_leader(&mut self) {
        let mut cand = self.cand.take().expect("candidate");
        let b = self.promised;
        let c = self.commit;
        // Our own log is part of our promise; it cannot have changed since the campaign
        // started unless an acceptor bug let a lower ballot in, and even then no accepted
        // value may be dropped.
        for e in self.log.slice(c + 1, self.log.last_index()) {
            let newer = cand.merged.get(&e.index).is_none_or(|m| e.term > m.term);
            if newer {
                cand.merged.insert(e.index, e.clone());
            }
        }
        let max = cand.merged.keys().next_back().copied().unwrap_or(c).max(c);
        // Re-propose, in our ballot, the highest-ballot value of every slot above the
        // commit index and fill gaps with no-ops (Paxos Made Simple, section 3).
        self.log.truncate_from(c + 1);
        let mut pending_conf = None;
        let mut bytes = 0;
        for i in c + 1..=max {
            let mut e = cand.merged.get(&i).cloned().unwrap_or(Entry {
                index: i,
                term: b,
                kind: EntryKind::Noop,
                data: Vec::new(),
            });
            e.index = i;
            e.term = b;
            if e.kind == EntryKind::ConfChange {
                pending_conf = Some(i);
            }
            bytes += data_len(&e);
            self.log.put(e);
        }
        self.role = Role::Leader;
        self.leader = self.id;
        let mut lead = Leader {
            promisers: cand.promised.clone(),
            recovery_max: max,
            self_match: c,
            pending_conf,
            uncommitted_bytes: bytes,
            ..Leader::default()
        };
        for n in self.targets() {
            // A promiser holds chosen values up to its commit index; others are probed
            // from our commit index and answer with how far they really are.
            let (matched, next) = match cand.promiser_commit.get(&n) {
                Some(&pc) => (pc.min(max), pc.min(max) + 1),
                None => (0, c + 1),
            };
            lead.peers.insert(
                n,
                Progress {
                    matched,
                    next,
                    ..Progress::default()
                },
            );
        }
        self.lead = Some(lead);
        self.broadcast_heartbeat();
        self.broadcast_append();
        self.maybe_commit();
    }

    /// Every node that should receive the log from a leader: members of the committed
    /// configuration and of any configuration in the uncommitted log, except us.
    fn targets(&self) -> BTreeSet<NodeId> {
        let mut out: BTreeSet<NodeId> = self.conf().all_nodes().into_iter().collect();
        let mut cur = self.conf().clone();
        for e in self.log.slice(self.commit + 1, self.log.last_index()) {
            if e.kind == EntryKind::ConfChange {
                if let Ok(cc) = ConfChange::decode(&e.data) {
                    cur = quorum::apply(&cur, &cc);
                    out.extend(cur.all_nodes());
                }
            }
        }
        out.remove(&self.id);
        out
    }

    fn refresh_peers(&mut self) {
        let targets = self.targets();
        let next = self.log.last_index() + 1;
        if let Some(lead) = self.lead.as_mut() {
            lead.peers.retain(|n, _| targets.contains(n));
            for n in targets {
                lead.peers.entry(n).or_insert(Progress {
                    next,
                    ..Progress::default()
                });
            }
        }
    }

    // ----- commit ---------------------------------------------------------------------

    /// Leader: advance the commit index over every slot a quorum of its configuration
    /// accepted in our ballot.
    fn maybe_commit(&mut self) {
        let Some(lead) = self.lead.as_ref() else {
            return;
        };
        let last = self.log.last_index();
        let matched = |n: NodeId| {
            if n == self.id {
                lead.self_match
            } else {
                lead.peers.get(&n).map_or(0, |p| p.matched)
            }
        };
        if lead.pending_conf.is_none() {
            // Fast path: one configuration governs every open slot, so the commit index is
            // the highest slot a quorum has matched.
            let q = quorum::quorum_value(self.conf_for(self.commit + 1), matched).min(last);
            if q > self.commit {
                self.commit_to(q);
            }
            return;
        }
        let mut cur = self.conf_for(self.commit + 1).clone();
        let mut i = self.commit + 1;
        while i <= last {
            let ok = quorum::has_quorum(&cur, |n| matched(n) >= i);
            if !ok {
                break;
            }
            if let Some(e) = self.log.get(i) {
                if e.kind == EntryKind::ConfChange {
                    if let Ok(cc) = ConfChange::decode(&e.data) {
                        cur = quorum::apply(&cur, &cc);
                    }
                }
            }
            i += 1;
        }
        if i - 1 > self.commit {
            self.commit_to(i - 1);
        }
    }

    /// Marks every slot up to `index` chosen and applies committed conf changes.
    fn commit_to(&mut self, index: u64) {
        assert!(index >= self.commit, "commit decreased");
        assert!(
            index <= self.log.last_index(),
            "commit {index} beyond the log (last {})",
            self.log.last_index()
        );
        let old = self.commit;
        self.commit = index;
        let mut conf_changed = false;
        let mut freed = 0;
        for i in old + 1..=index {
            let Some(e) = self.log.get(i) else { continue };
            freed += data_len(e);
            if e.kind == EntryKind::ConfChange {
                // An undecodable change applies as nothing on every replica alike.
                if let Ok(cc) = ConfChange::decode(&e.data) {
                    let next = quorum::apply(self.conf(), &cc);
                    self.confs.push((i, next));
                    conf_changed = true;
                }
            }
        }
        if let Some(lead) = self.lead.as_mut() {
            lead.uncommitted_bytes = lead.uncommitted_bytes.saturating_sub(freed);
            if lead.pending_conf.is_some_and(|s| s <= index) {
                lead.pending_conf = None;
            }
        }
        if !conf_changed {
            self.release_reads();
            return;
        }
        if self.role == Role::Learner && self.is_voter() {
            self.role = Role::Follower;
        } else if self.role == Role::Follower && !self.is_voter() {
            self.role = Role::Learner;
        }
        if self.lead.is_some() {
            if !self.is_voter() {
                // We removed ourselves: tell the others the change is chosen, then step
                // down.
                self.broadcast_heartbeat();
                self.become_follower(NO_NODE);
                return;
            }
            let covered = {
                let lead = self.lead.as_ref().expect("leader");
                let conf = self.conf().clone();
                quorum::has_quorum(&conf, |n| lead.promisers.contains(&n))
            };
            if covered {
                self.refresh_peers();
                self.release_reads();
            } else {
                // Our phase-1 quorum does not cover the new configuration: run phase 1
                // again under it before proposing anything it governs.
                self.campaign(false);
            }
        } else if self.cand.is_some() {
            self.check_phase1();
        }
    }

    // ----- leader sending -------------------------------------------------------------

    fn broadcast_append(&mut self) {
        let peers: Vec<NodeId> = match self.lead.as_ref() {
            Some(l) => l.peers.keys().copied().collect(),
            None => return,
        };
        for p in peers {
            self.send_append(p);
        }
    }

    /// Sends as many Accept batches to `to` as its window allows.
    fn send_append(&mut self, to: NodeId) {
        let b = self.promised;
        let commit = self.commit;
        let last = self.log.last_index();
        let first = self.log.first_index();
        let ticks = self.ticks;
        let max_inflight = self.cfg.max_inflight_msgs;
        let max_entries = self.cfg.max_batch_entries;
        let max_bytes = self.cfg.max_batch_bytes;
        let mut out = Vec::new();
        let mut snap_needed = false;
        {
            let Some(lead) = self.lead.as_mut() else {
                return;
            };
            let Some(p) = lead.peers.get_mut(&to) else {
                return;
            };
            if p.snap.is_some() {
                return;
            }
            while p.inflight < max_inflight && p.next <= last {
                if p.next < first {
                    snap_needed = true;
                    break;
                }
                let mut batch = Vec::new();
                let mut bytes = 0;
                for e in self.log.slice(p.next, last) {
                    if batch.len() >= max_entries
                        || (!batch.is_empty() && bytes + e.data.len() > max_bytes)
                    {
                        break;
                    }
                    bytes += e.data.len();
                    batch.push(e.clone());
                }
                let prev = p.next - 1;
                p.next += batch.len() as u64;
                p.inflight += 1;
                p.accept_sent_at = ticks;
                out.push(Message::Accept {
                    ballot: b,
                    prev,
                    entries: batch,
                    commit,
                });
            }
        }
        for m in out {
            self.send(to, m);
        }
        if snap_needed {
            self.start_snapshot(to);
        }
    }

    fn start_snapshot(&mut self, to: NodeId) {
        let Some(index) = self.snapshot.as_ref().map(|s| s.meta.index) else {
            return;
        };
        let ticks = self.ticks;
        if let Some(p) = self.lead.as_mut().and_then(|l| l.peers.get_mut(&to)) {
            p.snap = Some(SnapSend {
                index,
                offset: 0,
                sent_at: ticks,
            });
        }
        self.send_snapshot_chunk(to);
    }

    fn send_snapshot_chunk(&mut self, to: NodeId) {
        let b = self.promised;
        let ticks = self.ticks;
        let chunk = self.cfg.snapshot_chunk_bytes;
        let Some(snap) = self.snapshot.as_ref() else {
            return;
        };
        let Some(p) = self.lead.as_mut().and_then(|l| l.peers.get_mut(&to)) else {
            return;
        };
        let Some(s) = p.snap.as_mut() else { return };
        if s.index != snap.meta.index {
            // A newer snapshot replaced the one being sent: start over with it.
            s.index = snap.meta.index;
            s.offset = 0;
        }
        s.sent_at = ticks;
        let total = snap.data.len() as u64;
        let off = s.offset.min(total) as usize;
        let end = (off + chunk).min(snap.data.len());
        let msg = Message::Snapshot {
            ballot: b,
            meta: snap.meta.clone(),
            total,
            offset: off as u64,
            data: snap.data[off..end].to_vec(),
        };
        self.send(to, msg);
    }

    fn broadcast_heartbeat(&mut self) {
        let b = self.promised;
        let commit = self.commit;
        let ticks = self.ticks;
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        lead.hb_elapsed = 0;
        lead.hb_seq += 1;
        let seq = lead.hb_seq;
        let peers: Vec<NodeId> = lead.peers.keys().copied().collect();
        for p in peers {
            self.send(
                p,
                Message::Heartbeat {
                    ballot: b,
                    commit,
                    seq,
                    sent_at: ticks,
                },
            );
        }
        self.release_reads();
    }

    // ----- reads ----------------------------------------------------------------------

    fn lease_valid(&self) -> bool {
        let Some(lead) = self.lead.as_ref() else {
            return false;
        };
        if !self.cfg.check_quorum || self.cfg.read_mode != ReadMode::Lease {
            return false;
        }
        if lead.transfer.is_some() {
            return false;
        }
        // The send tick of the newest heartbeat a quorum acknowledged, shifted by one so
        // that 0 means "no acknowledgement" (tick 0 is a valid send time).
        let start_plus_one = quorum::quorum_value(self.conf(), |n| {
            if n == self.id {
                self.ticks + 1
            } else {
                lead.peers
                    .get(&n)
                    .and_then(|p| p.acked_sent_at)
                    .map_or(0, |t| t + 1)
            }
        });
        let Some(start) = start_plus_one.checked_sub(1) else {
            return false;
        };
        // Shorter than the `election_ticks` for which acceptors ignore other candidates.
        let len = u64::from(self.cfg.election_ticks - self.cfg.heartbeat_ticks);
        self.ticks < start + len
    }

    /// Answers pending reads whose heartbeat round a quorum acknowledged.
    fn release_reads(&mut self) {
        let commit = self.commit;
        let id = self.id;
        let conf = self.conf().clone();
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        let acked = quorum::quorum_value(&conf, |n| {
            if n == id {
                u64::MAX
            } else {
                lead.peers.get(&n).map_or(0, |p| p.acked_seq)
            }
        });
        while let Some(r) = lead.reads.front() {
            if r.seq > acked || r.index > commit {
                break;
            }
            let r = lead.reads.pop_front().expect("front");
            self.read_states.push(ReadState {
                index: r.index,
                ctx: r.ctx,
            });
        }
    }

    // ----- message handlers -----------------------------------------------------------

    /// A phase-2 or heartbeat message from the owner of `b` (not lower than our promise):
    /// follow it.
    fn follow(&mut self, b: u64) {
        if b > self.promised {
            self.set_promised(b);
        }
        let owner = ballot::owner(b);
        if self.role != Role::Follower && self.role != Role::Learner || self.leader != owner {
            self.become_follower(owner);
        }
        self.elapsed = 0;
        if self.cfg.check_quorum {
            self.guard = self.cfg.election_ticks;
        }
        if self.bmatch_ballot != b {
            self.bmatch_ballot = b;
            self.bmatch = self.commit;
            // After a restart we may already hold slots from this ballot's leader.
            while self.log.get(self.bmatch + 1).is_some_and(|e| e.term == b) {
                self.bmatch += 1;
            }
        }
        self.bmatch = self.bmatch.max(self.commit);
    }

    /// Takes the leader's commit index as far as the slots accepted under its ballot go.
    fn learn_commit(&mut self, b: u64, leader_commit: u64) {
        if self.bmatch_ballot == b {
            let to = leader_commit.min(self.bmatch);
            if to > self.commit {
                self.commit_to(to);
            }
        }
    }

    fn nack(&mut self, to: NodeId, b: u64) {
        let promised = self.promised;
        self.send(
            to,
            Message::Nack {
                ballot: b,
                promised,
                behind: false,
            },
        );
    }

    fn on_prepare(&mut self, from: NodeId, b: u64, commit: u64, page_from: u64, force: bool) {
        if b < self.promised {
            self.nack(from, b);
            return;
        }
        if b > self.promised {
            let leader_alive = self.role == Role::Leader || self.guard > 0;
            if self.cfg.check_quorum && !force && leader_alive && from != self.leader {
                // Lease guard: a live leader may be serving lease reads; do not promise.
                return;
            }
        }
        let page_from = page_from.max(commit.saturating_add(1));
        if page_from < self.log.first_index() {
            // We compacted slots the candidate has not learned; it cannot lead with our
            // promise. Refusing is always safe.
            self.send(
                from,
                Message::Nack {
                    ballot: b,
                    promised: self.promised,
                    behind: true,
                },
            );
            return;
        }
        if b > self.promised {
            self.set_promised(b);
            self.become_follower(NO_NODE);
        }
        let last = self.log.last_index();
        let mut entries = Vec::new();
        let mut bytes = 0;
        for e in self.log.slice(page_from, last) {
            if entries.len() >= self.cfg.max_batch_entries
                || (!entries.is_empty() && bytes + e.data.len() > self.cfg.max_batch_bytes)
            {
                break;
            }
            bytes += e.data.len();
            entries.push(e.clone());
        }
        let done = page_from + entries.len() as u64 > last;
        let commit = self.commit;
        self.send(
            from,
            Message::Promise {
                ballot: b,
                from: page_from,
                entries,
                done,
                commit,
            },
        );
    }

    fn on_promise(
        &mut self,
        from: NodeId,
        b: u64,
        page_from: u64,
        entries: Vec<Entry>,
        done: bool,
        commit: u64,
    ) {
        if self.role != Role::Candidate || b != self.promised {
            return;
        }
        let my_commit = self.commit;
        let skip = self.bugs.skip_phase1;
        let Some(cand) = self.cand.as_mut() else {
            return;
        };
        if cand.promised.contains(&from) || cand.next_page.get(&from) != Some(&page_from) {
            return; // Not asked, already complete, or a duplicate of an earlier page.
        }
        let mut expect = page_from;
        for e in entries {
            if e.index != expect || e.term > b {
                return; // Malformed page: ignore it, the timeout retries.
            }
            expect = expect.saturating_add(1);
            if e.index <= my_commit || skip {
                // Planted bug `skip_phase1_after_ballot_change`: reported values ignored.
                continue;
            }
            let newer = cand.merged.get(&e.index).is_none_or(|m| e.term > m.term);
            if newer {
                cand.merged.insert(e.index, e);
            }
        }
        if done {
            cand.next_page.remove(&from);
            cand.promised.insert(from);
            cand.promiser_commit.insert(from, commit);
            self.ask_promises(false);
            self.check_phase1();
        } else {
            cand.next_page.insert(from, expect);
            let force = cand.force;
            self.send(
                from,
                Message::Prepare {
                    ballot: b,
                    commit: my_commit,
                    from: expect,
                    force,
                },
            );
        }
    }

    fn on_nack(&mut self, b: u64, promised: u64, behind: bool) {
        self.max_round_seen = self.max_round_seen.max(ballot::round(promised));
        if behind || b != self.promised || promised <= b {
            return;
        }
        if matches!(self.role, Role::Leader | Role::Candidate) {
            // Preempted by a higher ballot: stop and let the election timer decide.
            self.become_follower(NO_NODE);
        }
    }

    fn on_accept(&mut self, from: NodeId, b: u64, prev: u64, entries: Vec<Entry>, commit: u64) {
        // Slots above the leader's commit index carry its ballot; slots at or below it are
        // chosen and keep the ballot they were accepted in (a new leader does not rewrite
        // chosen slots, it only resends them to acceptors that lag).
        for (k, e) in entries.iter().enumerate() {
            let well_formed = prev.checked_add(1 + k as u64) == Some(e.index)
                && (e.term == b || (e.term < b && e.index <= commit));
            if !well_formed {
                self.drop_bad();
                return;
            }
        }
        let below = b < self.promised;
        if below && !self.bugs.accept_below_promise {
            self.nack(from, b);
            return;
        }
        // A chosen slot never changes. At or above our promise, a leader proposes a chosen
        // slot's value only (phase 1 taught it), so an accept that contradicts one we hold
        // comes from a lying or broken peer: drop all of it before it touches our promise
        // or log. (Below the promise, which only the planted bug lets through, it is just
        // a deposed leader's stale proposal.)
        let contradicts = entries.iter().any(|e| {
            (e.index <= self.commit || e.index < self.log.first_index())
                && self
                    .log
                    .get(e.index)
                    .is_some_and(|mine| mine.kind != e.kind || mine.data != e.data)
        });
        if contradicts {
            if !below {
                self.drop_bad();
            }
            return;
        }
        if below {
            // Planted bug `accept_below_promise`: take it without touching the promise.
            if self.bmatch_ballot != b {
                self.bmatch_ballot = b;
                self.bmatch = self.commit;
            }
        } else {
            self.follow(b);
        }
        assert!(
            b >= self.promised || !self.strict(),
            "accepting ballot {b} below promise {}",
            self.promised
        );
        assert!(
            self.bmatch <= self.log.last_index(),
            "bmatch {} beyond log {:?} (ballot {b}, bmatch ballot {}, below {below})",
            self.bmatch,
            self,
            self.bmatch_ballot
        );
        if prev > self.bmatch {
            let matched = self.bmatch;
            self.send(from, Message::Reject { ballot: b, matched });
            return;
        }
        let n = entries.len() as u64;
        for e in entries {
            if e.index <= self.commit || e.index < self.log.first_index() {
                // Already chosen here, with this value (checked above).
                continue;
            }
            let same = self.log.get(e.index).is_some_and(|m| m.term == e.term);
            if !same {
                self.log.put(e);
            }
        }
        self.bmatch = self.bmatch.max(prev + n);
        self.learn_commit(b, commit);
        let matched = self.bmatch;
        self.send(from, Message::Accepted { ballot: b, matched });
    }

    fn on_accepted(&mut self, from: NodeId, b: u64, matched: u64, reject: bool) {
        if self.role != Role::Leader || b != self.promised {
            return;
        }
        let last = self.log.last_index();
        let target = {
            let Some(lead) = self.lead.as_mut() else {
                return;
            };
            lead.active.insert(from);
            let Some(p) = lead.peers.get_mut(&from) else {
                return;
            };
            let matched = matched.min(last);
            if reject {
                // The peer has a hole (or restarted and lost track): resend from where its
                // run of slots accepted in our ballot ends. Lowering `matched` only causes
                // a resend; the slots counted before are still durable there.
                p.matched = matched;
                p.next = matched + 1;
                p.inflight = 0;
            } else {
                p.matched = p.matched.max(matched);
                p.next = p.next.max(p.matched + 1);
                p.inflight = p.inflight.saturating_sub(1);
                if p.snap.is_some_and(|s| s.index <= p.matched) {
                    p.snap = None;
                }
            }
            lead.transfer
                .filter(|&(t, _)| t == from && p.matched >= last)
                .map(|(t, _)| t)
        };
        if let Some(t) = target {
            self.send(t, Message::TimeoutNow { ballot: b });
        }
        self.maybe_commit();
        if self.lead.is_some() {
            self.send_append(from);
        }
    }

    fn on_heartbeat(&mut self, from: NodeId, b: u64, commit: u64, seq: u64, sent_at: u64) {
        if b < self.promised && self.bugs.accept_below_promise {
            // Planted bug `accept_below_promise`: the same broken ballot check also
            // acknowledges a deposed leader's heartbeats, so it keeps leading.
            let matched = if self.bmatch_ballot == b {
                self.bmatch
            } else {
                self.commit
            };
            self.send(
                from,
                Message::HeartbeatAck {
                    ballot: b,
                    seq,
                    sent_at,
                    matched,
                },
            );
            return;
        }
        if b < self.promised {
            self.nack(from, b);
            return;
        }
        self.follow(b);
        self.learn_commit(b, commit);
        let matched = self.bmatch;
        self.send(
            from,
            Message::HeartbeatAck {
                ballot: b,
                seq,
                sent_at,
                matched,
            },
        );
    }

    /// Leader: the progress of a peer answering under our ballot `b`, marked active;
    /// `None` for an answer to another ballot or from a node we do not replicate to.
    fn answering_peer(&mut self, from: NodeId, b: u64) -> Option<&mut Progress> {
        if self.role != Role::Leader || b != self.promised {
            return None;
        }
        let lead = self.lead.as_mut()?;
        lead.active.insert(from);
        lead.peers.get_mut(&from)
    }

    fn on_heartbeat_ack(&mut self, from: NodeId, b: u64, seq: u64, sent_at: u64, matched: u64) {
        let last = self.log.last_index();
        let mut resend_snap = false;
        {
            let Some(p) = self.answering_peer(from, b) else {
                return;
            };
            p.acked_seq = p.acked_seq.max(seq);
            p.acked_sent_at = Some(p.acked_sent_at.map_or(sent_at, |s| s.max(sent_at)));
            p.matched = p.matched.max(matched.min(last));
            if p.next <= p.matched {
                p.next = p.matched + 1;
            }
            // The peer answered a heartbeat sent after our last Accept without having
            // everything we sent: those Accepts were lost, so resend.
            if p.snap.is_none()
                && p.accept_sent_at < sent_at
                && (p.next > p.matched + 1 || p.inflight > 0)
            {
                p.next = p.matched + 1;
                p.inflight = 0;
            }
            if let Some(s) = p.snap {
                if s.sent_at < sent_at {
                    resend_snap = true;
                }
            }
        }
        self.maybe_commit();
        if resend_snap {
            self.send_snapshot_chunk(from);
        } else if self.lead.is_some() {
            self.send_append(from);
        }
        self.release_reads();
        // A transfer target that caught up through heartbeats alone.
        let caught_up = self.lead.as_ref().is_some_and(|l| {
            l.transfer.is_some_and(|(t, _)| t == from)
                && l.peers.get(&from).is_some_and(|p| p.matched >= last)
        });
        if caught_up {
            self.send(from, Message::TimeoutNow { ballot: b });
        }
    }

    fn on_snapshot(
        &mut self,
        from: NodeId,
        b: u64,
        meta: SnapshotMeta,
        total: u64,
        offset: u64,
        data: Vec<u8>,
    ) {
        let conf_ok = !meta.conf.voters.is_empty()
            && meta
                .conf
                .all_nodes()
                .iter()
                .all(|&n| n != NO_NODE && n <= MAX_NODE_ID);
        if !conf_ok {
            self.drop_bad(); // No leader could have produced this configuration.
            return;
        }
        if b < self.promised {
            self.nack(from, b);
            return;
        }
        self.follow(b);
        let index = meta.index;
        if index <= self.commit {
            // Already past it: report it as installed so the leader moves on.
            self.incoming = None;
            self.send(
                from,
                Message::SnapshotAck {
                    ballot: b,
                    index,
                    next_offset: total,
                },
            );
            return;
        }
        let fits = data.len() as u64 <= total.saturating_sub(offset);
        if offset == 0 && fits {
            self.incoming = Some(Incoming {
                meta: meta.clone(),
                total,
                data: Vec::new(),
            });
        }
        let next_offset = match self.incoming.as_mut() {
            Some(inc)
                if inc.meta == meta
                    && inc.total == total
                    && inc.data.len() as u64 == offset
                    && fits =>
            {
                inc.data.extend_from_slice(&data);
                inc.data.len() as u64
            }
            Some(inc) if inc.meta == meta => inc.data.len() as u64,
            _ => 0,
        };
        let complete = self
            .incoming
            .as_ref()
            .is_some_and(|inc| inc.meta == meta && inc.data.len() as u64 == inc.total);
        if complete {
            let inc = self.incoming.take().expect("complete snapshot");
            self.install_snapshot(Snapshot {
                meta: inc.meta,
                data: inc.data,
            });
            self.bmatch = self.bmatch.max(self.commit);
        }
        self.send(
            from,
            Message::SnapshotAck {
                ballot: b,
                index,
                next_offset,
            },
        );
    }

    fn install_snapshot(&mut self, snap: Snapshot) {
        let idx = snap.meta.index;
        assert!(idx > self.commit, "snapshot below commit");
        self.log.compact(idx, snap.meta.term);
        // The store may drop the whole log when the boundary ballot differs: write the
        // slots we still hold again after the snapshot.
        self.log.mark_all_unstable();
        self.commit = idx;
        self.delivered = idx;
        self.confs = vec![(idx, snap.meta.conf.clone())];
        if self.role == Role::Learner && self.is_voter() {
            self.role = Role::Follower;
        }
        self.pending_snapshot = Some(snap.clone());
        self.snapshot = Some(snap);
    }

    fn on_snapshot_ack(&mut self, from: NodeId, b: u64, index: u64, next_offset: u64) {
        let total = self.snapshot.as_ref().map_or(0, |s| s.data.len() as u64);
        let mut more = false;
        {
            let Some(p) = self.answering_peer(from, b) else {
                return;
            };
            let Some(s) = p.snap.as_mut() else { return };
            if s.index != index {
                return;
            }
            if next_offset >= total {
                p.snap = None;
                p.matched = p.matched.max(index);
                p.next = p.matched + 1;
                p.inflight = 0;
            } else {
                s.offset = next_offset;
                more = true;
            }
        }
        if more {
            self.send_snapshot_chunk(from);
        } else {
            self.maybe_commit();
            if self.lead.is_some() {
                self.send_append(from);
            }
        }
    }

    fn on_timeout_now(&mut self, from: NodeId, b: u64) {
        if b == self.promised && self.leader == from && self.role != Role::Leader {
            self.campaign(true);
        }
    }
}

impl Replica for Paxos {
    type Message = Message;

    fn create(
        config: Config,
        initial: ConfState,
        recovered: Recovered,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        config.validate_bug(KNOWN_BUGS)?;
        if config.id > MAX_NODE_ID {
            return Err(ConfigError::new(
                "id",
                format!("must be at most {MAX_NODE_ID} for Multi-Paxos"),
            ));
        }
        let bugs = Bugs::from(config.inject_bug.as_deref());
        let hs = recovered.hard_state;
        let (snap_idx, snap_term, mut conf) = recovered.base(initial);
        for &n in conf.all_nodes().iter() {
            if n == NO_NODE || n > MAX_NODE_ID {
                return Err(ConfigError::new(
                    "initial",
                    format!("node id {n} outside 1..={MAX_NODE_ID}"),
                ));
            }
        }
        if conf.voters.is_empty() {
            return Err(ConfigError::new(
                "initial",
                "the configuration has no voters",
            ));
        }
        conf.voters.sort_unstable();
        let log = SlotLog::restore(snap_idx, snap_term, recovered.entries)
            .map_err(|e| ConfigError::new("recovered", e))?;
        let last = log.last_index();
        let applied = recovered.applied.max(snap_idx).min(last);
        let commit = hs.commit.max(applied).max(snap_idx).min(last);
        // An accepted entry implies a promise of at least its ballot; take the larger in
        // case the hard state lagged behind the entries in storage.
        let mut promised = hs.term;
        if !bugs.forget_promise {
            for e in log.slice(snap_idx + 1, last) {
                promised = promised.max(e.term);
            }
        }
        let mut confs = vec![(snap_idx, conf)];
        for e in log.slice(snap_idx + 1, commit) {
            if e.kind == EntryKind::ConfChange {
                if let Ok(cc) = ConfChange::decode(&e.data) {
                    let next = quorum::apply(&confs.last().expect("non-empty").1, &cc);
                    confs.push((e.index, next));
                }
            }
        }
        let guard = if config.check_quorum {
            config.election_ticks
        } else {
            0
        };
        let mut p = Paxos {
            id: config.id,
            prng: Prng::new(config.seed),
            bugs,
            role: Role::Follower,
            promised,
            leader: NO_NODE,
            max_round_seen: ballot::round(promised),
            log,
            commit,
            delivered: applied,
            applied,
            confs,
            snapshot: recovered.snapshot,
            pending_snapshot: None,
            incoming: None,
            bmatch_ballot: 0,
            bmatch: 0,
            ticks: 0,
            elapsed: 0,
            timeout: 0,
            guard,
            cand: None,
            lead: None,
            msgs: Vec::new(),
            read_states: Vec::new(),
            last_hs: hs,
            pending_stable: None,
            pending_applied: applied,
            bad_messages: 0,
            cfg: config,
        };
        p.become_follower(NO_NODE);
        Ok(p)
    }

    fn known_bugs() -> &'static [&'static str] {
        KNOWN_BUGS
    }

    fn id(&self) -> NodeId {
        self.id
    }

    fn tick(&mut self) {
        self.ticks += 1;
        self.guard = self.guard.saturating_sub(1);
        if self.role != Role::Leader {
            self.elapsed += 1;
            if self.elapsed >= self.timeout {
                if self.is_voter() {
                    self.campaign(false);
                } else {
                    self.reset_timeout();
                }
            } else if self.role == Role::Candidate && self.resend_due() {
                self.resend_prepares();
            }
            return;
        }
        let hb = self.cfg.heartbeat_ticks;
        let et = self.cfg.election_ticks;
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        lead.hb_elapsed += 1;
        lead.cq_elapsed += 1;
        let mut transfer_expired = false;
        if let Some((t, left)) = lead.transfer {
            if left <= 1 {
                transfer_expired = true;
            } else {
                lead.transfer = Some((t, left - 1));
            }
        }
        if transfer_expired {
            lead.transfer = None;
        }
        if lead.cq_elapsed >= et {
            lead.cq_elapsed = 0;
            let active = std::mem::take(&mut lead.active);
            if self.cfg.check_quorum {
                let id = self.id;
                let ok = quorum::has_quorum(self.conf(), |n| n == id || active.contains(&n));
                if !ok {
                    // CheckQuorum: we have not heard from a majority for an election
                    // timeout, so another ballot may already be in charge.
                    self.become_follower(NO_NODE);
                    return;
                }
            }
        }
        if self.lead.as_ref().is_some_and(|l| l.hb_elapsed >= hb) {
            self.broadcast_heartbeat();
        }
    }

    fn step(&mut self, from: NodeId, msg: Message) {
        if from == NO_NODE || from == self.id || from > MAX_NODE_ID || !msg.within_bounds() {
            self.drop_bad();
            return;
        }
        let b = msg.ballot();
        self.max_round_seen = self.max_round_seen.max(ballot::round(b));
        let owned_by_sender = ballot::owner(b) == from;
        match msg {
            Message::Prepare {
                ballot,
                commit,
                from: page_from,
                force,
            } if owned_by_sender => self.on_prepare(from, ballot, commit, page_from, force),
            Message::Promise {
                ballot,
                from: page_from,
                entries,
                done,
                commit,
            } => self.on_promise(from, ballot, page_from, entries, done, commit),
            Message::Nack {
                ballot,
                promised,
                behind,
            } => self.on_nack(ballot, promised, behind),
            Message::Accept {
                ballot,
                prev,
                entries,
                commit,
            } if owned_by_sender => self.on_accept(from, ballot, prev, entries, commit),
            Message::Accepted { ballot, matched } => self.on_accepted(from, ballot, matched, false),
            Message::Reject { ballot, matched } => self.on_accepted(from, ballot, matched, true),
            Message::Heartbeat {
                ballot,
                commit,
                seq,
                sent_at,
            } if owned_by_sender => self.on_heartbeat(from, ballot, commit, seq, sent_at),
            Message::HeartbeatAck {
                ballot,
                seq,
                sent_at,
                matched,
            } => self.on_heartbeat_ack(from, ballot, seq, sent_at, matched),
            Message::Snapshot {
                ballot,
                meta,
                total,
                offset,
                data,
            } if owned_by_sender => self.on_snapshot(from, ballot, meta, total, offset, data),
            Message::SnapshotAck {
                ballot,
                index,
                next_offset,
            } => self.on_snapshot_ack(from, ballot, index, next_offset),
            Message::TimeoutNow { ballot } if owned_by_sender => self.on_timeout_now(from, ballot),
            // A leader-side message whose ballot the sender does not own: forged or
            // corrupt, ignore it.
            _ => self.drop_bad(),
        }
    }

    fn propose(&mut self, data: Vec<u8>) -> Result<(), ProposeError> {
        self.append_proposal(EntryKind::Normal, data)
    }

    fn propose_conf_change(&mut self, change: ConfChange) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if self.lead.as_ref().is_some_and(|l| l.pending_conf.is_some()) {
            return Err(ProposeError::ConfChangeRejected(
                "a membership change is already in flight",
            ));
        }
        for item in &change.changes {
            let id = match *item {
                crate::ConfChangeItem::AddVoter(n)
                | crate::ConfChangeItem::AddLearner(n)
                | crate::ConfChangeItem::Remove(n) => n,
            };
            if id == NO_NODE || id > MAX_NODE_ID {
                return Err(ProposeError::ConfChangeRejected("node id out of range"));
            }
        }
        // Base it on the newest configuration including uncommitted ones in our log.
        let mut cur = self.conf().clone();
        for e in self.log.slice(self.commit + 1, self.log.last_index()) {
            if e.kind == EntryKind::ConfChange {
                if let Ok(cc) = ConfChange::decode(&e.data) {
                    cur = quorum::apply(&cur, &cc);
                }
            }
        }
        if quorum::apply(&cur, &change).voters.is_empty() {
            return Err(ProposeError::ConfChangeRejected(
                "the change would leave no voters",
            ));
        }
        self.append_proposal(EntryKind::ConfChange, change.encode())?;
        let idx = self.log.last_index();
        if let Some(l) = self.lead.as_mut() {
            l.pending_conf = Some(idx);
        }
        self.refresh_peers();
        self.broadcast_append();
        Ok(())
    }

    fn read_index(&mut self, ctx: Vec<u8>) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        let commit = self.commit;
        let lease = self.lease_valid();
        let stale_bug = self.bugs.stale_lease_read;
        let max_reads = self.cfg.max_pending_reads;
        let alone = self.conf().voters == [self.id] && self.conf().voters_outgoing.is_empty();
        let lead = self.lead.as_mut().expect("leader");
        if lead.reads.len() + self.read_states.len() >= max_reads {
            return Err(ProposeError::Busy);
        }
        if stale_bug {
            // Planted bug: answer from local state without confirming leadership.
            self.read_states.push(ReadState { index: commit, ctx });
            return Ok(());
        }
        if lease && commit >= lead.recovery_max {
            self.read_states.push(ReadState { index: commit, ctx });
            return Ok(());
        }
        lead.reads.push_back(PendingRead {
            ctx,
            index: commit.max(lead.recovery_max),
            seq: lead.hb_seq + 1,
        });
        if alone {
            // Alone: no round needed, our ballot cannot be superseded without us.
            lead.hb_seq += 1;
            self.release_reads();
        }
        Ok(())
    }

    fn transfer_leader(&mut self, to: NodeId) {
        if self.role != Role::Leader || to == self.id || !self.conf().voters.contains(&to) {
            return;
        }
        let b = self.promised;
        let last = self.log.last_index();
        let et = self.cfg.election_ticks;
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        lead.transfer = Some((to, et));
        let caught_up = lead.peers.get(&to).is_some_and(|p| p.matched >= last);
        if caught_up {
            self.send(to, Message::TimeoutNow { ballot: b });
        } else {
            self.send_append(to);
        }
    }

    fn compact(&mut self, index: u64, data: Vec<u8>) {
        if index > self.applied || index <= self.log.offset() || index > self.commit {
            return;
        }
        let term = self.log.term(index).unwrap_or(0);
        let conf = self.conf_for(index + 1).clone();
        self.log.compact(index, term);
        // Keep the configuration in force at the snapshot and every later one.
        let keep_from = self
            .confs
            .iter()
            .rposition(|(s, _)| *s <= index)
            .unwrap_or(0);
        self.confs.drain(..keep_from);
        self.snapshot = Some(Snapshot {
            meta: SnapshotMeta { index, term, conf },
            data,
        });
    }

    fn has_ready(&self) -> bool {
        self.pending_snapshot.is_some()
            || self.log.has_unstable()
            || self.hard_state() != self.last_hs
            || !self.msgs.is_empty()
            || self.commit > self.delivered
            || !self.read_states.is_empty()
    }

    fn ready(&mut self) -> Ready<Message> {
        let snapshot = self.pending_snapshot.take();
        let entries = self.log.take_unstable();
        let hs = self.hard_state();
        let hard_state = (hs != self.last_hs).then_some(hs);
        // The commit index need not be durable before anything is sent (a restarted
        // replica learns it again), so a Ready that only moves it is written without an
        // fsync (as etcd's raft does): one fsync per write on each replica instead of two.
        let must_sync = snapshot.is_some()
            || !entries.is_empty()
            || hs.term != self.last_hs.term
            || hs.vote != self.last_hs.vote;
        let promise_unchanged = (hs.term, hs.vote) == (self.last_hs.term, self.last_hs.vote);
        self.last_hs = hs;
        let upto = self
            .commit
            .min(self.delivered + self.cfg.max_batch_entries as u64);
        let committed = self.log.slice(self.delivered + 1, upto).to_vec();
        debug_assert!(committed
            .first()
            .is_none_or(|e| e.index == self.delivered + 1));
        self.delivered = upto.max(self.delivered);
        self.pending_applied = self.delivered;
        self.pending_stable = entries.last().map(|e| (self.promised, e.index));
        // A leader's accepts, heartbeats and snapshot chunks may leave before its own
        // acceptance is durable: it counts itself (`self_match`) only from `advance` on,
        // and its ballot was made durable in phase 1. Not in a Ready that moves the promise.
        let mut messages = std::mem::take(&mut self.msgs);
        let send_before_persist = if self.lead.is_some() && promise_unchanged {
            let ballot = self.promised;
            crate::partition_early(&mut messages, |m: &Message| match m {
                Message::Accept { ballot: b, .. }
                | Message::Heartbeat { ballot: b, .. }
                | Message::Snapshot { ballot: b, .. } => *b == ballot,
                _ => false,
            })
        } else {
            0
        };
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
        self.applied = self.applied.max(self.pending_applied);
        if let Some((b, last)) = self.pending_stable.take() {
            if b == self.promised {
                if let Some(lead) = self.lead.as_mut() {
                    lead.self_match = lead.self_match.max(last);
                }
                self.maybe_commit();
            }
        }
    }

    fn status(&self) -> Status {
        Status {
            id: self.id,
            role: self.role,
            term: self.promised,
            leader: self.leader,
            commit: self.commit,
            applied: self.applied,
            first_index: self.log.first_index(),
            last_index: self.log.last_index(),
            conf: self.conf().clone(),
        }
    }

    fn conf_at(&self, index: u64) -> ConfState {
        // Slot `index + 1` is decided under the configuration chosen up to `index`
        // (what `compact` records too).
        self.conf_for(index + 1).clone()
    }

    fn match_index(&self, id: NodeId) -> Option<u64> {
        let lead = self.lead.as_ref().filter(|_| self.role == Role::Leader)?;
        if id == self.id {
            return Some(lead.self_match);
        }
        lead.peers.get(&id).map(|p| p.matched)
    }

    fn encode_message(msg: &Message) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        postcard::to_allocvec(msg).expect("postcard encoding into a Vec")
    }

    fn decode_message(bytes: &[u8]) -> Result<Message, DecodeError> {
        postcard::from_bytes(bytes).map_err(|_| DecodeError("paxos: malformed message"))
    }
}

impl Paxos {
    /// Starts phase 1 now, as if the election timer fired after a leadership transfer
    /// (the lease guard of other acceptors is bypassed). For tests and operator tools.
    pub fn campaign_now(&mut self) {
        if self.role != Role::Leader {
            self.campaign(true);
        }
    }

    /// The current promised ballot (for tests and status pages).
    pub fn promised_ballot(&self) -> u64 {
        self.promised
    }

    fn append_proposal(&mut self, kind: EntryKind, data: Vec<u8>) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if data.len() > self.cfg.max_entry_bytes {
            return Err(ProposeError::TooLarge {
                size: data.len(),
                max: self.cfg.max_entry_bytes,
            });
        }
        let max_bytes = self.cfg.max_uncommitted_bytes;
        let lead = self.lead.as_mut().expect("leader");
        if lead.transfer.is_some() {
            return Err(ProposeError::Transferring);
        }
        // Nothing is proposed after an unchosen conf change (see the module docs).
        if lead.pending_conf.is_some() || lead.uncommitted_bytes + data.len() > max_bytes {
            return Err(ProposeError::Busy);
        }
        lead.uncommitted_bytes += data.len();
        let e = Entry {
            index: self.log.last_index() + 1,
            term: self.promised,
            kind,
            data,
        };
        self.log.put(e);
        if kind == EntryKind::Normal {
            self.broadcast_append();
        }
        self.maybe_commit();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
