//! Per-engine hooks: which generic invariants apply, and engine-specific checks.
//!
//! Every engine gets election safety (one leader per term/ballot), state-machine safety (no
//! two nodes apply different entries at one index), "no corrupt data applied", and the
//! hard-state rules (term never decreases, one vote per term). Raft adds Log Matching and
//! Leader Completeness; Multi-Paxos instead checks that an acceptor never accepts a value
//! below its promise. Adding an engine means implementing this trait and adding one match
//! arm in `main.rs`.

use concord_consensus::{Entry, HardState, Replica};

pub trait EngineModel: Replica + Sized {
    /// The name used on the command line (`--engine NAME`).
    const NAME: &'static str;

    /// Whether Raft's Log Matching property applies: two logs holding an entry with the same
    /// index and term are identical up to it.
    fn log_matching() -> bool;

    /// Whether a node must hold every entry committed before it became leader.
    fn leader_completeness() -> bool;

    /// Checks one persisted batch: the hard state that was durable before it, the entries
    /// written, and the new hard state (if any). Returns what is wrong.
    fn check_persist(
        prev: &HardState,
        entries: &[Entry],
        new: Option<&HardState>,
    ) -> Result<(), String>;
}

impl EngineModel for concord_consensus::raft::Raft {
    const NAME: &'static str = "raft";

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
}
