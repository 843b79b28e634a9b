//! Peer messages of the Multi-Paxos engine (encoded with postcard on the wire).

use crate::{Entry, SnapshotMeta, MAX_INDEX, MAX_TERM};
use serde::{Deserialize, Serialize};

/// One Multi-Paxos peer message. Every message carries the ballot it belongs to; the
/// sender of a `Prepare`, `Accept`, `Heartbeat`, `Snapshot` or `TimeoutNow` must own that
/// ballot (`ballot::owner(ballot) == from`), otherwise the receiver drops it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Phase 1a for every slot above `commit` at once. The acceptor answers with its
    /// accepted entries from `from` (at least `commit + 1`), one page at a time.
    /// `force` (leadership transfer) bypasses the lease guard.
    Prepare {
        ballot: u64,
        commit: u64,
        from: u64,
        force: bool,
    },
    /// Phase 1b: a promise not to accept ballots below `ballot`, with one page of accepted
    /// entries starting at `from`. `done` is true when the page reaches the acceptor's last
    /// slot; otherwise the candidate asks for the next page. `commit` is the acceptor's.
    Promise {
        ballot: u64,
        from: u64,
        entries: Vec<Entry>,
        done: bool,
        commit: u64,
    },
    /// A refusal of `ballot`: the sender promised `promised` (higher), or, with `behind`
    /// set, the candidate's log is below the sender's snapshot and cannot lead.
    Nack {
        ballot: u64,
        promised: u64,
        behind: bool,
    },
    /// Phase 2a for the slots `prev + 1 ..= prev + entries.len()` (every entry's `term` is
    /// `ballot`), plus the leader's commit index so acceptors learn chosen slots.
    Accept {
        ballot: u64,
        prev: u64,
        entries: Vec<Entry>,
        commit: u64,
    },
    /// Phase 2b: every slot up to `matched` holds either a chosen value or the value this
    /// ballot's leader sent, accepted in `ballot`.
    Accepted { ballot: u64, matched: u64 },
    /// An `Accept` that would leave a hole in the slots accepted under `ballot`; the leader
    /// resends from `matched + 1`.
    Reject { ballot: u64, matched: u64 },
    /// Leader liveness, commit propagation and read barrier round `seq`. `sent_at` is the
    /// leader's tick when sent, echoed back for the lease.
    Heartbeat {
        ballot: u64,
        commit: u64,
        seq: u64,
        sent_at: u64,
    },
    HeartbeatAck {
        ballot: u64,
        seq: u64,
        sent_at: u64,
        matched: u64,
    },
    /// One chunk of the leader's snapshot; `total` is the snapshot's data length.
    Snapshot {
        ballot: u64,
        meta: SnapshotMeta,
        total: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The receiver has `next_offset` bytes of the snapshot ending at `index`
    /// (`next_offset >= total` means it is installed or not needed).
    SnapshotAck {
        ballot: u64,
        index: u64,
        next_offset: u64,
    },
    /// Leadership transfer: the receiver starts phase 1 at once.
    TimeoutNow { ballot: u64 },
}

impl Message {
    /// Whether every ballot, slot and offset the message carries is below the bounds no
    /// honest peer reaches ([`MAX_TERM`] for ballots, [`MAX_INDEX`] for slots and byte
    /// offsets); a message that fails this is forged or corrupt and is dropped before any
    /// arithmetic is done on it.
    pub fn within_bounds(&self) -> bool {
        let slot = |i: u64| i <= MAX_INDEX;
        let ballot = |b: u64| b <= MAX_TERM;
        let entries = |es: &[Entry]| es.iter().all(|e| slot(e.index) && ballot(e.term));
        ballot(self.ballot())
            && match self {
                Message::Prepare { commit, from, .. } => slot(*commit) && slot(*from),
                Message::Promise {
                    from,
                    entries: es,
                    commit,
                    ..
                } => slot(*from) && slot(*commit) && entries(es),
                Message::Nack { promised, .. } => ballot(*promised),
                Message::Accept {
                    prev,
                    entries: es,
                    commit,
                    ..
                } => slot(*prev) && slot(*commit) && entries(es),
                Message::Accepted { matched, .. }
                | Message::Reject { matched, .. }
                | Message::HeartbeatAck { matched, .. } => slot(*matched),
                Message::Heartbeat { commit, .. } => slot(*commit),
                Message::Snapshot {
                    meta,
                    total,
                    offset,
                    ..
                } => slot(meta.index) && ballot(meta.term) && slot(*total) && slot(*offset),
                Message::SnapshotAck {
                    index, next_offset, ..
                } => slot(*index) && slot(*next_offset),
                Message::TimeoutNow { .. } => true,
            }
    }

    pub fn ballot(&self) -> u64 {
        match *self {
            Message::Prepare { ballot, .. }
            | Message::Promise { ballot, .. }
            | Message::Nack { ballot, .. }
            | Message::Accept { ballot, .. }
            | Message::Accepted { ballot, .. }
            | Message::Reject { ballot, .. }
            | Message::Heartbeat { ballot, .. }
            | Message::HeartbeatAck { ballot, .. }
            | Message::Snapshot { ballot, .. }
            | Message::SnapshotAck { ballot, .. }
            | Message::TimeoutNow { ballot } => ballot,
        }
    }
}
