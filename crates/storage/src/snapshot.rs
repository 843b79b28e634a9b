//! Snapshot files: `<dir>/snap/<index:020>-<term:020>.snap`, one per snapshot, written to a
//! `.tmp` file, fsynced, renamed into place and the directory fsynced, so a crash leaves
//! either the old set of snapshots or the new one. The newest `keep` are kept.
//!
//! File format (integers little-endian; byte by byte in docs/storage.md):
//!
//! ```text
//! offset size  field
//!      0    8  magic "CNCDSNAP"
//!      8    4  version (1)
//!     12    4  meta_len: bytes of the meta section that follows
//!     16    m  meta: index u64, term u64, then voters, learners, voters_outgoing, each
//!              a u32 count and that many u64 node ids; then data_len u64
//!   16+m    4  header_crc: CRC32C of bytes 0..16+m
//!   20+m    d  data
//! 20+m+d    4  data_crc: CRC32C of data
//! ```

use crate::disk::Disk;
use crate::{Result, StorageError};
use concord_consensus::{ConfState, Snapshot, SnapshotMeta};
use std::path::{Path, PathBuf};

pub const SNAPSHOT_MAGIC: &[u8; 8] = b"CNCDSNAP";
pub const SNAPSHOT_VERSION: u32 = 1;
/// Bounds the node lists a (corrupt) header can make the decoder allocate.
pub const CONF_NODES_MAX: usize = 4096;
/// Snapshots kept by default: the newest and the one before, in case the newest is
/// being sent to a follower while another is taken.
pub const SNAPSHOTS_KEPT_DEFAULT: usize = 2;

const FIXED_HEADER_BYTES: usize = 16;
/// A snapshot file is written in pieces of this size, each fsynced before the next, so the
/// device never holds more than one piece of it in its queue: the write-ahead log's fsyncs,
/// which clients wait for, then queue behind at most this much (not a whole snapshot of
/// tens of megabytes flushed at once, which stalled commits for 100+ ms).
pub const SNAPSHOT_WRITE_CHUNK_BYTES: usize = 1 << 20;
/// Temporary-file extension of snapshots saved by the log's owner.
const TMP_EXT: &str = "snap.tmp";
/// Temporary-file extension of snapshots written by a [`SnapshotWriter`] on another thread.
const WRITER_TMP_EXT: &str = "snap.bg.tmp";

/// A snapshot file written durably by a [`SnapshotWriter`] and not yet part of the log:
/// hand it to [`crate::LogStore::adopt_snapshot`]. Only a writer can make one.
#[derive(Debug)]
pub struct WrittenSnapshot {
    meta: SnapshotMeta,
}

impl WrittenSnapshot {
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }
}

/// Writes snapshot files away from the thread that owns the log, so that writing and
/// fsyncing a large snapshot does not stall appends, heartbeats and reads. The log is not
/// touched until the owner adopts the result. If the process dies in between, recovery
/// finds a snapshot newer than the log knows and finishes the job, as for a crash inside
/// `install_snapshot`.
#[derive(Clone, Debug)]
pub struct SnapshotWriter {
    store: SnapshotStore,
}

impl SnapshotWriter {
    pub(crate) fn new(store: SnapshotStore) -> SnapshotWriter {
        SnapshotWriter { store }
    }

    /// Writes `snap` durably as a file, then drops all but the newest `keep` files (so
    /// that unlinking a large old snapshot does not stall the log's owner either).
    /// Blocking: call it on a thread of its own.
    pub fn write(&self, snap: &Snapshot) -> Result<WrittenSnapshot> {
        let mut disk = crate::disk::StdDisk::new();
        if let Err(e) = self.store.write_file(&mut disk, snap, WRITER_TMP_EXT) {
            // The caller carries on (its log is untouched) and tries again later under
            // another name: do not leave a partial file of possibly hundreds of MB behind,
            // least of all when the disk is full.
            let tmp = self
                .store
                .path(snap.meta.index, snap.meta.term)
                .with_extension(WRITER_TMP_EXT);
            let _ = disk.remove(&tmp);
            return Err(e);
        }
        self.store.prune(&mut disk)?;
        Ok(WrittenSnapshot {
            meta: snap.meta.clone(),
        })
    }
}

pub fn encode_snapshot(snap: &Snapshot) -> Vec<u8> {
    let (head, tail) = encode_snapshot_parts(snap);
    let mut out = Vec::with_capacity(head.len() + snap.data.len() + tail.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&snap.data);
    out.extend_from_slice(&tail);
    out
}

/// The file is `head | snap.data | tail`; writing the three parts in turn spares a copy
/// of the data (hundreds of MB for a large store).
fn encode_snapshot_parts(snap: &Snapshot) -> (Vec<u8>, [u8; 4]) {
    let mut meta = Vec::new();
    meta.extend_from_slice(&snap.meta.index.to_le_bytes());
    meta.extend_from_slice(&snap.meta.term.to_le_bytes());
    for list in [
        &snap.meta.conf.voters,
        &snap.meta.conf.learners,
        &snap.meta.conf.voters_outgoing,
    ] {
        meta.extend_from_slice(&(list.len() as u32).to_le_bytes());
        for id in list {
            meta.extend_from_slice(&id.to_le_bytes());
        }
    }
    meta.extend_from_slice(&(snap.data.len() as u64).to_le_bytes());

    let mut head = Vec::with_capacity(FIXED_HEADER_BYTES + meta.len() + 4);
    head.extend_from_slice(SNAPSHOT_MAGIC);
    head.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    head.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    head.extend_from_slice(&meta);
    let header_crc = crc32c::crc32c(&head);
    head.extend_from_slice(&header_crc.to_le_bytes());
    (head, crc32c::crc32c(&snap.data).to_le_bytes())
}

/// A little cursor that reports the offset of whatever it failed to read.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&[u8], (u64, String)> {
        if self.buf.len() - self.at < n {
            return Err((
                self.at as u64,
                format!("file ends inside the {what} ({n} bytes needed)"),
            ));
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, (u64, String)> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, (u64, String)> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decodes a snapshot file; on failure, the byte offset and what is wrong there.
pub fn decode_snapshot(buf: &[u8]) -> std::result::Result<Snapshot, (u64, String)> {
    let mut c = Cursor { buf, at: 0 };
    if c.take(8, "magic")? != SNAPSHOT_MAGIC {
        return Err((0, "not a snapshot file (bad magic)".into()));
    }
    let version = c.u32("version")?;
    if version != SNAPSHOT_VERSION {
        return Err((8, format!("unsupported snapshot version {version}")));
    }
    let meta_len = c.u32("meta length")? as usize;
    let meta_start = c.at;
    c.take(meta_len, "meta section")?;
    let header_end = c.at;
    let header_crc = c.u32("header checksum")?;
    if header_crc != crc32c::crc32c(&buf[..header_end]) {
        return Err((
            header_end as u64,
            "snapshot header checksum mismatch".into(),
        ));
    }
    let mut m = Cursor {
        buf: &buf[..header_end],
        at: meta_start,
    };
    let index = m.u64("index")?;
    let term = m.u64("term")?;
    let mut lists: [Vec<u64>; 3] = Default::default();
    for list in lists.iter_mut() {
        let at = m.at as u64;
        let n = m.u32("node count")? as usize;
        if n > CONF_NODES_MAX {
            return Err((
                at,
                format!("{n} nodes in a configuration (limit {CONF_NODES_MAX})"),
            ));
        }
        for _ in 0..n {
            list.push(m.u64("node id")?);
        }
    }
    let data_len = m.u64("data length")?;
    if m.at != header_end {
        return Err((m.at as u64, "meta section longer than its content".into()));
    }
    let data_start = c.at;
    let remaining = (buf.len() - data_start) as u64;
    if remaining < 4 || data_len > remaining - 4 {
        return Err((
            data_start as u64,
            format!("snapshot data of {data_len} bytes does not fit in the file"),
        ));
    }
    let data = c.take(data_len as usize, "data")?.to_vec();
    let data_crc_at = c.at as u64;
    let data_crc = c.u32("data checksum")?;
    if data_crc != crc32c::crc32c(&data) {
        return Err((data_crc_at, "snapshot data checksum mismatch".into()));
    }
    if c.at != buf.len() {
        return Err((c.at as u64, "trailing bytes after the snapshot".into()));
    }
    let [voters, learners, voters_outgoing] = lists;
    Ok(Snapshot {
        meta: SnapshotMeta {
            index,
            term,
            conf: ConfState {
                voters,
                learners,
                voters_outgoing,
            },
        },
        data,
    })
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Snapshot files in one directory.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    keep: usize,
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".snap")?;
    let (i, t) = stem.split_once('-')?;
    if i.len() != 20 || t.len() != 20 {
        return None;
    }
    Some((i.parse().ok()?, t.parse().ok()?))
}

impl SnapshotStore {
    /// `keep` is at least 1.
    pub fn new(dir: PathBuf, keep: usize) -> Self {
        SnapshotStore {
            dir,
            keep: keep.max(1),
        }
    }

    fn path(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("{index:020}-{term:020}.snap"))
    }

    /// Creates the directory and removes leftovers of interrupted saves.
    pub fn open<D: Disk>(&self, disk: &mut D) -> Result<()> {
        disk.create_dir_all(&self.dir)
            .map_err(|e| io_err(&self.dir, e))?;
        for name in disk.list_dir(&self.dir).map_err(|e| io_err(&self.dir, e))? {
            if name.ends_with(".tmp") {
                let p = self.dir.join(&name);
                disk.remove(&p).map_err(|e| io_err(&p, e))?;
            }
        }
        Ok(())
    }

    /// (index, term) of every snapshot file, oldest first.
    fn list<D: Disk>(&self, disk: &mut D) -> Result<Vec<(u64, u64)>> {
        let mut v: Vec<(u64, u64)> = disk
            .list_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, e))?
            .iter()
            .filter_map(|n| parse_name(n))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Writes the snapshot durably, then drops all but the newest `keep`.
    pub fn save<D: Disk>(&self, disk: &mut D, snap: &Snapshot) -> Result<()> {
        self.write_file(disk, snap, TMP_EXT)?;
        self.prune(disk)
    }

    /// Writes one snapshot file durably (temporary file `<name>.<tmp_ext>`, fsync, rename,
    /// directory fsync) and leaves older files alone. Writers on different threads use
    /// different `tmp_ext`s so they never share a temporary file.
    pub fn write_file<D: Disk>(&self, disk: &mut D, snap: &Snapshot, tmp_ext: &str) -> Result<()> {
        let path = self.path(snap.meta.index, snap.meta.term);
        let tmp = path.with_extension(tmp_ext);
        let (head, tail) = encode_snapshot_parts(snap);
        // A leftover temp file of the same name would be appended to: clear it first.
        if disk.read(&tmp).is_ok() {
            disk.remove(&tmp).map_err(|e| io_err(&tmp, e))?;
        }
        if disk.is_real() {
            disk.append(&tmp, &head).map_err(|e| io_err(&tmp, e))?;
            for piece in snap.data.chunks(SNAPSHOT_WRITE_CHUNK_BYTES) {
                disk.append(&tmp, piece).map_err(|e| io_err(&tmp, e))?;
                if piece.len() == SNAPSHOT_WRITE_CHUNK_BYTES {
                    disk.sync_file(&tmp).map_err(|e| io_err(&tmp, e))?;
                }
            }
            disk.append(&tmp, &tail).map_err(|e| io_err(&tmp, e))?;
        } else {
            // One write, as simulated disks count operations to place their crashes and
            // the simulator's schedules should not shift with this optimisation.
            disk.append(&tmp, &encode_snapshot(snap))
                .map_err(|e| io_err(&tmp, e))?;
        }
        disk.sync_file(&tmp).map_err(|e| io_err(&tmp, e))?;
        disk.rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        disk.sync_dir(&self.dir).map_err(|e| io_err(&self.dir, e))
    }

    /// Drops all but the newest `keep` snapshot files. A file already gone is fine: a
    /// [`SnapshotWriter`] on another thread may prune at the same time. Never removes
    /// the newest file, which is the one recovery uses.
    pub fn prune<D: Disk>(&self, disk: &mut D) -> Result<()> {
        let all = self.list(disk)?;
        if all.len() > self.keep {
            for &(i, t) in &all[..all.len() - self.keep] {
                let p = self.path(i, t);
                match disk.remove(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&p, e)),
                }
            }
            disk.sync_dir(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        }
        Ok(())
    }

    /// The newest snapshot, if any. A damaged newest snapshot is an error, not a reason
    /// to fall back silently to an older one.
    pub fn load_newest<D: Disk>(&self, disk: &mut D) -> Result<Option<Snapshot>> {
        let Some(&(index, term)) = self.list(disk)?.last() else {
            return Ok(None);
        };
        let path = self.path(index, term);
        let bytes = disk.read(&path).map_err(|e| io_err(&path, e))?;
        let snap = decode_snapshot(&bytes).map_err(|(offset, detail)| StorageError::Corrupt {
            path: path.display().to_string(),
            offset,
            detail,
        })?;
        if (snap.meta.index, snap.meta.term) != (index, term) {
            return Err(StorageError::Corrupt {
                path: path.display().to_string(),
                offset: 0,
                detail: format!(
                    "file name says index {index} term {term}, content says {} {}",
                    snap.meta.index, snap.meta.term
                ),
            });
        }
        Ok(Some(snap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::SimDisk;

    fn snap(index: u64) -> Snapshot {
        Snapshot {
            meta: SnapshotMeta {
                index,
                term: 2,
                conf: ConfState::new([1, 2, 3]),
            },
            data: vec![index as u8; 100],
        }
    }

    #[test]
    fn round_trip_and_every_flip_detected() {
        let s = snap(9);
        let bytes = encode_snapshot(&s);
        assert_eq!(decode_snapshot(&bytes).unwrap(), s);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode_snapshot(&b).is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(decode_snapshot(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn keeps_newest_n_and_reports_corruption() {
        let mut d = SimDisk::new();
        let st = SnapshotStore::new(PathBuf::from("/n/snap"), 2);
        st.open(&mut d).unwrap();
        for i in 1..=4 {
            st.save(&mut d, &snap(i)).unwrap();
        }
        assert_eq!(st.list(&mut d).unwrap(), vec![(3, 2), (4, 2)]);
        assert_eq!(st.load_newest(&mut d).unwrap().unwrap(), snap(4));
        let p = st.path(4, 2);
        d.flip_byte(&p, 60, 1).unwrap();
        match st.load_newest(&mut d) {
            Err(StorageError::Corrupt { path, .. }) => assert!(path.ends_with(".snap")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
