#!/usr/bin/env bash
# Builds the compose mesh's images without any container registry:
#
#   outrigger-base:bookworm  a minimal Debian 12 made by debootstrap (cached: built once)
#   outrigger:local          the base + this repo's release binaries, built on the host
#   outrigger-etcd:local     the base + Debian's etcd and etcdctl, taken from the host
#
# Why: our CI and dev machines reach Debian's mirror and crates.io but no image
# registry, so `docker build .` (FROM rust / debian-slim) cannot run there. The host is
# Debian 12 too, so host-built binaries run unchanged on a bookworm base.
#
# Progress goes to stderr; the last line on stdout is the environment to use, e.g.
#   eval "export $(scripts/offline-images.sh)" && docker compose up
#
# Options:
#   --rebuild-base   rebuild outrigger-base:bookworm even if it exists
#   --no-build       skip `cargo build` and use the binaries already in the target dir
# Environment:
#   CARGO_TARGET_DIR  where cargo puts binaries (default: <repo>/target)
#   CARGO_ARGS        extra cargo flags, e.g. --no-default-features
#   BASE_IMAGE OUTRIGGER_IMAGE ETCD_IMAGE   image tags (defaults above)
#
# Needs (scripts/install-deps.sh installs them): docker, debootstrap, etcd-server,
# etcd-client, cargo. Runs as root (debootstrap needs it).
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-outrigger-base:bookworm}"
OUTRIGGER_IMAGE="${OUTRIGGER_IMAGE:-outrigger:local}"
ETCD_IMAGE="${ETCD_IMAGE:-outrigger-etcd:local}"
SUITE=bookworm
# curl: handy for compose healthchecks and poking at the mesh from inside a container;
# ca-certificates: TLS to a registry over https. Together they add ~10 MB.
BASE_EXTRA_PACKAGES=ca-certificates,curl

rebuild_base=0
cargo_build=1
for arg in "$@"; do
    case "$arg" in
        --rebuild-base) rebuild_base=1 ;;
        --no-build) cargo_build=0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "offline-images.sh: unknown option $arg (try --help)" >&2; exit 64 ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
read -r -a cargo_args <<<"${CARGO_ARGS:-}"

if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'offline-images.sh: %s\n' "$*" >&2; exit 1; }

# Runs one numbered step and reports how long it took, so slow steps are visible.
step() {
    local title="$1" started=$SECONDS
    shift
    log "$title"
    "$@"
    log "$title: done in $((SECONDS - started)) s"
}

# Everything temporary lives under one directory, removed on exit.
scratch="$(mktemp -d "${TMPDIR:-/var/tmp}/outrigger-images.XXXXXX")"
cleanup() {
    # debootstrap mounts /proc and /sys inside its target while it runs; if it died
    # half-way they may still be mounted, and rm must never walk into them.
    local m
    awk -v d="$scratch" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$scratch"
}
trap cleanup EXIT

for tool in docker debootstrap; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done

# --- 1. host binaries -----------------------------------------------------------------
build_binaries() {
    cargo build --release --locked --bins "${cargo_args[@]}" >&2
}

# --- 2. base image --------------------------------------------------------------------
build_base() {
    [[ $EUID -eq 0 ]] || die "debootstrap needs root"
    local mirror rootfs="$scratch/rootfs"
    mirror="$("$repo/scripts/debian-mirror.sh" "$SUITE")"
    log "debootstrap $SUITE from $mirror"
    debootstrap --variant=minbase --include="$BASE_EXTRA_PACKAGES" \
        "$SUITE" "$rootfs" "$mirror" >&2

    # Trim what a container never needs: downloaded .debs, apt indexes (an image that
    # wants packages runs apt-get update first, as with the official images), docs.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
    # Docker provides these at run time; the host's copies must not leak into the image.
    : >"$rootfs/etc/resolv.conf"
    : >"$rootfs/etc/hostname"

    # `docker import` images carry no config at all, so set what `FROM debian` has.
    tar -C "$rootfs" --numeric-owner -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["bash"]' \
            - "$BASE_IMAGE" >&2
}

# --- 3. outrigger:local ---------------------------------------------------------------
build_outrigger_image() {
    # A staging directory as the build context, not the repo: the context is then a few
    # MB instead of the repo plus target/, and .dockerignore (which excludes target/ for
    # the root Dockerfile) does not get in the way.
    local ctx="$scratch/outrigger-ctx" bin
    mkdir -p "$ctx/bin"
    for bin in outrigger outrigger-demo; do
        [[ -x "$target_dir/release/$bin" ]] ||
            die "$target_dir/release/$bin missing (build it, or drop --no-build)"
        cp "$target_dir/release/$bin" "$ctx/bin/"
    done
    docker build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$OUTRIGGER_IMAGE" \
        -f "$repo/docker/Dockerfile.offline" "$ctx" >&2
}

# --- 4. outrigger-etcd:local ----------------------------------------------------------
build_etcd_image() {
    # The context mirrors the image's file tree (see docker/Dockerfile.etcd-offline).
    local ctx="$scratch/etcd-ctx" bin libs missing lib
    mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/usr/local/lib"
    for bin in /usr/bin/etcd /usr/bin/etcdctl; do
        [[ -x "$bin" ]] || die "$bin missing (apt-get install etcd-server etcd-client)"
        cp "$bin" "$ctx/rootfs/usr/local/bin/"
    done

    # Debian links its Go binaries dynamically (glibc only, today). Copy any library
    # the base image lacks, so a future rebuild linking more still works. ldd fails on
    # a static binary; that just means there is nothing to copy.
    libs="$(ldd /usr/bin/etcd /usr/bin/etcdctl 2>/dev/null |
        awk '$2 == "=>" && $3 ~ /^\// { print $3 }    # libfoo.so => /path (0x...)
             NF == 2 && $1 ~ /^\// && $2 ~ /^\(/ { print $1 }  # /lib64/ld-linux... (0x...)
            ' | sort -u || true)"
    if [[ -n "$libs" ]]; then
        # shellcheck disable=SC2086  # one path per word, by construction
        missing="$(docker run --rm --entrypoint /bin/sh "$BASE_IMAGE" \
            -c 'for f; do [ -e "$f" ] || echo "$f"; done' sh $libs)"
        for lib in $missing; do
            case "$lib" in
                */ld-linux*) die "base image lacks the dynamic loader $lib" ;;
            esac
            log "copying $lib (not in $BASE_IMAGE)"
            cp -L "$lib" "$ctx/rootfs/usr/local/lib/"
        done
    fi
    docker build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$ETCD_IMAGE" \
        -f "$repo/docker/Dockerfile.etcd-offline" "$ctx" >&2
}

# --- 5. smoke test --------------------------------------------------------------------
smoke_test() {
    docker run --rm "$ETCD_IMAGE" etcd --version >&2
    docker run --rm "$ETCD_IMAGE" etcdctl version >&2
    docker run --rm --entrypoint outrigger-demo "$OUTRIGGER_IMAGE" --version >&2
    docker run --rm --entrypoint id "$OUTRIGGER_IMAGE" >&2
}

total_started=$SECONDS
if ((cargo_build)); then
    step "1/5 cargo build --release --bins${CARGO_ARGS:+ $CARGO_ARGS}" build_binaries
else
    log "1/5 cargo build: skipped (--no-build)"
fi
if ((rebuild_base)) || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    step "2/5 base image $BASE_IMAGE (debootstrap)" build_base
else
    log "2/5 base image $BASE_IMAGE: cached (--rebuild-base to rebuild)"
fi
step "3/5 image $OUTRIGGER_IMAGE" build_outrigger_image
step "4/5 image $ETCD_IMAGE" build_etcd_image
step "5/5 smoke test" smoke_test
log "all images built in $((SECONDS - total_started)) s; use them with:"
echo "OUTRIGGER_IMAGE=$OUTRIGGER_IMAGE ETCD_IMAGE=$ETCD_IMAGE"
