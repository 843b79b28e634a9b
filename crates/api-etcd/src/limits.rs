//! Named limits of the front-end. Each bounds memory or work that a client could otherwise
//! grow without limit.

/// Largest request accepted, in encoded bytes (etcd's default `--max-request-bytes`).
/// Larger writes are refused with "etcdserver: request is too large".
pub const MAX_REQUEST_BYTES: usize = 3 * 512 * 1024;

/// Slack on top of [`MAX_REQUEST_BYTES`] for the gRPC decoder, as etcd allows, so an
/// oversized request still decodes and gets etcd's error instead of a transport error.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Most compares, and most operations per branch, in one transaction (etcd's
/// `--max-txn-ops` default).
pub const TXN_OPS_MAX: usize = 128;

/// Responses queued per LeaseKeepAlive stream before the server stops reading requests.
pub const KEEPALIVE_STREAM_BUFFER: usize = 16;
