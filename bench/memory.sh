#!/usr/bin/env bash
# Resident memory of Concord nodes holding many keys.
#
# Starts a 3-node cluster of separate `concord start` processes on loopback (ports
# 16379.., data under a fresh temporary folder), writes KEYS distinct keys of VALUE bytes
# each with `concord-bench` (its preload phase writes every key once, then a short get
# load runs), and prints each node's resident memory (VmRSS) and peak (VmHWM) from
# /proc, plus the size of its data folder. Stops the cluster and removes the data on exit.
#
#   bench/memory.sh [--keys 1000000] [--value-size 256] [--consensus raft|paxos]
#                   [--system concord|etcd]
#
# `--system etcd` runs the same load against a 3-member etcd (Debian's etcd-server,
# installed if missing; same ports as bench/vs-etcd.sh) for a side-by-side figure.
# Needs release builds: cargo build --release -p concord -p concord-bench
set -euo pipefail

KEYS=1000000
VALUE=256
CONSENSUS=raft
SYSTEM=concord
while [ $# -gt 0 ]; do
  case "$1" in
    --keys) KEYS="$2"; shift 2 ;;
    --value-size) VALUE="$2"; shift 2 ;;
    --consensus) CONSENSUS="$2"; shift 2 ;;
    --system) SYSTEM="$2"; shift 2 ;;
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

if [ "$SYSTEM" = etcd ]; then
  if ! command -v etcd >/dev/null; then
    apt-get install -y etcd-server >/dev/null || { echo "cannot install etcd-server" >&2; exit 2; }
  fi
  CLUSTER="e1=http://127.0.0.1:12380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
  ENDPOINTS="127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379"
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$DIR/node$i" \
      --listen-client-urls "http://127.0.0.1:${i}2379" \
      --advertise-client-urls "http://127.0.0.1:${i}2379" \
      --listen-peer-urls "http://127.0.0.1:${i}2380" \
      --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
      --initial-cluster "$CLUSTER" --initial-cluster-token concord-memory \
      --initial-cluster-state new --log-level error >"$DIR/node$i.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 1 60); do
    "$BENCH" kv --endpoints "$ENDPOINTS" --clients 3 --op put --max-ops 3 --duration 2s \
      >/dev/null 2>&1 && break
    sleep 0.5
  done
else
  BASE=16379  # below the ephemeral range (32768+): an outgoing connection cannot hold it
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
  ADMIN="127.0.0.1:$((BASE + 2)),127.0.0.1:$((BASE + 102)),127.0.0.1:$((BASE + 202))"
  for _ in $(seq 1 60); do
    "$CONCORD" status --endpoints "$ADMIN" 2>/dev/null | grep -q Leader && break
    sleep 0.5
  done
  "$CONCORD" status --endpoints "$ADMIN" || true
fi
# A member that exited at start (a port taken, a bad flag) makes every figure below wrong.
for i in "${!PIDS[@]}"; do
  if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
    echo "node $((i + 1)) exited at start; its log:" >&2
    tail -5 "$DIR/node$((i + 1)).log" >&2
    exit 1
  fi
done

rss() { awk -v k="$2" '$1 == k":" { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
report() {
  echo "== $1"
  for i in 0 1 2; do
    p=${PIDS[$i]}
    echo "node $((i + 1)) (pid $p): VmRSS $(rss "$p" VmRSS) MiB, VmHWM $(rss "$p" VmHWM) MiB, data $(du -sm "$DIR/node$((i + 1))" | cut -f1) MiB"
  done
}

[ "$SYSTEM" = concord ] && echo "concord consensus: $CONSENSUS"
report "empty cluster"
start=$(date +%s)
# The get load preloads every key once (put), then reads for a few seconds.
"$BENCH" kv --endpoints "$ENDPOINTS" --op get --clients 16 --keys "$KEYS" \
  --value-size "$VALUE" --duration 5s
echo "loaded $KEYS keys of $VALUE B in $(( $(date +%s) - start )) s on $SYSTEM"
report "after loading $KEYS keys of $VALUE B"
sleep 10
report "10 s later"
