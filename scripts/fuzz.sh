#!/usr/bin/env bash
# The long fuzz pass (not part of CI, which runs the same properties with
# proptest's default 256 cases inside `cargo test`): the property tests of
# the config parser (src/config/proptests.rs), the registry value decoder
# (src/registry/record/proptests.rs) and the static-file parser
# (src/registry/static_file/proptests.rs), with many more cases.
#
#   scripts/fuzz.sh                       # 200000 cases per property
#   PROPTEST_CASES=2000000 scripts/fuzz.sh
#
# A failure prints the minimal failing input and saves it under
# proptest-regressions/, which is replayed first on every later run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

export PROPTEST_CASES="${PROPTEST_CASES:-200000}"
# Long runs shrink failures for longer than the default allows.
export PROPTEST_MAX_SHRINK_TIME="${PROPTEST_MAX_SHRINK_TIME:-60000}"
started=$SECONDS
cargo test --locked --lib proptests -- --test-threads "$(nproc)"
echo "fuzz.sh: ${PROPTEST_CASES} cases per property, $((SECONDS - started)) s in total (build included)"
