//! Command-line parsing for `concord-bench kv`. Hand-written to keep the crate lean; every
//! bad argument gives an error that names it.

use std::time::Duration;

use crate::{CLIENTS_MAX, DURATION_MAX, KEYS_MAX, MAX_OPS_DEFAULT, VALUE_SIZE_MAX};

/// The operation each client repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Put a random key of `--keys`.
    Put,
    /// Range-read one random key (linearizable unless `--serializable`).
    Get,
    /// A transaction: compare the key's version, then put it (a compare-and-swap shape).
    Txn,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Txn => "txn",
        }
    }
}

/// Arguments of `concord-bench kv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvArgs {
    /// host:port of each member's client endpoint.
    pub endpoints: Vec<String>,
    pub clients: usize,
    /// gRPC connections shared by the clients (client i uses connection i % conns).
    pub conns: usize,
    pub duration: Duration,
    pub op: Op,
    pub value_size: usize,
    pub keys: u64,
    pub max_ops: u64,
    pub serializable: bool,
}

pub const USAGE: &str = "usage: concord-bench kv --endpoints HOST:PORT[,HOST:PORT...] \
--op put|get|txn [--clients C] [--conns N] [--duration 10s] [--value-size 256] [--keys 1000] \
[--max-ops N] [--serializable]";

/// Parses "10s", "500ms", "2m" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("--duration {s}: expected e.g. 10s, 500ms, 2m");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(bad()),
    };
    // NaN fails `secs > 0.0` too, so it is refused here.
    if secs.is_nan() || secs <= 0.0 || secs > DURATION_MAX.as_secs_f64() {
        return Err(format!(
            "--duration {s}: must be above 0 and at most {}s",
            DURATION_MAX.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn number<T>(flag: &str, v: &str, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let n: T = v.parse().map_err(|_| format!("{flag} {v}: not a number"))?;
    if n < min || n > max {
        return Err(format!("{flag} {v}: must be between {min} and {max}"));
    }
    Ok(n)
}

/// Parses the arguments after `kv`.
pub fn parse_kv_args(args: &[String]) -> Result<KvArgs, String> {
    let mut endpoints = Vec::new();
    let mut clients = 1usize;
    let mut conns = None;
    let mut duration = Duration::from_secs(10);
    let mut op = None;
    let mut value_size = 256usize;
    let mut keys = 1000u64;
    let mut max_ops = MAX_OPS_DEFAULT;
    let mut serializable = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .map(String::as_str)
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--endpoints" => {
                endpoints = value()?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            "--clients" => clients = number("--clients", value()?, 1, CLIENTS_MAX)?,
            "--conns" => conns = Some(number("--conns", value()?, 1, CLIENTS_MAX)?),
            "--duration" => duration = parse_duration(value()?)?,
            "--op" => {
                op = Some(match value()? {
                    "put" => Op::Put,
                    "get" => Op::Get,
                    "txn" => Op::Txn,
                    other => return Err(format!("--op {other}: expected put, get or txn")),
                })
            }
            "--value-size" => value_size = number("--value-size", value()?, 0, VALUE_SIZE_MAX)?,
            "--keys" => keys = number("--keys", value()?, 1, KEYS_MAX)?,
            "--max-ops" => max_ops = number("--max-ops", value()?, 1, u64::MAX)?,
            "--serializable" => serializable = true,
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if endpoints.is_empty() {
        return Err(format!("--endpoints is required\n{USAGE}"));
    }
    let op = op.ok_or_else(|| format!("--op is required\n{USAGE}"))?;
    Ok(KvArgs {
        endpoints,
        clients,
        conns: conns.unwrap_or(clients).min(clients),
        duration,
        op,
        value_size,
        keys,
        max_ops,
        serializable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_a_full_command_line() {
        let a = parse_kv_args(&args(
            "--endpoints 127.0.0.1:1,127.0.0.1:2 --clients 8 --duration 500ms --op txn \
             --value-size 16 --keys 10 --max-ops 99 --serializable",
        ))
        .unwrap();
        assert_eq!(a.endpoints, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!((a.clients, a.conns), (8, 8));
        assert_eq!(a.duration, Duration::from_millis(500));
        assert_eq!(a.op, Op::Txn);
        assert_eq!((a.value_size, a.keys, a.max_ops), (16, 10, 99));
        assert!(a.serializable);
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        let e = parse_kv_args(&args("--endpoints x:1 --op put --clients 0")).unwrap_err();
        assert!(e.contains("--clients 0"), "{e}");
        let e = parse_kv_args(&args("--endpoints x:1 --op nope")).unwrap_err();
        assert!(e.contains("--op nope"), "{e}");
        let e = parse_kv_args(&args("--op put")).unwrap_err();
        assert!(e.contains("--endpoints"), "{e}");
        let e = parse_kv_args(&args("--endpoints x:1 --op put --duration 2h")).unwrap_err();
        assert!(e.contains("--duration 2h"), "{e}");
        let e = parse_kv_args(&args("--endpoints x:1 --op put --duration 7200")).unwrap_err();
        assert!(e.contains("at most"), "{e}");
        let e = parse_kv_args(&args("--endpoints x:1 --op put --keys")).unwrap_err();
        assert!(e.contains("--keys needs a value"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
    }
}
