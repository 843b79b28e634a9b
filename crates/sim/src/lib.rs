//! concord-sim: a deterministic simulator for Concord's consensus engines.
//!
//! See `docs/simulation.md` for how a run works, what each check proves and how to replay a
//! failing seed.

pub mod linearizability;
pub mod rng;
