//! The WAL on real files: corruption is reported with file and offset, torn tails are cut,
//! segments roll and are deleted once a snapshot covers them.

use concord_consensus::{ConfState, Entry, EntryKind, HardState, Snapshot, SnapshotMeta};
use concord_storage::record;
use concord_storage::wal::{FsyncPolicy, Wal, WalOptions};
use concord_storage::{LogStore, StorageError};
use std::fs;
use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("concord-storage-{}-{}", std::process::id(), name));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ents(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range
        .map(|index| Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: format!("entry {index}").into_bytes(),
        })
        .collect()
}

fn opts(segment_bytes_max: u64) -> WalOptions {
    WalOptions {
        segment_bytes_max,
        ..WalOptions::default()
    }
}

/// New segments append instead of being zero-filled ahead (as before preallocation, and
/// as a format-3 segment of an older version reopened): read with the strict rule.
fn appending_opts(segment_bytes_max: u64) -> WalOptions {
    WalOptions {
        prealloc_chunk_bytes: 0,
        ..opts(segment_bytes_max)
    }
}

/// Segment files, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// The checksum salt of a segment file's records, from the seq in its name.
/// Opening must fail with `Corrupt` naming `seg` and the record at byte `offset`.
fn expect_corrupt_at(opened: concord_storage::Result<Wal>, seg: &Path, offset: u64) {
    match opened {
        Err(StorageError::Corrupt {
            path, offset: at, ..
        }) => {
            assert_eq!((Path::new(&path), at), (seg, offset));
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a WAL"),
    }
}

fn salt_of(path: &Path) -> u32 {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    record::segment_salt(concord_storage::wal::segment_seq(&name).expect("a segment name"))
}

/// Offsets of the records in a segment file.
fn record_offsets(path: &Path) -> Vec<usize> {
    let bytes = fs::read(path).unwrap();
    let mut at = 0;
    let mut v = Vec::new();
    while let Ok((_, n)) = record::decode(&bytes[at..], salt_of(path)) {
        v.push(at);
        at += n;
    }
    assert_eq!(
        record::nonzero_end(&bytes[at..]),
        0,
        "test setup: the file decodes fully, up to a zero-filled tail"
    );
    v
}

fn flip(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

fn write_log(dir: &Path, n: u64, segment_bytes_max: u64) {
    write_log_with(dir, n, opts(segment_bytes_max));
}

fn write_log_with(dir: &Path, n: u64, opts: WalOptions) {
    let mut wal = Wal::open(dir, opts).unwrap();
    for i in (1..=n).step_by(10) {
        wal.append(&ents(i..=(i + 9).min(n), 1)).unwrap();
        wal.set_hard_state(HardState {
            term: 1,
            vote: 1,
            commit: i,
        })
        .unwrap();
        assert_eq!(wal.sync().unwrap(), (i + 9).min(n));
    }
}

#[test]
fn reopen_returns_everything_synced() {
    let d = TempDir::new("reopen");
    write_log(&d.0, 395, 4096);
    assert!(segments(&d.0).len() > 1, "segments rolled");
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.entries, ents(1..=395, 1));
    assert_eq!(r.hard_state.commit, 391);
    assert_eq!((wal.first_index(), wal.last_index()), (1, 395));
}

#[test]
fn flipped_byte_in_a_middle_record_is_reported_with_file_and_offset() {
    let d = TempDir::new("flip-middle");
    write_log(&d.0, 50, 64 << 20);
    let seg = segments(&d.0).pop().unwrap();
    let offsets = record_offsets(&seg);
    let victim = offsets[offsets.len() / 2];
    flip(&seg, victim + 20);
    let err = Wal::open(&d.0, opts(64 << 20)).expect_err("must refuse to open");
    match &err {
        StorageError::Corrupt { path, offset, .. } => {
            assert_eq!(Path::new(path), seg.as_path());
            assert_eq!(*offset, victim as u64);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&seg.display().to_string()) && text.contains(&victim.to_string()));
    assert!(text.contains("Refusing to start"), "{text}");
}

#[test]
fn damaged_length_in_the_last_segment_is_corruption_not_a_torn_tail() {
    let d = TempDir::new("flip-length");
    write_log(&d.0, 30, 64 << 20);
    let seg = segments(&d.0).pop().unwrap();
    let offsets = record_offsets(&seg);
    let victim = offsets[3];
    // The length field: without a header checksum this would look like a record running
    // past the end of the file, and everything after it would be cut off silently.
    flip(&seg, victim + 5);
    match Wal::open(&d.0, opts(64 << 20)) {
        Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, victim as u64),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a WAL"),
    }
}

#[test]
fn corruption_in_an_older_segment_is_reported_even_in_its_last_record() {
    let d = TempDir::new("flip-old-seg");
    write_log(&d.0, 800, 4096);
    let segs = segments(&d.0);
    assert!(segs.len() >= 3);
    let seg = &segs[1];
    let last = *record_offsets(seg).last().unwrap();
    flip(seg, last + 17);
    expect_corrupt_at(Wal::open(&d.0, opts(4096)), seg, last as u64);
}

#[test]
fn torn_tail_is_cut_off_and_the_node_starts() {
    let d = TempDir::new("torn");
    write_log(&d.0, 40, 64 << 20);
    let seg = segments(&d.0).pop().unwrap();
    let offsets = record_offsets(&seg);
    let last_record = *offsets.last().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    // The last write was entries 31..40 (one entries record), the hard state and a sync
    // marker; cut into the entries record, which is then lost whole.
    let cut_at = offsets[offsets.len() - 3];
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut_at as u64 + 7)
        .unwrap();
    assert!(last_record as u64 > cut_at as u64 && len > cut_at as u64 + 7);
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.entries, ents(1..=30, 1));
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        cut_at as u64,
        "the torn bytes are gone (the previous sync's marker ends the file again)"
    );
    // The log goes on from there, and a reopen sees the new entries.
    wal.append(&ents(31..=32, 2)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    assert_eq!(wal.recover().unwrap().entries.last().unwrap().index, 32);
}

#[test]
fn bad_checksum_of_the_very_last_record_and_zero_filled_tail_count_as_torn() {
    let d = TempDir::new("torn-crc");
    write_log(&d.0, 20, 64 << 20);
    let seg = segments(&d.0).pop().unwrap();
    let offsets = record_offsets(&seg);
    // The very last record is the sync marker written before the last fsync: damage to
    // it looks like a torn write, and cutting it loses no data.
    let last = *offsets.last().unwrap();
    flip(&seg, last + 18);
    let mut bytes = fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&seg, bytes).unwrap();
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.entries, ents(1..=20, 1));
    assert_eq!(
        r.hard_state.commit, 11,
        "the hard state before the marker is kept"
    );
    // Cut back to the damaged marker, then a fresh marker was written and synced (and,
    // the segment being preallocated, zeros after it).
    assert_eq!(wal.active_segment_bytes().0, last as u64 + 37);
    assert_eq!(valid_end(&seg), last + 37);
    let len = fs::metadata(&seg).unwrap().len();
    assert_eq!(len, wal.active_segment_bytes().1);
    assert!(
        len > last as u64 + 37 + 4096,
        "zero-filled ahead again: {len}"
    );
}

/// In an appending segment (written in place, damage in the final stretch is the
/// accepted limit: see `damage_to_synced_data_of_a_preallocated_segment_is_corruption`).
#[test]
fn damage_to_the_last_synced_hard_state_is_corruption() {
    let d = TempDir::new("last-hs");
    write_log_with(&d.0, 20, appending_opts(64 << 20));
    let seg = segments(&d.0).pop().unwrap();
    // [..., entry 20, hard state, sync marker]: the hard state is the last record with
    // data. Without the marker after it, this damage would be cut off as a torn tail.
    let bytes = fs::read(&seg).unwrap();
    let hs = *record_offsets(&seg)
        .iter()
        .rfind(|&&at| {
            matches!(
                concord_storage::record::decode(&bytes[at..], salt_of(&seg)),
                Ok((concord_storage::record::Record::HardState(_), _))
            )
        })
        .expect("a hard state record");
    flip(&seg, hs + 18);
    expect_corrupt_at(Wal::open(&d.0, appending_opts(64 << 20)), &seg, hs as u64);
}

#[test]
fn a_missing_middle_segment_is_reported() {
    let d = TempDir::new("missing");
    write_log(&d.0, 800, 4096);
    let segs = segments(&d.0);
    assert!(segs.len() >= 3);
    fs::remove_file(&segs[1]).unwrap();
    match Wal::open(&d.0, opts(4096)) {
        Err(StorageError::Corrupt { path, detail, .. }) => {
            assert_eq!(Path::new(&path), segs[2].as_path());
            assert!(detail.contains("missing"), "{detail}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a WAL"),
    }
}

fn snap(index: u64, term: u64) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            index,
            term,
            conf: ConfState::new([1, 2, 3]),
        },
        data: vec![7u8; 1000],
    }
}

#[test]
fn snapshot_deletes_covered_segments_and_survives_reopen() {
    let d = TempDir::new("snap");
    write_log(&d.0, 300, 4096);
    let before = segments(&d.0).len();
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    wal.install_snapshot(&snap(250, 1)).unwrap();
    let after = segments(&d.0).len();
    assert!(after < before, "{after} segments left of {before}");
    assert_eq!((wal.first_index(), wal.last_index()), (251, 300));
    wal.append(&ents(301..=310, 2)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.applied, 250);
    assert_eq!(r.snapshot.unwrap(), snap(250, 1));
    assert_eq!(r.entries.first().unwrap().index, 251);
    assert_eq!(r.entries.last().unwrap().index, 310);
    assert_eq!(r.entries.len(), 60);

    // A snapshot the log does not match replaces the whole log.
    wal.install_snapshot(&snap(400, 3)).unwrap();
    assert_eq!((wal.first_index(), wal.last_index()), (401, 400));
    assert_eq!(segments(&d.0).len(), 1);
    drop(wal);
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    let r = wal.recover().unwrap();
    assert!(r.entries.is_empty());
    assert_eq!(r.applied, 400);
    // Only the newest two snapshot files are kept.
    assert_eq!(fs::read_dir(d.0.join("snap")).unwrap().count(), 2);
}

/// Reopening finds the snapshot at 250 (term 1) and the entries 251..=300 after it.
fn assert_reopens_with_snapshot_250_and_entries_to_300(dir: &Path) {
    let mut wal = Wal::open(dir, opts(4096)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.applied, 250);
    assert_eq!(r.snapshot.unwrap(), snap(250, 1));
    assert_eq!(r.entries.first().unwrap().index, 251);
    assert_eq!(r.entries.last().unwrap().index, 300);
}

#[test]
fn snapshot_written_on_another_thread_is_adopted_and_survives_reopen() {
    let d = TempDir::new("snap-writer");
    write_log(&d.0, 300, 4096);
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    let writer = wal.snapshot_writer().expect("the file WAL has a writer");
    let s = snap(250, 1);
    let written = std::thread::spawn(move || writer.write(&s).unwrap())
        .join()
        .unwrap();
    // Written but not adopted: the log is untouched.
    assert_eq!((wal.first_index(), wal.last_index()), (1, 300));
    assert!(wal.adopt_snapshot(written).unwrap());
    assert_eq!((wal.first_index(), wal.last_index()), (251, 300));
    // A snapshot older than the stored one is not adopted and changes nothing.
    let old = wal.snapshot_writer().unwrap().write(&snap(200, 1)).unwrap();
    assert!(!wal.adopt_snapshot(old).unwrap());
    assert_eq!((wal.first_index(), wal.last_index()), (251, 300));
    drop(wal);
    assert_reopens_with_snapshot_250_and_entries_to_300(&d.0);
}

/// A snapshot larger than one write piece (written and fsynced piece by piece) comes back
/// byte for byte, whether it ends on a piece boundary or not.
#[test]
fn a_snapshot_of_several_write_pieces_reads_back_whole() {
    let chunk = concord_storage::snapshot::SNAPSHOT_WRITE_CHUNK_BYTES;
    for (k, len) in [2 * chunk, 2 * chunk + 12_345, chunk - 1]
        .into_iter()
        .enumerate()
    {
        let d = TempDir::new(&format!("snap-pieces-{k}"));
        write_log(&d.0, 300, 4096);
        let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
        let mut s = snap(250, 1);
        s.data = (0..len).map(|i| (i % 251) as u8).collect();
        let written = wal.snapshot_writer().unwrap().write(&s).unwrap();
        assert!(wal.adopt_snapshot(written).unwrap());
        drop(wal);
        let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
        let r = wal.recover().unwrap();
        assert_eq!(r.snapshot.unwrap(), s, "snapshot of {len} bytes");
    }
}

#[test]
fn a_crash_between_writing_and_adopting_recovers_the_snapshot() {
    let d = TempDir::new("snap-writer-crash");
    write_log(&d.0, 300, 4096);
    let wal = Wal::open(&d.0, opts(4096)).unwrap();
    wal.snapshot_writer().unwrap().write(&snap(250, 1)).unwrap();
    drop(wal); // "crash": never adopted
    assert_reopens_with_snapshot_250_and_entries_to_300(&d.0);
}

#[test]
fn a_failed_off_thread_write_leaves_no_temp_file() {
    let d = TempDir::new("snap-writer-fail");
    write_log(&d.0, 300, 4096);
    let wal = Wal::open(&d.0, opts(4096)).unwrap();
    // A directory where the snapshot file should go makes the final rename fail.
    let target = d.0.join("snap").join(format!("{:020}-{:020}.snap", 250, 1));
    fs::create_dir_all(&target).unwrap();
    let err = wal
        .snapshot_writer()
        .unwrap()
        .write(&snap(250, 1))
        .unwrap_err();
    assert!(err.to_string().contains(".snap"), "{err}");
    let leftovers: Vec<_> = fs::read_dir(d.0.join("snap"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn stores_without_files_cannot_adopt() {
    let mem = concord_storage::mem::MemStore::new();
    assert!(mem.snapshot_writer().is_none());
}

#[test]
fn corrupt_snapshot_is_a_clear_error() {
    let d = TempDir::new("snap-corrupt");
    write_log(&d.0, 30, 64 << 20);
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    wal.install_snapshot(&snap(20, 1)).unwrap();
    drop(wal);
    let file = fs::read_dir(d.0.join("snap"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    flip(&file, 500);
    let err = Wal::open(&d.0, opts(64 << 20)).expect_err("must refuse");
    match &err {
        StorageError::Corrupt { path, detail, .. } => {
            assert_eq!(Path::new(path), file.as_path());
            assert!(detail.contains("checksum"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let d = TempDir::new("invalid");
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    wal.append(&ents(1..=3, 1)).unwrap();
    assert!(matches!(
        wal.append(&ents(5..=5, 1)),
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        wal.append(&ents(0..=0, 1)),
        Err(StorageError::Invalid(_))
    ));
    wal.set_hard_state(HardState {
        term: 5,
        vote: 1,
        commit: 0,
    })
    .unwrap();
    assert!(matches!(
        wal.set_hard_state(HardState {
            term: 4,
            vote: 1,
            commit: 0
        }),
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(wal.compact(2), Err(StorageError::Invalid(_))));
    assert!(matches!(
        Wal::open(
            &d.0,
            WalOptions {
                segment_bytes_max: 10,
                ..WalOptions::default()
            }
        ),
        Err(StorageError::Invalid(_))
    ));
}

#[test]
fn fsync_policy_none_still_writes() {
    let d = TempDir::new("nofsync");
    let mut wal = Wal::open(
        &d.0,
        WalOptions {
            fsync: FsyncPolicy::None,
            ..WalOptions::default()
        },
    )
    .unwrap();
    wal.append(&ents(1..=5, 1)).unwrap();
    assert_eq!(wal.sync().unwrap(), 5);
    drop(wal);
    let mut wal = Wal::open(&d.0, WalOptions::default()).unwrap();
    assert_eq!(wal.recover().unwrap().entries.len(), 5);
}

#[test]
fn a_newest_segment_without_its_start_record_is_dropped() {
    let d = TempDir::new("empty-last");
    write_log(&d.0, 20, 64 << 20);
    // A crash right after creating the next segment: its name survived, no byte did
    // (or only part of the start record).
    let next =
        d.0.join("wal")
            .join("00000000000000000002-00000000000000000021.wal");
    // The roll cut segment 1 to its records (its zeros written ahead) before that.
    let first = segments(&d.0).pop().unwrap();
    let end = valid_end(&first) as u64;
    fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(end)
        .unwrap();
    fs::write(&next, [0x11u8, 0x22, 0x33]).unwrap();
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    assert_eq!(wal.recover().unwrap().entries, ents(1..=20, 1));
    assert!(!next.exists());
    // The same file in the middle of the log is corruption.
    drop(wal);
    fs::write(&next, [0x11u8, 0x22, 0x33]).unwrap();
    fs::write(
        d.0.join("wal")
            .join("00000000000000000003-00000000000000000021.wal"),
        [],
    )
    .unwrap();
    assert!(matches!(
        Wal::open(&d.0, opts(64 << 20)),
        Err(StorageError::Corrupt { .. })
    ));
}

/// A plain append that does not fit in the active segment starts a new one before its
/// first entry (so closing the old segment needs no fsync of its own right after a
/// `sync`), and consecutive entries of one term share one `Entries` record.
#[test]
fn a_segment_rolls_before_an_append_that_does_not_fit() {
    let d = TempDir::new("roll-before");
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    let big = |range: std::ops::RangeInclusive<u64>| -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term: 1,
                kind: EntryKind::Normal,
                data: vec![index as u8; 300],
            })
            .collect()
    };
    for first in (1..=50).step_by(10) {
        wal.append(&big(first..=first + 9)).unwrap();
        wal.sync().unwrap();
    }
    let segs = segments(&d.0);
    assert_eq!(
        segs.len(),
        5,
        "3 KiB per append, one append per 4 KiB segment"
    );
    for (k, seg) in segs.iter().enumerate() {
        let name = seg.file_name().unwrap().to_string_lossy().into_owned();
        let first_index: u64 = name[21..41].parse().unwrap();
        assert_eq!(first_index, 1 + 10 * k as u64, "{name}");
        // Segment start (the first one synced by itself at open, so with a marker), one
        // entries record with all ten, sync marker.
        let bytes = fs::read(seg).unwrap();
        let kinds: Vec<record::Record> = record_offsets(seg)
            .into_iter()
            .map(|at| record::decode(&bytes[at..], salt_of(seg)).unwrap().0)
            .collect();
        assert_eq!(kinds.len(), if k == 0 { 4 } else { 3 }, "{name}: {kinds:?}");
        assert!(
            matches!(&kinds[kinds.len() - 2], record::Record::Entries(v) if v.len() == 10),
            "{name}"
        );
    }
    drop(wal);
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    assert_eq!(wal.recover().unwrap().entries, big(1..=50));
}

/// Entries of 4 KiB and more go to the file in `writev`s straight from the caller's
/// buffers (600 of them in the first append: over 1024 pieces, so several calls), mixed with copied small ones;
/// a reopen reads back exactly what was appended, and a torn tail inside such data is cut.
#[test]
fn large_entries_are_written_without_a_copy_and_read_back() {
    let d = TempDir::new("zero-copy");
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    let ents: Vec<Entry> = (1..=1000u64)
        .map(|index| Entry {
            index,
            term: 1 + index / 300,
            kind: EntryKind::Normal,
            data: vec![
                index as u8;
                if index % 3 == 0 {
                    100
                } else {
                    4096 + index as usize
                }
            ],
        })
        .collect();
    wal.append(&ents[..900]).unwrap();
    wal.set_hard_state(HardState {
        term: 3,
        vote: 1,
        commit: 500,
    })
    .unwrap();
    wal.sync().unwrap();
    wal.append(&ents[900..]).unwrap();
    wal.sync().unwrap();
    drop(wal);
    // The stretch checksums cover the data written without a copy too.
    assert!(check_stretches(&segments(&d.0).pop().unwrap()) >= 3);
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.entries, ents);
    assert_eq!(r.hard_state.commit, 500);
    drop(wal);

    // Cut inside the data of the last append's first entries record: that record and
    // everything after it are gone, the first append survives.
    let seg = segments(&d.0).pop().unwrap();
    let bytes = fs::read(&seg).unwrap();
    let offsets = record_offsets(&seg);
    let first_of_last_append = *offsets
        .iter()
        .find(|&&at| {
            matches!(record::decode(&bytes[at..], salt_of(&seg)), Ok((record::Record::Entries(v), _)) if v[0].index == 901)
        })
        .expect("an entries record starting at 901");
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(first_of_last_append as u64 + 5000)
        .unwrap();
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    assert_eq!(wal.recover().unwrap().entries, ents[..900].to_vec());
}

/// A sync of 32 KiB or more pads its marker so that the file ends on a 4 KiB boundary
/// (the next sync starts on a fresh page); a small sync does not. Both read back.
#[test]
fn a_large_sync_ends_on_a_page_boundary() {
    let d = TempDir::new("pad");
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    let ents = |range: std::ops::RangeInclusive<u64>, n: usize| -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term: 1,
                kind: EntryKind::Normal,
                data: vec![index as u8; n],
            })
            .collect()
    };
    let seg = segments(&d.0).pop().unwrap();
    let mut all = Vec::new();
    for (k, (batch, size)) in [(100, 1000), (3, 10), (40, 1000), (1, 20)]
        .iter()
        .enumerate()
    {
        let first = all.len() as u64 + 1;
        let b = ents(first..=first + batch - 1, *size);
        wal.append(&b).unwrap();
        all.extend(b);
        wal.sync().unwrap();
        // Where the records end (the file may go on with zeros written ahead).
        let len = wal.active_segment_bytes().0;
        assert_eq!(len, valid_end(&seg) as u64);
        if k % 2 == 0 {
            assert_eq!(
                len % 4096,
                0,
                "sync {k} of {batch} x {size} B ends at {len}"
            );
        } else {
            assert_ne!(len % 4096, 0, "sync {k}: small syncs are not padded");
        }
    }
    drop(wal);
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    assert_eq!(wal.recover().unwrap().entries, all);
}

/// Byte offset where the valid records of a segment file end (a recycled file may hold
/// stale bytes of its earlier life after that).
fn valid_end(path: &Path) -> usize {
    let bytes = fs::read(path).unwrap();
    let mut at = 0;
    while let Ok((_, n)) = record::decode(&bytes[at..], salt_of(path)) {
        at += n;
    }
    at
}

/// Writes with 4 KiB segments and a snapshot whenever a segment has rolled, as a node in
/// steady state compacts behind its log, until at least `recycled` segments were started
/// in a reused file and the newest one is one of them, half full, with stale bytes after
/// its records. Returns the WAL (synced), the snapshot index and the last index.
fn recycled_log(dir: &Path, recycled: u64) -> (Wal, u64, u64) {
    let mut wal = Wal::open(dir, opts(4096)).unwrap();
    let (mut snap_index, mut last) = (0, 0);
    for _ in 0..10_000 {
        wal.append(&ents(last + 1..=last + 10, 1)).unwrap();
        last += 10;
        wal.set_hard_state(HardState {
            term: 1,
            vote: 1,
            commit: last,
        })
        .unwrap();
        wal.sync().unwrap();
        let newest = segments(dir).pop().unwrap();
        if wal.segments_recycled() >= recycled
            && valid_end(&newest) > 1000
            && fs::metadata(&newest).unwrap().len() > valid_end(&newest) as u64 + 1000
        {
            return (wal, snap_index, last);
        }
        if wal.segment_count() > 1 {
            snap_index = last - 5;
            wal.install_snapshot(&snap(snap_index, 1)).unwrap();
            assert!(wal.spare_count() > 0);
        }
    }
    panic!("no recycled newest segment with a stale tail");
}

#[test]
fn a_stale_tail_after_a_clean_shutdown_reopens_with_exactly_the_synced_log() {
    let d = TempDir::new("recycled-clean");
    let (wal, snap_index, last) = recycled_log(&d.0, 3);
    let spares = wal.spare_count();
    drop(wal);
    let newest = segments(&d.0).pop().unwrap();
    let end = valid_end(&newest);
    for round in 0..2 {
        let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
        let r = wal.recover().unwrap();
        assert_eq!(r.applied, snap_index, "round {round}");
        assert_eq!(r.entries, ents(snap_index + 1..=last, 1), "round {round}");
        assert_eq!(r.hard_state.commit, last);
        assert_eq!(wal.spare_count(), spares, "spares survive a reopen");
        drop(wal);
        // The stale bytes were cut off: nothing of the file's earlier life is left.
        assert_eq!(fs::metadata(&newest).unwrap().len(), end as u64);
    }
    // The log continues in the same segment, and later rolls still reuse spares.
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    wal.append(&ents(last + 1..=last + 200, 1)).unwrap();
    wal.sync().unwrap();
    wal.install_snapshot(&snap(last + 100, 1)).unwrap();
    wal.append(&ents(last + 201..=last + 400, 1)).unwrap();
    wal.sync().unwrap();
    assert!(wal.segments_recycled() > 0);
    drop(wal);
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    assert_eq!(
        wal.recover().unwrap().entries,
        ents(last + 101..=last + 400, 1)
    );
}

#[test]
fn damage_to_a_synced_record_of_a_recycled_segment_is_corruption() {
    let d = TempDir::new("recycled-damage");
    let (mut wal, _, last) = recycled_log(&d.0, 3);
    // Everything is synced: a copy of the directory is what a crash would leave.
    let synced = TempDir::new("recycled-damage-synced");
    copy_dir(&d.0, &synced.0);
    let newest = segments(&synced.0).pop().unwrap();
    let offsets = record_offsets_prefix(&newest);
    // A middle record, and the last one with data before the last marker but one: every
    // record of a completed stretch followed by a later sync (damage inside the final
    // stretch of a recycled segment is taken for an incomplete sync, see
    // `an_incomplete_sync_of_a_recycled_segment_is_a_torn_tail`).
    let marks = marker_offsets(&newest);
    assert!(marks.len() >= 2, "{marks:?}");
    let penultimate = marks[marks.len() - 2];
    let before = *offsets.iter().rfind(|&&o| o < penultimate).unwrap();
    let n = offsets.len();
    for at in [offsets[n / 2], before] {
        let copy = TempDir::new(&format!("recycled-damage-{at}"));
        copy_dir(&synced.0, &copy.0);
        let seg = copy.0.join("wal").join(newest.file_name().unwrap());
        flip(&seg, at + 5);
        match Wal::open(&copy.0, opts(4096)) {
            Err(StorageError::Corrupt { path, offset, .. }) => {
                assert_eq!((Path::new(&path), offset), (seg.as_path(), at as u64));
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("record at {at}: expected Corrupt, got a WAL"),
        }
    }
    // The recycled segment rolls over: it is cut to its records when it is closed, so
    // damage to its last record is corruption, as in any older segment.
    let mut next = last + 1;
    while wal.segment_count() < 2 {
        wal.append(&ents(next..=next + 9, 1)).unwrap();
        wal.sync().unwrap();
        next += 10;
    }
    drop(wal);
    let older = segments(&d.0).into_iter().rev().nth(1).unwrap();
    assert_eq!(older.file_name(), newest.file_name());
    assert_eq!(
        fs::metadata(&older).unwrap().len(),
        valid_end(&older) as u64
    );
    let offsets = record_offsets(&older);
    let at = offsets[offsets.len() - 1];
    flip(&older, at + 20);
    assert!(matches!(
        Wal::open(&d.0, opts(4096)),
        Err(StorageError::Corrupt { offset, .. }) if offset == at as u64
    ));
}

/// Offsets of the valid sync markers at the start of a segment file.
fn marker_offsets(path: &Path) -> Vec<usize> {
    let bytes = fs::read(path).unwrap();
    record_offsets_prefix(path)
        .into_iter()
        .filter(|&at| {
            matches!(
                record::decode(&bytes[at..], salt_of(path)),
                Ok((record::Record::SyncMark { .. }, _))
            )
        })
        .collect()
}

/// Offsets of the valid records at the start of a segment file (up to stale bytes).
fn record_offsets_prefix(path: &Path) -> Vec<usize> {
    let bytes = fs::read(path).unwrap();
    let mut at = 0;
    let mut v = Vec::new();
    while let Ok((_, n)) = record::decode(&bytes[at..], salt_of(path)) {
        v.push(at);
        at += n;
    }
    v
}

fn copy_dir(from: &Path, to: &Path) {
    for sub in ["wal", "snap"] {
        fs::create_dir_all(to.join(sub)).unwrap();
        for e in fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
        }
    }
}

/// A data directory of the first format (checksums without the segment salt) is refused
/// with a clear error, never replayed as garbage or dropped as a torn segment.
#[test]
fn a_segment_of_the_old_unsalted_format_is_refused() {
    let d = TempDir::new("old-format");
    fs::create_dir_all(d.0.join("wal")).unwrap();
    let mut buf = Vec::new();
    for r in [
        record::Record::SegmentStart {
            seq: 1,
            prev_index: 0,
            prev_term: 0,
            reset: true,
            recycled: false,
        },
        record::Record::Entries(ents(1..=3, 1)),
        record::Record::SyncMark {
            offset: 0,
            stretch_start: 0,
            stretch_crc: 0,
            recycled: false,
            padding: 0,
        },
    ] {
        let r = match r {
            record::Record::SyncMark { padding, .. } => record::Record::SyncMark {
                offset: buf.len() as u64,
                stretch_start: 0,
                stretch_crc: 0,
                recycled: false,
                padding,
            },
            r => r,
        };
        record::encode(&mut buf, &r, record::UNSALTED);
    }
    let seg =
        d.0.join("wal")
            .join("00000000000000000001-00000000000000000001.wal");
    fs::write(&seg, &buf).unwrap();
    match Wal::open(&d.0, opts(4096)) {
        Err(StorageError::Corrupt {
            path,
            offset,
            detail,
        }) => {
            assert_eq!((Path::new(&path), offset), (seg.as_path(), 0));
            assert!(detail.contains("older on-disk format"), "{detail}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a WAL"),
    }
    assert_eq!(fs::read(&seg).unwrap(), buf, "the file is left alone");
}

/// Appends `n` entries after `last` and a hard state committing them, syncs, and returns
/// the byte range `[start, end)` of the newest segment that this sync wrote (its records
/// and, last, its sync marker).
fn one_sync(wal: &mut Wal, seg: &Path, last: u64, n: u64) -> (usize, usize) {
    let start = valid_end(seg);
    wal.append(&ents(last + 1..=last + n, 1)).unwrap();
    wal.set_hard_state(HardState {
        term: 1,
        vote: 1,
        commit: last + n,
    })
    .unwrap();
    wal.sync().unwrap();
    assert_eq!(
        segments(seg.parent().unwrap().parent().unwrap())
            .pop()
            .unwrap(),
        seg
    );
    (start, valid_end(seg))
}

/// What a power cut during a sync's `fdatasync` can leave with a volatile disk cache: a
/// later page of the sync (with its marker) written, an earlier one not, which then
/// still holds its old content (`old`; zeros beyond the old end of the file).
fn lose_bytes(seg: &Path, old: &[u8], range: std::ops::Range<usize>) {
    let mut bytes = fs::read(seg).unwrap();
    for i in range {
        bytes[i] = old.get(i).copied().unwrap_or(0);
    }
    fs::write(seg, bytes).unwrap();
}

/// The review finding: in a recycled segment, an `fdatasync` overwrites blocks the file
/// owns, and a power cut during it can keep the page with the new sync marker and lose an
/// earlier page of the same sync. That sync never returned, so nothing acknowledged is
/// missing: recovery must cut it off and start, not refuse with `Corrupt` (a majority of
/// nodes could hit this in one power cut). Fails without the stretch checksum: the
/// marker after the bad record then always meant `Corrupt`.
#[test]
fn an_incomplete_sync_of_a_recycled_segment_is_a_torn_tail() {
    let d = TempDir::new("recycled-incomplete-sync");
    let (mut wal, snap_index, last) = recycled_log(&d.0, 3);
    let seg = segments(&d.0).pop().unwrap();
    let old = fs::read(&seg).unwrap();
    let (start, end) = one_sync(&mut wal, &seg, last, 3);
    drop(wal);
    assert_ne!(
        old[start..start + 16],
        fs::read(&seg).unwrap()[start..start + 16]
    );
    lose_bytes(&seg, &old, start..start + 16);
    assert!(record::decode(&fs::read(&seg).unwrap()[start..], salt_of(&seg)).is_err());
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.applied, snap_index);
    assert_eq!(
        r.entries,
        ents(snap_index + 1..=last, 1),
        "what was synced before"
    );
    assert_eq!(r.hard_state.commit, last);
    assert!(valid_end(&seg) < end);
    // The log goes on from there, and what is synced next survives a reopen.
    wal.append(&ents(last + 1..=last + 2, 2)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    let r = wal.recover().unwrap();
    assert_eq!(r.entries.len() as u64, last + 2 - snap_index);
    assert_eq!(r.entries.last().unwrap().term, 2);
    drop(wal);
    assert!(check_stretches(&seg) >= 2);
}

/// Checks every sync marker at the start of a segment file (up to stale bytes): its
/// stretch begins where the previous marker ends (or at 0) and its checksum matches the
/// bytes. Returns the number of markers. Recovery only reads a stretch checksum after a
/// bad record, so this is what shows the writer computes them right.
fn check_stretches(path: &Path) -> usize {
    let bytes = fs::read(path).unwrap();
    let salt = salt_of(path);
    let mut prev_end = 0;
    let mut n = 0;
    for at in record_offsets_prefix(path) {
        let (rec, len) = record::decode(&bytes[at..], salt).unwrap();
        if let record::Record::SyncMark {
            stretch_start,
            stretch_crc,
            ..
        } = rec
        {
            assert_eq!(stretch_start, prev_end as u64, "marker at {at}");
            assert_eq!(
                stretch_crc,
                record::stretch_crc(salt, &bytes[prev_end..at]),
                "marker at {at}"
            );
            prev_end = at + len;
            n += 1;
        }
    }
    n
}

/// The stretch checksums the writer computes match the bytes, in a recycled segment, in
/// segments that rolled (and were cut when closed), with padded markers, after a
/// recovery that kept records written without a sync, and after one that cut a torn
/// tail.
#[test]
fn every_stretch_checksum_matches_what_was_written() {
    let d = TempDir::new("stretches");
    let (mut wal, _, last) = recycled_log(&d.0, 3);
    wal.set_sync_pad_min_for_tests(600);
    wal.append(&ents(last + 1..=last + 40, 1)).unwrap();
    wal.sync().unwrap();
    // Unsynced records that survive (a process crash with the page cache intact): large
    // enough to be written without a copy before `append` returns, never synced.
    wal.set_zero_copy_min_for_tests(64);
    let big: Vec<Entry> = (last + 41..=last + 42)
        .map(|index| Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: vec![9; 100],
        })
        .collect();
    wal.append(&big).unwrap();
    drop(wal);
    let wal = Wal::open(&d.0, opts(4096)).unwrap();
    assert_eq!(wal.last_index(), last + 42, "the unsynced records survived");
    drop(wal);
    let last = last + 42;
    for seg in segments(&d.0) {
        assert!(check_stretches(&seg) >= 1, "{seg:?}");
    }
    // A torn tail cut at recovery: the next marker's stretch starts after the last one.
    let seg = segments(&d.0).pop().unwrap();
    let end = valid_end(&seg);
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    wal.set_zero_copy_min_for_tests(64);
    let big: Vec<Entry> = (last + 1..=last + 2)
        .map(|index| Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: vec![7; 100],
        })
        .collect();
    wal.append(&big).unwrap();
    drop(wal);
    let len = valid_end(&seg) as u64;
    assert!(len as usize > end + 10);
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let mut wal = Wal::open(&d.0, opts(4096)).unwrap();
    // Both entries were in one entries record, cut whole.
    assert_eq!(wal.last_index(), last, "the torn record was cut");
    wal.append(&ents(last + 1..=last + 3, 1)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    assert!(check_stretches(&seg) >= 2);
}

/// The same loss in a segment that appends to a new file: there the file system commits
/// the new size only after the data, so a marker never outlives an earlier page of its
/// sync, and damage followed by a valid marker is reported as corruption, as before.
#[test]
fn the_same_loss_in_an_appended_segment_is_corruption() {
    let d = TempDir::new("appended-incomplete-sync");
    write_log_with(&d.0, 20, appending_opts(64 << 20));
    let seg = segments(&d.0).pop().unwrap();
    let old = fs::read(&seg).unwrap();
    let mut wal = Wal::open(&d.0, appending_opts(64 << 20)).unwrap();
    assert!(!wal.active_segment_in_place());
    let (start, _) = one_sync(&mut wal, &seg, 20, 3);
    drop(wal);
    lose_bytes(&seg, &old, start..start + 16);
    expect_corrupt_at(
        Wal::open(&d.0, appending_opts(64 << 20)),
        &seg,
        start as u64,
    );
}

/// Damage to a stretch whose sync completed (a later sync's marker follows) is
/// corruption in both kinds of segment: the relaxed rule covers only the last stretch.
#[test]
fn damage_to_a_completed_sync_is_corruption_in_both_kinds_of_segment() {
    for recycled in [false, true] {
        let d = TempDir::new(&format!("completed-sync-{recycled}"));
        let (mut wal, last, seg_max) = if recycled {
            let (wal, _, last) = recycled_log(&d.0, 3);
            (wal, last, 4096)
        } else {
            write_log(&d.0, 20, 64 << 20);
            (Wal::open(&d.0, opts(64 << 20)).unwrap(), 20, 64 << 20)
        };
        let seg = segments(&d.0).pop().unwrap();
        let old = fs::read(&seg).unwrap();
        let (start, _) = one_sync(&mut wal, &seg, last, 3);
        one_sync(&mut wal, &seg, last + 3, 2);
        drop(wal);
        lose_bytes(&seg, &old, start..start + 16);
        match Wal::open(&d.0, opts(seg_max)) {
            Err(StorageError::Corrupt { path, offset, .. }) => {
                assert_eq!(
                    (Path::new(&path), offset),
                    (seg.as_path(), start as u64),
                    "recycled {recycled}"
                );
            }
            Err(e) => panic!("recycled {recycled}: expected Corrupt, got {e}"),
            Ok(_) => panic!("recycled {recycled}: expected Corrupt, got a WAL"),
        }
    }
}

/// A segment of format 2 (sync markers without stretch checksums, a 25-byte segment
/// start) is refused with a clear error.
#[test]
fn a_segment_of_format_2_is_refused() {
    let d = TempDir::new("format-2");
    fs::create_dir_all(d.0.join("wal")).unwrap();
    let salt = record::segment_salt(1);
    let mut start = Vec::new();
    start.extend_from_slice(&1u64.to_le_bytes());
    start.extend_from_slice(&0u64.to_le_bytes());
    start.extend_from_slice(&0u64.to_le_bytes());
    start.push(1);
    let mut buf = Vec::new();
    record::frame_raw(&mut buf, 1, &start, salt);
    let seg =
        d.0.join("wal")
            .join("00000000000000000001-00000000000000000001.wal");
    fs::write(&seg, &buf).unwrap();
    match Wal::open(&d.0, opts(4096)) {
        Err(StorageError::Corrupt { offset, detail, .. }) => {
            assert_eq!(offset, 0);
            assert!(detail.contains("format 2"), "{detail}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a WAL"),
    }
    assert_eq!(fs::read(&seg).unwrap(), buf, "the file is left alone");
}

/// A bad record inside a stretch whose checksum matches the bytes on disk cannot come
/// from a lost page (the checksum covers the bad record too): a bug or a forgery, so
/// recovery reports it, even in a recycled segment.
#[test]
fn a_matching_stretch_with_a_bad_record_in_it_is_corruption() {
    let d = TempDir::new("recycled-matching-stretch");
    let (mut wal, _, last) = recycled_log(&d.0, 3);
    let seg = segments(&d.0).pop().unwrap();
    let old = fs::read(&seg).unwrap();
    let (start, _) = one_sync(&mut wal, &seg, last, 3);
    drop(wal);
    lose_bytes(&seg, &old, start..start + 16);
    let salt = salt_of(&seg);
    let mut bytes = fs::read(&seg).unwrap();
    let m = record::find_sync_mark(&bytes, start + 1, salt).expect("the marker survived");
    let Ok((
        record::Record::SyncMark {
            offset,
            stretch_start,
            recycled,
            padding,
            ..
        },
        n,
    )) = record::decode(&bytes[m..], salt)
    else {
        panic!("a marker at {m}");
    };
    assert!(recycled);
    let forged = record::Record::SyncMark {
        offset,
        stretch_start,
        stretch_crc: record::stretch_crc(salt, &bytes[stretch_start as usize..m]),
        recycled,
        padding,
    };
    let mut enc = Vec::new();
    record::encode(&mut enc, &forged, salt);
    assert_eq!(enc.len(), n);
    bytes[m..m + n].copy_from_slice(&enc);
    fs::write(&seg, bytes).unwrap();
    assert!(matches!(
        Wal::open(&d.0, opts(4096)),
        Err(StorageError::Corrupt { offset, .. }) if offset == start as u64
    ));
}

/// (a) on real files: a fresh segment's file grows by chunks of zeros written ahead of
/// its records, so most small syncs do not change its size (their `fdatasync` need not
/// write the inode); the file's length is what the WAL says.
#[test]
fn a_fresh_segment_file_grows_in_chunks() {
    let d = TempDir::new("prealloc-chunks");
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    assert!(wal.active_segment_in_place());
    let seg = segments(&d.0).pop().unwrap();
    let mut changes = 0;
    let mut len = fs::metadata(&seg).unwrap().len();
    let data = vec![7u8; 3000];
    for index in 1..=500u64 {
        wal.append(&[Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: data.clone(),
        }])
        .unwrap();
        wal.sync().unwrap();
        let now = fs::metadata(&seg).unwrap().len();
        assert_eq!(now, wal.active_segment_bytes().1);
        assert!(now >= wal.active_segment_bytes().0);
        changes += u32::from(now != len);
        len = now;
    }
    // ~1.5 MB of records: the size changed when a sync crossed a chunk's end, not 500 times.
    assert!((1..=3).contains(&changes), "{changes} size changes");
    assert_eq!(wal.segments_recycled(), 0);
}

/// (b) A preallocated segment reopened: recovery returns exactly the synced records,
/// keeps the zero tail (the file's size stays), and the next records go right after the
/// last valid one, overwriting zeros; a second reopen reads them all back.
#[test]
fn a_preallocated_segment_reopens_and_appends_right_after_its_records() {
    let d = TempDir::new("prealloc-reopen");
    write_log(&d.0, 45, 64 << 20);
    let seg = segments(&d.0).pop().unwrap();
    let end = valid_end(&seg) as u64;
    let len = fs::metadata(&seg).unwrap().len();
    assert!(len > end + 4096, "zeros follow the records: {end} {len}");
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    assert_eq!(wal.recover().unwrap().entries, ents(1..=45, 1));
    assert_eq!(wal.active_segment_bytes(), (end, len));
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        len,
        "the zero tail stays"
    );
    wal.append(&ents(46..=50, 2)).unwrap();
    wal.sync().unwrap();
    drop(wal);
    assert_eq!(fs::metadata(&seg).unwrap().len(), len, "written in place");
    assert_eq!(record_offsets_prefix(&seg)[0], 0);
    assert!(
        valid_end(&seg) as u64 > end,
        "the new records follow the old ones"
    );
    assert!(check_stretches(&seg) >= 4);
    let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
    let mut want = ents(1..=45, 1);
    want.extend(ents(46..=50, 2));
    assert_eq!(wal.recover().unwrap().entries, want);
}

/// (c) A power cut during a sync of a new, preallocated segment: its `fdatasync`
/// overwrites zeros the file already holds, so, as in a recycled file, a later page (the
/// marker) can survive and an earlier one be lost (read back as the zeros it held).
/// That sync never returned: recovery cuts it and starts. A completed sync damaged the
/// same way (another sync followed) is still `Corrupt`.
#[test]
fn an_incomplete_sync_of_a_preallocated_segment_is_a_torn_tail() {
    for completed in [false, true] {
        let d = TempDir::new(&format!("prealloc-incomplete-sync-{completed}"));
        write_log(&d.0, 20, 64 << 20);
        let seg = segments(&d.0).pop().unwrap();
        let old = fs::read(&seg).unwrap();
        let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
        assert_eq!(wal.segments_recycled(), 0);
        let (start, end) = one_sync(&mut wal, &seg, 20, 3);
        assert!(
            old[start..end].iter().all(|&b| b == 0),
            "written over zeros"
        );
        if completed {
            one_sync(&mut wal, &seg, 23, 2);
        }
        drop(wal);
        lose_bytes(&seg, &old, start..start + 16);
        if completed {
            expect_corrupt_at(Wal::open(&d.0, opts(64 << 20)), &seg, start as u64);
            continue;
        }
        let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
        let r = wal.recover().unwrap();
        assert_eq!(r.entries, ents(1..=20, 1), "what was synced before");
        assert_eq!(r.hard_state.commit, 11);
        wal.append(&ents(21..=22, 2)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let mut wal = Wal::open(&d.0, opts(64 << 20)).unwrap();
        let mut want = ents(1..=20, 1);
        want.extend(ents(21..=22, 2));
        assert_eq!(wal.recover().unwrap().entries, want);
        assert!(wal.active_segment_in_place(), "read with the in-place rule");
    }
}

/// (c) Media damage to synced records of a preallocated segment is reported where it
/// is: in every record of every stretch but the last one. In the final stretch it is
/// cut as an incomplete sync (the accepted limit of segments written in place,
/// docs/storage.md "Known limits"); this test pins that down too.
#[test]
fn damage_to_synced_data_of_a_preallocated_segment_is_corruption() {
    let d = TempDir::new("prealloc-damage");
    write_log(&d.0, 40, 64 << 20);
    let seg = segments(&d.0).pop().unwrap();
    let markers = marker_offsets(&seg);
    assert!(markers.len() >= 4);
    let final_stretch_start = {
        let bytes = fs::read(&seg).unwrap();
        let m = markers[markers.len() - 2];
        m + record::decode(&bytes[m..], salt_of(&seg)).unwrap().1
    };
    let mut checked = 0;
    for at in record_offsets(&seg) {
        let copy = TempDir::new(&format!("prealloc-damage-{at}"));
        copy_dir(&d.0, &copy.0);
        let seg = segments(&copy.0).pop().unwrap();
        flip(&seg, at + 5);
        let opened = Wal::open(&copy.0, opts(64 << 20));
        if at < final_stretch_start {
            expect_corrupt_at(opened, &seg, at as u64);
            checked += 1;
        } else {
            let mut wal = opened.expect("the final stretch is cut as an incomplete sync");
            // Cut at the damaged record: what precedes it in the stretch stays.
            let got = wal.recover().unwrap().entries;
            let last = got.len() as u64;
            assert!((30..=40).contains(&last), "at {at}: {last}");
            assert_eq!(got, ents(1..=last, 1), "at {at}");
        }
    }
    assert!(checked >= 6, "{checked}");
}
