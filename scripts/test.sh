#!/usr/bin/env bash
# THE test command: what CI runs (via .ci/run) and what the README tells contributors
# to run before pushing. Each section stops the run on its first failure.
#
# Environment:
#   CARGO_ARGS   extra flags for clippy and test, e.g. CARGO_ARGS=--no-default-features
#                to skip the etcd backend (and its protobuf build) on a quick local run.
#                CI leaves it empty, so every feature is linted and tested.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# rustup installs into ~/.cargo/bin, which a non-login shell (like CI's) may lack.
if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

read -r -a cargo_args <<<"${CARGO_ARGS:-}"

section() { printf '\n==================== %s ====================\n' "$*"; }

started=$SECONDS

section "format: cargo fmt --check"
cargo fmt --all -- --check

section "lint: cargo clippy -D warnings${CARGO_ARGS:+ $CARGO_ARGS}"
cargo clippy --locked --all-targets "${cargo_args[@]}" -- -D warnings

section "test: cargo test${CARGO_ARGS:+ $CARGO_ARGS}"
cargo test --locked --all-targets "${cargo_args[@]}"

section "all checks passed in $((SECONDS - started)) s"
