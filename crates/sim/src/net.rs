//! The simulated network: per-message delay (hence reordering), loss, duplication, and
//! partitions as a set of cut directed links. Every queue is bounded.

use crate::rng::SimRng;
use concord_consensus::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// Most messages in flight on one directed link; more are dropped, as a full socket buffer
/// would. Raft and Paxos both tolerate loss, so this bounds memory without hiding bugs.
pub const MAX_INFLIGHT_PER_LINK: usize = 256;
/// Most messages in flight in the whole network.
pub const MAX_INFLIGHT_TOTAL: usize = 8192;

#[derive(Clone, Copy, Debug)]
pub struct NetParams {
    /// Delivery delay in simulator time units, uniform in `[delay_min, delay_max]`.
    pub delay_min: u64,
    pub delay_max: u64,
    pub loss_ppm: u32,
    pub dup_ppm: u32,
}

pub struct Envelope<M> {
    pub from: NodeId,
    pub to: NodeId,
    pub msg: M,
}

pub struct Net<M> {
    pub params: NetParams,
    /// Keyed by (delivery time, random tiebreak, sequence) so equal times deliver in a
    /// random but reproducible order.
    queue: BTreeMap<(u64, u64, u64), Envelope<M>>,
    per_link: BTreeMap<(NodeId, NodeId), usize>,
    cut: BTreeSet<(NodeId, NodeId)>,
    seq: u64,
    pub sent: u64,
    pub dropped: u64,
}

impl<M: Clone> Net<M> {
    pub fn new(params: NetParams) -> Self {
        Net {
            params,
            queue: BTreeMap::new(),
            per_link: BTreeMap::new(),
            cut: BTreeSet::new(),
            seq: 0,
            sent: 0,
            dropped: 0,
        }
    }

    pub fn connected(&self, from: NodeId, to: NodeId) -> bool {
        !self.cut.contains(&(from, to))
    }

    pub fn send(&mut self, now: u64, from: NodeId, to: NodeId, msg: M, rng: &mut SimRng) {
        self.sent += 1;
        if !self.connected(from, to) || rng.chance(self.params.loss_ppm) {
            self.dropped += 1;
            return;
        }
        let copies = if rng.chance(self.params.dup_ppm) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let link = self.per_link.entry((from, to)).or_insert(0);
            if *link >= MAX_INFLIGHT_PER_LINK || self.queue.len() >= MAX_INFLIGHT_TOTAL {
                self.dropped += 1;
                continue;
            }
            *link += 1;
            let at = now + rng.range(self.params.delay_min, self.params.delay_max + 1);
            self.seq += 1;
            self.queue.insert(
                (at, rng.next_u64(), self.seq),
                Envelope {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    /// Time of the next delivery, if any.
    pub fn next_time(&self) -> Option<u64> {
        self.queue.keys().next().map(|k| k.0)
    }

    /// Removes the next message due at or before `now`. A message whose link was cut while
    /// it was in flight is lost.
    pub fn pop_due(&mut self, now: u64) -> Option<Envelope<M>> {
        loop {
            let key = *self.queue.keys().next()?;
            if key.0 > now {
                return None;
            }
            let env = self.queue.remove(&key).expect("key just seen");
            let link = self
                .per_link
                .get_mut(&(env.from, env.to))
                .expect("every queued message is counted on its link");
            *link -= 1;
            if self.connected(env.from, env.to) {
                return Some(env);
            }
            self.dropped += 1;
        }
    }

    /// Cuts every link between `a` and `b` (both directions).
    pub fn cut_between(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                if x != y {
                    self.cut.insert((x, y));
                    self.cut.insert((y, x));
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn is_partitioned(&self) -> bool {
        !self.cut.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_in_time_order_respects_cuts_and_bounds() {
        let params = NetParams {
            delay_min: 1,
            delay_max: 5,
            loss_ppm: 0,
            dup_ppm: 0,
        };
        let mut net: Net<u32> = Net::new(params);
        let mut rng = SimRng::new(1);
        for i in 0..10 {
            net.send(0, 1, 2, i, &mut rng);
        }
        let mut last = 0;
        let mut got = 0;
        for now in 0..10 {
            while let Some(e) = net.pop_due(now) {
                assert!(now >= last);
                last = now;
                assert_eq!((e.from, e.to), (1, 2));
                got += 1;
            }
        }
        assert_eq!(got, 10);
        net.cut_between(&[1], &[2]);
        net.send(0, 1, 2, 0, &mut rng);
        net.send(10, 2, 1, 0, &mut rng);
        assert_eq!(net.in_flight(), 0);
        net.heal();
        for _ in 0..(MAX_INFLIGHT_PER_LINK + 10) {
            net.send(20, 1, 2, 0, &mut rng);
        }
        assert_eq!(net.in_flight(), MAX_INFLIGHT_PER_LINK);
    }
}
