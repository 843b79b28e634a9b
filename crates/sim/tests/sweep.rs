//! Seed sweeps through the public API, as CI runs them through the binary.

use concord_sim::runner::{replay_command, Summary, SweepOptions};
use concord_sim::sim::DiskFaults;

/// Seeds in the clean sweep: enough to hit every fault kind many times.
const CLEAN_SEEDS: u64 = 300;
/// Most seeds a planted-bug sweep may take to find a violation.
const BUG_SEEDS_MAX: u64 = 500;

fn opts(seeds: u64, start: u64, bug: Option<&str>, disk: DiskFaults) -> SweepOptions {
    engine_opts("raft", seeds, start, bug, disk)
}

fn engine_opts(
    engine: &str,
    seeds: u64,
    start: u64,
    bug: Option<&str>,
    disk: DiskFaults,
) -> SweepOptions {
    SweepOptions {
        engine: engine.into(),
        seeds,
        start_seed: start,
        inject_bug: bug.map(String::from),
        disk_faults: disk,
        verbose: false,
        stats: false,
    }
}

fn run(o: &SweepOptions) -> Summary {
    concord_sim::sweep(o, |_| {}).expect("sweep starts")
}

fn describe(o: &SweepOptions, s: &Summary) -> String {
    let mut out = s.line();
    for (seed, what) in s.violations.iter().take(10) {
        out.push_str(&format!(
            "\n  seed {seed}: {what}\n    {}",
            replay_command(o, *seed)
        ));
    }
    out
}

#[test]
fn raft_clean_sweep_has_no_violations() {
    let o = opts(CLEAN_SEEDS, 0, None, DiskFaults::None);
    let s = run(&o);
    assert_eq!(s.seeds, CLEAN_SEEDS);
    assert!(s.ops > CLEAN_SEEDS * 50, "workload too thin: {}", s.line());
    assert!(
        s.crashes > 0 && s.partitions > 0 && s.conf_changes > 0 && s.snapshots_installed > 0,
        "every fault kind must occur: {}",
        s.line()
    );
    assert!(s.violations.is_empty(), "{}", describe(&o, &s));
}

/// Corrupted durable records must all be detected on recovery, and the group must stay
/// safe while the corrupt node is rebuilt.
fn disk_corruption_is_detected_and_safe(engine: &str) {
    let o = engine_opts(engine, 100, 1000, None, DiskFaults::Corrupt);
    let s = run(&o);
    assert!(
        s.corrupt_injected > 0,
        "no corruption injected: {}",
        s.line()
    );
    assert_eq!(s.corrupt_detected, s.corrupt_injected, "{}", s.line());
    assert!(s.violations.is_empty(), "{}", describe(&o, &s));
}

#[test]
fn raft_with_disk_corruption_detects_it_and_stays_safe() {
    disk_corruption_is_detected_and_safe("raft");
}

/// Every bug the engine can plant must be caught by some check within a bounded sweep.
fn every_planted_bug_is_caught(engine: &str) {
    let bugs = concord_sim::known_bugs(engine).expect("engine is built in");
    assert!(!bugs.is_empty());
    for bug in bugs {
        let mut caught = None;
        // Sweep in chunks and stop at the first violation to keep the test quick.
        let mut start = 0;
        while caught.is_none() && start < BUG_SEEDS_MAX {
            let o = engine_opts(engine, 25, start, Some(bug), DiskFaults::None);
            let s = run(&o);
            caught = s.violations.first().cloned();
            start += 25;
        }
        assert!(
            caught.is_some(),
            "planted bug {bug} survived {BUG_SEEDS_MAX} seeds of {engine}"
        );
    }
}

#[test]
fn every_planted_raft_bug_is_caught() {
    every_planted_bug_is_caught("raft");
}

#[test]
fn every_planted_paxos_bug_is_caught() {
    every_planted_bug_is_caught("paxos");
}

#[test]
fn paxos_clean_sweep_has_no_violations() {
    let o = engine_opts("paxos", 150, 0, None, DiskFaults::None);
    let s = run(&o);
    assert!(s.ops > 150 * 50, "workload too thin: {}", s.line());
    assert!(s.violations.is_empty(), "{}", describe(&o, &s));
}

#[test]
fn paxos_with_disk_corruption_detects_it_and_stays_safe() {
    disk_corruption_is_detected_and_safe("paxos");
}

#[test]
fn a_seed_replays_identically() {
    for seed in [3, 17, 42] {
        let o = opts(1, seed, None, DiskFaults::Corrupt);
        let a = concord_sim::sweep(&o, |_| {}).unwrap();
        let b = concord_sim::sweep(&o, |_| {}).unwrap();
        assert_eq!(a.line(), b.line());
        assert_eq!(a.violations, b.violations);
        assert_eq!(a.commit_latency_ticks, b.commit_latency_ticks);
    }
}

#[test]
fn unknown_engines_and_bugs_are_clear_errors() {
    let mut o = opts(1, 0, None, DiskFaults::None);
    o.engine = "zab".into();
    let e = concord_sim::sweep(&o, |_| {}).unwrap_err();
    assert!(e.contains("unknown engine") && e.contains("raft"), "{e}");
    let o = opts(1, 0, Some("no_such_bug"), DiskFaults::None);
    let e = concord_sim::sweep(&o, |_| {}).unwrap_err();
    assert!(e.contains("no_such_bug") && e.contains("known"), "{e}");
}
