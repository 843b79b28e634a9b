//! WAL append throughput and latency with fsync, next to the raw limit of the same disk.
//!
//! ```text
//! cargo run --release -p concord-storage --example wal_bench -- --dir /tmp/walbench
//!     [--cell-ms 4000] [--cell-batches 20000] [--cell-mib 2048] [--no-fsync]
//!     [--records 128,1024,16384] [--batches 1,8,64,256,1024] [--rounds 1] [--overwrite-ref]
//!     [--scan-cost] [--fresh] [--no-prealloc] [--vs-no-prealloc]
//! ```
//!
//! For each record size (128 B, 1 KiB, 16 KiB) and batch size (1, 8, 64, 256, 1024):
//! - raw: `write` of one buffer of size x batch bytes to a file opened with `O_APPEND`,
//!   then `fdatasync`: the plain loop an application without a WAL format would run;
//! - wal: `append` of `batch` entries of `size` bytes of data, then `sync`.
//!
//! The two alternate batch by batch (raw first on even iterations, WAL first on odd ones)
//! so that both meet the same disk weather on a shared machine. With `--rounds R` the
//! whole table is run R times with 1/R of the limits each, and the rounds are added up
//! (a burst of load elsewhere then spreads over all cells); the per-round ratios are
//! shown too.
//!
//! The raw file starts empty in every cell and grows by appending. The WAL runs as a
//! node's does in steady state: one WAL for the whole run (default 64 MiB segments),
//! first filled with three segments and compacted (untimed), so that its active segment
//! is a recycled file and a spare waits for the next roll; then, whenever a segment has
//! rolled, a snapshot at the
//! last index compacts behind it (untimed, as a node snapshots on its own schedule, not
//! in the write path), freeing the closed segment as the next spare. So the WAL's
//! segments are recycled files and most of its syncs overwrite blocks already allocated,
//! while every raw sync appends. The roll itself (closing the old segment, taking the
//! spare) is timed, inside the batch that triggers it.
//!
//! Throughput counts entry data bytes only (the WAL's framing is its overhead) over the
//! time spent in that side's operations; "on-disk" is what the WAL handed to the disk
//! (records, markers, padding), over the same time. Each cell stops at whichever comes
//! first: `--cell-ms` (both sides together), `--cell-batches` per side, `--cell-mib`
//! written by both together.
//!
//! `--overwrite-ref` adds a third loop to every cell: the same `write` + `fdatasync`, but
//! positional, over a 64 MiB file written once before (wrapping around), i.e. the disk's
//! limit for overwrites, which is what the recycled WAL mostly does.
//!
//! `--fresh` runs the WAL as a fresh node's (or one whose compaction lags behind): it
//! keeps no spare files, so every segment starts in a new file, which the WAL zero-fills
//! ahead of its writes (`PREALLOC_CHUNK_BYTES` at a time) unless `--no-prealloc`.
//! `--vs-no-prealloc` adds a third loop to every cell: a second WAL, in the same mode,
//! with preallocation off (`prealloc_chunk_bytes: 0`, new segments append as before
//! preallocation), interleaved batch by batch like the other two; the table then shows
//! the WAL's MB/s as a percentage of it. Not together with `--overwrite-ref`.
//!
//! `--scan-cost` instead measures what recovery pays for a recycled newest segment: the
//! scan for a sync marker of the current seq over 64 MiB of stale records, and a whole
//! reopen of a WAL whose newest segment is a recycled 64 MiB file.

use concord_consensus::{ConfState, Entry, EntryKind, Snapshot, SnapshotMeta};
use concord_storage::record::{self, Record};
use concord_storage::wal::{FsyncPolicy, Wal, WalOptions};
use concord_storage::LogStore;
use hdrhistogram::Histogram;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RECORD_SIZES: [usize; 3] = [128, 1024, 16 << 10];
const BATCH_SIZES: [usize; 5] = [1, 8, 64, 256, 1024];

/// How the WAL side runs (`--fresh`, `--no-prealloc`).
#[derive(Clone, Copy)]
struct Mode {
    no_fsync: bool,
    /// No spare files: every segment is a new file.
    fresh: bool,
    prealloc: bool,
}

struct Limits {
    /// `--no-fsync`: both sides skip fsync, to show the WAL's CPU cost alone.
    no_fsync: bool,
    cell: Duration,
    batches: u64,
    bytes: u64,
    /// `--zero-copy-min`: overrides `ZERO_COPY_MIN_BYTES`, to compare the two write paths.
    zero_copy_min: Option<usize>,
}

/// Size of the `--overwrite-ref` file: written once, then overwritten round and round.
const OVERWRITE_FILE_BYTES: u64 = 64 << 20;

/// `--overwrite-ref`: a third loop, `pwrite` of the same buffer over a file whose blocks
/// were all written before (wrapping around), then `fdatasync`: the limit of the disk for
/// overwrites, which is what the recycled WAL does; shown for candour next to `raw`.
struct Overwrite {
    file: fs::File,
    at: u64,
}

impl Overwrite {
    fn create(path: &Path) -> std::io::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        let chunk = vec![0x5Au8; 1 << 20];
        for _ in 0..OVERWRITE_FILE_BYTES >> 20 {
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        Ok(Overwrite { file, at: 0 })
    }

    fn write(&mut self, buf: &[u8], sync: bool) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.at + buf.len() as u64 > OVERWRITE_FILE_BYTES {
            self.at = 0;
        }
        self.file.write_all_at(buf, self.at)?;
        self.at += buf.len() as u64;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

struct Cell {
    bytes: u64,
    /// Sum of the timed operations only (the two sides of a cell alternate).
    busy: Duration,
    hist: Histogram<u64>,
}

impl Cell {
    fn new() -> Self {
        Cell {
            bytes: 0,
            busy: Duration::ZERO,
            // Microseconds, up to 60 s, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        }
    }
    fn record(&mut self, t: Duration, bytes: u64) {
        self.busy += t;
        self.bytes += bytes;
        self.hist.saturating_record(t.as_micros() as u64);
    }
    fn add(&mut self, other: &Cell) {
        self.busy += other.busy;
        self.bytes += other.bytes;
        self.hist.add(&other.hist).expect("same histogram bounds");
    }
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.busy.as_secs_f64().max(1e-9) / 1e6
    }
    fn p(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// The WAL side: one WAL for the whole run, as a node keeps one.
struct Node {
    wal: Wal,
    /// Next entry index.
    next: u64,
}

impl Node {
    /// Opens a fresh WAL under `dir` and brings it to steady state (untimed): segments
    /// written and compacted until the active one is a recycled file and a spare waits
    /// for the next roll (compaction after every roll frees one file per roll). With
    /// `mode.fresh` it keeps no spares and starts right away: every segment is a new file.
    fn steady(dir: &Path, mode: Mode) -> Result<Self, Box<dyn std::error::Error>> {
        let _ = fs::remove_dir_all(dir);
        let mut wal = Wal::open(
            dir,
            WalOptions {
                fsync: if mode.no_fsync {
                    FsyncPolicy::None
                } else {
                    FsyncPolicy::EveryBatch
                },
                prealloc_chunk_bytes: if mode.prealloc {
                    concord_storage::wal::PREALLOC_CHUNK_BYTES
                } else {
                    0
                },
                ..WalOptions::default()
            },
        )?;
        if mode.fresh {
            wal.set_spare_segments_max_for_tests(0);
            return Ok(Node { wal, next: 1 });
        }
        let mut node = Node { wal, next: 1 };
        let mut warm: Vec<Entry> = (0..1024).map(|_| entry(1024)).collect();
        while node.wal.segments_recycled() == 0 || node.wal.spare_count() == 0 {
            node.batch(&mut warm)?;
        }
        Ok(node)
    }

    /// One timed `append` + `sync` of `entries` (their indices are set here), then the
    /// untimed compaction a node would do after a snapshot once a segment has rolled.
    fn batch(&mut self, entries: &mut [Entry]) -> Result<Duration, Box<dyn std::error::Error>> {
        for e in entries.iter_mut() {
            e.index = self.next;
            self.next += 1;
        }
        let t = Instant::now();
        self.wal.append(entries)?;
        let durable = self.wal.sync()?;
        let took = t.elapsed();
        assert_eq!(durable, self.next - 1);
        if self.wal.segment_count() > 1 {
            self.wal.install_snapshot(&Snapshot {
                meta: SnapshotMeta {
                    index: durable,
                    term: 1,
                    conf: ConfState::new([1]),
                },
                data: vec![0; 64],
            })?;
        }
        Ok(took)
    }
}

fn entry(size: usize) -> Entry {
    Entry {
        index: 0,
        term: 1,
        kind: EntryKind::Normal,
        data: vec![0xA5u8; size],
    }
}

/// Runs one cell: raw batches and WAL batches alternate (in alternating order), so both
/// see the same disk conditions on a shared, noisy machine. Returns (raw, WAL, bytes the
/// WAL handed to the disk).
fn cell(
    dir: &Path,
    node: &mut Node,
    size: usize,
    batch: usize,
    l: &Limits,
    mut overwrite: Option<&mut Overwrite>,
    mut other: Option<&mut Node>,
) -> Result<(Cell, Cell, u64, Cell), Box<dyn std::error::Error>> {
    let raw_path = dir.join(format!("raw-{size}-{batch}"));
    let _ = fs::remove_file(&raw_path);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&raw_path)?;
    let buf = vec![0xA5u8; size * batch];

    if let Some(n) = l.zero_copy_min {
        node.wal.set_zero_copy_min_for_tests(n);
    }
    let mut entries: Vec<Entry> = (0..batch).map(|_| entry(size)).collect();

    // One untimed batch per side first: the WAL's buffer grows to the batch size once
    // (a node keeps it for its lifetime), and the raw file gets its first blocks.
    f.write_all(&buf)?;
    f.sync_data()?;
    node.batch(&mut entries)?;
    if let Some(o) = other.as_deref_mut() {
        o.batch(&mut entries)?;
    }
    let raw_bytes_at_start = buf.len() as u64;
    let wal_bytes_at_start = node.wal.bytes_written();

    let (mut raw, mut wal, mut ovw) = (Cell::new(), Cell::new(), Cell::new());
    if let Some(o) = overwrite.as_deref_mut() {
        o.write(&buf, !l.no_fsync)?;
    }
    let sides = if overwrite.is_some() || other.is_some() {
        3
    } else {
        2
    };
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < l.cell && n < l.batches && raw.bytes + wal.bytes < l.bytes {
        for k in 0..sides {
            let side = (n + k) % sides;
            if side == 2 {
                if let Some(o) = other.as_deref_mut() {
                    let t = o.batch(&mut entries)?;
                    ovw.record(t, (size * batch) as u64);
                    continue;
                }
                let o = overwrite.as_deref_mut().expect("three sides only with it");
                let t = Instant::now();
                o.write(&buf, !l.no_fsync)?;
                ovw.record(t.elapsed(), buf.len() as u64);
            } else if side == 0 {
                let t = Instant::now();
                f.write_all(&buf)?;
                if !l.no_fsync {
                    f.sync_data()?;
                }
                raw.record(t.elapsed(), buf.len() as u64);
            } else {
                let t = node.batch(&mut entries)?;
                wal.record(t, (size * batch) as u64);
            }
        }
        n += 1;
    }
    debug_assert_eq!(
        fs::metadata(&raw_path)?.len(),
        raw_bytes_at_start + raw.bytes
    );
    drop(f);
    let wal_bytes = node.wal.bytes_written() - wal_bytes_at_start;
    fs::remove_file(&raw_path)?;
    Ok((raw, wal, wal_bytes, ovw))
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = arg(&args, "--dir").map(PathBuf::from) else {
        eprintln!(
            "usage: wal_bench --dir DIR [--cell-ms 4000] [--cell-batches 20000] [--cell-mib 2048] [--no-fsync] [--records 128,1024,16384] [--batches 1,8,64,256,1024] [--rounds 1] [--overwrite-ref] [--scan-cost] [--fresh] [--no-prealloc] [--vs-no-prealloc]"
        );
        std::process::exit(2);
    };
    let num = |name: &str, default: u64| -> Result<u64, String> {
        arg(&args, name).map_or(Ok(default), |v| {
            v.parse().map_err(|_| format!("{name}: not a number: {v}"))
        })
    };
    let limits = Limits {
        no_fsync: args.iter().any(|a| a == "--no-fsync"),
        cell: Duration::from_millis(num("--cell-ms", 4000)?),
        batches: num("--cell-batches", 20000)?,
        bytes: num("--cell-mib", 2048)? << 20,
        zero_copy_min: arg(&args, "--zero-copy-min")
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--zero-copy-min: not a number: {v}"))
            })
            .transpose()?,
    };
    fs::create_dir_all(&dir)?;
    if args.iter().any(|a| a == "--scan-cost") {
        return scan_cost(&dir);
    }
    let flag = |name: &str| args.iter().any(|a| a == name);
    let mode = Mode {
        no_fsync: limits.no_fsync,
        fresh: flag("--fresh"),
        prealloc: !flag("--no-prealloc"),
    };
    let vs_no_prealloc = flag("--vs-no-prealloc");
    if vs_no_prealloc && flag("--overwrite-ref") {
        return Err("--vs-no-prealloc and --overwrite-ref share the third column: pick one".into());
    }
    let list = |name: &str, all: &[usize]| -> Result<Vec<usize>, String> {
        arg(&args, name).map_or(Ok(all.to_vec()), |v| {
            v.split(',')
                .map(|x| x.parse().map_err(|_| format!("{name}: not a number: {x}")))
                .collect()
        })
    };
    let sizes = list("--records", &RECORD_SIZES)?;
    let batches = list("--batches", &BATCH_SIZES)?;
    let rounds = num("--rounds", 1)?.max(1);
    let per_round = Limits {
        no_fsync: limits.no_fsync,
        cell: limits.cell / rounds as u32,
        batches: limits.batches.div_ceil(rounds),
        bytes: limits.bytes.div_ceil(rounds),
        zero_copy_min: limits.zero_copy_min,
    };
    // Per cell: raw, WAL, WAL on-disk bytes, the WAL/raw ratio of each round, overwrite.
    type Row = (usize, usize, Cell, Cell, u64, Vec<f64>, Cell);
    let mut cells: Vec<Row> = Vec::new();
    for &size in &sizes {
        for &batch in &batches {
            cells.push((
                size,
                batch,
                Cell::new(),
                Cell::new(),
                0,
                Vec::new(),
                Cell::new(),
            ));
        }
    }
    let overwrite_path = dir.join("overwrite-ref");
    let mut overwrite = if args.iter().any(|a| a == "--overwrite-ref") {
        Some(Overwrite::create(&overwrite_path)?)
    } else {
        None
    };
    let mut node = Node::steady(&dir.join("wal"), mode)?;
    let mut other = if vs_no_prealloc {
        Some(Node::steady(
            &dir.join("wal-no-prealloc"),
            Mode {
                prealloc: false,
                ..mode
            },
        )?)
    } else {
        None
    };
    let recycled_at_start = node.wal.segments_recycled();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (size, batch, raw, wal, disk, ratios, ovw) in cells.iter_mut() {
            let (r, w, d, o) = cell(
                &dir,
                &mut node,
                *size,
                *batch,
                &per_round,
                overwrite.as_mut(),
                other.as_mut(),
            )?;
            ratios.push(100.0 * w.mb_s() / r.mb_s());
            raw.add(&r);
            wal.add(&w);
            ovw.add(&o);
            *disk += d;
        }
    }
    eprintln!(
        "WAL segments started in a recycled file during the cells: {} (spares now {}); \
         zeros written ahead: {:.1} MiB ({:.1}% of what the WAL wrote); fresh {}, prealloc {}",
        node.wal.segments_recycled() - recycled_at_start,
        node.wal.spare_count(),
        node.wal.prealloc_bytes() as f64 / (1 << 20) as f64,
        100.0 * node.wal.prealloc_bytes() as f64 / node.wal.bytes_written().max(1) as f64,
        mode.fresh,
        mode.prealloc
    );
    drop(node);
    let _ = fs::remove_dir_all(dir.join("wal"));
    if other.take().is_some() {
        let _ = fs::remove_dir_all(dir.join("wal-no-prealloc"));
    }
    let with_overwrite = overwrite.is_some() || vs_no_prealloc;
    if overwrite.is_some() {
        drop(overwrite);
        fs::remove_file(&overwrite_path)?;
    }
    let (extra_head, extra_rule) = if vs_no_prealloc {
        (
            " no-prealloc MB/s | no-prealloc p50 ms | no-prealloc p99 ms | WAL % of no-prealloc |",
            "---:|---:|---:|---:|",
        )
    } else if with_overwrite {
        (
            " overwrite MB/s | overwrite p50 ms | WAL % of overwrite |",
            "---:|---:|---:|",
        )
    } else {
        ("", "")
    };
    println!(
        "| record | batch | WAL MB/s | WAL p50 ms | WAL p99 ms | raw MB/s | raw p50 ms | raw p99 ms | WAL % of raw | per round min–max | WAL on-disk MB/s |{extra_head}"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{extra_rule}");
    for (size, batch, r, w, wal_disk_bytes, ratios, o) in &cells {
        let size_label = if *size >= 1024 && size % 1024 == 0 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        let extra = if vs_no_prealloc {
            format!(
                " {:.1} | {:.3} | {:.3} | {:.0}% |",
                o.mb_s(),
                o.p(0.5),
                o.p(0.99),
                100.0 * w.mb_s() / o.mb_s()
            )
        } else if with_overwrite {
            format!(
                " {:.1} | {:.3} | {:.0}% |",
                o.mb_s(),
                o.p(0.5),
                100.0 * w.mb_s() / o.mb_s()
            )
        } else {
            String::new()
        };
        println!(
            "| {size_label} | {batch} | {:.1} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.0}% | {lo:.0}–{hi:.0}% | {:.1} |{extra}",
            w.mb_s(),
            w.p(0.5),
            w.p(0.99),
            r.mb_s(),
            r.p(0.5),
            r.p(0.99),
            100.0 * w.mb_s() / r.mb_s(),
            *wal_disk_bytes as f64 / w.busy.as_secs_f64().max(1e-9) / 1e6
        );
    }
    Ok(())
}

/// What recovery pays for a recycled newest segment (`--scan-cost`).
fn scan_cost(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // 64 MiB of records of segment 1, as a spare holds them, read under segment 2's salt.
    let (old, new) = (record::segment_salt(1), record::segment_salt(2));
    let mut buf = Vec::with_capacity(65 << 20);
    let mut index = 1;
    while buf.len() < 64 << 20 {
        let ents: Vec<Entry> = (0..256)
            .map(|i| Entry {
                index: index + i,
                ..entry(1024)
            })
            .collect();
        index += 256;
        record::encode(&mut buf, &Record::Entries(ents), old);
        let offset = buf.len() as u64;
        let mark = Record::SyncMark {
            offset,
            stretch_start: 0,
            stretch_crc: 0,
            recycled: true,
            padding: 0,
        };
        record::encode(&mut buf, &mark, old);
    }
    for _ in 0..3 {
        let t = Instant::now();
        let found = record::find_sync_mark(&buf, 1, new).is_some();
        let took = t.elapsed();
        assert!(!found);
        println!(
            "scan of {:.1} MiB of stale records for a current-seq sync marker: {:.1} ms",
            buf.len() as f64 / (1 << 20) as f64,
            took.as_secs_f64() * 1e3
        );
    }
    // A zero-filled tail (what preallocation leaves after the records): skipped in one
    // pass for the non-zero end instead of position by position.
    let zeros = vec![0u8; 64 << 20];
    for _ in 0..3 {
        let t = Instant::now();
        let found = record::find_sync_mark(&zeros, 1, new).is_some();
        let took = t.elapsed();
        assert!(!found);
        println!(
            "scan of 64 MiB of zeros for a sync marker: {:.2} ms",
            took.as_secs_f64() * 1e3
        );
    }
    drop(zeros);
    // A whole reopen of a fresh WAL (no spares) whose only segment is preallocated:
    // 3 MiB of records in 3 KB syncs, then zeros up to 1 MiB ahead.
    let fresh_dir = dir.join("scan-fresh");
    let mut node = Node::steady(
        &fresh_dir,
        Mode {
            no_fsync: false,
            fresh: true,
            prealloc: true,
        },
    )?;
    let mut small: Vec<Entry> = (0..3).map(|_| entry(1000)).collect();
    while node.wal.active_segment_bytes().0 < 3 << 20 {
        node.batch(&mut small)?;
    }
    let (records, file) = node.wal.active_segment_bytes();
    drop(node);
    for k in 0..2 {
        let t = Instant::now();
        let w = Wal::open(&fresh_dir, WalOptions::default())?;
        println!(
            "reopen {} with a preallocated newest segment ({:.2} MiB of records, file {:.2} MiB): {:.1} ms",
            k + 1,
            records as f64 / (1 << 20) as f64,
            file as f64 / (1 << 20) as f64,
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(
            w.active_segment_bytes(),
            (records, file),
            "the zero tail stays"
        );
    }
    fs::remove_dir_all(&fresh_dir)?;
    // A whole reopen: the newest segment is a recycled 64 MiB file with one batch in it.
    let wal_dir = dir.join("scan-wal");
    let mode = Mode {
        no_fsync: false,
        fresh: false,
        prealloc: true,
    };
    let mut node = Node::steady(&wal_dir, mode)?;
    let before = node.wal.segments_recycled();
    let mut big: Vec<Entry> = (0..1024).map(|_| entry(1024)).collect();
    while node.wal.segments_recycled() == before {
        node.batch(&mut big)?;
    }
    let mut small: Vec<Entry> = (0..64).map(|_| entry(128)).collect();
    node.batch(&mut small)?;
    drop(node);
    let t = Instant::now();
    let w = Wal::open(&wal_dir, WalOptions::default())?;
    println!(
        "reopen with a recycled newest segment (stale tail of ~63 MiB scanned and cut): {:.1} ms (segments {}, spares {})",
        t.elapsed().as_secs_f64() * 1e3,
        w.segment_count(),
        w.spare_count()
    );
    drop(w);
    let t = Instant::now();
    let w = Wal::open(&wal_dir, WalOptions::default())?;
    println!(
        "reopen again (no stale tail left): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(w);
    fs::remove_dir_all(&wal_dir)?;
    Ok(())
}
