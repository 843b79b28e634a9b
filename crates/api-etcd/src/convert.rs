//! Translation between the wire messages (`crate::proto`) and the KV service's own types
//! (`concord_kv`). The two mirror each other field for field, so this is copying; the only
//! judgement here is how out-of-range enum numbers are treated (a clear InvalidArgument,
//! never a silent default).

use concord_kv as kv;
use tonic::Status;

use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb;

/// Longest chain of nested transactions accepted from the wire. The KV store refuses deeper
/// nesting too; checking here keeps a hostile request from recursing through this module.
pub const TXN_NESTING_MAX: usize = kv::TXN_DEPTH_MAX;

fn bad_enum(what: &str, n: i32) -> Status {
    Status::invalid_argument(format!("etcdserver: invalid {what} value {n}"))
}

// ------------------------------------------------------------------ KV: wire -> service

pub fn range_request(r: pb::RangeRequest) -> Result<kv::RangeRequest, Status> {
    use pb::range_request::{SortOrder, SortTarget};
    let sort_order = match SortOrder::try_from(r.sort_order) {
        Ok(SortOrder::None) => kv::SortOrder::None,
        Ok(SortOrder::Ascend) => kv::SortOrder::Ascend,
        Ok(SortOrder::Descend) => kv::SortOrder::Descend,
        Err(_) => return Err(bad_enum("sort_order", r.sort_order)),
    };
    let sort_target = match SortTarget::try_from(r.sort_target) {
        Ok(SortTarget::Key) => kv::SortTarget::Key,
        Ok(SortTarget::Version) => kv::SortTarget::Version,
        Ok(SortTarget::Create) => kv::SortTarget::Create,
        Ok(SortTarget::Mod) => kv::SortTarget::Mod,
        Ok(SortTarget::Value) => kv::SortTarget::Value,
        Err(_) => return Err(bad_enum("sort_target", r.sort_target)),
    };
    Ok(kv::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

pub fn put_request(r: pb::PutRequest) -> kv::PutRequest {
    kv::PutRequest {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

pub fn delete_request(r: pb::DeleteRangeRequest) -> kv::DeleteRangeRequest {
    kv::DeleteRangeRequest {
        key: r.key,
        range_end: r.range_end,
        prev_kv: r.prev_kv,
    }
}

fn compare(c: pb::Compare) -> Result<kv::Compare, Status> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let result = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => kv::CompareResult::Equal,
        Ok(CompareResult::Greater) => kv::CompareResult::Greater,
        Ok(CompareResult::Less) => kv::CompareResult::Less,
        Ok(CompareResult::NotEqual) => kv::CompareResult::NotEqual,
        Err(_) => return Err(bad_enum("compare result", c.result)),
    };
    let target =
        CompareTarget::try_from(c.target).map_err(|_| bad_enum("compare target", c.target))?;
    // etcd reads the operand from the oneof field that matches `target`; a missing operand
    // means the zero value of that field (proto3 default), which is what Go clients send for
    // e.g. `Compare(Version(k), "=", 0)`.
    let u = c.target_union;
    let target = match target {
        CompareTarget::Version => kv::CompareTarget::Version(match u {
            Some(TargetUnion::Version(v)) => v,
            _ => 0,
        }),
        CompareTarget::Create => kv::CompareTarget::CreateRevision(match u {
            Some(TargetUnion::CreateRevision(v)) => v,
            _ => 0,
        }),
        CompareTarget::Mod => kv::CompareTarget::ModRevision(match u {
            Some(TargetUnion::ModRevision(v)) => v,
            _ => 0,
        }),
        CompareTarget::Value => kv::CompareTarget::Value(match u {
            Some(TargetUnion::Value(v)) => v,
            _ => Vec::new(),
        }),
        CompareTarget::Lease => kv::CompareTarget::Lease(match u {
            Some(TargetUnion::Lease(v)) => v,
            _ => 0,
        }),
    };
    Ok(kv::Compare {
        key: c.key,
        range_end: c.range_end,
        result,
        target,
    })
}

fn request_op(op: pb::RequestOp, depth: usize) -> Result<kv::RequestOp, Status> {
    use pb::request_op::Request;
    match op.request {
        Some(Request::RequestRange(r)) => Ok(kv::RequestOp::Range(range_request(r)?)),
        Some(Request::RequestPut(r)) => Ok(kv::RequestOp::Put(put_request(r))),
        Some(Request::RequestDeleteRange(r)) => Ok(kv::RequestOp::DeleteRange(delete_request(r))),
        Some(Request::RequestTxn(t)) => Ok(kv::RequestOp::Txn(txn_request_at(t, depth + 1)?)),
        None => Err(Status::invalid_argument(
            "etcdserver: txn operation has no request",
        )),
    }
}

/// Converts a transaction, checking the per-branch operation limit (etcd's
/// `--max-txn-ops`, 128 by default) at every nesting level before converting anything.
pub fn txn_request(t: pb::TxnRequest) -> Result<kv::TxnRequest, Status> {
    txn_request_at(t, 1)
}

fn txn_request_at(t: pb::TxnRequest, depth: usize) -> Result<kv::TxnRequest, Status> {
    if depth > TXN_NESTING_MAX {
        return Err(Status::invalid_argument(
            "etcdserver: txn nested too deeply",
        ));
    }
    let max = crate::limits::TXN_OPS_MAX;
    if t.compare.len() > max || t.success.len() > max || t.failure.len() > max {
        return Err(Status::invalid_argument(
            "etcdserver: too many operations in txn request",
        ));
    }
    Ok(kv::TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare)
            .collect::<Result<_, _>>()?,
        success: t
            .success
            .into_iter()
            .map(|op| request_op(op, depth))
            .collect::<Result<_, _>>()?,
        failure: t
            .failure
            .into_iter()
            .map(|op| request_op(op, depth))
            .collect::<Result<_, _>>()?,
    })
}

// ------------------------------------------------------------------ KV: service -> wire

pub fn key_value(k: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        value: k.value,
        lease: k.lease,
    }
}

pub fn event(e: kv::Event, with_prev_kv: bool) -> mvccpb::Event {
    let kind = match e.kind {
        kv::EventKind::Put => mvccpb::event::EventType::Put,
        kv::EventKind::Delete => mvccpb::event::EventType::Delete,
    };
    mvccpb::Event {
        r#type: kind as i32,
        kv: Some(key_value(e.kv)),
        prev_kv: if with_prev_kv {
            e.prev_kv.map(key_value)
        } else {
            None
        },
    }
}

/// The cluster part of every response header; the revision comes from the KV service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderStamp {
    pub cluster_id: u64,
    pub member_id: u64,
    pub raft_term: u64,
}

impl HeaderStamp {
    pub fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft_term,
        })
    }
}

pub fn range_response(r: kv::RangeResponse, h: &HeaderStamp) -> pb::RangeResponse {
    pb::RangeResponse {
        header: h.header(r.header.revision),
        kvs: r.kvs.into_iter().map(key_value).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_response(r: kv::PutResponse, h: &HeaderStamp) -> pb::PutResponse {
    pb::PutResponse {
        header: h.header(r.header.revision),
        prev_kv: r.prev_kv.map(key_value),
    }
}

pub fn delete_response(r: kv::DeleteRangeResponse, h: &HeaderStamp) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: h.header(r.header.revision),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(key_value).collect(),
    }
}

pub fn txn_response(r: kv::TxnResponse, h: &HeaderStamp) -> pb::TxnResponse {
    use pb::response_op::Response;
    pb::TxnResponse {
        header: h.header(r.header.revision),
        succeeded: r.succeeded,
        responses: r
            .responses
            .into_iter()
            .map(|op| pb::ResponseOp {
                response: Some(match op {
                    kv::ResponseOp::Range(r) => Response::ResponseRange(range_response(r, h)),
                    kv::ResponseOp::Put(r) => Response::ResponsePut(put_response(r, h)),
                    kv::ResponseOp::DeleteRange(r) => {
                        Response::ResponseDeleteRange(delete_response(r, h))
                    }
                    kv::ResponseOp::Txn(r) => Response::ResponseTxn(txn_response(r, h)),
                }),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> pb::TxnRequest {
        let mut t = pb::TxnRequest::default();
        for _ in 1..depth {
            t = pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestTxn(t)),
                }],
                ..Default::default()
            };
        }
        t
    }

    #[test]
    fn nesting_is_bounded() {
        assert!(txn_request(nested(TXN_NESTING_MAX)).is_ok());
        let err = txn_request(nested(TXN_NESTING_MAX + 1)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), "etcdserver: txn nested too deeply");
    }

    #[test]
    fn empty_op_and_bad_enums_are_refused() {
        let t = pb::TxnRequest {
            success: vec![pb::RequestOp { request: None }],
            ..Default::default()
        };
        assert_eq!(
            txn_request(t).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let t = pb::TxnRequest {
            compare: vec![pb::Compare {
                target: 42,
                key: b"k".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(txn_request(t)
            .unwrap_err()
            .message()
            .contains("compare target"));
    }

    #[test]
    fn missing_compare_operand_is_the_zero_value() {
        let c = compare(pb::Compare {
            target: pb::compare::CompareTarget::Version as i32,
            key: b"k".to_vec(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.target, kv::CompareTarget::Version(0));
        assert_eq!(c.result, kv::CompareResult::Equal);
    }
}
