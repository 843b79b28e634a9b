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

/// Serde helpers that write byte strings with `serialize_bytes` instead of as a sequence of
/// `u8`. Postcard encodes both the same way (varint length, raw bytes), so the wire format
/// does not change, but encoding and decoding become a copy instead of a loop per byte
/// (snapshot encoding was ~8x slower without this).
pub(crate) mod bytes {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// Upper bound on bytes reserved up front when a format gives a sequence length.
    const PREALLOC_BYTES_MAX: usize = 64 * 1024;

    pub(crate) fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v.as_ref())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: From<Vec<u8>>>(
        d: D,
    ) -> Result<T, D::Error> {
        d.deserialize_byte_buf(BytesVisitor).map(T::from)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0).min(PREALLOC_BYTES_MAX);
            let mut out = Vec::with_capacity(hint);
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    /// A borrowed byte string that serialises with [`serialize`].
    pub(crate) struct Ref<'a>(pub(crate) &'a [u8]);

    impl serde::Serialize for Ref<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    /// An owned boxed byte string that deserialises with [`deserialize`].
    pub(crate) struct Owned(pub(crate) Box<[u8]>);

    impl<'de> serde::Deserialize<'de> for Owned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            deserialize(d).map(Owned)
        }
    }

    /// The same for an optional byte string (a version's value, `None` for a tombstone).
    pub(crate) mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub(crate) fn serialize<S: Serializer, T: AsRef<[u8]>>(
            v: &Option<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(b) => s.serialize_some(&super::Ref(b.as_ref())),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: From<Box<[u8]>>>(
            d: D,
        ) -> Result<Option<T>, D::Error> {
            Ok(Option::<super::Owned>::deserialize(d)?.map(|o| T::from(o.0)))
        }
    }
}
