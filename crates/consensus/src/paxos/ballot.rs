//! Ballot numbers: `(round, node)` packed into one `u64`.
//!
//! The node id sits in the low [`NODE_BITS`] bits, so ballots are totally ordered (round
//! first, node breaks ties) and two nodes can never pick the same ballot. Ballot 0 means
//! "no ballot yet"; every real ballot has a round of at least 1.

use crate::NodeId;

/// Bits reserved for the node id in a ballot.
pub const NODE_BITS: u32 = 16;
/// Largest node id a Multi-Paxos group accepts (node ids must fit in [`NODE_BITS`]).
pub const MAX_NODE_ID: NodeId = (1 << NODE_BITS) - 1;
/// Largest round that still fits above the node bits.
pub const MAX_ROUND: u64 = u64::MAX >> NODE_BITS;

/// Packs `(round, node)`. `node` must be at most [`MAX_NODE_ID`], `round` at most
/// [`MAX_ROUND`] (both are checked by callers; this saturates rather than wrapping).
pub fn make(round: u64, node: NodeId) -> u64 {
    debug_assert!(node <= MAX_NODE_ID);
    (round.min(MAX_ROUND) << NODE_BITS) | (node & MAX_NODE_ID)
}

/// The round part of a ballot.
pub fn round(ballot: u64) -> u64 {
    ballot >> NODE_BITS
}

/// The node that owns (proposes under) a ballot; `NO_NODE` for ballot 0.
pub fn owner(ballot: u64) -> NodeId {
    ballot & MAX_NODE_ID
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballots_order_by_round_then_node() {
        assert!(make(1, 3) < make(2, 1));
        assert!(make(2, 1) < make(2, 2));
        assert_eq!(owner(make(7, 42)), 42);
        assert_eq!(round(make(7, 42)), 7);
        assert_eq!(owner(0), 0);
        assert_eq!(round(make(MAX_ROUND + 5, 1)), MAX_ROUND);
    }
}
