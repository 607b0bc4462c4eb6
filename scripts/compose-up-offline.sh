#!/usr/bin/env bash
# Starts the compose mesh (docker-compose.yml: a → b → c, a sidecar per app, etcd)
# without any image registry, for machines where `docker compose up --build` cannot
# pull rust:* / debian:* / etcd:
#
#   1. scripts/offline-images.sh builds outrigger:local and outrigger-etcd:local;
#   2. docker compose up -d --no-build, with OUTRIGGER_IMAGE / ETCD_IMAGE set to them;
#   3. waits until every container runs and every healthcheck passes;
#   4. prints what to try (docs/compose.md has the walkthrough).
#
# Usage: scripts/compose-up-offline.sh [offline-images.sh options, e.g. --no-build]
# Environment:
#   READY_TIMEOUT         seconds to wait for the healthchecks (default 120)
#   COMPOSE_PROJECT_NAME  as for docker compose (default: the repo directory's name)
#   OUTRIGGER_IMAGE ETCD_IMAGE CARGO_ARGS ...   passed on to offline-images.sh
# Stop the mesh with scripts/compose-down.sh.
set -euo pipefail

READY_TIMEOUT="${READY_TIMEOUT:-120}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'compose-up-offline.sh: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "docker not found (install Docker Engine)"
docker compose version >/dev/null 2>&1 ||
    die "'docker compose' (Compose v2) not found: run scripts/install-deps.sh"

# --- 1. images ------------------------------------------------------------------------
# offline-images.sh logs to stderr; its last stdout line is the environment to use.
images="$(scripts/offline-images.sh "$@" | tail -n 1)"
[[ "$images" =~ ^OUTRIGGER_IMAGE=[^[:space:]]+\ ETCD_IMAGE=[^[:space:]]+$ ]] ||
    die "unexpected output from offline-images.sh: $images"
# shellcheck disable=SC2163,SC2086  # two NAME=value words, checked just above
export $images

# --- 2. up ----------------------------------------------------------------------------
started=$SECONDS
log "docker compose up -d --no-build ($images)"
docker compose up -d --no-build

# --- 3. wait for health ---------------------------------------------------------------
# docker inspect rather than `compose ps --format`, whose output changed across v2
# releases. A container is ready when it runs and its healthcheck, if any, passes.
expected="$(docker compose config --services | wc -l)"
log "waiting for $expected containers to run and pass their healthchecks"
while :; do
    mapfile -t ids < <(docker compose ps -a -q)
    status=""
    ((${#ids[@]})) && status="$(docker inspect --format \
        '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}}' \
        "${ids[@]}")"
    dead="$(awk '$2 == "exited" || $2 == "dead"' <<<"$status")"
    if [[ -n "$dead" ]]; then
        docker compose ps -a >&2
        die "container(s) stopped: ${dead//$'\n'/; } (see: docker compose logs)"
    fi
    waiting="$(awk '$2 != "running" || ($3 != "healthy" && $3 != "-") { print substr($1, 2) " (" $2 ", health " $3 ")" }' <<<"$status")"
    if ((${#ids[@]} >= expected)) && [[ -z "$waiting" ]]; then
        break
    fi
    if ((SECONDS - started > READY_TIMEOUT)); then
        docker compose ps -a >&2
        die "not ready after ${READY_TIMEOUT}s; waiting for: ${waiting//$'\n'/, } (see: docker compose logs)"
    fi
    sleep 1
done
log "the mesh is up: every healthcheck passed $((SECONDS - started)) s after 'docker compose up'"

# --- 4. what to try -------------------------------------------------------------------
cat <<EOF

Try it (docs/compose.md explains each step):

  curl localhost:8080/                              # a → b → c, and which replica answered
  docker compose exec a-sidecar outrigger routes    # a's routing table
  docker compose kill b1-sidecar                    # replies move to b2, none fail
  docker compose start b1-sidecar                   # b1 rejoins within seconds
  docker compose logs -f b1-sidecar

Commands that create containers (up, run) need the same images, so export them first:
  export $images
Stop everything: scripts/compose-down.sh
EOF
