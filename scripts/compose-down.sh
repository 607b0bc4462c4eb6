#!/usr/bin/env bash
# Stops the compose mesh and removes all of it: containers, its network and etcd's
# volume (the registry holds nothing worth keeping; leases expire anyway).
#
# Usage: scripts/compose-down.sh [extra `docker compose down` options]
# Works for a mesh started by `docker compose up` or by scripts/compose-up-offline.sh;
# set COMPOSE_PROJECT_NAME if you started it under another project name.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# `down` reads the compose file; give its image variables the offline defaults unless
# set, so the file resolves the same way it did for compose-up-offline.sh.
export OUTRIGGER_IMAGE="${OUTRIGGER_IMAGE:-outrigger:local}"
export ETCD_IMAGE="${ETCD_IMAGE:-outrigger-etcd:local}"

exec docker compose down --volumes --remove-orphans "$@"
