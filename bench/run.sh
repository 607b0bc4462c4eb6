#!/usr/bin/env bash
# outrigger's own benchmark: what does one sidecar hop cost, and what does the
# mesh path (A-out -> B-in) cost, compared with calling the service directly?
#
# Chains, all on loopback, all started at once and measured in ONE run:
#   direct        load generator -> upstream
#   one-hop       load generator -> A ([[upstreams]] local_port) -> upstream (h2c)
#   two-hop       load generator -> A (local_port) -> B (inbound) -> upstream
#   two-hop-host  load generator -> A (outbound, "Host: bench") -> B (inbound) -> upstream
#   two-hop-mtls  as two-hop, with mTLS between A and B (not in the default CONFIGS)
# Each chain has its own sidecar processes, so CPU and RSS are per chain.
#
# Per chain and round:
#   fixed load     oha -q RATE -c LAT_CONNS --latency-correction -z DUR   -> p50 / p99
#   max throughput wrk -t1 -c TPUT_CONNS -d DUR                           -> req/s
#   resources      VmRSS of every sidecar (idle before any load, and after
#                  each max-throughput test), utime+stime per request.
#
#   bench/run.sh                 3 rounds x 6 s per test (about 3.5 min)
#   QUICK=1 bench/run.sh         3 rounds x 2 s per test (about 1.5 min)
#   ROUNDS=5 DUR=8 bench/run.sh  longer
# Other knobs: see bench/README.md. Table on stdout, progress on stderr,
# JSON + table under OUT_DIR (default ~/.cache/outrigger-bench/results/<stamp>/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${OUTRIGGER_BENCH_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrigger-bench}"

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then dflt_dur=2 dflt_warmup=1; else dflt_dur=6 dflt_warmup=2; fi
ROUNDS="${ROUNDS:-3}"
DUR="${DUR:-$dflt_dur}"                 # seconds per test (both tests)
WARMUP="${WARMUP:-$dflt_warmup}"        # seconds of max load per chain before round 1
PAUSE="${PAUSE:-1}"                     # seconds between tests (let the box settle)
RATE="${RATE:-1000}"                    # fixed-load offered rate, req/s
LAT_CONNS="${LAT_CONNS:-16}"
TPUT_CONNS="${TPUT_CONNS:-64}"
BASE_PORT="${BASE_PORT:-21000}"         # upstream = BASE_PORT, chain i uses BASE_PORT+10*i+1..7
CONFIGS="${CONFIGS:-direct one-hop two-hop two-hop-host}"
LATGEN="${LATGEN:-auto}"                # auto | oha | h2load
KEEP_RUNDIR="${KEEP_RUNDIR:-0}"
OUTRIGGER_BIN="${OUTRIGGER_BIN:-$ROOT/target/release/outrigger}"
# The upstream is the shared harness's hyper echo server (h1 keep-alive + h2c,
# one thread, fixed 100-byte body). It is built from the shared tree into our
# own cache, never copied into the project.
UPSTREAM_SRC="${UPSTREAM_SRC:-$ROOT/../shared/bench/upstream}"
UPSTREAM_BIN="${UPSTREAM_BIN:-$STATE/upstream-target/release/bench-upstream}"
OHA_BIN="${OHA_BIN:-}"
stamp="$(date +%Y%m%d-%H%M%S)"
[ "$QUICK" = 1 ] && stamp+="-quick"
OUT_DIR="${OUT_DIR:-$STATE/results/$stamp}"

CLK_TCK="$(getconf CLK_TCK)"

say() { echo "[bench] $*" >&2; }
die() { echo "[bench] ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- setup ----

[ -x "$OUTRIGGER_BIN" ] || die "no outrigger binary at $OUTRIGGER_BIN
        build it first:  (cd $ROOT && cargo build --release)   or set OUTRIGGER_BIN"
# The binary does not carry its commit: record HEAD now (others commit while
# we run) and flag a binary that is older than the sources.
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
STALE=false
if [ -d "$ROOT/src" ] && [ -n "$(find "$ROOT/src" "$ROOT/Cargo.toml" -newer "$OUTRIGGER_BIN" -print -quit 2>/dev/null)" ]; then
  STALE=true
  say "warning: $OUTRIGGER_BIN is older than the sources; 'cargo build --release' to measure the current tree"
fi

# Tools from Debian, installed only when missing (so re-runs do nothing).
apt_ensure() {
  local sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  say "installing $* (apt)"
  "${sudo[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" >&2
}
for tool in wrk curl jq python3; do
  command -v "$tool" >/dev/null 2>&1 || apt_ensure "$tool"
done

# Fixed-load generator: oha (open loop, corrects for coordinated omission);
# h2load --rps is the fallback (open loop per connection, no correction).
if [ -z "$OHA_BIN" ]; then
  for cand in "$HOME/.cache/sidecar-bench/tools/bin/oha" "$STATE/tools/bin/oha" "$(command -v oha || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then OHA_BIN="$cand"; break; fi
  done
fi
if [ "$LATGEN" = auto ]; then
  if [ -n "$OHA_BIN" ] && [ -x "$OHA_BIN" ]; then LATGEN=oha; else LATGEN=h2load; fi
fi
if [ "$LATGEN" = h2load ]; then
  say "oha not found: fixed-load test uses h2load --h1 --rps (no latency correction)"
  command -v h2load >/dev/null 2>&1 || apt_ensure nghttp2-client
fi

if [ ! -x "$UPSTREAM_BIN" ]; then
  [ -f "$UPSTREAM_SRC/Cargo.toml" ] || die "upstream source not found at $UPSTREAM_SRC (set UPSTREAM_SRC or UPSTREAM_BIN)"
  say "building the upstream (one-off) into $STATE/upstream-target"
  cargo build --quiet --release --locked --manifest-path "$UPSTREAM_SRC/Cargo.toml" \
    --target-dir "$STATE/upstream-target" >&2
fi

case " $CONFIGS " in *" direct "*) ;; *) die "CONFIGS must include direct (every figure is relative to it)";; esac

mkdir -p "$OUT_DIR" "$STATE"
RUNDIR="$(mktemp -d "$STATE/run.XXXXXX")"
RAW="$OUT_DIR/raw.jsonl"
: > "$RAW"

# ------------------------------------------------------------ processes ----

declare -A PID=()        # process name -> pid  (upstream, one-hop.A, two-hop.B, ...)
declare -A ENTRY=()      # chain -> port the load generator hits
declare -A HOSTHDR=()    # chain -> Host header to send ("" = tool default)
declare -A SIDECARS=()   # chain -> its sidecar process names
declare -A ADMIN=()      # sidecar name -> admin port
FAILED=1                 # cleared at the end; keeps RUNDIR (logs) after a failure

cleanup() {
  local name pid
  for name in "${!PID[@]}"; do kill "${PID[$name]}" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${PID[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "${PID[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  if [ "$FAILED" = 1 ] || [ "$KEEP_RUNDIR" = 1 ]; then
    say "configs and logs kept in $RUNDIR"
  else
    rm -rf "$RUNDIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_http() {  # URL [seconds]: until it answers 2xx
  local url="$1" deadline=$((SECONDS + ${2:-15}))
  until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

show_logs() {
  local f
  for f in "$RUNDIR"/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done
}

assert_alive() {
  local name
  for name in "${!PID[@]}"; do
    kill -0 "${PID[$name]}" 2>/dev/null || { show_logs; die "$name (pid ${PID[$name]}) died"; }
  done
}

# A sidecar's config. Arguments: name, listener ports (outbound inbound admin),
# service address, endpoint for service "bench" ("" = empty registry),
# local_port for "bench" ("" = none).
write_sidecar_config() {
  local name="$1" out="$2" in="$3" admin="$4" svc_addr="$5" endpoint="$6" local_port="$7"
  local tls="${8:-0}"   # 1: mTLS between the chain's sidecars ([tls] + tls = true)
  local dir="$RUNDIR/$name"
  mkdir -p "$dir"
  if [ -n "$endpoint" ]; then
    printf '[[endpoints]]\nservice = "bench"\naddress = "%s"\ninstance = "bench-next"\n' \
      "$endpoint" > "$dir/endpoints.toml"
    [ "$tls" = 1 ] && printf 'tls = true\n' >> "$dir/endpoints.toml"
  else
    : > "$dir/endpoints.toml"
  fi
  local svc_name
  case "$name" in *.B) svc_name=bench ;; *) svc_name=bench-a ;; esac
  cat > "$dir/outrigger.toml" <<TOML
[service]
name = "$svc_name"
instance_id = "${name//./-}"
address = "$svc_addr"

[listeners]
outbound = "127.0.0.1:$out"
inbound = "127.0.0.1:$in"
admin = "127.0.0.1:$admin"

[runtime]
worker_threads = 1

[registry]
kind = "static"
file = "$dir/endpoints.toml"
TOML
  if [ -n "$local_port" ]; then
    printf '\n[[upstreams]]\nname = "bench"\nlocal_port = %s\n' "$local_port" >> "$dir/outrigger.toml"
  fi
  if [ "$tls" = 1 ]; then
    # Certificates from `outrigger certs` (made once per run, below).
    printf '\n[tls]\nca = "%s/ca.pem"\ncert = "%s/%s.pem"\nkey = "%s/%s-key.pem"\ntrust_domain = "bench.local"\nallow = ["bench-a"]\n' \
      "$RUNDIR/certs" "$RUNDIR/certs" "$svc_name" "$RUNDIR/certs" "$svc_name" >> "$dir/outrigger.toml"
  fi
  "$OUTRIGGER_BIN" check-config "$dir/outrigger.toml" >"$dir/check.log" 2>&1 \
    || { cat "$dir/check.log" >&2; die "generated config for $name is invalid: $dir/outrigger.toml"; }
}

start_sidecar() {  # name admin-port
  local name="$1"
  RUST_LOG=warn "$OUTRIGGER_BIN" run --config "$RUNDIR/$name/outrigger.toml" \
    >"$RUNDIR/$name.log" 2>&1 </dev/null &
  PID[$name]=$!
  ADMIN[$name]="$2"
}

UP_PORT="$BASE_PORT"
UP_ADDR="127.0.0.1:$UP_PORT"

# Chain i's ports: A = local_port +1, outbound +2, inbound +3, admin +4;
#                  B = inbound +5, outbound +6, admin +7.
all_ports=("$UP_PORT")
i=0
for c in $CONFIGS; do
  [ "$c" = direct ] && continue
  i=$((i + 1)); b=$((BASE_PORT + 10 * i))
  all_ports+=($((b + 1)) $((b + 2)) $((b + 3)) $((b + 4)) $((b + 5)) $((b + 6)) $((b + 7)))
done
for p in "${all_ports[@]}"; do
  if port_busy "$p"; then die "port $p is already in use (another benchmark running? set BASE_PORT)"; fi
done

say "upstream: $UPSTREAM_BIN on $UP_ADDR"
"$UPSTREAM_BIN" "$UP_PORT" >"$RUNDIR/upstream.log" 2>&1 </dev/null &
PID[upstream]=$!
wait_http "http://$UP_ADDR/" || { show_logs; die "upstream did not come up"; }

i=0
for c in $CONFIGS; do
  b=$((BASE_PORT + 10 * (i + 1)))
  case "$c" in
    direct)
      ENTRY[$c]="$UP_PORT"; HOSTHDR[$c]=""; SIDECARS[$c]=""
      continue ;;
    one-hop)
      # A's endpoint is the upstream itself: the outbound pool speaks h2c
      # (prior knowledge) and the upstream serves h2c, so no B is needed.
      write_sidecar_config "$c.A" $((b + 2)) $((b + 3)) $((b + 4)) "$UP_ADDR" "$UP_ADDR" $((b + 1))
      start_sidecar "$c.A" $((b + 4))
      ENTRY[$c]=$((b + 1)); HOSTHDR[$c]=""; SIDECARS[$c]="$c.A" ;;
    two-hop|two-hop-host|two-hop-mtls)
      # B fronts the upstream on its inbound listener; its registry is empty.
      tls=0
      if [ "$c" = two-hop-mtls ]; then
        tls=1
        [ -f "$RUNDIR/certs/ca.pem" ] || "$OUTRIGGER_BIN" certs --out "$RUNDIR/certs" \
          --trust-domain bench.local bench bench-a >"$RUNDIR/certs.log" 2>&1 \
          || { cat "$RUNDIR/certs.log" >&2; die "outrigger certs failed"; }
      fi
      write_sidecar_config "$c.B" $((b + 6)) $((b + 5)) $((b + 7)) "$UP_ADDR" "" "" "$tls"
      if [ "$c" = two-hop ] || [ "$c" = two-hop-mtls ]; then
        write_sidecar_config "$c.A" $((b + 2)) $((b + 3)) $((b + 4)) "$UP_ADDR" "127.0.0.1:$((b + 5))" $((b + 1)) "$tls"
        ENTRY[$c]=$((b + 1)); HOSTHDR[$c]=""
      else
        # The normal path: the local service calls A's outbound with Host: bench.
        write_sidecar_config "$c.A" $((b + 2)) $((b + 3)) $((b + 4)) "$UP_ADDR" "127.0.0.1:$((b + 5))" ""
        ENTRY[$c]=$((b + 2)); HOSTHDR[$c]="bench"
      fi
      start_sidecar "$c.B" $((b + 7))
      start_sidecar "$c.A" $((b + 4))
      SIDECARS[$c]="$c.A $c.B" ;;
    *) die "unknown config '$c' (known: direct one-hop two-hop two-hop-host two-hop-mtls)" ;;
  esac
  i=$((i + 1))
done

# Ready = admin /ready answers 200 (static table loaded). A sidecar that
# exits instead (bad config, port clash) fails the run at once.
for name in "${!ADMIN[@]}"; do
  deadline=$((SECONDS + 20))
  until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:${ADMIN[$name]}/ready" 2>/dev/null; do
    kill -0 "${PID[$name]}" 2>/dev/null || { show_logs; die "sidecar $name exited during startup"; }
    [ "$SECONDS" -lt "$deadline" ] || { show_logs; die "sidecar $name not ready after 20 s (admin :${ADMIN[$name]}/ready)"; }
    sleep 0.1
  done
done

# ------------------------------------------------------------ /proc reads --

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
# "utime stime" (clock ticks) of the whole process (all threads). Fields are
# counted after the ")" that closes the command name.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; }

# Idle footprint: ready, but no request has gone through the data path yet.
declare -A IDLE_RSS=()
for name in "${!ADMIN[@]}"; do IDLE_RSS[$name]="$(rss_kib "${PID[$name]}")"; done

# Every chain must return the upstream's body (not a sidecar's 503).
for c in $CONFIGS; do
  hdr=()
  [ -n "${HOSTHDR[$c]}" ] && hdr=(-H "Host: ${HOSTHDR[$c]}")
  body="$(curl -sS --max-time 5 "${hdr[@]}" "http://127.0.0.1:${ENTRY[$c]}/" 2>&1 || true)"
  case "$body" in
    *'"service":"b"'*) say "chain $c ok (entry :${ENTRY[$c]})" ;;
    *) show_logs; die "chain $c does not reach the upstream; got: $body" ;;
  esac
done

# ----------------------------------------------------------- load tests ----

# wrk prints durations as 512.00us / 1.23ms / 1.02s; convert to ms.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
  if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000;
  if (v == "") print "null"; else printf "%.4f\n", n }'; }

# Each test prints one JSON object: rps, requests, p50_ms, p99_ms, errors.
tput_test() {  # port host secs
  local hdr=() out
  [ -n "$2" ] && hdr=(-H "Host: $2")
  out="$(wrk -t1 -c"$TPUT_CONNS" -d"$3"s --latency --timeout 5s "${hdr[@]}" "http://127.0.0.1:$1/" 2>&1 || true)"
  echo "$out" > "$RUNDIR/last-wrk.txt"
  local rps reqs p50 p99 errs
  rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
  reqs="$(awk '/ requests in / {print $1}' <<<"$out")"
  p50="$(to_ms "$(awk '$1 == "50%" {print $2}' <<<"$out")")"
  p99="$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
  errs="$(awk '/Non-2xx or 3xx responses:/ {n += $NF}
               /Socket errors:/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10}
               END {print n + 0}' <<<"$out")"
  [ -n "$rps" ] || { say "wrk gave no result: $(tail -n 3 <<<"$out" | tr '\n' ' ')"; rps=null reqs=0 errs=-1; }
  printf '{"rps":%s,"requests":%s,"p50_ms":%s,"p99_ms":%s,"errors":%s}\n' \
    "$rps" "${reqs:-0}" "$p50" "$p99" "$errs"
}

lat_test() {  # port host secs
  local hdr=()
  [ -n "$2" ] && hdr=(-H "Host: $2")
  if [ "$LATGEN" = oha ]; then
    # -w: wait for requests in flight at the deadline instead of counting them
    # as errors. One runtime thread is plenty for 1000 req/s and leaves the
    # second core to the chain. (oha 1.16 has no -j; JSON is --output-format.)
    "$OHA_BIN" --no-tui --output-format json --worker-threads 1 -z "$3s" -c "$LAT_CONNS" \
        -q "$RATE" --latency-correction -w \
        "${hdr[@]}" "http://127.0.0.1:$1/" 2>"$RUNDIR/last-oha.err" \
      | jq -c '{rps: .summary.requestsPerSec,
                requests: ([.statusCodeDistribution[]?] | add // 0),
                p50_ms: (if .latencyPercentiles.p50 then .latencyPercentiles.p50 * 1000 else null end),
                p99_ms: (if .latencyPercentiles.p99 then .latencyPercentiles.p99 * 1000 else null end),
                errors: (([.statusCodeDistribution | to_entries[]? | select(.key | startswith("2") | not) | .value] | add // 0)
                       + ([.errorDistribution | to_entries[]? | select(.key | test("deadline") | not) | .value] | add // 0))}' \
      || { say "oha failed: $(head -c 300 "$RUNDIR/last-oha.err")"; echo '{"rps":null,"requests":0,"p50_ms":null,"p99_ms":null,"errors":-1}'; }
  else
    # h2load paces each connection at RATE/LAT_CONNS and logs every request
    # (start us, status, duration us); percentiles come from that log.
    local log="$RUNDIR/h2load.tsv"
    # h2load would send "Host: bench" next to its own Host line; :authority replaces it.
    [ -n "$2" ] && hdr=(-H ":authority: $2")
    h2load --h1 -t1 -c "$LAT_CONNS" -D "$3" --rps="$(awk -v r="$RATE" -v c="$LAT_CONNS" 'BEGIN {print r / c}')" \
      --log-file="$log" "${hdr[@]}" "http://127.0.0.1:$1/" >"$RUNDIR/last-h2load.txt" 2>&1 || true
    touch "$log"
    sort -t$'\t' -k3,3n "$log" | awk -F'\t' -v secs="$3" '
      { lat[NR] = $3 / 1000; if ($2 !~ /^2/) bad++ }
      function pct(q,  k) { k = int(q / 100 * NR + 0.5); if (k < 1) k = 1; if (k > NR) k = NR; return lat[k] }
      END { if (NR == 0) { print "{\"rps\":null,\"requests\":0,\"p50_ms\":null,\"p99_ms\":null,\"errors\":-1}"; exit }
            printf "{\"rps\":%.1f,\"requests\":%d,\"p50_ms\":%.4f,\"p99_ms\":%.4f,\"errors\":%d}\n",
                   NR / secs, NR, pct(50), pct(99), bad }'
    rm -f "$log"
  fi
}

# Run one test against one chain, sampling the chain's sidecars around it,
# and append a JSON line to raw.jsonl.
measure() {  # round test(lat|tput) chain
  local round="$1" test="$2" c="$3" name res
  local -A u0=() s0=()
  local u s
  for name in ${SIDECARS[$c]}; do
    read -r u s <<<"$(cpu_ticks "${PID[$name]}")"
    u0[$name]=$u s0[$name]=$s
  done
  if [ "$test" = lat ]; then
    res="$(lat_test "${ENTRY[$c]}" "${HOSTHDR[$c]}" "$DUR")"
  else
    res="$(tput_test "${ENTRY[$c]}" "${HOSTHDR[$c]}" "$DUR")"
  fi
  assert_alive
  [ -n "$res" ] || res='{"rps":null,"requests":0,"p50_ms":null,"p99_ms":null,"errors":-1}'
  local sc="{" sep=""
  for name in ${SIDECARS[$c]}; do
    local pid="${PID[$name]}"
    read -r u s <<<"$(cpu_ticks "$pid")"
    u=$((u - ${u0[$name]})) s=$((s - ${s0[$name]}))
    sc+="$sep\"$name\":{\"cpu_ticks\":$((u + s)),\"stime_ticks\":$s,\"rss_kib\":$(rss_kib "$pid")}"
    sep=","
  done
  sc+="}"
  jq -c --argjson round "$round" --arg test "$test" --arg chain "$c" --argjson sc "$sc" \
    '{round: $round, test: $test, chain: $chain} + . + {sidecars: $sc}' <<<"$res" >> "$RAW"
  say "round $round  $(printf '%-4s %-13s' "$test" "$c") $(jq -r 'def r3: if . == null then "-" else (. * 1000 | round / 1000) end;
    "req/s=\(.rps // 0 | round) p50=\(.p50_ms | r3)ms p99=\(.p99_ms | r3)ms errors=\(.errors)"' <<<"$res")"
  sleep "$PAUSE"
}

read -r -a chains <<<"$CONFIGS"
n=${#chains[@]}
est="$(awk -v r="$ROUNDS" -v n="$n" -v d="$DUR" -v w="$WARMUP" -v p="$PAUSE" \
  'BEGIN { printf "%d", 2 * r * n * (d + p) + n * (w + p) }')"
say "$n chains x $ROUNDS rounds x 2 tests x ${DUR}s (fixed load: $LATGEN); about ${est}s"

# Warm-up: fill connection pools and allocator arenas before anything counts.
for c in "${chains[@]}"; do
  tput_test "${ENTRY[$c]}" "${HOSTHDR[$c]}" "$WARMUP" >/dev/null
  sleep "$PAUSE"
done

# Chains are measured in alternation, round by round, rather than one after
# the other: on a shared 2-core box the background load drifts over minutes,
# and alternating spreads that drift over every chain instead of charging it
# to whichever chain happened to run at the bad moment. The start of the order
# rotates each round so no chain always runs first after a pause.
for ((r = 1; r <= ROUNDS; r++)); do
  order=()
  for ((k = 0; k < n; k++)); do order+=("${chains[$(( (k + r - 1) % n ))]}"); done
  for c in "${order[@]}"; do measure "$r" lat "$c"; done
  for c in "${order[@]}"; do measure "$r" tput "$c"; done
done

declare -A PEAK=()
for name in "${!ADMIN[@]}"; do PEAK[$name]="$(hwm_kib "${PID[$name]}")"; done

# ------------------------------------------------------------ summary ------

{
  printf '{"idle_rss_kib":{'
  sep=""
  for name in "${!ADMIN[@]}"; do printf '%s"%s":%s' "$sep" "$name" "${IDLE_RSS[$name]}"; sep=","; done
  printf '},"peak_rss_kib":{'
  sep=""
  for name in "${!ADMIN[@]}"; do printf '%s"%s":%s' "$sep" "$name" "${PEAK[$name]}"; sep=","; done
  printf '}}\n'
} > "$RUNDIR/mem.json"

jq -n \
  --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --arg host "$(hostname)" \
  --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
  --argjson cores "$(nproc)" \
  --arg loadavg "$(cut -d' ' -f1-3 /proc/loadavg)" \
  --arg outrigger "$("$OUTRIGGER_BIN" --version 2>/dev/null || echo unknown)" \
  --arg commit "$COMMIT" --argjson stale "$STALE" \
  --arg latgen "$LATGEN" \
  --argjson rounds "$ROUNDS" --argjson dur "$DUR" --argjson rate "$RATE" \
  --argjson lat_conns "$LAT_CONNS" --argjson tput_conns "$TPUT_CONNS" \
  --argjson clk_tck "$CLK_TCK" --arg chains "$CONFIGS" \
  --slurpfile mem "$RUNDIR/mem.json" \
  '{date: $date, host: $host, cpu: $cpu, cores: $cores, loadavg_at_end: $loadavg,
    outrigger: $outrigger, commit: $commit, binary_older_than_sources: $stale, latgen: $latgen, rounds: $rounds, dur_s: $dur,
    rate: $rate, lat_conns: $lat_conns, tput_conns: $tput_conns, clk_tck: $clk_tck,
    chains: ($chains | split(" ") | map(select(. != "")))} + $mem[0]' > "$OUT_DIR/meta.json"

# Medians, not means: a single round hit by a neighbour's compile can be off
# by 30% or more, and the median ignores it. Ratios and "added ms" are taken
# per round (each chain against direct measured seconds apart in the same
# round), then the median of those, which cancels most of the drift.
python3 - "$OUT_DIR" <<'PY'
import json, statistics, sys

out = sys.argv[1]
meta = json.load(open(f"{out}/meta.json"))
rows = [json.loads(l) for l in open(f"{out}/raw.jsonl") if l.strip()]
chains, clk = meta["chains"], meta["clk_tck"]

def get(test, chain, rnd):
    for r in rows:
        if r["test"] == test and r["chain"] == chain and r["round"] == rnd:
            return r
    return None

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def rng(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else None

rounds = sorted({r["round"] for r in rows})
summary = {"meta": meta, "chains": {}}
for c in chains:
    s = {}
    for test in ("lat", "tput"):
        per = [get(test, c, k) for k in rounds]
        base = [get(test, "direct", k) for k in rounds]
        for key in ("rps", "p50_ms", "p99_ms"):
            s[f"{test}_{key}"] = med([p and p[key] for p in per])
        s[f"{test}_errors"] = sum(abs((p or {}).get("errors") or 0) for p in per)  # -1 = tool failed
        ratio = [p["rps"] / b["rps"] if p and b and p["rps"] and b["rps"] else None for p, b in zip(per, base)]
        s[f"{test}_rps_ratio"], s[f"{test}_rps_ratio_range"] = med(ratio), rng(ratio)
        for key in ("p50_ms", "p99_ms"):
            add = [p[key] - b[key] if p and b and p[key] is not None and b[key] is not None else None
                   for p, b in zip(per, base)]
            s[f"{test}_added_{key}"], s[f"{test}_added_{key}_range"] = med(add), rng(add)
        # CPU per request of the chain's sidecars (all of them), and per sidecar.
        names = sorted({n for p in per if p for n in p["sidecars"]})
        us = lambda ticks, reqs: ticks * 1e6 / clk / reqs if reqs else None
        s[f"{test}_cpu_us_per_req"] = med([us(sum(v["cpu_ticks"] for v in p["sidecars"].values()), p["requests"])
                                           for p in per if p]) if names else None
        for n in names:
            s.setdefault("sidecars", {}).setdefault(n, {})[f"{test}_cpu_us_per_req"] = \
                med([us(p["sidecars"][n]["cpu_ticks"], p["requests"]) for p in per if p])
            if test == "tput":
                s["sidecars"][n]["loaded_rss_kib"] = med([p["sidecars"][n]["rss_kib"] for p in per if p])
                tot = sum(p["sidecars"][n]["cpu_ticks"] for p in per if p)
                sys_ = sum(p["sidecars"][n]["stime_ticks"] for p in per if p)
                s["sidecars"][n]["tput_kernel_share"] = sys_ / tot if tot else None
    for n in s.get("sidecars", {}):
        s["sidecars"][n]["idle_rss_kib"] = meta["idle_rss_kib"].get(n)
        s["sidecars"][n]["peak_rss_kib"] = meta["peak_rss_kib"].get(n)
    summary["chains"][c] = s
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)

def f(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)

def signed(v, r):
    if v is None:
        return "-"
    return f"{v:+.3f}" + (f" ({r[0]:+.3f}..{r[1]:+.3f})" if r and len(rounds) > 1 else "")

L = []
L.append(f"outrigger {meta['commit']}{' (binary older than sources!)' if meta['binary_older_than_sources'] else ''} | {meta['cores']} cores, {meta['cpu']} | {meta['date']} | "
         f"{meta['rounds']} rounds x {meta['dur_s']} s, medians | fixed load: {meta['latgen']}, "
         f"{meta['rate']} req/s over {meta['lat_conns']} conns; max: wrk -t1 -c{meta['tput_conns']}")
L.append("")
L.append("| chain | max req/s | x direct (range) | p50 ms | +p50 ms vs direct (range) | p99 ms | +p99 ms vs direct (range) | sidecar CPU us/req @max | @fixed | errors |")
L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in chains:
    s = summary["chains"][c]
    r = s["tput_rps_ratio_range"]
    direct = c == "direct"
    ratio = f(s["tput_rps_ratio"], "{:.2f}") + (f" ({r[0]:.2f}..{r[1]:.2f})" if r and len(rounds) > 1 and not direct else "")
    L.append("| " + " | ".join([
        c, f(s["tput_rps"]), ratio,
        f(s["lat_p50_ms"], "{:.3f}"), "-" if direct else signed(s["lat_added_p50_ms"], s["lat_added_p50_ms_range"]),
        f(s["lat_p99_ms"], "{:.3f}"), "-" if direct else signed(s["lat_added_p99_ms"], s["lat_added_p99_ms_range"]),
        f(s["tput_cpu_us_per_req"], "{:.1f}"), f(s["lat_cpu_us_per_req"], "{:.1f}"),
        str(s["lat_errors"] + s["tput_errors"]),
    ]) + " |")
L.append("")
L.append("| sidecar | RSS idle MiB | RSS after max load MiB | peak (VmHWM) MiB | CPU us/req @max | CPU us/req @fixed | kernel share of CPU @max |")
L.append("|---|---:|---:|---:|---:|---:|---:|")
mib = lambda k: None if k is None else k / 1024
for c in chains:
    for n, v in sorted(summary["chains"][c].get("sidecars", {}).items()):
        L.append(f"| {n} | {f(mib(v['idle_rss_kib']), '{:.1f}')} | {f(mib(v['loaded_rss_kib']), '{:.1f}')} | "
                 f"{f(mib(v['peak_rss_kib']), '{:.1f}')} | {f(v['tput_cpu_us_per_req'], '{:.1f}')} | "
                 f"{f(v['lat_cpu_us_per_req'], '{:.1f}')} | {f(v['tput_kernel_share'] and 100 * v['tput_kernel_share'], '{:.0f}%')} |")
L.append("")
L.append("x direct and +ms are per-round paired against direct, then the median over rounds; (range) = min..max over rounds. "
         "p50/p99 are at the fixed offered load; CPU = utime+stime of the chain's sidecars / requests "
         f"(/proc tick = {1000 / clk:.0f} ms). Load generator, upstream and sidecars share the same cores.")
open(f"{out}/table.md", "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY

FAILED=0
say "results: $OUT_DIR (table.md, summary.json, raw.jsonl, meta.json)"
