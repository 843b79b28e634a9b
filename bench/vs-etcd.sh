#!/usr/bin/env bash
# Measures etcd and Concord with the same load generator (concord-bench kv) on this
# machine and prints, per operation and client count:
#   etcd RESULT op=<op> clients=<c> ... ops_per_sec=... p50_ms=... p99_ms=... p999_ms=...
#   concord RESULT op=<op> clients=<c> ...
#   ratio concord/etcd <op> <clients>: X.XX      (throughput, higher is better for Concord)
#
# Usage: bench/vs-etcd.sh [--concord HOST:PORT,HOST:PORT,...] [--ops "put get txn"]
#                         [--clients "1 16 64"] [--duration 10s] [--value-size 256] [--keys 1000]
#                         [--rounds 1]
# With --rounds N each cell is measured N times, etcd and Concord taking turns to go first
# (this disk's fsync latency drifts over minutes, so back-to-back pairs compare fairly),
# and a line `median ratio concord/etcd <op> <clients>: X.XX (N rounds: r1 r2 ...)` follows.
# Without --concord only etcd is measured. Environment: CONCORD_ENDPOINTS (same as
# --concord), CONCORD_BENCH (path of a built concord-bench), ETCD_DATA_ROOT (where the
# etcd members keep their data; fsync stays on, as in production).
#
# It starts a 3-member etcd on loopback (client ports 12379/22379/32379, peer ports
# 12380/22380/32380), installs Debian's etcd-server first if `etcd` is missing, and stops
# the members it started when it exits. Every run is bounded by --duration.
set -euo pipefail

CONCORD="${CONCORD_ENDPOINTS:-}"
OPS="put get txn"
CLIENTS="1 16 64"
DURATION="10s"
VALUE_SIZE=256
KEYS=1000
ROUNDS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --concord) CONCORD="$2"; shift 2 ;;
        --ops) OPS="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --value-size) VALUE_SIZE="$2"; shift 2 ;;
        --keys) KEYS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "vs-etcd.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${CONCORD_BENCH:-$ROOT/target/release/concord-bench}"
if [ ! -x "$BENCH" ]; then
    echo "# building concord-bench (release)" >&2
    (cd "$ROOT" && cargo build --release -p concord-bench >&2)
fi

if ! command -v etcd >/dev/null 2>&1; then
    echo "# installing Debian's etcd-server" >&2
    # Keep the package from starting a system-wide etcd on the default ports.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_added=1
    fi
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >&2
    if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

DATA_ROOT="${ETCD_DATA_ROOT:-$(mktemp -d /tmp/concord-vs-etcd.XXXXXX)}"
mkdir -p "$DATA_ROOT"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    done
    if [ -z "${ETCD_DATA_ROOT:-}" ]; then rm -rf "$DATA_ROOT"; fi
}
trap cleanup EXIT

CLUSTER="e1=http://127.0.0.1:12380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
ETCD_ENDPOINTS="127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379"
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$DATA_ROOT/e$i" \
        --listen-client-urls "http://127.0.0.1:${i}2379" \
        --advertise-client-urls "http://127.0.0.1:${i}2379" \
        --listen-peer-urls "http://127.0.0.1:${i}2380" \
        --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
        --initial-cluster "$CLUSTER" --initial-cluster-token concord-vs-etcd \
        --initial-cluster-state new --log-level error \
        > "$DATA_ROOT/e$i.log" 2>&1 &
    PIDS+=("$!")
done

# Ready when a write through every member succeeds (30 s at most).
ready=0
for _ in $(seq 1 60); do
    if "$BENCH" kv --endpoints "$ETCD_ENDPOINTS" --clients 3 --op put --max-ops 3 \
        --duration 2s >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.5
done
if [ "$ready" != 1 ]; then
    echo "vs-etcd.sh: etcd did not become ready; logs in $DATA_ROOT" >&2
    tail -n 20 "$DATA_ROOT"/e*.log >&2 || true
    exit 1
fi

# Runs one measurement; prints "<system> RESULT ..." on stdout and returns the ops/s
# in the global OPS_PER_SEC. The full report goes to stderr.
OPS_PER_SEC=0
run() {
    local system="$1" endpoints="$2" op="$3" clients="$4" out result
    if ! out="$("$BENCH" kv --endpoints "$endpoints" --op "$op" --clients "$clients" \
        --duration "$DURATION" --value-size "$VALUE_SIZE" --keys "$KEYS")"; then
        printf '%s\n' "$out" >&2
        echo "vs-etcd.sh: concord-bench failed against $system ($endpoints)" >&2
        return 1
    fi
    printf '%s\n' "$out" >&2
    result="$(printf '%s\n' "$out" | grep '^RESULT')"
    echo "$system $result"
    OPS_PER_SEC="$(printf '%s\n' "$result" | tr ' ' '\n' | sed -n 's/^ops_per_sec=//p')"
}

for op in $OPS; do
    for c in $CLIENTS; do
        ratios=""
        for r in $(seq 1 "$ROUNDS"); do
            order="etcd concord"
            if [ $((r % 2)) = 0 ]; then order="concord etcd"; fi
            etcd_ops=0
            concord_ops=0
            for system in $order; do
                if [ "$system" = etcd ]; then
                    echo "# etcd $op clients=$c round $r" >&2
                    run etcd "$ETCD_ENDPOINTS" "$op" "$c"
                    etcd_ops="$OPS_PER_SEC"
                elif [ -n "$CONCORD" ]; then
                    echo "# concord $op clients=$c round $r" >&2
                    run concord "$CONCORD" "$op" "$c"
                    concord_ops="$OPS_PER_SEC"
                fi
            done
            if [ -n "$CONCORD" ]; then
                ratio="$(awk -v a="$concord_ops" -v b="$etcd_ops" \
                    'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }')"
                echo "ratio concord/etcd $op $c: $ratio"
                ratios="$ratios $ratio"
            fi
        done
        if [ -n "$CONCORD" ] && [ "$ROUNDS" -gt 1 ]; then
            printf '%s\n' $ratios | grep -v n/a | sort -n | awk -v op="$op" -v c="$c" \
                -v all="$ratios" -v n="$ROUNDS" '{ v[NR] = $1 }
                END { if (NR == 0) { printf "median ratio concord/etcd %s %s: n/a\n", op, c; exit }
                      m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
                      printf "median ratio concord/etcd %s %s: %.2f (%d rounds:%s)\n", op, c, m, n, all }'
        fi
    done
done
