//! Peers can lie. A forged, contradicting or garbled message is input like any other: the
//! replica must drop it, never panic, and never let it move its term or commit index
//! backwards. This test runs a small healthy cluster of each engine and, between honest
//! deliveries, feeds its replicas three kinds of bad messages: real messages with their
//! numbers bent to edge values (indices, terms, ballots, offsets, lengths), real messages
//! with their wire bytes flipped and decoded again, and messages claiming to come from
//! nodes that do not exist. Seeded with the crate's own `Prng`, so a failure replays.
//!
//! `GARBLE_SEEDS=N` runs more seeds than the default.

use concord_consensus::paxos::{Message as PaxosMessage, Paxos};
use concord_consensus::raft::{Body, Message as RaftMessage, Raft};
use concord_consensus::{
    ConfState, Config, Entry, EntryKind, NodeId, Prng, Recovered, Replica, SnapshotMeta, NO_NODE,
};

/// Honest messages kept for replay and mutation; older ones are dropped.
const MAX_INFLIGHT: usize = 512;
/// Steps per seed.
const STEPS: usize = 3_000;
const NODES: u64 = 3;

/// A number bent towards the values that break careless code.
fn wild(rng: &mut Prng, v: u64) -> u64 {
    match rng.range(0, 10) {
        0 => 0,
        1 => u64::MAX,
        2 => v.wrapping_add(1),
        3 => v.wrapping_sub(1),
        4 => v.wrapping_add(rng.range(2, 1_000)),
        5 => v.saturating_sub(rng.range(2, 1_000)),
        6 => rng.next_u64(),
        7 => u64::MAX / 2,
        _ => v,
    }
}

fn wild_entries(rng: &mut Prng, entries: &mut Vec<Entry>) {
    if rng.range(0, 4) == 0 {
        entries.reverse();
    }
    for e in entries.iter_mut() {
        e.index = wild(rng, e.index);
        e.term = wild(rng, e.term);
        if rng.range(0, 4) == 0 {
            e.kind = match rng.range(0, 3) {
                0 => EntryKind::Normal,
                1 => EntryKind::Noop,
                _ => EntryKind::ConfChange,
            };
            e.data = (0..rng.range(0, 8)).map(|_| rng.next_u64() as u8).collect();
        }
    }
    if rng.range(0, 4) == 0 {
        let index = wild(rng, 1);
        entries.push(Entry {
            index,
            term: wild(rng, 1),
            kind: EntryKind::Normal,
            data: b"forged".to_vec(),
        });
    }
}

fn wild_meta(rng: &mut Prng, meta: &mut SnapshotMeta) {
    meta.index = wild(rng, meta.index);
    meta.term = wild(rng, meta.term);
    if rng.range(0, 4) == 0 {
        meta.conf = ConfState::new([wild(rng, 1), wild(rng, 2)]);
    }
}

fn wild_bytes(rng: &mut Prng, data: &mut Vec<u8>) {
    match rng.range(0, 4) {
        0 => data.clear(),
        1 => data.extend((0..rng.range(1, 64)).map(|_| rng.next_u64() as u8)),
        2 => data.truncate(rng.range(0, data.len() as u64 + 1) as usize),
        _ => {}
    }
}

/// What the test needs from an engine besides `Replica`.
trait Garble: Replica + Sized {
    fn bend(rng: &mut Prng, msg: &mut Self::Message);
    /// A message made from nothing but random numbers, of any kind.
    fn invent(rng: &mut Prng) -> Self::Message;
    fn is_snapshot_chunk(msg: &Self::Message) -> bool;
    /// The engine's count of peer messages it dropped as impossible.
    fn dropped(&self) -> u64;
    fn config(id: NodeId, seed: u64) -> Config {
        let mut c = Config::new(id);
        c.seed = seed;
        c.election_ticks = 10;
        c.heartbeat_ticks = 2;
        c.check_quorum = seed.is_multiple_of(2);
        c.pre_vote = !seed.is_multiple_of(3);
        // Small chunks, so snapshots travel in several messages with offsets to bend.
        c.snapshot_chunk_bytes = 4;
        c
    }
}

impl Garble for Raft {
    fn is_snapshot_chunk(msg: &RaftMessage) -> bool {
        matches!(msg.body, Body::Snapshot { .. })
    }

    fn dropped(&self) -> u64 {
        self.bad_messages()
    }

    fn bend(rng: &mut Prng, m: &mut RaftMessage) {
        if rng.range(0, 3) == 0 {
            m.term = wild(rng, m.term);
        }
        match &mut m.body {
            Body::PreVote {
                last_index,
                last_term,
            }
            | Body::Vote {
                last_index,
                last_term,
                ..
            } => {
                *last_index = wild(rng, *last_index);
                *last_term = wild(rng, *last_term);
            }
            Body::PreVoteResp { reject } | Body::VoteResp { reject } => *reject = !*reject,
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                *prev_index = wild(rng, *prev_index);
                *prev_term = wild(rng, *prev_term);
                *commit = wild(rng, *commit);
                wild_entries(rng, entries);
            }
            Body::AppendResp {
                index,
                reject,
                hint_index,
                hint_term,
            } => {
                *index = wild(rng, *index);
                *hint_index = wild(rng, *hint_index);
                *hint_term = wild(rng, *hint_term);
                if rng.range(0, 3) == 0 {
                    *reject = !*reject;
                }
            }
            Body::Heartbeat {
                commit,
                read_seq,
                sent_tick,
            } => {
                *commit = wild(rng, *commit);
                *read_seq = wild(rng, *read_seq);
                *sent_tick = wild(rng, *sent_tick);
            }
            Body::HeartbeatResp {
                read_seq,
                sent_tick,
            } => {
                *read_seq = wild(rng, *read_seq);
                *sent_tick = wild(rng, *sent_tick);
            }
            Body::Snapshot {
                meta,
                offset,
                data,
                done,
            } => {
                wild_meta(rng, meta);
                *offset = wild(rng, *offset);
                wild_bytes(rng, data);
                if rng.range(0, 3) == 0 {
                    *done = !*done;
                }
            }
            Body::SnapshotResp { index, next_offset } => {
                *index = wild(rng, *index);
                *next_offset = wild(rng, *next_offset);
            }
            Body::TimeoutNow => {}
            Body::ReadIndex { ctx } => wild_bytes(rng, ctx),
            Body::ReadIndexResp { index, ctx } => {
                *index = wild(rng, *index);
                wild_bytes(rng, ctx);
            }
        }
    }

    fn invent(rng: &mut Prng) -> RaftMessage {
        let n = |rng: &mut Prng| {
            let v = rng.range(0, 20);
            wild(rng, v)
        };
        let body = match rng.range(0, 13) {
            0 => Body::PreVote {
                last_index: n(rng),
                last_term: n(rng),
            },
            1 => Body::PreVoteResp { reject: false },
            2 => Body::Vote {
                last_index: n(rng),
                last_term: n(rng),
                transfer: rng.range(0, 2) == 0,
            },
            3 => Body::VoteResp { reject: false },
            4 => {
                let mut entries = Vec::new();
                wild_entries(rng, &mut entries);
                Body::Append {
                    prev_index: n(rng),
                    prev_term: n(rng),
                    entries,
                    commit: n(rng),
                }
            }
            5 => Body::AppendResp {
                index: n(rng),
                reject: rng.range(0, 2) == 0,
                hint_index: n(rng),
                hint_term: n(rng),
            },
            6 => Body::Heartbeat {
                commit: n(rng),
                read_seq: n(rng),
                sent_tick: n(rng),
            },
            7 => Body::HeartbeatResp {
                read_seq: n(rng),
                sent_tick: n(rng),
            },
            8 => Body::Snapshot {
                meta: SnapshotMeta {
                    index: n(rng),
                    term: n(rng),
                    conf: ConfState::new([1, 2, 3]),
                },
                offset: n(rng),
                data: vec![7; rng.range(0, 16) as usize],
                done: rng.range(0, 2) == 0,
            },
            9 => Body::SnapshotResp {
                index: n(rng),
                next_offset: n(rng),
            },
            10 => Body::TimeoutNow,
            11 => Body::ReadIndex { ctx: vec![1, 2] },
            _ => Body::ReadIndexResp {
                index: n(rng),
                ctx: vec![3],
            },
        };
        RaftMessage { term: n(rng), body }
    }
}

impl Garble for Paxos {
    fn is_snapshot_chunk(msg: &PaxosMessage) -> bool {
        matches!(msg, PaxosMessage::Snapshot { .. })
    }

    fn dropped(&self) -> u64 {
        self.bad_messages()
    }

    fn bend(rng: &mut Prng, m: &mut PaxosMessage) {
        match m {
            PaxosMessage::Prepare {
                ballot,
                commit,
                from,
                ..
            } => {
                *ballot = wild(rng, *ballot);
                *commit = wild(rng, *commit);
                *from = wild(rng, *from);
            }
            PaxosMessage::Promise {
                ballot,
                from,
                entries,
                done,
                commit,
            } => {
                *ballot = wild(rng, *ballot);
                *from = wild(rng, *from);
                *commit = wild(rng, *commit);
                wild_entries(rng, entries);
                if rng.range(0, 3) == 0 {
                    *done = !*done;
                }
            }
            PaxosMessage::Nack {
                ballot,
                promised,
                behind,
            } => {
                *ballot = wild(rng, *ballot);
                *promised = wild(rng, *promised);
                if rng.range(0, 3) == 0 {
                    *behind = !*behind;
                }
            }
            PaxosMessage::Accept {
                ballot,
                prev,
                entries,
                commit,
            } => {
                // Keep the ballot most of the time: a forged accept from the real leader's
                // ballot is the nastiest case (it contradicts chosen slots).
                if rng.range(0, 3) == 0 {
                    *ballot = wild(rng, *ballot);
                }
                *prev = wild(rng, *prev);
                *commit = wild(rng, *commit);
                wild_entries(rng, entries);
                if rng.range(0, 2) == 0 {
                    for e in entries.iter_mut() {
                        e.data = b"contradiction".to_vec();
                    }
                }
            }
            PaxosMessage::Accepted { ballot, matched }
            | PaxosMessage::Reject { ballot, matched } => {
                *ballot = wild(rng, *ballot);
                *matched = wild(rng, *matched);
            }
            PaxosMessage::Heartbeat {
                ballot,
                commit,
                seq,
                sent_at,
            } => {
                *ballot = wild(rng, *ballot);
                *commit = wild(rng, *commit);
                *seq = wild(rng, *seq);
                *sent_at = wild(rng, *sent_at);
            }
            PaxosMessage::HeartbeatAck {
                ballot,
                seq,
                sent_at,
                matched,
            } => {
                *ballot = wild(rng, *ballot);
                *seq = wild(rng, *seq);
                *sent_at = wild(rng, *sent_at);
                *matched = wild(rng, *matched);
            }
            PaxosMessage::Snapshot {
                ballot,
                meta,
                total,
                offset,
                data,
            } => {
                if rng.range(0, 3) == 0 {
                    *ballot = wild(rng, *ballot);
                }
                wild_meta(rng, meta);
                *total = wild(rng, *total);
                *offset = wild(rng, *offset);
                wild_bytes(rng, data);
            }
            PaxosMessage::SnapshotAck {
                ballot,
                index,
                next_offset,
            } => {
                *ballot = wild(rng, *ballot);
                *index = wild(rng, *index);
                *next_offset = wild(rng, *next_offset);
            }
            PaxosMessage::TimeoutNow { ballot } => *ballot = wild(rng, *ballot),
        }
    }

    fn invent(rng: &mut Prng) -> PaxosMessage {
        let n = |rng: &mut Prng| {
            let v = rng.range(0, 20);
            wild(rng, v)
        };
        // A ballot owned by one of the real nodes, so the ownership check lets it in.
        let ballot = |rng: &mut Prng| (rng.range(0, 50) << 16) | rng.range(1, NODES + 1);
        match rng.range(0, 11) {
            0 => PaxosMessage::Prepare {
                ballot: ballot(rng),
                commit: n(rng),
                from: n(rng),
                force: rng.range(0, 2) == 0,
            },
            1 => {
                let mut entries = Vec::new();
                wild_entries(rng, &mut entries);
                PaxosMessage::Promise {
                    ballot: ballot(rng),
                    from: n(rng),
                    entries,
                    done: rng.range(0, 2) == 0,
                    commit: n(rng),
                }
            }
            2 => PaxosMessage::Nack {
                ballot: ballot(rng),
                promised: ballot(rng),
                behind: rng.range(0, 2) == 0,
            },
            3 => {
                let mut entries = Vec::new();
                wild_entries(rng, &mut entries);
                PaxosMessage::Accept {
                    ballot: ballot(rng),
                    prev: n(rng),
                    entries,
                    commit: n(rng),
                }
            }
            4 => PaxosMessage::Accepted {
                ballot: ballot(rng),
                matched: n(rng),
            },
            5 => PaxosMessage::Reject {
                ballot: ballot(rng),
                matched: n(rng),
            },
            6 => PaxosMessage::Heartbeat {
                ballot: ballot(rng),
                commit: n(rng),
                seq: n(rng),
                sent_at: n(rng),
            },
            7 => PaxosMessage::HeartbeatAck {
                ballot: ballot(rng),
                seq: n(rng),
                sent_at: n(rng),
                matched: n(rng),
            },
            8 => PaxosMessage::Snapshot {
                ballot: ballot(rng),
                meta: SnapshotMeta {
                    index: n(rng),
                    term: n(rng),
                    conf: ConfState::new([1, 2, 3]),
                },
                total: n(rng),
                offset: n(rng),
                data: vec![7; rng.range(0, 16) as usize],
            },
            9 => PaxosMessage::SnapshotAck {
                ballot: ballot(rng),
                index: n(rng),
                next_offset: n(rng),
            },
            _ => PaxosMessage::TimeoutNow {
                ballot: ballot(rng),
            },
        }
    }
}

struct Harness<R: Garble> {
    rng: Prng,
    nodes: Vec<R>,
    /// (term, commit) last seen per node: neither may go back.
    seen: Vec<(u64, u64)>,
    inflight: Vec<(NodeId, NodeId, R::Message)>,
    seed: u64,
    totals: Totals,
}

/// What a run did, so the test can show it was not vacuous.
#[derive(Default, Debug)]
struct Totals {
    garbled: u64,
    dropped: u64,
    snapshot_chunks: u64,
}

impl<R: Garble> Harness<R> {
    fn new(seed: u64) -> Self {
        let mut rng = Prng::new(seed);
        let nodes = (1..=NODES)
            .map(|id| {
                let c = R::config(id, rng.next_u64() ^ seed);
                R::create(c, ConfState::new(1..=NODES), Recovered::default()).expect("config")
            })
            .collect();
        Harness {
            rng,
            nodes,
            seen: vec![(0, 0); NODES as usize],
            inflight: Vec::new(),
            seed,
            totals: Totals::default(),
        }
    }

    /// Drives one node through its pending Readys (persistence is instant here) and
    /// checks that its term and commit index only move forward.
    fn drive(&mut self, i: usize) {
        let id = i as u64 + 1;
        for _ in 0..100 {
            let r = &mut self.nodes[i];
            if !r.has_ready() {
                break;
            }
            let rd = r.ready();
            for m in rd.messages {
                if R::is_snapshot_chunk(&m.msg) {
                    self.totals.snapshot_chunks += 1;
                }
                if self.inflight.len() >= MAX_INFLIGHT {
                    self.inflight.remove(0);
                }
                self.inflight.push((id, m.to, m.msg));
            }
            let applied = rd.committed.last().map(|e| e.index);
            r.advance();
            if let Some(a) = applied {
                if self.rng.range(0, 4) == 0 {
                    r.compact(a, format!("state machine at {a}").into_bytes());
                }
            }
        }
        let st = self.nodes[i].status();
        let (term, commit) = self.seen[i];
        assert!(
            st.term >= term,
            "seed {}: node {id} term went back from {term} to {}",
            self.seed,
            st.term
        );
        assert!(
            st.commit >= commit,
            "seed {}: node {id} commit went back from {commit} to {}",
            self.seed,
            st.commit
        );
        self.seen[i] = (st.term, st.commit);
    }

    fn step(&mut self) {
        let rng = &mut self.rng;
        let i = rng.range(0, NODES) as usize;
        match rng.range(0, 22) {
            0..=4 => self.nodes[i].tick(),
            20 | 21 => {
                // Loss, so followers lag and need snapshots.
                if !self.inflight.is_empty() {
                    let k = rng.range(0, self.inflight.len() as u64) as usize;
                    self.inflight.swap_remove(k);
                }
                return;
            }
            5 => {
                let _ = self.nodes[i].propose(b"value".to_vec());
            }
            6 => {
                let _ = self.nodes[i].read_index(vec![1]);
            }
            7..=13 => {
                // An honest delivery.
                if self.inflight.is_empty() {
                    return;
                }
                let k = rng.range(0, self.inflight.len() as u64) as usize;
                let (from, to, msg) = self.inflight.swap_remove(k);
                // A replica fooled by a forged configuration may address nodes that do
                // not exist; those messages go nowhere.
                let j = to.wrapping_sub(1) as usize;
                if let Some(r) = self.nodes.get_mut(j) {
                    r.step(from, msg);
                    self.drive(j);
                }
                return;
            }
            _ => {
                self.totals.garbled += 1;
                let (from, msg) = self.bad_message(i);
                self.nodes[i].step(from, msg);
            }
        }
        self.drive(i);
    }

    /// A lie for node `i`: bent numbers, flipped wire bytes, or a sender that does not
    /// exist (or is the node itself).
    fn bad_message(&mut self, i: usize) -> (NodeId, R::Message) {
        let rng = &mut self.rng;
        let honest = if self.inflight.is_empty() {
            None
        } else {
            let k = rng.range(0, self.inflight.len() as u64) as usize;
            Some(self.inflight[k].clone())
        };
        let mut from = rng.range(1, NODES + 1);
        if from == i as u64 + 1 {
            from = from % NODES + 1;
        }
        let msg = match (rng.range(0, 4), honest) {
            (0, _) | (_, None) => R::invent(rng),
            (1, Some((f, _, m))) => {
                // Flip wire bytes and decode again; what still decodes is stepped.
                let mut bytes = R::encode_message(&m);
                for _ in 0..rng.range(1, 4) {
                    if bytes.is_empty() {
                        break;
                    }
                    let at = rng.range(0, bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.range(0, 8);
                }
                from = f;
                match R::decode_message(&bytes) {
                    Ok(m) => m,
                    Err(_) => R::invent(rng),
                }
            }
            (_, Some((f, _, mut m))) => {
                R::bend(rng, &mut m);
                from = f;
                m
            }
        };
        match rng.range(0, 12) {
            0 => from = NO_NODE,
            1 => from = i as u64 + 1,
            2 => from = wild(rng, 99),
            _ => {}
        }
        (from, msg)
    }
}

fn run<R: Garble>(seed: u64) -> Totals {
    let result = std::panic::catch_unwind(|| {
        let mut h = Harness::<R>::new(seed);
        for _ in 0..STEPS {
            h.step();
        }
        h.totals.dropped = h.nodes.iter().map(|r| r.dropped()).sum();
        h.totals
    });
    match result {
        Ok(t) => t,
        Err(_) => panic!("seed {seed} panicked (message above); replay with GARBLE_SEED={seed}"),
    }
}

/// The seeds to run: `GARBLE_SEED=S` replays one, `GARBLE_SEEDS=N` runs `0..N`.
fn seeds() -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    match var("GARBLE_SEED") {
        Some(s) => s..s + 1,
        None => 0..var("GARBLE_SEEDS").unwrap_or(40),
    }
}

fn sweep<R: Garble>() {
    let mut all = Totals::default();
    for seed in seeds() {
        let t = run::<R>(seed);
        all.garbled += t.garbled;
        all.dropped += t.dropped;
        all.snapshot_chunks += t.snapshot_chunks;
    }
    let n = seeds().count() as u64;
    eprintln!("{}: {all:?}", std::any::type_name::<R>());
    // Not vacuous: many lies told, many recognised as such, snapshots in play to bend.
    assert!(all.garbled >= 100 * n, "too few bad messages: {all:?}");
    assert!(
        all.dropped >= 10 * n,
        "too few dropped as impossible: {all:?}"
    );
    assert!(all.snapshot_chunks >= n, "too few snapshot chunks: {all:?}");
}

#[test]
fn raft_survives_garbled_messages() {
    sweep::<Raft>();
}

#[test]
fn paxos_survives_garbled_messages() {
    sweep::<Paxos>();
}
