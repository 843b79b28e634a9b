//! Membership: applying a [`ConfChange`] to a [`ConfState`], and the history of
//! configurations in the uncompacted log.
//!
//! Concord's Raft follows the thesis (§4.1): a configuration takes effect as soon as its
//! entry is *appended* to a server's log, not when it commits. Truncating a conflicting
//! suffix therefore rolls the configuration back, which is why the history is kept.

use crate::{ConfChange, ConfChangeItem, ConfState, NodeId};
use std::collections::BTreeSet;

/// Computes the configuration after `cc`. A change that alters more than one voter enters
/// a joint configuration (new voters + outgoing old voters); the empty change leaves it.
/// Deterministic and total, so every replica treats the same entry the same way: an
/// invalid change is an error and applies as nothing.
pub fn apply_change(conf: &ConfState, cc: &ConfChange) -> Result<ConfState, &'static str> {
    if cc.changes.is_empty() {
        if !conf.is_joint() {
            return Err("not in a joint configuration");
        }
        return Ok(ConfState {
            voters: conf.voters.clone(),
            learners: conf.learners.clone(),
            voters_outgoing: Vec::new(),
        });
    }
    if conf.is_joint() {
        return Err("still in a joint configuration");
    }
    let old: BTreeSet<NodeId> = conf.voters.iter().copied().collect();
    let mut voters = old.clone();
    let mut learners: BTreeSet<NodeId> = conf.learners.iter().copied().collect();
    for item in &cc.changes {
        match *item {
            ConfChangeItem::AddVoter(id) => {
                learners.remove(&id);
                voters.insert(id);
            }
            ConfChangeItem::AddLearner(id) => {
                voters.remove(&id);
                learners.insert(id);
            }
            ConfChangeItem::Remove(id) => {
                voters.remove(&id);
                learners.remove(&id);
            }
        }
    }
    if voters.is_empty() {
        return Err("the change would leave no voters");
    }
    let changed = old.symmetric_difference(&voters).count();
    Ok(ConfState {
        voters: voters.into_iter().collect(),
        learners: learners.into_iter().collect(),
        // A single-voter change is safe directly (thesis §4.2); anything bigger goes
        // through the joint configuration C_old,new (§4.3).
        voters_outgoing: if changed > 1 {
            conf.voters.clone()
        } else {
            Vec::new()
        },
    })
}

/// The configuration at the snapshot plus one entry per ConfChange entry after it.
#[derive(Clone, Debug)]
pub struct ConfHistory {
    base: ConfState,
    changes: Vec<(u64, ConfState)>,
}

impl ConfHistory {
    pub fn new(base: ConfState) -> Self {
        ConfHistory {
            base,
            changes: Vec::new(),
        }
    }

    pub fn current(&self) -> &ConfState {
        self.changes.last().map_or(&self.base, |(_, c)| c)
    }

    /// Index of the newest configuration entry (0 if it came from the snapshot/initial).
    pub fn current_index(&self) -> u64 {
        self.changes.last().map_or(0, |(i, _)| *i)
    }

    pub fn push(&mut self, index: u64, conf: ConfState) {
        assert!(index > self.current_index(), "conf history must grow");
        self.changes.push((index, conf));
    }

    /// The configuration in effect at `index`.
    pub fn at(&self, index: u64) -> &ConfState {
        self.changes
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or(&self.base, |(_, c)| c)
    }

    /// Forgets configurations from entries at or after `index` (truncated suffix).
    pub fn truncate_from(&mut self, index: u64) {
        self.changes.retain(|(i, _)| *i < index);
    }

    /// Folds everything up to `index` into the base (compaction).
    pub fn compact_to(&mut self, index: u64) {
        self.base = self.at(index).clone();
        self.changes.retain(|(i, _)| *i > index);
    }

    pub fn reset(&mut self, base: ConfState) {
        self.base = base;
        self.changes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(items: &[ConfChangeItem]) -> ConfChange {
        ConfChange {
            changes: items.to_vec(),
        }
    }

    #[test]
    fn single_change_is_direct_multi_goes_joint() {
        let c = ConfState::new([1, 2, 3]);
        let add = apply_change(&c, &cc(&[ConfChangeItem::AddVoter(4)])).unwrap();
        assert_eq!(add.voters, vec![1, 2, 3, 4]);
        assert!(!add.is_joint());
        let swap = apply_change(
            &c,
            &cc(&[ConfChangeItem::AddVoter(4), ConfChangeItem::Remove(1)]),
        )
        .unwrap();
        assert_eq!(swap.voters, vec![2, 3, 4]);
        assert_eq!(swap.voters_outgoing, vec![1, 2, 3]);
        assert!(apply_change(&swap, &cc(&[ConfChangeItem::AddVoter(5)])).is_err());
        let left = apply_change(&swap, &cc(&[])).unwrap();
        assert_eq!(left, ConfState::new([2, 3, 4]));
        assert!(apply_change(&left, &cc(&[])).is_err());
        assert!(apply_change(&ConfState::new([1]), &cc(&[ConfChangeItem::Remove(1)])).is_err());
    }

    #[test]
    fn learners_and_promotion() {
        let c = ConfState::new([1, 2, 3]);
        let l = apply_change(&c, &cc(&[ConfChangeItem::AddLearner(4)])).unwrap();
        assert_eq!(l.learners, vec![4]);
        assert!(!l.is_voter(4));
        let p = apply_change(&l, &cc(&[ConfChangeItem::AddVoter(4)])).unwrap();
        assert!(p.is_voter(4) && p.learners.is_empty());
    }

    #[test]
    fn history_rolls_back_on_truncation() {
        let mut h = ConfHistory::new(ConfState::new([1, 2, 3]));
        h.push(5, ConfState::new([1, 2, 3, 4]));
        h.push(9, ConfState::new([1, 2, 3, 4, 5]));
        assert_eq!(h.at(7).voters.len(), 4);
        h.truncate_from(9);
        assert_eq!(h.current().voters.len(), 4);
        h.compact_to(6);
        assert_eq!(h.current_index(), 0);
        assert_eq!(h.current().voters.len(), 4);
    }
}
