//! Majority and joint-majority decisions (Raft thesis §4.3): while a configuration is
//! joint, a decision needs a majority of the incoming voters AND of the outgoing voters.

use crate::{ConfState, NodeId};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    Won,
    Lost,
    Pending,
}

/// The largest value that a majority of `voters` have reached (e.g. the commit index from
/// match indices). An empty voter set places no constraint: `u64::MAX`.
pub fn majority_value(voters: &[NodeId], value: impl Fn(NodeId) -> u64) -> u64 {
    if voters.is_empty() {
        return u64::MAX;
    }
    let mut vals: Vec<u64> = voters.iter().map(|&v| value(v)).collect();
    vals.sort_unstable_by(|a, b| b.cmp(a));
    vals[voters.len() / 2]
}

/// [`majority_value`] over a possibly joint configuration.
pub fn joint_value(conf: &ConfState, value: impl Fn(NodeId) -> u64) -> u64 {
    majority_value(&conf.voters, &value).min(majority_value(&conf.voters_outgoing, &value))
}

pub fn majority_vote(voters: &[NodeId], votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    if voters.is_empty() {
        return VoteResult::Won;
    }
    let (mut yes, mut no) = (0, 0);
    for v in voters {
        match votes.get(v) {
            Some(true) => yes += 1,
            Some(false) => no += 1,
            None => {}
        }
    }
    let q = voters.len() / 2 + 1;
    if yes >= q {
        VoteResult::Won
    } else if no > voters.len() - q {
        VoteResult::Lost
    } else {
        VoteResult::Pending
    }
}

pub fn joint_vote(conf: &ConfState, votes: &BTreeMap<NodeId, bool>) -> VoteResult {
    match (
        majority_vote(&conf.voters, votes),
        majority_vote(&conf.voters_outgoing, votes),
    ) {
        (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
        (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
        _ => VoteResult::Pending,
    }
}

/// True if a (joint) majority is in `active`.
pub fn joint_active(conf: &ConfState, active: impl Fn(NodeId) -> bool) -> bool {
    joint_value(conf, |id| u64::from(active(id))) >= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_index_of_three_and_four() {
        let m = |v: &[u64]| {
            let ids: Vec<NodeId> = (1..=v.len() as u64).collect();
            majority_value(&ids, |id| v[(id - 1) as usize])
        };
        assert_eq!(m(&[5, 3, 1]), 3);
        assert_eq!(m(&[5, 5, 1, 1]), 1);
        assert_eq!(m(&[5, 5, 4, 1]), 4);
        assert_eq!(m(&[7]), 7);
        assert_eq!(majority_value(&[], |_| 0), u64::MAX);
    }

    #[test]
    fn joint_needs_both_halves() {
        let conf = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![],
            voters_outgoing: vec![3, 4, 5],
        };
        // 1, 2, 3 have index 9; 4, 5 only 2: incoming majority 9, outgoing majority 2.
        let v = |id: NodeId| if id <= 3 { 9 } else { 2 };
        assert_eq!(joint_value(&conf, v), 2);
        let mut votes = BTreeMap::new();
        votes.insert(1, true);
        votes.insert(2, true);
        assert_eq!(joint_vote(&conf, &votes), VoteResult::Pending);
        votes.insert(3, true);
        assert_eq!(joint_vote(&conf, &votes), VoteResult::Pending);
        votes.insert(4, true);
        assert_eq!(joint_vote(&conf, &votes), VoteResult::Won);
        let mut votes = BTreeMap::new();
        votes.insert(4, false);
        votes.insert(5, false);
        assert_eq!(joint_vote(&conf, &votes), VoteResult::Lost);
        assert!(!joint_active(&conf, |id| id <= 3));
        assert!(joint_active(&conf, |id| id >= 2));
    }
}
