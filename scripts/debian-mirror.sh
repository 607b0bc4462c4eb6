#!/usr/bin/env bash
# Prints the URI of this machine's own Debian mirror (e.g. http://deb.debian.org/debian),
# read from apt's configuration.
#
# Why: install-deps.sh (Compose from trixie) and offline-images.sh (debootstrap)
# must fetch from the same mirror apt already uses. Hardcoding a host would break on
# machines that can only reach their configured mirror (a proxy, a snapshot, a local
# cache), which is the case on locked-down CI machines.
#
# Usage: scripts/debian-mirror.sh [SUITE]   (SUITE defaults to this machine's codename)
# Picks the first enabled `deb` entry whose suites include exactly SUITE, so the
# security archive (bookworm-security), updates and third-party repositories
# (whose suite is something else) are never chosen.
set -euo pipefail

suite="${1:-}"
if [[ -z "$suite" ]]; then
    # shellcheck disable=SC1091  # /etc/os-release is a system file
    suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
fi
if [[ -z "$suite" ]]; then
    echo "debian-mirror.sh: cannot tell this machine's Debian codename" >&2
    exit 1
fi

found=""

# deb822 files (*.sources): paragraphs of `Field: value` lines.
shopt -s nullglob
sources=(/etc/apt/sources.list.d/*.sources)
if ((${#sources[@]})); then
    found="$(awk -v want="$suite" '
        BEGIN { RS = ""; FS = "\n" }   # paragraph mode: one record per stanza
        {
            uris = ""; suites = ""; types = ""; enabled = "yes"
            for (i = 1; i <= NF; i++) {
                line = $i
                if (line ~ /^[ \t]*#/) continue
                key = tolower(line); sub(/:.*/, "", key)
                val = line; sub(/^[^:]*:[ \t]*/, "", val)
                if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "types") types = val
                else if (key == "enabled") enabled = tolower(val)
            }
            if (enabled == "no" || types !~ /(^|[ \t])deb([ \t]|$)/) next
            n = split(suites, s, /[ \t]+/)
            for (j = 1; j <= n; j++) if (s[j] == want) {
                split(uris, u, /[ \t]+/)
                if (u[1] ~ /^https?:\/\//) { print u[1]; exit }
            }
        }' "${sources[@]}")"
fi

# One-line format (sources.list and *.list): deb [options] URI SUITE COMPONENT...
if [[ -z "$found" ]]; then
    lists=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    existing=()
    for f in "${lists[@]}"; do [[ -f "$f" ]] && existing+=("$f"); done
    if ((${#existing[@]})); then
        found="$(awk -v want="$suite" '
            $1 == "deb" {
                sub(/\[[^]]*\]/, "")          # drop [arch=... signed-by=...]
                if ($3 == want && $2 ~ /^https?:\/\//) { print $2; exit }
            }' "${existing[@]}")"
    fi
fi

if [[ -z "$found" ]]; then
    echo "debian-mirror.sh: no http(s) 'deb' entry for suite '$suite' in /etc/apt/sources.list{,.d/}" >&2
    exit 1
fi
# apt accepts a trailing slash; debootstrap and our deb822 file do not need it.
echo "${found%/}"
