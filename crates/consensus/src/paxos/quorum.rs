//! Majority quorums over a [`ConfState`] and applying membership changes.

use crate::{ConfChange, ConfChangeItem, ConfState, NodeId};

fn majority_of(voters: &[NodeId], ok: &impl Fn(NodeId) -> bool) -> bool {
    !voters.is_empty() && voters.iter().filter(|&&v| ok(v)).count() * 2 > voters.len()
}

/// True when the nodes satisfying `ok` form a majority of `conf` (of both halves when a
/// joint configuration was handed to us; this engine never creates one itself).
pub fn has_quorum(conf: &ConfState, ok: impl Fn(NodeId) -> bool) -> bool {
    majority_of(&conf.voters, &ok)
        && (conf.voters_outgoing.is_empty() || majority_of(&conf.voters_outgoing, &ok))
}

fn quorum_value_of(voters: &[NodeId], value: &impl Fn(NodeId) -> u64) -> u64 {
    if voters.is_empty() {
        return 0;
    }
    let mut vals: Vec<u64> = voters.iter().map(|&v| value(v)).collect();
    vals.sort_unstable_by(|a, b| b.cmp(a));
    // The largest value that a majority has reached.
    vals[voters.len() / 2]
}

/// The largest `x` such that a quorum of `conf` has `value(node) >= x`.
pub fn quorum_value(conf: &ConfState, value: impl Fn(NodeId) -> u64) -> u64 {
    let v = quorum_value_of(&conf.voters, &value);
    if conf.voters_outgoing.is_empty() {
        v
    } else {
        v.min(quorum_value_of(&conf.voters_outgoing, &value))
    }
}

/// The configuration after `change`. Changes apply directly (no joint phase): the engine's
/// scheme (see the module docs) is safe for arbitrary changes.
pub fn apply(conf: &ConfState, change: &ConfChange) -> ConfState {
    let mut next = conf.clone();
    for item in &change.changes {
        match *item {
            ConfChangeItem::AddVoter(id) => {
                next.learners.retain(|&n| n != id);
                next.voters.push(id);
            }
            ConfChangeItem::AddLearner(id) => {
                next.voters.retain(|&n| n != id);
                next.learners.push(id);
            }
            ConfChangeItem::Remove(id) => {
                next.voters.retain(|&n| n != id);
                next.learners.retain(|&n| n != id);
            }
        }
    }
    next.voters.sort_unstable();
    next.voters.dedup();
    next.learners.sort_unstable();
    next.learners.dedup();
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majorities_and_quorum_values() {
        let c = ConfState::new([1, 2, 3]);
        assert!(has_quorum(&c, |n| n != 3));
        assert!(!has_quorum(&c, |n| n == 3));
        assert!(!has_quorum(&ConfState::default(), |_| true));
        assert_eq!(quorum_value(&c, |n| [0, 5, 9, 1][n as usize]), 5);
        let c4 = ConfState::new([1, 2, 3, 4]);
        assert_eq!(quorum_value(&c4, |n| n * 10), 20);
    }

    #[test]
    fn applying_changes() {
        let c = ConfState::new([1, 2, 3]);
        let cc = ConfChange {
            changes: vec![
                ConfChangeItem::AddVoter(4),
                ConfChangeItem::Remove(1),
                ConfChangeItem::AddLearner(5),
            ],
        };
        let n = apply(&c, &cc);
        assert_eq!(n.voters, vec![2, 3, 4]);
        assert_eq!(n.learners, vec![5]);
    }
}
