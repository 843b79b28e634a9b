//! Seed sweeps, the command line, and the summary/metrics output.

use crate::engine::EngineModel;
use crate::sim::{run_seed, DiskFaults, RunOptions, SeedReport};
use crate::store::SimStore;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::sync::Once;

/// Upper bound on `--seeds`, so a typo cannot start a run of days.
pub const MAX_SEEDS: u64 = 10_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepOptions {
    pub engine: String,
    pub seeds: u64,
    pub start_seed: u64,
    pub inject_bug: Option<String>,
    pub disk_faults: DiskFaults,
    pub verbose: bool,
    pub stats: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Sweep(SweepOptions),
    ListBugs { engine: String },
    Help,
}

pub const USAGE: &str = "\
usage: concord-sim --engine raft|paxos --seeds N [--start-seed S] [--inject-bug NAME]
                   [--disk-faults none|corrupt] [--stats] [--verbose]
       concord-sim --list-bugs --engine raft|paxos

Runs N seeds (S, S+1, ...) of the deterministic simulator and exits non-zero if any seed
violates an invariant. A failing seed is replayed with --seeds 1 --start-seed SEED.";

/// Parses the arguments after the program name. Errors name the bad argument.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut engine = None;
    let mut seeds = None;
    let mut start_seed = 0u64;
    let mut inject_bug = None;
    let mut disk_faults = DiskFaults::None;
    let mut verbose = false;
    let mut stats = false;
    let mut list_bugs = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} expects a non-negative integer, got {v:?}"))
        };
        match a.as_str() {
            "--engine" => engine = Some(value("--engine")?),
            "--seeds" => {
                let n = number("--seeds", value("--seeds")?)?;
                if n == 0 || n > MAX_SEEDS {
                    return Err(format!("--seeds must be in 1..={MAX_SEEDS}, got {n}"));
                }
                seeds = Some(n);
            }
            "--start-seed" => start_seed = number("--start-seed", value("--start-seed")?)?,
            "--inject-bug" => inject_bug = Some(value("--inject-bug")?),
            "--disk-faults" => {
                disk_faults = match value("--disk-faults")?.as_str() {
                    "none" => DiskFaults::None,
                    "corrupt" => DiskFaults::Corrupt,
                    other => {
                        return Err(format!(
                            "--disk-faults expects none or corrupt, got {other:?}"
                        ))
                    }
                }
            }
            "--verbose" | "-v" => verbose = true,
            "--stats" => stats = true,
            "--list-bugs" => list_bugs = true,
            "--help" | "-h" => return Ok(Command::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let engine = engine.ok_or("--engine is required")?;
    if list_bugs {
        return Ok(Command::ListBugs { engine });
    }
    let seeds = seeds.ok_or("--seeds is required")?;
    if start_seed.checked_add(seeds).is_none() {
        return Err("--start-seed + --seeds overflows u64".into());
    }
    Ok(Command::Sweep(SweepOptions {
        engine,
        seeds,
        start_seed,
        inject_bug,
        disk_faults,
        verbose,
        stats,
    }))
}

/// Everything a sweep found, aggregated over its seeds.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub engine: String,
    pub seeds: u64,
    /// (seed, what failed)
    pub violations: Vec<(u64, String)>,
    pub ops: u64,
    pub indeterminate: u64,
    pub inconclusive: u64,
    pub corrupt_injected: u64,
    pub corrupt_detected: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub conf_changes: u64,
    pub transfers: u64,
    pub snapshots_installed: u64,
    pub messages: u64,
    pub commands_committed: u64,
    pub commit_latency_ticks: Vec<u64>,
    pub recovery_ticks: Vec<u64>,
    pub ticks: u64,
}

impl Summary {
    fn add(&mut self, r: SeedReport) {
        self.seeds += 1;
        if let Some(v) = r.violation {
            self.violations.push((r.seed, v));
        }
        self.ops += r.ops_checked as u64;
        self.indeterminate += r.indeterminate as u64;
        self.inconclusive += r.inconclusive as u64;
        self.corrupt_injected += r.corrupt_injected as u64;
        self.corrupt_detected += r.corrupt_detected as u64;
        self.crashes += r.crashes as u64;
        self.partitions += r.partitions as u64;
        self.conf_changes += r.conf_changes as u64;
        self.transfers += r.transfers as u64;
        self.snapshots_installed += r.snapshots_installed as u64;
        self.messages += r.messages;
        self.commands_committed += r.commands_committed;
        self.commit_latency_ticks.extend(r.commit_latency_ticks);
        self.recovery_ticks.extend(r.recovery_ticks);
        self.ticks += r.ticks;
    }

    /// The one-line summary; always ends in `N seeds, V violations`.
    pub fn line(&self) -> String {
        format!(
            "engine={} ops={} indeterminate={} inconclusive={} crashes={} partitions={} \
             conf_changes={} transfers={} snapshots={} corrupt_injected={} \
             corrupt_detected={} ticks={} {} seeds, {} violations",
            self.engine,
            self.ops,
            self.indeterminate,
            self.inconclusive,
            self.crashes,
            self.partitions,
            self.conf_changes,
            self.transfers,
            self.snapshots_installed,
            self.corrupt_injected,
            self.corrupt_detected,
            self.ticks,
            self.seeds,
            self.violations.len()
        )
    }

    /// Engine metrics for comparing Raft and Multi-Paxos under the same seeds.
    pub fn stats(&self) -> String {
        let mut out = String::new();
        let per_cmd = if self.commands_committed == 0 {
            0.0
        } else {
            self.messages as f64 / self.commands_committed as f64
        };
        let _ = writeln!(
            out,
            "stats engine={} commands_committed={} messages={} messages_per_command={per_cmd:.1}",
            self.engine, self.commands_committed, self.messages
        );
        let (m, p99, max) = mean_p99_max(&self.commit_latency_ticks);
        let _ = writeln!(
            out,
            "stats engine={} propose_to_commit_ticks mean={m:.1} p99={p99} max={max} samples={}",
            self.engine,
            self.commit_latency_ticks.len()
        );
        let (m, p99, max) = mean_p99_max(&self.recovery_ticks);
        let _ = write!(
            out,
            "stats engine={} leader_loss_recovery_ticks mean={m:.1} p99={p99} max={max} \
             samples={}",
            self.engine,
            self.recovery_ticks.len()
        );
        out
    }
}

fn mean_p99_max(v: &[u64]) -> (f64, u64, u64) {
    if v.is_empty() {
        return (0.0, 0, 0);
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let mean = s.iter().sum::<u64>() as f64 / s.len() as f64;
    let p99 = s[((s.len() * 99).div_ceil(100)).saturating_sub(1)];
    (mean, p99, *s.last().expect("non-empty"))
}

/// The exact command that replays one seed of a sweep.
pub fn replay_command(o: &SweepOptions, seed: u64) -> String {
    let mut cmd = format!(
        "concord-sim --engine {} --seeds 1 --start-seed {seed}",
        o.engine
    );
    if let Some(b) = &o.inject_bug {
        let _ = write!(cmd, " --inject-bug {b}");
    }
    if o.disk_faults == DiskFaults::Corrupt {
        cmd.push_str(" --disk-faults corrupt");
    }
    cmd
}

/// Runs every seed of a sweep for one engine. `on_seed` sees each report as it finishes
/// (for verbose traces) before it is folded into the summary.
pub fn sweep<R: EngineModel, S: SimStore>(
    o: &SweepOptions,
    mut on_seed: impl FnMut(&SeedReport),
) -> Result<Summary, String> {
    if let Some(b) = &o.inject_bug {
        if !R::known_bugs().contains(&b.as_str()) {
            return Err(format!(
                "unknown bug {b:?} for engine {}; known: {}",
                R::NAME,
                R::known_bugs().join(", ")
            ));
        }
    }
    let mut summary = Summary {
        engine: R::NAME.to_string(),
        ..Summary::default()
    };
    for seed in o.start_seed..o.start_seed + o.seeds {
        let opts = RunOptions {
            seed,
            inject_bug: o.inject_bug.clone(),
            disk_faults: o.disk_faults,
            verbose: o.verbose,
        };
        let report = run_seed_catching::<R, S>(opts);
        on_seed(&report);
        summary.add(report);
    }
    Ok(summary)
}

thread_local! {
    /// Set while this thread runs a seed: panics are recorded here instead of printed.
    static CAPTURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records panics of threads running a seed and passes
/// every other panic to the previous hook.
fn install_panic_capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = CAPTURE.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        let msg = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(non-string payload)".into());
                        let at = info
                            .location()
                            .map(|l| format!(" at {}:{}", l.file(), l.line()))
                            .unwrap_or_default();
                        *slot = format!("{msg}{at}");
                        true
                    }
                    None => false,
                }
            });
            if !captured {
                previous(info);
            }
        }));
    });
}

/// Runs one seed; a panic anywhere in it (a replica's assertion, or the simulator's) is
/// that seed's violation, so a sweep reports it with its replay command and goes on.
pub fn run_seed_catching<R: EngineModel, S: SimStore>(opts: RunOptions) -> SeedReport {
    install_panic_capture();
    let seed = opts.seed;
    CAPTURE.with(|c| *c.borrow_mut() = Some(String::new()));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_seed::<R, S>(opts)));
    let msg = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    match result {
        Ok(r) => r,
        Err(_) => SeedReport {
            seed,
            violation: Some(format!("panic: {msg}")),
            ..SeedReport::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_a_full_command_line() {
        let c = parse_args(args(
            "--engine raft --seeds 30 --start-seed 7 --inject-bug x --disk-faults corrupt --stats",
        ))
        .unwrap();
        let Command::Sweep(o) = c else {
            panic!("expected a sweep")
        };
        assert_eq!((o.seeds, o.start_seed), (30, 7));
        assert_eq!(o.inject_bug.as_deref(), Some("x"));
        assert_eq!(o.disk_faults, DiskFaults::Corrupt);
        assert!(o.stats && !o.verbose);
        assert_eq!(
            replay_command(&o, 9),
            "concord-sim --engine raft --seeds 1 --start-seed 9 --inject-bug x --disk-faults corrupt"
        );
        assert_eq!(
            parse_args(args("--list-bugs --engine raft")).unwrap(),
            Command::ListBugs {
                engine: "raft".into()
            }
        );
    }

    #[test]
    fn bad_arguments_name_the_problem() {
        let err = |s: &str| parse_args(args(s)).unwrap_err();
        assert!(err("--seeds 3").contains("--engine"));
        assert!(err("--engine raft").contains("--seeds"));
        assert!(err("--engine raft --seeds x").contains("--seeds"));
        assert!(err("--engine raft --seeds 0").contains("--seeds"));
        assert!(err("--engine raft --seeds").contains("needs a value"));
        assert!(err("--engine raft --seeds 1 --bogus").contains("--bogus"));
        assert!(err("--engine raft --seeds 1 --disk-faults flaky").contains("flaky"));
    }

    #[test]
    fn p99_of_small_samples() {
        assert_eq!(mean_p99_max(&[]), (0.0, 0, 0));
        let v: Vec<u64> = (1..=100).collect();
        let (m, p99, max) = mean_p99_max(&v);
        assert!((m - 50.5).abs() < 1e-9);
        assert_eq!((p99, max), (99, 100));
    }
}
