//! What a log entry's payload holds, and the small messages the group tasks exchange
//! beside consensus traffic (forwarded proposals, read-index requests).
//!
//! A proposal is wrapped in an envelope naming the node that accepted it from a client,
//! that node's incarnation (a fresh random-ish number per process start, so sequence numbers
//! of an earlier run never answer a request of this run) and a sequence number. When the
//! entry is applied, every node applies it, and the origin node also answers the waiting
//! client with the state machine's response: no reply needs to travel back from the leader.

use concord_consensus::NodeId;

const VERSION: u8 = 1;
/// Header: version, kind, origin, incarnation, seq.
pub const ENVELOPE_HEADER_LEN: usize = 2 + 8 * 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EnvelopeKind {
    /// A command for the group's state machine.
    Command = 1,
    /// Node-level membership metadata (a member's name and addresses).
    Member = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub kind: EnvelopeKind,
    pub origin: NodeId,
    pub incarnation: u64,
    pub seq: u64,
    pub body: &'a [u8],
}

pub fn encode(
    kind: EnvelopeKind,
    origin: NodeId,
    incarnation: u64,
    seq: u64,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + body.len());
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&origin.to_le_bytes());
    out.extend_from_slice(&incarnation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Decodes an envelope. Never panics on bad input.
pub fn decode(data: &[u8]) -> Result<Envelope<'_>, &'static str> {
    if data.len() < ENVELOPE_HEADER_LEN {
        return Err("entry payload shorter than the envelope header");
    }
    if data[0] != VERSION {
        return Err("unknown envelope version");
    }
    let kind = match data[1] {
        1 => EnvelopeKind::Command,
        2 => EnvelopeKind::Member,
        _ => return Err("unknown envelope kind"),
    };
    let u = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
    Ok(Envelope {
        kind,
        origin: u(2),
        incarnation: u(10),
        seq: u(18),
        body: &data[ENVELOPE_HEADER_LEN..],
    })
}

/// Why a leader refused a forwarded proposal (payload of a `ForwardNack` frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NackCode {
    NotLeader = 1,
    Busy = 2,
    TooLarge = 3,
    Malformed = 4,
}

/// `ForwardNack` payload: incarnation, seq, code.
pub fn encode_nack(incarnation: u64, seq: u64, code: NackCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    out.extend_from_slice(&incarnation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(code as u8);
    out
}

pub fn decode_nack(data: &[u8]) -> Result<(u64, u64, NackCode), &'static str> {
    if data.len() != 17 {
        return Err("nack of wrong length");
    }
    let code = match data[16] {
        1 => NackCode::NotLeader,
        2 => NackCode::Busy,
        3 => NackCode::TooLarge,
        4 => NackCode::Malformed,
        _ => return Err("unknown nack code"),
    };
    Ok((
        u64::from_le_bytes(data[0..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")),
        code,
    ))
}

/// `ReadIndexReq` payload: ctx. `ReadIndexResp` payload: ctx, index.
pub fn encode_u64s(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode_u64s<const N: usize>(data: &[u8]) -> Result<[u64; N], &'static str> {
    if data.len() != 8 * N {
        return Err("fixed-size payload of wrong length");
    }
    let mut out = [0u64; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    }
    Ok(out)
}

/// `MemberReq` / `MemberResp` payload: `incarnation u64 LE | seq u64 LE | body JSON`.
/// The incarnation and seq name the request at the node that forwarded it; the body is a
/// membership operation (request) or its result (response). Membership changes are rare
/// and small, so JSON keeps them readable in captures at no real cost.
pub fn encode_member<T: serde::Serialize>(incarnation: u64, seq: u64, body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&incarnation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    // Plain enums and strings always serialise.
    out.extend_from_slice(&serde_json::to_vec(body).expect("member message serialises"));
    out
}

pub fn decode_member<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<(u64, u64, T), String> {
    if data.len() < 16 {
        return Err("member message shorter than its header".into());
    }
    let [inc, seq] = decode_u64s::<2>(&data[..16])?;
    let body = serde_json::from_slice(&data[16..]).map_err(|e| format!("member message: {e}"))?;
    Ok((inc, seq, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let e = encode(EnvelopeKind::Command, 3, 99, 7, b"cmd");
        let d = decode(&e).unwrap();
        assert_eq!(
            (d.kind, d.origin, d.incarnation, d.seq, d.body),
            (EnvelopeKind::Command, 3, 99, 7, &b"cmd"[..])
        );
        assert!(decode(&e[..10]).is_err());
        let mut bad = e.clone();
        bad[1] = 9;
        assert!(decode(&bad).is_err());
        let n = encode_nack(1, 2, NackCode::Busy);
        assert_eq!(decode_nack(&n).unwrap(), (1, 2, NackCode::Busy));
        assert!(decode_nack(&n[..5]).is_err());
        assert_eq!(decode_u64s::<2>(&encode_u64s(&[4, 5])).unwrap(), [4, 5]);
        assert!(decode_u64s::<2>(&[1, 2]).is_err());
        let m = encode_member(5, 6, &vec![1u64, 2]);
        assert_eq!(decode_member::<Vec<u64>>(&m).unwrap(), (5, 6, vec![1, 2]));
        assert!(decode_member::<Vec<u64>>(&m[..10]).is_err());
        assert!(decode_member::<Vec<u64>>(&m[..m.len() - 1]).is_err());
    }
}
