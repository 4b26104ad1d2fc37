#!/usr/bin/env bash
# The test suite: set up .venv (first run only) and run pytest. Extra arguments go to pytest:
#   scripts/test.sh                 # default tier (offline, ~minutes on 2 cores)
#   scripts/test.sh -m distributed  # 2-process ZeRO-2/3 runs on CPU
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
exec python -m pytest "$@"
