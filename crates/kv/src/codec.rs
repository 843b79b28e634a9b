//! Log-entry encoding of [`Command`] (postcard), with the guards that keep decoding of
//! hostile bytes from panicking or overflowing the stack.

use std::cell::Cell;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::KvError;
use crate::types::{Command, Compare, RequestOp, TxnRequest};

/// Most levels of transactions nested inside each other (the outermost counts as 1).
/// etcd has no explicit bound; ours keeps recursive decoding and validation shallow.
pub const TXN_DEPTH_MAX: usize = 8;

/// Largest encoded command accepted by [`Command::decode`]. Above etcd's default
/// request limit (1.5 MiB) with headroom for a transaction's framing.
pub const COMMAND_BYTES_MAX: usize = 4 * 1024 * 1024;

/// First byte of every encoded command, so that a future format can be told apart.
const COMMAND_FORMAT_V1: u8 = 1;

thread_local! {
    /// Depth of `TxnRequest`s being deserialised on this thread right now.
    static TXN_DECODE_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Decrements the depth counter however deserialisation leaves the frame.
struct DepthGuard;

impl DepthGuard {
    fn enter() -> Result<DepthGuard, usize> {
        TXN_DECODE_DEPTH.with(|d| {
            let depth = d.get() + 1;
            if depth > TXN_DEPTH_MAX {
                return Err(depth);
            }
            d.set(depth);
            Ok(DepthGuard)
        })
    }
}

impl Drop for DepthGuard {
    fn drop(&mut self) {
        TXN_DECODE_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// The wire shape of [`TxnRequest`]; the real type deserialises through it under a
/// [`DepthGuard`].
#[derive(Deserialize)]
#[serde(rename = "TxnRequest")]
struct TxnRequestRepr {
    compare: Vec<Compare>,
    success: Vec<RequestOp>,
    failure: Vec<RequestOp>,
}

impl<'de> Deserialize<'de> for TxnRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let _guard = DepthGuard::enter().map_err(|depth| {
            serde::de::Error::custom(format_args!(
                "transactions nested {depth} deep (max {TXN_DEPTH_MAX})"
            ))
        })?;
        let repr = TxnRequestRepr::deserialize(deserializer)?;
        Ok(TxnRequest {
            compare: repr.compare,
            success: repr.success,
            failure: repr.failure,
        })
    }
}

impl Command {
    /// Encodes the command for a log entry: a format byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![COMMAND_FORMAT_V1];
        // Serialising owned plain data into a Vec cannot fail; a failure would be a bug in
        // the types above, so it is an invariant violation rather than an input error.
        let body = postcard::to_allocvec(self).expect("Command serialises");
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a log entry's bytes. Never panics: empty, oversized, truncated, trailing,
    /// unknown-format or too-deeply-nested input is a [`KvError::Decode`].
    pub fn decode(bytes: &[u8]) -> Result<Command, KvError> {
        if bytes.len() > COMMAND_BYTES_MAX {
            return Err(KvError::Decode(format!(
                "command is {} bytes (max {COMMAND_BYTES_MAX})",
                bytes.len()
            )));
        }
        let (&format, body) = bytes
            .split_first()
            .ok_or_else(|| KvError::Decode("empty command".into()))?;
        if format != COMMAND_FORMAT_V1 {
            return Err(KvError::Decode(format!(
                "unknown command format {format} (expected {COMMAND_FORMAT_V1})"
            )));
        }
        let (cmd, rest) = postcard::take_from_bytes::<Command>(body)
            .map_err(|e| KvError::Decode(format!("postcard: {e}")))?;
        if !rest.is_empty() {
            return Err(KvError::Decode(format!(
                "{} trailing bytes after command",
                rest.len()
            )));
        }
        Ok(cmd)
    }
}

/// Encodes any serialisable value with postcard (used by snapshots).
pub(crate) fn to_postcard<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("plain data serialises")
}
