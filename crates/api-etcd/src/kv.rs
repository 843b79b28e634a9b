//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use concord_kv as kv;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::backend::{Backend, BackendError};
use crate::convert;
use crate::error::{backend_status, check_request_size, kv_status};
use crate::proto::etcdserverpb as pb;

/// Serves the KV service from a [`Backend`].
pub struct KvService<B> {
    backend: Arc<B>,
}

impl<B: Backend> KvService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        KvService { backend }
    }
}

/// Proposes `cmd` and returns the state machine's answer, mapping both consensus failures
/// and state-machine refusals to etcd's statuses.
pub(crate) async fn propose<B: Backend>(
    backend: &B,
    cmd: kv::Command,
) -> Result<kv::ResponseBody, Status> {
    let resp = backend.propose(cmd).await.map_err(backend_status)?;
    resp.result.map_err(|e| kv_status(&e))
}

pub(crate) fn unexpected(what: &str, body: &kv::ResponseBody) -> Status {
    // The state machine answered a command with another command's response: a broken
    // invariant in the backend, reported rather than crashing the server.
    Status::internal(format!("concord: {what} answered with {body:?}"))
}

/// Serves a range after a read barrier unless the client asked for a serializable read.
pub(crate) async fn range<B: Backend>(
    backend: &B,
    req: pb::RangeRequest,
) -> Result<pb::RangeResponse, Status> {
    let serializable = req.serializable;
    let req = convert::range_request(req)?;
    if !serializable {
        backend.read_barrier().await.map_err(backend_status)?;
    }
    let resp = backend
        .with_store(|s| s.range(&req))
        .map_err(|e| backend_status(BackendError::Kv(e)))?;
    Ok(convert::range_response(resp, &backend.header()))
}

/// etcd's rule: a transaction may be served without a read barrier when every operation of
/// both branches is a range marked serializable. Unlike etcd, a transaction with no
/// operations at all (only compares) is not: its outcome is still read linearizably.
fn txn_is_serializable(req: &pb::TxnRequest) -> bool {
    use pb::request_op::Request;
    let ops = || req.success.iter().chain(&req.failure);
    ops().next().is_some()
        && ops().all(|op| matches!(&op.request, Some(Request::RequestRange(r)) if r.serializable))
}

#[tonic::async_trait]
impl<B: Backend> pb::kv_server::Kv for KvService<B> {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let req = request.into_inner();
        check_request_size(req.encoded_len())?;
        Ok(Response::new(range(&*self.backend, req).await?))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let req = request.into_inner();
        check_request_size(req.encoded_len())?;
        match propose(&*self.backend, kv::Command::Put(convert::put_request(req))).await? {
            kv::ResponseBody::Put(r) => Ok(Response::new(convert::put_response(
                r,
                &self.backend.header(),
            ))),
            other => Err(unexpected("put", &other)),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let req = request.into_inner();
        check_request_size(req.encoded_len())?;
        let cmd = kv::Command::DeleteRange(convert::delete_request(req));
        match propose(&*self.backend, cmd).await? {
            kv::ResponseBody::DeleteRange(r) => Ok(Response::new(convert::delete_response(
                r,
                &self.backend.header(),
            ))),
            other => Err(unexpected("delete", &other)),
        }
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let req = request.into_inner();
        check_request_size(req.encoded_len())?;
        let serializable = txn_is_serializable(&req);
        let txn = convert::txn_request(req)?;
        let r = self
            .backend
            .txn(txn, serializable)
            .await
            .map_err(backend_status)?;
        Ok(Response::new(convert::txn_response(
            r,
            &self.backend.header(),
        )))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        // `physical` asks etcd to wait until the compaction reached its disk; Concord's
        // compaction is complete once applied, so both forms behave the same.
        let req = request.into_inner();
        let cmd = kv::Command::Compact {
            revision: req.revision,
        };
        match propose(&*self.backend, cmd).await? {
            kv::ResponseBody::Compact(r) => Ok(Response::new(pb::CompactionResponse {
                header: self.backend.header().header(r.header.revision),
            })),
            other => Err(unexpected("compact", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::request_op::Request;

    fn range(serializable: bool) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestRange(pb::RangeRequest {
                key: b"k".to_vec(),
                serializable,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn serializable_only_when_every_op_is_a_serializable_range() {
        let txn = |success, failure| pb::TxnRequest {
            compare: Vec::new(),
            success,
            failure,
        };
        assert!(txn_is_serializable(&txn(
            vec![range(true)],
            vec![range(true)]
        )));
        assert!(!txn_is_serializable(&txn(
            vec![range(true)],
            vec![range(false)]
        )));
        assert!(!txn_is_serializable(&txn(Vec::new(), Vec::new())));
        let nested = pb::RequestOp {
            request: Some(Request::RequestTxn(txn(vec![range(true)], Vec::new()))),
        };
        assert!(!txn_is_serializable(&txn(
            vec![range(true), nested],
            Vec::new()
        )));
    }
}
