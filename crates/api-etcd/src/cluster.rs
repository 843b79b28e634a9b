//! `etcdserverpb.Cluster`: MemberList, MemberAdd, MemberRemove, MemberUpdate, MemberPromote.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::backend::{Backend, MemberInfo};
use crate::error::backend_status;
use crate::proto::etcdserverpb as pb;

/// Serves the Cluster service from a [`Backend`].
pub struct ClusterService<B> {
    backend: Arc<B>,
}

impl<B: Backend> ClusterService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        ClusterService { backend }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        let revision = self.backend.with_store(|s| s.revision());
        self.backend.header().header(revision)
    }
}

fn member(m: MemberInfo) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name,
        peer_ur_ls: m.peer_urls,
        client_ur_ls: m.client_urls,
        is_learner: m.is_learner,
    }
}

fn members(ms: Vec<MemberInfo>) -> Vec<pb::Member> {
    ms.into_iter().map(member).collect()
}

#[tonic::async_trait]
impl<B: Backend> pb::cluster_server::Cluster for ClusterService<B> {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let req = request.into_inner();
        let (added, all) = self
            .backend
            .member_add(req.peer_ur_ls, req.is_learner)
            .await
            .map_err(backend_status)?;
        Ok(Response::new(pb::MemberAddResponse {
            header: self.header(),
            member: Some(member(added)),
            members: members(all),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let id = request.into_inner().id;
        let all = self
            .backend
            .member_remove(id)
            .await
            .map_err(backend_status)?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.header(),
            members: members(all),
        }))
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let req = request.into_inner();
        let all = self
            .backend
            .member_update(req.id, req.peer_ur_ls)
            .await
            .map_err(backend_status)?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.header(),
            members: members(all),
        }))
    }

    async fn member_list(
        &self,
        request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.backend.read_barrier().await.map_err(backend_status)?;
        }
        let all = self.backend.members().await.map_err(backend_status)?;
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(),
            members: members(all),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        let all = self
            .backend
            .member_promote(id)
            .await
            .map_err(backend_status)?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: self.header(),
            members: members(all),
        }))
    }
}
