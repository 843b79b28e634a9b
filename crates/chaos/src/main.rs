//! `concord-chaos`: starts a real Concord cluster, runs clients against it while a nemesis
//! kills, pauses, partitions and slows nodes, heals, and then checks that the register
//! history is linearizable, that no acknowledged write was lost, and that all watchers saw
//! the same gap-free event history. See `docs/testing.md`.

mod check;
mod cluster;
mod nemesis;
mod proxy;
mod rng;
mod workload;

use clap::Parser;
use cluster::{default_bin, Cluster, Layout};
use concord_sim::linearizability::{Verdict, DEFAULT_STEP_LIMIT};
use nemesis::Kind;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::{sleep, timeout, Instant};
use workload::Ctx;

#[derive(Parser)]
#[command(
    name = "concord-chaos",
    about = "Fault-test a real Concord cluster: kill -9, pauses, partitions, slow links, membership"
)]
struct Args {
    /// Cluster size: 3 or 5.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// How long the workload and the nemesis run, e.g. 60s, 2m, 1500ms.
    #[arg(long, default_value = "60s")]
    duration: String,
    /// Comma-separated faults: kill, pause, partition, slow, member, or all / none.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// raft or paxos.
    #[arg(long, default_value = "raft")]
    consensus: String,
    /// Drives the fault schedule and the workload's choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// The concord binary (default: `concord` next to this binary, else target/release).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Keep the run folder (histories, node logs, data) under DIR even when it passes.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Register clients.
    #[arg(long, default_value_t = 5)]
    clients: u32,
    /// Client request timeout in milliseconds (a write that times out is indeterminate).
    #[arg(long, default_value_t = 2_000)]
    op_timeout_ms: u64,
    /// The nodes' snapshot-every-entries (small, so restarts exercise snapshots).
    #[arg(long, default_value_t = 2_000)]
    snapshot_every: u64,
}

const APPEND_CLIENTS: u32 = 2;
const WATCHERS: usize = 3;
const DURATION_MAX_S: u64 = 3_600;
const CLIENTS_MAX: u32 = 64;
/// The cluster must elect a leader within this after start.
const FIRST_LEADER_MS: u64 = 30_000;
/// After healing, the cluster must serve every node within this (the liveness check).
const LIVENESS_MS: u64 = 30_000;
/// Watchers must catch up to the final revision within this.
const WATCH_CATCHUP_MS: u64 = 30_000;
/// The nemesis finishes its round within this after the end (a membership cycle waits for
/// a learner to catch up).
const NEMESIS_FINISH_MS: u64 = 60_000;

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("--duration {s:?}: expected a number with s, m or ms"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        other => {
            return Err(format!(
                "--duration {s:?}: unknown unit {other:?} (s, m, ms)"
            ))
        }
    };
    if d.is_zero() || d > Duration::from_secs(DURATION_MAX_S) {
        return Err(format!("--duration must be in 1ms..={DURATION_MAX_S}s"));
    }
    Ok(d)
}

struct Plan {
    nodes: usize,
    duration: Duration,
    kinds: Vec<Kind>,
    nemesis_text: String,
    engine: String,
    seed: u64,
    bin: PathBuf,
    dir: PathBuf,
    keep: bool,
    clients: u32,
    op_timeout: Duration,
    snapshot_every: u64,
}

fn plan(a: Args) -> Result<Plan, String> {
    if !(a.nodes == 3 || a.nodes == 5) {
        return Err(format!("--nodes must be 3 or 5 (got {})", a.nodes));
    }
    let duration = parse_duration(&a.duration)?;
    let kinds = Kind::parse_list(&a.nemesis).map_err(|e| format!("--nemesis: {e}"))?;
    if a.consensus != "raft" && a.consensus != "paxos" {
        return Err(format!(
            "--consensus must be raft or paxos (got {:?})",
            a.consensus
        ));
    }
    if !(1..=CLIENTS_MAX).contains(&a.clients) {
        return Err(format!("--clients must be in 1..={CLIENTS_MAX}"));
    }
    if !(100..=60_000).contains(&a.op_timeout_ms) {
        return Err("--op-timeout-ms must be in 100..=60000".into());
    }
    if a.snapshot_every == 0 {
        return Err("--snapshot-every must be at least 1".into());
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let bin = a.bin.unwrap_or_else(default_bin);
    if !bin.is_file() {
        return Err(format!(
            "concord binary {} not found; build it with `cargo build --release --bin concord` \
             or pass --bin PATH",
            bin.display()
        ));
    }
    let name = format!(
        "concord-chaos-{}-seed{seed}-pid{}",
        a.consensus,
        std::process::id()
    );
    let (dir, keep) = match a.keep {
        Some(d) => (d.join(name), true),
        None => (std::env::temp_dir().join(name), false),
    };
    Ok(Plan {
        nodes: a.nodes,
        duration,
        nemesis_text: kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        kinds,
        engine: a.consensus,
        seed,
        bin,
        dir,
        keep,
        clients: a.clients,
        op_timeout: Duration::from_millis(a.op_timeout_ms),
        snapshot_every: a.snapshot_every,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let p = match plan(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("concord-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("concord-chaos: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        tokio::select! {
            r = run(&p) => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("concord-chaos: interrupted; killing the nodes, folder {}", p.dir.display());
                Err("interrupted".to_string())
            }
        }
    });
    // Dropping the runtime drops every task and with them the cluster guard, which kills
    // the node processes.
    drop(rt);
    match code {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("concord-chaos: {e}");
            eprintln!("  folder kept: {}", p.dir.display());
            ExitCode::FAILURE
        }
    }
}

fn rerun_command(p: &Plan) -> String {
    format!(
        "cargo run --release -p concord-chaos -- --nodes {} --duration {}s --nemesis {} \
         --consensus {} --seed {}",
        p.nodes,
        p.duration.as_secs().max(1),
        if p.nemesis_text.is_empty() {
            "none"
        } else {
            &p.nemesis_text
        },
        p.engine,
        p.seed
    )
}

fn write_lines<I: IntoIterator<Item = String>>(path: &Path, lines: I) {
    let res = (|| -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for l in lines {
            writeln!(f, "{l}")?;
        }
        f.flush()
    })();
    if let Err(e) = res {
        eprintln!("concord-chaos: writing {}: {e}", path.display());
    }
}

/// Waits until a write succeeds and every node answers a linearizable read of it.
async fn liveness(ctx: &Ctx, deadline: Instant) -> Result<(), String> {
    let mut last = String::from("no attempt");
    let mut attempt = 0u64;
    while Instant::now() < deadline {
        attempt += 1;
        let value = format!("{}", attempt);
        let mut ok = false;
        for slot in 0..ctx.n() {
            let mut kv = ctx.kv(slot);
            let put = concord_api_etcd::proto::etcdserverpb::PutRequest {
                key: b"liveness".to_vec(),
                value: value.clone().into_bytes(),
                ..Default::default()
            };
            match timeout(ctx.op_timeout, kv.put(put)).await {
                Ok(Ok(_)) => {
                    ok = true;
                    break;
                }
                Ok(Err(s)) => last = format!("put via slot {slot}: {}", s.message()),
                Err(_) => last = format!("put via slot {slot}: timeout"),
            }
        }
        if ok {
            let mut all = true;
            for slot in 0..ctx.n() {
                let mut kv = ctx.kv(slot);
                let get = concord_api_etcd::proto::etcdserverpb::RangeRequest {
                    key: b"liveness".to_vec(),
                    ..Default::default()
                };
                match timeout(ctx.op_timeout, kv.range(get)).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        if r.kvs.first().map(|k| k.value.as_slice()) != Some(value.as_bytes()) {
                            // A linearizable read after an acknowledged write must see it.
                            return Err(format!(
                                "slot {slot} read {:?} after the write of {value:?} was acknowledged",
                                r.kvs.first().map(|k| String::from_utf8_lossy(&k.value).into_owned())
                            ));
                        }
                    }
                    Ok(Err(s)) => {
                        all = false;
                        last = format!("read via slot {slot}: {}", s.message());
                    }
                    Err(_) => {
                        all = false;
                        last = format!("read via slot {slot}: timeout");
                    }
                }
            }
            if all {
                return Ok(());
            }
        }
        sleep(Duration::from_millis(250)).await;
    }
    Err(format!("not serving on every node; last error: {last}"))
}

/// The whole run. `Ok(pass)` when it got to the checks, `Err` when it could not run.
async fn run(p: &Plan) -> Result<bool, String> {
    std::fs::create_dir_all(&p.dir).map_err(|e| format!("creating {}: {e}", p.dir.display()))?;
    let layout = Layout::choose(p.nodes, p.seed, std::process::id())?;
    println!(
        "concord-chaos: {} nodes, consensus {}, seed {}, duration {:?}, nemesis {}, ports {}.., folder {}",
        p.nodes,
        p.engine,
        p.seed,
        p.duration,
        if p.nemesis_text.is_empty() { "none" } else { &p.nemesis_text },
        layout.base,
        p.dir.display()
    );
    let token = format!("chaos-{}-{}", p.seed, std::process::id());
    let mut cluster = Cluster::new(
        p.bin.clone(),
        p.dir.clone(),
        layout,
        &p.engine,
        token,
        p.snapshot_every,
    )
    .await?;
    cluster.start_all()?;
    let cluster = Arc::new(Mutex::new(cluster));
    let clients: Vec<_> = (0..p.nodes).map(|s| layout.client(s)).collect();

    // Wait for a first leader on a probe context (its clock does not matter).
    let probe = Ctx::new(&clients, Duration::ZERO, p.op_timeout, p.seed)?;
    let t0 = Instant::now();
    while workload::leader(&probe).await == 0 {
        if t0.elapsed() > Duration::from_millis(FIRST_LEADER_MS) {
            let exited = cluster.lock().await.reap_exited();
            return Err(format!(
                "no leader within {FIRST_LEADER_MS} ms of starting (exited: {exited:?}); see the node logs"
            ));
        }
        sleep(Duration::from_millis(200)).await;
    }
    println!("leader elected after {:.1}s", t0.elapsed().as_secs_f64());

    let ctx = Arc::new(Ctx::new(&clients, p.duration, p.op_timeout, p.seed)?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut watchers = Vec::new();
    let mut progress = Vec::new();
    for w in 0..WATCHERS {
        let pr = Arc::new(AtomicI64::new(0));
        progress.push(pr.clone());
        watchers.push(tokio::spawn(workload::watcher(
            ctx.clone(),
            w,
            pr,
            stop_rx.clone(),
        )));
    }
    let regs: Vec<_> = (0..p.clients)
        .map(|c| tokio::spawn(workload::register_client(ctx.clone(), c)))
        .collect();
    let apps: Vec<_> = (0..APPEND_CLIENTS)
        .map(|c| tokio::spawn(workload::append_client(ctx.clone(), c)))
        .collect();
    let nem = tokio::spawn(nemesis::run(
        cluster.clone(),
        ctx.clone(),
        p.kinds.clone(),
        p.seed,
    ));

    let mut reg_ops = Vec::new();
    for h in regs {
        reg_ops.extend(
            h.await
                .map_err(|e| format!("a register client failed: {e}"))?,
        );
    }
    let mut app_ops = Vec::new();
    for h in apps {
        app_ops.extend(
            h.await
                .map_err(|e| format!("an append client failed: {e}"))?,
        );
    }
    let nem_log = match timeout(Duration::from_millis(NEMESIS_FINISH_MS), nem).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return Err(format!("the nemesis failed: {e}")),
        Err(_) => return Err("the nemesis did not finish its last round".into()),
    };

    // Heal everything, then the liveness phase.
    let heal_at = Instant::now();
    {
        let mut c = cluster.lock().await;
        for (s, st) in c.reap_exited() {
            println!("note: slot {s} had exited on its own ({st})");
        }
        c.heal_all()?;
    }
    let live = liveness(&ctx, heal_at + Duration::from_millis(LIVENESS_MS)).await;
    let live_s = heal_at.elapsed().as_secs_f64();

    // Final read of the append prefix.
    let mut fin = None;
    let mut fin_err = String::new();
    for slot in 0..p.nodes {
        match workload::read_prefix(&ctx, slot, workload::APPEND_PREFIX).await {
            Ok(r) => {
                fin = Some(r);
                break;
            }
            Err(e) => fin_err = e,
        }
    }

    // Let the watchers catch up to the last append, then stop them.
    let target = fin
        .as_ref()
        .and_then(|(m, _)| m.values().map(|k| k.mod_revision).max())
        .unwrap_or(0);
    let wdeadline = Instant::now() + Duration::from_millis(WATCH_CATCHUP_MS);
    while Instant::now() < wdeadline
        && progress.iter().any(|pr| pr.load(Ordering::SeqCst) < target)
        && !watchers.iter().all(|h| h.is_finished())
    {
        sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(true);
    let mut wlogs = Vec::new();
    for h in watchers {
        match timeout(Duration::from_secs(5), h).await {
            Ok(Ok(l)) => wlogs.push(l),
            _ => return Err("a watcher did not stop".into()),
        }
    }

    // Checks.
    let mut violations = 0usize;
    let mut problems: Vec<String> = Vec::new();
    let hist = reg_ops.clone();
    let verdict =
        tokio::task::spawn_blocking(move || check::check_register(&hist, DEFAULT_STEP_LIMIT))
            .await
            .map_err(|e| format!("the linearizability checker failed: {e}"))?;
    let count = |st: check::Status| reg_ops.iter().filter(|o| o.status == st).count();
    let (r_ok, r_fail, r_info) = (
        count(check::Status::Ok),
        count(check::Status::Fail),
        count(check::Status::Info),
    );
    let keys = reg_ops
        .iter()
        .map(|o| o.key)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let verdict_text = match &verdict {
        Verdict::Linearizable => "linearizable".to_string(),
        Verdict::Violation { key, ops, detail } => {
            violations += 1;
            problems.push(format!("register key r/{key:03} ({ops} ops): {detail}"));
            format!("NOT LINEARIZABLE (key r/{key:03})")
        }
        Verdict::Inconclusive { key, ops } => {
            format!("inconclusive (search bound hit on key r/{key:03}, {ops} ops)")
        }
    };
    println!(
        "register: {} ops on {keys} keys: ok {r_ok}, failed {r_fail}, indeterminate {r_info}; {verdict_text}",
        reg_ops.len()
    );

    let a_count = |st: check::Status| app_ops.iter().filter(|o| o.status == st).count();
    let (a_ok, a_fail, a_info) = (
        a_count(check::Status::Ok),
        a_count(check::Status::Fail),
        a_count(check::Status::Info),
    );
    let mut lost = 0usize;
    let mut expected_events = Vec::new();
    match &fin {
        Some((m, rev)) => {
            let r = check::check_appends(&app_ops, m);
            lost = r.lost.len();
            violations += r.corrupt.len() + r.phantom.len();
            println!(
                "append: {} writes: acked {a_ok}, failed {a_fail}, indeterminate {a_info} ({} of them present); final read at revision {rev}: {} keys; lost {}, corrupt {}, phantom {}",
                app_ops.len(),
                r.info_present,
                m.len(),
                r.lost.len(),
                r.corrupt.len(),
                r.phantom.len()
            );
            for k in r.lost.iter().take(10) {
                problems.push(format!("lost acknowledged write {k}"));
            }
            for k in r.corrupt.iter().take(10) {
                problems.push(format!("corrupt write {k}"));
            }
            for k in r.phantom.iter().take(10) {
                problems.push(format!("phantom key {k}"));
            }
            let mut ev: Vec<check::WatchEvent> = m
                .iter()
                .map(|(k, v)| check::WatchEvent {
                    revision: v.mod_revision,
                    key: k.clone(),
                    put: true,
                })
                .collect();
            ev.sort_by_key(|e| e.revision);
            expected_events = ev;
        }
        None => {
            violations += 1;
            problems.push(format!("final read failed on every node: {fin_err}"));
            println!(
                "append: {} writes, acked {a_ok}; final read FAILED",
                app_ops.len()
            );
        }
    }

    let unsupported = wlogs.iter().find_map(|l| l.unsupported.clone());
    if let Some(why) = &unsupported {
        println!("watch: NOT CHECKED: the node does not serve Watch ({why})");
    } else if fin.is_some() {
        let seen: Vec<Vec<check::WatchEvent>> = wlogs.iter().map(|l| l.events.clone()).collect();
        let wp = check::check_watchers(&expected_events, &seen);
        for l in &wlogs {
            if let Some(c) = &l.canceled {
                problems.push(format!("a watcher was cancelled: {c}"));
            }
        }
        violations += wp.len();
        println!(
            "watch: {} watchers, events seen {:?}, reconnects {:?}; {}",
            wlogs.len(),
            wlogs.iter().map(|l| l.events.len()).collect::<Vec<_>>(),
            wlogs.iter().map(|l| l.reconnects).collect::<Vec<_>>(),
            if wp.is_empty() {
                format!(
                    "all agree with the final state ({} events, no gaps)",
                    expected_events.len()
                )
            } else {
                format!("{} problem(s)", wp.len())
            }
        );
        problems.extend(wp);
    }

    match &live {
        Ok(()) => println!("liveness: every node served a write and a linearizable read {live_s:.1}s after healing"),
        Err(e) => {
            violations += 1;
            problems.push(format!("liveness: {e}"));
            println!("liveness: FAILED within {LIVENESS_MS} ms: {e}");
        }
    }
    let counts: Vec<String> = nem_log
        .counts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "nemesis: {} rounds [{}]; unexpected exits {}{}{}",
        nem_log.counts.values().sum::<usize>(),
        counts.join(" "),
        nem_log.crashes.len(),
        nem_log
            .member_unsupported
            .as_ref()
            .map(|w| format!("; membership UNSUPPORTED by the node: {w}"))
            .unwrap_or_default(),
        if nem_log.member_errors.is_empty() {
            String::new()
        } else {
            format!("; membership errors {}", nem_log.member_errors.len())
        }
    );
    for c in &nem_log.crashes {
        problems.push(format!("node crash: {c}"));
    }
    violations += nem_log.crashes.len();
    for e in &nem_log.member_errors {
        println!("  membership: {e}");
    }
    // A panic inside a node (a thread dying while the process lives on) is a bug even when
    // the checks above did not notice it.
    for slot in 0..p.nodes {
        let path = p.dir.join(format!("node-slot{slot}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let panics: Vec<&str> = text.lines().filter(|l| l.contains("panicked at")).collect();
        if let Some(first) = panics.first() {
            violations += 1;
            let next = text
                .lines()
                .skip_while(|l| !l.contains("panicked at"))
                .nth(1)
                .unwrap_or("");
            problems.push(format!(
                "node slot {slot}: {} panic(s), first: {} {}",
                panics.len(),
                first.trim(),
                next.trim()
            ));
        }
    }
    for pr in &problems {
        println!("  PROBLEM: {pr}");
    }

    let pass = violations == 0 && lost == 0;
    // Histories as JSON lines, the nemesis log; kept with the node logs on failure.
    write_lines(
        &p.dir.join("register.jsonl"),
        reg_ops.iter().map(|o| o.to_json().to_string()),
    );
    write_lines(
        &p.dir.join("append.jsonl"),
        app_ops.iter().map(|o| o.to_json().to_string()),
    );
    for (w, l) in wlogs.iter().enumerate() {
        write_lines(
            &p.dir.join(format!("watch-{w}.jsonl")),
            l.events.iter().map(|e| {
                serde_json::json!({"revision": e.revision, "key": e.key, "put": e.put}).to_string()
            }),
        );
    }
    write_lines(&p.dir.join("nemesis.log"), nem_log.lines.iter().cloned());
    let final_state: BTreeMap<String, i64> = fin
        .as_ref()
        .map(|(m, _)| m.iter().map(|(k, v)| (k.clone(), v.mod_revision)).collect())
        .unwrap_or_default();
    write_lines(
        &p.dir.join("final.jsonl"),
        final_state
            .iter()
            .map(|(k, r)| serde_json::json!({"key": k, "mod_revision": r}).to_string()),
    );

    println!(
        "ops ok {} / failed {} / indeterminate {}",
        r_ok + a_ok,
        r_fail + a_fail,
        r_info + a_info
    );
    // Stop the nodes before deciding about the folder.
    {
        let mut c = cluster.lock().await;
        for s in 0..c.n() {
            c.kill(s).await;
        }
    }
    if pass && !p.keep {
        let _ = std::fs::remove_dir_all(&p.dir);
    } else {
        println!("histories and node logs kept in {}", p.dir.display());
    }
    if !pass {
        println!("rerun: {}", rerun_command(p));
    }
    println!(
        "{} {} {} nodes seed {}: {violations} violations, {lost} lost",
        if pass { "PASS" } else { "FAIL" },
        p.engine,
        p.nodes,
        p.seed
    );
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("99999m").is_err());
    }

    #[test]
    fn nemesis_lists_parse() {
        assert_eq!(Kind::parse_list("all").unwrap().len(), 5);
        assert_eq!(
            Kind::parse_list("kill,pause,kill").unwrap(),
            vec![Kind::Kill, Kind::Pause]
        );
        assert!(Kind::parse_list("none").unwrap().is_empty());
        assert!(Kind::parse_list("kill,nuke").is_err());
    }
}
