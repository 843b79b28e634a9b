//! Reference-model test: random operations against `FaultyStore` and `Wal<SimDisk>`, and
//! the same operations against `MemStore` (which has no crashes, so it is the model).
//!
//! The crash contract checked here: let S0 be the model's state at the last point where
//! everything was made durable (`sync` returned, or `install_snapshot` returned), and
//! S1..Sn the states after each *record* written since (a plain append of k entries is k
//! records; an append that overwrites part of the log is one batch, all or nothing; a
//! hard-state change is one). After a crash, with or without a torn tail,
//! recovery must return exactly one of S0..Sn: nothing synced is lost or altered, and
//! of the unsynced writes only a prefix, in write order, may survive. A clean crash on
//! `FaultyStore` (everything buffered was handed to the disk, nothing synced) and a
//! crash of `Wal<SimDisk>` that also loses its user-space buffer are both covered.

use concord_consensus::{
    ConfState, Entry, EntryKind, HardState, Recovered, Snapshot, SnapshotMeta,
};
use concord_storage::disk::SimDisk;
use concord_storage::faulty::FaultyStore;
use concord_storage::mem::MemStore;
use concord_storage::wal::{Wal, WalOptions};
use concord_storage::{LogStore, StorageError};
use proptest::prelude::*;
use std::path::Path;

#[derive(Clone, Debug)]
enum Op {
    /// Append `count` entries starting `back` entries before the end (0 = plain append).
    Append {
        back: u8,
        count: u8,
        new_term: bool,
        data_len: u16,
    },
    HardState {
        term_up: u8,
        vote: u8,
        commit: u8,
    },
    Sync,
    /// Snapshot `back` entries before the end; with `other_term`, a term the log does not
    /// hold there (so the whole log is dropped).
    Snapshot {
        back: u8,
        other_term: bool,
    },
    Compact,
    /// An append that leaves a gap: must be refused and change nothing.
    BadAppend,
    /// `torn` is the number of unsynced bytes that survive (None: a clean crash).
    Crash {
        torn: Option<u16>,
    },
    /// The disk dies after `budget` more mutating operations, in the middle of an append
    /// plus sync (`snapshot` false) or of installing a snapshot; then a crash.
    CrashDuring {
        budget: u8,
        snapshot: bool,
        other_term: bool,
        torn: Option<u16>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..4, 1u8..6, any::<bool>(), 0u16..400).prop_map(|(b, c, n, d)| Op::Append {
            back: if b == 3 { 0 } else { b },
            count: c,
            new_term: n,
            data_len: d,
        }),
        3 => (0u8..2, 0u8..4, 0u8..50).prop_map(|(t, v, c)| Op::HardState { term_up: t, vote: v, commit: c }),
        4 => Just(Op::Sync),
        2 => (0u8..8, any::<bool>()).prop_map(|(b, o)| Op::Snapshot { back: b, other_term: o }),
        1 => Just(Op::Compact),
        1 => Just(Op::BadAppend),
        2 => proptest::option::of(0u16..3000).prop_map(|t| Op::Crash { torn: t }),
        2 => (0u8..14, any::<bool>(), any::<bool>(), proptest::option::of(0u16..3000)).prop_map(
            |(budget, snapshot, other_term, torn)| Op::CrashDuring { budget, snapshot, other_term, torn }
        ),
    ]
}

/// What a recovery shows, compared field by field.
#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

fn view_of(r: &Recovered) -> View {
    View {
        hard_state: r.hard_state,
        snapshot: r.snapshot.clone(),
        entries: r.entries.clone(),
    }
}

fn model_view(m: &mut MemStore) -> View {
    view_of(&m.recover().unwrap())
}

/// A store under test plus how to crash it.
trait Crashable: LogStore {
    fn crash(&mut self, torn: Option<u16>) -> Recovered;
    fn fail_disk_after(&mut self, ops: u64);
    /// Segments started in a reused spare file so far.
    fn recycled(&self) -> u64;
    /// A crash now would hit a new zero-filled segment inside its zero tail.
    fn in_zero_tail(&self) -> bool;
}

impl Crashable for FaultyStore {
    fn recycled(&self) -> u64 {
        self.wal().segments_recycled()
    }

    fn in_zero_tail(&self) -> bool {
        self.wal().crash_would_hit_a_zero_tail_for_tests()
    }

    fn fail_disk_after(&mut self, ops: u64) {
        FaultyStore::fail_disk_after(self, ops);
    }

    fn crash(&mut self, torn: Option<u16>) -> Recovered {
        match torn {
            None => FaultyStore::crash(self),
            Some(n) => self.crash_keeping(n as u64),
        }
        self.recover().expect("recovery after a crash succeeds")
    }
}

impl Crashable for Wal<SimDisk> {
    fn recycled(&self) -> u64 {
        self.segments_recycled()
    }

    fn in_zero_tail(&self) -> bool {
        self.crash_would_hit_a_zero_tail_for_tests()
    }

    fn fail_disk_after(&mut self, ops: u64) {
        self.disk_mut().fail_after(ops);
    }

    fn crash(&mut self, torn: Option<u16>) -> Recovered {
        // The process dies: its user-space buffer is gone, the disk keeps what it keeps.
        self.disk_mut().crash(torn.unwrap_or(0) as u64);
        self.reload().expect("recovery after a crash succeeds")
    }
}

fn entry(index: u64, term: u64, len: usize) -> Entry {
    let mut data = vec![0u8; len];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (index as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    Entry {
        index,
        term,
        kind: if len % 7 == 1 {
            EntryKind::Noop
        } else {
            EntryKind::Normal
        },
        data,
    }
}

fn make_snapshot(model: &MemStore, back: u8, other_term: bool, term: u64) -> Snapshot {
    let current = model.snapshot().map_or(0, |s| s.meta.index);
    let index = model
        .last_index()
        .saturating_sub(back as u64)
        .max(current)
        .max(1);
    let snap_term = match model.term(index) {
        Some(t) if !other_term => t,
        _ => term + 100,
    };
    Snapshot {
        meta: SnapshotMeta {
            index,
            term: snap_term,
            conf: ConfState::new([1, 2, 3]),
        },
        data: format!("state at {index}").into_bytes(),
    }
}

/// Applies an append to the model and adds the states a crash may leave: one per entry
/// for a plain append, only the final one for an append that overwrites (a batch).
fn append_to_model(model: &mut MemStore, candidates: &mut Vec<View>, ents: &[Entry]) {
    let truncating = ents.first().is_some_and(|e| e.index <= model.last_index());
    if truncating {
        model.append(ents).unwrap();
        candidates.push(model_view(model));
    } else {
        for e in ents {
            model.append(std::slice::from_ref(e)).unwrap();
            candidates.push(model_view(model));
        }
    }
}

/// Runs `ops`; counts in `zero_tail_crashes` the crashes that hit a new zero-filled
/// segment inside its zero tail (records written since its last fsync over the zeros).
fn run<S: Crashable>(
    store: &mut S,
    ops: &[Op],
    zero_tail_crashes: &mut u64,
) -> Result<(), TestCaseError> {
    let mut model = MemStore::new();
    // Candidate states since the last durable point; [0] is the durable one.
    let mut candidates = vec![model_view(&mut model)];
    let mut term = 1u64;
    for op in ops {
        match op {
            Op::Append {
                back,
                count,
                new_term,
                data_len,
            } => {
                let first = (model.last_index() + 1)
                    .saturating_sub(*back as u64)
                    .max(model.first_index());
                if *new_term {
                    term += 1;
                }
                let ents: Vec<Entry> = (first..first + *count as u64)
                    .map(|i| entry(i, term, (*data_len as usize + i as usize * 13) % 400))
                    .collect();
                store
                    .append(&ents)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                append_to_model(&mut model, &mut candidates, &ents);
            }
            Op::HardState {
                term_up,
                vote,
                commit,
            } => {
                let old = model.hard_state();
                let hs = HardState {
                    term: old.term + *term_up as u64,
                    vote: *vote as u64,
                    commit: *commit as u64,
                };
                store.set_hard_state(hs).unwrap();
                model.set_hard_state(hs).unwrap();
                candidates.push(model_view(&mut model));
            }
            Op::Sync => {
                let last = store.sync().unwrap();
                prop_assert_eq!(last, model.last_index());
                candidates = vec![model_view(&mut model)];
            }
            Op::Snapshot { back, other_term } => {
                let current = model.snapshot().map_or(0, |s| s.meta.index);
                let index = model
                    .last_index()
                    .saturating_sub(*back as u64)
                    .max(current)
                    .max(1);
                let snap_term = match model.term(index) {
                    Some(t) if !other_term => t,
                    _ => term + 100,
                };
                let snap = Snapshot {
                    meta: SnapshotMeta {
                        index,
                        term: snap_term,
                        conf: ConfState::new([1, 2, 3]),
                    },
                    data: format!("state at {index}").into_bytes(),
                };
                store.install_snapshot(&snap).unwrap();
                model.install_snapshot(&snap).unwrap();
                candidates = vec![model_view(&mut model)];
            }
            Op::Compact => {
                let snap_index = model.snapshot().map_or(0, |s| s.meta.index);
                store.compact(snap_index).unwrap();
                model.compact(snap_index).unwrap();
                let too_far = store.compact(snap_index + 1);
                prop_assert!(matches!(too_far, Err(StorageError::Invalid(_))));
            }
            Op::BadAppend => {
                let bad = [entry(model.last_index() + 2, term, 3)];
                let r = store.append(&bad);
                prop_assert!(matches!(r, Err(StorageError::Invalid(_))), "{:?}", r);
            }
            Op::CrashDuring {
                budget,
                snapshot,
                other_term,
                torn,
            } => {
                store.fail_disk_after(*budget as u64);
                // Counted before the operation: whether the crash comes inside it
                // depends on the budget.
                *zero_tail_crashes += u64::from(store.in_zero_tail());
                if *snapshot {
                    // Until the WAL is synced the snapshot may land on any state the WAL
                    // could recover to, or not land at all.
                    let snap = make_snapshot(&model, 2, *other_term, term);
                    let _ = store.install_snapshot(&snap);
                    let before = candidates.clone();
                    for c in before {
                        let mut m = MemStore::from_recovered(&Recovered {
                            hard_state: c.hard_state,
                            applied: 0,
                            snapshot: c.snapshot.clone(),
                            entries: c.entries.clone(),
                        });
                        m.install_snapshot(&snap).unwrap();
                        candidates.push(model_view(&mut m));
                    }
                } else {
                    let first = model.last_index().max(model.first_index());
                    let ents: Vec<Entry> =
                        (first..first + 3).map(|i| entry(i, term, 100)).collect();
                    let _ = store.append(&ents).and_then(|_| store.sync());
                    append_to_model(&mut model, &mut candidates, &ents);
                }
                let r = store.crash(*torn);
                let got = view_of(&r);
                let pos = candidates.iter().position(|c| *c == got);
                prop_assert!(
                    pos.is_some(),
                    "recovered state is none of the {} allowed ones\n got: {:?}\n allowed: {:?}",
                    candidates.len(),
                    got,
                    candidates
                );
                model = MemStore::from_recovered(&r);
                candidates = vec![got];
            }
            Op::Crash { torn } => {
                *zero_tail_crashes += u64::from(store.in_zero_tail());
                let r = store.crash(*torn);
                let got = view_of(&r);
                prop_assert_eq!(r.applied, got.snapshot.as_ref().map_or(0, |s| s.meta.index));
                let pos = candidates.iter().position(|c| *c == got);
                prop_assert!(
                    pos.is_some(),
                    "recovered state is none of the {} allowed ones\n got: {:?}\n durable: {:?}\n written: {:?}",
                    candidates.len(),
                    got,
                    candidates[0],
                    candidates.last()
                );
                model = MemStore::from_recovered(&r);
                candidates = vec![got];
                prop_assert_eq!(store.last_index(), model.last_index());
                prop_assert_eq!(store.first_index(), model.first_index());
            }
        }
        prop_assert_eq!(store.last_index(), model.last_index());
        prop_assert_eq!(store.first_index(), model.first_index());
        term = term.max(model.entries().last().map_or(0, |e| e.term));
    }
    Ok(())
}

/// `prealloc_chunk_bytes`: 0 (new segments append), 700 (several chunks per 4 KiB
/// segment, so crashes come with zeros ahead and at chunk boundaries), 1 MiB (the
/// default: capped at the segment size, the whole segment is zero-filled at once).
fn small_opts(write_buffer_bytes_max: usize, prealloc_chunk_bytes: u64) -> WalOptions {
    WalOptions {
        segment_bytes_max: 4096,
        write_buffer_bytes_max,
        prealloc_chunk_bytes,
        ..WalOptions::default()
    }
}

/// `CONCORD_STORAGE_UNBATCHED=1` plants the old bug (overwrites written record by record,
/// without batch framing): the model tests must then fail.
fn batching() -> bool {
    std::env::var_os("CONCORD_STORAGE_UNBATCHED").is_none()
}

/// 300 cases per `cargo test`; `PROPTEST_CASES=20000` for a deeper run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        source_file: Some(file!()),
        ..ProptestConfig::default()
    }
}

/// Runs the model test over generated cases and returns how many segments started in a
/// recycled file over all of them (the 4 KiB segments roll every few operations and
/// snapshots free them, so spares get reused, and crashes hit recycled files), and how
/// many crashes hit a new zero-filled segment inside its zero tail.
fn check_cases<S: Crashable>(name: &str, open: impl Fn(usize, usize, u64, u64) -> S) -> (u64, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let recycled = AtomicU64::new(0);
    let zero_tail_crashes = AtomicU64::new(0);
    let strategy = (
        proptest::collection::vec(op(), 1..80),
        prop_oneof![Just(1usize), Just(700), Just(1 << 20)],
        prop_oneof![Just(0usize), Just(150), Just(4096)],
        prop_oneof![Just(0u64), Just(600), Just(32 << 10)],
        prop_oneof![Just(0u64), Just(700), Just(1 << 20)],
    );
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(
        &strategy,
        |(ops, buffer, zero_copy_min, sync_pad_min, prealloc)| {
            let mut store = open(buffer, zero_copy_min, sync_pad_min, prealloc);
            let mut hits = 0;
            run(&mut store, &ops, &mut hits)?;
            recycled.fetch_add(store.recycled(), Ordering::Relaxed);
            zero_tail_crashes.fetch_add(hits, Ordering::Relaxed);
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let (n, z) = (recycled.into_inner(), zero_tail_crashes.into_inner());
    eprintln!(
        "{name}: {n} segments started in a recycled file, {z} crashes inside the zero tail \
         of a new zero-filled segment"
    );
    (n, z)
}

#[test]
fn faulty_store_matches_model() {
    let (n, z) = check_cases(
        "faulty_store_matches_model",
        |_, zero_copy_min, sync_pad_min, prealloc| {
            let mut store = FaultyStore::with_options(small_opts(1 << 20, prealloc));
            store.set_batching_for_tests(batching());
            store.set_zero_copy_min_for_tests(zero_copy_min);
            store.set_sync_pad_min_for_tests(sync_pad_min);
            store
        },
    );
    assert!(n > 0, "no segment was recycled");
    assert!(z > 0, "no crash inside a zero tail");
}

/// `buffer` 1 and 700 flush records in several writes; `zero_copy_min` 0 and 150 send
/// (some) entry data to the disk straight from the caller's entries, in one `writev` at
/// the end of `append`; `sync_pad_min` 0 and 600 pad (some) sync markers to a page
/// boundary (the real thresholds are above this test's sizes).
#[test]
fn wal_on_sim_disk_matches_model() {
    let (n, z) = check_cases(
        "wal_on_sim_disk_matches_model",
        |buffer, zero_copy_min, sync_pad_min, prealloc| {
            let mut wal = Wal::open_on(
                SimDisk::new(),
                Path::new("/node"),
                small_opts(buffer, prealloc),
            )
            .unwrap();
            wal.set_batching_for_tests(batching());
            wal.set_zero_copy_min_for_tests(zero_copy_min);
            wal.set_sync_pad_min_for_tests(sync_pad_min);
            wal
        },
    );
    assert!(n > 0, "no segment was recycled");
    assert!(z > 0, "no crash inside a zero tail");
}

/// A torn overwrite, deterministically: entries 1..=6 synced, then entries 3..=8 rewritten
/// under a new term and a crash keeping every possible prefix of the unsynced bytes. The
/// log must come back as either the old 1..=6 or the new 1..=8, never cut at 3..5. Without
/// batch framing (the old behaviour) some prefix loses synced entries, which this test
/// checks too, so it shows the check has teeth.
#[test]
fn torn_overwrite_keeps_old_or_whole_new_suffix() {
    for batching in [true, false] {
        let mut lost_at = Vec::new();
        for keep in 0..2000u64 {
            let mut s = FaultyStore::with_options(small_opts(1 << 20, 700));
            s.set_batching_for_tests(batching);
            let old: Vec<Entry> = (1..=6).map(|i| entry(i, 1, 50)).collect();
            s.append(&old).unwrap();
            s.sync().unwrap();
            let new: Vec<Entry> = (3..=8).map(|i| entry(i, 2, 60)).collect();
            s.append(&new).unwrap();
            let unsynced = s.unsynced_bytes();
            if keep > unsynced {
                break;
            }
            s.crash_keeping(keep);
            let r = s.recover().unwrap();
            let mut whole_new = old[..2].to_vec();
            whole_new.extend(new.iter().cloned());
            if r.entries != old && r.entries != whole_new {
                lost_at.push((keep, r.entries.len()));
            }
        }
        if batching {
            assert!(
                lost_at.is_empty(),
                "torn overwrite lost entries: {lost_at:?}"
            );
        } else {
            assert!(!lost_at.is_empty(), "the unbatched store should tear");
        }
    }
}
