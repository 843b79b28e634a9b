//! The acceptor's in-memory slot log: contiguous accepted entries after the snapshot.
//!
//! Unlike a Raft log, neighbouring slots may carry different ballots, and overwriting slot
//! `s` says nothing about slots after it. The storage driver truncates its log from the
//! first index of `Ready::entries`, so [`SlotLog::take_unstable`] always hands out the whole
//! suffix from the lowest changed slot: later slots are re-written with the values we
//! still hold instead of being forgotten.

use crate::Entry;

#[derive(Debug, Default)]
pub struct SlotLog {
    /// Index covered by the snapshot (0 if none); `entries[0].index == offset + 1`.
    offset: u64,
    /// Ballot of the slot at `offset` (snapshot metadata).
    offset_term: u64,
    entries: Vec<Entry>,
    /// Lowest slot changed since the last `take_unstable`.
    unstable_from: Option<u64>,
}

impl SlotLog {
    /// A log restored from storage: `entries` must follow `offset` contiguously.
    pub fn restore(offset: u64, offset_term: u64, entries: Vec<Entry>) -> Result<Self, String> {
        for (k, e) in entries.iter().enumerate() {
            if e.index != offset + 1 + k as u64 {
                return Err(format!(
                    "recovered entries are not contiguous after index {offset}: \
                     position {k} holds index {}",
                    e.index
                ));
            }
        }
        Ok(SlotLog {
            offset,
            offset_term,
            entries,
            unstable_from: None,
        })
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn first_index(&self) -> u64 {
        self.offset + 1
    }
    pub fn last_index(&self) -> u64 {
        self.offset + self.entries.len() as u64
    }

    pub fn get(&self, index: u64) -> Option<&Entry> {
        if index <= self.offset {
            return None;
        }
        self.entries.get((index - self.offset - 1) as usize)
    }

    /// Ballot of `index`, including the snapshot boundary.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.offset {
            Some(self.offset_term)
        } else {
            self.get(index).map(|e| e.term)
        }
    }

    /// Entries in `lo..=hi` that are held (clamped to the log).
    pub fn slice(&self, lo: u64, hi: u64) -> &[Entry] {
        let lo = lo.max(self.first_index());
        let hi = hi.min(self.last_index());
        if lo > hi {
            return &[];
        }
        let a = (lo - self.offset - 1) as usize;
        let b = (hi - self.offset) as usize;
        &self.entries[a..b]
    }

    fn mark(&mut self, index: u64) {
        self.unstable_from = Some(self.unstable_from.map_or(index, |u| u.min(index)));
    }

    /// Writes `e` at its slot, which must be in `first_index()..=last_index() + 1`.
    pub fn put(&mut self, e: Entry) {
        assert!(
            e.index > self.offset && e.index <= self.last_index() + 1,
            "slot {} outside {}..={}",
            e.index,
            self.first_index(),
            self.last_index() + 1
        );
        let i = e.index;
        if i == self.last_index() + 1 {
            self.entries.push(e);
        } else {
            self.entries[(i - self.offset - 1) as usize] = e;
        }
        self.mark(i);
    }

    /// Drops every slot from `index` on (only a new leader's own log, which it rewrites).
    pub fn truncate_from(&mut self, index: u64) {
        assert!(index > self.offset, "cannot truncate into the snapshot");
        if index <= self.last_index() {
            self.entries.truncate((index - self.offset - 1) as usize);
            self.mark(index);
        }
    }

    /// Forgets slots up to `index` (covered by a snapshot with ballot `term` at `index`).
    /// Later slots are kept when they continue from `index`.
    pub fn compact(&mut self, index: u64, term: u64) {
        if index <= self.offset {
            return;
        }
        if index >= self.last_index() {
            self.entries.clear();
        } else {
            self.entries.drain(..(index - self.offset) as usize);
        }
        self.offset = index;
        self.offset_term = term;
        if let Some(u) = self.unstable_from {
            self.unstable_from = if self.entries.is_empty() {
                None
            } else {
                Some(u.max(index + 1))
            };
        }
    }

    /// Marks every held slot unstable (after installing a snapshot the store may have
    /// dropped them, so they are written again).
    pub fn mark_all_unstable(&mut self) {
        if !self.entries.is_empty() {
            self.unstable_from = Some(self.first_index());
        }
    }

    pub fn has_unstable(&self) -> bool {
        self.unstable_from.is_some()
    }

    /// The suffix from the lowest changed slot to the end (see the module docs).
    pub fn take_unstable(&mut self) -> Vec<Entry> {
        match self.unstable_from.take() {
            Some(u) => self.slice(u, self.last_index()).to_vec(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EntryKind;

    fn e(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: vec![index as u8],
        }
    }

    #[test]
    fn overwriting_a_slot_re_emits_the_whole_suffix() {
        let mut log = SlotLog::default();
        for i in 1..=5 {
            log.put(e(i, 1));
        }
        assert_eq!(log.take_unstable().len(), 5);
        log.put(e(3, 2));
        let out = log.take_unstable();
        assert_eq!(
            out.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(3, 2), (4, 1), (5, 1)]
        );
    }

    #[test]
    fn compaction_keeps_later_slots_and_restore_checks_contiguity() {
        let mut log = SlotLog::default();
        for i in 1..=5 {
            log.put(e(i, 1));
        }
        log.compact(3, 1);
        assert_eq!(log.first_index(), 4);
        assert_eq!(log.last_index(), 5);
        assert_eq!(log.take_unstable().first().map(|e| e.index), Some(4));
        assert!(SlotLog::restore(0, 0, vec![e(1, 1), e(3, 1)]).is_err());
        assert!(SlotLog::restore(2, 1, vec![e(3, 1), e(4, 1)]).is_ok());
    }
}
