//! Seed sweeps of the Multi-Paxos engine through the public API (as `sweep.rs` does for
//! Raft): a clean sweep, one with disk corruption, and every planted bug caught.

use concord_sim::runner::{replay_command, Summary, SweepOptions};
use concord_sim::sim::DiskFaults;

/// Seeds in the clean sweep.
const CLEAN_SEEDS: u64 = 150;
/// Most seeds a planted-bug sweep may take to find a violation.
const BUG_SEEDS_MAX: u64 = 400;

fn opts(seeds: u64, start: u64, bug: Option<&str>, disk: DiskFaults) -> SweepOptions {
    SweepOptions {
        engine: "paxos".into(),
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
fn paxos_clean_sweep_has_no_violations() {
    let o = opts(CLEAN_SEEDS, 0, None, DiskFaults::None);
    let s = run(&o);
    assert!(s.ops > CLEAN_SEEDS * 50, "workload too thin: {}", s.line());
    assert!(
        s.crashes > 0 && s.partitions > 0 && s.conf_changes > 0 && s.snapshots_installed > 0,
        "every fault kind must occur: {}",
        s.line()
    );
    assert!(s.violations.is_empty(), "{}", describe(&o, &s));
}

#[test]
fn paxos_with_disk_corruption_detects_it_and_stays_safe() {
    let o = opts(60, 1000, None, DiskFaults::Corrupt);
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
fn every_planted_paxos_bug_is_caught() {
    let bugs = concord_sim::known_bugs("paxos").expect("paxos is built in");
    assert!(bugs.len() >= 3);
    for bug in bugs {
        let mut caught = None;
        let mut start = 0;
        while caught.is_none() && start < BUG_SEEDS_MAX {
            let o = opts(25, start, Some(bug), DiskFaults::None);
            caught = run(&o).violations.first().cloned();
            start += 25;
        }
        assert!(
            caught.is_some(),
            "planted bug {bug} survived {BUG_SEEDS_MAX} seeds"
        );
    }
}
