//! Pending ReadIndex requests (Raft thesis §6.4).
//!
//! Each read gets a sequence number. The leader broadcasts a heartbeat carrying the
//! newest sequence number; once a quorum has echoed a sequence number `s`, every read with
//! a sequence number up to `s` is confirmed: the leader was still leader after the read
//! arrived. Many reads share one heartbeat round.

use crate::NodeId;
use std::collections::VecDeque;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRead {
    pub seq: u64,
    pub ctx: Vec<u8>,
    /// Who asked: this node, or the follower that forwarded the read.
    pub from: NodeId,
}

#[derive(Clone, Debug)]
pub struct ReadOnly {
    max_pending_reads: usize,
    queue: VecDeque<PendingRead>,
    /// Sequence numbers only grow, across terms too, so a stale echo never confirms a
    /// newer read.
    last_seq: u64,
    broadcast_seq: u64,
}

impl ReadOnly {
    pub fn new(max_pending_reads: usize) -> Self {
        ReadOnly {
            max_pending_reads,
            queue: VecDeque::new(),
            last_seq: 0,
            broadcast_seq: 0,
        }
    }

    /// Queues a read; `None` when `max_pending_reads` are already waiting.
    pub fn push(&mut self, ctx: Vec<u8>, from: NodeId) -> Option<u64> {
        if self.queue.len() >= self.max_pending_reads {
            return None;
        }
        self.last_seq += 1;
        self.queue.push_back(PendingRead {
            seq: self.last_seq,
            ctx,
            from,
        });
        Some(self.last_seq)
    }

    /// The sequence number to broadcast if some queued read has not been broadcast yet.
    pub fn take_broadcast(&mut self) -> Option<u64> {
        if self.broadcast_seq < self.last_seq && !self.queue.is_empty() {
            self.broadcast_seq = self.last_seq;
            Some(self.last_seq)
        } else {
            None
        }
    }

    pub fn needs_broadcast(&self) -> bool {
        self.broadcast_seq < self.last_seq && !self.queue.is_empty()
    }

    /// The newest sequence number already broadcast (periodic heartbeats repeat it so a
    /// lost heartbeat does not strand reads).
    pub fn broadcast_seq(&self) -> u64 {
        self.broadcast_seq
    }

    /// Removes and returns every read confirmed by a quorum echo of `acked`.
    pub fn confirm(&mut self, acked: u64) -> Vec<PendingRead> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|r| r.seq <= acked) {
            out.push(self.queue.pop_front().expect("front exists"));
        }
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Drops every pending read (leadership lost: callers time out and retry).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.broadcast_seq = self.last_seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_confirmed_in_order() {
        let mut r = ReadOnly::new(2);
        assert_eq!(r.push(b"a".to_vec(), 1), Some(1));
        assert_eq!(r.take_broadcast(), Some(1));
        assert_eq!(r.take_broadcast(), None);
        assert_eq!(r.push(b"b".to_vec(), 2), Some(2));
        assert_eq!(r.push(b"c".to_vec(), 1), None);
        assert!(r.needs_broadcast());
        assert_eq!(r.confirm(1).len(), 1);
        assert_eq!(r.confirm(1).len(), 0);
        assert_eq!(r.confirm(5)[0].ctx, b"b".to_vec());
        r.push(b"d".to_vec(), 1);
        r.clear();
        assert_eq!(r.len(), 0);
        assert!(!r.needs_broadcast());
    }
}
