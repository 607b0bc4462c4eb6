#!/usr/bin/env bash
# Supply-chain check: refuse dependency versions with known vulnerabilities
# (RustSec advisories), including hyper, h2, rustls and tokio, whose bugs
# would sit on every call in the mesh. Run by scripts/test.sh (so by CI).
#
# It works offline: the advisory database is a local checkout or snapshot of
# https://github.com/rustsec/advisory-db, never fetched here, so CI machines
# without GitHub access still get a real verdict.
#
# Environment:
#   ADVISORY_DB          the advisory database (default ../shared/advisory-db,
#                        relative to the project root)
#   CARGO_AUDIT_VERSION  the cargo-audit installed when it is missing
#                        (default 0.22.2, which builds on Rust >= 1.88)
#
# Exit status: 0 clean; non-zero if an advisory matches Cargo.lock (any
# vulnerability, and warnings such as yanked or unsound crates too), or if
# the database is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# The first database found: $ADVISORY_DB, the workspace's shared snapshot (beside the
# project, or at its absolute place when the clone lives elsewhere), or cargo-audit's
# own cache from an earlier online run.
db="${ADVISORY_DB:-}"
if [[ -z "$db" ]]; then
    db=../shared/advisory-db
    for candidate in ../shared/advisory-db /work/shared/advisory-db "$HOME/.cargo/advisory-db"; do
        if [[ -d "$candidate/crates" ]]; then
            db="$candidate"
            break
        fi
    done
fi
version="${CARGO_AUDIT_VERSION:-0.22.2}"

if [[ ! -d "$db/crates" ]]; then
    cat >&2 <<MSG
audit.sh: no RustSec advisory database at '$db' (expected a 'crates/' directory there).
  Get one with:  git clone https://github.com/rustsec/advisory-db "$db"
  or point ADVISORY_DB at an existing checkout or snapshot.
MSG
    exit 2
fi

if ! cargo audit --version >/dev/null 2>&1; then
    echo "audit.sh: installing cargo-audit $version (once)" >&2
    # No default features: binary scanning is not needed to audit Cargo.lock.
    # --debug: an unoptimized build takes about half as long (3.6 against 6.5
    # minutes on a slow 2-core VM, where CI came within 3 minutes of its
    # 40-minute budget), and auditing one lock file still takes about 2 s.
    cargo install --locked --no-default-features --debug "cargo-audit@$version" >&2
fi

advisories=$(find "$db/crates" -name '*.md' | wc -l)
echo "audit.sh: $(cargo audit --version | awk '{print $NF}') (cargo-audit) against $db ($advisories advisories)"

# Self-check first: the same lock file with hyper, h2, rustls and tokio pinned
# to versions with published advisories must be refused, naming all four. This
# proves the database really loads and matches (an empty or wrong directory
# would otherwise pass every build).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
sed -E '/^name = "(hyper|h2|rustls|tokio)"$/{n;s/^version = .*/version = "VULN"/}' Cargo.lock |
    awk '/^name = /{name=$3} /^version = "VULN"$/{
            v["\"hyper\""]="0.14.9"; v["\"h2\""]="0.4.1"; v["\"rustls\""]="0.23.15"; v["\"tokio\""]="1.18.0";
            print "version = \"" v[name] "\""; next } {print}' >"$scratch/Cargo.lock"
if report=$(cargo audit --db "$db" --no-fetch --stale --deny warnings --file "$scratch/Cargo.lock" 2>&1); then
    echo "audit.sh: self-check failed: known-vulnerable hyper/h2/rustls/tokio passed the audit" >&2
    exit 1
fi
for crate in hyper h2 rustls tokio; do
    grep -Eq "^Crate: +$crate\$" <<<"$report" || {
        echo "audit.sh: self-check failed: no advisory reported for a known-vulnerable $crate" >&2
        echo "$report" >&2
        exit 1
    }
done
echo "audit.sh: self-check ok: known-vulnerable hyper, h2, rustls and tokio are refused"

# The real audit. --no-fetch: use the database as it is; --stale: a snapshot
# is older than cargo-audit's freshness window by design; --deny warnings:
# unmaintained, unsound and yanked crates fail the build too, not only
# vulnerabilities.
cargo audit --db "$db" --no-fetch --stale --deny warnings --file Cargo.lock
echo "audit.sh: no known-vulnerable dependency in Cargo.lock"
