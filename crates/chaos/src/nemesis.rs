//! Faults on a seeded schedule. Each round picks one enabled fault, applies it for a few
//! seconds, heals it and lets the cluster settle, until the run's end. The schedule (which
//! fault, which target, how long) comes from the seed; what the leader is at that moment
//! comes from the cluster.

use crate::cluster::Cluster;
use crate::rng::Rng;
use crate::workload::{leader, Ctx};
use concord_api_etcd::proto::etcdserverpb as pb;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::{sleep, timeout, Instant};
use tonic::Code;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Kill,
    Pause,
    Partition,
    Slow,
    Member,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Kill,
        Kind::Pause,
        Kind::Partition,
        Kind::Slow,
        Kind::Member,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::Pause => "pause",
            Kind::Partition => "partition",
            Kind::Slow => "slow",
            Kind::Member => "member",
        }
    }

    /// Parses `kill,pause,partition,slow,member`, `all` or `none`.
    pub fn parse_list(s: &str) -> Result<Vec<Kind>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => out.extend(Kind::ALL),
                "none" => {}
                other => match Kind::ALL.iter().find(|k| k.name() == other) {
                    Some(k) => out.push(*k),
                    None => {
                        return Err(format!(
                            "unknown nemesis {other:?}; expected kill, pause, partition, \
                             slow, member, all or none"
                        ))
                    }
                },
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Bounds on one round (milliseconds).
const FAULT_MS: (u64, u64) = (2_000, 6_000);
const QUIET_MS: (u64, u64) = (1_500, 4_000);
const SLOW_DELAY_MS: (u64, u64) = (50, 400);
/// Rounds per run, whatever the duration.
const ROUNDS_MAX: usize = 1_000;
/// How long a learner may take to catch up before promotion is given up.
const PROMOTE_WAIT_MS: u64 = 20_000;

/// What the nemesis did, for the report.
#[derive(Debug, Default)]
pub struct NemesisLog {
    pub lines: Vec<String>,
    pub counts: std::collections::BTreeMap<&'static str, usize>,
    /// Node processes that exited without being killed by us (a crash is a finding).
    pub crashes: Vec<String>,
    pub member_unsupported: Option<String>,
    pub member_errors: Vec<String>,
}

impl NemesisLog {
    fn note(&mut self, ctx: &Ctx, line: String) {
        self.lines
            .push(format!("{:>8.3}s {line}", ctx.ms() as f64 / 1000.0));
    }
}

fn slot_of_id(cl: &Cluster, id: u64) -> Option<usize> {
    cl.nodes.iter().find(|p| p.id == id).map(|p| p.slot)
}

/// The leader's slot, or a random slot when the seed says so (or no leader is known).
async fn target(cl: &Cluster, ctx: &Ctx, rng: &mut Rng) -> (usize, &'static str) {
    if rng.chance(50) {
        let l = leader(ctx).await;
        if let Some(s) = slot_of_id(cl, l) {
            return (s, "leader");
        }
    }
    (rng.below(cl.n() as u64) as usize, "random")
}

pub async fn run(
    cl: Arc<Mutex<Cluster>>,
    ctx: Arc<Ctx>,
    kinds: Vec<Kind>,
    seed: u64,
) -> NemesisLog {
    let mut log = NemesisLog::default();
    let mut rng = Rng::derive(seed, 7);
    if kinds.is_empty() {
        return log;
    }
    // Let the workload start on a healthy cluster first.
    sleep(Duration::from_millis(rng.range(QUIET_MS.0, QUIET_MS.1))).await;
    for _ in 0..ROUNDS_MAX {
        let fault = Duration::from_millis(rng.range(FAULT_MS.0, FAULT_MS.1));
        let quiet = Duration::from_millis(rng.range(QUIET_MS.0, QUIET_MS.1));
        if Instant::now() + fault + quiet > ctx.end {
            break;
        }
        let kind = *rng.pick(&kinds);
        if kind == Kind::Member && log.member_unsupported.is_some() {
            continue;
        }
        *log.counts.entry(kind.name()).or_default() += 1;
        match kind {
            Kind::Kill => {
                let mut c = cl.lock().await;
                let (s, why) = target(&c, &ctx, &mut rng).await;
                c.kill(s).await;
                log.note(
                    &ctx,
                    format!("kill -9 slot {s} ({why}, id {})", c.nodes[s].id),
                );
                drop(c);
                sleep(fault).await;
                let mut c = cl.lock().await;
                match c.start(s) {
                    Ok(()) => log.note(&ctx, format!("restart slot {s}")),
                    Err(e) => log.note(&ctx, format!("restart slot {s} failed: {e}")),
                }
            }
            Kind::Pause => {
                let mut c = cl.lock().await;
                let (s, why) = target(&c, &ctx, &mut rng).await;
                c.pause(s);
                log.note(&ctx, format!("SIGSTOP slot {s} ({why})"));
                drop(c);
                sleep(fault).await;
                cl.lock().await.resume(s);
                log.note(&ctx, format!("SIGCONT slot {s}"));
            }
            Kind::Partition => {
                let c = cl.lock().await;
                let n = c.n();
                let mut order: Vec<usize> = (0..n).collect();
                rng.shuffle(&mut order);
                let what = match rng.below(4) {
                    0 => {
                        let l = slot_of_id(&c, leader(&ctx).await).unwrap_or(order[0]);
                        let rest: Vec<usize> = (0..n).filter(|&s| s != l).collect();
                        c.net.split(&[l], &rest);
                        format!("isolate leader slot {l}")
                    }
                    1 => {
                        let (minority, majority) = order.split_at(n / 2);
                        c.net.split(minority, majority);
                        format!("split minority {minority:?} | majority {majority:?}")
                    }
                    2 if n >= 3 => {
                        // Two halves that cannot talk, and one node that talks to both.
                        let bridge = order[0];
                        let (a, b) = order[1..].split_at((n - 1) / 2);
                        c.net.split(a, b);
                        format!("bridge slot {bridge} between {a:?} and {b:?}")
                    }
                    _ => {
                        // Random directed cuts: asymmetric reachability.
                        let mut cuts = Vec::new();
                        for i in 0..n {
                            for j in 0..n {
                                if i != j && rng.chance(30) {
                                    c.net.block(i, j);
                                    cuts.push(format!("{i}->{j}"));
                                }
                            }
                        }
                        format!("random cuts [{}]", cuts.join(" "))
                    }
                };
                log.note(&ctx, format!("partition: {what}"));
                drop(c);
                sleep(fault).await;
                cl.lock().await.net.heal();
                log.note(&ctx, "heal network".into());
            }
            Kind::Slow => {
                let c = cl.lock().await;
                let n = c.n();
                let ms = rng.range(SLOW_DELAY_MS.0, SLOW_DELAY_MS.1);
                let what = if rng.chance(50) {
                    for i in 0..n {
                        for j in 0..n {
                            if i != j {
                                c.net.delay(i, j, ms + rng.below(ms / 2 + 1));
                            }
                        }
                    }
                    format!("all links ~{ms}ms")
                } else {
                    let (s, why) = target(&c, &ctx, &mut rng).await;
                    for j in (0..n).filter(|&j| j != s) {
                        c.net.delay(s, j, ms);
                        c.net.delay(j, s, ms);
                    }
                    format!("links of slot {s} ({why}) {ms}ms")
                };
                log.note(&ctx, format!("slow: {what}"));
                drop(c);
                sleep(fault).await;
                cl.lock().await.net.heal();
                log.note(&ctx, "heal network".into());
            }
            Kind::Member => {
                member_cycle(&cl, &ctx, &mut rng, &mut log).await;
            }
        }
        let exited = cl.lock().await.reap_exited();
        for (s, st) in exited {
            let line = format!("slot {s} exited on its own ({st}); restarting it");
            log.note(&ctx, line.clone());
            log.crashes.push(line);
            let _ = cl.lock().await.start(s);
        }
        sleep(quiet).await;
    }
    log
}

fn cluster_client(
    ctx: &Ctx,
    slot: usize,
) -> pb::cluster_client::ClusterClient<tonic::transport::Channel> {
    pb::cluster_client::ClusterClient::new(ctx.chans[slot].clone())
}

/// Removes a follower through the Cluster API, wipes it, adds it back as a learner under a
/// new id, starts it, and promotes it once it has caught up.
async fn member_cycle(cl: &Mutex<Cluster>, ctx: &Ctx, rng: &mut Rng, log: &mut NemesisLog) {
    let mut c = cl.lock().await;
    let lid = leader(ctx).await;
    let Some(ls) = slot_of_id(&c, lid) else {
        log.note(ctx, "member: no leader, skipped".into());
        return;
    };
    let candidates: Vec<usize> = (0..c.n())
        .filter(|&s| s != ls && c.nodes[s].running())
        .collect();
    if candidates.is_empty() {
        return;
    }
    let s = *rng.pick(&candidates);
    let old = c.nodes[s].id;
    let r = timeout(
        ctx.op_timeout,
        cluster_client(ctx, ls).member_remove(pb::MemberRemoveRequest { id: old }),
    )
    .await;
    match r {
        Ok(Ok(_)) => log.note(ctx, format!("member: removed id {old} (slot {s})")),
        Ok(Err(st)) if st.code() == Code::Unimplemented => {
            log.member_unsupported = Some(st.message().to_string());
            log.note(ctx, format!("member: remove unsupported: {}", st.message()));
            return;
        }
        Ok(Err(st)) => {
            let e = format!("remove id {old}: {:?}: {}", st.code(), st.message());
            log.note(ctx, format!("member: {e}"));
            log.member_errors.push(e);
            return;
        }
        Err(_) => {
            log.note(ctx, format!("member: remove id {old} timed out"));
            log.member_errors.push(format!("remove id {old} timed out"));
            return;
        }
    }
    c.kill(s).await;
    let url = format!("http://{}", c.layout.proxy(s));
    let mut added = None;
    for _ in 0..10 {
        // Membership changes must reach the current leader (followers refuse them).
        let ls = slot_of_id(&c, leader(ctx).await).unwrap_or(ls);
        let r = timeout(
            ctx.op_timeout,
            cluster_client(ctx, ls).member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![url.clone()],
                is_learner: true,
            }),
        )
        .await;
        match r {
            Ok(Ok(resp)) => {
                added = resp.into_inner().member.map(|m| m.id);
                break;
            }
            Ok(Err(st)) => log.note(
                ctx,
                format!("member: add {url}: {:?}: {}", st.code(), st.message()),
            ),
            Err(_) => log.note(ctx, format!("member: add {url} timed out")),
        }
        sleep(Duration::from_millis(500)).await;
    }
    let Some(new) = added else {
        let e = format!("could not re-add slot {s}; restarting it as removed id {old}");
        log.note(ctx, format!("member: {e}"));
        log.member_errors.push(e);
        let _ = c.start(s);
        return;
    };
    if let Err(e) = c.renumber(s, new) {
        log.member_errors.push(e);
        return;
    }
    let members = c.members();
    if let Err(e) = c.start_with(s, &members) {
        log.member_errors.push(e);
        return;
    }
    log.note(
        ctx,
        format!("member: added slot {s} back as learner id {new}"),
    );
    drop(c);
    // Promote only a learner that has caught up, as an operator would: promoting one that
    // cannot be reached would shrink the usable majority.
    if let Err(e) = caught_up(ctx, s, PROMOTE_WAIT_MS).await {
        let e = format!("learner id {new} (slot {s}) not promoted: {e}");
        log.note(ctx, format!("member: {e}"));
        log.member_errors.push(e);
        return;
    }
    let deadline = Instant::now() + Duration::from_millis(PROMOTE_WAIT_MS);
    let mut last = String::new();
    while Instant::now() < deadline {
        sleep(Duration::from_millis(500)).await;
        let lid = leader(ctx).await;
        let ls = slot_of_id(&*cl.lock().await, lid).unwrap_or(ls);
        let r = timeout(
            ctx.op_timeout,
            cluster_client(ctx, ls).member_promote(pb::MemberPromoteRequest { id: new }),
        )
        .await;
        match r {
            Ok(Ok(_)) => {
                log.note(ctx, format!("member: promoted id {new}"));
                return;
            }
            Ok(Err(st)) => last = format!("{:?}: {}", st.code(), st.message()),
            Err(_) => last = "timed out".into(),
        }
    }
    let e = format!("promote id {new} not done in {PROMOTE_WAIT_MS} ms (last: {last})");
    log.note(ctx, format!("member: {e}"));
    log.member_errors.push(e);
}

/// Waits until the node in `slot` has applied up to (nearly) the leader's commit index.
async fn caught_up(ctx: &Ctx, slot: usize, wait_ms: u64) -> Result<(), String> {
    /// Entries a learner may trail by and still count as caught up.
    const LAG_MAX: u64 = 200;
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        sleep(Duration::from_millis(250)).await;
        let mut m = pb::maintenance_client::MaintenanceClient::new(ctx.chans[slot].clone());
        let me = match timeout(Duration::from_millis(500), m.status(pb::StatusRequest {})).await {
            Ok(Ok(r)) => r.into_inner(),
            _ => continue,
        };
        let lid = leader(ctx).await;
        let mut best = 0;
        for s in 0..ctx.n() {
            let mut m = pb::maintenance_client::MaintenanceClient::new(ctx.chans[s].clone());
            if let Ok(Ok(r)) =
                timeout(Duration::from_millis(500), m.status(pb::StatusRequest {})).await
            {
                let r = r.into_inner();
                if r.header.as_ref().map(|h| h.member_id) == Some(lid) {
                    best = r.raft_index;
                }
            }
        }
        last = format!(
            "applied {} vs leader {lid} commit {best}",
            me.raft_applied_index
        );
        if best > 0 && me.raft_applied_index + LAG_MAX >= best {
            return Ok(());
        }
    }
    Err(format!("did not catch up in {wait_ms} ms ({last})"))
}
