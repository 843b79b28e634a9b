//! The WAL record codec, shared by `wal::Wal` and (through it) `faulty::FaultyStore`.
//!
//! Every record is a 16-byte header followed by a payload (all integers little-endian):
//!
//! ```text
//! offset size field
//!      0    4 header_crc   CRC32C of the segment's seq (8 bytes) then bytes 4..16
//!      4    4 len          payload length in bytes, at most RECORD_PAYLOAD_MAX_BYTES
//!      8    1 type         RecordType
//!      9    3 reserved     zero
//!     12    4 payload_crc  CRC32C of the segment's seq (8 bytes) then the payload
//!     16  len payload
//! ```
//!
//! The header has its own checksum so that a damaged length is caught before it is
//! trusted: otherwise a flipped length bit could make a record in the middle of a segment
//! look like a torn record at the end, and recovery would cut off good data after it.
//!
//! Both checksums are salted with the sequence number of the segment the record is in
//! ([`segment_salt`]): segment files are recycled (overwritten from offset 0 under a new
//! seq), and a stale record left from a file's earlier life must not pass for a record of
//! its current one. The salt is the CRC state after the 8 bytes of `seq`, so a record's
//! checksum is simply the CRC32C of `seq ‖ bytes`.

use concord_consensus::{Entry, EntryKind, HardState};

/// Size of the fixed record header.
pub const HEADER_BYTES: usize = 16;

/// The checksum salt of the records of segment `seq`: the CRC32C of `seq` as 8 bytes
/// little-endian, used as the starting value of both checksums. Distinct seqs below 2^32
/// always give distinct salts (CRC32C maps a nonzero difference of at most 32 bits to a
/// nonzero difference), and a record checked under another salt then always fails: with
/// one byte string, two different start values always give two different checksums.
pub fn segment_salt(seq: u64) -> u32 {
    crc32c::crc32c(&seq.to_le_bytes())
}

/// The salt of the first on-disk format (before segment recycling): plain CRC32C. Only
/// recovery uses it, to tell an old data directory from a damaged one.
pub const UNSALTED: u32 = 0;

/// Largest payload a record may carry. Bounds the memory a (possibly corrupt) length
/// field can make the decoder ask for, and the largest entry the log accepts.
pub const RECORD_PAYLOAD_MAX_BYTES: usize = 64 << 20;

/// Bytes of an entry payload before its data: index, term, kind.
pub const ENTRY_PREFIX_BYTES: usize = 17;

/// Largest `Entry::data` that fits in one record.
pub const ENTRY_DATA_MAX_BYTES: usize = RECORD_PAYLOAD_MAX_BYTES - ENTRY_PREFIX_BYTES;

/// Largest padding of a sync marker: enough to reach any 4 KiB page boundary.
pub const SYNC_MARK_PADDING_MAX: u16 = 4095;

/// Bytes of a sync marker payload before its padding: offset, stretch start, stretch
/// checksum, recycled flag.
pub const SYNC_MARK_PREFIX_BYTES: usize = 21;

/// Payload size of a segment start record: seq, prev index, prev term, reset, recycled.
const SEGMENT_START_BYTES: usize = 26;

/// Payload size of a segment start record of on-disk format 2 (no recycled flag, sync
/// markers without stretch checksums). Only recovery uses it, for a clear error.
const SEGMENT_START_BYTES_FORMAT_2: usize = 25;

/// The checksum of a stretch of bytes of the segment salted `salt` (see
/// `Record::SyncMark`); `crc32c_append(stretch_crc(salt, a), b)` continues it over `b`.
pub fn stretch_crc(salt: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(salt, bytes)
}

/// Whether `buf` begins with a segment start record of on-disk format 2, checksummed
/// with `salt`: valid checksums, but the 25-byte payload of that format.
pub fn is_format_2_start(buf: &[u8], salt: u32) -> bool {
    buf.len() >= HEADER_BYTES + SEGMENT_START_BYTES_FORMAT_2
        && buf[8] == TYPE_SEGMENT_START
        && u32_at(buf, 4) as usize == SEGMENT_START_BYTES_FORMAT_2
        && matches!(decode(buf, salt), Err(DecodeError::Malformed(_)))
}

/// Bytes of an entries payload before its first item: first index, term.
pub const ENTRIES_PREFIX_BYTES: usize = 16;

/// Longest item header in an entries payload: LEB128 of `data_len << 2 | kind`, whose
/// value stays below 2^35 (5 groups of 7 bits). The writer's items take 2 bytes for data
/// of 32 B to 4 KiB and 3 up to 512 KiB.
pub const ENTRIES_ITEM_HEADER_BYTES_MAX: usize = 5;

const TYPE_SEGMENT_START: u8 = 1;
const TYPE_ENTRY: u8 = 2;
const TYPE_HARD_STATE: u8 = 3;
const TYPE_COMPACT: u8 = 4;
const TYPE_BATCH_BEGIN: u8 = 5;
const TYPE_SYNC_MARK: u8 = 6;
const TYPE_ENTRIES: u8 = 7;

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// First record of every segment. `seq` is the segment's sequence number; the log
    /// ended at (`prev_index`, `prev_term`) when the segment was opened. With `reset`,
    /// the log restarts empty after `prev_index` (a snapshot replaced it), otherwise the
    /// segment continues the previous one and replay checks that they chain up.
    SegmentStart {
        seq: u64,
        prev_index: u64,
        prev_term: u64,
        reset: bool,
        /// The segment was written into a reused (spare) file, over bytes it already
        /// owned: recovery then tells an incomplete last sync by its stretch checksum
        /// (see `SyncMark`).
        recycled: bool,
    },
    /// A log entry. An entry at or below the current last index truncates the log
    /// from its index first (a conflicting suffix is replaced).
    Entry(Entry),
    HardState(HardState),
    /// Entries up to and including `index` (whose term is `term`) are dropped.
    Compact {
        index: u64,
        term: u64,
    },
    /// Opens a truncating batch: the next `count` records are the entries
    /// `first_index..first_index + count`, and the truncation from `first_index` they
    /// imply takes effect only once all of them are present. An incomplete batch at the
    /// tail of the newest segment is a torn write and is cut off whole.
    BatchBegin {
        first_index: u64,
        count: u64,
    },
    /// Written just before every fsync of a segment: `offset` is this record's own byte
    /// offset in its file. Every synced stretch of a segment thus ends with a marker, so
    /// damage to any record that carries data is followed by intact bytes and is reported
    /// as corruption, never cut off as a torn tail. `padding` zero bytes follow `offset`
    /// in the payload (at most `SYNC_MARK_PADDING_MAX`): the WAL uses them to end a large
    /// sync on a page boundary, so that the next one does not rewrite a partial page.
    ///
    /// The marker also covers its **stretch**, the bytes `[stretch_start, offset)` from
    /// the end of the previous marker in the segment (or its start): `stretch_crc` is
    /// their CRC32C under the segment's salt. In a recycled segment a power cut during
    /// an `fdatasync` may keep a later page (with the marker) and lose an earlier one;
    /// a stretch that does not match tells that sync never completed. `recycled` repeats
    /// the segment start's flag, so it is known even when the start record is lost.
    SyncMark {
        offset: u64,
        stretch_start: u64,
        stretch_crc: u32,
        recycled: bool,
        padding: u16,
    },
    /// Several entries of one term with consecutive indices in one record, each item
    /// framed by one varint (data length and kind): 1-3 bytes per entry instead of the 33
    /// of an `Entry` record, and one checksum over them all. Replays exactly like the same
    /// entries as separate `Entry` records, except that a crash keeps all or none of them.
    /// Never empty.
    Entries(Vec<Entry>),
}

/// Why a record could not be decoded from the front of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ends before the record does (`needed` bytes in total would be needed;
    /// for a short header that is just the header size).
    Incomplete { needed: usize },
    /// The header checksum does not match: nothing in the header can be trusted.
    HeaderChecksum,
    /// The header is intact, but the payload checksum does not match.
    PayloadChecksum { record_bytes: usize },
    /// Checksums match but the content makes no sense (unknown type, bad length).
    /// Only a bug or a deliberate forgery gets here; treated as corruption.
    Malformed(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Incomplete { needed } => {
                write!(f, "record incomplete ({needed} bytes needed)")
            }
            DecodeError::HeaderChecksum => write!(f, "record header checksum mismatch"),
            DecodeError::PayloadChecksum { record_bytes } => {
                write!(
                    f,
                    "record payload checksum mismatch (record of {record_bytes} bytes)"
                )
            }
            DecodeError::Malformed(m) => write!(f, "malformed record: {m}"),
        }
    }
}

fn kind_to_u8(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::Normal => 0,
        EntryKind::Noop => 1,
        EntryKind::ConfChange => 2,
    }
}

fn kind_from_u8(b: u8) -> Option<EntryKind> {
    match b {
        0 => Some(EntryKind::Normal),
        1 => Some(EntryKind::Noop),
        2 => Some(EntryKind::ConfChange),
        _ => None,
    }
}

/// Appends the framed encoding of an entry to `out` (one copy of `data`, no temporaries).
/// The caller checks `entry.data.len() <= ENTRY_DATA_MAX_BYTES` first.
pub fn encode_entry(out: &mut Vec<u8>, entry: &Entry, salt: u32) {
    encode_entry_borrowing(out, entry, salt, usize::MAX, &mut Vec::new());
}

/// Entry data left out of an encoding: the record's bytes are `out[..at]`, then `data`,
/// then the rest of `out` (up to the next borrowed piece). Lets the WAL hand large entry
/// data to the OS straight from the caller's buffers, in one `writev`, without copying.
pub type Borrowed<'a> = (usize, &'a [u8]);

/// The payload checksum of a record being built whose data may be partly borrowed:
/// bytes in `out` are checksummed in long stretches (`out[from..]` is still to do), which
/// is much faster than a call per entry for small entries.
struct PayloadCrc {
    crc: u32,
    from: usize,
}

impl PayloadCrc {
    fn new(out: &[u8], salt: u32) -> Self {
        PayloadCrc {
            crc: salt,
            from: out.len(),
        }
    }

    /// Appends `data` to the record being built, or borrows it if it has at least
    /// `borrow_min` bytes (checksumming it where it lies).
    fn put<'a>(
        &mut self,
        out: &mut Vec<u8>,
        data: &'a [u8],
        borrow_min: usize,
        borrowed: &mut Vec<Borrowed<'a>>,
    ) {
        if data.len() >= borrow_min {
            self.finish(out);
            self.crc = crc32c::crc32c_append(self.crc, data);
            borrowed.push((out.len(), data));
        } else {
            out.extend_from_slice(data);
        }
    }

    /// The checksum of everything put so far.
    fn finish(&mut self, out: &[u8]) -> u32 {
        self.crc = crc32c::crc32c_append(self.crc, &out[self.from..]);
        self.from = out.len();
        self.crc
    }
}

/// `encode_entry`, except that data of at least `borrow_min` bytes is not copied into
/// `out` but recorded in `borrowed` (see [`Borrowed`]).
pub fn encode_entry_borrowing<'a>(
    out: &mut Vec<u8>,
    entry: &'a Entry,
    salt: u32,
    borrow_min: usize,
    borrowed: &mut Vec<Borrowed<'a>>,
) {
    assert!(entry.data.len() <= ENTRY_DATA_MAX_BYTES);
    let start = begin(out);
    let mut crc = PayloadCrc::new(out, salt);
    out.extend_from_slice(&entry.index.to_le_bytes());
    out.extend_from_slice(&entry.term.to_le_bytes());
    out.push(kind_to_u8(entry.kind));
    crc.put(out, &entry.data, borrow_min, borrowed);
    let crc = crc.finish(out);
    finish_with(
        out,
        start,
        TYPE_ENTRY,
        ENTRY_PREFIX_BYTES + entry.data.len(),
        crc,
        salt,
    );
}

/// Encoded size of an `Entries` record without its items.
pub const ENTRIES_RECORD_EMPTY_BYTES: usize = HEADER_BYTES + ENTRIES_PREFIX_BYTES;

/// The item header's value: data length and kind in one number.
fn item_header(e: &Entry) -> u64 {
    ((e.data.len() as u64) << 2) | u64::from(kind_to_u8(e.kind))
}

/// Bytes of an LEB128 encoding of `v`: 7 bits per byte.
fn varint_bytes(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes one entry takes in an `Entries` record (item header and data).
pub fn entries_item_bytes(e: &Entry) -> usize {
    varint_bytes(item_header(e)) + e.data.len()
}

/// LEB128: the low 7 bits first, the high bit set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads the LEB128 value at the front of `b`, at most `ENTRIES_ITEM_HEADER_BYTES_MAX`
/// bytes long and in its shortest form (so it re-encodes to the same bytes).
fn get_varint(b: &[u8]) -> Result<(u64, usize), String> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().take(ENTRIES_ITEM_HEADER_BYTES_MAX).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err("item header not in its shortest form".into());
            }
            return Ok((v, i + 1));
        }
    }
    Err(if b.len() < ENTRIES_ITEM_HEADER_BYTES_MAX {
        "entries payload ends inside an item header".into()
    } else {
        format!("item header longer than {ENTRIES_ITEM_HEADER_BYTES_MAX} bytes")
    })
}

/// Appends an `Entries` record holding `entries` to `out` (one copy of each entry's data,
/// one checksum over the whole payload). The caller guarantees what the record requires:
/// at least one entry, one term, consecutive indices, a payload within
/// `RECORD_PAYLOAD_MAX_BYTES`; a violation is a bug and panics.
pub fn encode_entries(out: &mut Vec<u8>, entries: &[Entry], salt: u32) {
    encode_entries_borrowing(out, entries, salt, usize::MAX, &mut Vec::new());
}

/// `encode_entries`, except that entry data of at least `borrow_min` bytes is not copied
/// into `out` but recorded in `borrowed` (see [`Borrowed`]).
pub fn encode_entries_borrowing<'a>(
    out: &mut Vec<u8>,
    entries: &'a [Entry],
    salt: u32,
    borrow_min: usize,
    borrowed: &mut Vec<Borrowed<'a>>,
) {
    let first = entries.first().expect("an entries record is never empty");
    let payload = ENTRIES_PREFIX_BYTES + entries.iter().map(entries_item_bytes).sum::<usize>();
    assert!(payload <= RECORD_PAYLOAD_MAX_BYTES);
    let start = begin(out);
    let mut crc = PayloadCrc::new(out, salt);
    out.extend_from_slice(&first.index.to_le_bytes());
    out.extend_from_slice(&first.term.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        assert!(e.term == first.term && Some(e.index) == first.index.checked_add(i as u64));
        put_varint(out, item_header(e));
        crc.put(out, &e.data, borrow_min, borrowed);
    }
    let crc = crc.finish(out);
    finish_with(out, start, TYPE_ENTRIES, payload, crc, salt);
}

/// Appends the framed encoding of any record to `out`, checksummed with `salt` (the
/// [`segment_salt`] of the segment it goes into).
pub fn encode(out: &mut Vec<u8>, record: &Record, salt: u32) {
    match record {
        Record::Entry(e) => encode_entry(out, e, salt),
        Record::Entries(v) => encode_entries(out, v, salt),
        Record::SegmentStart {
            seq,
            prev_index,
            prev_term,
            reset,
            recycled,
        } => {
            let start = begin(out);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&prev_index.to_le_bytes());
            out.extend_from_slice(&prev_term.to_le_bytes());
            out.push(u8::from(*reset));
            out.push(u8::from(*recycled));
            finish(out, start, TYPE_SEGMENT_START, salt);
        }
        Record::HardState(hs) => {
            let start = begin(out);
            out.extend_from_slice(&hs.term.to_le_bytes());
            out.extend_from_slice(&hs.vote.to_le_bytes());
            out.extend_from_slice(&hs.commit.to_le_bytes());
            finish(out, start, TYPE_HARD_STATE, salt);
        }
        Record::Compact { index, term } => {
            let start = begin(out);
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&term.to_le_bytes());
            finish(out, start, TYPE_COMPACT, salt);
        }
        Record::BatchBegin { first_index, count } => {
            let start = begin(out);
            out.extend_from_slice(&first_index.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            finish(out, start, TYPE_BATCH_BEGIN, salt);
        }
        Record::SyncMark {
            offset,
            stretch_start,
            stretch_crc,
            recycled,
            padding,
        } => {
            let start = begin(out);
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&stretch_start.to_le_bytes());
            out.extend_from_slice(&stretch_crc.to_le_bytes());
            out.push(u8::from(*recycled));
            out.resize(out.len() + usize::from(*padding), 0);
            finish(out, start, TYPE_SYNC_MARK, salt);
        }
    }
}

/// Frames an arbitrary payload under any type byte, with correct checksums. For fuzzing
/// and tests: it lets them reach the payload parsing behind the checksums.
pub fn frame_raw(out: &mut Vec<u8>, ty: u8, payload: &[u8], salt: u32) {
    let start = begin(out);
    out.extend_from_slice(&payload[..payload.len().min(RECORD_PAYLOAD_MAX_BYTES)]);
    finish(out, start, ty, salt);
}

fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    start
}

fn finish(out: &mut [u8], start: usize, ty: u8, salt: u32) {
    let payload_len = out.len() - start - HEADER_BYTES;
    let payload_crc = crc32c::crc32c_append(salt, &out[start + HEADER_BYTES..]);
    finish_with(out, start, ty, payload_len, payload_crc, salt);
}

/// Fills in the header of the record begun at `start`, whose payload (partly borrowed,
/// perhaps) has `payload_len` bytes with checksum `payload_crc`.
fn finish_with(
    out: &mut [u8],
    start: usize,
    ty: u8,
    payload_len: usize,
    payload_crc: u32,
    salt: u32,
) {
    assert!(payload_len <= RECORD_PAYLOAD_MAX_BYTES);
    let h = &mut out[start..start + HEADER_BYTES];
    h[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h[8] = ty;
    h[9..12].copy_from_slice(&[0, 0, 0]);
    h[12..16].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c_append(salt, &h[4..16]);
    h[0..4].copy_from_slice(&header_crc.to_le_bytes());
}

/// A flag byte: 0 or 1, anything else is `Malformed` (so a record re-encodes exactly).
fn flag(b: u8, what: &str) -> Result<bool, DecodeError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(DecodeError::Malformed(format!("{what} flag {b}"))),
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Decodes the record at the front of `buf`, checksummed with `salt`, returning it and
/// its size in bytes. Never panics, whatever the input (fuzzed by
/// `fuzz/fuzz_targets/decode_record.rs`).
pub fn decode(buf: &[u8], salt: u32) -> Result<(Record, usize), DecodeError> {
    if buf.len() < HEADER_BYTES {
        return Err(DecodeError::Incomplete {
            needed: HEADER_BYTES,
        });
    }
    let h = &buf[..HEADER_BYTES];
    if u32_at(h, 0) != crc32c::crc32c_append(salt, &h[4..16]) {
        return Err(DecodeError::HeaderChecksum);
    }
    let len = u32_at(h, 4) as usize;
    let ty = h[8];
    if len > RECORD_PAYLOAD_MAX_BYTES {
        return Err(DecodeError::Malformed(format!(
            "payload length {len} exceeds the limit {RECORD_PAYLOAD_MAX_BYTES}"
        )));
    }
    if h[9..12] != [0, 0, 0] {
        return Err(DecodeError::Malformed(
            "reserved header bytes not zero".into(),
        ));
    }
    let total = HEADER_BYTES + len;
    if buf.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    let p = &buf[HEADER_BYTES..total];
    if u32_at(h, 12) != crc32c::crc32c_append(salt, p) {
        return Err(DecodeError::PayloadChecksum {
            record_bytes: total,
        });
    }
    let want = |n: usize, what: &str| -> Result<(), DecodeError> {
        if p.len() == n {
            Ok(())
        } else {
            Err(DecodeError::Malformed(format!(
                "{what} payload is {} bytes, expected {n}",
                p.len()
            )))
        }
    };
    let record = match ty {
        TYPE_SEGMENT_START => {
            want(SEGMENT_START_BYTES, "segment start")?;
            Record::SegmentStart {
                seq: u64_at(p, 0),
                prev_index: u64_at(p, 8),
                prev_term: u64_at(p, 16),
                reset: flag(p[24], "reset")?,
                recycled: flag(p[25], "recycled")?,
            }
        }
        TYPE_ENTRY => {
            if p.len() < ENTRY_PREFIX_BYTES {
                return Err(DecodeError::Malformed(format!(
                    "entry payload is {} bytes, shorter than its {ENTRY_PREFIX_BYTES}-byte prefix",
                    p.len()
                )));
            }
            let kind = kind_from_u8(p[16])
                .ok_or_else(|| DecodeError::Malformed(format!("entry kind {}", p[16])))?;
            Record::Entry(Entry {
                index: u64_at(p, 0),
                term: u64_at(p, 8),
                kind,
                data: p[ENTRY_PREFIX_BYTES..].to_vec(),
            })
        }
        TYPE_HARD_STATE => {
            want(24, "hard state")?;
            Record::HardState(HardState {
                term: u64_at(p, 0),
                vote: u64_at(p, 8),
                commit: u64_at(p, 16),
            })
        }
        TYPE_COMPACT => {
            want(16, "compact")?;
            Record::Compact {
                index: u64_at(p, 0),
                term: u64_at(p, 8),
            }
        }
        TYPE_BATCH_BEGIN => {
            want(16, "batch begin")?;
            Record::BatchBegin {
                first_index: u64_at(p, 0),
                count: u64_at(p, 8),
            }
        }
        TYPE_SYNC_MARK => {
            let max = SYNC_MARK_PREFIX_BYTES + usize::from(SYNC_MARK_PADDING_MAX);
            if p.len() < SYNC_MARK_PREFIX_BYTES || p.len() > max {
                return Err(DecodeError::Malformed(format!(
                    "sync marker payload is {} bytes, expected {SYNC_MARK_PREFIX_BYTES} to \
                     {max}",
                    p.len(),
                )));
            }
            if p[SYNC_MARK_PREFIX_BYTES..].iter().any(|&b| b != 0) {
                return Err(DecodeError::Malformed(
                    "sync marker padding not zero".into(),
                ));
            }
            Record::SyncMark {
                offset: u64_at(p, 0),
                stretch_start: u64_at(p, 8),
                stretch_crc: u32_at(p, 16),
                recycled: flag(p[20], "recycled")?,
                padding: (p.len() - SYNC_MARK_PREFIX_BYTES) as u16,
            }
        }
        TYPE_ENTRIES => Record::Entries(decode_entries(p)?),
        t => return Err(DecodeError::Malformed(format!("unknown record type {t}"))),
    };
    Ok((record, total))
}

/// Whether a valid sync marker of the segment salted `salt` starts at `buf[at..]` and
/// names `at` as its own offset. Recovery scans the bytes after a bad record in the
/// newest segment with it, position by position: the offset check first rejects almost
/// every position with one comparison, before any checksum is computed.
pub fn sync_mark_at(buf: &[u8], at: usize, salt: u32) -> bool {
    let Some(b) = buf.get(at..at + HEADER_BYTES + 8) else {
        return false;
    };
    if u64_at(b, HEADER_BYTES) != at as u64 || b[8] != TYPE_SYNC_MARK {
        return false;
    }
    matches!(decode(&buf[at..], salt), Ok((Record::SyncMark { offset, .. }, _)) if offset == at as u64)
}

/// The first position in `from..buf.len()` where [`sync_mark_at`] holds, if any. Costs
/// one 8-byte comparison per position for almost every position, so recovery can afford
/// it over a whole segment (measured with `wal_bench --scan-cost`). A zero-filled tail
/// (a preallocated segment's unused end) is skipped in one fast pass: a marker's length
/// field is at least 21, so no marker starts at or after the last non-zero byte.
pub fn find_sync_mark(buf: &[u8], from: usize, salt: u32) -> Option<usize> {
    let last = buf
        .len()
        .checked_sub(HEADER_BYTES + 8)?
        .min(nonzero_end(buf).checked_sub(1)?);
    (from..=last).find(|&at| {
        let offset = u64::from_le_bytes(
            buf[at + HEADER_BYTES..at + HEADER_BYTES + 8]
                .try_into()
                .expect("8 bytes"),
        );
        offset == at as u64 && sync_mark_at(buf, at, salt)
    })
}

/// The length of `buf` without its trailing zero bytes (0 if all are zero). Checks
/// 64-byte blocks from the back with a bitwise OR, which the compiler vectorises: a
/// 60 MiB zero tail takes a few milliseconds, not the ~100 of a byte-by-byte scan.
pub fn nonzero_end(buf: &[u8]) -> usize {
    const BLOCK: usize = 64;
    let whole = buf.len() - buf.len() % BLOCK;
    if let Some(i) = buf[whole..].iter().rposition(|&b| b != 0) {
        return whole + i + 1;
    }
    for (k, block) in buf[..whole].chunks_exact(BLOCK).enumerate().rev() {
        if block.iter().fold(0u8, |a, &b| a | b) != 0 {
            let i = block
                .iter()
                .rposition(|&b| b != 0)
                .expect("a non-zero byte");
            return k * BLOCK + i + 1;
        }
    }
    0
}

/// Parses an `Entries` payload: first index, term, then items (header, data) up to
/// exactly the end of the payload.
fn decode_entries(p: &[u8]) -> Result<Vec<Entry>, DecodeError> {
    let bad = |m: String| Err(DecodeError::Malformed(m));
    if p.len() <= ENTRIES_PREFIX_BYTES {
        return bad(format!(
            "entries payload is {} bytes, too short for even one entry",
            p.len()
        ));
    }
    let first_index = u64_at(p, 0);
    let term = u64_at(p, 8);
    let mut entries = Vec::new();
    let mut at = ENTRIES_PREFIX_BYTES;
    while at < p.len() {
        let Some(index) = first_index.checked_add(entries.len() as u64) else {
            return bad("entry index overflows".into());
        };
        let (header, n) = get_varint(&p[at..]).map_err(DecodeError::Malformed)?;
        at += n;
        let kind = kind_from_u8((header & 3) as u8)
            .ok_or_else(|| DecodeError::Malformed(format!("entry kind {}", header & 3)))?;
        let len = header >> 2;
        if ((p.len() - at) as u64) < len {
            return bad(format!(
                "entry {index} of {len} bytes runs past the end of its record"
            ));
        }
        let len = len as usize;
        entries.push(Entry {
            index,
            term,
            kind,
            data: p[at..at + len].to_vec(),
        });
        at += len;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The salt the unit tests use (any segment's would do).
    const S: u32 = 0x5a17_5a17;

    fn samples() -> Vec<Record> {
        vec![
            Record::SegmentStart {
                seq: 7,
                prev_index: 41,
                prev_term: 3,
                reset: true,
                recycled: false,
            },
            Record::Entry(Entry {
                index: 42,
                term: 3,
                kind: EntryKind::ConfChange,
                data: b"hello".to_vec(),
            }),
            Record::Entry(Entry {
                index: 43,
                term: 4,
                kind: EntryKind::Noop,
                data: vec![],
            }),
            Record::HardState(HardState {
                term: 4,
                vote: 2,
                commit: 40,
            }),
            Record::Compact { index: 10, term: 1 },
            Record::BatchBegin {
                first_index: 40,
                count: 3,
            },
            Record::SyncMark {
                offset: 4096,
                stretch_start: 100,
                stretch_crc: 0xdead_beef,
                recycled: false,
                padding: 0,
            },
            Record::SyncMark {
                offset: 8000,
                stretch_start: 4124,
                stretch_crc: 7,
                recycled: true,
                padding: 168,
            },
            Record::Entries(vec![
                Entry {
                    index: 44,
                    term: 4,
                    kind: EntryKind::Normal,
                    data: b"abc".to_vec(),
                },
                Entry {
                    index: 45,
                    term: 4,
                    kind: EntryKind::Noop,
                    data: vec![],
                },
                Entry {
                    index: 46,
                    term: 4,
                    kind: EntryKind::ConfChange,
                    data: vec![7; 300],
                },
            ]),
            Record::SegmentStart {
                seq: 8,
                prev_index: 41,
                prev_term: 3,
                reset: false,
                recycled: true,
            },
        ]
    }

    #[test]
    fn round_trip_every_record_type() {
        let mut buf = Vec::new();
        for r in samples() {
            encode(&mut buf, &r, S);
        }
        let mut at = 0;
        for r in samples() {
            let (got, n) = decode(&buf[at..], S).unwrap();
            assert_eq!(got, r);
            at += n;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        for r in samples() {
            let mut buf = Vec::new();
            encode(&mut buf, &r, S);
            for i in 0..buf.len() {
                for bit in 0..8 {
                    let mut b = buf.clone();
                    b[i] ^= 1 << bit;
                    assert!(
                        decode(&b, S).is_err(),
                        "flip of byte {i} bit {bit} in {r:?}"
                    );
                }
            }
        }
    }

    fn assert_every_prefix_incomplete(rec: &Record) {
        let mut buf = Vec::new();
        encode(&mut buf, rec, S);
        for n in 0..buf.len() {
            assert!(matches!(
                decode(&buf[..n], S),
                Err(DecodeError::Incomplete { .. })
            ));
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        assert_every_prefix_incomplete(&samples()[1]);
    }

    #[test]
    fn every_prefix_of_an_entries_record_is_incomplete() {
        assert!(matches!(samples()[8], Record::Entries(_)));
        assert_every_prefix_incomplete(&samples()[8]);
    }

    #[test]
    fn malformed_entries_payloads_are_refused() {
        let prefix = |first: u64| {
            let mut p = first.to_le_bytes().to_vec();
            p.extend_from_slice(&3u64.to_le_bytes());
            p
        };
        let item = |kind: u8, data: &[u8]| {
            let mut v = Vec::new();
            put_varint(&mut v, (data.len() as u64) << 2 | u64::from(kind));
            v.extend_from_slice(data);
            v
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no entry", prefix(5)),
            ("short prefix", prefix(5)[..10].to_vec()),
            (
                "item header cut",
                [prefix(5), item(0, b"ab"), vec![0x81]].concat(),
            ),
            (
                "overlong item header",
                [prefix(5), vec![0x84, 0x00], b"a".to_vec()].concat(),
            ),
            (
                "item header over 5 bytes",
                [prefix(5), vec![0x80; 5], vec![0]].concat(),
            ),
            ("data past the end", {
                let mut v = [prefix(5), item(0, b"abc")].concat();
                v.pop();
                v
            }),
            ("bad kind", [prefix(5), item(3, b"a")].concat()),
            (
                "index overflow",
                [prefix(u64::MAX), item(0, b"a"), item(0, b"b")].concat(),
            ),
        ];
        for (what, payload) in cases {
            let mut buf = Vec::new();
            frame_raw(&mut buf, TYPE_ENTRIES, &payload, S);
            assert!(
                matches!(decode(&buf, S), Err(DecodeError::Malformed(_))),
                "{what}: {:?}",
                decode(&buf, S)
            );
        }
        // The last index may be u64::MAX itself.
        let mut buf = Vec::new();
        frame_raw(
            &mut buf,
            TYPE_ENTRIES,
            &[prefix(u64::MAX), item(1, b"")].concat(),
            S,
        );
        let (r, _) = decode(&buf, S).unwrap();
        assert!(matches!(&r, Record::Entries(v) if v.len() == 1 && v[0].index == u64::MAX));
    }

    /// Borrowed pieces put back where they were left out give exactly the copied encoding.
    #[test]
    fn borrowing_encoders_give_the_same_bytes() {
        let ents: Vec<Entry> = [0usize, 5, 4096, 3, 9000]
            .iter()
            .enumerate()
            .map(|(i, &n)| Entry {
                index: 10 + i as u64,
                term: 2,
                kind: EntryKind::Normal,
                data: (0..n).map(|b| (b * 7 + i) as u8).collect(),
            })
            .collect();
        for borrow_min in [0, 1, 4096, usize::MAX] {
            let mut want = Vec::new();
            encode_entries(&mut want, &ents, S);
            encode_entry(&mut want, &ents[4], S);
            let (mut out, mut borrowed) = (Vec::new(), Vec::new());
            encode_entries_borrowing(&mut out, &ents, S, borrow_min, &mut borrowed);
            encode_entry_borrowing(&mut out, &ents[4], S, borrow_min, &mut borrowed);
            let mut got = Vec::new();
            let mut from = 0;
            for &(at, data) in &borrowed {
                assert!(data.len() >= borrow_min);
                got.extend_from_slice(&out[from..at]);
                got.extend_from_slice(data);
                from = at;
            }
            got.extend_from_slice(&out[from..]);
            assert_eq!(got, want, "borrow_min {borrow_min}");
        }
    }

    /// The example of docs/storage.md, byte by byte.
    #[test]
    fn entries_record_layout_matches_the_docs() {
        let e = |index, kind, n| Entry {
            index,
            term: 9,
            kind,
            data: vec![0xEE; n],
        };
        let mut buf = Vec::new();
        let seq = 3u64;
        encode_entries(
            &mut buf,
            &[e(5, EntryKind::Normal, 3), e(6, EntryKind::ConfChange, 40)],
            segment_salt(seq),
        );
        assert_eq!(buf.len(), 78);
        assert_eq!(&buf[4..12], &[62, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(u64_at(&buf, 16), 5);
        assert_eq!(u64_at(&buf, 24), 9);
        assert_eq!(buf[32], 0x0c);
        assert_eq!(&buf[36..38], &[0xa2, 0x01]);
        // Both checksums are CRC32C of the segment's seq (8 bytes LE) followed by the bytes.
        let salted = |bytes: &[u8]| crc32c::crc32c(&[&seq.to_le_bytes()[..], bytes].concat());
        assert_eq!(u32_at(&buf, 12), salted(&buf[16..78]));
        assert_eq!(u32_at(&buf, 0), salted(&buf[4..16]));
    }

    /// A record of one segment never validates as a record of another (the stale bytes of
    /// a recycled file), nor as the unsalted format of before, and vice versa.
    #[test]
    fn records_do_not_validate_under_another_segments_salt() {
        for seq in [1u64, 2, 3, 255, 256, 1 << 20, (1 << 32) - 1] {
            for r in samples() {
                let mut buf = Vec::new();
                encode(&mut buf, &r, segment_salt(seq));
                assert_eq!(decode(&buf, segment_salt(seq)).unwrap().0, r);
                for other in [seq - 1, seq + 1, seq + 2, seq ^ 0x8000_0000] {
                    assert_eq!(
                        decode(&buf, segment_salt(other)),
                        Err(DecodeError::HeaderChecksum),
                        "seq {seq} read as {other}: {r:?}"
                    );
                }
                assert_eq!(decode(&buf, UNSALTED), Err(DecodeError::HeaderChecksum));
                let mut old = Vec::new();
                encode(&mut old, &r, UNSALTED);
                assert_eq!(
                    old[..],
                    {
                        // The old format: plain CRC32C of the same bytes.
                        let mut b = buf.clone();
                        let pc = crc32c::crc32c(&b[HEADER_BYTES..]);
                        b[12..16].copy_from_slice(&pc.to_le_bytes());
                        let hc = crc32c::crc32c(&b[4..16]);
                        b[0..4].copy_from_slice(&hc.to_le_bytes());
                        b
                    }[..]
                );
                assert!(decode(&old, segment_salt(seq)).is_err());
            }
        }
    }

    #[test]
    fn sync_mark_at_finds_only_markers_naming_their_own_offset() {
        let salt = segment_salt(4);
        let mut buf = vec![0u8; 100];
        encode(
            &mut buf,
            &Record::SyncMark {
                offset: 100,
                stretch_start: 0,
                stretch_crc: 1,
                recycled: true,
                padding: 5,
            },
            salt,
        );
        encode(
            &mut buf,
            &Record::SyncMark {
                offset: 7,
                stretch_start: 0,
                stretch_crc: 1,
                recycled: false,
                padding: 0,
            },
            salt,
        );
        let second = 100 + HEADER_BYTES + SYNC_MARK_PREFIX_BYTES + 5;
        buf.extend_from_slice(&[1; 40]);
        let found: Vec<usize> = (0..buf.len())
            .filter(|&at| sync_mark_at(&buf, at, salt))
            .collect();
        assert_eq!(found, vec![100], "the second marker names the wrong offset");
        assert_eq!(find_sync_mark(&buf, 0, salt), Some(100));
        assert_eq!(find_sync_mark(&buf, 100, salt), Some(100));
        assert_eq!(find_sync_mark(&buf, 101, salt), None);
        assert_eq!(find_sync_mark(&buf[..10], 0, salt), None);
        assert!(!sync_mark_at(&buf, 100, segment_salt(5)));
        assert!(!sync_mark_at(&buf[..second - 1], 100, salt), "cut marker");
        // Followed by a zero tail (preallocation), of any length: the marker, which ends
        // in zero padding, is still found, and nothing in the zeros.
        let mut zeros = buf[..second].to_vec();
        for extra in [0, 1, 63, 64, 65, 5000] {
            zeros.resize(second + extra, 0);
            assert_eq!(find_sync_mark(&zeros, 0, salt), Some(100), "{extra}");
            assert_eq!(find_sync_mark(&zeros, 101, salt), None, "{extra}");
        }
    }

    /// `nonzero_end` against the obvious byte-by-byte definition, around its 64-byte
    /// blocks.
    #[test]
    fn nonzero_end_is_the_length_without_trailing_zeros() {
        assert_eq!(nonzero_end(&[]), 0);
        for len in [1usize, 63, 64, 65, 127, 128, 129, 1000] {
            assert_eq!(nonzero_end(&vec![0u8; len]), 0, "{len}");
            for at in [0, len / 2, len - 1] {
                let mut v = vec![0u8; len];
                v[at] = 0x80;
                assert_eq!(nonzero_end(&v), at + 1, "{len} {at}");
                if at > 0 {
                    v[0] = 1;
                    assert_eq!(nonzero_end(&v), at + 1, "{len} {at}");
                }
            }
        }
    }

    #[test]
    fn sync_marker_padding_must_be_zero_and_short() {
        let payload = |pad: usize, last: u8| {
            let mut p = 77u64.to_le_bytes().to_vec();
            p.extend_from_slice(&5u64.to_le_bytes());
            p.extend_from_slice(&9u32.to_le_bytes());
            p.push(1);
            p.resize(SYNC_MARK_PREFIX_BYTES + pad, 0);
            if pad > 0 {
                *p.last_mut().unwrap() = last;
            }
            p
        };
        for (what, p, ok) in [
            ("no padding", payload(0, 0), true),
            ("largest padding", payload(4095, 0), true),
            ("too much padding", payload(4096, 0), false),
            ("non-zero padding", payload(10, 1), false),
            ("short", 77u64.to_le_bytes()[..7].to_vec(), false),
            ("format 2 marker", 77u64.to_le_bytes().to_vec(), false),
            (
                "bad recycled flag",
                {
                    let mut p = payload(0, 0);
                    p[20] = 2;
                    p
                },
                false,
            ),
        ] {
            let mut buf = Vec::new();
            frame_raw(&mut buf, TYPE_SYNC_MARK, &p, S);
            match decode(&buf, S) {
                Ok((
                    Record::SyncMark {
                        offset,
                        stretch_start,
                        stretch_crc,
                        recycled,
                        padding,
                    },
                    n,
                )) if ok => {
                    assert_eq!(
                        (offset, stretch_start, stretch_crc, recycled),
                        (77, 5, 9, true)
                    );
                    assert_eq!(
                        (usize::from(padding), n),
                        (p.len() - SYNC_MARK_PREFIX_BYTES, buf.len())
                    );
                }
                Err(DecodeError::Malformed(_)) if !ok => {}
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn item_headers_take_the_bytes_they_should() {
        for (len, bytes) in [(0usize, 1usize), (31, 1), (32, 2), (4095, 2), (4096, 3)] {
            let e = Entry {
                index: 1,
                term: 1,
                kind: EntryKind::ConfChange,
                data: vec![0; len],
            };
            assert_eq!(entries_item_bytes(&e), bytes + len, "len {len}");
            let mut v = Vec::new();
            put_varint(&mut v, item_header(&e));
            assert_eq!(get_varint(&v), Ok((item_header(&e), bytes)));
        }
        let mut v = Vec::new();
        put_varint(&mut v, (1 << 35) - 1);
        assert_eq!(get_varint(&v), Ok(((1 << 35) - 1, 5)));
    }

    #[test]
    fn zeros_are_not_a_record() {
        assert_eq!(decode(&[0u8; 64], S), Err(DecodeError::HeaderChecksum));
    }
}
