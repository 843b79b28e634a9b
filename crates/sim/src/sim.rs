//! One simulated run: a cluster of replicas, a network, a nemesis, clients, and checkers,
//! all driven by one seed.
//!
//! Time is logical. Replica ticks happen every [`UNITS_PER_TICK`] time units; messages are
//! delivered at arbitrary units in between, so delays below one tick still reorder. Each
//! step ticks a node, delivers a message, runs a client operation or injects a fault, then
//! drives the touched node through its `Ready` (persist, sync, send, apply, advance) and
//! checks the invariants that step could have broken.

use crate::engine::EngineModel;
use crate::kv::{Command, Kv, Request};
use crate::linearizability::{self, KvOp, KvOut, Operation, Verdict};
use crate::net::{Net, NetParams};
use crate::rng::SimRng;
use crate::store::SimStore;
use concord_consensus::{
    ConfChange, ConfChangeItem, ConfState, Config, Entry, EntryKind, HardState, NodeId,
    ProposeError, ReadMode, ReadState, Recovered, Role, Snapshot, SnapshotMeta, Status, NO_NODE,
};
use concord_storage::StorageError;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Simulator time units per replica tick.
pub const UNITS_PER_TICK: u64 = 10;
/// Length of the safety phase (faults on), in ticks.
pub const SAFETY_TICKS: u64 = 600;
/// After healing, a write must complete within this many ticks or liveness is violated.
pub const LIVENESS_TICKS: u64 = 400;
/// Keys the clients touch; few keys make conflicts (and checker work) likely.
const NUM_KEYS: u8 = 3;
/// Timeouts and refused connections a client tolerates before recording an op as
/// indeterminate and moving on.
const MAX_ATTEMPTS: u32 = 6;
/// "Not leader" / "busy" answers a client tolerates for one op before giving up on it.
const MAX_REJECTIONS: u32 = 60;
/// Read states a node holds while waiting to apply up to their index.
const MAX_PENDING_READS_PER_NODE: usize = 256;
/// Expansions per key for the linearizability search before it says "inconclusive".
const LINEARIZABILITY_STEP_LIMIT: u64 = 500_000;
/// Ticks before a conf change that has not shown up in the leader's applied config is
/// proposed again.
const CONF_CHANGE_RETRY_TICKS: u64 = 30;
/// How long a "crash right after the next vote" stays armed.
const VOTE_CRASH_ARMED_TICKS: u64 = 60;
/// Vote grants remembered per node (older terms are long settled).
const MAX_GRANTS_KEPT: usize = 64;
/// Trace lines kept in verbose mode.
const MAX_TRACE_LINES: usize = 20_000;
/// Durable writes of a new leadership (its no-op, or its first client entries when it
/// appends no no-op) on which the new-leader crash fault is rolled.
const NEW_LEADER_FAULT_WRITES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFaults {
    None,
    Corrupt,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub seed: u64,
    pub inject_bug: Option<String>,
    pub disk_faults: DiskFaults,
    pub verbose: bool,
}

/// What one seed did and found.
#[derive(Clone, Debug, Default)]
pub struct SeedReport {
    pub seed: u64,
    pub nodes: usize,
    /// The first invariant violation, with the tick it was found at.
    pub violation: Option<String>,
    /// Client operations in the checked history (completed, plus indeterminate writes).
    pub ops_checked: usize,
    pub indeterminate: usize,
    pub inconclusive: bool,
    pub corrupt_injected: u32,
    pub corrupt_detected: u32,
    pub crashes: u32,
    pub partitions: u32,
    pub conf_changes: u32,
    pub transfers: u32,
    pub snapshots_installed: u32,
    pub messages: u64,
    /// Distinct client commands committed.
    pub commands_committed: u64,
    pub commit_latency_ticks: Vec<u64>,
    pub recovery_ticks: Vec<u64>,
    pub ticks: u64,
    pub trace: Vec<String>,
}

/// Per-seed fault and workload parameters.
#[derive(Clone, Debug)]
struct Profile {
    n: usize,
    crash_ppm: u32,
    restart_after: (u64, u64),
    partition_ppm: u32,
    heal_after: (u64, u64),
    /// Share of partitions that put the leader in a minority (the rest are random splits,
    /// minority/majority splits and bridges).
    leader_partition_ppm: u32,
    conf_ppm: u32,
    transfer_ppm: u32,
    /// Chance that a newly elected leader is cut off at once.
    new_leader_fault_ppm: u32,
    corrupt_share_ppm: u32,
    compact_every: u64,
    clients: u32,
    client_timeout_ticks: u64,
    think_ticks: u64,
    read_mode: ReadMode,
    pre_vote: bool,
    heartbeat_ticks: u32,
    election_ticks: u32,
    max_inflight_msgs: usize,
    max_batch_entries: usize,
}

impl Profile {
    fn choose(rng: &mut SimRng, disk: DiskFaults) -> Profile {
        // Two seeds in five churn leaders hard: five nodes, no pre-vote, one entry
        // per append, and most new leaders crash or are cut off at once.
        let churn = rng.chance(400_000);
        // One seed in five (of the rest) splits the brain: a settled leader is cut off
        // into a minority for a long while, with few crashes, so it goes on answering the
        // clients on its side while the majority elects a successor and moves on. Stale
        // reads (leases, read shortcuts) show up there.
        let split_brain = !churn && rng.chance(330_000);
        let n = match if churn {
            9
        } else if split_brain {
            rng.range(1, 10)
        } else {
            rng.range(0, 10)
        } {
            0 => 1,
            1..=5 => 3,
            _ => 5,
        };
        Profile {
            n,
            crash_ppm: if split_brain {
                rng.range(0, 5_000)
            } else {
                rng.range(0, 30_000)
            } as u32,
            restart_after: (1, rng.range(5, 60)),
            partition_ppm: if split_brain {
                rng.range(10_000, 30_000)
            } else {
                rng.range(0, 15_000)
            } as u32,
            heal_after: if split_brain {
                (40, rng.range(80, 200))
            } else {
                (10, rng.range(20, 120))
            },
            leader_partition_ppm: if split_brain { 800_000 } else { 250_000 },
            conf_ppm: rng.range(0, 10_000) as u32,
            transfer_ppm: rng.range(0, 8_000) as u32,
            new_leader_fault_ppm: if churn {
                700_000
            } else {
                rng.range(0, 500_000) as u32
            },
            corrupt_share_ppm: if disk == DiskFaults::Corrupt {
                rng.range(300_000, 800_000) as u32
            } else {
                0
            },
            compact_every: rng.range(4, 60),
            clients: rng.range(2, 6) as u32,
            client_timeout_ticks: rng.range(15, 45),
            think_ticks: rng.range(0, 4),
            read_mode: if rng.chance(500_000) {
                ReadMode::Lease
            } else {
                ReadMode::Safe
            },
            pre_vote: !churn && rng.chance(700_000),
            heartbeat_ticks: rng.range(1, 3) as u32,
            election_ticks: rng.range(10, 16) as u32,
            // Windows of one make replication step by step, which opens the windows that
            // ordering bugs (e.g. committing an old-term entry) need.
            max_inflight_msgs: if rng.chance(400_000) {
                1
            } else {
                rng.range(2, 32) as usize
            },
            max_batch_entries: if churn || rng.chance(400_000) {
                1
            } else {
                rng.range(2, 32) as usize
            },
        }
    }
}

/// What a node has persisted, mirrored as (term, entry digest, chain digest) so log
/// matching can be checked in O(1) per entry: the chain digest of index i folds in every
/// entry up to i, so two logs agree up to i iff their chain digests at i are equal.
#[derive(Clone, Debug, Default)]
struct ShadowLog {
    base_index: u64,
    base_term: u64,
    base_chain: u64,
    entries: Vec<(u64, u64, u64)>,
}

impl ShadowLog {
    fn last_index(&self) -> u64 {
        self.base_index + self.entries.len() as u64
    }
    fn get(&self, index: u64) -> Option<(u64, u64, u64)> {
        if index <= self.base_index {
            return None;
        }
        self.entries
            .get((index - self.base_index - 1) as usize)
            .copied()
    }
    fn chain_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            Some(self.base_chain)
        } else {
            self.get(index).map(|e| e.2)
        }
    }
    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            Some(self.base_term)
        } else {
            self.get(index).map(|e| e.0)
        }
    }
    /// Drops entries up to `index`, which becomes the base.
    fn rebase(&mut self, index: u64, term: u64, chain: u64) {
        if index >= self.base_index && self.term_at(index) == Some(term) {
            let drop = (index - self.base_index) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
        } else {
            self.entries.clear();
        }
        self.base_index = index;
        self.base_term = term;
        self.base_chain = chain;
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn bytes_digest(data: &[u8]) -> u64 {
    // FNV-1a, then a finaliser; collisions only matter across a few thousand entries.
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h ^ data.len() as u64)
}

/// What the entry asks the state machine to do (kind and bytes), whatever its term: the
/// same command may be chosen under different ballots on different Paxos acceptors.
fn command_digest(e: &Entry) -> u64 {
    let kind: u64 = match e.kind {
        EntryKind::Normal => 1,
        EntryKind::Noop => 2,
        EntryKind::ConfChange => 3,
    };
    mix(bytes_digest(&e.data) ^ (kind << 56))
}

fn entry_digest(e: &Entry) -> u64 {
    mix(command_digest(e) ^ mix(e.term))
}

fn chain(prev: u64, index: u64, term: u64, digest: u64) -> u64 {
    mix(prev ^ mix(index.wrapping_mul(31) ^ mix(term ^ mix(digest))))
}

struct Node<R, S> {
    id: NodeId,
    replica: Option<R>,
    store: S,
    kv: Kv,
    /// Membership as of `applied`, tracked by applying conf-change entries.
    conf: ConfState,
    applied: u64,
    applied_term: u64,
    snap_index: u64,
    reads: Vec<ReadState>,
    shadow: ShadowLog,
    /// Command digests of the entries written (index -> digest), and the same as of the
    /// last sync (plus the snapshot base then): what a crash cannot take away.
    written_cmds: BTreeMap<u64, u64>,
    synced_cmds: BTreeMap<u64, u64>,
    synced_base: u64,
    /// Hard states written since the last sync (a crash may keep any of them whole).
    written_hs: Vec<HardState>,
    /// The hard state last written to the store.
    hard_state: HardState,
    /// The hard state last made durable (written, then synced).
    synced_hard_state: HardState,
    /// Crash at the next persist, after writing but before syncing.
    crash_in_persist: bool,
    /// Crash at the next persist, after syncing but before sending (the work is durable
    /// here and nowhere else, as for S5 in Figure 8 of the Raft paper).
    crash_before_send: bool,
    /// Crash at the next persist, after syncing and in the middle of sending: a random
    /// subset of that Ready's messages leaves, the rest is lost (partial replication).
    crash_mid_send: bool,
    /// (term, durable writes seen) of this node's current leadership, for the new-leader
    /// fault.
    leader_writes: (u64, u32),
    /// Votes this node granted, by term/ballot (the last `MAX_GRANTS_KEPT`), across crashes.
    granted: BTreeMap<u64, NodeId>,
    /// The highest term/ballot it granted: a promise made to the world, durable or not.
    announced_promise: u64,
    /// Until this tick: crash right after sending a vote grant, and restart quickly.
    crash_after_vote_until: Option<u64>,
    restart_at_tick: u64,
    /// Its durable data was corrupted and the corruption is not yet detected.
    corrupted: bool,
    /// Its store was found corrupt: it stays down until removed from the group, then
    /// rejoins empty.
    wiped: bool,
    /// The term in which leader completeness was last checked for this node.
    leader_checked_term: u64,
}

#[derive(Clone, Debug)]
enum Pending {
    Write(Request),
    Read { key: u8 },
}

#[derive(Clone, Debug)]
struct InFlight {
    op_index: usize,
    req: u64,
    what: Pending,
    /// The node the current attempt waits on (`NO_NODE` between attempts).
    node: NodeId,
    attempt: u32,
    rejections: u32,
    deadline: u64,
    retry_at: u64,
}

struct Client {
    id: u32,
    next_req: u64,
    next_value: u64,
    hint: NodeId,
    /// The node whose side of a partition the client is on: it reaches only the nodes
    /// that node reaches (all of them when nothing is cut). Drawn anew at each partition.
    home: NodeId,
    /// Share of this client's operations that are reads. Read-mostly clients stuck with
    /// a deposed leader keep reading from it, which is what exposes stale reads.
    read_ppm: u32,
    busy: Option<InFlight>,
    idle_until: u64,
    /// Last value seen per key, used as a plausible CAS expectation.
    seen: [u64; NUM_KEYS as usize],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CyclePhase {
    Remove,
    AddLearner,
    Promote,
}

/// A membership change in progress: remove a node, add it back as a learner, promote it.
#[derive(Clone, Debug)]
struct Cycle {
    node: NodeId,
    phase: CyclePhase,
    /// The node lost its data: rebuild it empty once it is out of the group.
    wipe: bool,
    proposed_at_tick: Option<u64>,
}

pub struct Sim<R: EngineModel, S: SimStore> {
    opts: RunOptions,
    rng: SimRng,
    profile: Profile,
    initial: ConfState,
    nodes: Vec<Node<R, S>>,
    net: Net<R::Message>,
    clients: Vec<Client>,
    now: u64,
    faults_on: bool,
    heal_at_tick: Option<u64>,
    /// The current partition's two sides (a bridge node is in neither).
    main_cut: Option<(Vec<NodeId>, Vec<NodeId>)>,
    /// Nodes cut off from everyone, with the tick they come back (on top of `main_cut`).
    isolated: BTreeMap<NodeId, u64>,
    /// (node, from tick, until tick): isolations of new leaders scheduled a few ticks out.
    pending_isolations: Vec<(NodeId, u64, u64)>,
    cycle: Option<Cycle>,
    // --- checker state ---
    leaders_by_term: BTreeMap<u64, NodeId>,
    /// Log matching registry: (index, term) -> chain digest.
    chains: HashMap<(u64, u64), u64>,
    /// State-machine safety: index -> (term, entry digest, command digest) of the entry
    /// first applied there.
    applied_log: Vec<Option<(u64, u64, u64)>>,
    /// Digest of the state-machine snapshot at an index, first seen.
    snap_digests: HashMap<u64, u64>,
    /// Digests of every payload a client proposed: anything else applied is corrupt.
    proposed: HashSet<u64>,
    // --- history ---
    ops: Vec<Operation>,
    seq: u64,
    liveness_from_seq: Option<u64>,
    liveness_ok: bool,
    // --- metrics ---
    first_propose: BTreeMap<(u32, u64), u64>,
    recovery_from: Option<(u64, u64)>,
    report: SeedReport,
}

impl<R: EngineModel, S: SimStore> Sim<R, S> {
    pub fn new(opts: RunOptions) -> Result<Self, String> {
        let mut rng = SimRng::new(opts.seed);
        let profile = Profile::choose(&mut rng, opts.disk_faults);
        let initial = ConfState::new(1..=profile.n as u64);
        let params = NetParams {
            delay_min: 1,
            delay_max: rng.range(2, 3 * UNITS_PER_TICK),
            loss_ppm: rng.range(0, 50_000) as u32,
            dup_ppm: rng.range(0, 30_000) as u32,
        };
        let clients = (1..=profile.clients)
            .map(|id| Client {
                // Some clients only read (a dashboard, a cache filler); client 1 always
                // writes too, so the liveness phase has writes to wait for.
                read_ppm: if id > 1 && rng.chance(300_000) {
                    1_000_000
                } else {
                    rng.range(100_000, 900_000) as u32
                },
                id,
                next_req: 1,
                next_value: 1,
                hint: NO_NODE,
                home: rng.range(1, profile.n as u64 + 1),
                busy: None,
                idle_until: 0,
                seen: [0; NUM_KEYS as usize],
            })
            .collect();
        let report = SeedReport {
            seed: opts.seed,
            nodes: profile.n,
            ..SeedReport::default()
        };
        let mut sim = Sim {
            opts,
            rng,
            profile,
            initial,
            nodes: Vec::new(),
            net: Net::new(params),
            clients,
            now: 0,
            faults_on: true,
            heal_at_tick: None,
            main_cut: None,
            isolated: BTreeMap::new(),
            pending_isolations: Vec::new(),
            cycle: None,
            leaders_by_term: BTreeMap::new(),
            chains: HashMap::new(),
            applied_log: Vec::new(),
            snap_digests: HashMap::new(),
            proposed: HashSet::new(),
            ops: Vec::new(),
            seq: 0,
            liveness_from_seq: None,
            liveness_ok: false,
            first_propose: BTreeMap::new(),
            recovery_from: None,
            report,
        };
        for id in 1..=sim.profile.n as u64 {
            let config = sim.config(id);
            let replica = R::create(config, sim.initial.clone(), Recovered::default())
                .map_err(|e| format!("cannot create replica {id}: {e}"))?;
            sim.nodes.push(Node {
                id,
                replica: Some(replica),
                store: S::fresh(),
                kv: Kv::default(),
                conf: sim.initial.clone(),
                applied: 0,
                applied_term: 0,
                snap_index: 0,
                reads: Vec::new(),
                shadow: ShadowLog::default(),
                written_cmds: BTreeMap::new(),
                synced_cmds: BTreeMap::new(),
                synced_base: 0,
                written_hs: Vec::new(),
                hard_state: HardState::default(),
                synced_hard_state: HardState::default(),
                crash_in_persist: false,
                crash_before_send: false,
                crash_mid_send: false,
                leader_writes: (0, 0),
                crash_after_vote_until: None,
                granted: BTreeMap::new(),
                announced_promise: 0,
                restart_at_tick: 0,
                corrupted: false,
                wiped: false,
                leader_checked_term: 0,
            });
        }
        Ok(sim)
    }

    fn config(&mut self, id: NodeId) -> Config {
        let p = &self.profile;
        let mut c = Config::new(id);
        c.seed = self.rng.fork();
        c.heartbeat_ticks = p.heartbeat_ticks;
        c.election_ticks = p.election_ticks;
        c.pre_vote = p.pre_vote;
        c.check_quorum = true;
        c.read_mode = p.read_mode;
        c.max_inflight_msgs = p.max_inflight_msgs;
        c.max_batch_entries = p.max_batch_entries;
        c.max_pending_reads = 64;
        c.inject_bug = self.opts.inject_bug.clone();
        c
    }

    fn tick_now(&self) -> u64 {
        self.now / UNITS_PER_TICK
    }

    fn trace(&mut self, line: impl FnOnce() -> String) {
        if self.opts.verbose && self.report.trace.len() < MAX_TRACE_LINES {
            let t = self.tick_now();
            self.report.trace.push(format!("[t={t}] {}", line()));
        }
    }

    fn fail(&mut self, what: String) {
        if self.report.violation.is_none() {
            let t = self.tick_now();
            self.trace(|| format!("VIOLATION: {what}"));
            self.report.violation = Some(format!("{what} (at tick {t})"));
        }
    }

    fn idx(id: NodeId) -> usize {
        (id - 1) as usize
    }

    /// The node's status if it is up and leads.
    fn leader_status(&self, id: NodeId) -> Option<Status> {
        let st = self.nodes[Self::idx(id)].replica.as_ref()?.status();
        (st.role == Role::Leader).then_some(st)
    }

    fn is_up(&self, id: NodeId) -> bool {
        self.nodes
            .get(Self::idx(id))
            .is_some_and(|n| n.replica.is_some())
    }

    /// Runs the safety phase, then the liveness phase, then the history check.
    pub fn run(mut self) -> SeedReport {
        let safety_end = SAFETY_TICKS * UNITS_PER_TICK;
        self.run_until(safety_end);
        if self.report.violation.is_none() {
            self.start_liveness();
            let end = self.now + LIVENESS_TICKS * UNITS_PER_TICK;
            self.run_until(end);
            if self.report.violation.is_none() && !self.liveness_ok {
                for i in 0..self.nodes.len() {
                    let n = &self.nodes[i];
                    let line = match &n.replica {
                        Some(r) => format!("node {} status {:?}", n.id, r.status()),
                        None => format!("node {} down (wiped: {})", n.id, n.wiped),
                    };
                    self.trace(|| line);
                }
                for c in 0..self.clients.len() {
                    let cl = &self.clients[c];
                    let line = format!(
                        "client {} home {} hint {} busy {:?} idle until tick {}",
                        cl.id,
                        cl.home,
                        cl.hint,
                        cl.busy,
                        cl.idle_until / UNITS_PER_TICK
                    );
                    self.trace(|| line);
                }
                self.fail(format!(
                    "liveness: no client write completed within {LIVENESS_TICKS} ticks after \
                     healing every fault"
                ));
            }
        }
        self.finish()
    }

    fn run_until(&mut self, end: u64) {
        while self.report.violation.is_none() && self.now < end {
            if self.liveness_from_seq.is_some() && self.liveness_ok {
                break;
            }
            if self.now.is_multiple_of(UNITS_PER_TICK) {
                self.on_tick();
            }
            while self.report.violation.is_none() {
                let Some(env) = self.net.pop_due(self.now) else {
                    break;
                };
                if self.is_up(env.to) {
                    if let Some(r) = self.nodes[Self::idx(env.to)].replica.as_mut() {
                        let bad_before = r.bad_messages();
                        r.step(env.from, env.msg);
                        if r.bad_messages() != bad_before {
                            // Honest peers only: the sender or the receiver's validation is
                            // wrong. Replay with --verbose to see the surrounding history.
                            self.fail(format!(
                                "node {} dropped a message from node {} as impossible",
                                env.to, env.from
                            ));
                        }
                    }
                    self.drive(env.to);
                }
            }
            let next_tick = (self.now / UNITS_PER_TICK + 1) * UNITS_PER_TICK;
            let next = self.net.next_time().map_or(next_tick, |t| t.min(next_tick));
            self.now = next.max(self.now + 1);
        }
        self.report.ticks = self.tick_now();
    }

    fn start_liveness(&mut self) {
        self.trace(|| "liveness phase: heal everything".into());
        self.faults_on = false;
        self.heal_at_tick = None;
        self.main_cut = None;
        self.isolated.clear();
        self.pending_isolations.clear();
        self.apply_cuts();
        self.net.params.loss_ppm = 0;
        self.net.params.dup_ppm = 0;
        self.recovery_from = None;
        for id in 1..=self.profile.n as u64 {
            let n = &mut self.nodes[Self::idx(id)];
            n.crash_in_persist = false;
            n.crash_before_send = false;
            n.crash_mid_send = false;
            n.crash_after_vote_until = None;
            if n.replica.is_none() && !n.wiped {
                self.restart(id);
            }
        }
        self.liveness_from_seq = Some(self.seq);
    }

    // ----------------------------------------------------------------- one tick

    fn on_tick(&mut self) {
        let tick = self.tick_now();
        let mut order: Vec<NodeId> = (1..=self.profile.n as u64).collect();
        self.rng.shuffle(&mut order);
        for id in order {
            if self.report.violation.is_some() {
                return;
            }
            if let Some(r) = self.nodes[Self::idx(id)].replica.as_mut() {
                r.tick();
                self.drive(id);
            }
        }
        if self.faults_on {
            self.nemesis(tick);
        }
        self.membership(tick);
        self.clients_step();
    }

    /// The live leader with the highest term, if any.
    fn leader(&self) -> Option<(NodeId, u64)> {
        self.nodes
            .iter()
            .filter_map(|n| n.replica.as_ref().map(|r| (n.id, r.status())))
            .filter(|(_, s)| s.role == Role::Leader)
            .map(|(id, s)| (id, s.term))
            .max_by_key(|&(_, t)| t)
    }

    fn nemesis(&mut self, tick: u64) {
        let n = self.profile.n as u64;
        // Restarts.
        for id in 1..=n {
            let node = &mut self.nodes[Self::idx(id)];
            if node.crash_after_vote_until.is_some_and(|t| tick >= t) {
                node.crash_after_vote_until = None;
            }
            if node.replica.is_some()
                && (node.crash_in_persist || node.crash_before_send || node.crash_mid_send)
            {
                // The crash armed for "during the next persist" did not meet one: crash now.
                self.crash(id);
            } else if node.replica.is_none() && !node.wiped && node.restart_at_tick <= tick {
                self.restart(id);
            }
        }
        let leader = self.leader();
        // Crashes.
        if self.rng.chance(self.profile.crash_ppm) {
            let victim = match leader {
                Some((l, _)) if self.rng.chance(500_000) => l,
                _ => self.rng.range(1, n + 1),
            };
            if self.is_up(victim) {
                if let Some((l, term)) = leader {
                    if l == victim && self.recovery_from.is_none() {
                        self.recovery_from = Some((self.now, term));
                    }
                }
                let wait = self
                    .rng
                    .range(self.profile.restart_after.0, self.profile.restart_after.1);
                self.nodes[Self::idx(victim)].restart_at_tick = tick + wait;
                // One data loss at a time, and never during a membership cycle: losing a
                // second replica's data, or one a shrunken group needs, can lose the group.
                // Nor when some node's membership (applied or newest known) has the victim
                // among fewer than three voters, or is joint: random conf changes can leave
                // two voters, and losing one of two is losing the group, not a bug.
                let keeps_majority = self.nodes.iter().all(|x| {
                    let newest = x.replica.as_ref().map(|r| r.status().conf);
                    std::iter::once(&x.conf).chain(newest.as_ref()).all(|c| {
                        c.voters_outgoing.is_empty()
                            && (c.voters.len() >= 3 || !c.voters.contains(&victim))
                    })
                });
                let corrupt = n >= 3
                    && keeps_majority
                    && self.nodes.iter().all(|x| !x.wiped && !x.corrupted)
                    && self.cycle.is_none()
                    && self.rng.chance(self.profile.corrupt_share_ppm);
                let mut mode = self.rng.range(0, 5);
                if corrupt && self.nodes[Self::idx(victim)].store.corrupt(&mut self.rng) {
                    self.nodes[Self::idx(victim)].corrupted = true;
                    self.report.corrupt_injected += 1;
                    self.trace(|| format!("corrupt durable data of node {victim}"));
                    // Crash at once, so the corruption meets recovery before the store moves on.
                    mode = 3;
                }
                match mode {
                    2 => {
                        self.trace(|| format!("arm crash of node {victim} before its next send"));
                        self.nodes[Self::idx(victim)].crash_before_send = true;
                    }
                    0 => {
                        self.trace(|| {
                            format!("arm crash of node {victim} during its next persist")
                        });
                        self.nodes[Self::idx(victim)].crash_in_persist = true;
                    }
                    4 => {
                        self.trace(|| format!("arm crash of node {victim} while it next sends"));
                        self.nodes[Self::idx(victim)].crash_mid_send = true;
                    }
                    1 => {
                        self.trace(|| format!("arm crash of node {victim} after its next vote"));
                        self.nodes[Self::idx(victim)].crash_after_vote_until =
                            Some(tick + VOTE_CRASH_ARMED_TICKS);
                    }
                    _ => self.crash(victim),
                }
            }
        }
        // Partitions.
        let before = self.isolated.len();
        self.isolated.retain(|_, back| *back > tick);
        let mut changed = self.isolated.len() != before;
        let mut due = Vec::new();
        self.pending_isolations.retain(|&(x, at, back)| {
            if at <= tick {
                due.push((x, back));
            }
            at > tick
        });
        for (x, back) in due {
            if self.is_up(x) {
                self.isolated.insert(x, back);
                self.trace(|| format!("isolate node {x} until tick {back}"));
                changed = true;
            }
        }
        if changed {
            self.apply_cuts();
        }
        if let Some(at) = self.heal_at_tick {
            if tick >= at {
                self.trace(|| "heal partition".into());
                self.main_cut = None;
                self.heal_at_tick = None;
                self.apply_cuts();
            }
        } else if n >= 3 && self.rng.chance(self.profile.partition_ppm) {
            self.partition(leader, tick);
        }
        // Leadership transfer.
        if let Some((l, _)) = leader {
            if n >= 3 && self.rng.chance(self.profile.transfer_ppm) {
                let voters = self.nodes[Self::idx(l)].conf.voters.clone();
                if let Some(&to) = voters.iter().find(|&&v| v != l && self.rng.chance(500_000)) {
                    self.report.transfers += 1;
                    self.trace(|| format!("transfer leadership {l} -> {to}"));
                    if let Some(r) = self.nodes[Self::idx(l)].replica.as_mut() {
                        r.transfer_leader(to);
                    }
                    self.drive(l);
                }
            }
        }
        // Membership cycles.
        let data_loss = self.nodes.iter().any(|x| x.wiped || x.corrupted);
        if self.cycle.is_none() && !data_loss && n >= 3 && self.rng.chance(self.profile.conf_ppm) {
            let x = self.rng.range(1, n + 1);
            self.trace(|| format!("start membership cycle on node {x}"));
            self.cycle = Some(Cycle {
                node: x,
                phase: CyclePhase::Remove,
                wipe: false,
                proposed_at_tick: None,
            });
        }
    }

    fn partition(&mut self, leader: Option<(NodeId, u64)>, tick: u64) {
        let n = self.profile.n as u64;
        let mut all: Vec<NodeId> = (1..=n).collect();
        self.rng.shuffle(&mut all);
        let kind = if self.rng.chance(self.profile.leader_partition_ppm) {
            1
        } else {
            *self.rng.pick(&[0, 2, 3]).expect("not empty")
        };
        let (a, b, label): (Vec<NodeId>, Vec<NodeId>, &str) = match (kind, leader) {
            (1, Some((l, term))) => {
                if self.recovery_from.is_none() {
                    self.recovery_from = Some((self.now, term));
                }
                // The leader alone, or with a few followers (still a minority).
                let with = self.rng.range(0, (n - 1) / 2) as usize;
                let (mut a, mut b): (Vec<NodeId>, Vec<NodeId>) =
                    all.iter().copied().partition(|&x| x == l);
                a.extend(b.drain(..with));
                (a, b, "leader in minority")
            }
            (2, _) => {
                let minority = (n as usize - 1) / 2;
                let (a, b) = all.split_at(minority);
                (a.to_vec(), b.to_vec(), "minority/majority")
            }
            (3, _) => {
                // all[0] is the bridge: it keeps links to both sides.
                let half = 1 + (n as usize - 1) / 2;
                (all[1..half].to_vec(), all[half..].to_vec(), "bridge")
            }
            _ => {
                let k = self.rng.range(1, n) as usize;
                let (a, b) = all.split_at(k);
                (a.to_vec(), b.to_vec(), "random")
            }
        };
        self.trace(|| format!("partition ({label}) {a:?} | {b:?}"));
        self.main_cut = Some((a, b));
        self.apply_cuts();
        // Clients are on one side or the other, like the nodes.
        for c in 0..self.clients.len() {
            self.clients[c].home = self.rng.range(1, n + 1);
        }
        self.report.partitions += 1;
        let heal = self
            .rng
            .range(self.profile.heal_after.0, self.profile.heal_after.1);
        self.heal_at_tick = Some(tick + heal);
        self.trace(|| format!("partition heals in {heal} ticks"));
    }

    /// Rebuilds the network's cut links from the partition and the isolated nodes.
    fn apply_cuts(&mut self) {
        self.net.heal();
        if let Some((a, b)) = &self.main_cut {
            self.net.cut_between(a, b);
        }
        let all: Vec<NodeId> = (1..=self.profile.n as u64).collect();
        for &x in self.isolated.keys() {
            self.net.cut_between(&[x], &all);
        }
    }

    fn crash(&mut self, id: NodeId) {
        let node = &mut self.nodes[Self::idx(id)];
        node.replica = None;
        node.crash_in_persist = false;
        node.crash_before_send = false;
        node.crash_mid_send = false;
        node.crash_after_vote_until = None;
        node.reads.clear();
        node.store.crash(&mut self.rng);
        self.report.crashes += 1;
        self.trace(|| format!("crash node {id}"));
    }

    fn restart(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let rec = match self.nodes[i].store.recover() {
            Ok(rec) => rec,
            Err(StorageError::Corrupt { detail, .. }) => {
                // Only injected damage may be reported: a log that calls an ordinary crash's
                // leftovers corrupt would make a node refuse to start after a power cut.
                if !self.nodes[i].corrupted {
                    self.fail(format!(
                        "node {id}: recovery reported corruption although none was injected ({detail})"
                    ));
                    return;
                }
                self.report.corrupt_detected += 1;
                self.trace(|| format!("node {id}: corruption detected on recovery ({detail})"));
                let node = &mut self.nodes[i];
                node.wiped = true;
                node.corrupted = false;
                node.store = S::fresh();
                self.start_wipe_cycle(id);
                return;
            }
            Err(e) => {
                self.fail(format!("node {id}: store failed to recover: {e}"));
                return;
            }
        };
        if self.nodes[i].corrupted {
            self.fail(format!(
                "node {id}: its durable data was corrupted but recovery did not detect it"
            ));
            return;
        }
        let mut kv = Kv::default();
        let mut conf = self.initial.clone();
        let (mut base_index, mut base_term) = (0, 0);
        if let Some(snap) = &rec.snapshot {
            match Kv::restore(&snap.data) {
                Ok(k) => kv = k,
                Err(e) => {
                    self.fail(format!("node {id}: recovered snapshot undecodable: {e}"));
                    return;
                }
            }
            self.check_snapshot_digest(id, snap.meta.index, &snap.data);
            conf = snap.meta.conf.clone();
            base_index = snap.meta.index;
            base_term = snap.meta.term;
        }
        if rec.applied != base_index {
            self.fail(format!(
                "node {id}: store recovered applied={} but snapshot index {base_index}",
                rec.applied
            ));
            return;
        }
        let synced = self.nodes[i].synced_hard_state;
        let hs = rec.hard_state;
        // What was synced, or something written after it: a record written but not yet
        // fsynced may survive a crash whole (a later term, or this term's vote when none
        // was synced; a vote is only ever set once per term).
        if hs.term < synced.term
            || (hs.term == synced.term && hs.vote != synced.vote && synced.vote != NO_NODE)
        {
            self.fail(format!(
                "node {id}: store recovered hard state {hs:?} but {synced:?} was synced"
            ));
            return;
        }
        // And exactly one of those: the synced one or one written since that sync.
        if (hs.term, hs.vote) != (synced.term, synced.vote)
            && !self.nodes[i]
                .written_hs
                .iter()
                .any(|w| (w.term, w.vote) == (hs.term, hs.vote))
        {
            self.fail(format!(
                "node {id}: recovered hard state {hs:?} was never written (synced {synced:?})"
            ));
            return;
        }
        self.nodes[i].written_hs.clear();
        let base_chain = self.base_chain(base_index, base_term);
        let node = &mut self.nodes[i];
        node.kv = kv;
        node.conf = conf;
        node.applied = base_index;
        node.applied_term = base_term;
        node.snap_index = base_index;
        node.hard_state = rec.hard_state;
        node.synced_hard_state = rec.hard_state;
        node.shadow = ShadowLog {
            base_index,
            base_term,
            base_chain,
            entries: Vec::new(),
        };
        node.leader_checked_term = 0;
        let entries = rec.entries.clone();
        if !entries.is_empty() {
            if entries[0].index != base_index + 1 {
                self.fail(format!(
                    "node {id}: recovered log starts at {} after snapshot {base_index}",
                    entries[0].index
                ));
                return;
            }
            self.written_cmds_clear(id);
            self.shadow_append(id, &entries);
        } else {
            self.written_cmds_clear(id);
        }
        {
            let node = &mut self.nodes[i];
            node.synced_cmds = node.written_cmds.clone();
            node.synced_base = node.shadow.base_index;
        }
        let config = self.config(id);
        match R::create(config, self.initial.clone(), rec) {
            Ok(r) => self.nodes[i].replica = Some(r),
            Err(e) => {
                self.fail(format!("node {id}: cannot restart replica: {e}"));
                return;
            }
        }
        self.trace(|| format!("restart node {id} (snapshot {base_index})"));
        self.drive(id);
    }

    fn base_chain(&self, index: u64, term: u64) -> u64 {
        if index == 0 {
            return 0;
        }
        self.chains
            .get(&(index, term))
            .copied()
            .unwrap_or_else(|| mix(index ^ mix(term)))
    }

    fn start_wipe_cycle(&mut self, id: NodeId) {
        match &mut self.cycle {
            Some(c) if c.node == id => {
                c.wipe = true;
                c.phase = CyclePhase::Remove;
                c.proposed_at_tick = None;
            }
            _ => {
                // Another cycle may be running; the wipe cycle waits for it in `membership`.
            }
        }
    }

    // ----------------------------------------------------------------- membership

    fn membership(&mut self, tick: u64) {
        if self.cycle.is_none() {
            if let Some(w) = self.nodes.iter().find(|n| n.wiped).map(|n| n.id) {
                self.trace(|| format!("start rejoin cycle for wiped node {w}"));
                self.cycle = Some(Cycle {
                    node: w,
                    phase: CyclePhase::Remove,
                    wipe: true,
                    proposed_at_tick: None,
                });
            }
        }
        let Some(mut cycle) = self.cycle.clone() else {
            return;
        };
        let Some((leader, _)) = self.leader() else {
            return;
        };
        let x = cycle.node;
        let conf = self.nodes[Self::idx(leader)].conf.clone();
        let (done, change) = match cycle.phase {
            CyclePhase::Remove => (!conf.all_nodes().contains(&x), ConfChangeItem::Remove(x)),
            CyclePhase::AddLearner => (conf.learners.contains(&x), ConfChangeItem::AddLearner(x)),
            CyclePhase::Promote => (conf.voters.contains(&x), ConfChangeItem::AddVoter(x)),
        };
        if done {
            cycle.proposed_at_tick = None;
            match cycle.phase {
                CyclePhase::Remove => {
                    if cycle.wipe {
                        self.rebuild_empty(x);
                    }
                    cycle.phase = CyclePhase::AddLearner;
                }
                CyclePhase::AddLearner => cycle.phase = CyclePhase::Promote,
                CyclePhase::Promote => {
                    self.trace(|| format!("membership cycle on node {x} done"));
                    self.cycle = None;
                    return;
                }
            }
            self.cycle = Some(cycle);
            return;
        }
        let due = cycle
            .proposed_at_tick
            .is_none_or(|t| tick >= t + CONF_CHANGE_RETRY_TICKS);
        // Removing the last voter would leave no group at all.
        let last_voter = matches!(change, ConfChangeItem::Remove(_)) && conf.voters.len() <= 1;
        if due && !last_voter {
            let cc = ConfChange {
                changes: vec![change],
            };
            let res = match self.nodes[Self::idx(leader)].replica.as_mut() {
                Some(r) => r.propose_conf_change(cc),
                None => return,
            };
            if res.is_ok() {
                self.report.conf_changes += 1;
                cycle.proposed_at_tick = Some(tick);
                self.trace(|| format!("propose {change:?} at leader {leader}"));
            }
            self.cycle = Some(cycle);
            self.drive(leader);
        }
    }

    /// A node whose data was lost rejoins as a brand-new, empty member. It knows no votes,
    /// which is safe only because it was removed from the group first: a candidate that
    /// still counts it must lack the committed removal, and too few such nodes remain to
    /// form a majority with it. It starts from the founding configuration, as every node
    /// does, because the log it will replay from index 1 does not contain that
    /// configuration (only changes to it); a snapshot, if it gets one, carries the current
    /// configuration instead.
    fn rebuild_empty(&mut self, id: NodeId) {
        let config = self.config(id);
        let replica = match R::create(config, self.initial.clone(), Recovered::default()) {
            Ok(r) => r,
            Err(e) => {
                self.fail(format!("node {id}: cannot rebuild empty replica: {e}"));
                return;
            }
        };
        let node = &mut self.nodes[Self::idx(id)];
        node.replica = Some(replica);
        node.store = S::fresh();
        node.kv = Kv::default();
        node.conf = self.initial.clone();
        node.applied = 0;
        node.applied_term = 0;
        node.snap_index = 0;
        node.reads.clear();
        node.shadow = ShadowLog::default();
        node.written_cmds.clear();
        node.synced_cmds.clear();
        node.synced_base = 0;
        node.hard_state = HardState::default();
        node.synced_hard_state = HardState::default();
        node.crash_in_persist = false;
        node.corrupted = false;
        node.granted.clear();
        node.announced_promise = 0;
        node.wiped = false;
        node.leader_checked_term = 0;
        self.trace(|| format!("node {id} rebuilt empty; it rejoins as a learner"));
        self.drive(id);
    }

    // ----------------------------------------------------------------- Ready

    /// Drives a node through every pending `Ready`, in contract order, then checks it.
    fn drive(&mut self, id: NodeId) {
        let i = Self::idx(id);
        // Bounded: a replica that keeps producing work forever is itself a bug.
        for _ in 0..1000 {
            if self.report.violation.is_some() {
                return;
            }
            let mut rd = match self.nodes[i].replica.as_mut() {
                Some(r) if r.has_ready() => r.ready(),
                _ => {
                    self.check_node(id);
                    return;
                }
            };
            let prev_hs = self.nodes[i].hard_state;
            // 0. What the replica says does not depend on this Ready leaves first, as the
            // node runtime sends it, so a crash below (before or during the fsync) finds
            // the leader's entries already on their way to followers. The claim is checked.
            let early = rd.send_before_persist.min(rd.messages.len());
            if early > 0
                && rd
                    .hard_state
                    .is_some_and(|h| (h.term, h.vote) != (prev_hs.term, prev_hs.vote))
            {
                self.fail(format!(
                    "node {id}: messages sent before persisting a Ready that changes term or vote"
                ));
                return;
            }
            for m in rd.messages.drain(..early) {
                if R::vote_granted(&m.msg).is_some() {
                    self.fail(format!("node {id}: a vote sent before it was durable"));
                    return;
                }
                self.net.send(self.now, id, m.to, m.msg, &mut self.rng);
            }
            // 0b. As the node runtime does: committed entries are durable on a quorum, so
            // they are applied before this Ready's own entries are persisted (not with a
            // snapshot, not past a membership change). A crash in the persist below then
            // finds them applied and answered, which is what the sweeps check.
            if rd.snapshot.is_none() {
                let n = rd
                    .committed
                    .iter()
                    .take_while(|e| e.kind != EntryKind::ConfChange)
                    .count();
                let early_apply: Vec<Entry> = rd.committed.drain(..n).collect();
                for e in early_apply {
                    self.check_quorum_durable(id, &e);
                    if self.report.violation.is_some() {
                        return;
                    }
                    self.apply_entry(id, e, &rd.entries);
                    if self.report.violation.is_some() {
                        return;
                    }
                }
                // The node answers reads whose index is now applied right away too.
                self.serve_reads(id);
            }
            // 1. Persist.
            let needs_sync = rd.snapshot.is_some()
                || !rd.entries.is_empty()
                || rd
                    .hard_state
                    .is_some_and(|h| (h.term, h.vote) != (prev_hs.term, prev_hs.vote));
            // What this node held at the entries' indices before this Ready (a snapshot
            // below may drop it from the mirror, yet the engine may re-emit it).
            let held_before: Vec<Option<u64>> = {
                let shadow = &self.nodes[i].shadow;
                rd.entries
                    .iter()
                    .map(|e| shadow.get(e.index).map(|x| x.0))
                    .collect()
            };
            let mut wrote = false;
            if let Some(snap) = &rd.snapshot {
                wrote = true;
                self.persist_snapshot(id, snap);
            }
            if !rd.entries.is_empty() {
                wrote = true;
                // The promise that binds the node is the highest it announced, durable or not.
                let mut prev = self.nodes[i].hard_state;
                prev.term = prev.term.max(self.nodes[i].announced_promise);
                let first = rd.entries[0].index;
                let held = |index: u64| {
                    index
                        .checked_sub(first)
                        .and_then(|k| held_before.get(k as usize).copied().flatten())
                };
                if let Err(e) = R::check_persist(&prev, &rd.entries, rd.hard_state.as_ref(), &held)
                {
                    self.fail(format!("node {id}: {e}"));
                    return;
                }
                if let Err(e) = self.nodes[i].store.append(&rd.entries) {
                    self.fail(format!("node {id}: store rejected append: {e}"));
                    return;
                }
                self.shadow_append(id, &rd.entries);
            }
            if let Some(hs) = rd.hard_state {
                wrote = true;
                self.check_hard_state(id, hs);
                if let Err(e) = self.nodes[i].store.set_hard_state(hs) {
                    self.fail(format!("node {id}: store rejected hard state: {e}"));
                    return;
                }
                self.nodes[i].hard_state = hs;
                self.nodes[i].written_hs.push(hs);
                self.trace(|| format!("node {id} persists {hs:?}"));
            }
            if self.report.violation.is_some() {
                return;
            }
            // Only a commit-index change may be persisted lazily (see `HardState`).
            if needs_sync && !rd.must_sync {
                self.fail(format!(
                    "node {id}: Ready carried durable state but must_sync was false"
                ));
                return;
            }
            if self.nodes[i].crash_in_persist && wrote {
                // Power loss between write and fsync: the messages never leave.
                self.trace(|| format!("node {id} crashes before fsync"));
                self.crash(id);
                return;
            }
            if rd.must_sync {
                if let Err(e) = self.nodes[i].store.sync() {
                    self.fail(format!("node {id}: sync failed: {e}"));
                    return;
                }
                let node = &mut self.nodes[i];
                node.synced_hard_state = node.hard_state;
                node.written_hs.clear();
                node.synced_cmds = node.written_cmds.clone();
                node.synced_base = node.shadow.base_index;
            }
            if wrote && self.faults_on && self.profile.n >= 3 {
                self.maybe_fault_new_leader(id);
                if self.nodes[i].replica.is_none() {
                    return;
                }
            }
            if self.nodes[i].crash_before_send && wrote {
                self.trace(|| format!("node {id} crashes after fsync, before sending"));
                self.crash(id);
                return;
            }
            // 2. Send (all of it, or a random part if the node loses power while sending).
            let cut_send = self.nodes[i].crash_mid_send && wrote;
            let mut voted = false;
            for m in rd.messages {
                if cut_send && self.rng.chance(500_000) {
                    continue;
                }
                if let Some(term) = R::vote_granted(&m.msg) {
                    voted = true;
                    self.record_grant(id, term, m.to);
                    if self.report.violation.is_some() {
                        return;
                    }
                }
                self.net.send(self.now, id, m.to, m.msg, &mut self.rng);
            }
            if cut_send {
                // The entries are durable here and, at most, on the followers that got
                // their append: Figure 8's partially replicated entries.
                self.trace(|| format!("node {id} crashes after fsync, while sending"));
                self.crash(id);
                return;
            }
            if voted && self.nodes[i].crash_after_vote_until.is_some() {
                // Power loss right after voting, and a quick restart: a vote that was not
                // durable is forgotten while the election is still running.
                self.trace(|| format!("node {id} crashes right after voting"));
                self.crash(id);
                let back = self.tick_now() + self.rng.range(0, 2);
                self.nodes[i].restart_at_tick = back;
                return;
            }
            // 3. Apply.
            for e in rd.committed {
                self.apply_entry(id, e, &[]);
                if self.report.violation.is_some() {
                    return;
                }
            }
            let node = &mut self.nodes[i];
            node.reads.extend(rd.read_states);
            if node.reads.len() > MAX_PENDING_READS_PER_NODE {
                // Oldest first: their clients have likely timed out already.
                let excess = node.reads.len() - MAX_PENDING_READS_PER_NODE;
                node.reads.drain(..excess);
            }
            self.serve_reads(id);
            // 4. Advance.
            if let Some(r) = self.nodes[i].replica.as_mut() {
                r.advance();
            }
            self.maybe_compact(id);
        }
        self.fail(format!("node {id}: still has work after 1000 Ready rounds"));
    }

    /// A leader that just won (one of its first durable writes of the term is durable,
    /// not yet sent: its no-op, or its first client entries if it appends none) may crash
    /// before sending it, while sending it (some followers get it, others do not), or be
    /// armed to crash before sending its next one; with quick restarts this replays the
    /// crash patterns of the Raft paper's Figure 8.
    fn maybe_fault_new_leader(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let Some(st) = self.leader_status(id) else {
            return;
        };
        let node = &mut self.nodes[i];
        if node.leader_writes.0 != st.term {
            node.leader_writes = (st.term, 0);
        }
        node.leader_writes.1 += 1;
        if node.leader_writes.1 > NEW_LEADER_FAULT_WRITES
            || !self.rng.chance(self.profile.new_leader_fault_ppm)
        {
            return;
        }
        let back = self.tick_now() + self.rng.range(1, 12);
        match self.rng.range(0, 3) {
            0 => {
                self.trace(|| format!("new leader {id} crashes before its first send"));
                if self.recovery_from.is_none() {
                    self.recovery_from = Some((self.now, st.term));
                }
                self.crash(id);
            }
            1 => {
                self.trace(|| format!("new leader {id} will crash while sending"));
                self.nodes[i].crash_mid_send = true;
            }
            _ => {
                self.trace(|| format!("new leader {id} will crash before its next send"));
                self.nodes[i].crash_before_send = true;
            }
        }
        self.nodes[i].restart_at_tick = back;
    }

    /// Remembers a vote grant; granting one term to two candidates breaks election safety
    /// (whether or not a second leader happens to emerge in this run).
    fn record_grant(&mut self, id: NodeId, term: u64, to: NodeId) {
        let node = &mut self.nodes[Self::idx(id)];
        node.announced_promise = node.announced_promise.max(term);
        let first = *node.granted.entry(term).or_insert(to);
        while node.granted.len() > MAX_GRANTS_KEPT {
            node.granted.pop_first();
        }
        if first != to {
            self.fail(format!(
                "election safety: node {id} granted its vote for term {term} to both {first} \
                 and {to}"
            ));
        }
    }

    fn persist_snapshot(&mut self, id: NodeId, snap: &Snapshot) {
        let i = Self::idx(id);
        if snap.meta.index <= self.nodes[i].applied {
            self.fail(format!(
                "node {id}: received snapshot at {} but has applied {} already",
                snap.meta.index, self.nodes[i].applied
            ));
            return;
        }
        if let Err(e) = self.nodes[i].store.install_snapshot(snap) {
            self.fail(format!("node {id}: store rejected snapshot: {e}"));
            return;
        }
        let kv = match Kv::restore(&snap.data) {
            Ok(kv) => kv,
            Err(e) => {
                self.fail(format!("node {id}: snapshot data undecodable: {e}"));
                return;
            }
        };
        self.check_snapshot_digest(id, snap.meta.index, &snap.data);
        let chain = self.base_chain(snap.meta.index, snap.meta.term);
        let node = &mut self.nodes[i];
        node.shadow.rebase(snap.meta.index, snap.meta.term, chain);
        node.kv = kv;
        node.conf = snap.meta.conf.clone();
        node.applied = snap.meta.index;
        node.applied_term = snap.meta.term;
        node.snap_index = snap.meta.index;
        node.reads.clear();
        self.report.snapshots_installed += 1;
        self.trace(|| format!("node {id} installs snapshot at {}", snap.meta.index));
    }

    fn check_hard_state(&mut self, id: NodeId, hs: HardState) {
        let prev = self.nodes[Self::idx(id)].hard_state;
        if hs.term < prev.term {
            self.fail(format!(
                "node {id}: persisted term went back from {} to {}",
                prev.term, hs.term
            ));
        } else if hs.term == prev.term && prev.vote != NO_NODE && hs.vote != prev.vote {
            self.fail(format!(
                "node {id}: changed its vote in term {} from {} to {}",
                hs.term, prev.vote, hs.vote
            ));
        }
    }

    /// An entry applied before its Ready is persisted must already be durable (synced) on a
    /// quorum of some configuration a node knows: the claim early apply rests on
    /// (docs/consensus.md, rule 3).
    fn check_quorum_durable(&mut self, id: NodeId, e: &Entry) {
        let cmd = command_digest(e);
        let has = |n: NodeId| {
            self.nodes.iter().find(|x| x.id == n).is_some_and(|x| {
                x.synced_base >= e.index || x.synced_cmds.get(&e.index) == Some(&cmd)
            })
        };
        let majority =
            |vs: &[NodeId]| vs.is_empty() || vs.iter().filter(|&&v| has(v)).count() * 2 > vs.len();
        let ok_in = |c: &ConfState| majority(&c.voters) && majority(&c.voters_outgoing);
        let i = Self::idx(id);
        let newest = self.nodes[i].replica.as_ref().map(|r| r.status().conf);
        let applied_conf = self.nodes[i].conf.clone();
        // Any configuration some node knows (the committing leader's may be newer).
        let any = self
            .nodes
            .iter()
            .any(|x| ok_in(&x.conf) || x.replica.as_ref().is_some_and(|r| ok_in(&r.status().conf)));
        if any {
            return;
        }
        let holders: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|x| has(x.id))
            .map(|x| x.id)
            .collect();
        self.fail(format!(
            "node {id}: applies {}@{} before persisting, but it is durable only on {holders:?} \
             (conf {applied_conf:?}, newest {newest:?})",
            e.index, e.term
        ));
    }

    fn written_cmds_clear(&mut self, id: NodeId) {
        self.nodes[Self::idx(id)].written_cmds.clear();
    }

    /// Mirrors an append and checks log matching through the chain registry.
    fn shadow_append(&mut self, id: NodeId, entries: &[Entry]) {
        let i = Self::idx(id);
        {
            let w = &mut self.nodes[i].written_cmds;
            let first = entries[0].index;
            let _ = w.split_off(&first);
            for e in entries {
                w.insert(e.index, command_digest(e));
            }
        }
        let first = entries[0].index;
        let shadow = &mut self.nodes[i].shadow;
        if first > shadow.last_index() + 1 {
            let last = shadow.last_index();
            self.fail(format!(
                "node {id}: appended entry {first} leaves a gap after {last}"
            ));
            return;
        }
        let mut bad = None;
        for e in entries {
            if e.index <= shadow.base_index {
                continue;
            }
            let keep = (e.index - shadow.base_index - 1) as usize;
            shadow.entries.truncate(keep);
            let prev = shadow.chain_at(e.index - 1).expect("contiguous");
            let d = entry_digest(e);
            let c = chain(prev, e.index, e.term, d);
            shadow.entries.push((e.term, d, c));
            if R::log_matching() {
                let known = *self.chains.entry((e.index, e.term)).or_insert(c);
                if known != c && bad.is_none() {
                    bad = Some(e.index);
                }
            }
        }
        if let Some(index) = bad {
            let term = self.nodes[i].shadow.term_at(index).unwrap_or(0);
            self.fail(format!(
                "log matching: node {id} persisted entry {index}@{term} whose log prefix \
                 differs from another node's entry {index}@{term}"
            ));
        }
    }

    fn check_snapshot_digest(&mut self, id: NodeId, index: u64, data: &[u8]) {
        let d = bytes_digest(data);
        let known = *self.snap_digests.entry(index).or_insert(d);
        if known != d {
            self.fail(format!(
                "state-machine safety: node {id}'s snapshot at index {index} differs from \
                 another node's state at that index"
            ));
        }
    }

    /// Applies a committed entry. `unwritten` holds the entries of the Ready being handled
    /// that are not persisted yet (an entry applied before its Ready is persisted must be
    /// the one that Ready writes).
    fn apply_entry(&mut self, id: NodeId, e: Entry, unwritten: &[Entry]) {
        let i = Self::idx(id);
        let node = &self.nodes[i];
        if e.index != node.applied + 1 {
            self.fail(format!(
                "node {id}: applied entry {} right after {}",
                e.index, node.applied
            ));
            return;
        }
        let d = entry_digest(&e);
        // The contract: committed entries are in this node's log (durable, or written by
        // the Ready that commits them).
        if let Some(w) = unwritten.iter().find(|w| w.index == e.index) {
            if w.term != e.term || entry_digest(w) != d {
                self.fail(format!(
                    "node {id}: committed entry {}@{} differs from the one its Ready writes",
                    e.index, e.term
                ));
                return;
            }
        } else if let Some((term, digest, _)) = node.shadow.get(e.index) {
            if term != e.term || digest != d {
                self.fail(format!(
                    "node {id}: committed entry {}@{} differs from what it persisted",
                    e.index, e.term
                ));
                return;
            }
        } else if e.index > node.shadow.base_index {
            self.fail(format!(
                "node {id}: committed entry {}@{} that it never persisted",
                e.index, e.term
            ));
            return;
        }
        // State-machine safety: one command per index, whatever term it carries here.
        let slot = (e.index - 1) as usize;
        if self.applied_log.len() <= slot {
            self.applied_log.resize(slot + 1, None);
        }
        let cmd = command_digest(&e);
        let first_apply = match self.applied_log[slot] {
            Some((t, _, c)) if c != cmd => {
                self.fail(format!(
                    "state-machine safety: node {id} applied a {:?} entry at index {} \
                     (term {}) but another node applied a different command there (term {t})",
                    e.kind, e.index, e.term
                ));
                return;
            }
            Some(_) => false,
            None => {
                self.applied_log[slot] = Some((e.term, d, cmd));
                true
            }
        };
        if first_apply {
            if let Some((from, term)) = self.recovery_from {
                if e.term > term {
                    self.report
                        .recovery_ticks
                        .push((self.now - from) / UNITS_PER_TICK);
                    self.recovery_from = None;
                }
            }
        }
        match e.kind {
            EntryKind::Normal => {
                if !self.proposed.contains(&bytes_digest(&e.data)) {
                    self.fail(format!(
                        "node {id} applied entry {} whose data no client proposed (corrupt?)",
                        e.index
                    ));
                    return;
                }
                let req = match Request::decode(&e.data) {
                    Ok(r) => r,
                    Err(why) => {
                        self.fail(format!("node {id} applied undecodable entry: {why}"));
                        return;
                    }
                };
                if first_apply {
                    if let Some(t0) = self.first_propose.remove(&(req.client, req.req)) {
                        self.report.commands_committed += 1;
                        self.report
                            .commit_latency_ticks
                            .push((self.now - t0) / UNITS_PER_TICK);
                    }
                }
                let out = self.nodes[i].kv.apply(&req);
                if let Some(out) = out {
                    self.respond(id, req.client, req.req, None, out);
                }
            }
            EntryKind::Noop => {}
            EntryKind::ConfChange => match ConfChange::decode(&e.data) {
                Ok(cc) => R::apply_conf_change(&mut self.nodes[i].conf, &cc),
                Err(why) => {
                    self.fail(format!("node {id} applied undecodable conf change: {why}"));
                    return;
                }
            },
        }
        let node = &mut self.nodes[i];
        node.applied = e.index;
        node.applied_term = e.term;
    }

    fn serve_reads(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let applied = self.nodes[i].applied;
        if self.nodes[i].reads.iter().all(|r| r.index > applied) {
            return;
        }
        let (ready, waiting): (Vec<ReadState>, Vec<ReadState>) = self.nodes[i]
            .reads
            .drain(..)
            .partition(|r| r.index <= applied);
        self.nodes[i].reads = waiting;
        for rs in ready {
            let Some((client, req, attempt)) = decode_ctx(&rs.ctx) else {
                self.fail(format!("node {id}: read state with a foreign ctx"));
                return;
            };
            let key = match self.clients.get((client as usize).wrapping_sub(1)) {
                Some(Client {
                    busy:
                        Some(InFlight {
                            what: Pending::Read { key },
                            ..
                        }),
                    ..
                }) => *key,
                _ => continue,
            };
            let v = self.nodes[i].kv.get(key);
            self.respond(id, client, req, Some(attempt), KvOut::Value(v));
        }
    }

    fn maybe_compact(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let node = &self.nodes[i];
        if node.replica.is_none() || node.applied < node.snap_index + self.profile.compact_every {
            return;
        }
        let index = node.applied;
        let data = node.kv.snapshot();
        let meta = SnapshotMeta {
            index,
            term: node.applied_term,
            conf: node.conf.clone(),
        };
        self.check_snapshot_digest(id, index, &data);
        let chain = match self.nodes[i].shadow.chain_at(index) {
            Some(c) => c,
            None => self.base_chain(index, meta.term),
        };
        let snap = Snapshot {
            meta,
            data: data.clone(),
        };
        let node = &mut self.nodes[i];
        if let Err(e) = node.store.install_snapshot(&snap) {
            self.fail(format!("node {id}: store rejected local snapshot: {e}"));
            return;
        }
        node.shadow.rebase(index, snap.meta.term, chain);
        node.snap_index = index;
        if let Some(r) = node.replica.as_mut() {
            r.compact(index, data);
        }
    }

    // ----------------------------------------------------------------- checks

    /// Election safety and leader completeness for the node just driven.
    fn check_node(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let Some(st) = self.leader_status(id) else {
            return;
        };
        let other = *self.leaders_by_term.entry(st.term).or_insert(id);
        if other != id {
            self.fail(format!(
                "election safety: nodes {other} and {id} both led term {}",
                st.term
            ));
            return;
        }
        if self.nodes[i].leader_checked_term == st.term {
            return;
        }
        self.nodes[i].leader_checked_term = st.term;
        self.trace(|| format!("node {id} leads term {}", st.term));
        // Cutting a leader off the moment it is elected strands its first entries on it
        // alone, the raw material of the Raft paper's Figure 8 histories.
        if self.faults_on
            && self.profile.n >= 3
            && !self.isolated.contains_key(&id)
            && self.rng.chance(self.profile.new_leader_fault_ppm)
        {
            // At once, or a few ticks later: after its first appends were acknowledged but
            // perhaps before the next ones arrive.
            let at = self.tick_now() + self.rng.range(0, 2) * self.rng.range(1, 6);
            let back = at + self.rng.range(2, 30);
            self.report.partitions += 1;
            if self.recovery_from.is_none() {
                self.recovery_from = Some((self.now, st.term));
            }
            if at == self.tick_now() {
                self.isolated.insert(id, back);
                self.apply_cuts();
                self.trace(|| format!("isolate new leader {id} until tick {back}"));
            } else {
                self.pending_isolations.push((id, at, back));
            }
        }
        if !R::leader_completeness() {
            return;
        }
        let shadow = &self.nodes[i].shadow;
        let start = shadow.base_index + 1;
        for index in start..=self.applied_log.len() as u64 {
            let Some((term, digest, _)) = self.applied_log[(index - 1) as usize] else {
                continue;
            };
            match shadow.get(index) {
                Some((t, d, _)) if t == term && d == digest => {}
                _ => {
                    self.fail(format!(
                        "leader completeness: leader {id} of term {} lacks committed entry \
                         {index}@{term}",
                        st.term
                    ));
                    return;
                }
            }
        }
    }

    // ----------------------------------------------------------------- clients

    fn clients_step(&mut self) {
        for c in 0..self.clients.len() {
            if self.report.violation.is_some() {
                return;
            }
            self.client_step(c);
        }
    }

    fn client_step(&mut self, c: usize) {
        let now = self.now;
        let Some(f) = self.clients[c].busy.clone() else {
            if now >= self.clients[c].idle_until {
                self.begin_op(c);
            }
            return;
        };
        if f.node != NO_NODE {
            if now >= f.deadline {
                self.retry(c, true);
            }
            return;
        }
        if now < f.retry_at {
            return;
        }
        // Submit an attempt to whoever the client believes leads.
        let n = self.profile.n as u64;
        let hint = self.clients[c].hint;
        let target = if hint != NO_NODE && hint <= n {
            hint
        } else {
            self.random_reachable(c)
        };
        if !self.reachable(c, target) {
            // The request cannot get there; a real client would wait for its timeout and
            // then look elsewhere. It certainly did nothing, so it is not an attempt.
            self.clients[c].hint = NO_NODE;
            self.retry(c, false);
            return;
        }
        let client_id = self.clients[c].id;
        let Some(r) = self.nodes[Self::idx(target)].replica.as_mut() else {
            // Connection refused: the attempt certainly did nothing.
            self.clients[c].hint = NO_NODE;
            self.retry(c, true);
            return;
        };
        let res = match &f.what {
            Pending::Write(req) => r.propose(req.encode()),
            Pending::Read { .. } => r.read_index(encode_ctx(client_id, f.req, f.attempt)),
        };
        match res {
            Ok(()) => {
                if let Pending::Write(req) = &f.what {
                    self.first_propose
                        .entry((req.client, req.req))
                        .or_insert(now);
                }
                let timeout = self.profile.client_timeout_ticks * UNITS_PER_TICK;
                let busy = self.clients[c].busy.as_mut().expect("busy");
                busy.node = target;
                busy.deadline = now + timeout;
                self.drive(target);
            }
            Err(e) => {
                let busy = self.clients[c].busy.as_mut().expect("busy");
                busy.rejections += 1;
                busy.retry_at = now + UNITS_PER_TICK;
                let give_up = busy.rejections >= MAX_REJECTIONS;
                self.clients[c].hint = match e {
                    ProposeError::NotLeader { leader } => leader,
                    _ => target,
                };
                if give_up {
                    self.give_up(c);
                }
            }
        }
    }

    fn begin_op(&mut self, c: usize) {
        let key = self.rng.range(0, NUM_KEYS as u64) as u8;
        let cl = &mut self.clients[c];
        let req = cl.next_req;
        cl.next_req += 1;
        let value = ((cl.id as u64) << 32) | cl.next_value;
        // 7 is a read; 0..=6 a write: four puts to three compare-and-sets.
        let roll = if self.rng.chance(self.clients[c].read_ppm) {
            7
        } else {
            self.rng.range(0, 7)
        };
        let cl = &mut self.clients[c];
        let (what, op) = match roll {
            0..=3 => {
                cl.next_value += 1;
                let cmd = Command::Put { key, value };
                (
                    Pending::Write(Request {
                        client: cl.id,
                        req,
                        cmd,
                    }),
                    KvOp::Put { value },
                )
            }
            7 => (Pending::Read { key }, KvOp::Get),
            _ => {
                cl.next_value += 1;
                let expect = cl.seen[key as usize];
                let cmd = Command::Cas {
                    key,
                    expect,
                    new: value,
                };
                (
                    Pending::Write(Request {
                        client: cl.id,
                        req,
                        cmd,
                    }),
                    KvOp::Cas { expect, new: value },
                )
            }
        };
        if let Pending::Write(r) = &what {
            self.proposed.insert(bytes_digest(&r.encode()));
        }
        self.seq += 1;
        self.ops.push(Operation {
            client: self.clients[c].id,
            key,
            op,
            invoke: self.seq,
            ret: None,
        });
        self.clients[c].busy = Some(InFlight {
            op_index: self.ops.len() - 1,
            req,
            what,
            node: NO_NODE,
            attempt: 0,
            rejections: 0,
            deadline: 0,
            retry_at: self.now,
        });
        self.client_step(c);
    }

    /// Whether client `c` can reach `node` across the current cuts.
    fn reachable(&self, c: usize, node: NodeId) -> bool {
        let home = self.clients[c].home;
        home == node || self.net.connected(home, node)
    }

    /// A random node client `c` can reach (its home node, at worst).
    fn random_reachable(&mut self, c: usize) -> NodeId {
        let n = self.profile.n as u64;
        let near: Vec<NodeId> = (1..=n).filter(|&x| self.reachable(c, x)).collect();
        self.rng
            .pick(&near)
            .copied()
            .unwrap_or(self.clients[c].home)
    }

    /// The current attempt failed or timed out: try another node, or give up.
    fn retry(&mut self, c: usize, counts: bool) {
        let hint = self.random_reachable(c);
        let cl = &mut self.clients[c];
        let busy = cl.busy.as_mut().expect("retry while idle");
        busy.node = NO_NODE;
        if counts {
            busy.attempt += 1;
        }
        busy.retry_at = self.now + UNITS_PER_TICK;
        cl.hint = hint;
        if busy.attempt >= MAX_ATTEMPTS {
            self.give_up(c);
        }
    }

    /// The outcome stays unknown: the op remains in the history without a return.
    fn give_up(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        cl.busy = None;
        cl.idle_until = self.now + self.profile.think_ticks * UNITS_PER_TICK;
    }

    fn respond(&mut self, node: NodeId, client: u32, req: u64, attempt: Option<u32>, out: KvOut) {
        let c = (client as usize).wrapping_sub(1);
        if c >= self.clients.len() || !self.reachable(c, node) {
            // A partition cut the client off from the node: the answer is lost.
            return;
        }
        let cl = &mut self.clients[c];
        let Some(f) = &cl.busy else {
            return;
        };
        if f.req != req || f.node != node || attempt.is_some_and(|a| a != f.attempt) {
            return;
        }
        let op_index = f.op_index;
        let is_write = matches!(f.what, Pending::Write(_));
        let key = self.ops[op_index].key as usize;
        match (self.ops[op_index].op, out) {
            (KvOp::Get, KvOut::Value(v)) => cl.seen[key] = v,
            (KvOp::Put { value }, _) => cl.seen[key] = value,
            (KvOp::Cas { new, .. }, KvOut::Cas(true)) => cl.seen[key] = new,
            _ => {}
        }
        cl.busy = None;
        cl.idle_until = self.now + self.profile.think_ticks * UNITS_PER_TICK;
        if self.opts.verbose {
            // Answers from a node behind the newest leader's term are where stale reads hide.
            let term = self.nodes[Self::idx(node)]
                .replica
                .as_ref()
                .map_or(0, |r| r.status().term);
            let newest = self
                .leaders_by_term
                .keys()
                .next_back()
                .copied()
                .unwrap_or(0);
            let behind = if newest > term {
                " (behind the newest leader)"
            } else {
                ""
            };
            self.trace(|| {
                format!("client {client} gets {out:?} from node {node}, key {key}{behind}")
            });
        }
        self.seq += 1;
        self.ops[op_index].ret = Some((self.seq, out));
        if is_write
            && self
                .liveness_from_seq
                .is_some_and(|s| self.ops[op_index].invoke > s)
        {
            self.liveness_ok = true;
        }
    }

    fn finish(mut self) -> SeedReport {
        self.report.messages = self.net.sent;
        let checked: Vec<Operation> = self
            .ops
            .iter()
            .filter(|o| o.ret.is_some() || o.op != KvOp::Get)
            .cloned()
            .collect();
        self.report.ops_checked = checked.len();
        self.report.indeterminate = checked.iter().filter(|o| o.ret.is_none()).count();
        if self.report.violation.is_none() {
            match linearizability::check_history(&checked, LINEARIZABILITY_STEP_LIMIT) {
                Verdict::Linearizable => {}
                Verdict::Inconclusive { key, ops } => {
                    self.report.inconclusive = true;
                    self.trace(|| format!("linearizability inconclusive on key {key} ({ops} ops)"));
                }
                Verdict::Violation { detail, .. } => {
                    self.fail(format!("linearizability: {detail}"));
                }
            }
        }
        self.report
    }
}

fn encode_ctx(client: u32, req: u64, attempt: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&client.to_le_bytes());
    v.extend_from_slice(&req.to_le_bytes());
    v.extend_from_slice(&attempt.to_le_bytes());
    v
}

fn decode_ctx(ctx: &[u8]) -> Option<(u32, u64, u32)> {
    if ctx.len() != 16 {
        return None;
    }
    let client = u32::from_le_bytes(ctx[0..4].try_into().ok()?);
    let req = u64::from_le_bytes(ctx[4..12].try_into().ok()?);
    let attempt = u32::from_le_bytes(ctx[12..16].try_into().ok()?);
    Some((client, req, attempt))
}

/// Runs one seed end to end.
pub fn run_seed<R: EngineModel, S: SimStore>(opts: RunOptions) -> SeedReport {
    let seed = opts.seed;
    match Sim::<R, S>::new(opts) {
        Ok(sim) => sim.run(),
        Err(e) => SeedReport {
            seed,
            violation: Some(format!("setup: {e}")),
            ..SeedReport::default()
        },
    }
}
