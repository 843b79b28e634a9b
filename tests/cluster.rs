//! Cluster tests with real `concord start` processes on loopback.
//!
//! Each test uses its own port range and temporary data folder, and is bounded in time.
//! Writes go through the etcd gRPC API (our generated client), to any node: followers
//! forward them to the leader.

use concord_api_etcd::proto::etcdserverpb as pb;
use pb::kv_client::KvClient;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_concord");

struct Proc {
    id: u64,
    child: Option<Child>,
    client: String,
    admin: String,
}

struct Cluster {
    dir: PathBuf,
    base: u16,
    n: u64,
    procs: Vec<Proc>,
    extra: Vec<String>,
}

impl Cluster {
    fn port(&self, id: u64, off: u16) -> u16 {
        self.base + 100 * (id as u16 - 1) + off
    }

    fn new(name: &str, base: u16, n: u64, extra: &[&str]) -> Cluster {
        let dir = std::env::temp_dir().join(format!("concord-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster {
            dir,
            base,
            n,
            procs: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for id in 1..=n {
            let p = Proc {
                id,
                child: None,
                client: format!("127.0.0.1:{}", c.port(id, 0)),
                admin: format!("127.0.0.1:{}", c.port(id, 2)),
            };
            c.procs.push(p);
        }
        for id in 1..=n {
            c.start(id);
        }
        c
    }

    fn start(&mut self, id: u64) {
        let peers: Vec<String> = (1..=self.n)
            .map(|i| format!("{i}=127.0.0.1:{}", self.port(i, 1)))
            .collect();
        let log = std::fs::File::create(self.dir.join(format!("node{id}.log"))).unwrap();
        let child = Command::new(BIN)
            .arg("start")
            .args(["--id", &id.to_string()])
            .args(["--peers", &peers.join(",")])
            .args([
                "--listen-client",
                &format!("127.0.0.1:{}", self.port(id, 0)),
            ])
            .args(["--listen-peer", &format!("127.0.0.1:{}", self.port(id, 1))])
            .args(["--listen-admin", &format!("127.0.0.1:{}", self.port(id, 2))])
            .args([
                "--data-dir",
                self.dir.join(format!("node{id}")).to_str().unwrap(),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn concord");
        self.procs[(id - 1) as usize].child = Some(child);
    }

    fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.procs[(id - 1) as usize].child.take() {
            let _ = c.kill(); // SIGKILL on unix
            let _ = c.wait();
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.client.clone()).collect()
    }

    fn live_admins(&self) -> Vec<(u64, String)> {
        self.procs
            .iter()
            .filter(|p| p.child.is_some())
            .map(|p| (p.id, p.admin.clone()))
            .collect()
    }

    /// The leader every live node agrees on, waiting up to `timeout`.
    async fn agreed_leader(&self, timeout: Duration) -> Option<u64> {
        self.agreed_leader_other_than(0, timeout).await
    }

    /// Like `agreed_leader`, but ignores `old` (a node just killed that survivors may
    /// still believe in until their election timeout).
    async fn agreed_leader_other_than(&self, old: u64, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let mut leaders = Vec::new();
            for (_, a) in self.live_admins() {
                leaders.push(status_leader(&a).await.unwrap_or(0));
            }
            if !leaders.is_empty()
                && leaders[0] != 0
                && leaders[0] != old
                && leaders.iter().all(|&l| l == leaders[0])
            {
                return Some(leaders[0]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for id in 1..=self.n {
            let p = self.dir.join(format!("node{id}.log"));
            if let Ok(f) = std::fs::File::open(&p) {
                let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
                let tail = lines.len().saturating_sub(15);
                out.push_str(&format!(
                    "--- node{id} (last lines)\n{}\n",
                    lines[tail..].join("\n")
                ));
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.n {
            self.kill9(id);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("{}", self.logs());
            eprintln!("data kept in {}", self.dir.display());
        }
    }
}

async fn status_leader(admin: &str) -> Option<u64> {
    let (code, body) = concord_node::admin::http_get(admin, "/status", Duration::from_secs(1))
        .await
        .ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["leader"].as_u64()
}

async fn connect(ep: &str) -> Option<KvClient<Channel>> {
    let ch = Channel::from_shared(format!("http://{ep}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .ok()?;
    Some(KvClient::new(ch))
}

async fn put(c: &mut KvClient<Channel>, k: &str, v: &str) -> Result<(), tonic::Status> {
    c.put(pb::PutRequest {
        key: k.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// A linearizable get through any endpoint that answers, retried until `timeout`.
async fn get_any(eps: &[String], k: &str, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for ep in eps {
            if let Some(mut c) = connect(ep).await {
                if let Ok(r) = c
                    .range(pb::RangeRequest {
                        key: k.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .await
                {
                    return Some(
                        r.into_inner()
                            .kvs
                            .first()
                            .map(|kv| kv.value.clone())
                            .unwrap_or_default(),
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Writes `w/<client>/<n>` keys until `stop`, rotating endpoints on errors; records every
/// acknowledged key.
async fn writer(
    client: usize,
    eps: Vec<String>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64) {
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut ep = client % eps.len();
    let mut conn: Option<KvClient<Channel>> = None;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if conn.is_none() {
            conn = connect(&eps[ep]).await;
            if conn.is_none() {
                ep = (ep + 1) % eps.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let k = format!("w/{client}/{n}");
        let v = format!("v{n}");
        match put(conn.as_mut().unwrap(), &k, &v).await {
            Ok(()) => {
                acked.lock().unwrap().insert(k, v);
                ok += 1;
            }
            Err(_) => {
                failed += 1;
                conn = None;
                ep = (ep + 1) % eps.len();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        n += 1;
    }
    (ok, failed)
}

async fn check_all(eps: &[String], acked: &BTreeMap<String, String>) {
    // Read the whole prefix once from a node, then compare (cheaper than one get per key).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_err = String::new();
    while Instant::now() < deadline {
        for ep in eps {
            let Some(mut c) = connect(ep).await else {
                continue;
            };
            let r = c
                .range(pb::RangeRequest {
                    key: b"w/".to_vec(),
                    range_end: b"w0".to_vec(),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(r) => {
                    let got: BTreeMap<String, String> = r
                        .into_inner()
                        .kvs
                        .into_iter()
                        .map(|kv| {
                            (
                                String::from_utf8(kv.key).unwrap(),
                                String::from_utf8(kv.value).unwrap(),
                            )
                        })
                        .collect();
                    for (k, v) in acked {
                        assert_eq!(
                            got.get(k),
                            Some(v),
                            "acknowledged write {k} lost (read via {ep})"
                        );
                    }
                    return;
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("could not read back the writes: {last_err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leader_under_write_load_keeps_acknowledged_writes() {
    let mut cl = Cluster::new("kill-leader", 31379, 3, &["--snapshot-every", "200"]);
    let leader = cl
        .agreed_leader(Duration::from_secs(20))
        .await
        .expect("a leader within 20 s");
    let eps = cl.endpoints();
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|i| tokio::spawn(writer(i, eps.clone(), acked.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().len();
    assert!(before > 0, "writes succeed before the crash\n{}", cl.logs());
    cl.kill9(leader);
    let new_leader = cl
        .agreed_leader_other_than(leader, Duration::from_secs(15))
        .await
        .expect("a new leader within 15 s of the crash");
    assert_ne!(new_leader, leader);
    // Writes keep succeeding under the new leader.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if acked.lock().unwrap().len() > before + 50 || Instant::now() > deadline {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut totals = (0, 0);
    for w in writers {
        let (ok, failed) = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("writer stops")
            .unwrap();
        totals.0 += ok;
        totals.1 += failed;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > before + 50,
        "writes continue after the leader crash ({} before, {} after)",
        before,
        acked.len()
    );
    let survivors: Vec<String> = cl
        .procs
        .iter()
        .filter(|p| p.child.is_some())
        .map(|p| p.client.clone())
        .collect();
    check_all(&survivors, &acked).await;
    // The crashed node comes back, catches up and serves the same data.
    cl.start(leader);
    let back = vec![cl.procs[(leader - 1) as usize].client.clone()];
    let last = acked.keys().next_back().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get_any(&back, &last, Duration::from_secs(5)).await;
        if got.as_deref() == Some(acked[&last].as_bytes()) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check_all(&back, &acked).await;
    eprintln!(
        "acknowledged {} writes ({} failed attempts); leader {leader} killed, new leader {new_leader}",
        totals.0, totals.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_all_nodes_keeps_data() {
    let mut cl = Cluster::new("restart-all", 32379, 3, &["--snapshot-every", "50"]);
    cl.agreed_leader(Duration::from_secs(20))
        .await
        .expect("a leader within 20 s");
    let eps = cl.endpoints();
    let mut acked = BTreeMap::new();
    let mut c = None;
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < 120 {
        assert!(Instant::now() < deadline, "writes too slow\n{}", cl.logs());
        if c.is_none() {
            c = connect(&eps[i % 3]).await;
        }
        let Some(conn) = c.as_mut() else {
            i += 1;
            continue;
        };
        let k = format!("w/{}", acked.len());
        if put(conn, &k, &format!("value-{k}")).await.is_ok() {
            acked.insert(k.clone(), format!("value-{k}"));
        } else {
            c = None;
            i += 1;
        }
    }
    for id in 1..=3 {
        cl.kill9(id);
    }
    for id in 1..=3 {
        cl.start(id);
    }
    cl.agreed_leader(Duration::from_secs(20))
        .await
        .expect("a leader after restarting every node");
    check_all(&eps, &acked).await;
    // And the restarted cluster takes new writes.
    let mut ok = false;
    for _ in 0..50 {
        if let Some(mut c) = connect(&eps[0]).await {
            if put(&mut c, "after", "restart").await.is_ok() {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "writes after the restart");
    assert_eq!(
        get_any(&eps, "after", Duration::from_secs(10))
            .await
            .as_deref(),
        Some(&b"restart"[..])
    );
}

#[test]
fn start_rejects_bad_flags_with_the_flag_name() {
    let out = Command::new(BIN)
        .args(["start", "--id", "1", "--peers", "1=nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--peers"), "{err}");
    let out = Command::new(BIN)
        .args(["start", "--id", "4", "--peers", "1=127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--peers"));
    let out = Command::new(BIN)
        .args(["dev", "--consensus", "zab"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--consensus"));
}
