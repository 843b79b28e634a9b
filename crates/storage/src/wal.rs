//! `Wal`: the segmented write-ahead log plus snapshot files, the [`LogStore`] of real nodes.
//!
//! Layout under the data directory: `wal/<seq:020>-<first_index:020>.wal` and
//! `snap/<index:020>-<term:020>.snap`. Segments are named by a sequence number first
//! because the first index is not monotone: after a conflicting suffix is replaced, a new
//! segment may start below an older one. Every segment begins with a `SegmentStart`
//! record and the current hard state, so older segments can be deleted once compacted.
//!
//! Writes are encoded into one buffer and handed to the OS in large `write`s; `sync` does
//! one `fdatasync` for everything since the last one (group commit). Segment files freed
//! by compaction are kept (up to `SPARE_SEGMENTS_MAX`, as `<seq:020>.spare`) and reused
//! by the next segments, which then overwrite blocks already allocated instead of growing
//! a file: on ext4, an `fdatasync` that grows a file also commits its new size. A segment
//! in a new file is zero-filled ahead of its writes (`PREALLOC_CHUNK_BYTES` at a time),
//! so that most of its syncs overwrite allocated blocks too. Both kinds are "written in
//! place" (the `recycled` flag of their start record and markers), which recovery reads
//! with the rule for an incomplete last sync. Every record's checksums are salted with
//! its segment's seq, so stale records of a file's earlier life never validate. See
//! docs/storage.md for the format and recovery rules.

use crate::disk::{Disk, StdDisk};
use crate::mem::{check_append, check_compact, check_hard_state, check_snapshot};
use crate::record::{self, DecodeError, Record, HEADER_BYTES};
use crate::snapshot::{io_err, SnapshotStore, SNAPSHOTS_KEPT_DEFAULT};
use crate::{LogStore, Result, StorageError};
use concord_consensus::{Entry, HardState, Recovered, Snapshot};
use std::path::{Path, PathBuf};

/// When `sync` calls `fdatasync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every `sync` makes the batch durable. The only safe choice.
    #[default]
    EveryBatch,
    /// Never fsync. For benchmarks only: a power loss loses acknowledged writes.
    None,
}

#[derive(Clone, Debug)]
pub struct WalOptions {
    /// A segment is closed and a new one started once the next record would take it past
    /// this size (a segment always takes at least one entry, however large).
    pub segment_bytes_max: u64,
    pub fsync: FsyncPolicy,
    /// Snapshot files kept (newest first), at least 1.
    pub snapshots_kept: usize,
    /// Encoded records are buffered in memory up to this size before one `write`.
    pub write_buffer_bytes_max: usize,
    /// A segment in a new file is zero-filled this far ahead of its writes (never past
    /// `segment_bytes_max`, or past what an oversized append needs), so that its syncs
    /// overwrite allocated blocks instead of growing the file. 0 turns it off: new
    /// segments then append, and are read with the strict torn-tail rule.
    pub prealloc_chunk_bytes: u64,
}

/// 64 MiB segments: compaction granularity vs number of files.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 << 20;
/// 32 MiB: a whole batch (a `Ready`) goes to the OS in one `write`, up to this size. On
/// ext4 every `write` call may wait for a journal commit in progress, so a 16 MiB batch
/// in 1 MiB writes took twice as long as in one (measured, docs/storage.md). Bounds the
/// buffer's memory (its capacity is kept for the next batch).
pub const WRITE_BUFFER_BYTES_MAX_DEFAULT: usize = 32 << 20;

/// Encoded size of a `SyncMark` record without padding.
const SYNC_MARK_BYTES: u64 = (HEADER_BYTES + record::SYNC_MARK_PREFIX_BYTES) as u64;

/// A sync that writes at least this much pads its marker so that the segment ends on a
/// page boundary (`PAGE_BYTES`): the next sync then starts on a fresh page instead of
/// writing the last, partial page a second time (measured: 10% of a 128 KiB
/// `fdatasync`). Smaller syncs are not padded, which bounds the space spent on padding
/// to 1/8 of what is written.
pub const SYNC_PAD_MIN_BYTES: u64 = 32 << 10;

/// The page size sync markers align to (the usual file-system block and page size).
const PAGE_BYTES: u64 = 4096;

/// The write buffer keeps at most this much capacity between batches: reusing it saves
/// page faults on every batch, and one rare huge batch does not pin its size in memory.
const PENDING_CAPACITY_KEPT_BYTES: usize = 4 << 20;

/// Entry data of at least this size is not copied into the write buffer: the batch goes
/// to the OS in one `writev` straight from the caller's entries (at the end of `append`,
/// since they are only borrowed), saving a copy that costs about as much as the
/// kernel's own. Smaller data is copied: a buffer per entry would cost more than that.
pub const ZERO_COPY_MIN_BYTES: usize = 4096;

/// Largest `Entries` record the WAL writes (a single entry may be larger, in an `Entry`
/// record): bounds the buffer and what replay decodes at once.
pub const ENTRIES_RECORD_BYTES_MAX: usize = 1 << 20;

/// Segment files freed by compaction that are kept for reuse instead of deleted. Two
/// cover a node whose compaction frees segments one or two at a time; more would only
/// hold disk space (64 MiB each by default).
pub const SPARE_SEGMENTS_MAX: usize = 2;

/// How far ahead of its writes a segment in a new file is zero-filled (the default of
/// `WalOptions::prealloc_chunk_bytes`). On ext4 an `fdatasync` whose write grew the file
/// also writes the inode (new size, extents): measured here, 3 KB `pwrite` + `fdatasync`
/// 235-300 us appending, 140-200 us over zeros written before. Filling 1 MiB at a time,
/// only one sync per MiB pays that (and the write of the zeros, ~3 ms for 1 MiB here).
pub const PREALLOC_CHUNK_BYTES: u64 = 1 << 20;

/// Zeros are written ahead only while the current sync has written less than this. A
/// large sync saves little on the inode (it is a small part of its cost), while the
/// zeros cost disk bandwidth: writing a chunk of zeros with every 1 MiB sync made it
/// slower than appending (measured: 4.7-5.7 ms against 3.4 ms for 1 MiB; at 64 KiB, 0.6
/// against 0.6-0.85 ms; at 16 KiB, 0.35 against 0.5-0.65 ms).
pub const PREALLOC_SYNC_BYTES_MAX: u64 = 64 << 10;

/// Zero bytes handed to the disk for preallocation, as many slices of this as needed.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Encoded size of a `BatchBegin` record.
const BATCH_BEGIN_BYTES: u64 = HEADER_BYTES as u64 + 16;

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            fsync: FsyncPolicy::EveryBatch,
            snapshots_kept: SNAPSHOTS_KEPT_DEFAULT,
            write_buffer_bytes_max: WRITE_BUFFER_BYTES_MAX_DEFAULT,
            prealloc_chunk_bytes: PREALLOC_CHUNK_BYTES,
        }
    }
}

impl WalOptions {
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes_max < 4096 {
            return Err(StorageError::Invalid(format!(
                "segment_bytes_max {} is below the minimum 4096",
                self.segment_bytes_max
            )));
        }
        if self.write_buffer_bytes_max == 0 {
            return Err(StorageError::Invalid(
                "write_buffer_bytes_max must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// What the WAL knows about one segment without reading it again.
#[derive(Clone, Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// The log's last index when the segment was opened.
    prev_index: u64,
    /// The segment restarts the log (a snapshot replaced it).
    reset: bool,
    /// Largest entry index written in it, or `prev_index` if none (so a segment counts as
    /// covered once compaction passes where it started).
    max_index: u64,
    /// At least one entry was written to it (a segment takes at least one before rolling).
    has_entries: bool,
    /// Bytes in the file plus bytes buffered for it.
    bytes: u64,
    /// `bytes` right after its last sync marker (0 before the first).
    marked_bytes: u64,
    /// The checksum salt of its records, `record::segment_salt(seq)`.
    salt: u32,
    /// Bytes handed to the disk: the file offset where the next write goes (at most
    /// `bytes`; the rest is buffered).
    flushed: u64,
    /// The file's length (at least `flushed`). Past `flushed` it holds zeros written
    /// ahead (preallocation) or, in a recycled file, stale bytes of an earlier life; they
    /// are cut off when the segment is closed. Writes that end within it do not change
    /// the file's size, so their `fdatasync` need not write the inode.
    filled: u64,
    /// `flushed` at the last fsync: how much the current sync has written so far.
    synced: u64,
    /// The segment is written in place: started in a recycled file, or zero-filled ahead
    /// of its writes (its start record's `recycled` flag says so, and stays set after
    /// recovery cut a tail). Recovery then accepts an incomplete last sync (a stretch
    /// checksum that does not match) as a torn tail, and only such a segment is
    /// zero-filled ahead.
    in_place: bool,
    /// Started in this life as a new file zero-filled ahead (not a spare, not reopened):
    /// only for tests that want a crash inside such a segment's zero tail.
    new_zero_filled: bool,
    /// Where the current stretch begins: the end of the last sync marker, or 0.
    stretch_start: u64,
    /// CRC32C (salted) of the bytes `[stretch_start, crc_upto)`, folded in as they are
    /// handed to the disk (or, for the buffered rest, when the marker is written).
    stretch_crc: u32,
    crc_upto: u64,
}

impl Segment {
    fn new(seq: u64, path: PathBuf, prev_index: u64) -> Self {
        Segment {
            seq,
            path,
            prev_index,
            reset: false,
            max_index: prev_index,
            has_entries: false,
            bytes: 0,
            marked_bytes: 0,
            salt: record::segment_salt(seq),
            flushed: 0,
            filled: 0,
            synced: 0,
            in_place: false,
            new_zero_filled: false,
            stretch_start: 0,
            stretch_crc: record::segment_salt(seq),
            crc_upto: 0,
        }
    }

    /// Folds the bytes `data`, which go to file offset `offset`, into the stretch
    /// checksum (the part before `crc_upto` was folded already).
    fn fold(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        if end <= self.crc_upto {
            return;
        }
        assert!(offset <= self.crc_upto, "stretch bytes are folded in order");
        let skip = (self.crc_upto - offset) as usize;
        self.stretch_crc = crc32c::crc32c_append(self.stretch_crc, &data[skip..]);
        self.crc_upto = end;
    }
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:020}-{first_index:020}.wal")
}

/// The name a freed segment file keeps while it waits to be reused: its last seq, so that
/// names never collide. Replay ignores these files.
fn spare_name(seq: u64) -> String {
    format!("{seq:020}.spare")
}

fn parse_spare_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".spare")?;
    if stem.len() != 20 {
        return None;
    }
    stem.parse().ok()
}

/// The seq of a segment file from its name (`<seq:020>-<first_index:020>.wal`), which
/// gives the salt of its records (`record::segment_salt`).
pub fn segment_seq(name: &str) -> Option<u64> {
    parse_segment_name(name).map(|(seq, _)| seq)
}

fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (s, i) = stem.split_once('-')?;
    if s.len() != 20 || i.len() != 20 {
        return None;
    }
    Some((s.parse().ok()?, i.parse().ok()?))
}

/// The log as replay rebuilds it.
struct Replay {
    base: u64,
    /// `None` while the start of the WAL was deleted and the term of `base` is not known
    /// yet (a later compaction marker or reset always supplies it; checked at the end).
    base_term: Option<u64>,
    entries: Vec<Entry>,
    hard_state: HardState,
    /// Replay began in a segment whose predecessors were deleted, so an entry may
    /// legitimately overwrite indices whose older records are gone.
    partial: bool,
    /// A truncating batch whose entries are still being read: nothing of it is applied
    /// until all its entries are there.
    batch: Option<PendingBatch>,
}

struct PendingBatch {
    /// Byte offset of its `BatchBegin` record (where a torn batch is cut off).
    at: u64,
    first_index: u64,
    count: u64,
    entries: Vec<Entry>,
}

impl Replay {
    fn last(&self) -> u64 {
        self.base + self.entries.len() as u64
    }
    fn term(&self, index: u64) -> Option<u64> {
        if index == self.base {
            return self.base_term;
        }
        if index < self.base || index > self.last() {
            return None;
        }
        Some(self.entries[(index - self.base - 1) as usize].term)
    }
}

pub struct Wal<D: Disk = StdDisk> {
    disk: D,
    wal_dir: PathBuf,
    snaps: SnapshotStore,
    opts: WalOptions,
    /// Oldest first; the last one is the active segment (there is always one).
    segments: Vec<Segment>,
    /// Freed segment files kept for reuse (seq of their last life, path), at most
    /// `SPARE_SEGMENTS_MAX`; the last one is reused first (most likely still cached).
    spares: Vec<(u64, PathBuf)>,
    /// Bytes handed to the disk since opening (for benchmarks and metrics).
    bytes_written: u64,
    /// Segments started in a reused spare file since opening (for tests and metrics).
    segments_recycled: u64,
    /// Encoded records for the active segment not yet handed to the OS.
    pending: Vec<u8>,
    /// The log holds `(base, last]`; `base` is the compaction point with term `base_term`.
    base: u64,
    base_term: u64,
    last: u64,
    /// Runs of equal terms over `(base, last]`: `(first index of the run, term)`.
    terms: Vec<(u64, u64)>,
    hard_state: HardState,
    snapshot_index: u64,
    /// Bytes were written to the active segment since its last fsync.
    file_dirty: bool,
    /// Records were added to the active segment since its last sync marker.
    unmarked: bool,
    /// A segment file was created or removed since the last directory fsync.
    dir_dirty: bool,
    /// The result of opening, until the first change.
    recovered: Option<Recovered>,
    /// Set after an I/O error on a write path: what reached the disk is unknown, so the
    /// WAL refuses further work until it is reopened (retrying fsync is not safe).
    failed: Option<String>,
    /// Truncating appends are framed as batches. Only tests turn this off, to show that
    /// the model test catches a torn overwrite.
    batching: bool,
    /// `ZERO_COPY_MIN_BYTES`, but tests vary it to cover both paths with small entries.
    zero_copy_min: usize,
    /// `SYNC_PAD_MIN_BYTES`, but tests vary it to cover padding with small syncs.
    sync_pad_min: u64,
    /// `SPARE_SEGMENTS_MAX`, but the benchmark sets 0 to measure a WAL without spares
    /// (a fresh node, or one whose compaction lags behind).
    spares_max: usize,
    /// Zero bytes written ahead since opening (for tests and metrics).
    prealloc_bytes: u64,
}

impl<D: Disk> std::fmt::Debug for Wal<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("wal_dir", &self.wal_dir)
            .field("segments", &self.segments.len())
            .field("first_index", &(self.base + 1))
            .field("last_index", &self.last)
            .field("snapshot_index", &self.snapshot_index)
            .field("hard_state", &self.hard_state)
            .field("buffered_bytes", &self.pending.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl Wal<StdDisk> {
    /// Opens (or creates) the WAL and snapshots under `dir` (`dir/wal`, `dir/snap`).
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Self> {
        Self::open_on(StdDisk::new(), dir, opts)
    }
}

impl<D: Disk> Wal<D> {
    /// Opens the WAL on any [`Disk`] (the simulator passes a `SimDisk`).
    pub fn open_on(disk: D, dir: &Path, opts: WalOptions) -> Result<Self> {
        opts.validate()?;
        if opts.fsync == FsyncPolicy::None {
            eprintln!(
                "WARNING: concord-storage WAL at {} runs with FsyncPolicy::None: nothing is \
                 ever fsynced and a power loss WILL lose acknowledged writes. Benchmarks only.",
                dir.display()
            );
        }
        let mut wal = Wal {
            disk,
            wal_dir: dir.join("wal"),
            snaps: SnapshotStore::new(dir.join("snap"), opts.snapshots_kept),
            opts,
            segments: Vec::new(),
            spares: Vec::new(),
            bytes_written: 0,
            segments_recycled: 0,
            pending: Vec::new(),
            base: 0,
            base_term: 0,
            last: 0,
            terms: Vec::new(),
            hard_state: HardState::default(),
            snapshot_index: 0,
            file_dirty: false,
            unmarked: false,
            dir_dirty: false,
            recovered: None,
            failed: None,
            batching: true,
            zero_copy_min: ZERO_COPY_MIN_BYTES,
            sync_pad_min: SYNC_PAD_MIN_BYTES,
            spares_max: SPARE_SEGMENTS_MAX,
            prealloc_bytes: 0,
        };
        let r = wal.load()?;
        wal.recovered = Some(r);
        Ok(wal)
    }

    pub fn disk(&self) -> &D {
        &self.disk
    }

    pub fn disk_mut(&mut self) -> &mut D {
        &mut self.disk
    }

    pub fn wal_dir(&self) -> &Path {
        &self.wal_dir
    }

    /// Encoded bytes not yet handed to the OS.
    pub fn buffered_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Hands buffered records to the disk without syncing (the simulator calls this just
    /// before a crash, so that a torn tail may keep part of them).
    pub(crate) fn flush_for_crash(&mut self) -> Result<()> {
        self.flush()
    }

    /// Forgets all in-memory state, including records not yet handed to the disk, and
    /// reads the disk again: a restart. Tests call it after crashing a `SimDisk`.
    pub fn reload(&mut self) -> Result<Recovered> {
        self.recovered = None;
        self.load()
    }

    /// Test switch: `false` writes truncating appends record by record without batch
    /// framing (the old, unsafe behaviour), so tests can show they catch it.
    #[doc(hidden)]
    pub fn set_batching_for_tests(&mut self, on: bool) {
        self.batching = on;
    }

    /// Test switch: entry data of at least `bytes` is written without a copy (see
    /// `ZERO_COPY_MIN_BYTES`).
    #[doc(hidden)]
    pub fn set_zero_copy_min_for_tests(&mut self, bytes: usize) {
        self.zero_copy_min = bytes;
    }

    /// Test switch: a sync that wrote at least `bytes` pads its marker to a page boundary
    /// (see `SYNC_PAD_MIN_BYTES`).
    #[doc(hidden)]
    pub fn set_sync_pad_min_for_tests(&mut self, bytes: u64) {
        self.sync_pad_min = bytes;
    }

    /// Test and benchmark switch: keep at most `n` freed segment files for reuse (see
    /// `SPARE_SEGMENTS_MAX`); 0 makes every segment a new file.
    #[doc(hidden)]
    pub fn set_spare_segments_max_for_tests(&mut self, n: usize) {
        self.spares_max = n;
    }

    /// The active segment: (bytes of records in it, including buffered ones; the file's
    /// length, zeros written ahead included). For tests and metrics.
    pub fn active_segment_bytes(&self) -> (u64, u64) {
        let seg = self
            .segments
            .last()
            .expect("there is always an active segment");
        (seg.bytes, seg.filled)
    }

    /// Whether the active segment is written in place (a recycled file, or one zero-filled
    /// ahead of its writes), as its start record says.
    pub fn active_segment_in_place(&self) -> bool {
        self.segments
            .last()
            .expect("there is always an active segment")
            .in_place
    }

    /// Whether a crash now would hit a segment started as a new, zero-filled file (not a
    /// spare) inside its zero tail: records written since its last fsync, and zeros
    /// after them. For the model test, which must see such crashes.
    #[doc(hidden)]
    pub fn crash_would_hit_a_zero_tail_for_tests(&self) -> bool {
        let seg = self
            .segments
            .last()
            .expect("there is always an active segment");
        seg.new_zero_filled && seg.bytes > seg.synced && seg.filled > seg.synced
    }

    /// Zero bytes written ahead of the records since opening (preallocation).
    pub fn prealloc_bytes(&self) -> u64 {
        self.prealloc_bytes
    }

    /// Number of segment files (for tests and metrics).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Number of spare segment files waiting to be reused (for tests and metrics).
    pub fn spare_count(&self) -> usize {
        self.spares.len()
    }

    /// Segments started in a reused spare file since opening.
    pub fn segments_recycled(&self) -> u64 {
        self.segments_recycled
    }

    /// Bytes handed to the disk since opening: records, padding, everything.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.base {
            return Some(self.base_term);
        }
        if index < self.base || index > self.last {
            return None;
        }
        let pos = self.terms.partition_point(|&(start, _)| start <= index);
        Some(self.terms[pos - 1].1)
    }

    fn check_ok(&self) -> Result<()> {
        match &self.failed {
            Some(m) => Err(StorageError::Invalid(format!(
                "the WAL failed earlier ({m}); reopen it"
            ))),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: StorageError) -> StorageError {
        self.failed = Some(e.to_string());
        e
    }

    fn active(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("there is always an active segment")
    }

    /// Hands buffered records to the OS.
    fn flush(&mut self) -> Result<()> {
        self.flush_with(&mut Vec::new())
    }

    /// Hands buffered records to the OS, with the entry data `append` left out of the
    /// buffer put back in place, in one `writev`; `borrowed` is emptied.
    fn flush_with(&mut self, borrowed: &mut Vec<record::Borrowed<'_>>) -> Result<()> {
        if self.pending.is_empty() && borrowed.is_empty() {
            return Ok(());
        }
        let seg = self.segments.last().expect("active segment");
        let (path, offset) = (seg.path.clone(), seg.flushed);
        let total =
            (self.pending.len() + borrowed.iter().map(|(_, d)| d.len()).sum::<usize>()) as u64;
        let zeros = self.zeros_ahead(offset + total);
        // Positional: a recycled file is overwritten from its start, not appended to.
        // The stretch checksum is folded over the bytes as they go out (one more pass of
        // CRC32C over data mostly still in the CPU cache).
        let seg = self.segments.last_mut().expect("active segment");
        let r = if borrowed.is_empty() && zeros == 0 {
            seg.fold(offset, &self.pending);
            self.disk.write_at(&path, offset, &self.pending)
        } else {
            let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * borrowed.len() + 2);
            let mut from = 0;
            for &(at, data) in borrowed.iter() {
                parts.push(&self.pending[from..at]);
                parts.push(data);
                from = at;
            }
            parts.push(&self.pending[from..]);
            let mut at = offset;
            for part in &parts {
                seg.fold(at, part);
                at += part.len() as u64;
            }
            // Zeros right after the records, in the same `writev`: no record is written
            // twice, and the sync that makes these records durable makes the zeros and
            // the file's new size durable with them (see `zeros_ahead`).
            let mut left = zeros as usize;
            while left > 0 {
                let n = left.min(ZEROS.len());
                parts.push(&ZEROS[..n]);
                left -= n;
            }
            self.disk.write_parts_at(&path, offset, &parts)
        };
        if let Err(e) = r {
            return Err(self.fail(io_err(&path, e)));
        }
        self.pending.clear();
        if self.pending.capacity() > PENDING_CAPACITY_KEPT_BYTES {
            self.pending.shrink_to(PENDING_CAPACITY_KEPT_BYTES);
        }
        borrowed.clear();
        self.file_dirty = true;
        self.bytes_written += total + zeros;
        self.prealloc_bytes += zeros;
        let seg = self.active();
        seg.flushed += total;
        seg.filled = seg.filled.max(seg.flushed + zeros);
        assert_eq!(seg.flushed, seg.bytes, "flushed everything buffered");
        Ok(())
    }

    /// How many zero bytes to write right after a write that ends at `end` of the active
    /// segment: none unless the segment is written in place (so recovery reads it with
    /// the rule for an incomplete last sync), preallocation is on, the write grows the
    /// file, and the current sync is small (`PREALLOC_SYNC_BYTES_MAX`); then up to
    /// `prealloc_chunk_bytes`, but not past `segment_bytes_max` (an oversized append
    /// gets none). The zeros need no fsync of their own: they go to the disk with the
    /// records before them, whose sync makes both durable together with the new size;
    /// a crash before it leaves zeros, or nothing, where the unsynced records were, which
    /// recovery reads as the end of the log (a torn tail). The writes of the next syncs
    /// then overwrite these zeros in place, and the file's size stays.
    fn zeros_ahead(&self, end: u64) -> u64 {
        let seg = self.segments.last().expect("active segment");
        let chunk = self.opts.prealloc_chunk_bytes;
        if chunk == 0
            || !seg.in_place
            || end <= seg.filled
            || end - seg.synced >= PREALLOC_SYNC_BYTES_MAX
        {
            return 0;
        }
        (end + chunk).min(self.opts.segment_bytes_max.max(end)) - end
    }

    fn fsync_active(&mut self) -> Result<()> {
        if self.file_dirty && self.opts.fsync == FsyncPolicy::EveryBatch {
            let path = self.segments.last().expect("active segment").path.clone();
            if let Err(e) = self.disk.sync_file(&path) {
                return Err(self.fail(io_err(&path, e)));
            }
        }
        self.file_dirty = false;
        let seg = self.active();
        seg.synced = seg.flushed;
        Ok(())
    }

    fn fsync_dir(&mut self) -> Result<()> {
        if self.dir_dirty && self.opts.fsync == FsyncPolicy::EveryBatch {
            if let Err(e) = self.disk.sync_dir(&self.wal_dir) {
                let dir = self.wal_dir.clone();
                return Err(self.fail(io_err(&dir, e)));
            }
        }
        self.dir_dirty = false;
        Ok(())
    }

    /// Buffers a sync marker if records were added since the last one; called right
    /// before every fsync of the active segment.
    fn mark(&mut self) -> Result<()> {
        if !self.unmarked {
            return Ok(());
        }
        let seg = self.segments.last_mut().expect("active segment");
        let offset = seg.bytes;
        // The buffer holds exactly the bytes from `flushed` on: fold what the stretch
        // checksum has not seen yet.
        debug_assert_eq!(seg.flushed + self.pending.len() as u64, offset);
        seg.fold(seg.flushed, &self.pending);
        assert_eq!(
            seg.crc_upto, offset,
            "the stretch checksum covers the stretch"
        );
        let padding = if offset - seg.marked_bytes >= self.sync_pad_min {
            (PAGE_BYTES - (offset + SYNC_MARK_BYTES) % PAGE_BYTES) % PAGE_BYTES
        } else {
            0
        };
        let padding = u16::try_from(padding).expect("below one page");
        let mark = Record::SyncMark {
            offset,
            stretch_start: seg.stretch_start,
            stretch_crc: seg.stretch_crc,
            recycled: seg.in_place,
            padding,
        };
        self.put(&mark)?;
        let seg = self.active();
        debug_assert_eq!(seg.bytes, offset + SYNC_MARK_BYTES + u64::from(padding));
        seg.marked_bytes = seg.bytes;
        // The next stretch begins after this marker.
        seg.stretch_start = seg.bytes;
        seg.crc_upto = seg.bytes;
        seg.stretch_crc = seg.salt;
        self.unmarked = false;
        Ok(())
    }

    /// Buffers one record for the active segment.
    fn put(&mut self, rec: &Record) -> Result<()> {
        self.unmarked = true;
        let before = self.pending.len();
        let salt = self.segments.last().expect("active segment").salt;
        record::encode(&mut self.pending, rec, salt);
        let n = (self.pending.len() - before) as u64;
        self.active().bytes += n;
        if self.pending.len() >= self.opts.write_buffer_bytes_max {
            self.flush()?;
        }
        Ok(())
    }

    /// Closes the active segment (durably, so that only the last segment can ever have a
    /// torn tail) and starts a new one. With `reset`, the log restarts after
    /// (`prev_index`, `prev_term`); otherwise it continues from the current last entry.
    fn roll(&mut self, reset: Option<(u64, u64)>) -> Result<()> {
        let (prev_index, prev_term) = match reset {
            Some(p) => p,
            None => (self.last, self.term(self.last).expect("last is held")),
        };
        let seq = match self.segments.last().map(|s| s.seq) {
            Some(prev_seq) => {
                self.mark()?;
                self.flush()?;
                let prev = self.segments.last().expect("active segment");
                if prev.filled > prev.bytes {
                    // Cut the zeros written ahead or the stale bytes of the file's earlier
                    // life (and make the rest durable, as the fsync would): only the
                    // newest segment may ever end in anything but its last record.
                    let (path, len) = (prev.path.clone(), prev.bytes);
                    if let Err(e) = self.disk.truncate(&path, len) {
                        return Err(self.fail(io_err(&path, e)));
                    }
                    self.file_dirty = false;
                } else {
                    self.fsync_active()?;
                }
                // The previous segment's name too, so that no crash can keep a newer
                // segment without an older one.
                self.fsync_dir()?;
                prev_seq + 1
            }
            // Above every spare's seq too: a seq is never used twice, so no stale record
            // anywhere carries the salt of a new segment.
            None => self
                .spares
                .iter()
                .map(|&(s, _)| s)
                .max()
                .map_or(1, |s| s + 1),
        };
        debug_assert!(self.spares.iter().all(|&(s, _)| s < seq));
        let path = self.wal_dir.join(segment_name(seq, prev_index + 1));
        let mut seg = Segment::new(seq, path.clone(), prev_index);
        seg.reset = reset.is_some();
        if let Some((_, spare)) = self.spares.pop() {
            // Reuse a freed file: its blocks are allocated, so syncs that overwrite them
            // need not commit a new file size. Its new name is made durable before any of
            // its bytes: otherwise a crash could keep records of this seq in a file still
            // named a spare, and after recovery the seq would be used again.
            if let Err(e) = self.disk.rename(&spare, &path) {
                return Err(self.fail(io_err(&spare, e)));
            }
            seg.filled = match self.disk.len(&path) {
                Ok(n) => n,
                Err(e) => return Err(self.fail(io_err(&path, e))),
            };
            seg.in_place = true;
            self.segments_recycled += 1;
            self.dir_dirty = true;
            self.fsync_dir()?;
        } else {
            // A new file: its name is made durable by the next sync's directory fsync.
            // Zero-filled ahead of its writes if preallocation is on, so written in place
            // like a recycled file and read with the same rules.
            seg.in_place = self.opts.prealloc_chunk_bytes > 0;
            seg.new_zero_filled = seg.in_place;
            self.dir_dirty = true;
        }
        self.segments.push(seg);
        self.put(&Record::SegmentStart {
            seq,
            prev_index,
            prev_term,
            reset: reset.is_some(),
            recycled: self.segments.last().expect("just pushed").in_place,
        })?;
        if self.hard_state != HardState::default() {
            let hs = self.hard_state;
            self.put(&Record::HardState(hs))?;
        }
        Ok(())
    }

    fn truncate_terms(&mut self, last: u64) {
        while let Some(&(start, _)) = self.terms.last() {
            if start > last {
                self.terms.pop();
            } else {
                break;
            }
        }
        self.last = last;
    }

    /// Drops `(base, index]` from the in-memory index; `index` is held with `term`.
    fn advance_base(&mut self, index: u64, term: u64) {
        debug_assert_eq!(self.term(index), Some(term));
        let keep_from = self.terms.partition_point(|&(start, _)| start <= index + 1);
        if keep_from > 0 {
            // The run containing index+1 (if any) now starts at index+1.
            let (_, t) = self.terms[keep_from - 1];
            self.terms.drain(..keep_from - 1);
            if index < self.last {
                self.terms[0] = (index + 1, t);
            } else {
                self.terms.clear();
            }
        }
        self.base = index;
        self.base_term = term;
    }

    /// Makes the log agree with a snapshot at (`index`, `term`): keeps the suffix after it
    /// if the log holds `index` with that term, otherwise starts a fresh segment that
    /// restarts the log there. Then makes it durable and deletes covered segments.
    fn apply_snapshot_to_log(&mut self, index: u64, term: u64) -> Result<()> {
        if self.term(index) == Some(term) {
            if index > self.base {
                self.put(&Record::Compact { index, term })?;
                self.advance_base(index, term);
            }
        } else {
            self.roll(Some((index, term)))?;
            self.base = index;
            self.base_term = term;
            self.last = index;
            self.terms.clear();
        }
        self.snapshot_index = self.snapshot_index.max(index);
        self.sync_inner()?;
        self.delete_covered_segments()
    }

    /// Deletes old segments that replay no longer needs: everything before the newest
    /// reset segment, then any further segments whose entries are all compacted. Oldest
    /// first, with a directory fsync after each, so a crash leaves a suffix of segments.
    fn delete_covered_segments(&mut self) -> Result<()> {
        let active = self.segments.len() - 1;
        let mut k = self.segments[..=active]
            .iter()
            .rposition(|s| s.reset)
            .unwrap_or(0);
        while k < active && self.segments[k].max_index <= self.base {
            k += 1;
        }
        for s in self.segments.drain(..k).collect::<Vec<_>>() {
            // Keep a few freed files for the next segments to overwrite; delete the rest.
            // Either way a crash leaves the file under its segment name or gone from the
            // segments, so the segments left are a suffix.
            let r = if self.spares.len() < self.spares_max {
                let spare = self.wal_dir.join(spare_name(s.seq));
                let r = self.disk.rename(&s.path, &spare);
                if r.is_ok() {
                    self.spares.push((s.seq, spare));
                }
                r
            } else {
                self.disk.remove(&s.path)
            };
            if let Err(e) = r {
                return Err(self.fail(io_err(&s.path, e)));
            }
            self.dir_dirty = true;
            self.fsync_dir()?;
        }
        Ok(())
    }

    fn sync_inner(&mut self) -> Result<u64> {
        self.mark()?;
        self.flush()?;
        self.fsync_active()?;
        self.fsync_dir()?;
        Ok(self.last)
    }

    /// A bad record in the newest segment, whose first valid sync marker after it is at
    /// `m`: whether the sync that wrote that marker never completed, so the bad record is
    /// a torn write although a marker follows. Only in a segment written into a recycled
    /// file: its `fdatasync`s overwrite blocks the file owns, and a power cut during one
    /// can keep a later page (the marker) and lose an earlier one (for appended bytes the
    /// file system commits the size after the data, so no marker can outlive them). The
    /// sync never completed iff the marker's stretch is the one the bad record is in
    /// (it begins at `mark_end`, the end of the last valid marker, at or before the bad
    /// record), its checksum does not match the bytes on disk, and no valid marker
    /// follows (a later sync starts only after this one returned). A stretch that
    /// matches holds no bad record, so that case stays corruption (a bug or damage).
    /// The price: media damage inside the final synced stretch of a recycled newest
    /// segment, with nothing synced after it, is cut off instead of reported
    /// (docs/storage.md, "Known limits").
    fn sync_never_completed(buf: &[u8], m: usize, mark_end: u64, salt: u32) -> bool {
        let Ok((
            Record::SyncMark {
                stretch_start,
                stretch_crc,
                recycled: true,
                ..
            },
            n,
        )) = record::decode(&buf[m..], salt)
        else {
            return false;
        };
        stretch_start == mark_end
            && record::stretch_crc(salt, &buf[mark_end as usize..m]) != stretch_crc
            && record::find_sync_mark(buf, m + n, salt).is_none()
    }

    fn corrupt(path: &Path, offset: u64, detail: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: path.display().to_string(),
            offset,
            detail: detail.into(),
        }
    }

    /// Reads snapshot and segments back, repairs a torn tail, and rebuilds the in-memory
    /// state. Returns what is durable.
    fn load(&mut self) -> Result<Recovered> {
        self.failed = None;
        self.pending.clear();
        self.segments.clear();
        self.file_dirty = false;
        self.unmarked = false;
        self.dir_dirty = false;
        let wal_dir = self.wal_dir.clone();
        self.disk
            .create_dir_all(&wal_dir)
            .map_err(|e| io_err(&wal_dir, e))?;
        self.snaps.open(&mut self.disk)?;
        let snapshot = self.snaps.load_newest(&mut self.disk)?;

        let listing = self
            .disk
            .list_dir(&wal_dir)
            .map_err(|e| io_err(&wal_dir, e))?;
        let mut names: Vec<(u64, u64, String)> = listing
            .iter()
            .filter_map(|n| parse_segment_name(n).map(|(s, i)| (s, i, n.clone())))
            .collect();
        names.sort_unstable();
        let mut spares: Vec<(u64, PathBuf)> = listing
            .iter()
            .filter_map(|n| parse_spare_name(n).map(|s| (s, wal_dir.join(n))))
            .collect();
        spares.sort_unstable();
        // Spares are older than every segment (they are freed segments, and a seq is never
        // reused); keep the newest few, remove any beyond the bound.
        let newest_seq = names.last().map_or(u64::MAX, |n| n.0);
        let keep_from = spares.len().saturating_sub(self.spares_max);
        for (i, (seq, path)) in spares.iter().enumerate() {
            if i < keep_from || *seq >= newest_seq {
                self.disk.remove(path).map_err(|e| io_err(path, e))?;
                self.disk
                    .sync_dir(&wal_dir)
                    .map_err(|e| io_err(&wal_dir, e))?;
            }
        }
        spares = spares
            .into_iter()
            .enumerate()
            .filter(|(i, (seq, _))| *i >= keep_from && *seq < newest_seq)
            .map(|(_, s)| s)
            .collect();
        self.spares = spares;

        let mut rp = Replay {
            base: 0,
            base_term: Some(0),
            entries: Vec::new(),
            hard_state: HardState::default(),
            partial: false,
            batch: None,
        };
        let count = names.len();
        let mut newest_has_hard_state = false;
        for (pos, (seq, first_index, name)) in names.into_iter().enumerate() {
            let path = wal_dir.join(&name);
            let is_last = pos + 1 == count;
            let buf = self.disk.read(&path).map_err(|e| io_err(&path, e))?;
            let mut seg = Segment::new(seq, path.clone(), first_index.wrapping_sub(1));
            let salt = seg.salt;
            let mut at = 0usize;
            // The file's length once a tail is cut.
            let mut file_len = buf.len() as u64;
            // Whether the last record kept so far is a sync marker.
            let mut marked = false;
            // Where the last valid sync marker ends (0 before the first): where the
            // stretch of the next marker must begin.
            let mut mark_end = 0u64;
            let mut has_hard_state = false;
            while at < buf.len() {
                let rec_at = at as u64;
                let rec = match record::decode(&buf[at..], salt) {
                    Ok((rec, n)) => {
                        at += n;
                        rec
                    }
                    Err(err) => {
                        if at == 0 && record::decode(&buf, record::UNSALTED).is_ok() {
                            return Err(Self::corrupt(
                                &path,
                                0,
                                "segment written in an older on-disk format (record \
                                 checksums without the segment salt), which this version \
                                 does not read",
                            ));
                        }
                        if at == 0 && record::is_format_2_start(&buf, salt) {
                            return Err(Self::corrupt(
                                &path,
                                0,
                                "segment written in an older on-disk format (format 2: sync \
                                 markers without stretch checksums), which this version \
                                 does not read",
                            ));
                        }
                        // The end of the log iff nothing synced can follow: every synced
                        // stretch ends with a sync marker, so a valid marker of this
                        // segment (this seq's salt, naming its own offset) anywhere after
                        // the bad record means synced data is damaged. Stale bytes of a
                        // recycled file's earlier life and zeros hold no such marker.
                        // One exception, in recycled segments only: the sync that ended
                        // with that marker never completed (see `sync_never_completed`).
                        let torn = is_last
                            && !matches!(err, DecodeError::Malformed(_))
                            && match record::find_sync_mark(&buf, at + 1, salt) {
                                None => true,
                                Some(m) => {
                                    // The start record's flag, unless it is the bad record.
                                    let start_says = (at > 0).then_some(seg.in_place);
                                    start_says != Some(false)
                                        && Self::sync_never_completed(&buf, m, mark_end, salt)
                                }
                            };
                        if !torn {
                            return Err(Self::corrupt(&path, at as u64, err.to_string()));
                        }
                        // A write cut short by a crash: nothing after it was acknowledged.
                        // Zeros alone (a preallocated tail never written, or whose writes
                        // were all lost) stay, so that the next writes still overwrite
                        // them in place; anything else is cut, so that no record of this
                        // seq survives beyond the log to confuse a later recovery.
                        let zeros_only = seg.in_place
                            && self.opts.prealloc_chunk_bytes > 0
                            && record::nonzero_end(&buf[at..]) == 0;
                        if !zeros_only {
                            self.disk
                                .truncate(&path, at as u64)
                                .map_err(|e| io_err(&path, e))?;
                            file_len = at as u64;
                        }
                        break;
                    }
                };
                marked = matches!(rec, Record::SyncMark { .. });
                has_hard_state |= matches!(rec, Record::HardState(_));
                if let Record::SyncMark {
                    stretch_start,
                    recycled,
                    ..
                } = rec
                {
                    if stretch_start != mark_end || recycled != seg.in_place {
                        return Err(Self::corrupt(
                            &path,
                            rec_at,
                            format!(
                                "sync marker's stretch begins at byte offset {stretch_start} \
                                 (recycled {recycled}), but the previous marker ends at \
                                 {mark_end} (recycled {})",
                                seg.in_place
                            ),
                        ));
                    }
                    mark_end = at as u64;
                }
                self.replay_record(&mut rp, &mut seg, rec, pos, &path, rec_at)?;
                seg.bytes = at as u64;
            }
            if let Some(b) = rp.batch.take() {
                // A truncating batch that did not get all its entries. Never synced (a
                // batch is written whole before any fsync and never spans segments), so
                // only a torn tail of the newest segment can end like this.
                if !is_last {
                    return Err(Self::corrupt(
                        &path,
                        b.at,
                        format!(
                            "batch of {} entries from index {} is incomplete ({} present) in a \
                             segment that is not the newest",
                            b.count,
                            b.first_index,
                            b.entries.len()
                        ),
                    ));
                }
                self.disk
                    .truncate(&path, b.at)
                    .map_err(|e| io_err(&path, e))?;
                seg.bytes = b.at;
                file_len = b.at;
                // The record before a batch-begin is never a marker (a batch follows an
                // entry, a hard state or a segment start).
                marked = false;
            }
            // Records that survived a crash unsynced (or a cut) get a marker below.
            self.unmarked = !marked;
            if seg.bytes == 0 {
                // Not even its first record made it: a segment created just before a
                // crash. Only acceptable as the newest one.
                if !is_last {
                    return Err(Self::corrupt(&path, 0, "segment without a start record"));
                }
                self.disk.remove(&path).map_err(|e| io_err(&path, e))?;
                self.disk
                    .sync_dir(&wal_dir)
                    .map_err(|e| io_err(&wal_dir, e))?;
                continue;
            }
            seg.marked_bytes = seg.bytes;
            seg.flushed = seg.bytes;
            seg.synced = seg.bytes;
            // Older segments end at their last record (checked above: anything after it
            // is corruption); the newest may keep a zero tail, overwritten from `bytes`.
            seg.filled = file_len;
            assert!(seg.filled >= seg.bytes, "the records are in the file");
            // The next marker's stretch begins after the last one: it also covers records
            // that survived a crash unsynced, so that recovery's own sync of them is
            // covered like any other.
            seg.stretch_start = mark_end.min(seg.bytes);
            seg.stretch_crc =
                record::stretch_crc(salt, &buf[seg.stretch_start as usize..seg.bytes as usize]);
            seg.crc_upto = seg.bytes;
            newest_has_hard_state = has_hard_state;
            self.segments.push(seg);
        }

        // Reconcile with the newest snapshot (it may be newer than the WAL knows, if a
        // crash came between saving it and logging it).
        let snap_index = snapshot.as_ref().map_or(0, |s| s.meta.index);
        let wal_path = wal_dir.display().to_string();
        if rp.base > snap_index {
            return Err(StorageError::Corrupt {
                path: wal_path,
                offset: 0,
                detail: format!(
                    "the log starts after index {} but the newest snapshot is at {snap_index} \
                     (snapshot files missing?)",
                    rp.base
                ),
            });
        }
        // (index, term, whether the log continues from it)
        let mut catch_up: Option<(u64, u64, bool)> = None;
        if let Some(s) = &snapshot {
            let (index, term) = (s.meta.index, s.meta.term);
            // With the start's term unknown and the snapshot exactly there, nothing can
            // be decided: reported as corruption just below.
            if index > rp.base || rp.base_term.is_some() {
                if rp.term(index) == Some(term) {
                    if index > rp.base {
                        rp.entries.drain(..(index - rp.base) as usize);
                        catch_up = Some((index, term, true));
                    }
                } else {
                    rp.entries.clear();
                    catch_up = Some((index, term, false));
                }
                if catch_up.is_some() {
                    rp.base = index;
                    rp.base_term = Some(term);
                }
            }
        }
        let Some(base_term) = rp.base_term else {
            return Err(StorageError::Corrupt {
                path: wal_path,
                offset: 0,
                detail: format!("the term of the log's start index {} is unknown", rp.base),
            });
        };

        self.hard_state = rp.hard_state;
        self.snapshot_index = snap_index;
        self.base = rp.base;
        self.base_term = base_term;
        self.last = rp.last();
        self.terms.clear();
        for e in &rp.entries {
            if self.terms.last().map(|&(_, t)| t) != Some(e.term) {
                self.terms.push((e.index, e.term));
            }
        }
        if !self.segments.is_empty()
            && !newest_has_hard_state
            && self.hard_state != HardState::default()
        {
            // A segment's second record is the hard state, so that the segments before it
            // can be deleted; a crash can cut the newest one right after its start record
            // (and in a recycled file, stale bytes may even complete a torn start record).
            let hs = self.hard_state;
            self.put(&Record::HardState(hs))?;
        }
        if let Some((index, term, keep_log)) = catch_up {
            // Log what the snapshot implies, so the next replay need not repeat this.
            // With no segment yet, the roll below starts one that resets to the snapshot.
            if !self.segments.is_empty() {
                if keep_log {
                    self.put(&Record::Compact { index, term })?;
                } else {
                    self.roll(Some((index, term)))?;
                }
                self.sync_inner()?;
                self.delete_covered_segments()?;
            }
        }
        if self.segments.is_empty() {
            self.roll(Some((self.base, self.base_term)))?;
            self.sync_inner()?;
        } else if self.unmarked {
            // The newest segment ends with records that survived a crash without being
            // synced (or was cut back): mark them, so that from now on damage to them
            // is corruption rather than a torn tail.
            self.sync_inner()?;
        }
        Ok(Recovered {
            hard_state: self.hard_state,
            applied: snap_index,
            snapshot,
            entries: rp.entries,
        })
    }

    /// Applies one entry record (or one entry of a complete batch) to the replayed log.
    fn replay_entry(
        rp: &mut Replay,
        seg: &mut Segment,
        e: Entry,
        path: &Path,
        rec_at: u64,
    ) -> Result<()> {
        let bad = |detail: String| Self::corrupt(path, rec_at, detail);
        let index = e.index;
        if index > rp.last() + 1 || index == 0 {
            return Err(bad(format!(
                "entry {index} does not follow the log ending at {}",
                rp.last()
            )));
        }
        if index <= rp.base {
            if !rp.partial {
                return Err(bad(format!(
                    "entry {index} is at or below the compaction point {}",
                    rp.base
                )));
            }
            // The records it overwrote were in deleted segments.
            rp.base = index - 1;
            rp.base_term = None;
            rp.entries.clear();
        } else {
            rp.entries.truncate((index - rp.base - 1) as usize);
        }
        rp.entries.push(e);
        seg.max_index = seg.max_index.max(index);
        seg.has_entries = true;
        Ok(())
    }

    fn replay_record(
        &mut self,
        rp: &mut Replay,
        seg: &mut Segment,
        rec: Record,
        pos: usize,
        path: &Path,
        rec_at: u64,
    ) -> Result<()> {
        let first_record = rec_at == 0;
        let bad = |detail: String| Self::corrupt(path, rec_at, detail);
        if let Some(b) = &mut rp.batch {
            let want = b.first_index + b.entries.len() as u64;
            match rec {
                Record::Entry(e) if e.index == want => b.entries.push(e),
                Record::Entries(v)
                    if v[0].index == want && b.entries.len() + v.len() <= b.count as usize =>
                {
                    b.entries.extend(v)
                }
                other => {
                    return Err(bad(format!(
                        "expected entry {want} of the batch begun at byte offset {}, found {}",
                        b.at,
                        record_kind(&other)
                    )))
                }
            }
            if b.entries.len() as u64 == b.count {
                let b = rp.batch.take().expect("pending batch");
                for e in b.entries {
                    Self::replay_entry(rp, seg, e, path, rec_at)?;
                }
            }
            return Ok(());
        }
        match rec {
            Record::SegmentStart {
                seq,
                prev_index,
                prev_term,
                reset,
                recycled,
            } => {
                if !first_record {
                    return Err(bad("segment start record in the middle of a segment".into()));
                }
                if seq != seg.seq || prev_index != seg.prev_index {
                    return Err(bad(format!(
                        "segment start (seq {seq}, previous index {prev_index}) does not \
                         match the file name"
                    )));
                }
                if let Some(prev) = self.segments.last() {
                    if prev.seq + 1 != seq {
                        return Err(bad(format!(
                            "segment {} follows segment {}: a segment is missing",
                            seq, prev.seq
                        )));
                    }
                }
                seg.reset = reset;
                seg.in_place = recycled;
                if reset || pos == 0 {
                    rp.base = prev_index;
                    rp.base_term = Some(prev_term);
                    rp.entries.clear();
                    rp.partial = !reset && prev_index > 0;
                } else if rp.last() != prev_index
                    || rp.term(prev_index).is_some_and(|t| t != prev_term)
                {
                    return Err(bad(format!(
                        "segment starts after index {prev_index} (term {prev_term}) but the \
                         previous segments end at index {}",
                        rp.last()
                    )));
                }
            }
            _ if first_record => {
                return Err(bad("segment does not begin with a start record".into()));
            }
            Record::Entry(e) => Self::replay_entry(rp, seg, e, path, rec_at)?,
            Record::Entries(v) => {
                for e in v {
                    Self::replay_entry(rp, seg, e, path, rec_at)?;
                }
            }
            Record::BatchBegin { first_index, count } => {
                if count == 0 || first_index == 0 || first_index > rp.last() + 1 {
                    return Err(bad(format!(
                        "batch of {count} entries from index {first_index} does not fit the \
                         log ending at {}",
                        rp.last()
                    )));
                }
                rp.batch = Some(PendingBatch {
                    at: rec_at,
                    first_index,
                    count,
                    entries: Vec::new(),
                });
            }
            Record::HardState(hs) => rp.hard_state = hs,
            Record::SyncMark { offset, .. } => {
                if offset != rec_at {
                    return Err(bad(format!(
                        "sync marker says byte offset {offset}, found at {rec_at}"
                    )));
                }
            }
            Record::Compact { index, term } => {
                if index <= rp.base {
                    if index == rp.base && rp.base_term.is_none() {
                        rp.base_term = Some(term);
                    }
                } else {
                    if rp.term(index) != Some(term) {
                        return Err(bad(format!(
                            "compaction to index {index} term {term} does not match the log"
                        )));
                    }
                    rp.entries.drain(..(index - rp.base) as usize);
                    rp.base = index;
                    rp.base_term = Some(term);
                }
            }
        }
        Ok(())
    }
}

fn record_kind(r: &Record) -> &'static str {
    match r {
        Record::SegmentStart { .. } => "a segment start",
        Record::Entry(_) => "an entry out of order",
        Record::Entries(_) => "entries out of order or past the batch",
        Record::HardState(_) => "a hard state",
        Record::Compact { .. } => "a compaction",
        Record::BatchBegin { .. } => "another batch",
        Record::SyncMark { .. } => "a sync marker",
    }
}

impl<D: Disk> LogStore for Wal<D> {
    fn append(&mut self, entries: &[Entry]) -> Result<()> {
        self.check_ok()?;
        check_append(entries, self.base, self.last)?;
        self.recovered = None;
        let entry_bytes =
            |e: &Entry| (HEADER_BYTES + record::ENTRY_PREFIX_BYTES + e.data.len()) as u64;
        // An append that overwrites part of the log is one batch, so that a crash keeps
        // either the old suffix or the whole new one (a torn batch is cut off whole at
        // recovery). The batch never spans segments: roll before it if it does not fit,
        // and let it overfill the segment if it is larger than a segment.
        let truncating = self.batching && entries.first().is_some_and(|e| e.index <= self.last);
        // Roll before an append that does not fit, rather than in its middle: right after
        // a `sync` the old segment has nothing unsynced, so closing it costs no extra
        // fsync on the write path. `entry_bytes` bounds an entry's share of any record.
        // A truncating batch must not span segments; a plain append larger than a whole
        // segment still rolls between its entries below.
        let append_bytes = BATCH_BEGIN_BYTES + entries.iter().map(entry_bytes).sum::<u64>();
        let active = self.segments.last().expect("active segment");
        if active.has_entries
            && active.bytes + append_bytes > self.opts.segment_bytes_max
            && (truncating || append_bytes <= self.opts.segment_bytes_max)
        {
            self.roll(None)?;
        }
        if truncating {
            self.put(&Record::BatchBegin {
                first_index: entries[0].index,
                count: entries.len() as u64,
            })?;
        }
        // Consecutive entries of one term share an `Entries` record (5 bytes of framing
        // each instead of 33, one checksum), up to a bounded size and never past the
        // segment's limit; a lone entry is an `Entry` record (smaller for one).
        let group_bytes_max = ENTRIES_RECORD_BYTES_MAX.min(self.opts.write_buffer_bytes_max) as u64;
        // Data left out of `pending` (large entries), written before `append` returns.
        let mut borrowed: Vec<record::Borrowed<'_>> = Vec::new();
        let mut borrowed_bytes = 0usize;
        let mut i = 0;
        while i < entries.len() {
            let first = &entries[i];
            let active = self.segments.last().expect("active segment");
            if !truncating
                && active.has_entries
                && active.bytes + entry_bytes(first) > self.opts.segment_bytes_max
            {
                self.flush_with(&mut borrowed)?;
                borrowed_bytes = 0;
                self.roll(None)?;
            }
            let mut end = i + 1;
            if self.batching {
                let active = self.segments.last().expect("active segment");
                // A batch never spans segments (it rolled before, if need be).
                let room = if truncating {
                    u64::MAX
                } else {
                    self.opts.segment_bytes_max.saturating_sub(active.bytes)
                };
                let mut bytes =
                    (record::ENTRIES_RECORD_EMPTY_BYTES + record::entries_item_bytes(first)) as u64;
                while let Some(e) = entries.get(end) {
                    let more = bytes + record::entries_item_bytes(e) as u64;
                    if e.term != first.term || more > group_bytes_max || more > room {
                        break;
                    }
                    bytes = more;
                    end += 1;
                }
            }
            let group = &entries[i..end];
            let last = group.last().expect("a group is never empty");
            if first.index <= self.last {
                self.truncate_terms(first.index - 1);
            }
            self.unmarked = true;
            let before = self.pending.len() + borrowed_bytes;
            let pieces_before = borrowed.len();
            let zc = self.zero_copy_min;
            let salt = self.segments.last().expect("active segment").salt;
            if let [e] = group {
                record::encode_entry_borrowing(&mut self.pending, e, salt, zc, &mut borrowed);
            } else {
                record::encode_entries_borrowing(&mut self.pending, group, salt, zc, &mut borrowed);
            }
            borrowed_bytes += borrowed[pieces_before..]
                .iter()
                .map(|(_, d)| d.len())
                .sum::<usize>();
            let n = (self.pending.len() + borrowed_bytes - before) as u64;
            let active = self.active();
            active.bytes += n;
            active.max_index = active.max_index.max(last.index);
            active.has_entries = true;
            if self.terms.last().map(|&(_, t)| t) != Some(first.term) {
                self.terms.push((first.index, first.term));
            }
            self.last = last.index;
            if self.pending.len() + borrowed_bytes >= self.opts.write_buffer_bytes_max {
                self.flush_with(&mut borrowed)?;
                borrowed_bytes = 0;
            }
            i = end;
        }
        // The borrowed data must reach the OS before the borrow ends; otherwise all stays
        // buffered for the one `write` of `sync`.
        if !borrowed.is_empty() {
            self.flush_with(&mut borrowed)?;
        }
        Ok(())
    }

    fn set_hard_state(&mut self, hs: HardState) -> Result<()> {
        self.check_ok()?;
        check_hard_state(&self.hard_state, &hs)?;
        if hs == self.hard_state {
            return Ok(());
        }
        self.recovered = None;
        self.hard_state = hs;
        self.put(&Record::HardState(hs))
    }

    fn snapshot_writer(&self) -> Option<crate::SnapshotWriter> {
        self.disk
            .is_real()
            .then(|| crate::SnapshotWriter::new(self.snaps.clone()))
    }

    fn adopt_snapshot(&mut self, written: crate::WrittenSnapshot) -> Result<bool> {
        self.check_ok()?;
        let meta = written.meta();
        if meta.index <= self.snapshot_index {
            return Ok(false);
        }
        self.recovered = None;
        // The writer pruned older snapshot files already.
        self.apply_snapshot_to_log(meta.index, meta.term)?;
        Ok(true)
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        self.check_ok()?;
        check_snapshot(snap, self.snapshot_index)?;
        self.recovered = None;
        // The snapshot file is durable before the log refers to it: replay must never
        // find the log compacted past the newest snapshot.
        self.snaps.save(&mut self.disk, snap)?;
        self.apply_snapshot_to_log(snap.meta.index, snap.meta.term)
    }

    fn compact(&mut self, index: u64) -> Result<()> {
        self.check_ok()?;
        check_compact(index, self.snapshot_index)?;
        if index <= self.base {
            return Ok(());
        }
        // Unreachable while install_snapshot drops what it covers; kept for safety.
        let term = self.term(index).ok_or_else(|| {
            StorageError::Invalid(format!("compact: index {index} is not in the log"))
        })?;
        self.recovered = None;
        self.apply_snapshot_to_log(index, term)
    }

    fn sync(&mut self) -> Result<u64> {
        self.check_ok()?;
        self.sync_inner()
    }

    fn recover(&mut self) -> Result<Recovered> {
        if let Some(r) = self.recovered.take() {
            return Ok(r);
        }
        if self.failed.is_none() {
            self.sync_inner()?;
        }
        self.load()
    }

    fn first_index(&self) -> u64 {
        self.base + 1
    }

    fn last_index(&self) -> u64 {
        self.last
    }
}
