#!/usr/bin/env bash
# Installs what outrigger's tests, benchmarks and compose mesh need on Debian 12, as root.
# Idempotent: a second run changes nothing and touches no network.
#
#   etcd-server etcd-client  a real etcd for the registry integration tests
#   protobuf-compiler        etcd-client's build script compiles etcd's .proto files;
#   libprotobuf-dev          ... which import google/protobuf/*.proto (only a Recommends of protoc)
#   debootstrap              scripts/offline-images.sh builds a base image without a registry
#   wrk curl                 benchmarks and manual pokes at the mesh
#   docker compose (v2)      the compose mesh; Debian 12 ships only docker-compose v1
#
# Why not everything from apt: Compose v2 (the `docker compose` CLI plugin) is not in
# bookworm, and no other download site is reachable from CI. Debian 13 (trixie) packages
# it as a static Go binary, so we fetch that one .deb from the machine's own mirror
# through a private apt state that never touches the system's sources or package cache.
set -euo pipefail

PACKAGES=(etcd-server etcd-client protobuf-compiler libprotobuf-dev debootstrap wrk curl)
# Private apt state for the trixie lookup (kept across runs as a cache).
TRIXIE_DIR="${OUTRIGGER_APT_CACHE:-/var/cache/outrigger-apt}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DEBIAN_FRONTEND=noninteractive

log() { printf '==> %s\n' "$*"; }
die() { printf 'install-deps.sh: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "run as root (apt-get install and the plugin directory need it)"

# --- 1. Debian packages ------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    log "apt: installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "apt: all present (${PACKAGES[*]})"
fi

# --- 2. Docker Compose v2 ----------------------------------------------------------
install_compose() {
    [[ -f "$KEYRING" ]] || die "$KEYRING missing (package debian-archive-keyring); cannot verify trixie"

    log "docker compose: fetching docker-compose from Debian trixie"
    local mirror plugin deb
    mirror="$("$here/debian-mirror.sh")"

    # A deb822 source for trixie main only, visible to apt solely through the options below.
    mkdir -p "$TRIXIE_DIR/lists/partial" "$TRIXIE_DIR/cache/archives/partial"
    printf '%s\n' \
        "Types: deb" \
        "URIs: $mirror" \
        "Suites: trixie" \
        "Components: main" \
        "Signed-By: $KEYRING" >"$TRIXIE_DIR/trixie.sources"

    # Every path apt would otherwise share with the system points into TRIXIE_DIR, so the
    # host's own apt keeps seeing bookworm only: sources, lists and the binary package cache.
    APT_OPTS=(
        -oDir::Etc::SourceList=/dev/null
        -oDir::Etc::SourceParts="$TRIXIE_DIR"
        -oDir::State::Lists="$TRIXIE_DIR/lists"
        -oDir::Cache="$TRIXIE_DIR/cache"
        -oAPT::Sandbox::User=root   # the temp dir below is root's; avoids the _apt warning
        # Only the Packages index is needed: skip translations and AppStream metadata.
        -oAcquire::Languages=none
        -oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
        -oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
        -oAcquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
        -oAcquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false
    )
    apt-get "${APT_OPTS[@]}" update -q

    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get "${APT_OPTS[@]}" download docker-compose)
    deb=("$work"/docker-compose_*.deb)
    [[ -f "${deb[0]}" ]] || die "apt-get download docker-compose produced no .deb"
    dpkg-deb -x "${deb[0]}" "$work/root"

    plugin="$work/root/usr/libexec/docker/cli-plugins/docker-compose"
    [[ -x "$plugin" ]] || die "no usr/libexec/docker/cli-plugins/docker-compose in ${deb[0]##*/}"
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$plugin" "$PLUGIN_DIR/docker-compose"

    docker compose version || die "installed $PLUGIN_DIR/docker-compose but 'docker compose version' fails"
    log "docker compose: installed to $PLUGIN_DIR"
}

if ! command -v docker >/dev/null; then
    # Not fatal: the unit and loopback tests need no Docker; only the compose mesh does.
    log "docker compose: SKIPPED, no docker CLI on this machine (Compose v2 is a plugin of it)"
elif docker compose version >/dev/null 2>&1; then
    log "docker compose: present ($(docker compose version --short 2>/dev/null || echo '?'))"
else
    install_compose
fi
