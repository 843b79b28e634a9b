//! concord-sim: a deterministic simulator for Concord's consensus engines.
//!
//! One `u64` seed drives a whole run: cluster size, network delay/loss/duplication,
//! partitions, crashes that lose unsynced writes, disk corruption, membership changes,
//! leadership transfers and a client workload. Safety invariants are checked after every
//! step, the client history is checked for linearizability after the run, and a liveness
//! phase checks that progress resumes once every fault is healed.
//!
//! See `docs/simulation.md` for how a run works, what each check proves and how to replay a
//! failing seed.

pub mod engine;
pub mod kv;
pub mod linearizability;
pub mod net;
pub mod rng;
pub mod runner;
pub mod sim;
pub mod store;

use runner::{Summary, SweepOptions};
use sim::SeedReport;

/// The store every simulated node persists to.
pub type NodeStore = concord_storage::faulty::FaultyStore;

/// The engines this build can simulate.
pub const ENGINES: &[&str] = &["raft", "paxos"];

/// `R::known_bugs()` of the named engine.
pub fn known_bugs(engine: &str) -> Result<&'static [&'static str], String> {
    use concord_consensus::Replica;
    match engine {
        "raft" => Ok(concord_consensus::raft::Raft::known_bugs()),
        "paxos" => Ok(concord_consensus::paxos::Paxos::known_bugs()),
        other => Err(unknown_engine(other)),
    }
}

/// Runs a sweep on the named engine; one match arm per engine.
pub fn sweep(o: &SweepOptions, on_seed: impl FnMut(&SeedReport)) -> Result<Summary, String> {
    match o.engine.as_str() {
        "raft" => runner::sweep::<concord_consensus::raft::Raft, NodeStore>(o, on_seed),
        "paxos" => runner::sweep::<concord_consensus::paxos::Paxos, NodeStore>(o, on_seed),
        other => Err(unknown_engine(other)),
    }
}

fn unknown_engine(name: &str) -> String {
    format!("unknown engine {name:?}; known: {}", ENGINES.join(", "))
}
