//! Throughput of a consensus core alone: three replicas in one process, in-memory
//! persistence, messages handed over directly (no encoding, no network, no fsync).
//!
//! Each of P proposers keeps exactly one 256-byte proposal outstanding; when the leader
//! applies it, that proposer proposes the next one. A row ends after `--commits` commits or
//! `--seconds` seconds, whichever comes first.
//!
//! ```text
//! cargo run --release -p concord-consensus --example core_bench -- [--engine raft|paxos]
//!     [--commits 200000] [--seconds 5] [--proposers 1,64,256]
//! ```
//!
//! The driver is generic over [`Replica`], so any engine that implements the trait can be
//! measured the same way.

use concord_consensus::paxos::Paxos;
use concord_consensus::raft::Raft;
use concord_consensus::{ConfState, Config, Entry, EntryKind, NodeId, Recovered, Replica, Role};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

const PAYLOAD_BYTES: usize = 256;
/// Compact a replica's log once this many applied entries are held in memory.
const COMPACT_EVERY_ENTRIES: u64 = 20_000;
/// Upper bound on ticks spent electing the first leader.
const MAX_ELECTION_TICKS: usize = 10_000;

/// In-memory "durable" storage: what a driver would have written.
#[derive(Default)]
struct MemLog {
    entries: VecDeque<Entry>,
}

impl MemLog {
    fn append(&mut self, new: &[Entry]) {
        if let Some(first) = new.first() {
            while self.entries.back().is_some_and(|e| e.index >= first.index) {
                self.entries.pop_back();
            }
            self.entries.extend(new.iter().cloned());
        }
    }
    fn compact(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            self.entries.pop_front();
        }
    }
}

struct Row {
    proposers: usize,
    commits: u64,
    elapsed: Duration,
    busy_refusals: u64,
}

fn payload(proposer: usize, seq: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD_BYTES];
    p[..8].copy_from_slice(&(proposer as u64).to_le_bytes());
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    p
}

fn decode_payload(data: &[u8]) -> Option<(usize, u64)> {
    if data.len() < 16 {
        return None;
    }
    let p = u64::from_le_bytes(data[..8].try_into().ok()?) as usize;
    let s = u64::from_le_bytes(data[8..16].try_into().ok()?);
    Some((p, s))
}

/// One Ready/deliver pass over all nodes: persist, queue messages, apply, advance, then
/// deliver everything queued. Returns the proposals the leader applied.
fn pump<R: Replica>(
    nodes: &mut [R],
    queue: &mut VecDeque<(NodeId, NodeId, R::Message)>,
    stores: &mut [MemLog],
    leader: Option<NodeId>,
) -> Vec<(usize, u64)> {
    let mut done = Vec::new();
    for (i, n) in nodes.iter_mut().enumerate() {
        if !n.has_ready() {
            continue;
        }
        let rd = n.ready();
        stores[i].append(&rd.entries);
        for m in rd.messages {
            queue.push_back((n.id(), m.to, m.msg));
        }
        if Some(n.id()) == leader {
            for e in &rd.committed {
                if e.kind == EntryKind::Normal {
                    if let Some(p) = decode_payload(&e.data) {
                        done.push(p);
                    }
                }
            }
        }
        n.advance();
        let st = n.status();
        if st.applied >= st.first_index + COMPACT_EVERY_ENTRIES {
            n.compact(st.applied, Vec::new());
            stores[i].compact(st.applied);
        }
    }
    while let Some((from, to, m)) = queue.pop_front() {
        // Node ids are 1..=n.
        nodes[(to - 1) as usize].step(from, m);
    }
    done
}

fn run<R: Replica>(proposers: usize, max_commits: u64, max_time: Duration) -> Result<Row, String> {
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let conf = ConfState::new(ids.clone());
    let mut nodes: Vec<R> = Vec::new();
    for &id in &ids {
        let mut cfg = Config::new(id);
        // Room for every proposer's entry plus batching headroom.
        cfg.max_uncommitted_bytes = 256 << 20;
        nodes.push(R::create(cfg, conf.clone(), Recovered::default()).map_err(|e| e.to_string())?);
    }
    let mut stores: Vec<MemLog> = ids.iter().map(|_| MemLog::default()).collect();
    let mut queue: VecDeque<(NodeId, NodeId, R::Message)> = VecDeque::new();
    let idx = |id: NodeId| (id - 1) as usize;

    // Elect a leader.
    let mut leader = None;
    for _ in 0..MAX_ELECTION_TICKS {
        for n in nodes.iter_mut() {
            n.tick();
        }
        pump(&mut nodes, &mut queue, &mut stores, None);
        if let Some(n) = nodes.iter().find(|n| n.status().role == Role::Leader) {
            leader = Some(n.id());
            break;
        }
    }
    let leader = leader.ok_or("no leader elected")?;
    // Let the leader commit its no-op so proposals are not refused.
    for _ in 0..10 {
        pump(&mut nodes, &mut queue, &mut stores, Some(leader));
    }

    let mut next_seq = vec![0u64; proposers];
    let mut outstanding = vec![false; proposers];
    let mut commits = 0u64;
    let mut busy_refusals = 0u64;
    let start = Instant::now();
    let mut loops = 0u64;
    while commits < max_commits {
        loops += 1;
        // Checking the clock every pass would dominate small batches.
        if loops & 63 == 0 && start.elapsed() >= max_time {
            break;
        }
        for p in 0..proposers {
            if outstanding[p] {
                continue;
            }
            match nodes[idx(leader)].propose(payload(p, next_seq[p])) {
                Ok(()) => outstanding[p] = true,
                Err(_) => busy_refusals += 1,
            }
        }
        for (p, seq) in pump(&mut nodes, &mut queue, &mut stores, Some(leader)) {
            if p < proposers && outstanding[p] && seq == next_seq[p] {
                outstanding[p] = false;
                next_seq[p] += 1;
                commits += 1;
            }
        }
        if nodes[idx(leader)].status().role != Role::Leader {
            return Err("leadership lost during the run".into());
        }
    }
    Ok(Row {
        proposers,
        commits,
        elapsed: start.elapsed(),
        busy_refusals,
    })
}

fn main() {
    let mut engine = "raft".to_string();
    let mut max_commits: u64 = 200_000;
    let mut seconds: f64 = 5.0;
    let mut proposer_counts: Vec<usize> = vec![1, 64, 256];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("core_bench: {name} needs a value");
                std::process::exit(2)
            })
        };
        let parsed = match a.as_str() {
            "--engine" => {
                engine = val("--engine");
                Ok(())
            }
            "--commits" => val("--commits")
                .parse()
                .map(|v| max_commits = v)
                .map_err(|e| e.to_string()),
            "--seconds" => val("--seconds")
                .parse()
                .map(|v| seconds = v)
                .map_err(|e| e.to_string()),
            "--proposers" => val("--proposers")
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map(|v| proposer_counts = v)
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown argument {other}")),
        };
        if let Err(e) = parsed {
            eprintln!("core_bench: {e}");
            std::process::exit(2);
        }
    }
    let max_time = Duration::from_secs_f64(seconds);
    println!(
        "engine={engine}, 3 replicas in-process, {PAYLOAD_BYTES}-byte proposals, \
         at most {max_commits} commits or {seconds}s per row"
    );
    println!(
        "{:>10} {:>10} {:>9} {:>14} {:>8}",
        "proposers", "commits", "seconds", "commits/sec", "busy"
    );
    for &p in &proposer_counts {
        let row = match engine.as_str() {
            "raft" => run::<Raft>(p, max_commits, max_time),
            "paxos" => run::<Paxos>(p, max_commits, max_time),
            other => Err(format!("unknown engine {other:?} (known: raft, paxos)")),
        };
        match row {
            Ok(r) => {
                let secs = r.elapsed.as_secs_f64();
                println!(
                    "{:>10} {:>10} {:>9.2} {:>14.0} {:>8}",
                    r.proposers,
                    r.commits,
                    secs,
                    r.commits as f64 / secs.max(1e-9),
                    r.busy_refusals
                );
            }
            Err(e) => {
                eprintln!("core_bench: {e}");
                std::process::exit(1);
            }
        }
    }
}
