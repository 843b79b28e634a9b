//! `FaultyStore`: the simulator's [`LogStore`]. It is the real [`Wal`] code running on a
//! [`SimDisk`], so records use the WAL's codec and CRCs, segments roll, snapshots are
//! files, and recovery applies exactly the WAL's torn-tail and corruption rules.
//!
//! Fully deterministic: it draws no randomness of its own. Faults are chosen by the
//! caller: `crash*` and `corrupt_random_record(seed)`.
//!
//! After a crash, every operation but `recover` fails with `StorageError::Invalid`, as a
//! crashed process cannot write; `recover` reads back the durable bytes (the restart).

use crate::disk::SimDisk;
use crate::record::{self, Record};
use crate::wal::{Wal, WalOptions};
use crate::{LogStore, Result, StorageError};
use concord_consensus::{Entry, HardState, Recovered, Snapshot};
use std::path::{Path, PathBuf};

/// Segment size used by default in the simulator: small, so that rolling and segment
/// deletion happen in ordinary runs.
pub const SIM_SEGMENT_BYTES_MAX: u64 = 4 << 10;

const SIM_DATA_DIR: &str = "/concord";

/// Where `corrupt_random_record` flipped a byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// The segment file, as recovery will name it in `StorageError::Corrupt`.
    pub path: String,
    /// Byte offset of the damaged record in that file (what recovery reports).
    pub record_offset: u64,
    /// Byte offset of the flipped byte.
    pub byte_offset: u64,
    /// The record as it was before the damage (entry, hard state, segment start, ...).
    pub record: Record,
    /// The damaged file is the newest segment (the only one that can have a torn tail).
    pub newest_segment: bool,
}

/// SplitMix64: turns a caller's seed into well-spread choices without any own state.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug)]
pub struct FaultyStore {
    wal: Wal<SimDisk>,
    crashed: bool,
}

impl Default for FaultyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultyStore {
    pub fn new() -> Self {
        Self::with_options(WalOptions {
            segment_bytes_max: SIM_SEGMENT_BYTES_MAX,
            ..WalOptions::default()
        })
    }

    /// # Panics
    /// If `opts` is invalid (`WalOptions::validate`): a bug in the test's setup.
    pub fn with_options(opts: WalOptions) -> Self {
        let wal = Wal::open_on(SimDisk::new(), Path::new(SIM_DATA_DIR), opts)
            .expect("a fresh in-memory WAL opens");
        FaultyStore {
            wal,
            crashed: false,
        }
    }

    /// Bytes written but not yet durable (lost by a crash).
    pub fn unsynced_bytes(&self) -> u64 {
        self.wal.disk().unsynced_bytes() + self.wal.buffered_bytes() as u64
    }

    pub fn is_crashed(&self) -> bool {
        self.crashed
    }

    /// The process dies: everything written but not synced is lost.
    pub fn crash(&mut self) {
        self.crash_keeping(0);
    }

    /// The process dies mid-write: a prefix of up to `torn_tail_bytes` of the unsynced
    /// bytes survives (possibly ending inside a record, which recovery cuts off).
    pub fn crash_keeping(&mut self, torn_tail_bytes: u64) {
        if !self.crashed {
            // Hand buffered records to the disk first, so that a torn tail can keep part
            // of them, as an OS page cache might have written them out.
            let _ = self.wal.flush_for_crash();
        }
        self.wal.disk_mut().crash(torn_tail_bytes);
        self.crashed = true;
    }

    /// The disk dies after `ops` more mutating operations (writes, fsyncs, renames,
    /// removals): every later one fails with an I/O error, so a multi-step operation such
    /// as `install_snapshot` stops half-way. The caller then crashes and recovers.
    pub fn fail_disk_after(&mut self, ops: u64) {
        self.wal.disk_mut().fail_after(ops);
    }

    /// A crash whose torn tail length is derived from `seed` (anywhere from nothing to all
    /// of the unsynced bytes).
    pub fn crash_torn(&mut self, seed: u64) {
        let _ = self.wal.flush_for_crash();
        let unsynced = self.wal.disk().unsynced_bytes();
        self.crash_keeping(mix(seed) % (unsynced + 1));
    }

    /// Flips one bit in a durable WAL record, chosen from `seed`, and returns what it hit.
    /// Every durable record qualifies except the very last one of the newest segment:
    /// damage there looks exactly like a torn write. Since every fsync is preceded by a
    /// sync marker, that last record is a marker, which holds no data. In a segment
    /// written in place (started in a recycled file, or zero-filled ahead: every segment
    /// unless preallocation is off), the records of that marker's stretch do not qualify
    /// either: recovery takes damage there for an incomplete sync and cuts it off. Recovery reads every durable segment, so the next `recover`
    /// must report `StorageError::Corrupt` at `path` and `record_offset`, unless the
    /// store first deletes the damaged segment (a snapshot covering it): then the damage
    /// is never read, which is harmless. Returns `None` if no record qualifies.
    pub fn corrupt_random_record(&mut self, seed: u64) -> Option<Corruption> {
        let wal_dir = self.wal.wal_dir().to_path_buf();
        let mut files: Vec<(PathBuf, Vec<u8>)> = self
            .wal
            .disk()
            .durable_files()
            .into_iter()
            .filter(|(p, _)| {
                p.parent() == Some(wal_dir.as_path()) && p.extension().is_some_and(|e| e == "wal")
            })
            .map(|(p, b)| (p, b.to_vec()))
            .collect();
        files.sort();
        // (file, record offset, record length, record) of every intact durable record.
        let mut records = Vec::new();
        for (fi, (path, bytes)) in files.iter().enumerate() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let Some(seq) = name.as_deref().and_then(crate::wal::segment_seq) else {
                continue;
            };
            let salt = record::segment_salt(seq);
            let mut at = 0;
            // Up to the first record that does not validate: a recycled file's stale
            // bytes of an earlier life follow its records.
            while let Ok((rec, n)) = record::decode(&bytes[at..], salt) {
                records.push((fi, at, n, rec));
                at += n;
            }
        }
        // The last record (a marker) always goes; in a segment written in place, its
        // whole stretch too: damage there, with no sync after it, is what a
        // power cut during that sync leaves (an earlier page lost, the marker kept), so
        // recovery cuts it off as an incomplete sync instead of reporting it (the
        // accepted limit, docs/storage.md "Known limits").
        let (last_file, _, _, last) = records.pop()?;
        if let Record::SyncMark {
            recycled: true,
            stretch_start,
            ..
        } = last
        {
            records.retain(|&(fi, at, _, _)| fi != last_file || (at as u64) < stretch_start);
        }
        if records.is_empty() {
            return None;
        }
        let h = mix(seed);
        let (fi, at, n, rec) = records.swap_remove((h % records.len() as u64) as usize);
        let h2 = mix(h);
        let byte = at + (h2 % n as u64) as usize;
        let mask = 1u8 << (mix(h2) % 8);
        let path = &files[fi].0;
        self.wal
            .disk_mut()
            .flip_byte(path, byte, mask)
            .expect("the byte was just read from this file");
        Some(Corruption {
            path: path.display().to_string(),
            record_offset: at as u64,
            byte_offset: byte as u64,
            record: rec,
            newest_segment: fi + 1 == files.len(),
        })
    }

    pub fn wal(&self) -> &Wal<SimDisk> {
        &self.wal
    }

    /// Test switch, see `Wal::set_zero_copy_min_for_tests`.
    #[doc(hidden)]
    pub fn set_zero_copy_min_for_tests(&mut self, bytes: usize) {
        self.wal.set_zero_copy_min_for_tests(bytes);
    }

    /// Test switch, see `Wal::set_sync_pad_min_for_tests`.
    #[doc(hidden)]
    pub fn set_sync_pad_min_for_tests(&mut self, bytes: u64) {
        self.wal.set_sync_pad_min_for_tests(bytes);
    }

    /// Test switch, see `Wal::set_batching_for_tests`.
    #[doc(hidden)]
    pub fn set_batching_for_tests(&mut self, on: bool) {
        self.wal.set_batching_for_tests(on);
    }

    fn check_alive(&self) -> Result<()> {
        if self.crashed {
            return Err(StorageError::Invalid(
                "the store has crashed; call recover() first".into(),
            ));
        }
        Ok(())
    }
}

impl LogStore for FaultyStore {
    fn append(&mut self, entries: &[Entry]) -> Result<()> {
        self.check_alive()?;
        self.wal.append(entries)
    }

    fn set_hard_state(&mut self, hs: HardState) -> Result<()> {
        self.check_alive()?;
        self.wal.set_hard_state(hs)
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        self.check_alive()?;
        self.wal.install_snapshot(snap)
    }

    fn compact(&mut self, index: u64) -> Result<()> {
        self.check_alive()?;
        self.wal.compact(index)
    }

    fn sync(&mut self) -> Result<u64> {
        self.check_alive()?;
        self.wal.sync()
    }

    /// The restart: reads back only what is durable. Without a preceding crash, it first
    /// crashes cleanly (unsynced writes are lost), so the result never depends on them.
    fn recover(&mut self) -> Result<Recovered> {
        if !self.crashed {
            self.crash();
        }
        let r = self.wal.reload()?;
        self.crashed = false;
        Ok(r)
    }

    fn first_index(&self) -> u64 {
        self.wal.first_index()
    }

    fn last_index(&self) -> u64 {
        self.wal.last_index()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_consensus::EntryKind;

    /// Recovery must fail with `Corrupt` at exactly the record `c` damaged.
    fn assert_reported(s: &mut FaultyStore, c: &Corruption, seed: u64) {
        match s.recover() {
            Err(StorageError::Corrupt { path, offset, .. }) => {
                assert_eq!(
                    (path, offset),
                    (c.path.clone(), c.record_offset),
                    "seed {seed}"
                );
            }
            other => panic!("seed {seed}: expected Corrupt at {c:?}, got {other:?}"),
        }
    }

    fn fill(store: &mut FaultyStore, n: u64) {
        for i in 1..=n {
            let e = Entry {
                index: i,
                term: 1 + i / 10,
                kind: EntryKind::Normal,
                data: vec![i as u8; (i as usize * 37) % 500],
            };
            store.append(&[e]).unwrap();
            if i % 5 == 0 {
                store
                    .set_hard_state(HardState {
                        term: 1 + i / 10,
                        vote: 1,
                        commit: i - 1,
                    })
                    .unwrap();
                store.sync().unwrap();
            }
        }
    }

    #[test]
    fn crash_loses_unsynced_entries_only() {
        let mut s = FaultyStore::new();
        fill(&mut s, 23);
        assert!(s.unsynced_bytes() > 0);
        s.crash();
        assert!(s.append(&[]).is_err(), "a crashed store refuses work");
        let r = s.recover().unwrap();
        assert_eq!(r.entries.len(), 20);
        assert_eq!(r.hard_state.commit, 19);
        assert_eq!(s.last_index(), 20);
    }

    #[test]
    fn corruption_of_any_non_last_record_is_reported_where_it_is() {
        for seed in 0..200u64 {
            let mut s = FaultyStore::with_options(WalOptions {
                segment_bytes_max: 4096,
                ..WalOptions::default()
            });
            fill(&mut s, 60);
            assert!(s.wal().segment_count() > 1);
            let c = s.corrupt_random_record(seed).expect("records exist");
            assert_reported(&mut s, &c, seed);
            assert!(s.is_crashed(), "a store that failed recovery stays down");
        }
    }

    #[test]
    fn same_seed_same_fault() {
        let run = |seed| {
            let mut s = FaultyStore::new();
            fill(&mut s, 23);
            s.crash_torn(seed);
            let r = s.recover().unwrap();
            (r.entries.len(), s.corrupt_random_record(seed))
        };
        for seed in 0..20 {
            assert_eq!(run(seed), run(seed));
        }
    }

    /// A store whose new segments append instead of being zero-filled ahead (as before
    /// preallocation, and as a format-3 segment of an older version reopened): read with
    /// the strict rule, where damage anywhere before the last marker is reported.
    fn appending_store() -> FaultyStore {
        FaultyStore::with_options(WalOptions {
            segment_bytes_max: SIM_SEGMENT_BYTES_MAX,
            prealloc_chunk_bytes: 0,
            ..WalOptions::default()
        })
    }

    #[test]
    fn a_fresh_store_has_only_its_segment_start_to_corrupt() {
        let mut s = appending_store();
        let c = s
            .corrupt_random_record(1)
            .expect("the segment start qualifies");
        assert!(matches!(c.record, Record::SegmentStart { .. }), "{c:?}");
        assert!(c.newest_segment);
        assert!(matches!(s.recover(), Err(StorageError::Corrupt { .. })));
    }

    /// The last record that carries data, synced, then damaged: before sync markers it
    /// was the last record of the file and recovery cut it off as a torn tail, silently
    /// losing an acknowledged entry. Now the marker after it makes it corruption. (In a
    /// segment written in place, damage in the final stretch is the accepted limit, see
    /// `corrupt_random_record`; hence an appending store here.)
    #[test]
    fn damage_to_the_last_synced_entry_is_corruption_not_a_torn_tail() {
        for (pos, mask) in [(0usize, 1u8), (5, 0x80), (20, 4), (40, 2)] {
            let mut s = appending_store();
            fill(&mut s, 5);
            let (path, bytes) = s
                .wal()
                .disk()
                .durable_files()
                .into_iter()
                .filter(|(p, _)| p.extension().is_some_and(|e| e == "wal"))
                .max()
                .map(|(p, b)| (p, b.to_vec()))
                .expect("a segment");
            // Find the last entry record.
            let (mut at, mut last_entry) = (0, None);
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let salt = record::segment_salt(crate::wal::segment_seq(&name).unwrap());
            while let Ok((rec, n)) = record::decode(&bytes[at..], salt) {
                if matches!(rec, Record::Entry(_) | Record::Entries(_)) {
                    last_entry = Some(at);
                }
                at += n;
            }
            let rec_at = last_entry.expect("entries were written");
            s.wal
                .disk_mut()
                .flip_byte(&path, rec_at + pos, mask)
                .unwrap();
            match s.recover() {
                Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, rec_at as u64),
                other => panic!("byte {pos}: expected Corrupt at {rec_at}, got {other:?}"),
            }
        }
    }

    /// One segment only (the default 64 KiB): every choice is in the newest segment,
    /// where damage to the last data record used to pass for a torn tail.
    #[test]
    fn corruption_in_the_newest_segment_is_reported_where_it_is() {
        for seed in 0..200u64 {
            let mut s = FaultyStore::new();
            fill(&mut s, 12);
            assert_eq!(s.wal().segment_count(), 1);
            let c = s.corrupt_random_record(seed).expect("records exist");
            assert!(c.newest_segment);
            assert_reported(&mut s, &c, seed);
        }
    }

    /// A store with 4 KiB segments that compacts behind its log (a snapshot whenever a
    /// segment rolled), written until its newest segment is a reused spare file holding
    /// synced records and, after them, stale bytes of its earlier life. Returns the store
    /// and its last index.
    fn recycled_store() -> (FaultyStore, u64) {
        let mut s = FaultyStore::with_options(WalOptions {
            segment_bytes_max: 4096,
            ..WalOptions::default()
        });
        let mut last = 0;
        for _ in 0..1000 {
            let ents: Vec<Entry> = (last + 1..=last + 7)
                .map(|i| Entry {
                    index: i,
                    term: 1,
                    kind: EntryKind::Normal,
                    data: vec![i as u8; 40 + (i as usize * 13) % 90],
                })
                .collect();
            s.append(&ents).unwrap();
            last += 7;
            s.sync().unwrap();
            let newest = s.wal().segment_count();
            if s.wal().segments_recycled() >= 3 && newest == 1 && s.wal().spare_count() > 0 {
                let (_, bytes) = newest_file(&s);
                if bytes.len() > 1500 {
                    return (s, last);
                }
            }
            if newest > 1 {
                let snap = Snapshot {
                    meta: concord_consensus::SnapshotMeta {
                        index: last - 3,
                        term: 1,
                        conf: concord_consensus::ConfState::new([1]),
                    },
                    data: vec![1; 10],
                };
                s.install_snapshot(&snap).unwrap();
            }
        }
        panic!("no recycled newest segment");
    }

    fn newest_file(s: &FaultyStore) -> (PathBuf, Vec<u8>) {
        s.wal()
            .disk()
            .durable_files()
            .into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "wal"))
            .max()
            .map(|(p, b)| (p, b.to_vec()))
            .expect("a segment")
    }

    /// Unsynced records overwriting the stale bytes of a recycled file, cut by a crash
    /// after any number of bytes (the rest keeps the old contents): recovery keeps the
    /// synced log and a prefix of the new records, cut whole at a record boundary.
    #[test]
    fn a_crash_in_the_middle_of_overwriting_a_recycled_file_is_a_torn_tail() {
        // `recycled_store` is deterministic: one copy tells what is synced.
        let synced = recycled_store().0.recover().unwrap().entries;
        let mut seen = std::collections::BTreeSet::new();
        for keep in 0.. {
            // Not reopened: a reopen would cut the stale bytes off.
            let (mut s, last) = recycled_store();
            let (path, bytes) = newest_file(&s);
            let salt = record::segment_salt(
                crate::wal::segment_seq(&path.file_name().unwrap().to_string_lossy()).unwrap(),
            );
            let mut end = 0;
            while let Ok((_, n)) = record::decode(&bytes[end..], salt) {
                end += n;
            }
            assert!(bytes.len() > end + 100, "stale bytes follow the records");
            let more: Vec<Entry> = (last + 1..=last + 6)
                .map(|i| Entry {
                    index: i,
                    term: 2,
                    kind: EntryKind::Normal,
                    data: vec![9; 30],
                })
                .collect();
            // One record each, so that a crash can keep some of them.
            for e in &more {
                s.append(std::slice::from_ref(e)).unwrap();
            }
            let _ = s.wal.flush_for_crash();
            let unsynced = s.unsynced_bytes();
            if keep > unsynced {
                break;
            }
            s.crash_keeping(keep);
            let r = s.recover().expect("a torn overwrite is a torn tail");
            let got = r.entries.last().unwrap().index;
            assert!((last..=last + 6).contains(&got), "keep {keep}: last {got}");
            assert_eq!(r.entries[..synced.len()], synced[..]);
            assert_eq!(
                &r.entries[synced.len()..],
                &more[..(got - last) as usize],
                "keep {keep}"
            );
            seen.insert(got);
        }
        assert_eq!(seen.len(), 7, "every prefix length was seen: {seen:?}");
    }

    /// The disk dies at every step of a roll into a spare file (the rename, the directory
    /// fsync, the start record's write and fsync): recovery always works and keeps
    /// everything synced; a file whose start record did not become durable is dropped.
    #[test]
    fn a_crash_while_taking_a_spare_recovers() {
        let mut took_spare = 0;
        for budget in 0..12 {
            for torn in [None, Some(10), Some(45), Some(100)] {
                let (mut s, last) = recycled_store();
                assert!(s.wal().spare_count() > 0);
                let recycled = s.wal().segments_recycled();
                s.fail_disk_after(budget);
                // Larger than what is left of the segment: rolls into a spare first.
                let big: Vec<Entry> = (last + 1..=last + 20)
                    .map(|i| Entry {
                        index: i,
                        term: 2,
                        kind: EntryKind::Normal,
                        data: vec![3; 150],
                    })
                    .collect();
                let ok = s.append(&big).and_then(|_| s.sync()).is_ok();
                took_spare += u32::from(s.wal().segments_recycled() > recycled);
                match torn {
                    None => s.crash(),
                    Some(n) => s.crash_keeping(n),
                }
                let r = s
                    .recover()
                    .unwrap_or_else(|e| panic!("budget {budget} torn {torn:?}: {e}"));
                let got = r.entries.last().unwrap().index;
                assert!(
                    got == last || got == last + 20,
                    "budget {budget} torn {torn:?}: {got}"
                );
                assert!(!ok || got == last + 20, "synced, then lost");
                let r2 = s.recover().unwrap();
                assert_eq!(r2.entries, r.entries, "recovery is stable");
            }
        }
        // The first two operations (cutting the closed segment, the rename) may fail.
        assert!(took_spare >= 4 * 10, "{took_spare}");
    }

    /// `corrupt_random_record` over recycled files: the damage is always reported where
    /// it is, never taken for the end of the log because of stale bytes after it.
    #[test]
    fn corruption_in_recycled_segments_is_reported_where_it_is() {
        for seed in 0..200u64 {
            let (mut s, _) = recycled_store();
            let c = s.corrupt_random_record(seed).expect("records exist");
            assert_reported(&mut s, &c, seed);
        }
    }

    /// The active segment's file (the newest `.wal`) and its length on the disk.
    fn active_file_len(w: &mut Wal<SimDisk>) -> (PathBuf, u64) {
        use crate::disk::Disk;
        let dir = w.wal_dir().to_path_buf();
        let name = w
            .disk_mut()
            .list_dir(&dir)
            .unwrap()
            .into_iter()
            .filter(|n| n.ends_with(".wal"))
            .max()
            .expect("a segment");
        let path = dir.join(name);
        let len = w.disk_mut().len(&path).unwrap();
        (path, len)
    }

    fn one_entry(index: u64, len: usize) -> Entry {
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: vec![index as u8; len],
        }
    }

    /// (a) A fresh segment's file grows by whole chunks of zeros written ahead, not with
    /// every write: small syncs then overwrite zeros, and the file's size (what an
    /// `fdatasync` would have to commit) changes once per chunk. Never past the segment
    /// limit; a large sync gets no zeros; a rolled segment is cut to its records. Without
    /// preallocation the size changes with every sync.
    #[test]
    fn a_fresh_segment_grows_in_chunks_not_per_write() {
        const CHUNK: u64 = crate::wal::PREALLOC_CHUNK_BYTES;
        for prealloc in [true, false] {
            let seg_max = 3 * CHUNK + CHUNK / 2;
            let opts = WalOptions {
                segment_bytes_max: seg_max,
                prealloc_chunk_bytes: if prealloc { CHUNK } else { 0 },
                ..WalOptions::default()
            };
            let mut w = Wal::open_on(SimDisk::new(), Path::new("/g"), opts).unwrap();
            assert_eq!(w.active_segment_in_place(), prealloc);
            let (first, _) = active_file_len(&mut w);
            let mut sizes = std::collections::BTreeSet::new();
            let mut index = 0;
            // 3 KB syncs (as in the cluster benchmark) until the segment rolls.
            while w.segment_count() == 1 {
                index += 1;
                w.append(&[one_entry(index, 3000)]).unwrap();
                w.sync().unwrap();
                if w.segment_count() > 1 {
                    break;
                }
                let (records, filled) = w.active_segment_bytes();
                let (_, len) = active_file_len(&mut w);
                assert_eq!(len, filled, "the WAL knows the file's length");
                assert!(len >= records && len <= seg_max, "{len} vs {records}");
                if prealloc {
                    assert!(len - records <= CHUNK, "{len} vs {records}");
                } else {
                    assert_eq!(len, records);
                }
                sizes.insert(len);
            }
            if prealloc {
                // 4 chunks: 1, 2, 3 MiB and the limit (3.5 MiB), plus the first size.
                assert!(sizes.len() <= 5, "{} sizes: {sizes:?}", sizes.len());
                assert!(w.prealloc_bytes() >= seg_max - CHUNK);
            } else {
                assert!(sizes.len() as u64 >= index - 2, "{} sizes", sizes.len());
                assert_eq!(w.prealloc_bytes(), 0);
            }
            // The closed segment was cut to its last record (a sync marker).
            let bytes = {
                use crate::disk::Disk;
                w.disk_mut().read(&first).unwrap()
            };
            let salt = record::segment_salt(1);
            let mut at = 0;
            let mut last = None;
            while let Ok((rec, n)) = record::decode(&bytes[at..], salt) {
                last = Some(rec);
                at += n;
            }
            assert_eq!(at, bytes.len(), "no zero tail in a closed segment");
            assert!(matches!(last, Some(Record::SyncMark { .. })));
            // A large sync (64 KiB or more) past the zero-filled end writes no zeros.
            let (before, _) = w.active_segment_bytes();
            let big: Vec<Entry> = (index + 1..=index + 300)
                .map(|i| one_entry(i, 4000))
                .collect();
            let zeros_before = w.prealloc_bytes();
            w.append(&big).unwrap();
            w.sync().unwrap();
            let (records, filled) = w.active_segment_bytes();
            assert!(records > before + CHUNK);
            assert_eq!(filled, records, "a large sync is not followed by zeros");
            assert_eq!(w.prealloc_bytes(), zeros_before);
            // The next small one is.
            w.append(&[one_entry(index + 301, 100)]).unwrap();
            w.sync().unwrap();
            let (records, filled) = w.active_segment_bytes();
            if prealloc {
                assert_eq!(filled, records + CHUNK);
            } else {
                assert_eq!(filled, records);
            }
            let r = w.reload().unwrap();
            assert_eq!(r.entries.last().unwrap().index, index + 301);
        }
    }

    /// (c) A crash after any number of bytes of unsynced records written over the zeros
    /// of a new, preallocated segment (the rest keeps its zeros): recovery never reports
    /// corruption, keeps everything synced and a whole-record prefix of the rest, and the
    /// log goes on. When nothing of the unsynced records survived, the zero tail stays
    /// (the file keeps its size); otherwise it is cut at the end of the log.
    #[test]
    fn a_crash_in_the_zero_tail_of_a_preallocated_segment_is_a_torn_tail() {
        let mut seen = std::collections::BTreeSet::new();
        let mut kept_zeros = 0;
        for keep in 0.. {
            let mut s = FaultyStore::with_options(WalOptions {
                segment_bytes_max: 64 << 10,
                prealloc_chunk_bytes: 8 << 10,
                ..WalOptions::default()
            });
            fill(&mut s, 20);
            let synced = s.wal().last_index();
            assert_eq!(synced, 20);
            assert_eq!(s.wal().segments_recycled(), 0);
            let (records, filled_before) = s.wal().active_segment_bytes();
            assert!(
                filled_before > records + 1000,
                "zeros ahead: {records} {filled_before}"
            );
            for i in 21..=26 {
                s.append(&[one_entry(i, 50)]).unwrap();
            }
            assert!(s.wal().crash_would_hit_a_zero_tail_for_tests());
            let _ = s.wal.flush_for_crash();
            let unsynced = s.unsynced_bytes();
            if keep > unsynced {
                break;
            }
            s.crash_keeping(keep);
            let r = s
                .recover()
                .unwrap_or_else(|e| panic!("keep {keep}: a torn write, not {e}"));
            let got = r.entries.last().unwrap().index;
            assert!((synced..=26).contains(&got), "keep {keep}: {got}");
            for e in &r.entries[20..] {
                assert_eq!(e, &one_entry(e.index, 50));
            }
            seen.insert(got);
            let (records, filled) = s.wal().active_segment_bytes();
            if keep == 0 {
                assert_eq!(filled, filled_before, "keep 0: the zero tail stays");
                kept_zeros += 1;
            }
            assert!(filled >= records);
            // The log goes on right after its last record, and survives a restart.
            s.append(&[one_entry(got + 1, 70)]).unwrap();
            s.sync().unwrap();
            let r = s.recover().unwrap();
            assert_eq!(
                r.entries.last().unwrap(),
                &one_entry(got + 1, 70),
                "keep {keep}"
            );
            assert_eq!(r.entries.len() as u64, got + 1);
        }
        assert_eq!(seen.len(), 7, "every prefix length was seen: {seen:?}");
        assert_eq!(kept_zeros, 1);
    }

    /// (c) In a preallocated segment, damage to a synced record followed by a later
    /// completed sync is reported where it is, over many seeds (the final stretch is
    /// the accepted limit and excluded by `corrupt_random_record`).
    #[test]
    fn corruption_in_preallocated_segments_is_reported_where_it_is() {
        let mut reported = 0;
        for seed in 0..200u64 {
            let mut s = FaultyStore::with_options(WalOptions {
                segment_bytes_max: 64 << 10,
                prealloc_chunk_bytes: 4 << 10,
                ..WalOptions::default()
            });
            fill(&mut s, 40);
            assert!(s.wal().active_segment_in_place());
            let (records, filled) = s.wal().active_segment_bytes();
            assert!(filled > records, "a zero tail follows the records");
            let c = s.corrupt_random_record(seed).expect("records exist");
            assert_reported(&mut s, &c, seed);
            reported += 1;
        }
        assert_eq!(reported, 200);
    }
}
