//! The client workloads: a linearizable register (get / put / compare-and-set through Txn),
//! an append workload of unique keys, and watchers on the append prefix. Every loop is
//! bounded by a count and by the run's end time; every request by `op_timeout`.

use crate::check::{AppendOp, FinalKv, RegOp, Status, WatchEvent};
use crate::rng::Rng;
use concord_api_etcd::proto::etcdserverpb as pb;
use concord_api_etcd::proto::mvccpb;
use concord_sim::linearizability::{KvOp, KvOut};
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Register keys live under `r/`, append keys under `a/`.
pub const REGISTER_PREFIX: &str = "r/";
pub const APPEND_PREFIX: &str = "a/";
/// Register keys in use at once; each gets at most `REGISTER_KEY_OPS` operations, then the
/// clients move on to fresh keys (bounds the checker's work per key, as Jepsen's
/// independent keys do).
const REGISTER_KEYS_ACTIVE: u64 = 3;
const REGISTER_KEY_OPS: u64 = 600;
/// Register values are drawn from `1..=REGISTER_VALUES` so compare-and-set often succeeds.
const REGISTER_VALUES: u64 = 5;
/// Upper bounds on the work of one client, whatever the duration.
const OPS_PER_CLIENT_MAX: usize = 200_000;
const WATCH_EVENTS_MAX: usize = 2_000_000;
const WATCH_RECONNECTS_MAX: u32 = 2_000;
/// Keys per page when reading a prefix back.
const RANGE_PAGE_KEYS: i64 = 1_000;
const RANGE_PAGES_MAX: usize = 10_000;
/// Pause before a client retries another node after an error (avoids spinning on a dead
/// node).
const ERROR_BACKOFF_MS: u64 = 50;

/// What every client shares.
pub struct Ctx {
    /// One lazily connected channel per slot; reconnects by itself after a restart.
    pub chans: Vec<Channel>,
    pub clock: AtomicU64,
    pub started: Instant,
    pub end: Instant,
    pub op_timeout: Duration,
    pub seed: u64,
    register_ops: AtomicU64,
}

impl Ctx {
    pub fn new(
        clients: &[std::net::SocketAddr],
        duration: Duration,
        op_timeout: Duration,
        seed: u64,
    ) -> Result<Ctx, String> {
        let mut chans = Vec::new();
        for a in clients {
            let ep = Endpoint::from_shared(format!("http://{a}"))
                .map_err(|e| format!("client endpoint {a}: {e}"))?
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true);
            chans.push(ep.connect_lazy());
        }
        let started = Instant::now();
        Ok(Ctx {
            chans,
            clock: AtomicU64::new(1),
            started,
            end: started + duration,
            op_timeout,
            seed,
            register_ops: AtomicU64::new(0),
        })
    }

    /// A logical time: unique and increasing across all clients.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    pub fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn n(&self) -> usize {
        self.chans.len()
    }

    pub fn kv(&self, slot: usize) -> pb::kv_client::KvClient<Channel> {
        pb::kv_client::KvClient::new(self.chans[slot].clone())
    }
}

fn reg_key(k: u8) -> Vec<u8> {
    format!("{REGISTER_PREFIX}{k:03}").into_bytes()
}

fn parse_value(v: &[u8]) -> u64 {
    // A value we did not write parses to u64::MAX, which no model state explains, so it
    // surfaces as a violation instead of being hidden.
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

fn put_op(key: Vec<u8>, value: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

async fn do_register(
    kv: &mut pb::kv_client::KvClient<Channel>,
    key: u8,
    op: KvOp,
) -> Result<KvOut, tonic::Status> {
    match op {
        KvOp::Get => {
            let r = kv
                .range(pb::RangeRequest {
                    key: reg_key(key),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(KvOut::Value(
                r.kvs.first().map_or(0, |kv| parse_value(&kv.value)),
            ))
        }
        KvOp::Put { value } => {
            kv.put(pb::PutRequest {
                key: reg_key(key),
                value: value.to_string().into_bytes(),
                ..Default::default()
            })
            .await?;
            Ok(KvOut::Ok)
        }
        KvOp::Cas { expect, new } => {
            // "Absent" is version 0 in etcd; otherwise compare the value itself.
            let cmp = if expect == 0 {
                pb::Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: reg_key(key),
                    target_union: Some(TargetUnion::Version(0)),
                    ..Default::default()
                }
            } else {
                pb::Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: reg_key(key),
                    target_union: Some(TargetUnion::Value(expect.to_string().into_bytes())),
                    ..Default::default()
                }
            };
            let r = kv
                .txn(pb::TxnRequest {
                    compare: vec![cmp],
                    success: vec![put_op(reg_key(key), new.to_string().into_bytes())],
                    failure: vec![],
                })
                .await?
                .into_inner();
            Ok(KvOut::Cas(r.succeeded))
        }
    }
}

/// Writes whose error says the request was refused before it reached consensus. Anything
/// else (timeouts, "leader changed", a dropped connection) may have committed.
fn definitely_not_applied(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented
    )
}

pub async fn register_client(ctx: Arc<Ctx>, client: u32) -> Vec<RegOp> {
    let mut rng = Rng::derive(ctx.seed, 1000 + client as u64);
    let mut slot = client as usize % ctx.n();
    let mut out = Vec::new();
    while Instant::now() < ctx.end && out.len() < OPS_PER_CLIENT_MAX {
        let count = ctx.register_ops.fetch_add(1, Ordering::Relaxed);
        let window = (count / REGISTER_KEY_OPS).min(255 / REGISTER_KEYS_ACTIVE - 1);
        let key = (window * REGISTER_KEYS_ACTIVE + rng.below(REGISTER_KEYS_ACTIVE)) as u8;
        let op = match rng.below(10) {
            0..=3 => KvOp::Get,
            4..=6 => KvOp::Put {
                value: rng.range(1, REGISTER_VALUES),
            },
            _ => KvOp::Cas {
                expect: rng.range(0, REGISTER_VALUES),
                new: rng.range(1, REGISTER_VALUES),
            },
        };
        let mut kv = ctx.kv(slot);
        let invoke = ctx.tick();
        let res = timeout(ctx.op_timeout, do_register(&mut kv, key, op)).await;
        let ret = ctx.tick();
        let (status, out_v, error) = match res {
            Ok(Ok(v)) => (Status::Ok, Some(v), None),
            Ok(Err(s)) if op == KvOp::Get || definitely_not_applied(&s) => (
                Status::Fail,
                None,
                Some(format!("{:?}: {}", s.code(), s.message())),
            ),
            Ok(Err(s)) => (
                Status::Info,
                None,
                Some(format!("{:?}: {}", s.code(), s.message())),
            ),
            Err(_) if op == KvOp::Get => (Status::Fail, None, Some("timeout".into())),
            Err(_) => (Status::Info, None, Some("timeout".into())),
        };
        let failed = status != Status::Ok;
        out.push(RegOp {
            client,
            node: slot,
            key,
            op,
            invoke,
            ret,
            status,
            out: out_v,
            error,
        });
        if failed {
            // The checker gives an in-doubt write an open-ended return time and does not
            // tie a client's operations together, so the client may carry on. It tries
            // another node next, as a client facing a dead endpoint would.
            slot = (slot + 1) % ctx.n();
            tokio::time::sleep(Duration::from_millis(ERROR_BACKOFF_MS)).await;
        }
    }
    out
}

pub async fn append_client(ctx: Arc<Ctx>, client: u32) -> Vec<AppendOp> {
    let mut slot = (client as usize + 1) % ctx.n();
    let mut out = Vec::new();
    let mut seq = 0u64;
    while Instant::now() < ctx.end && out.len() < OPS_PER_CLIENT_MAX {
        seq += 1;
        let key = format!("{APPEND_PREFIX}{client:02}/{seq:07}");
        let value = format!("{}-{client}-{seq}", ctx.seed);
        let mut kv = ctx.kv(slot);
        let invoke_ms = ctx.ms();
        let res = timeout(
            ctx.op_timeout,
            kv.put(pb::PutRequest {
                key: key.clone().into_bytes(),
                value: value.clone().into_bytes(),
                ..Default::default()
            }),
        )
        .await;
        let (status, error) = match res {
            Ok(Ok(_)) => (Status::Ok, None),
            Ok(Err(s)) if definitely_not_applied(&s) => (
                Status::Fail,
                Some(format!("{:?}: {}", s.code(), s.message())),
            ),
            Ok(Err(s)) => (
                Status::Info,
                Some(format!("{:?}: {}", s.code(), s.message())),
            ),
            Err(_) => (Status::Info, Some("timeout".into())),
        };
        let failed = status != Status::Ok;
        out.push(AppendOp {
            client,
            node: slot,
            key,
            value,
            status,
            invoke_ms,
            ret_ms: ctx.ms(),
            error,
        });
        if failed {
            slot = (slot + 1) % ctx.n();
            tokio::time::sleep(Duration::from_millis(ERROR_BACKOFF_MS)).await;
        }
    }
    out
}

/// Reads every key under `prefix` with linearizable, paginated ranges from one node.
pub async fn read_prefix(
    ctx: &Ctx,
    slot: usize,
    prefix: &str,
) -> Result<(BTreeMap<String, FinalKv>, i64), String> {
    let mut kv = ctx.kv(slot);
    let mut out = BTreeMap::new();
    let end = prefix_end(prefix.as_bytes());
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = 0;
    for _ in 0..RANGE_PAGES_MAX {
        let req = pb::RangeRequest {
            key: start.clone(),
            range_end: end.clone(),
            limit: RANGE_PAGE_KEYS,
            // Pin later pages to the first page's revision: one consistent snapshot.
            revision,
            sort_order: pb::range_request::SortOrder::Ascend as i32,
            sort_target: pb::range_request::SortTarget::Key as i32,
            ..Default::default()
        };
        let r = timeout(ctx.op_timeout, kv.range(req))
            .await
            .map_err(|_| format!("range on node slot {slot} timed out"))?
            .map_err(|s| format!("range on node slot {slot}: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        if revision == 0 {
            revision = r.header.as_ref().map_or(0, |h| h.revision);
        }
        for k in &r.kvs {
            out.insert(
                String::from_utf8_lossy(&k.key).into_owned(),
                FinalKv {
                    value: String::from_utf8_lossy(&k.value).into_owned(),
                    mod_revision: k.mod_revision,
                    version: k.version,
                },
            );
        }
        match (r.more, r.kvs.last()) {
            (true, Some(last)) => {
                start = last.key.clone();
                start.push(0);
            }
            _ => return Ok((out, revision)),
        }
    }
    Err(format!("more than {RANGE_PAGES_MAX} pages under {prefix}"))
}

fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut e = p.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![0]
}

/// What one watcher saw.
#[derive(Debug, Default)]
pub struct WatchLog {
    pub events: Vec<WatchEvent>,
    pub reconnects: u32,
    /// The node does not serve Watch (gRPC Unimplemented).
    pub unsupported: Option<String>,
    /// The server cancelled the watch for good (e.g. history compacted).
    pub canceled: Option<String>,
}

/// Watches `a/` from revision 1; after a broken stream it resumes from the revision after
/// the last event it saw, on the next node. Runs until `stop` turns true.
/// `progress` holds the revision of the last event seen, so the harness can wait for the
/// watcher to catch up.
pub async fn watcher(
    ctx: Arc<Ctx>,
    w: usize,
    progress: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) -> WatchLog {
    let mut log = WatchLog::default();
    let mut attempt = 0usize;
    while log.reconnects < WATCH_RECONNECTS_MAX {
        if *stop.borrow() {
            return log;
        }
        let slot = (w + attempt) % ctx.n();
        attempt += 1;
        let next = log.events.last().map_or(1, |e| e.revision + 1);
        let (tx, rx) = mpsc::channel(4);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: APPEND_PREFIX.as_bytes().to_vec(),
                    range_end: prefix_end(APPEND_PREFIX.as_bytes()),
                    start_revision: next,
                    ..Default::default()
                },
            )),
        };
        if tx.send(create).await.is_err() {
            return log;
        }
        let mut client = pb::watch_client::WatchClient::new(ctx.chans[slot].clone());
        let opened = timeout(
            ctx.op_timeout,
            client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                log.unsupported = Some(s.message().to_string());
                return log;
            }
            _ => {
                log.reconnects += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = stop.changed() => return log,
            };
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled {
                        if resp.compact_revision > 0 {
                            log.canceled = Some(format!(
                                "compacted at {} ({})",
                                resp.compact_revision, resp.cancel_reason
                            ));
                            return log;
                        }
                        break;
                    }
                    for e in resp.events {
                        let Some(kv) = e.kv else { continue };
                        log.events.push(WatchEvent {
                            revision: kv.mod_revision,
                            key: String::from_utf8_lossy(&kv.key).into_owned(),
                            put: e.r#type == mvccpb::event::EventType::Put as i32,
                        });
                    }
                    if let Some(e) = log.events.last() {
                        progress.store(e.revision, Ordering::SeqCst);
                    }
                    if log.events.len() >= WATCH_EVENTS_MAX {
                        return log;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        drop(tx);
        log.reconnects += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    log
}

/// The leader id as the majority of reachable nodes report it (0 if none agree).
pub async fn leader(ctx: &Ctx) -> u64 {
    let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
    for slot in 0..ctx.n() {
        let mut m = pb::maintenance_client::MaintenanceClient::new(ctx.chans[slot].clone());
        if let Ok(Ok(r)) = timeout(Duration::from_millis(500), m.status(pb::StatusRequest {})).await
        {
            let l = r.into_inner().leader;
            if l != 0 {
                *votes.entry(l).or_default() += 1;
            }
        }
    }
    votes
        .into_iter()
        .max_by_key(|(_, v)| *v)
        .filter(|(_, v)| *v > ctx.n() / 2)
        .map_or(0, |(l, _)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
        assert_eq!(parse_value(b"17"), 17);
        assert_eq!(parse_value(b"x"), u64::MAX);
    }
}
