#!/usr/bin/env bash
# What a large registry update costs the requests in flight: a fixed load
# (oha, 1000 req/s over 16 connections, latency-corrected) through the shared
# harness's two-hop chain while hop A's static endpoints file, 10,000 endpoints in
# 3,334 services, is rewritten every 1.1 s with every record changed (MODE=churn),
# or left alone (MODE=quiet). Prints oha's tail percentiles and hop A's RSS.
# README, "Control-plane work off the request thread", has the figures.
#
# usage: cargo build --release && bench/update-stall.sh churn|quiet
# env:   OUTRIGGER_BIN (default target/release/outrigger), DUR (seconds, 20),
#        PERF=1 (perf record hop A for 8 s into $OUT/perf.data),
#        STATE=1 (hop A persists its table: [runtime] state_dir), PERIOD (seconds
#        between rewrites, 1.1)
# needs: the shared harness's tools (SETUP_ONLY=1 ../shared/bench/run.sh builds oha
#        and the upstream), python3, curl
set -euo pipefail
MODE="${1:?usage: bench/update-stall.sh churn|quiet}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OUTRIGGER_BIN="${OUTRIGGER_BIN:-$ROOT/target/release/outrigger}"
DUR="${DUR:-20}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-bench"
UP="$CACHE/upstream-target/release/bench-upstream"
OHA="$CACHE/tools/bin/oha"
C="$ROOT/../shared/bench/contenders/outrigger.sh"
OUT="$(mktemp -d /tmp/update-stall.XXXXXX)"
for f in "$UP" "$OHA" "$C" "$OUTRIGGER_BIN"; do
    [ -x "$f" ] || { echo "update-stall: $f missing (SETUP_ONLY=1 ../shared/bench/run.sh; cargo build --release)" >&2; exit 2; }
done

# Two versions of the file that differ in every record (metadata gen = 1 / 2).
python3 - "$OUT" <<'PY'
import sys
for v in (1, 2):
    with open(f"{sys.argv[1]}/e{v}.toml", "w") as f:
        f.write('[[endpoints]]\nservice = "bench"\naddress = "127.0.0.1:22002"\ninstance = "bench-b"\n')
        for s in range(3333):
            for i in range(3):
                f.write(f'[[endpoints]]\nservice = "svc-{s}"\naddress = "10.{s // 250}.{s % 250}.{i + 1}:8080"\n'
                        f'instance = "svc-{s}-{i}"\nmetadata = {{ gen = "{v}" }}\n')
PY

mkdir -p "$OUT/a" "$OUT/b"
"$UP" 18090 >/dev/null 2>&1 &
UPPID=$!
CHURN=""
cleanup() {
    [ -n "$CHURN" ] && kill "$CHURN" 2>/dev/null
    "$C" stop "$OUT/a"; "$C" stop "$OUT/b"; kill "$UPPID" 2>/dev/null
    wait 2>/dev/null || true
}
trap cleanup EXIT
"$C" start inbound 22002 18090 22012 "$OUT/b"
"$C" start outbound 22001 22002 22011 "$OUT/a"
if [ -n "${STATE:-}" ]; then
    # The adapter's config plus a state dir: hop A restarted with it persists
    # every table it publishes (at most once a second).
    "$C" stop "$OUT/a"
    while kill -0 "$(head -1 "$OUT/a/pids")" 2>/dev/null; do sleep 0.1; done
    sed -i "s|^worker_threads = 1\$|worker_threads = 1\nstate_dir = \"$OUT/state\"|" "$OUT/a/outrigger.toml"
    RUST_LOG=warn nohup "$OUTRIGGER_BIN" run --config "$OUT/a/outrigger.toml" >"$OUT/a/stdout.log" 2>&1 </dev/null &
    echo $! >"$OUT/a/pids"
fi
replace() { cp "$OUT/e$1.toml" "$OUT/a/endpoints.toml.new" && mv "$OUT/a/endpoints.toml.new" "$OUT/a/endpoints.toml"; }
replace 1
for _ in $(seq 200); do
    curl -sf -o /dev/null http://127.0.0.1:22001/ \
        && curl -s http://127.0.0.1:22011/routes | grep -q svc-3332 && break
    sleep 0.1
done
curl -s http://127.0.0.1:22011/routes | grep -q svc-3332 || { echo "update-stall: hop A never loaded the 10k table" >&2; exit 1; }
PA="$(head -1 "$OUT/a/pids")"
if [ "$MODE" = churn ]; then
    ( v=2; while :; do replace $v; v=$((3 - v)); sleep "${PERIOD:-1.1}"; done ) &
    CHURN=$!
fi
if [ -n "${PERF:-}" ]; then
    perf record -e cpu-clock -F 1000 --call-graph dwarf,16384 -p "$PA" -o "$OUT/perf.data" -- sleep 8 >/dev/null 2>&1 &
fi
"$OHA" -z "${DUR}s" -c 16 -q 1000 --latency-correction -w --no-tui http://127.0.0.1:22001/ >"$OUT/oha.txt" 2>&1
echo "$MODE: $(grep -E '99.00%|99.90%|99.99%|Slowest|Requests/sec' "$OUT/oha.txt" | tr -s ' \t' ' ' | tr '\n' ' ')" \
     "hop A RSS $(awk '/VmRSS/{print $2}' "/proc/$PA/status") kB  (files in $OUT)"
