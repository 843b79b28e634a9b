//! The narrow file-IO boundary under the WAL and the snapshot store.
//!
//! [`StdDisk`] is the real file system. [`SimDisk`] is an in-memory disk that, like a real
//! one, keeps what was written apart from what is durable: file contents become durable
//! on `sync_file`, and names (creations, renames, removals) on `sync_dir`. A simulated
//! crash keeps only the durable state (optionally plus a prefix, in write order, of each
//! file's unsynced writes, a torn write): unsynced bytes that overwrote older ones revert
//! to the older bytes. `FaultyStore` and the crash tests run the real WAL code on it.
//!
//! Paths are plain; a directory is just a path prefix for `SimDisk`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub trait Disk {
    fn create_dir_all(&mut self, dir: &Path) -> io::Result<()>;
    /// Names (not paths) of the files directly in `dir`, in any order.
    fn list_dir(&mut self, dir: &Path) -> io::Result<Vec<String>>;
    fn read(&mut self, path: &Path) -> io::Result<Vec<u8>>;
    /// The file's length as a process sees it now (written bytes included).
    fn len(&mut self, path: &Path) -> io::Result<u64>;
    /// Appends to the file, creating it if missing. Written, not durable.
    fn append(&mut self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Appends the concatenation of `parts` as one operation (`writev` on a real disk).
    fn append_parts(&mut self, path: &Path, parts: &[&[u8]]) -> io::Result<()>;
    /// Writes `data` at byte `offset` of the file, creating it if missing, overwriting
    /// what is there and extending it if need be. `offset` must not lie beyond the end of
    /// the file (no holes). Written, not durable: until `sync_file`, a crash may leave
    /// the overwritten bytes as they were before.
    fn write_at(&mut self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()>;
    /// `write_at` of the concatenation of `parts`, as one operation (`writev`).
    fn write_parts_at(&mut self, path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()>;
    /// Makes the file's contents durable (`fdatasync`). Its name needs `sync_dir`.
    fn sync_file(&mut self, path: &Path) -> io::Result<()>;
    /// Cuts the file to `len` bytes and makes that durable.
    fn truncate(&mut self, path: &Path, len: u64) -> io::Result<()>;
    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&mut self, path: &Path) -> io::Result<()>;
    /// Makes the directory's names durable (creations, renames, removals).
    fn sync_dir(&mut self, dir: &Path) -> io::Result<()>;
    /// Whether this is the real file system, which another thread can reach through a
    /// `StdDisk` of its own (what a [`crate::SnapshotWriter`] needs). Simulated disks
    /// live inside their owner and answer false.
    fn is_real(&self) -> bool {
        false
    }
}

/// Open handles kept by [`StdDisk`]; beyond this all are closed (the WAL writes to one
/// segment at a time, so this is rarely reached).
const OPEN_FILES_MAX: usize = 8;

/// Buffers per `writev` call: Linux's `IOV_MAX`; longer lists take several calls.
const WRITEV_BUFFERS_MAX: usize = 1024;

/// The real file system. Keeps written-to files open so a hot write is one `write` (plus
/// an `lseek`). Files are opened without `O_APPEND`, under which Linux would ignore the
/// offset of a positional write.
#[derive(Default)]
pub struct StdDisk {
    open: HashMap<PathBuf, File>,
}

impl StdDisk {
    pub fn new() -> Self {
        Self::default()
    }

    fn handle(&mut self, path: &Path) -> io::Result<&mut File> {
        if !self.open.contains_key(path) {
            if self.open.len() >= OPEN_FILES_MAX {
                self.open.clear();
            }
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(path)?;
            self.open.insert(path.to_path_buf(), f);
        }
        Ok(self.open.get_mut(path).expect("inserted above"))
    }
}

/// Writes the concatenation of `parts` at the file's position, in as few `writev` calls
/// as `WRITEV_BUFFERS_MAX` allows.
fn write_parts(f: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = rest.len().min(WRITEV_BUFFERS_MAX);
        match f.write_vectored(&rest[..n]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "writev wrote nothing",
                ))
            }
            Ok(k) => IoSlice::advance_slices(&mut rest, k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Disk for StdDisk {
    fn is_real(&self) -> bool {
        true
    }

    fn create_dir_all(&mut self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list_dir(&mut self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_file() {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    fn read(&mut self, path: &Path) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        File::open(path)?.read_to_end(&mut v)?;
        Ok(v)
    }

    fn len(&mut self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }

    fn append(&mut self, path: &Path, data: &[u8]) -> io::Result<()> {
        let f = self.handle(path)?;
        f.seek(SeekFrom::End(0))?;
        f.write_all(data)
    }

    fn append_parts(&mut self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        let f = self.handle(path)?;
        f.seek(SeekFrom::End(0))?;
        write_parts(f, parts)
    }

    fn write_at(&mut self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        let f = self.handle(path)?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(data)
    }

    fn write_parts_at(&mut self, path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let f = self.handle(path)?;
        f.seek(SeekFrom::Start(offset))?;
        write_parts(f, parts)
    }

    fn sync_file(&mut self, path: &Path) -> io::Result<()> {
        self.handle(path)?.sync_data()
    }

    fn truncate(&mut self, path: &Path, len: u64) -> io::Result<()> {
        let f = self.handle(path)?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        self.open.remove(from);
        self.open.remove(to);
        std::fs::rename(from, to)
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        self.open.remove(path);
        std::fs::remove_file(path)
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[derive(Clone, Debug, Default)]
struct Inode {
    /// The contents as a process reads them now: `durable` with `pending` applied.
    data: Vec<u8>,
    /// The contents a crash keeps (apart from a torn prefix of `pending`).
    durable: Vec<u8>,
    /// Writes since the last `sync_file`, in order: (offset, bytes).
    pending: Vec<(usize, Vec<u8>)>,
}

/// Puts `bytes` at `offset` of `v`, extending it if need be (`offset <= v.len()`).
fn put_at(v: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    assert!(
        offset <= v.len(),
        "write at {offset} beyond the end {}",
        v.len()
    );
    let overlap = bytes.len().min(v.len() - offset);
    v[offset..offset + overlap].copy_from_slice(&bytes[..overlap]);
    v.extend_from_slice(&bytes[overlap..]);
}

impl Inode {
    /// What `sync_file` does: every pending write becomes durable.
    fn make_durable(&mut self) {
        for (at, bytes) in self.pending.drain(..) {
            put_at(&mut self.durable, at, &bytes);
        }
        debug_assert!(self.durable == self.data);
    }

    fn unsynced_bytes(&self) -> usize {
        self.pending.iter().map(|(_, b)| b.len()).sum()
    }
}

/// An in-memory disk that separates written from durable state (see the module doc).
/// Deterministic: it has no randomness of its own; torn tails are chosen by the caller.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    /// Names as a process sees them now.
    live: BTreeMap<PathBuf, u64>,
    /// Names as they would be found after a crash.
    durable: BTreeMap<PathBuf, u64>,
    /// Mutating operations left before the disk "dies" (every later one fails until
    /// `crash`), to crash in the middle of a multi-step operation.
    ops_left: Option<u64>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `ops` more mutating operations succeed, then fails every one (the process is
    /// dying) until the next `crash`.
    pub fn fail_after(&mut self, ops: u64) {
        self.ops_left = Some(ops);
    }

    fn mutate(&mut self) -> io::Result<()> {
        match &mut self.ops_left {
            Some(0) => Err(io::Error::other("simulated crash: the disk is gone")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Unsynced bytes across all live files.
    pub fn unsynced_bytes(&self) -> u64 {
        self.live
            .values()
            .map(|i| self.inodes[i].unsynced_bytes() as u64)
            .sum()
    }

    /// Loses everything not durable: names revert to the last `sync_dir`, contents to the
    /// last `sync_file`, except that up to `torn_tail_bytes` of each file's unsynced bytes
    /// survive: a prefix of its unsynced writes in write order, as when a crash interrupts
    /// sequential writes. Overwritten bytes outside that prefix keep their old contents.
    pub fn crash(&mut self, torn_tail_bytes: u64) {
        self.ops_left = None;
        for n in self.inodes.values_mut() {
            let mut budget = torn_tail_bytes as usize;
            for (at, bytes) in std::mem::take(&mut n.pending) {
                let keep = budget.min(bytes.len());
                if keep == 0 {
                    break;
                }
                put_at(&mut n.durable, at, &bytes[..keep]);
                budget -= keep;
            }
            // What survived a crash is on the platter now.
            n.data = n.durable.clone();
        }
        self.live = self.durable.clone();
        let used: std::collections::BTreeSet<u64> = self.live.values().copied().collect();
        self.inodes.retain(|i, _| used.contains(i));
    }

    /// Durable contents of every file (by path), for fault injection and tests.
    pub fn durable_files(&self) -> Vec<(PathBuf, &[u8])> {
        self.durable
            .iter()
            .map(|(p, i)| (p.clone(), &self.inodes[i].durable[..]))
            .collect()
    }

    /// Flips bits `mask` of byte `offset` of a file, in both its live and durable contents.
    pub fn flip_byte(&mut self, path: &Path, offset: usize, mask: u8) -> io::Result<()> {
        let i = *self
            .durable
            .get(path)
            .or_else(|| self.live.get(path))
            .ok_or_else(|| not_found(path))?;
        let n = self.inodes.get_mut(&i).expect("named inode exists");
        if offset >= n.data.len().max(n.durable.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset beyond end of file",
            ));
        }
        // The medium is damaged: what is read now and what a crash keeps.
        for v in [&mut n.data, &mut n.durable] {
            if let Some(b) = v.get_mut(offset) {
                *b ^= mask;
            }
        }
        Ok(())
    }

    fn inode(&mut self, path: &Path) -> io::Result<&mut Inode> {
        let i = *self.live.get(path).ok_or_else(|| not_found(path))?;
        Ok(self.inodes.get_mut(&i).expect("named inode exists"))
    }
}

impl Disk for SimDisk {
    fn create_dir_all(&mut self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list_dir(&mut self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn read(&mut self, path: &Path) -> io::Result<Vec<u8>> {
        Ok(self.inode(path)?.data.clone())
    }

    fn len(&mut self, path: &Path) -> io::Result<u64> {
        Ok(self.inode(path)?.data.len() as u64)
    }

    fn append(&mut self, path: &Path, data: &[u8]) -> io::Result<()> {
        let len = self.live.get(path).map_or(0, |i| self.inodes[i].data.len());
        self.write_at(path, len as u64, data)
    }

    fn append_parts(&mut self, path: &Path, parts: &[&[u8]]) -> io::Result<()> {
        // One operation, like one `writev`: `fail_after` counts it once.
        self.append(path, &parts.concat())
    }

    fn write_at(&mut self, path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        self.mutate()?;
        if !self.live.contains_key(path) {
            let i = self.next_inode;
            self.next_inode += 1;
            self.inodes.insert(i, Inode::default());
            self.live.insert(path.to_path_buf(), i);
        }
        let n = self.inode(path)?;
        let at = usize::try_from(offset)
            .ok()
            .filter(|&at| at <= n.data.len())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("write at {offset} beyond the end of {}", path.display()),
                )
            })?;
        put_at(&mut n.data, at, data);
        n.pending.push((at, data.to_vec()));
        Ok(())
    }

    fn write_parts_at(&mut self, path: &Path, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        self.write_at(path, offset, &parts.concat())
    }

    fn sync_file(&mut self, path: &Path) -> io::Result<()> {
        self.mutate()?;
        self.inode(path)?.make_durable();
        Ok(())
    }

    fn truncate(&mut self, path: &Path, len: u64) -> io::Result<()> {
        self.mutate()?;
        // Like `set_len` + `fsync` on a real disk: everything in the file is durable after.
        let n = self.inode(path)?;
        n.make_durable();
        n.data.truncate(len as usize);
        n.durable.truncate(len as usize);
        Ok(())
    }

    fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        self.mutate()?;
        let i = self.live.remove(from).ok_or_else(|| not_found(from))?;
        self.live.insert(to.to_path_buf(), i);
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> io::Result<()> {
        self.mutate()?;
        self.live.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        self.mutate()?;
        self.durable.retain(|p, _| p.parent() != Some(dir));
        for (p, i) in &self.live {
            if p.parent() == Some(dir) {
                self.durable.insert(p.clone(), *i);
            }
        }
        // Inodes no longer named anywhere are gone for good.
        let used: std::collections::BTreeSet<u64> = self
            .live
            .values()
            .chain(self.durable.values())
            .copied()
            .collect();
        self.inodes.retain(|i, _| used.contains(i));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_disk_loses_unsynced_bytes_and_names() {
        let mut d = SimDisk::new();
        let dir = Path::new("/d");
        let a = dir.join("a");
        d.append(&a, b"hello").unwrap();
        d.sync_file(&a).unwrap();
        d.crash(0);
        assert!(d.read(&a).is_err(), "name never synced");

        d.append(&a, b"hello").unwrap();
        d.sync_file(&a).unwrap();
        d.sync_dir(dir).unwrap();
        d.append(&a, b" world").unwrap();
        assert_eq!(d.unsynced_bytes(), 6);
        d.crash(3);
        assert_eq!(d.read(&a).unwrap(), b"hello wo");
        d.append(&a, b"!").unwrap();
        d.crash(0);
        assert_eq!(d.read(&a).unwrap(), b"hello wo");

        let b = dir.join("b");
        d.rename(&a, &b).unwrap();
        d.crash(0);
        assert!(d.read(&a).is_ok() && d.read(&b).is_err());
        d.remove(&a).unwrap();
        d.sync_dir(dir).unwrap();
        d.crash(0);
        assert!(d.list_dir(dir).unwrap().is_empty());
    }

    /// Overwrites: synced ones are durable; unsynced ones revert to the old bytes on a
    /// crash, except a prefix of them in write order (a torn write).
    #[test]
    fn sim_disk_unsynced_overwrites_revert() {
        let mut d = SimDisk::new();
        let dir = Path::new("/d");
        let a = dir.join("a");
        d.append(&a, b"0123456789").unwrap();
        d.sync_file(&a).unwrap();
        d.sync_dir(dir).unwrap();
        d.write_at(&a, 2, b"ab").unwrap();
        d.sync_file(&a).unwrap();
        d.write_at(&a, 6, b"XYZWVU").unwrap();
        d.write_at(&a, 0, b"!").unwrap();
        assert_eq!(d.read(&a).unwrap(), b"!1ab45XYZWVU");
        assert_eq!(d.unsynced_bytes(), 7);
        let mut keep3 = d.clone();
        d.crash(0);
        assert_eq!(d.read(&a).unwrap(), b"01ab456789");
        keep3.crash(3);
        assert_eq!(keep3.read(&a).unwrap(), b"01ab45XYZ9");
        assert!(d.write_at(&a, 11, b"hole").is_err(), "no holes");
        d.write_parts_at(&a, 10, &[b"x", b"yz"]).unwrap();
        d.truncate(&a, 11).unwrap();
        d.crash(0);
        assert_eq!(
            d.read(&a).unwrap(),
            b"01ab456789x",
            "truncate makes it durable"
        );
    }
}
