//! Errors as etcd clients expect them: etcd's gRPC code and its exact message. Go clients
//! (`clientv3`, `etcdctl`) turn a status back into a typed error by comparing the message,
//! and decide whether to retry from the code, so both must match etcd's.

use concord_kv as kv;
use tonic::{Code, Status};

use crate::backend::BackendError;

/// Message for "request larger than `MAX_REQUEST_BYTES`" (InvalidArgument).
pub const MSG_REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
/// Message for an empty key (InvalidArgument).
pub const MSG_EMPTY_KEY: &str = "etcdserver: key is not provided";
/// Message for a lease id that does not exist (NotFound).
pub const MSG_LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

/// etcd's message for backend conditions. `Kv`, `Unsupported` and `Internal` carry their
/// own text and are handled by [`backend_status`].
pub fn backend_message(e: &BackendError) -> &'static str {
    match e {
        BackendError::NoLeader => "etcdserver: no leader",
        BackendError::LeaderChanged => "etcdserver: leader changed",
        BackendError::NotLeader => "etcdserver: not leader",
        BackendError::Timeout => "etcdserver: request timed out",
        BackendError::Stopped => "etcdserver: server stopped",
        BackendError::TooManyRequests => "etcdserver: too many requests",
        BackendError::Unhealthy => "etcdserver: unhealthy cluster",
        BackendError::MemberNotFound => "etcdserver: member not found",
        BackendError::MemberExists => "etcdserver: member ID already exist",
        BackendError::PeerUrlExists => "etcdserver: Peer URLs already exists",
        BackendError::MemberBadUrls => "etcdserver: given member URLs are invalid",
        BackendError::MemberNotLearner => "etcdserver: can only promote a learner member",
        BackendError::LearnerNotReady => {
            "etcdserver: can only promote a learner member which is in sync with leader"
        }
        BackendError::Kv(_) => "etcdserver: kv error",
        BackendError::Unsupported(_) => "etcdserver: not supported",
        BackendError::Internal(_) => "etcdserver: internal error",
    }
}

/// The gRPC status for a backend error.
pub fn backend_status(e: BackendError) -> Status {
    let code = match &e {
        BackendError::NoLeader
        | BackendError::LeaderChanged
        | BackendError::NotLeader
        | BackendError::Timeout
        | BackendError::Stopped
        | BackendError::Unhealthy => Code::Unavailable,
        BackendError::TooManyRequests => Code::ResourceExhausted,
        BackendError::MemberNotFound => Code::NotFound,
        BackendError::MemberExists
        | BackendError::PeerUrlExists
        | BackendError::MemberNotLearner
        | BackendError::LearnerNotReady => Code::FailedPrecondition,
        BackendError::MemberBadUrls => Code::InvalidArgument,
        BackendError::Kv(k) => return kv_status(k),
        BackendError::Unsupported(what) => {
            return Status::unimplemented(format!("concord: {what} is not supported"))
        }
        BackendError::Internal(what) => return Status::internal(format!("concord: {what}")),
    };
    Status::new(code, backend_message(&e))
}

/// The gRPC status for an error of the KV state machine.
pub fn kv_status(e: &kv::KvError) -> Status {
    Status::new(Code::from_i32(e.grpc_code()), e.etcd_message())
}

/// Refuses a request whose encoded size is above the limit, as etcd does before proposing.
pub fn check_request_size(encoded_len: usize) -> Result<(), Status> {
    if encoded_len > crate::limits::MAX_REQUEST_BYTES {
        return Err(Status::invalid_argument(MSG_REQUEST_TOO_LARGE));
    }
    Ok(())
}
