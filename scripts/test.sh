#!/usr/bin/env bash
# THE test command: what CI runs (via .ci/run) and what the README tells contributors
# to run before pushing. Each section stops the run on its first failure.
#
# Sections, in order: format, lint, supply chain, images, layout, tests. The supply-chain
# section runs scripts/audit.sh: cargo audit against the RustSec advisory database
# at ADVISORY_DB (default ../shared/advisory-db), offline; it installs cargo-audit
# the first time. The images section runs
# scripts/offline-images.sh, so the compose end-to-end test (integration/compose.rs)
# finds outrigger:local and outrigger-etcd:local built from this very tree; it needs
# Docker, the Compose v2 plugin and root (debootstrap), all of which CI has.
#
# Environment:
#   CARGO_ARGS   extra flags for clippy, test and the image build, e.g.
#                CARGO_ARGS=--no-default-features to skip the etcd backend (and its
#                protobuf build) on a quick local run. The compose mesh needs etcd, so
#                such a run also skips the images and the compose test, and says so.
#                CI leaves it empty, so every feature is linted and tested.
#   OUTRIGGER_IMAGE ETCD_IMAGE   tags for the images (default outrigger:local and
#                outrigger-etcd:local); the compose test uses the same ones.
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

section "supply chain: scripts/audit.sh (cargo audit, known-vulnerable dependencies)"
scripts/audit.sh

# The compose test target requires the etcd feature (Cargo.toml), so cargo leaves it
# out exactly when these flags turn etcd off.
compose_mesh=1
if [[ " ${CARGO_ARGS:-} " == *" --no-default-features "* && "${CARGO_ARGS:-}" != *etcd* &&
    "${CARGO_ARGS:-}" != *--all-features* ]]; then
    compose_mesh=0
fi

if ((compose_mesh)); then
    section "images: scripts/offline-images.sh${CARGO_ARGS:+ (CARGO_ARGS=$CARGO_ARGS)}"
    # Progress goes to stderr; the last stdout line is OUTRIGGER_IMAGE=... ETCD_IMAGE=...
    images="$(scripts/offline-images.sh | tail -n 1)"
    [[ "$images" =~ ^OUTRIGGER_IMAGE=[^[:space:]]+\ ETCD_IMAGE=[^[:space:]]+$ ]] || {
        echo "test.sh: unexpected output from offline-images.sh: $images" >&2
        exit 1
    }
    # shellcheck disable=SC2163,SC2086  # two NAME=value words, checked just above
    export $images
    echo "compose test images: $images"
else
    section "images: SKIPPED, CARGO_ARGS ($CARGO_ARGS) disables etcd, which the compose mesh needs"
    echo "The compose end-to-end test (integration/compose.rs) does not run in this mode."
fi

# The images section built the release binary; with the default features it must carry
# link/hot-text.txt's layout (build.rs), or its RSS quietly grows back by ~2.5 MiB.
if ((compose_mesh)) && [[ -z "${CARGO_ARGS:-}" ]]; then
    section "layout: scripts/check-hot-text.sh (hot code first in .text)"
    scripts/check-hot-text.sh
fi

section "test: cargo test${CARGO_ARGS:+ $CARGO_ARGS}"
cargo test --locked --all-targets "${cargo_args[@]}"

section "all checks passed in $((SECONDS - started)) s"
