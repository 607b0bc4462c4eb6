#!/usr/bin/env bash
# Where the two-hop chain's CPUs go idle at saturation: which processes share a CPU,
# who wakes whom and on which CPU, and how long a CPU idles while a process waits in
# the other CPU's run queue. A scheduler trace (`perf sched`), not a timing, so it
# explains a throughput gap rather than measuring one (see README, Performance).
#
#   wrk -c64 ─▶ A ([[upstreams]] local_port) ══▶ B (inbound) ──h1──▶ upstream
#
# The chain runs with the full feature set, as in bench/callgrind.sh. `wrk -t1 -c64`
# drives it for DUR seconds, and `perf sched record` traces the middle TRACE seconds.
#
# usage: cargo build --release && bench/placement.sh
#        CONTENDER=haproxy bench/placement.sh   # the same chain through HAProxy (the
#        shared harness's adapter and configuration), for a baseline
# env:   OUTRIGGER_BIN (default target/release/outrigger), DUR (6), TRACE (2), OUT_DIR,
#        UPSTREAM_BIN (built like bench/run.sh does if missing), BASE_PORT (23100)
#
# Output, one line each: req/s, box busy (from /proc/stat over the wrk run), the
# share of the trace in which A and B were last seen on the same CPU, wake-ups
# between the four processes split by whether the wakee then ran on the waker's CPU,
# and the share of the trace in which one CPU idled while a process was runnable on
# the other. Needs perf (Debian's linux-perf), wrk, curl, python3, and root (or
# kernel.perf_event_paranoid <= 1) for the scheduler tracepoints.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${OUTRIGGER_BENCH_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrigger-bench}"
OUTRIGGER_BIN="${OUTRIGGER_BIN:-$ROOT/target/release/outrigger}"
UPSTREAM_SRC="${UPSTREAM_SRC:-$ROOT/../shared/bench/upstream}"
UPSTREAM_BIN="${UPSTREAM_BIN:-$STATE/upstream-target/release/bench-upstream}"
DUR="${DUR:-6}"
TRACE="${TRACE:-2}"
BASE="${BASE_PORT:-23100}"
CONTENDER="${CONTENDER:-outrigger}"
OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/outrigger-placement.XXXXXX)}"

say() { echo "[placement] $*" >&2; }
die() { echo "[placement] ERROR: $*" >&2; exit 1; }

case "$CONTENDER" in outrigger | haproxy) ;; *) die "CONTENDER must be outrigger or haproxy" ;; esac
for tool in perf wrk curl python3; do
  command -v "$tool" >/dev/null || die "$tool missing: apt-get install linux-perf wrk curl python3"
done
if [ ! -x "$UPSTREAM_BIN" ]; then
  say "building the upstream into $STATE/upstream-target"
  cargo build --quiet --release --locked --manifest-path "$UPSTREAM_SRC/Cargo.toml" \
    --target-dir "$STATE/upstream-target" >&2
fi

UP=$BASE A=$((BASE + 1)) B=$((BASE + 2))
mkdir -p "$OUT_DIR"
pids=()
# Waits for the processes to exit, so a run started next finds its ports free.
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
}
trap cleanup EXIT

"$UPSTREAM_BIN" "$UP" >"$OUT_DIR/upstream.log" 2>&1 &
pids+=($!)
PID_up=$!

# Both contenders are started by the shared harness's adapters, so they run exactly
# the configuration the harness measures.
ADAPTER="$ROOT/../shared/bench/contenders/$CONTENDER.sh"
[ -x "$ADAPTER" ] || die "no adapter at $ADAPTER (the shared bench harness)"
for hop in b a; do
  if [ "$hop" = a ]; then
    role=outbound listen=$A next=$B admin=$((BASE + 3))
  else
    role=inbound listen=$B next=$UP admin=$((BASE + 4))
  fi
  mkdir -p "$OUT_DIR/$hop"
  OUTRIGGER_BIN="$OUTRIGGER_BIN" "$ADAPTER" start "$role" "$listen" "$next" "$admin" \
    "$OUT_DIR/$hop" </dev/null >/dev/null 2>&1
  pid="$(head -n 1 "$OUT_DIR/$hop/pids")"
  pids+=("$pid")
  eval "PID_$hop=$pid"
done

for _ in $(seq 1 100); do
  body="$(curl -s -m 5 "http://127.0.0.1:$A/" || true)"
  case "$body" in *'"ok":true'*) break ;; esac
  sleep 0.1
done
case "$body" in *'"ok":true'*) ;; *) die "chain did not come up: $body" ;; esac

busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
read -r busy0 all0 < <(busy)
wrk -t1 -c64 -d"${DUR}s" "http://127.0.0.1:$A/" >"$OUT_DIR/wrk.txt" &
wrk_pid=$!
sleep "$(((DUR - TRACE) / 2))"
perf sched record -o "$OUT_DIR/sched.data" -- sleep "$TRACE" >/dev/null 2>&1 ||
  die "perf sched record failed (root, or kernel.perf_event_paranoid <= 1?)"
wait "$wrk_pid"
read -r busy1 all1 < <(busy)
if grep -qE "Socket errors|Non-2xx" "$OUT_DIR/wrk.txt"; then
  cat "$OUT_DIR/wrk.txt" >&2
  die "wrk saw errors: the trace would not be of a working chain"
fi
rps="$(awk '/Requests\/sec/{print $2}' "$OUT_DIR/wrk.txt")"
perf sched timehist -w -i "$OUT_DIR/sched.data" >"$OUT_DIR/timehist.txt" 2>/dev/null

echo "contender $CONTENDER: $rps req/s, box busy $(((busy1 - busy0) * 100 / (all1 - all0))) %"
python3 - "$OUT_DIR/timehist.txt" "$PID_a" "$PID_b" "$PID_up" <<'PY'
import re, sys

path, pid_a, pid_b, pid_up = sys.argv[1:5]
# `perf sched timehist -w` rows: time [cpu] task[tid(/pid)] wait sch-delay run, or,
# for a wake-up, time [cpu] waker awakened: wakee.
task = re.compile(r"\[(\d+)(?:/(\d+))?\]$")


def who(name):
    m = task.search(name)
    if not m:
        return None
    if name.startswith("wrk"):
        return "wrk"
    if m.group(2):
        return None  # a helper thread (tokio's blocking pool), not the serving one
    return {pid_a: "A", pid_b: "B", pid_up: "upstream"}.get(m.group(1))


cpu_of, placed, wakes, pending = {}, {}, {}, {}
idle, waiting = [], []
prev_t = None
for line in open(path):
    f = line.split()
    if len(f) < 4 or not re.match(r"^\d+\.\d+$", f[0]):
        continue
    t, cpu = float(f[0]), int(f[1].strip("[]"))
    if "awakened:" in f:
        i = f.index("awakened:")
        waker, wakee = who(f[2]), who(" ".join(f[i + 1:]))
        if waker and wakee:
            pending[wakee] = (waker, cpu)
        continue
    name = " ".join(f[2:-3])
    try:
        sch_delay, run = float(f[-2]) / 1e3, float(f[-1]) / 1e3
    except ValueError:
        continue
    start = t - run
    if name.startswith("<idle>"):
        idle.append((start, t, cpu))
    elif sch_delay > 0:
        waiting.append((start - sch_delay, start, who(name) or "other"))
    p = who(name)
    if p:
        if p in pending:
            waker, wcpu = pending.pop(p)
            key = f"{waker}->{p}"
            same, other = wakes.get(key, (0, 0))
            wakes[key] = (same + 1, other) if wcpu == cpu else (same, other + 1)
        if prev_t is not None and {"A", "B"} <= cpu_of.keys():
            k = "same CPU" if cpu_of["A"] == cpu_of["B"] else "apart"
            placed[k] = placed.get(k, 0) + t - prev_t
        cpu_of[p] = cpu
        prev_t = t

total = sum(placed.values()) or 1
print(f"A and B on the same CPU: {100 * placed.get('same CPU', 0) / total:.0f} % of the trace")
print("wake-ups (wakee ran on the waker's CPU / on the other):",
      ", ".join(f"{k} {s}/{o}" for k, (s, o) in sorted(wakes.items())))

# A CPU idles while a process waits: sweep the idle and waiting intervals.
events = [(s, 1, ("idle", c)) for s, e, c in idle] + [(e, -1, ("idle", c)) for s, e, c in idle]
events += [(s, 1, ("wait", n)) for s, e, n in waiting] + [(e, -1, ("wait", n)) for s, e, n in waiting]
events.sort(key=lambda x: x[0])
open_, last, starved, by = {}, None, 0.0, {}
span = (events[0][0], events[-1][0]) if events else (0, 1)
for t, d, k in events:
    if last is not None and t > last:
        idle_cpus = sum(1 for kk, v in open_.items() if kk[0] == "idle" and v > 0)
        waiters = [kk[1] for kk, v in open_.items() if kk[0] == "wait" and v > 0]
        if idle_cpus == 1 and waiters:
            starved += t - last
            for w in set(waiters):
                by[w] = by.get(w, 0) + t - last
    open_[k] = open_.get(k, 0) + d
    last = t
wall = span[1] - span[0] or 1
print(f"one CPU idle while a process waits on the other: {100 * starved / wall:.0f} % of the trace ("
      + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in sorted(by.items(), key=lambda x: -x[1])
                  if k != "other") + ")")
PY
say "trace and rows in $OUT_DIR"
