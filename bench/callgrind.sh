#!/usr/bin/env bash
# Instructions per request of each sidecar on the two-hop mesh path, counted by
# valgrind's callgrind: a repeatable figure on a busy or noisy machine, where
# wall-clock throughput swings by tens of percent (see bench/README.md).
#
#   h2load --h1 ─▶ A ([[upstreams]] local_port) ══h2c══▶ B (inbound) ──h1──▶ upstream
#
# Both sidecars run under callgrind with the full feature set (routing table,
# P2C-EWMA, retries, metrics). After a warm-up the counters are zeroed, exactly
# REQUESTS requests are sent, and the counters are dumped: Ir / REQUESTS is the
# per-request cost of each hop, start-up and connection set-up excluded.
#
# usage: cargo build --release && bench/callgrind.sh
#        CONTENDER=haproxy bench/callgrind.sh   # the same chain through HAProxy (the
#        harness's configuration: nbthread 1, http-reuse always), for a baseline
# env:   OUTRIGGER_BIN (default target/release/outrigger), REQUESTS (5000),
#        CONNS (16), PROTO (h1 | h2: the client speaks h2c to A), OUT_DIR,
#        UPSTREAM_BIN (built like bench/run.sh does if missing), CALLGRIND_FLAGS (extra
#        valgrind options; scripts/hot-text.sh passes --demangle=no)
#
# Each sidecar leaves three dumps: .1 (start-up and warm-up), .2 (the measured requests)
# and, once it has shut down, the final one (idle time and shutdown).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${OUTRIGGER_BENCH_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrigger-bench}"
OUTRIGGER_BIN="${OUTRIGGER_BIN:-$ROOT/target/release/outrigger}"
UPSTREAM_SRC="${UPSTREAM_SRC:-$ROOT/../shared/bench/upstream}"
UPSTREAM_BIN="${UPSTREAM_BIN:-$STATE/upstream-target/release/bench-upstream}"
REQUESTS="${REQUESTS:-5000}"
CONNS="${CONNS:-16}"
PROTO="${PROTO:-h1}"
BASE="${BASE_PORT:-23000}"
OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/outrigger-callgrind.XXXXXX)}"

say() { echo "[callgrind] $*" >&2; }
die() { echo "[callgrind] ERROR: $*" >&2; exit 1; }

CONTENDER="${CONTENDER:-outrigger}"
case "$CONTENDER" in outrigger | haproxy) ;; *) die "CONTENDER must be outrigger or haproxy" ;; esac
for tool in valgrind callgrind_control h2load curl; do
  command -v "$tool" >/dev/null || die "$tool missing: apt-get install valgrind nghttp2-client curl"
done
if [ "$CONTENDER" = haproxy ]; then
  HAPROXY_BIN="${HAPROXY_BIN:-$(command -v haproxy || echo /usr/sbin/haproxy)}"
  [ -x "$HAPROXY_BIN" ] || die "haproxy missing: apt-get install haproxy"
else
  [ -x "$OUTRIGGER_BIN" ] || die "no binary at $OUTRIGGER_BIN: cargo build --release"
fi
if [ ! -x "$UPSTREAM_BIN" ]; then
  say "building the upstream into $STATE/upstream-target"
  cargo build --quiet --release --locked --manifest-path "$UPSTREAM_SRC/Cargo.toml" \
    --target-dir "$STATE/upstream-target" >&2
fi

UP=$BASE A=$((BASE + 1)) B=$((BASE + 2))
mkdir -p "$OUT_DIR"
pids=()
# Waits for the processes to exit: a sidecar under valgrind takes seconds to write its
# last dump, and a run started meanwhile would find its ports still taken.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
}
trap cleanup EXIT

"$UPSTREAM_BIN" "$UP" >"$OUT_DIR/upstream.log" 2>&1 &
pids+=($!)

cat >"$OUT_DIR/b.toml" <<TOML
[service]
name = "bench"
address = "127.0.0.1:$UP"
[listeners]
outbound = "127.0.0.1:$((BASE + 3))"
inbound = "127.0.0.1:$B"
admin = "127.0.0.1:$((BASE + 4))"
[runtime]
worker_threads = 1
[registry]
kind = "static"
file = "$OUT_DIR/b-endpoints.toml"
TOML
: >"$OUT_DIR/b-endpoints.toml"
cat >"$OUT_DIR/a-endpoints.toml" <<TOML
[[endpoints]]
service = "bench"
address = "127.0.0.1:$B"
instance = "bench-b"
TOML
cat >"$OUT_DIR/a.toml" <<TOML
[service]
name = "bench-a"
address = "127.0.0.1:$UP"
[listeners]
outbound = "127.0.0.1:$((BASE + 5))"
inbound = "127.0.0.1:$((BASE + 6))"
admin = "127.0.0.1:$((BASE + 7))"
[runtime]
worker_threads = 1
[registry]
kind = "static"
file = "$OUT_DIR/a-endpoints.toml"
[[upstreams]]
name = "bench"
local_port = $A
TOML

# HAProxy's hops are started by the shared harness's own adapter, so they run
# exactly the configuration the harness measures. The adapter runs
# "$HAPROXY_BIN"; a wrapper puts the serving process (-db) under callgrind and
# leaves the adapter's configuration check alone.
HAPROXY_ADAPTER="$ROOT/../shared/bench/contenders/haproxy.sh"
if [ "$CONTENDER" = haproxy ]; then
  [ -x "$HAPROXY_ADAPTER" ] || die "no HAProxy adapter at $HAPROXY_ADAPTER (the shared bench harness)"
  cat >"$OUT_DIR/haproxy-under-callgrind" <<SH
#!/bin/sh
case " \$* " in
  *" -db "*) exec valgrind --tool=callgrind ${CALLGRIND_FLAGS:-} --callgrind-out-file="\$CALLGRIND_OUT" "$HAPROXY_BIN" "\$@" ;;
esac
exec "$HAPROXY_BIN" "\$@"
SH
  chmod +x "$OUT_DIR/haproxy-under-callgrind"
fi

for hop in a b; do
  if [ "$CONTENDER" = haproxy ]; then
    if [ "$hop" = a ]; then
      role=outbound listen=$A next=$B admin=$((BASE + 3))
    else
      role=inbound listen=$B next=$UP admin=$((BASE + 4))
    fi
    mkdir -p "$OUT_DIR/haproxy-$hop"
    # BENCH_PROTO=h2 makes the adapter bind hop A with "proto h2", as the harness does.
    CALLGRIND_OUT="$OUT_DIR/$hop.%p.out" HAPROXY_BIN="$OUT_DIR/haproxy-under-callgrind" \
      BENCH_PROTO="$PROTO" "$HAPROXY_ADAPTER" start "$role" "$listen" "$next" "$admin" \
      "$OUT_DIR/haproxy-$hop"
    pid="$(head -n 1 "$OUT_DIR/haproxy-$hop/pids")"
    ln -sf "haproxy-$hop/stdout.log" "$OUT_DIR/$hop.log"
  else
    # shellcheck disable=SC2086 # CALLGRIND_FLAGS is a list of options
    RUST_LOG=warn valgrind --tool=callgrind ${CALLGRIND_FLAGS:-} --callgrind-out-file="$OUT_DIR/$hop.%p.out" \
      "$OUTRIGGER_BIN" run --config "$OUT_DIR/$hop.toml" >"$OUT_DIR/$hop.log" 2>&1 &
    pid=$!
  fi
  pids+=("$pid")
  eval "PID_$hop=$pid"
done

curl_proto=()
[ "$PROTO" = h2 ] && curl_proto=(--http2-prior-knowledge) # HAProxy's hop A then speaks only h2c
for _ in $(seq 1 300); do
  body="$(curl -s -m 5 "${curl_proto[@]}" "http://127.0.0.1:$A/" || true)"
  case "$body" in *'"ok":true'*) break ;; esac
  sleep 0.2
done
case "$body" in *'"ok":true'*) ;; *) cat "$OUT_DIR"/*.log >&2; die "chain did not come up: $body" ;; esac

h2args=(-c "$CONNS" -m 1)
[ "$PROTO" = h1 ] && h2args+=(--h1)
say "warm-up"
h2load "${h2args[@]}" -n 500 "http://127.0.0.1:$A/" >/dev/null
# A dump also zeroes the counters; the start-up dump is kept for scripts/hot-text.sh.
for hop in a b; do callgrind_control -d "$(eval echo "\$PID_$hop")" >/dev/null; done
say "measuring $REQUESTS requests ($PROTO, $CONNS connections)"
h2load "${h2args[@]}" -n "$REQUESTS" "http://127.0.0.1:$A/" >"$OUT_DIR/h2load.txt"
grep -q "succeeded, 0 failed, 0 errored" "$OUT_DIR/h2load.txt" ||
  grep -q "$REQUESTS succeeded" "$OUT_DIR/h2load.txt" ||
  { cat "$OUT_DIR/h2load.txt" >&2; die "not every request succeeded"; }
for hop in a b; do callgrind_control -d "$(eval echo "\$PID_$hop")" >/dev/null; done
sleep 1

total=0
for hop in a b; do
  pid="$(eval echo "\$PID_$hop")"
  # The measured dump is the one with the highest part number.
  dump="$(ls -1v "$OUT_DIR/$hop.$pid.out".* 2>/dev/null | tail -n 1)"
  [ -n "$dump" ] || die "no callgrind dump for hop $hop"
  ir="$(awk '/^summary:/ {print $2}' "$dump")"
  per=$((ir / REQUESTS))
  total=$((total + per))
  printf '%s\t%s\tIr/request\t%s\n' "$hop" "$per" "$dump"
done
printf 'both\t%s\tIr/request\n' "$total"
say "dumps in $OUT_DIR (callgrind_annotate --inclusive=yes FILE | head -60)"
