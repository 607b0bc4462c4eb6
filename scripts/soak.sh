#!/usr/bin/env bash
# The soak (not a CI test): 10 minutes of mixed load (HTTP/1.1 and h2c GETs,
# HTTP/1.1 POSTs) through a mesh of real sidecars on a real etcd, with a
# replica's sidecar killed (kill -9) and restarted every 20 s and etcd
# restarted every 75 s. It fails if any idempotent request failed or if the
# caller's sidecar RSS grew, and prints the totals and every sidecar's RSS
# (first after warm-up, last, max). See integration/soak.rs.
#
#   scripts/soak.sh                        # the full 10 minutes
#   OUTRIGGER_SOAK_SECS=120 scripts/soak.sh   # a shorter run
#
# Needs etcd and etcdctl (scripts/install-deps.sh installs them).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v etcd >/dev/null || {
    echo "soak.sh: etcd not found: apt-get install etcd-server etcd-client (or scripts/install-deps.sh)" >&2
    exit 1
}

echo "soak.sh: ${OUTRIGGER_SOAK_SECS:-600} s of load; output below is the soak's report" >&2
# Sidecars log at info: a 10-minute debug log is large and slows them down.
export OUTRIGGER_TEST_RUST_LOG="${OUTRIGGER_TEST_RUST_LOG:-info}"
exec cargo test --locked --test integration soak_mixed_load -- --ignored --nocapture --test-threads 1
