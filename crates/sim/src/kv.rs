//! The simulated clients' state machine: a tiny key-value map with put and compare-and-set,
//! plus a session table so a retried request is applied at most once.
//!
//! Commands travel in entry data as `u8 version(=1) | u32 client | u64 request | u8 tag |
//! u8 key | u64 a | u64 b` (little-endian). Reads do not go through the log: they use
//! `read_index` and are served from the local map.

use crate::linearizability::{KvOut, Value};
use std::collections::BTreeMap;

const VERSION: u8 = 1;
const REQUEST_BYTES: usize = 1 + 4 + 8 + 1 + 1 + 8 + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Put { key: u8, value: Value },
    Cas { key: u8, expect: Value, new: Value },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub client: u32,
    /// Per-client, strictly increasing; retries of one operation reuse it.
    pub req: u64,
    pub cmd: Command,
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REQUEST_BYTES);
        out.push(VERSION);
        out.extend_from_slice(&self.client.to_le_bytes());
        out.extend_from_slice(&self.req.to_le_bytes());
        let (tag, key, a, b) = match self.cmd {
            Command::Put { key, value } => (1u8, key, value, 0),
            Command::Cas { key, expect, new } => (2u8, key, expect, new),
        };
        out.push(tag);
        out.push(key);
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
        out
    }

    /// Never panics: anything that is not exactly a request is an error.
    pub fn decode(data: &[u8]) -> Result<Request, &'static str> {
        if data.len() != REQUEST_BYTES {
            return Err("request: wrong length");
        }
        if data[0] != VERSION {
            return Err("request: bad version");
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let client = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
        let req = u64_at(5);
        let key = data[14];
        let (a, b) = (u64_at(15), u64_at(23));
        let cmd = match data[13] {
            1 if b == 0 && a != 0 => Command::Put { key, value: a },
            2 if b != 0 => Command::Cas {
                key,
                expect: a,
                new: b,
            },
            _ => return Err("request: bad command"),
        };
        Ok(Request { client, req, cmd })
    }
}

/// The replicated map. Deterministic: equal applied prefixes give equal snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kv {
    data: BTreeMap<u8, Value>,
    /// Per client: the last request applied and its result (clients run one op at a time).
    sessions: BTreeMap<u32, (u64, KvOut)>,
}

impl Kv {
    pub fn get(&self, key: u8) -> Value {
        self.data.get(&key).copied().unwrap_or(0)
    }

    /// Applies a request. Returns its result, or the cached result for a duplicate of the
    /// client's last request; `None` for an older request the client already gave up on
    /// (applying it now could take effect outside its interval, so it is skipped).
    pub fn apply(&mut self, r: &Request) -> Option<KvOut> {
        if let Some(&(last, out)) = self.sessions.get(&r.client) {
            if r.req == last {
                return Some(out);
            }
            if r.req < last {
                return None;
            }
        }
        let out = match r.cmd {
            Command::Put { key, value } => {
                self.data.insert(key, value);
                KvOut::Ok
            }
            Command::Cas { key, expect, new } => {
                let ok = self.get(key) == expect;
                if ok {
                    self.data.insert(key, new);
                }
                KvOut::Cas(ok)
            }
        };
        self.sessions.insert(r.client, (r.req, out));
        Some(out)
    }

    /// `u32 n | n * (u8 key | u64 value) | u32 m | m * (u32 client | u64 req | u8 tag | u64 v)`.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.data.len() * 9 + self.sessions.len() * 21);
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        for (k, v) in &self.data {
            out.push(*k);
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.sessions.len() as u32).to_le_bytes());
        for (c, (req, res)) in &self.sessions {
            out.extend_from_slice(&c.to_le_bytes());
            out.extend_from_slice(&req.to_le_bytes());
            let (tag, v) = match *res {
                KvOut::Ok => (0u8, 0u64),
                KvOut::Value(v) => (1, v),
                KvOut::Cas(b) => (2, b as u64),
            };
            out.push(tag);
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Never panics on bad input.
    pub fn restore(bytes: &[u8]) -> Result<Kv, &'static str> {
        let mut r = Reader { b: bytes, at: 0 };
        let mut kv = Kv::default();
        let n = r.u32()?;
        for _ in 0..n {
            let k = r.u8()?;
            let v = r.u64()?;
            kv.data.insert(k, v);
        }
        let m = r.u32()?;
        for _ in 0..m {
            let c = r.u32()?;
            let req = r.u64()?;
            let tag = r.u8()?;
            let v = r.u64()?;
            let res = match tag {
                0 => KvOut::Ok,
                1 => KvOut::Value(v),
                2 => KvOut::Cas(v != 0),
                _ => return Err("snapshot: bad result tag"),
            };
            kv.sessions.insert(c, (req, res));
        }
        if r.at != bytes.len() {
            return Err("snapshot: trailing bytes");
        }
        Ok(kv)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], &'static str> {
        let end = self.at.checked_add(n).ok_or("snapshot: length")?;
        let s = self.b.get(self.at..end).ok_or("snapshot: truncated")?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_rejected() {
        let r = Request {
            client: 3,
            req: 9,
            cmd: Command::Cas {
                key: 2,
                expect: 0,
                new: 5,
            },
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        assert!(Request::decode(&[]).is_err());
        let mut bad = r.encode();
        bad[13] = 7;
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn duplicates_apply_once_and_snapshots_round_trip() {
        let mut kv = Kv::default();
        let put = |req, value| Request {
            client: 1,
            req,
            cmd: Command::Put { key: 1, value },
        };
        assert_eq!(kv.apply(&put(1, 10)), Some(KvOut::Ok));
        assert_eq!(kv.apply(&put(2, 20)), Some(KvOut::Ok));
        assert_eq!(kv.apply(&put(1, 10)), None, "stale retry is skipped");
        assert_eq!(kv.get(1), 20);
        let cas = Request {
            client: 2,
            req: 1,
            cmd: Command::Cas {
                key: 1,
                expect: 20,
                new: 30,
            },
        };
        assert_eq!(kv.apply(&cas), Some(KvOut::Cas(true)));
        assert_eq!(kv.apply(&cas), Some(KvOut::Cas(true)), "duplicate: cached");
        assert_eq!(kv.get(1), 30);
        let back = Kv::restore(&kv.snapshot()).unwrap();
        assert_eq!(back, kv);
        assert!(Kv::restore(&kv.snapshot()[..5]).is_err());
    }
}
