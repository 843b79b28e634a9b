#!/usr/bin/env bash
# Resident memory of Concord nodes holding many keys.
#
# Starts a 3-node cluster of separate `concord start` processes on loopback (ports
# 41379.., data under a fresh temporary folder), writes KEYS distinct keys of VALUE bytes
# each with `concord-bench` (its preload phase writes every key once, then a short get
# load runs), and prints each node's resident memory (VmRSS) and peak (VmHWM) from
# /proc, plus the size of its data folder. Stops the cluster and removes the data on exit.
#
#   bench/memory.sh [--keys 1000000] [--value-size 256] [--consensus raft|paxos]
#
# Needs release builds: cargo build --release -p concord -p concord-bench
set -euo pipefail

KEYS=1000000
VALUE=256
CONSENSUS=raft
while [ $# -gt 0 ]; do
  case "$1" in
    --keys) KEYS="$2"; shift 2 ;;
    --value-size) VALUE="$2"; shift 2 ;;
    --consensus) CONSENSUS="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CONCORD="${CONCORD:-$ROOT/target/release/concord}"
BENCH="${CONCORD_BENCH:-$ROOT/target/release/concord-bench}"
for b in "$CONCORD" "$BENCH"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release -p concord -p concord-bench" >&2; exit 2; }
done

DIR="$(mktemp -d /tmp/concord-memory.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "data and logs kept in $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

BASE=41379
PEERS="1=127.0.0.1:$((BASE + 1)),2=127.0.0.1:$((BASE + 101)),3=127.0.0.1:$((BASE + 201))"
ENDPOINTS=""
for id in 1 2 3; do
  off=$(( (id - 1) * 100 ))
  "$CONCORD" start --id "$id" --peers "$PEERS" --consensus "$CONSENSUS" \
    --listen-client "127.0.0.1:$((BASE + off))" \
    --listen-peer "127.0.0.1:$((BASE + off + 1))" \
    --listen-admin "127.0.0.1:$((BASE + off + 2))" \
    --data-dir "$DIR/node$id" >"$DIR/node$id.log" 2>&1 &
  PIDS+=($!)
  ENDPOINTS="${ENDPOINTS:+$ENDPOINTS,}127.0.0.1:$((BASE + off))"
done

rss() { awk -v k="$2" '$1 == k":" { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
report() {
  echo "== $1"
  for i in 0 1 2; do
    p=${PIDS[$i]}
    echo "node $((i + 1)) (pid $p): VmRSS $(rss "$p" VmRSS) MiB, VmHWM $(rss "$p" VmHWM) MiB, data $(du -sm "$DIR/node$((i + 1))" | cut -f1) MiB"
  done
}

ADMIN="127.0.0.1:$((BASE + 2)),127.0.0.1:$((BASE + 102)),127.0.0.1:$((BASE + 202))"
for _ in $(seq 1 60); do
  "$CONCORD" status --endpoints "$ADMIN" 2>/dev/null | grep -q Leader && break
  sleep 0.5
done
"$CONCORD" status --endpoints "$ADMIN" || true
report "empty cluster"
start=$(date +%s)
# The get load preloads every key once (put), then reads for a few seconds.
"$BENCH" kv --endpoints "$ENDPOINTS" --op get --clients 16 --keys "$KEYS" \
  --value-size "$VALUE" --duration 5s
echo "loaded $KEYS keys of $VALUE B in $(( $(date +%s) - start )) s (consensus $CONSENSUS)"
report "after loading $KEYS keys of $VALUE B"
sleep 10
report "10 s later"
