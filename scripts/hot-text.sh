#!/usr/bin/env bash
# Regenerates link/hot-text.txt: the functions of the outrigger binary that run when a
# sidecar starts, serves the two-hop mesh path and shuts down, hottest first, as mangled
# symbol names. Three configurations are profiled: the benchmark's (static registry,
# HTTP/1.1 and h2c from the client) and the compose mesh's (etcd, mTLS, health checks). build.rs hands the file to the
# linker (lld's --symbol-ordering-file), which puts these functions together at the
# front of .text.
#
# Why: the kernel maps code in 64 KiB windows around each page a process touches
# (fault-around), so the few functions a sidecar runs, scattered over 6 MB of .text
# among the many it never runs (other registries' clients, error paths, CLI commands),
# kept about 4.4 MiB of the binary resident. Packed together they fill far fewer
# windows. The measured effect is in README.md, Performance.
#
# The list only orders code; it never changes what the binary does. A stale list (after
# new code or a dependency upgrade renames symbols) just orders less of it: lld skips
# names it does not find. Rerun this after large changes and commit the result.
#
# usage: cargo build --release && scripts/hot-text.sh
# needs: valgrind, h2load (nghttp2-client), curl, wrk, etcd (scripts/install-deps.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${OUTRIGGER_BIN:-$ROOT/target/release/outrigger}"
OUT="${OUT:-$ROOT/link/hot-text.txt}"
work="$(mktemp -d /tmp/outrigger-hot-text.XXXXXX)"

say() { echo "[hot-text] $*" >&2; }

base=23000
for proto in h1 h2; do
  say "profiling the two-hop chain, client $proto"
  # Own ports per run: the previous run's sidecars may still be writing their dumps.
  base=$((base + 100))
  OUT_DIR="$work/$proto" PROTO="$proto" REQUESTS=2000 OUTRIGGER_BIN="$BIN" BASE_PORT=$base \
    CALLGRIND_FLAGS="--demangle=no" "$ROOT/bench/callgrind.sh" >&2
done

# The compose mesh's configuration: etcd registration and discovery, health checks and
# mTLS between the sidecars, a calling b through its outbound listener.
profile_mesh() {
  local dir="$work/mesh" up=23301 etcd_port=23379 pids=()
  mkdir -p "$dir"
  command -v etcd >/dev/null || { say "etcd missing: scripts/install-deps.sh"; exit 1; }
  etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" >"$dir/etcd.log" 2>&1 &
  pids+=($!)
  "$UPSTREAM_BIN" "$up" >"$dir/upstream.log" 2>&1 &
  pids+=($!)
  "$BIN" certs --out "$dir/certs" --trust-domain mesh.local a b >/dev/null
  local i=0
  for svc in a b; do
    cat >"$dir/$svc.toml" <<TOML
[service]
name = "$svc"
address = "127.0.0.1:$up"
[service.health]
http = "/"
interval = "1s"
[listeners]
outbound = "127.0.0.1:$((23310 + i))"
inbound = "127.0.0.1:$((23320 + i))"
admin = "127.0.0.1:$((23330 + i))"
[runtime]
worker_threads = 1
[registry]
kind = "etcd"
endpoints = ["http://127.0.0.1:$etcd_port"]
ttl = "5s"
[tls]
ca = "$dir/certs/ca.pem"
cert = "$dir/certs/$svc.pem"
key = "$dir/certs/$svc-key.pem"
trust_domain = "mesh.local"
TOML
    RUST_LOG=warn valgrind --tool=callgrind --demangle=no \
      --callgrind-out-file="$dir/$svc.%p.out" "$BIN" run --config "$dir/$svc.toml" \
      >"$dir/$svc.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  local ok=""
  for _ in $(seq 1 300); do
    ok="$(curl -s -m 5 -x "http://127.0.0.1:23310" http://b/ || true)"
    case "$ok" in *'"ok":true'*) break ;; esac
    sleep 0.2
  done
  case "$ok" in *'"ok":true'*) ;; *) cat "$dir"/*.log >&2; say "mesh did not come up"; exit 1 ;; esac
  wrk -t1 -c8 -d5s -H "Host: b" "http://127.0.0.1:23310/" >&2
  # Graceful stop (deregistration, drain); then etcd and the upstream.
  kill "${pids[@]:2}"
  for p in "${pids[@]:2}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.2; done; done
  kill "${pids[@]:0:2}" 2>/dev/null || true
}
STATE="${OUTRIGGER_BENCH_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrigger-bench}"
UPSTREAM_BIN="${UPSTREAM_BIN:-$STATE/upstream-target/release/bench-upstream}"
say "profiling the compose mesh's configuration (etcd, mTLS, health checks)"
profile_mesh

# The sidecars write their final dump (idle time, shutdown) after bench/callgrind.sh's
# exit trap stops them; wait for those four files and the mesh's two.
for _ in $(seq 1 100); do
  finals=$(find "$work" -regex '.*/[ab]\.[0-9]+\.out' | wc -l)
  [ "$finals" -ge 6 ] && break
  sleep 0.2
done
[ "$finals" -ge 6 ] || say "warning: only $finals of 6 final dumps were written"

# Sum each function's own instructions over every dump, for functions of the outrigger
# binary only (libc's layout is not ours to choose), and note which configuration ran
# it. The list is grouped so each configuration's code stays contiguous: first what
# both run, then what only the benchmark's runs, then what only the mesh's runs (etcd,
# TLS); hottest first within a group. Ordered by heat alone, the mesh's functions sat
# between the benchmark's and the benchmark sidecar's resident code grew by 1.4 MiB. In callgrind's format a name is
# given in full once, then by its "(id)"; the cost line after a "calls=" line is the
# callee's inclusive cost, not the current function's.
find "$work" -name '*.out*' -print0 | xargs -0 awk -v bin="/$(basename "$BIN")" '
  function name(kind, spec,   id, rest) {
    if (match(spec, /^\([0-9]+\)/)) {
      id = substr(spec, 2, RLENGTH - 2)
      rest = substr(spec, RLENGTH + 2)
      if (rest != "") names[kind, id] = rest
      return names[kind, id]
    }
    return spec
  }
  FNR == 1 { skip = 0; bit = (FILENAME ~ /\/mesh\//) ? 2 : 1 }
  /^ob=/  { o = name("ob", substr($0, 4)); ours = (substr(o, length(o) - length(bin) + 1) == bin); next }
  /^cob=/ { name("ob", substr($0, 5)); next }
  /^fn=/  { f = name("fn", substr($0, 4)); next }
  /^cfn=/ { name("fn", substr($0, 5)); next }
  /^calls=/ { skip = 1; next }
  /^[0-9+*-]/ {
    if (skip) { skip = 0; next }
    if (ours && $2 > 0) { cost[f] += $2; if (int(seen[f] / bit) % 2 == 0) seen[f] += bit }
  }
  # group: 0 both, 1 benchmark only, 2 mesh only
  END { for (f in cost) printf "%d %d %s\n", (seen[f] == 3 ? 0 : seen[f]), cost[f], f }
' | sort -k1,1n -k2,2nr -k3,3 |
  # Symbols only: callgrind also names code it has no symbol for ("0x..", "(below main)")
  # and tells same-named functions apart with a "'N" suffix the linker never sees.
  awk '$3 ~ /^_(ZN|R)/ { sub(/\047[0-9]+$/, "", $3); if (!done[$3]++) print $3 }' >"$work/hot.txt"

n=$(wc -l <"$work/hot.txt")
[ "$n" -gt 1000 ] || { say "only $n functions found; dumps in $work"; exit 1; }
mkdir -p "$(dirname "$OUT")"
{
  echo "# Generated by scripts/hot-text.sh from $(basename "$BIN") at $(git -C "$ROOT" rev-parse --short HEAD)."
  echo "# Functions run at start-up and on the mesh path: those both profiled configurations run,"
  echo "# then the benchmark's only, then the compose mesh's only; hottest first in each. Do not edit."
  cat "$work/hot.txt"
} >"$OUT"
say "$n functions -> $OUT"
rm -rf "$work"
