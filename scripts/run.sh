#!/usr/bin/env bash
# The main job: set up .venv (first run only) and train the tiny CPU recipe.
#   scripts/run.sh                                   # recipes/tiny/stage1_mask.yaml
#   scripts/run.sh recipes/tiny/ar_baseline.yaml train.max_steps=50
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
recipe="${1:-recipes/tiny/stage1_mask.yaml}"
shift || true
exec onpolicy train "$recipe" "$@"
