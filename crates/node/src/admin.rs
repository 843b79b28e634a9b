//! Admin HTTP per node: `/health`, `/metrics` (Prometheus text) and `/status` (JSON, read
//! by `concord status`). A tiny hyper server; it only reads shared state.

use crate::group::{GroupHandle, GroupStatus};
use crate::kvsm::KvMachine;
use crate::transport::TransportStats;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Most admin connections served at once.
pub const ADMIN_CONNS_MAX: usize = 64;
/// /health fails when no round has seen a leader for this long.
pub const HEALTH_STALE_MS: u64 = 3_000;

/// What the admin endpoints read.
pub struct AdminState {
    pub id: u64,
    pub name: String,
    pub cluster_id: u64,
    pub consensus: String,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub kv: GroupHandle<KvMachine>,
    pub transport: Arc<TransportStats>,
}

/// `/status` body; `concord status` parses it back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub id: u64,
    pub name: String,
    pub cluster_id: String,
    pub consensus: String,
    pub client_addr: String,
    pub peer_addr: String,
    pub admin_addr: String,
    pub role: String,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub members: Vec<MemberReport>,
    pub kv_revision: i64,
    pub kv_keys: u64,
    pub kv_db_size_bytes: u64,
    pub healthy: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberReport {
    pub id: u64,
    pub name: String,
    pub peer_addr: String,
    pub client_addr: String,
}

impl AdminState {
    fn healthy(st: &GroupStatus) -> bool {
        st.leader != 0 && !st.stopped && st.ms_since_progress < HEALTH_STALE_MS
    }

    pub fn report(&self) -> StatusReport {
        let st = self.kv.status();
        let kvst = self.kv.sm.lock().expect("sm lock").store.status();
        let members = self
            .kv
            .members
            .lock()
            .expect("members")
            .values()
            .map(|m| MemberReport {
                id: m.id,
                name: m.name.clone(),
                peer_addr: m.peer_addr.clone(),
                client_addr: m.client_addr.clone(),
            })
            .collect();
        StatusReport {
            id: self.id,
            name: self.name.clone(),
            cluster_id: format!("{:016x}", self.cluster_id),
            consensus: self.consensus.clone(),
            client_addr: self.client_addr.to_string(),
            peer_addr: self.peer_addr.to_string(),
            admin_addr: self.admin_addr.to_string(),
            role: st.role.clone(),
            leader: st.leader,
            term: st.term,
            commit: st.commit,
            applied: st.applied,
            first_index: st.first_index,
            last_index: st.last_index,
            snapshot_index: st.snapshot_index,
            voters: st.voters.clone(),
            learners: st.learners.clone(),
            members,
            kv_revision: kvst.revision,
            kv_keys: kvst.key_count,
            kv_db_size_bytes: kvst.db_size_bytes,
            healthy: Self::healthy(&st),
        }
    }

    pub fn metrics_text(&self) -> String {
        let st = self.kv.status();
        let m = &self.kv.metrics;
        let mut o = String::new();
        let l = format!("node=\"{}\",group=\"{}\"", self.id, st.group);
        let c = |o: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{l}}} {v}"
            );
        };
        c(
            &mut o,
            "concord_raft_term",
            "Current term (or ballot) of the group.",
            "gauge",
            st.term,
        );
        c(
            &mut o,
            "concord_leader",
            "Leader id known to this node (0 if none).",
            "gauge",
            st.leader,
        );
        c(
            &mut o,
            "concord_is_leader",
            "1 if this node leads the group.",
            "gauge",
            (st.leader == self.id) as u64,
        );
        c(
            &mut o,
            "concord_commit_index",
            "Highest committed log index.",
            "gauge",
            st.commit,
        );
        c(
            &mut o,
            "concord_applied_index",
            "Highest applied log index.",
            "gauge",
            st.applied,
        );
        c(
            &mut o,
            "concord_apply_lag",
            "Committed but not yet applied entries.",
            "gauge",
            st.commit.saturating_sub(st.applied),
        );
        c(
            &mut o,
            "concord_snapshot_index",
            "Index of the latest snapshot.",
            "gauge",
            st.snapshot_index,
        );
        c(
            &mut o,
            "concord_pending_proposals",
            "Proposals waiting to be applied.",
            "gauge",
            st.pending_proposals as u64,
        );
        c(
            &mut o,
            "concord_pending_reads",
            "Reads waiting for their barrier.",
            "gauge",
            st.pending_reads as u64,
        );
        let r = Ordering::Relaxed;
        c(
            &mut o,
            "concord_proposals_total",
            "Client proposals received.",
            "counter",
            m.proposals_total.load(r),
        );
        c(
            &mut o,
            "concord_proposals_failed_total",
            "Client proposals that failed.",
            "counter",
            m.proposals_failed_total.load(r),
        );
        c(
            &mut o,
            "concord_reads_total",
            "Linearizable reads requested.",
            "counter",
            m.reads_total.load(r),
        );
        c(
            &mut o,
            "concord_reads_failed_total",
            "Linearizable reads that failed.",
            "counter",
            m.reads_failed_total.load(r),
        );
        c(
            &mut o,
            "concord_fsyncs_total",
            "Log syncs.",
            "counter",
            m.syncs_total.load(r),
        );
        c(
            &mut o,
            "concord_entries_persisted_total",
            "Log entries written.",
            "counter",
            m.entries_persisted_total.load(r),
        );
        c(
            &mut o,
            "concord_snapshots_total",
            "Snapshots taken.",
            "counter",
            m.snapshots_total.load(r),
        );
        let t = &self.transport;
        c(
            &mut o,
            "concord_peer_frames_sent_total",
            "Frames queued to peers.",
            "counter",
            t.frames_sent.load(r),
        );
        c(
            &mut o,
            "concord_peer_frames_dropped_total",
            "Frames dropped (full queue or unreachable peer).",
            "counter",
            t.frames_dropped.load(r),
        );
        c(
            &mut o,
            "concord_peer_frames_received_total",
            "Frames received from peers.",
            "counter",
            t.frames_received.load(r),
        );
        c(
            &mut o,
            "concord_peer_handshake_rejects_total",
            "Peer handshakes refused.",
            "counter",
            t.handshake_rejects.load(r),
        );
        for (name, help, h) in [
            (
                "concord_write_latency_seconds",
                "Client write latency (propose to applied).",
                &m.write_latency,
            ),
            (
                "concord_read_latency_seconds",
                "Linearizable read barrier latency.",
                &m.read_latency,
            ),
            (
                "concord_fsync_latency_seconds",
                "Log sync latency.",
                &m.sync_latency,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
            h.render(&mut o, name, &l);
        }
        o
    }
}

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

async fn handle(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/health" => {
            let st = state.kv.status();
            let ok = AdminState::healthy(&st);
            let body = serde_json::json!({
                "health": ok,
                "leader": st.leader,
                "applied": st.applied,
                "reason": if ok { "" } else if st.leader == 0 { "no leader" } else { "not applying" },
            });
            let code = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(code, "application/json", format!("{body}\n"))
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics_text(),
        ),
        "/status" => {
            let body = serde_json::to_string_pretty(&state.report()).expect("status serialises");
            reply(StatusCode::OK, "application/json", body + "\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /health, /metrics or /status\n".into(),
        ),
    }
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(
    state: Arc<AdminState>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let conns = Arc::new(Semaphore::new(ADMIN_CONNS_MAX));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue; // Dropping the stream refuses the connection.
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// GETs `path` from an admin endpoint; returns the status code and body.
pub async fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header("host", addr)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("{addr}: timed out"))?
}
