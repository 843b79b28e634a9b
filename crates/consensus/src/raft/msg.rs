//! Raft's peer messages. Every message carries the sender's term; `step` applies the term
//! rules once on that field before looking at the body.

use crate::{Entry, SnapshotMeta, MAX_INDEX, MAX_TERM};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender's term. For `PreVote` (and a granted `PreVoteResp`) it is the term the
    /// pre-candidate *would* campaign in, i.e. its current term + 1 (thesis §9.6).
    pub term: u64,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    PreVote {
        last_index: u64,
        last_term: u64,
    },
    PreVoteResp {
        reject: bool,
    },
    Vote {
        last_index: u64,
        last_term: u64,
        /// Set when campaigning because of TimeoutNow: voters skip the leader-lease check
        /// (thesis §3.10 / §4.2.3), since the old leader asked for this election.
        transfer: bool,
    },
    VoteResp {
        reject: bool,
    },
    Append {
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry>,
        commit: u64,
    },
    /// On success `index` is the last index now known to match the leader. On reject it
    /// is the rejected `prev_index`, and the hint lets the leader skip a whole term at
    /// once: `hint_term` is the follower's conflicting term at `prev_index` and
    /// `hint_index` its first index of that term, or `hint_term = 0` and
    /// `hint_index = last_index + 1` when the follower's log is too short.
    AppendResp {
        index: u64,
        reject: bool,
        hint_index: u64,
        hint_term: u64,
    },
    /// `commit` is min(leader commit, follower's match) so it never points past what the
    /// follower is known to hold. `read_seq` confirms pending ReadIndex requests and
    /// `sent_tick` (the leader's tick when sent) extends the lease when echoed back.
    Heartbeat {
        commit: u64,
        read_seq: u64,
        sent_tick: u64,
    },
    HeartbeatResp {
        read_seq: u64,
        sent_tick: u64,
    },
    /// One chunk of an InstallSnapshot transfer (thesis §5.3), at byte `offset`.
    Snapshot {
        meta: SnapshotMeta,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        done: bool,
    },
    /// A chunk was stored (or refused): the follower wants bytes from `next_offset` on.
    SnapshotResp {
        index: u64,
        next_offset: u64,
    },
    /// Leadership transfer: start an election now (thesis §3.10).
    TimeoutNow,
    /// A follower forwards a client's read to the leader.
    ReadIndex {
        #[serde(with = "serde_bytes")]
        ctx: Vec<u8>,
    },
    ReadIndexResp {
        index: u64,
        #[serde(with = "serde_bytes")]
        ctx: Vec<u8>,
    },
}

impl Message {
    /// Whether every term, index and offset the message carries is below the bounds no
    /// honest peer reaches ([`MAX_TERM`], [`MAX_INDEX`]); a message that fails this is
    /// forged or corrupt and is dropped before any arithmetic is done on it.
    pub fn within_bounds(&self) -> bool {
        let idx = |i: u64| i <= MAX_INDEX;
        let term = |t: u64| t <= MAX_TERM;
        let entries = |es: &[Entry]| es.iter().all(|e| idx(e.index) && term(e.term));
        term(self.term)
            && match &self.body {
                Body::PreVote {
                    last_index,
                    last_term,
                }
                | Body::Vote {
                    last_index,
                    last_term,
                    ..
                } => idx(*last_index) && term(*last_term),
                Body::Append {
                    prev_index,
                    prev_term,
                    entries: es,
                    commit,
                } => idx(*prev_index) && term(*prev_term) && idx(*commit) && entries(es),
                Body::AppendResp {
                    index,
                    hint_index,
                    hint_term,
                    ..
                } => idx(*index) && idx(*hint_index) && term(*hint_term),
                Body::Heartbeat { commit, .. } => idx(*commit),
                Body::Snapshot { meta, offset, .. } => {
                    idx(meta.index) && term(meta.term) && *offset <= MAX_INDEX
                }
                Body::SnapshotResp { index, next_offset } => {
                    idx(*index) && *next_offset <= MAX_INDEX
                }
                Body::ReadIndexResp { index, .. } => idx(*index),
                Body::PreVoteResp { .. }
                | Body::VoteResp { .. }
                | Body::HeartbeatResp { .. }
                | Body::TimeoutNow
                | Body::ReadIndex { .. } => true,
            }
    }
}

impl Body {
    /// A successful append answer: the follower's log matches the leader's up to `index`.
    pub fn append_ok(index: u64) -> Body {
        Body::AppendResp {
            index,
            reject: false,
            hint_index: 0,
            hint_term: 0,
        }
    }

    /// A rejection of the append at `prev_index`, with the back-tracking hint (see
    /// [`Body::AppendResp`]).
    pub fn append_reject(prev_index: u64, hint_index: u64, hint_term: u64) -> Body {
        Body::AppendResp {
            index: prev_index,
            reject: true,
            hint_index,
            hint_term,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Body::PreVote { .. } => "PreVote",
            Body::PreVoteResp { .. } => "PreVoteResp",
            Body::Vote { .. } => "Vote",
            Body::VoteResp { .. } => "VoteResp",
            Body::Append { .. } => "Append",
            Body::AppendResp { .. } => "AppendResp",
            Body::Heartbeat { .. } => "Heartbeat",
            Body::HeartbeatResp { .. } => "HeartbeatResp",
            Body::Snapshot { .. } => "Snapshot",
            Body::SnapshotResp { .. } => "SnapshotResp",
            Body::TimeoutNow => "TimeoutNow",
            Body::ReadIndex { .. } => "ReadIndex",
            Body::ReadIndexResp { .. } => "ReadIndexResp",
        }
    }
}
