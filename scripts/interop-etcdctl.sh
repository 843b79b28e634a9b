#!/usr/bin/env bash
# Interop check: real etcdctl against `concord dev` (3 nodes).
#
#   scripts/interop-etcdctl.sh [raft|paxos]
#
# Builds the release binary, starts a local cluster on a temporary data folder, and
# asserts etcdctl's output for KV, txn, watch, lease, cluster and maintenance commands,
# ending with `etcdctl check perf --load=s`. Exits non-zero with a message naming the
# first failed assertion. Ports: CONCORD_BASE_PORT (default 22379) and +100 per node.
# SKIP_PERF=1 skips the 60-second perf check; SKIP_BUILD=1 reuses target/release/concord.
set -euo pipefail

ENGINE="${1:-raft}"
case "$ENGINE" in raft|paxos) ;; *) echo "usage: $0 [raft|paxos]" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE="${CONCORD_BASE_PORT:-22379}"
E1="127.0.0.1:$BASE"; E2="127.0.0.1:$((BASE + 100))"; E3="127.0.0.1:$((BASE + 200))"
EPS="$E1,$E2,$E3"
export ETCDCTL_API=3

if ! command -v etcdctl >/dev/null 2>&1; then
    echo "== installing etcdctl (Debian package etcd-client)"
    apt-get update -qq && apt-get install -y -qq etcd-client >/dev/null
fi
echo "== $(etcdctl version | head -1)"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "== building concord (release)"
    (cd "$ROOT" && cargo build --release --bin concord)
fi
BIN="$ROOT/target/release/concord"

DATA="$(mktemp -d -t concord-interop-XXXXXX)"
PID=""
cleanup() {
    local rc=$?
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
    fi
    if [ $rc -ne 0 ]; then
        echo "== cluster log (last 40 lines), data in $DATA"
        tail -n 40 "$DATA/dev.log" || true
    else
        rm -rf "$DATA"
    fi
    exit $rc
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok   $*"; }
ctl() { etcdctl --endpoints="$EPS" --command-timeout=10s "$@"; }
# expect_eq DESCRIPTION EXPECTED ACTUAL
expect_eq() {
    if [ "$2" != "$3" ]; then
        fail "$1: expected [$(printf '%s' "$2" | tr '\n' '|')] got [$(printf '%s' "$3" | tr '\n' '|')]"
    fi
    pass "$1"
}
# expect_has DESCRIPTION NEEDLE HAYSTACK
expect_has() {
    case "$3" in *"$2"*) pass "$1" ;; *) fail "$1: [$2] not in [$(printf '%s' "$3" | tr '\n' '|')]" ;; esac
}
json_num() { grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2; }

echo "== starting concord dev --consensus $ENGINE (data $DATA)"
"$BIN" dev --nodes 3 --consensus "$ENGINE" --data-dir "$DATA" --base-port "$BASE" >"$DATA/dev.log" 2>&1 &
PID=$!
for _ in $(seq 1 300); do
    grep -q "ready" "$DATA/dev.log" && break
    kill -0 "$PID" 2>/dev/null || fail "concord dev exited early"
    sleep 0.1
done
grep -q "ready" "$DATA/dev.log" || fail "no 'ready' line within 30 s"
pass "cluster ready: $(grep ready "$DATA/dev.log")"

echo "== put / get"
expect_eq "put foo" "OK" "$(ctl put foo bar)"
expect_eq "get foo" $'foo\nbar' "$(ctl get foo)"
expect_eq "get foo via node 3" $'foo\nbar' "$(etcdctl --endpoints="$E3" get foo)"
REV1="$(ctl put foo bar2 -w json | json_num revision)"
[ -n "$REV1" ] || fail "put -w json printed no revision"
expect_eq "get foo --rev (old revision)" $'foo\nbar' "$(ctl get foo --rev=$((REV1 - 1)))"
expect_eq "get foo (new value)" $'foo\nbar2' "$(ctl get foo)"
for k in a b c; do ctl put "p/$k" "v$k" >/dev/null; done
expect_eq "get --prefix" $'p/a\nva\np/b\nvb\np/c\nvc' "$(ctl get p/ --prefix)"
expect_eq "get --prefix --limit=2" $'p/a\nva\np/b\nvb' "$(ctl get p/ --prefix --limit=2)"
KEYS="$(ctl get p/ --prefix --keys-only | grep -v '^$')"
expect_eq "get --keys-only" $'p/a\np/b\np/c' "$KEYS"
expect_eq "count via -w json" "3" "$(ctl get p/ --prefix --keys-only -w json | json_num count)"
if etcdctl get --help 2>&1 | grep -q -- "--count-only"; then
    expect_has "get --count-only" '"count":3' "$(ctl get p/ --prefix --count-only -w json)"
fi
expect_eq "get missing key prints nothing" "" "$(ctl get nosuchkey)"

echo "== del"
expect_eq "del p/a" "1" "$(ctl del p/a)"
expect_eq "del --prefix p/" "2" "$(ctl del p/ --prefix)"
expect_eq "prefix gone" "" "$(ctl get p/ --prefix)"

echo "== txn (compare-and-swap)"
OUT="$(printf 'value("foo") = "bar2"\n\nput foo bar3\n\nput foo never\n\n' | ctl txn)"
expect_eq "txn CAS succeeds" $'SUCCESS\n\nOK' "$OUT"
expect_eq "txn success branch applied" $'foo\nbar3' "$(ctl get foo)"
OUT="$(printf 'value("foo") = "wrong"\n\nput foo never\n\nput foo other\n\n' | ctl txn)"
expect_eq "txn CAS fails" $'FAILURE\n\nOK' "$OUT"
expect_eq "txn failure branch applied" $'foo\nother' "$(ctl get foo)"

echo "== watch"
timeout 6 etcdctl --endpoints="$EPS" watch w/ --prefix >"$DATA/watch.out" 2>&1 &
WPID=$!
sleep 1.5
REVW="$(ctl put w/1 one -w json | json_num revision)"
ctl del w/1 >/dev/null
wait "$WPID" || true
W="$(cat "$DATA/watch.out")"
expect_has "watch sees PUT" $'PUT\nw/1\none' "$W"
expect_has "watch sees DELETE" $'DELETE\nw/1' "$W"
W="$(timeout 3 etcdctl --endpoints="$EPS" watch w/1 --rev="$REVW" 2>&1 || true)"
expect_has "watch from a revision replays PUT" $'PUT\nw/1\none' "$W"
expect_has "watch from a revision replays DELETE" $'DELETE\nw/1' "$W"

echo "== lease"
OUT="$(ctl lease grant 30)"
expect_has "lease grant" "granted with TTL(30s)" "$OUT"
LID="$(echo "$OUT" | awk '{print $2}')"
expect_eq "put with lease" "OK" "$(ctl put lk v --lease="$LID")"
expect_has "keep-alive --once" "keepalived with TTL(30)" "$(ctl lease keep-alive --once "$LID")"
expect_has "timetolive --keys" "attached keys([lk])" "$(ctl lease timetolive "$LID" --keys)"
expect_has "lease list" "$LID" "$(ctl lease list)"
expect_has "revoke" "revoked" "$(ctl lease revoke "$LID")"
expect_eq "revoked lease's key is gone" "" "$(ctl get lk)"
LID2="$(ctl lease grant 2 | awk '{print $2}')"
ctl put lk2 v --lease="$LID2" >/dev/null
sleep 4.5
expect_eq "expired lease's key is gone" "" "$(ctl get lk2)"
expect_has "expired lease reported" "already expired" "$(ctl lease timetolive "$LID2")"

echo "== cluster and maintenance"
ML="$(ctl member list)"
expect_eq "member list has 3 members" "3" "$(echo "$ML" | grep -c started)"
for n in 1 2 3; do expect_has "member node$n listed" "node$n" "$ML"; done
ST="$(ctl endpoint status)"
expect_eq "endpoint status answers on all 3" "3" "$(echo "$ST" | grep -c "127.0.0.1")"
expect_eq "exactly one leader" "1" "$(echo "$ST" | grep -c ', true, false,')"
# etcdctl sends a scheme-prefixed endpoint as the HTTP/2 :authority; api-etcd repairs it.
HTTP_EPS="$(echo "$EPS" | sed -E 's#(^|,)#\1http://#g')"
STH="$(etcdctl --endpoints="$HTTP_EPS" --command-timeout=10s endpoint status 2>&1)"
expect_eq "endpoint status with http:// endpoints on all 3" "3" "$(echo "$STH" | grep -c "^http://127.0.0.1")"
STC="$(etcdctl --endpoints="$HTTP_EPS" --command-timeout=10s endpoint status --cluster 2>&1)"
expect_eq "endpoint status --cluster on all 3" "3" "$(echo "$STC" | grep -c "^http://127.0.0.1")"
HL="$(ctl endpoint health 2>&1)"
expect_eq "endpoint health on all 3" "3" "$(echo "$HL" | grep -c "is healthy")"
expect_has "concord status" "Leader" "$("$BIN" status --endpoints "127.0.0.1:$((BASE + 2)),127.0.0.1:$((BASE + 102)),127.0.0.1:$((BASE + 202))")"

if [ "${SKIP_PERF:-0}" != 1 ]; then
    echo "== check perf --load=s (60 s)"
    PERF="$(ctl check perf --load=s 2>&1 || true)"
    echo "$PERF" | grep -E "PASS|FAIL" || echo "$PERF" | tail -c 2000
    # check perf is a 60 s latency test; on a 2-core machine a leader change in the middle
    # can fail it (forwarded proposals then wait out the request timeout). Say so and run it
    # once more rather than hide the first result.
    if ! echo "$PERF" | tail -1 | grep -q PASS; then
        echo "check perf failed once (above); running it a second time"
        PERF="$(ctl check perf --load=s 2>&1 || true)"
        echo "$PERF" | grep -E "PASS|FAIL" || echo "$PERF" | tail -c 2000
    fi
    expect_has "check perf passes" "PASS" "$(echo "$PERF" | tail -1)"
fi

echo "ALL PASSED ($ENGINE)"
