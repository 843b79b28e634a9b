//! What the leader knows about one follower: how far its log matches, what to send next,
//! and the bounded window of append messages in flight (Raft thesis §10.2.1 pipelining).

use crate::Snapshot;
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Unknown match point: send one append at a time and wait for the answer.
    Probe,
    /// Known match point: stream appends optimistically, up to the inflight window.
    Replicate,
    /// The follower needs entries we compacted: stream the snapshot chunk by chunk.
    Snapshot,
}

/// The bounded window of in-flight appends, each remembered by its last index and the
/// leader tick it was sent at.
#[derive(Clone, Debug)]
pub struct Inflights {
    max_inflight_msgs: usize,
    last_indices: VecDeque<(u64, u64)>,
}

impl Inflights {
    pub fn new(max_inflight_msgs: usize) -> Self {
        assert!(max_inflight_msgs > 0);
        Inflights {
            max_inflight_msgs,
            last_indices: VecDeque::new(),
        }
    }
    pub fn full(&self) -> bool {
        self.last_indices.len() >= self.max_inflight_msgs
    }
    pub fn is_empty(&self) -> bool {
        self.last_indices.is_empty()
    }
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.last_indices.len()
    }
    pub fn add(&mut self, last_index: u64, tick: u64) {
        assert!(!self.full(), "inflight window overflow");
        if let Some(&(back, _)) = self.last_indices.back() {
            assert!(last_index > back, "inflight indices must increase");
        }
        self.last_indices.push_back((last_index, tick));
    }
    /// The follower acknowledged everything up to `index`.
    pub fn free_to(&mut self, index: u64) {
        while self.last_indices.front().is_some_and(|&(i, _)| i <= index) {
            self.last_indices.pop_front();
        }
    }
    /// When the oldest unacknowledged append was sent.
    pub fn oldest_tick(&self) -> Option<u64> {
        self.last_indices.front().map(|&(_, t)| t)
    }
    /// Frees one slot when a heartbeat shows the follower is alive but acks were lost.
    pub fn free_first(&mut self) {
        self.last_indices.pop_front();
    }
    pub fn reset(&mut self) {
        self.last_indices.clear();
    }
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub matched: u64,
    pub next: u64,
    pub state: ProgressState,
    /// Probe only: an append is outstanding; wait for its answer or a heartbeat answer.
    pub paused: bool,
    pub inflights: Inflights,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// Highest leader tick whose heartbeat this follower acknowledged (lease reads);
    /// 0 = none in this term.
    pub hb_acked_tick: u64,
    /// Highest read sequence number this follower acknowledged (ReadIndex).
    pub read_seq_acked: u64,
    /// Leader tick of the last probe or snapshot chunk sent (retransmission gate).
    pub sent_tick: u64,
    /// Snapshot state: the snapshot being streamed (kept until the transfer ends even if
    /// the leader compacts again meanwhile, or a fast-compacting leader would restart the
    /// transfer forever), and how many bytes the follower has.
    pub snapshot: Option<Arc<Snapshot>>,
    pub snapshot_offset: u64,
    /// Commit index carried by the last append sent to this follower: a follower whose
    /// append was still in flight when the commit index moved learns it with an empty
    /// append once its answer arrives, not a heartbeat later.
    pub commit_sent: u64,
}

impl Progress {
    pub fn new(next: u64, max_inflight_msgs: usize) -> Self {
        Progress {
            matched: 0,
            next,
            state: ProgressState::Probe,
            paused: false,
            inflights: Inflights::new(max_inflight_msgs),
            recent_active: false,
            hb_acked_tick: 0,
            read_seq_acked: 0,
            sent_tick: 0,
            snapshot: None,
            snapshot_offset: 0,
            commit_sent: 0,
        }
    }

    pub fn become_probe(&mut self, next: u64) {
        assert!(
            next > self.matched,
            "probe must start after the match point"
        );
        self.state = ProgressState::Probe;
        self.next = next;
        self.paused = false;
        self.inflights.reset();
        self.snapshot = None;
    }

    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next = self.matched + 1;
        self.paused = false;
        self.inflights.reset();
        self.snapshot = None;
    }

    /// Starts streaming `snap` from its first byte.
    pub fn become_snapshot(&mut self, snap: Arc<Snapshot>) {
        self.state = ProgressState::Snapshot;
        self.inflights.reset();
        self.paused = false;
        self.snapshot = Some(snap);
        self.snapshot_offset = 0;
    }

    /// Index of the snapshot being streamed (0 if none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.index)
    }

    /// Records a successful append up to `index`. Returns true if `matched` moved.
    pub fn maybe_update(&mut self, index: u64) -> bool {
        let moved = index > self.matched;
        if moved {
            self.matched = index;
        }
        self.next = self.next.max(index + 1);
        moved
    }

    /// Whether an append may be sent now.
    pub fn can_send(&self) -> bool {
        match self.state {
            ProgressState::Probe => !self.paused,
            ProgressState::Replicate => !self.inflights.full(),
            ProgressState::Snapshot => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds_and_frees() {
        let mut f = Inflights::new(3);
        f.add(5, 1);
        f.add(9, 1);
        f.add(12, 2);
        assert_eq!(f.oldest_tick(), Some(1));
        assert!(f.full());
        f.free_to(9);
        assert_eq!(f.len(), 1);
        f.free_first();
        assert_eq!(f.len(), 0);
    }

    #[test]
    fn state_transitions() {
        let mut p = Progress::new(10, 2);
        assert!(p.can_send());
        p.paused = true;
        assert!(!p.can_send());
        assert!(p.maybe_update(7));
        assert!(!p.maybe_update(6));
        p.become_replicate();
        assert_eq!(p.next, 8);
        p.inflights.add(9, 1);
        p.inflights.add(10, 1);
        assert!(!p.can_send());
        p.become_probe(8);
        assert!(p.can_send());
        let mut snap = Snapshot::default();
        snap.meta.index = 100;
        p.become_snapshot(Arc::new(snap));
        assert!(!p.can_send());
        assert_eq!((p.snapshot_index(), p.snapshot_offset), (100, 0));
        p.become_probe(8);
        assert!(p.snapshot.is_none());
    }
}
