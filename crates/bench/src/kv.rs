//! `concord-bench kv`: closed-loop clients on the etcd v3 API (our own generated client),
//! so the same run measures etcd and Concord.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_api_etcd::proto::etcdserverpb as pb;
use hdrhistogram::Histogram;
use pb::kv_client::KvClient;
use tonic::transport::{Channel, Endpoint};

use crate::args::{KvArgs, Op};

/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed request, so a dead endpoint is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Highest latency the histogram tracks (larger values are clamped).
const LATENCY_MAX_US: u64 = 60_000_000;
/// Keys written in parallel while preloading for `get` and `txn`.
const PRELOAD_PARALLEL_MAX: usize = 64;
/// Attempts per preloaded key: a leader change fails the writes in flight with a
/// retryable error, which should not end a long preload.
const PRELOAD_ATTEMPTS_MAX: u32 = 5;
/// Pause before retrying a failed preload write.
const PRELOAD_RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub op: Op,
    pub clients: usize,
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
}

impl Report {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line with every figure, `key=value`, for scripts (`bench/vs-etcd.sh`).
    pub fn result_line(&self) -> String {
        format!(
            "RESULT op={} clients={} ops={} errors={} elapsed_s={:.2} ops_per_sec={:.1} \
             p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}",
            self.op.name(),
            self.clients,
            self.ops,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec(),
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.p999_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0,
        )
    }
}

/// A small deterministic generator (xorshift64*): runs are repeatable per client.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("concord-bench/{i:010}").into_bytes()
}

async fn connect(endpoint: &str) -> Result<Channel, String> {
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Endpoint::from_shared(uri)
        .map_err(|e| format!("endpoint {endpoint}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))
}

async fn one_op(
    client: &mut KvClient<Channel>,
    op: Op,
    k: Vec<u8>,
    value: &[u8],
    serializable: bool,
) -> Result<(), tonic::Status> {
    match op {
        Op::Put => {
            client
                .put(pb::PutRequest {
                    key: k,
                    value: value.to_vec(),
                    ..Default::default()
                })
                .await?;
        }
        Op::Get => {
            let r = client
                .range(pb::RangeRequest {
                    key: k,
                    serializable,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if r.kvs.is_empty() {
                return Err(tonic::Status::not_found("preloaded key is missing"));
            }
        }
        Op::Txn => {
            use pb::compare::{CompareResult, CompareTarget, TargetUnion};
            // "If the key exists in any version, overwrite it": one compare, one put.
            let r = client
                .txn(pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: CompareResult::NotEqual as i32,
                        target: CompareTarget::Version as i32,
                        key: k.clone(),
                        target_union: Some(TargetUnion::Version(-1)),
                        range_end: Vec::new(),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: k,
                            value: value.to_vec(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                })
                .await?
                .into_inner();
            if !r.succeeded {
                return Err(tonic::Status::internal("txn compare unexpectedly failed"));
            }
        }
    }
    Ok(())
}

/// Writes every key once so reads find them.
async fn preload(channels: &[Channel], keys: u64, value: &[u8]) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..PRELOAD_PARALLEL_MAX.min(keys as usize) {
        let mut client = KvClient::new(channels[i % channels.len()].clone());
        let next = next.clone();
        let value = value.to_vec();
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= keys {
                    return Ok::<(), String>(());
                }
                let mut attempt = 1;
                while let Err(e) = one_op(&mut client, Op::Put, key(k), &value, false).await {
                    if attempt >= PRELOAD_ATTEMPTS_MAX {
                        return Err(format!(
                            "preload put of key {k}: {} (after {attempt} attempts)",
                            e.message()
                        ));
                    }
                    eprintln!("preload put of key {k}: {}; retrying", e.message());
                    attempt += 1;
                    tokio::time::sleep(PRELOAD_RETRY_BACKOFF).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("preload task: {e}"))??;
    }
    Ok(())
}

/// Runs the benchmark described by `args`.
pub async fn run_kv(args: &KvArgs) -> Result<Report, String> {
    assert!(args.clients >= 1 && args.conns >= 1 && !args.endpoints.is_empty());
    let mut channels = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        channels.push(connect(&args.endpoints[i % args.endpoints.len()]).await?);
    }
    let value = vec![b'x'; args.value_size];
    if matches!(args.op, Op::Get | Op::Txn) {
        preload(&channels, args.keys, &value).await?;
    }
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let mut client = KvClient::new(channels[c % channels.len()].clone());
        let issued = issued.clone();
        let value = value.clone();
        let (op, keys, max_ops, serializable) =
            (args.op, args.keys, args.max_ops, args.serializable);
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid bounds");
            let mut rng = Rng::new(c as u64 + 1);
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < max_ops {
                let k = key(rng.next() % keys);
                let t0 = Instant::now();
                match one_op(&mut client, op, k, &value, serializable).await {
                    Ok(()) => {
                        let us = t0.elapsed().as_micros() as u64;
                        hist.saturating_record(us.clamp(1, LATENCY_MAX_US));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error
                            .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                }
            }
            (hist, errors, first_error)
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid bounds");
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let (h, e, fe) = t.await.map_err(|e| format!("client task: {e}"))?;
        total
            .add(&h)
            .map_err(|e| format!("merging histograms: {e}"))?;
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let elapsed = start.elapsed();
    Ok(Report {
        op: args.op,
        clients: args.clients,
        ops: total.len(),
        errors,
        elapsed,
        p50_us: total.value_at_quantile(0.50),
        p99_us: total.value_at_quantile(0.99),
        p999_us: total.value_at_quantile(0.999),
        max_us: total.max(),
        first_error,
    })
}
