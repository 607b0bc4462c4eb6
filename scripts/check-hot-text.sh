#!/usr/bin/env bash
# Checks that a release binary was linked with link/hot-text.txt in force: most listed
# functions exist under their listed names, and they sit at the front of .text in the
# listed order. Fails when the list has gone stale (new code or a dependency upgrade
# renamed its symbols), since a stale list silently costs RSS; scripts/hot-text.sh
# regenerates it.
#
# usage: scripts/check-hot-text.sh [BINARY]   (default target/release/outrigger)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/target/release/outrigger}"
LIST="$ROOT/link/hot-text.txt"
MIN_FOUND_PERCENT=90

die() { echo "check-hot-text.sh: $*" >&2; exit 1; }
[ -x "$BIN" ] || die "no binary at $BIN (cargo build --release)"
[ -f "$LIST" ] || die "no $LIST (scripts/hot-text.sh)"

# One pass: listed names in list order, joined with their address in the binary.
nm --defined-only "$BIN" | awk -v min="$MIN_FOUND_PERCENT" -v bin="$BIN" '
  NR == FNR { if ($0 !~ /^#/ && $0 != "") { want[++n] = $0 }; next }
  { addr[$3] = $1 }
  END {
    found = 0; inorder = 0; prev = ""
    for (i = 1; i <= n; i++) {
      if (!(want[i] in addr)) continue
      a = addr[want[i]]
      # Fixed-width hex addresses compare correctly as strings.
      if (prev == "" || a > prev) inorder++
      prev = a; found++
    }
    pct = n ? 100 * found / n : 0
    printf "hot-text: %d of %d listed functions in %s (%.0f%%), %d of them in list order\n", found, n, bin, pct, inorder
    if (pct < min) { printf "hot-text: under %d%%: the list is stale; run scripts/hot-text.sh on a release build and commit link/hot-text.txt\n", min; exit 1 }
    if (inorder < found * 0.95) { print "hot-text: the listed functions are not laid out in order: was the binary linked with lld and build.rs in force?"; exit 1 }
  }' "$LIST" -
