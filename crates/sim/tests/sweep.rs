//! Seed sweeps through the public API, as CI runs them through the binary.

use concord_sim::runner::{replay_command, Summary, SweepOptions};
use concord_sim::sim::DiskFaults;

/// Seeds in the clean sweep: enough to hit every fault kind many times.
const CLEAN_SEEDS: u64 = 300;
/// Most seeds a planted-bug sweep may take to find a violation.
const BUG_SEEDS_MAX: u64 = 400;

fn opts(seeds: u64, start: u64, bug: Option<&str>, disk: DiskFaults) -> SweepOptions {
    SweepOptions {
        engine: "raft".into(),
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

#[test]
fn raft_with_disk_corruption_detects_it_and_stays_safe() {
    let o = opts(100, 1000, None, DiskFaults::Corrupt);
    let s = run(&o);
    assert!(
        s.corrupt_injected > 0,
        "no corruption injected: {}",
        s.line()
    );
    assert_eq!(s.corrupt_detected, s.corrupt_injected, "{}", s.line());
    assert!(s.violations.is_empty(), "{}", describe(&o, &s));
}

/// Every bug the engine can plant must be caught by some check within a bounded sweep.
#[test]
fn every_planted_raft_bug_is_caught() {
    let bugs = concord_sim::known_bugs("raft").expect("raft is built in");
    assert!(!bugs.is_empty());
    for bug in bugs {
        let mut caught = None;
        // Sweep in chunks and stop at the first violation to keep the test quick.
        let mut start = 0;
        while caught.is_none() && start < BUG_SEEDS_MAX {
            let o = opts(25, start, Some(bug), DiskFaults::None);
            let s = run(&o);
            caught = s.violations.first().cloned();
            start += 25;
        }
        assert!(
            caught.is_some(),
            "planted bug {bug} survived {BUG_SEEDS_MAX} seeds"
        );
    }
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
