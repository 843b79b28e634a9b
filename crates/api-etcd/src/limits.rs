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

/// Responses queued per Watch stream. When the client reads slower than events arrive the
/// stream task waits here, stops following the live event feed and later catches up from
/// store history, so nothing else grows.
pub const WATCH_STREAM_BUFFER: usize = 64;

/// Most watchers one Watch stream may hold.
pub const WATCHERS_PER_STREAM_MAX: usize = 4096;

/// Most events read from store history for one lagging watcher in one step; other
/// watchers and client requests on the stream are served between steps.
pub const WATCH_CATCHUP_BATCH_EVENTS: usize = 1000;

/// Encoded size above which a watch response is split into fragments, for clients that
/// asked for fragmentation.
pub const WATCH_FRAGMENT_BYTES: usize = MAX_REQUEST_BYTES;

/// Default period of progress notifications for watchers created with
/// `progress_notify` (etcd's default is ten minutes).
pub const PROGRESS_NOTIFY_INTERVAL_MS: u64 = 10 * 60 * 1000;

/// Longest a new connection may take to send the 24-byte HTTP/2 client preface. Only the
/// preface is timed: a client that has sent it may then stay idle for as long as it likes.
pub const PREFACE_TIMEOUT_MS: u64 = 10_000;

/// Largest HPACK header block (HEADERS plus CONTINUATION fragments, after removing
/// padding) that the `:authority` sniffer and relay hold in memory. A bigger first block
/// is handed to the HTTP/2 server untouched; a bigger block on a relayed connection closes
/// the connection.
pub const HEADER_BLOCK_BYTES_MAX: usize = 64 * 1024;

/// Largest decoded header list (names plus values plus 32 bytes per field, as HTTP/2's
/// SETTINGS_MAX_HEADER_LIST_SIZE counts it) that the relay re-encodes. Bounds the work a
/// small block full of references to a large dynamic-table entry could cause.
pub const DECODED_HEADER_LIST_BYTES_MAX: usize = 256 * 1024;

/// Largest HPACK dynamic table a client may ask the relay's decoder to keep. HTTP/2
/// servers here advertise the protocol default of 4096 bytes; the slack only tolerates a
/// server configured with a larger table.
pub const HPACK_TABLE_BYTES_MAX: usize = 64 * 1024;

/// Largest frame payload the relay writes towards the HTTP/2 server: the protocol's
/// initial SETTINGS_MAX_FRAME_SIZE, which every endpoint must accept whatever it
/// advertised, so the relay need not read the server's SETTINGS.
pub const RELAY_FRAME_PAYLOAD_BYTES_MAX: usize = 16_384;
