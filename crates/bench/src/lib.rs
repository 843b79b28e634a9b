//! concord-bench: closed-loop load generators that speak a system's own protocol, so the
//! same run measures Concord and the system it replaces (etcd, for `kv`).
//!
//! Every run is bounded in time (`--duration`, at most [`DURATION_MAX`]) and in count
//! (`--max-ops`), and reports throughput and latency percentiles from an HDR histogram.

pub mod args;
pub mod kv;

pub use args::{parse_kv_args, KvArgs, Op};
pub use kv::{run_kv, Report};

use std::time::Duration;

/// Longest run accepted.
pub const DURATION_MAX: Duration = Duration::from_secs(3600);
/// Most concurrent clients.
pub const CLIENTS_MAX: usize = 4096;
/// Largest value written.
pub const VALUE_SIZE_MAX: usize = 1024 * 1024;
/// Most distinct keys.
pub const KEYS_MAX: u64 = 10_000_000;
/// Default cap on operations per run, so a run is bounded even on a very fast target.
pub const MAX_OPS_DEFAULT: u64 = 50_000_000;
