//! `MemStore`: the plain in-memory [`LogStore`] for unit tests. Everything is "durable" as
//! soon as it is written; there is no crash to survive. Its rules for bad input are the
//! same as the WAL's (see `check_append` and friends), so a test that passes against it
//! does not rely on leniency the real store lacks.

use crate::{LogStore, Result, StorageError};
use concord_consensus::{Entry, HardState, Recovered, Snapshot};

/// Checks an `append` request against a log holding `(base, last]`: entries contiguous,
/// starting inside or right after the log, never at or below the compaction point.
pub(crate) fn check_append(entries: &[Entry], base: u64, last: u64) -> Result<()> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    for w in entries.windows(2) {
        if w[1].index != w[0].index.wrapping_add(1) {
            return Err(StorageError::Invalid(format!(
                "append: entries not contiguous ({} followed by {})",
                w[0].index, w[1].index
            )));
        }
    }
    if first.index <= base {
        return Err(StorageError::Invalid(format!(
            "append: entry {} is at or below the compaction point {base}",
            first.index
        )));
    }
    if first.index > last + 1 {
        return Err(StorageError::Invalid(format!(
            "append: gap, entry {} does not follow the last index {last}",
            first.index
        )));
    }
    for e in entries {
        if e.data.len() > crate::record::ENTRY_DATA_MAX_BYTES {
            return Err(StorageError::Invalid(format!(
                "append: entry {} has {} bytes of data, more than the limit {}",
                e.index,
                e.data.len(),
                crate::record::ENTRY_DATA_MAX_BYTES
            )));
        }
    }
    Ok(())
}

/// A hard state's term (a Raft term or a promised ballot) never goes back.
pub(crate) fn check_hard_state(old: &HardState, new: &HardState) -> Result<()> {
    if new.term < old.term {
        return Err(StorageError::Invalid(format!(
            "set_hard_state: term goes back from {} to {}",
            old.term, new.term
        )));
    }
    Ok(())
}

/// A snapshot must not be older than the one already stored, nor index 0.
pub(crate) fn check_snapshot(snap: &Snapshot, current_index: u64) -> Result<()> {
    if snap.meta.index == 0 {
        return Err(StorageError::Invalid(
            "install_snapshot: snapshot index 0".into(),
        ));
    }
    if snap.meta.index < current_index {
        return Err(StorageError::Invalid(format!(
            "install_snapshot: snapshot at {} is older than the stored one at {current_index}",
            snap.meta.index
        )));
    }
    Ok(())
}

/// `compact(index)` beyond the stored snapshot would drop entries nothing covers.
pub(crate) fn check_compact(index: u64, snapshot_index: u64) -> Result<()> {
    if index > snapshot_index {
        return Err(StorageError::Invalid(format!(
            "compact: index {index} is beyond the stored snapshot at {snapshot_index}"
        )));
    }
    Ok(())
}

#[derive(Default, Debug, Clone)]
pub struct MemStore {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    /// The log ends at `base` (with `base_term`) before `entries`.
    base: u64,
    base_term: u64,
    entries: Vec<Entry>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding exactly what a recovery returned (for reference models).
    pub fn from_recovered(r: &Recovered) -> Self {
        let (base, base_term) = r
            .snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.meta.index, s.meta.term));
        MemStore {
            hard_state: r.hard_state,
            snapshot: r.snapshot.clone(),
            base,
            base_term,
            entries: r.entries.clone(),
        }
    }

    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// The entries held, in index order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The term of `index` if the log holds it (or it is the compaction point).
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.base {
            return Some(self.base_term);
        }
        if index < self.base || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.base - 1) as usize].term)
    }
}

impl LogStore for MemStore {
    fn append(&mut self, entries: &[Entry]) -> Result<()> {
        check_append(entries, self.base, self.last_index())?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        self.entries
            .truncate((first.index - self.base - 1) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    fn set_hard_state(&mut self, hs: HardState) -> Result<()> {
        check_hard_state(&self.hard_state, &hs)?;
        self.hard_state = hs;
        Ok(())
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        let current = self.snapshot.as_ref().map_or(0, |s| s.meta.index);
        check_snapshot(snap, current)?;
        let (index, term) = (snap.meta.index, snap.meta.term);
        if self.term(index) == Some(term) {
            self.entries.drain(..(index - self.base) as usize);
        } else {
            self.entries.clear();
        }
        self.base = index;
        self.base_term = term;
        self.snapshot = Some(snap.clone());
        Ok(())
    }

    fn compact(&mut self, index: u64) -> Result<()> {
        let snap_index = self.snapshot.as_ref().map_or(0, |s| s.meta.index);
        check_compact(index, snap_index)?;
        // A stored snapshot already dropped what it covers, so `index <= base` here.
        debug_assert!(index <= self.base);
        Ok(())
    }

    fn sync(&mut self) -> Result<u64> {
        Ok(self.last_index())
    }

    fn recover(&mut self) -> Result<Recovered> {
        Ok(Recovered {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
            applied: self.snapshot.as_ref().map_or(0, |s| s.meta.index),
        })
    }

    fn first_index(&self) -> u64 {
        self.base + 1
    }

    fn last_index(&self) -> u64 {
        self.base + self.entries.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_consensus::{EntryKind, SnapshotMeta};

    pub(crate) fn ents(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term,
                kind: EntryKind::Normal,
                data: index.to_le_bytes().to_vec(),
            })
            .collect()
    }

    #[test]
    fn append_truncates_conflicting_suffix_and_rejects_gaps() {
        let mut s = MemStore::new();
        s.append(&ents(1..=5, 1)).unwrap();
        s.append(&ents(3..=4, 2)).unwrap();
        assert_eq!(s.last_index(), 4);
        assert_eq!(s.term(3), Some(2));
        assert!(matches!(
            s.append(&ents(6..=6, 2)),
            Err(StorageError::Invalid(_))
        ));
        let mut bad = ents(5..=6, 2);
        bad[1].index = 9;
        assert!(matches!(s.append(&bad), Err(StorageError::Invalid(_))));
        assert_eq!(s.last_index(), 4, "a rejected append changes nothing");
    }

    #[test]
    fn snapshot_keeps_matching_suffix_or_drops_log() {
        let mut s = MemStore::new();
        s.append(&ents(1..=10, 1)).unwrap();
        let snap = |index, term| Snapshot {
            meta: SnapshotMeta {
                index,
                term,
                ..Default::default()
            },
            data: vec![],
        };
        s.install_snapshot(&snap(5, 1)).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (6, 10));
        s.install_snapshot(&snap(8, 7)).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (9, 8));
        assert!(s.install_snapshot(&snap(4, 1)).is_err());
        assert!(s.compact(9).is_err());
        s.compact(8).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.applied, 8);
        assert!(r.entries.is_empty());
        assert!(s.append(&ents(8..=8, 7)).is_err());
        s.append(&ents(9..=9, 7)).unwrap();
    }
}
