//! `etcdserverpb.Lease`: Grant, Revoke, KeepAlive (stream), TimeToLive, Leases.

use std::pin::Pin;
use std::sync::Arc;

use concord_kv as kv;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::backend::{Backend, BackendError};
use crate::error::backend_status;
use crate::kv::{propose, unexpected};
use crate::limits::KEEPALIVE_STREAM_BUFFER;
use crate::proto::etcdserverpb as pb;

/// Serves the Lease service from a [`Backend`].
pub struct LeaseService<B> {
    backend: Arc<B>,
}

impl<B: Backend> LeaseService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        LeaseService { backend }
    }
}

fn current_revision<B: Backend>(backend: &B) -> i64 {
    backend.with_store(|s| s.revision())
}

/// One keep-alive. A lease that no longer exists is answered with TTL 0 rather than an
/// error, as etcd does: the client then reports the lease as expired and stops.
async fn keep_alive_once<B: Backend>(
    backend: &B,
    id: i64,
) -> Result<pb::LeaseKeepAliveResponse, Status> {
    match backend.lease_keep_alive(id).await {
        Ok(r) => Ok(pb::LeaseKeepAliveResponse {
            header: backend.header().header(r.header.revision),
            id,
            ttl: r.ttl_secs,
        }),
        Err(BackendError::Kv(kv::KvError::LeaseNotFound { .. })) => {
            Ok(pb::LeaseKeepAliveResponse {
                header: backend.header().header(current_revision(backend)),
                id,
                ttl: 0,
            })
        }
        Err(e) => Err(backend_status(e)),
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> pb::lease_server::Lease for LeaseService<B> {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let req = request.into_inner();
        let cmd = kv::Command::LeaseGrant {
            id: req.id,
            ttl_secs: req.ttl,
            now_ms: 0,
        };
        match propose(&*self.backend, cmd).await? {
            kv::ResponseBody::LeaseGrant(r) => Ok(Response::new(pb::LeaseGrantResponse {
                header: self.backend.header().header(r.header.revision),
                id: r.id,
                ttl: r.ttl_secs,
                error: String::new(),
            })),
            other => Err(unexpected("lease grant", &other)),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let id = request.into_inner().id;
        match propose(&*self.backend, kv::Command::LeaseRevoke { id }).await? {
            kv::ResponseBody::LeaseRevoke(r) => Ok(Response::new(pb::LeaseRevokeResponse {
                header: self.backend.header().header(r.header.revision),
            })),
            other => Err(unexpected("lease revoke", &other)),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_STREAM_BUFFER);
        let backend = self.backend.clone();
        // One request at a time, in order: the reply channel is bounded, so a client that
        // stops reading also stops this task from reading (and proposing) more.
        tokio::spawn(async move {
            while let Some(item) = inbound.next().await {
                let reply = match item {
                    Ok(req) => keep_alive_once(&*backend, req.id).await,
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let req = request.into_inner();
        match self.backend.lease_time_to_live(req.id, req.keys).await {
            Ok(r) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: self.backend.header().header(r.header.revision),
                id: r.id,
                ttl: r.ttl_secs,
                granted_ttl: r.granted_ttl_secs,
                keys: r.keys,
            })),
            // etcd answers an unknown lease with TTL -1 rather than an error; etcdctl
            // prints "lease ... already expired" for it.
            Err(BackendError::Kv(kv::KvError::LeaseNotFound { .. })) => {
                Ok(Response::new(pb::LeaseTimeToLiveResponse {
                    header: self
                        .backend
                        .header()
                        .header(current_revision(&*self.backend)),
                    id: req.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: Vec::new(),
                }))
            }
            Err(e) => Err(backend_status(e)),
        }
    }

    async fn lease_leases(
        &self,
        _request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        self.backend.read_barrier().await.map_err(backend_status)?;
        let (revision, ids) = self.backend.with_store(|s| (s.revision(), s.lease_list()));
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: self.backend.header().header(revision),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}
