//! WAL append throughput and latency with fsync, next to the raw limit of the same disk.
//!
//! ```text
//! cargo run --release -p concord-storage --example wal_bench -- --dir /tmp/walbench
//!     [--cell-ms 4000] [--cell-batches 20000] [--cell-mib 2048] [--no-fsync]
//!     [--records 128,1024,16384] [--batches 1,8,64,256,1024] [--rounds 1]
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
//! shown too. Both files start empty
//! and grow by appending: neither is preallocated.
//!
//! Throughput counts entry data bytes only (the WAL's framing is its overhead) over the
//! time spent in that side's operations; "on-disk" is what the WAL's files actually grew
//! by, over the same time. Each cell stops at whichever comes first: `--cell-ms` (both
//! sides together), `--cell-batches` per side, `--cell-mib` written by both together.

use concord_consensus::{Entry, EntryKind};
use concord_storage::wal::{FsyncPolicy, Wal, WalOptions};
use concord_storage::LogStore;
use hdrhistogram::Histogram;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RECORD_SIZES: [usize; 3] = [128, 1024, 16 << 10];
const BATCH_SIZES: [usize; 5] = [1, 8, 64, 256, 1024];

struct Limits {
    /// `--no-fsync`: both sides skip fsync, to show the WAL's CPU cost alone.
    no_fsync: bool,
    cell: Duration,
    batches: u64,
    bytes: u64,
    /// `--zero-copy-min`: overrides `ZERO_COPY_MIN_BYTES`, to compare the two write paths.
    zero_copy_min: Option<usize>,
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

/// Total size of the files in `dir`.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}

/// Runs one cell: raw batches and WAL batches alternate (in alternating order), so both
/// see the same disk conditions on a shared, noisy machine. Returns (raw, WAL, bytes the
/// WAL's segment files grew by).
fn cell(
    dir: &Path,
    size: usize,
    batch: usize,
    l: &Limits,
) -> Result<(Cell, Cell, u64), Box<dyn std::error::Error>> {
    let raw_path = dir.join(format!("raw-{size}-{batch}"));
    let _ = fs::remove_file(&raw_path);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&raw_path)?;
    let buf = vec![0xA5u8; size * batch];

    let wal_dir = dir.join(format!("wal-{size}-{batch}"));
    let _ = fs::remove_dir_all(&wal_dir);
    let mut w = Wal::open(
        &wal_dir,
        WalOptions {
            fsync: if l.no_fsync {
                FsyncPolicy::None
            } else {
                FsyncPolicy::EveryBatch
            },
            ..WalOptions::default()
        },
    )?;
    if let Some(n) = l.zero_copy_min {
        w.set_zero_copy_min_for_tests(n);
    }
    let mut entries: Vec<Entry> = (0..batch)
        .map(|_| Entry {
            index: 0,
            term: 1,
            kind: EntryKind::Normal,
            data: vec![0xA5u8; size],
        })
        .collect();
    let mut next = 1u64;

    // One untimed batch per side first: the WAL's buffer grows to the batch size once
    // (a node keeps it for its lifetime), and both files get their first blocks.
    f.write_all(&buf)?;
    f.sync_data()?;
    for e in entries.iter_mut() {
        e.index = next;
        next += 1;
    }
    w.append(&entries)?;
    w.sync()?;
    let raw_bytes_at_start = buf.len() as u64;
    let wal_bytes_at_start = dir_bytes(&wal_dir.join("wal"))?;

    let (mut raw, mut wal) = (Cell::new(), Cell::new());
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < l.cell && n < l.batches && raw.bytes + wal.bytes < l.bytes {
        for side in [n % 2, (n + 1) % 2] {
            if side == 0 {
                let t = Instant::now();
                f.write_all(&buf)?;
                if !l.no_fsync {
                    f.sync_data()?;
                }
                raw.record(t.elapsed(), buf.len() as u64);
            } else {
                for e in entries.iter_mut() {
                    e.index = next;
                    next += 1;
                }
                let t = Instant::now();
                w.append(&entries)?;
                let durable = w.sync()?;
                wal.record(t.elapsed(), (size * batch) as u64);
                assert_eq!(durable, next - 1);
            }
        }
        n += 1;
    }
    debug_assert_eq!(
        fs::metadata(&raw_path)?.len(),
        raw_bytes_at_start + raw.bytes
    );
    drop(f);
    drop(w);
    let wal_bytes = dir_bytes(&wal_dir.join("wal"))? - wal_bytes_at_start;
    fs::remove_file(&raw_path)?;
    fs::remove_dir_all(&wal_dir)?;
    Ok((raw, wal, wal_bytes))
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
            "usage: wal_bench --dir DIR [--cell-ms 4000] [--cell-batches 20000] [--cell-mib 2048] [--no-fsync] [--records 128,1024,16384] [--batches 1,8,64,256,1024] [--rounds 1]"
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
    // Per cell: raw, WAL, WAL on-disk bytes, and the WAL/raw ratio of each round.
    let mut cells: Vec<(usize, usize, Cell, Cell, u64, Vec<f64>)> = Vec::new();
    for &size in &sizes {
        for &batch in &batches {
            cells.push((size, batch, Cell::new(), Cell::new(), 0, Vec::new()));
        }
    }
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (size, batch, raw, wal, disk, ratios) in cells.iter_mut() {
            let (r, w, d) = cell(&dir, *size, *batch, &per_round)?;
            ratios.push(100.0 * w.mb_s() / r.mb_s());
            raw.add(&r);
            wal.add(&w);
            *disk += d;
        }
    }
    println!(
        "| record | batch | WAL MB/s | WAL p50 ms | WAL p99 ms | raw MB/s | raw p50 ms | raw p99 ms | WAL % of raw | per round min–max | WAL on-disk MB/s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (size, batch, r, w, wal_disk_bytes, ratios) in &cells {
        let size_label = if *size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "| {size_label} | {batch} | {:.1} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.0}% | {lo:.0}–{hi:.0}% | {:.1} |",
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
