//! `etcdserverpb.Maintenance`: Status, Alarm, HashKV/Hash, Defragment; Snapshot and
//! MoveLeader answer Unimplemented.
//!
//! `etcdctl endpoint status` calls Status; `endpoint health` reads the key "health" (a
//! Range) and lists alarms; `endpoint hashkv` calls HashKV.

use std::pin::Pin;
use std::sync::Arc;

use concord_kv as kv;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::backend::Backend;
use crate::error::{backend_status, kv_status};
use crate::proto::etcdserverpb as pb;

/// The etcd server version Concord reports. etcdctl and client libraries read it to
/// decide which API features exist; 3.5.0 is the API level Concord implements.
pub const ETCD_VERSION: &str = "3.5.0";
/// Reported as the storage (db file) version.
pub const STORAGE_VERSION: &str = "3.5.0";

/// Serves the Maintenance service from a [`Backend`].
pub struct MaintenanceService<B> {
    backend: Arc<B>,
}

impl<B: Backend> MaintenanceService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        MaintenanceService { backend }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        let revision = self.backend.with_store(|s| s.revision());
        self.backend.header().header(revision)
    }
}

/// FNV-1a, 32 bits: a stable digest that needs no extra dependency. It only has to agree
/// between members of one Concord cluster, not with etcd's own hash.
fn fnv1a(mut h: u32, bytes: &[u8]) -> u32 {
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

const FNV_OFFSET: u32 = 0x811c_9dc5;

/// Hash of every live key and value at `revision` (0 = current), with the revision it
/// was computed at and the compact revision.
fn hash_kv(store: &kv::KvStore, revision: i64) -> Result<(u32, i64, i64), kv::KvError> {
    let req = kv::RangeRequest {
        key: vec![0],
        range_end: vec![0],
        revision,
        ..Default::default()
    };
    let resp = store.range(&req)?;
    let mut h = FNV_OFFSET;
    for kv in &resp.kvs {
        h = fnv1a(h, &kv.key);
        h = fnv1a(h, &kv.mod_revision.to_le_bytes());
        h = fnv1a(h, &kv.value);
    }
    let at = if revision > 0 {
        revision
    } else {
        store.revision()
    };
    Ok((h, at, store.compact_revision()))
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> pb::maintenance_server::Maintenance for MaintenanceService<B> {
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        use pb::alarm_request::AlarmAction;
        let req = request.into_inner();
        // Concord raises no alarms yet (no space quota, no corruption checker), so the
        // list is always empty; activating or clearing one is accepted and has no effect.
        match AlarmAction::try_from(req.action) {
            Ok(_) => Ok(Response::new(pb::AlarmResponse {
                header: self.header(),
                alarms: Vec::new(),
            })),
            Err(_) => Err(Status::invalid_argument(format!(
                "etcdserver: invalid alarm action {}",
                req.action
            ))),
        }
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = self.backend.status().await.map_err(backend_status)?;
        let store = self.backend.with_store(|s| s.status());
        let db_size = i64::try_from(store.db_size_bytes).unwrap_or(i64::MAX);
        Ok(Response::new(pb::StatusResponse {
            header: self.backend.header().header(store.revision),
            version: ETCD_VERSION.to_string(),
            db_size,
            leader: node.leader_id,
            raft_index: node.raft_index,
            raft_term: node.raft_term,
            raft_applied_index: node.raft_applied_index,
            errors: node.errors,
            db_size_in_use: db_size,
            is_learner: node.is_learner,
            storage_version: STORAGE_VERSION.to_string(),
        }))
    }

    async fn defragment(
        &self,
        _request: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        // The store is in memory and keeps no free pages, so there is nothing to reclaim.
        Ok(Response::new(pb::DefragmentResponse {
            header: self.header(),
        }))
    }

    async fn hash(
        &self,
        _request: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let (hash, revision, _) = self
            .backend
            .with_store(|s| hash_kv(s, 0))
            .map_err(|e| kv_status(&e))?;
        Ok(Response::new(pb::HashResponse {
            header: self.backend.header().header(revision),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        let revision = request.into_inner().revision;
        self.backend.read_barrier().await.map_err(backend_status)?;
        let (hash, at, compact_revision) = self
            .backend
            .with_store(|s| hash_kv(s, revision))
            .map_err(|e| kv_status(&e))?;
        Ok(Response::new(pb::HashKvResponse {
            header: self.header(),
            hash,
            compact_revision,
            hash_revision: at,
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Status::unimplemented(
            "concord: snapshot download is not supported; use `concord` backups",
        ))
    }

    async fn move_leader(
        &self,
        _request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        Err(Status::unimplemented(
            "concord: move-leader is not supported",
        ))
    }
}
