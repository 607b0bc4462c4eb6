#!/usr/bin/env bash
# Benchmark (not a test): 1,000 services × 3 instances in etcd against one
# sidecar. Starts a throwaway etcd on free loopback ports, builds the release
# binaries, and runs examples/etcd_scale.rs (initial load time, RSS, and the
# time for one change to become routable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v etcd >/dev/null || { echo "etcd not found: apt-get install etcd-server (or scripts/install-deps.sh)" >&2; exit 1; }
cargo build --release --bins --examples >&2

dir=$(mktemp -d)
client=$((23000 + RANDOM % 1000)); peer=$((client + 1000))
etcd --name scale --data-dir "$dir/data" \
  --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
  --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "scale=http://127.0.0.1:$peer" >"$dir/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill $etcd_pid 2>/dev/null; wait $etcd_pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$client/health" >/dev/null 2>&1 && break
  sleep 0.1
done
target/release/examples/etcd_scale --etcd "http://127.0.0.1:$client" --sidecar target/release/outrigger "$@"
