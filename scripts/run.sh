#!/usr/bin/env bash
# The main job: set up .venv (first run only), then run the whole method on CPU and write a report.
#   scripts/run.sh                                          # onpolicy pipeline recipes/tiny/pipeline.yaml
#   scripts/run.sh recipes/gpu/pipeline_100m.yaml           # another pipeline file
#   scripts/run.sh recipes/tiny/ar_baseline.yaml train.max_steps=50   # or one recipe: onpolicy train
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
target="${1:-recipes/tiny/pipeline.yaml}"
shift || true
case "$(basename "$target")" in
  pipeline*.yaml) exec onpolicy pipeline "$target" "$@" ;;
  *) exec onpolicy train "$target" "$@" ;;
esac
