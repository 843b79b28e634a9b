//! Per-engine hooks: which generic invariants apply, and engine-specific checks.
//!
//! Every engine gets election safety (one leader per term/ballot), state-machine safety (no
//! two nodes apply different entries at one index), "no corrupt data applied", and the
//! hard-state rules (term never decreases, one vote per term). Raft adds Log Matching and
//! Leader Completeness; Multi-Paxos instead checks that an acceptor never accepts a value
//! below its promise. Adding an engine means implementing this trait and adding one match
//! arm in `main.rs`.

use concord_consensus::{ConfChange, ConfChangeItem, ConfState, Entry, HardState, Replica};

pub trait EngineModel: Replica + Sized {
    /// The name used on the command line (`--engine NAME`).
    const NAME: &'static str;

    /// Whether Raft's Log Matching property applies: two logs holding an entry with the same
    /// index and term are identical up to it.
    fn log_matching() -> bool;

    /// Whether a node must hold every entry committed before it became leader.
    fn leader_completeness() -> bool;

    /// Checks one persisted batch: the hard state that was durable before it, the entries
    /// written, and the new hard state (if any). `held(index)` is the term of the entry
    /// this node already persisted at `index`, if any. Returns what is wrong.
    fn check_persist(
        prev: &HardState,
        entries: &[Entry],
        new: Option<&HardState>,
        held: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(), String>;

    /// The membership after applying a conf-change entry, by the engine's rules, so the
    /// simulator knows the configuration at any applied index (for snapshots, and to see
    /// when a change took effect).
    fn apply_conf_change(conf: &mut ConfState, cc: &ConfChange);

    /// The term (Raft) or ballot (Paxos) of a message that grants a vote or a promise.
    /// The simulator remembers what each node granted, across its crashes, to check it never
    /// grants a second candidate the same term and never accepts below a ballot it promised;
    /// the nemesis also crashes nodes right after they vote.
    fn vote_granted(msg: &Self::Message) -> Option<u64>;

    /// Peer messages the replica dropped as impossible (forged, corrupt, or from a broken
    /// peer). The simulated network only loses, duplicates and reorders honest messages, so
    /// any drop is a bug in the sender or in the receiver's validation.
    fn bad_messages(&self) -> u64;
}

/// Applies the items of a change; `None` if it would leave no voters.
fn changed_conf(conf: &ConfState, cc: &ConfChange) -> Option<ConfState> {
    let mut next = conf.clone();
    for item in &cc.changes {
        match *item {
            ConfChangeItem::AddVoter(x) => {
                next.learners.retain(|&l| l != x);
                next.voters.push(x);
            }
            ConfChangeItem::AddLearner(x) => {
                next.voters.retain(|&v| v != x);
                next.learners.push(x);
            }
            ConfChangeItem::Remove(x) => {
                next.voters.retain(|&v| v != x);
                next.learners.retain(|&l| l != x);
            }
        }
    }
    next.voters.sort_unstable();
    next.voters.dedup();
    next.learners.sort_unstable();
    next.learners.dedup();
    (!next.voters.is_empty()).then_some(next)
}

impl EngineModel for concord_consensus::raft::Raft {
    const NAME: &'static str = "raft";

    fn bad_messages(&self) -> u64 {
        concord_consensus::raft::Raft::bad_messages(self)
    }

    fn vote_granted(msg: &Self::Message) -> Option<u64> {
        match msg.body {
            concord_consensus::raft::Body::VoteResp { reject: false } => Some(msg.term),
            _ => None,
        }
    }

    fn log_matching() -> bool {
        true
    }

    fn leader_completeness() -> bool {
        true
    }

    fn check_persist(
        prev: &HardState,
        entries: &[Entry],
        new: Option<&HardState>,
        _held: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(), String> {
        // A node only learns entries of terms it has seen, so no persisted entry may carry a
        // term above the node's current term once this batch is durable.
        let term = new.map_or(prev.term, |h| h.term);
        match entries.iter().find(|e| e.term > term) {
            Some(e) => Err(format!(
                "persisted entry {}@{} from a term above the node's term {term}",
                e.index, e.term
            )),
            None => Ok(()),
        }
    }

    /// Thesis section 4.3: a change altering more than one voter enters a joint
    /// configuration; the empty change leaves it; an invalid change applies as nothing.
    fn apply_conf_change(conf: &mut ConfState, cc: &ConfChange) {
        if cc.changes.is_empty() {
            conf.voters_outgoing.clear();
            return;
        }
        if conf.is_joint() {
            return;
        }
        let Some(mut next) = changed_conf(conf, cc) else {
            return;
        };
        let changed = next
            .voters
            .iter()
            .filter(|v| !conf.voters.contains(v))
            .count()
            + conf
                .voters
                .iter()
                .filter(|v| !next.voters.contains(v))
                .count();
        if changed > 1 {
            next.voters_outgoing = conf.voters.clone();
        }
        *conf = next;
    }
}

impl EngineModel for concord_consensus::paxos::Paxos {
    const NAME: &'static str = "paxos";

    fn bad_messages(&self) -> u64 {
        concord_consensus::paxos::Paxos::bad_messages(self)
    }

    fn vote_granted(msg: &Self::Message) -> Option<u64> {
        match msg {
            concord_consensus::paxos::Message::Promise { ballot, .. } => Some(*ballot),
            _ => None,
        }
    }

    /// Slots are chosen independently: two acceptors may hold the same (slot, ballot) after
    /// different histories below it.
    fn log_matching() -> bool {
        false
    }

    /// A new leader learns chosen values in phase 1 rather than holding them on election.
    fn leader_completeness() -> bool {
        false
    }

    /// An acceptor never accepts a value below its promise (Paxos Made Simple, P1a). A
    /// re-emitted slot it already held (same slot and ballot) is not a new acceptance, and
    /// neither is a value learned as chosen (at or below the commit index persisted with
    /// it), which a lagging replica stores whatever its ballot.
    fn check_persist(
        prev: &HardState,
        entries: &[Entry],
        new: Option<&HardState>,
        held: &dyn Fn(u64) -> Option<u64>,
    ) -> Result<(), String> {
        let chosen = new.map_or(prev.commit, |h| h.commit.max(prev.commit));
        for e in entries {
            if e.term < prev.term && e.index > chosen && held(e.index) != Some(e.term) {
                return Err(format!(
                    "acceptor accepted slot {} at ballot {} below its promise {}",
                    e.index, e.term, prev.term
                ));
            }
        }
        Ok(())
    }

    /// A change at slot s governs later slots directly; there is no joint phase.
    fn apply_conf_change(conf: &mut ConfState, cc: &ConfChange) {
        if let Some(next) = changed_conf(conf, cc) {
            *conf = ConfState {
                voters_outgoing: Vec::new(),
                ..next
            };
        }
    }
}
