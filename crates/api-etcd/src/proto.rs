//! Code generated at build time from `proto/` (our own .proto files).

/// `mvccpb`: KeyValue and Event.
pub mod mvccpb {
    #![allow(clippy::all, missing_docs)] // generated code
    tonic::include_proto!("mvccpb");
}

/// `etcdserverpb`: the KV, Watch, Lease, Cluster and Maintenance services.
pub mod etcdserverpb {
    #![allow(clippy::all, missing_docs)] // generated code
    tonic::include_proto!("etcdserverpb");
}
