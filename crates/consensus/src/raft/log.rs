//! The in-memory Raft log: the entries after the last snapshot, plus two durability
//! cursors.
//!
//! `persisting` is the last index handed to the driver in a `Ready`; `stable` is the last
//! index the driver confirmed durable through `advance()`. Always
//! `snapshot_index <= stable <= persisting <= last_index`.

use crate::Entry;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct RaftLog {
    snap_index: u64,
    snap_term: u64,
    entries: VecDeque<Entry>,
    stable: u64,
    persisting: u64,
}

impl RaftLog {
    /// A log starting after a snapshot at `(snap_index, snap_term)` holding `entries`,
    /// all already durable (this is what a restart recovers).
    pub fn new(snap_index: u64, snap_term: u64, entries: Vec<Entry>) -> Result<Self, &'static str> {
        let mut prev_term = snap_term;
        for (e, expect) in entries.iter().zip(snap_index + 1..) {
            if e.index != expect {
                return Err("entries are not contiguous after the snapshot");
            }
            if e.term < prev_term {
                return Err("entry terms decrease");
            }
            prev_term = e.term;
        }
        let last = snap_index + entries.len() as u64;
        Ok(RaftLog {
            snap_index,
            snap_term,
            entries: entries.into(),
            stable: last,
            persisting: last,
        })
    }

    pub fn first_index(&self) -> u64 {
        self.snap_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snap_index + self.entries.len() as u64
    }

    pub fn last_term(&self) -> u64 {
        self.entries.back().map_or(self.snap_term, |e| e.term)
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snap_index
    }

    pub fn stable(&self) -> u64 {
        self.stable
    }

    /// Overrides the durable index; only for the planted bug `count_own_unpersisted`.
    pub(super) fn set_stable_for_bug(&mut self, stable: u64) {
        self.stable = stable;
    }

    /// Term of the entry at `index`; `None` if compacted away or beyond the end.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.snap_index {
            return Some(self.snap_term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index <= self.snap_index {
            return None;
        }
        self.entries.get((index - self.snap_index - 1) as usize)
    }

    /// Entries `lo..=hi`, at most `max_count` of them and at most `max_bytes` of payload,
    /// but always at least one if the range is non-empty. Empty if `lo` is compacted.
    pub fn slice(&self, lo: u64, hi: u64, max_count: usize, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        if lo <= self.snap_index {
            return out;
        }
        let hi = hi.min(self.last_index());
        let mut bytes = 0usize;
        let mut i = lo;
        while i <= hi && out.len() < max_count {
            let e = self.entry(i).expect("index within the log");
            bytes = bytes.saturating_add(e.data.len());
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
            i += 1;
        }
        out
    }

    pub fn append(&mut self, e: Entry) {
        assert_eq!(
            e.index,
            self.last_index() + 1,
            "log append must be contiguous"
        );
        assert!(e.term >= self.last_term(), "log terms must not decrease");
        self.entries.push_back(e);
    }

    /// Drops every entry at or after `index` (a conflicting suffix). Entries at or below
    /// the snapshot cannot be truncated.
    pub fn truncate_from(&mut self, index: u64) {
        assert!(index > self.snap_index, "cannot truncate into the snapshot");
        let keep = (index - self.snap_index - 1) as usize;
        self.entries.truncate(keep);
        self.stable = self.stable.min(index - 1);
        self.persisting = self.persisting.min(index - 1);
    }

    /// §5.4.1: a candidate's log is at least as up to date as ours.
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Scans back from `index` to the first index holding the same term (for the fast
    /// back-tracking hint). `index` must be in the log.
    pub fn first_index_of_term_at(&self, index: u64) -> u64 {
        let term = self.term(index).expect("index within the log");
        let mut i = index;
        while i > self.first_index() && self.term(i - 1) == Some(term) {
            i -= 1;
        }
        i
    }

    /// Drops entries up to and including `index` (covered by a snapshot).
    pub fn compact_to(&mut self, index: u64) {
        assert!(
            index > self.snap_index && index <= self.stable,
            "compaction beyond durable log"
        );
        let term = self.term(index).expect("index within the log");
        let n = (index - self.snap_index) as usize;
        self.entries.drain(..n);
        self.snap_index = index;
        self.snap_term = term;
    }

    /// Replaces the whole log with a snapshot at `(index, term)`.
    pub fn restore(&mut self, index: u64, term: u64) {
        self.entries.clear();
        self.snap_index = index;
        self.snap_term = term;
        self.stable = index;
        self.persisting = index;
    }

    pub fn has_unpersisted(&self) -> bool {
        self.persisting < self.last_index()
    }

    /// Hands out the entries not yet given to the driver.
    pub fn take_unpersisted(&mut self) -> Vec<Entry> {
        let last = self.last_index();
        let out: Vec<Entry> = ((self.persisting + 1)..=last)
            .map(|i| self.entry(i).expect("index within the log").clone())
            .collect();
        self.persisting = last;
        out
    }

    pub fn persisting(&self) -> u64 {
        self.persisting
    }

    /// The driver confirmed everything handed out so far is durable.
    pub fn mark_stable(&mut self) {
        self.stable = self.persisting;
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
            data: vec![0; 10],
        }
    }

    #[test]
    fn new_rejects_gaps_and_decreasing_terms() {
        assert!(RaftLog::new(0, 0, vec![e(1, 1), e(3, 1)]).is_err());
        assert!(RaftLog::new(0, 0, vec![e(1, 2), e(2, 1)]).is_err());
        assert!(RaftLog::new(5, 3, vec![e(6, 2)]).is_err());
        let l = RaftLog::new(5, 3, vec![e(6, 3), e(7, 4)]).unwrap();
        assert_eq!((l.first_index(), l.last_index(), l.last_term()), (6, 7, 4));
        assert_eq!(l.term(5), Some(3));
        assert_eq!(l.term(4), None);
        assert_eq!(l.term(8), None);
    }

    #[test]
    fn cursors_follow_append_truncate_and_stable() {
        let mut l = RaftLog::new(0, 0, vec![]).unwrap();
        for i in 1..=3 {
            l.append(e(i, 1));
        }
        assert!(l.has_unpersisted());
        assert_eq!(l.take_unpersisted().len(), 3);
        assert_eq!(l.stable(), 0);
        l.mark_stable();
        assert_eq!(l.stable(), 3);
        l.truncate_from(2);
        assert_eq!((l.last_index(), l.stable(), l.persisting()), (1, 1, 1));
        l.append(e(2, 2));
        assert_eq!(l.take_unpersisted(), vec![e(2, 2)]);
    }

    #[test]
    fn slice_respects_count_and_bytes_but_sends_one() {
        let mut l = RaftLog::new(0, 0, vec![]).unwrap();
        for i in 1..=10 {
            l.append(e(i, 1));
        }
        assert_eq!(l.slice(1, 10, 3, 1000).len(), 3);
        assert_eq!(l.slice(1, 10, 100, 25).len(), 2);
        assert_eq!(l.slice(1, 10, 100, 1).len(), 1);
        assert_eq!(l.slice(11, 10, 100, 100).len(), 0);
    }

    #[test]
    fn compaction_and_term_hint() {
        let mut l = RaftLog::new(0, 0, vec![e(1, 1), e(2, 1), e(3, 2), e(4, 2), e(5, 2)]).unwrap();
        assert_eq!(l.first_index_of_term_at(5), 3);
        assert_eq!(l.first_index_of_term_at(2), 1);
        l.compact_to(3);
        assert_eq!((l.first_index(), l.term(3), l.term(2)), (4, Some(2), None));
        assert_eq!(l.first_index_of_term_at(5), 4);
        assert!(l.slice(3, 5, 10, 100).is_empty());
        assert!(l.is_up_to_date(5, 2));
        assert!(!l.is_up_to_date(4, 2));
        assert!(l.is_up_to_date(1, 3));
    }
}
