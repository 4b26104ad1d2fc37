#!/usr/bin/env bash
# Creates .venv in the checkout and installs the project into it. Idempotent: a second run
# only re-installs the project (seconds). Sourced by scripts/run.sh and scripts/test.sh.
#
#   ONPOLICY_TORCH=auto   (default) keep a torch already in .venv; else a CPU build when no GPU
#                         is visible (nvidia-smi), else PyPI's default (CUDA) build.
#   ONPOLICY_TORCH=cpu    force the CPU build;  ONPOLICY_TORCH=cuda  force PyPI's CUDA build.
#   ONPOLICY_TORCH=system create .venv with --system-site-packages and use the torch you have.
#   TORCH_VERSION=2.13.0  the torch release to install (default below).
#   PYTHON=python3.11     interpreter used to create .venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
torch_mode="${ONPOLICY_TORCH:-auto}"
torch_version="${TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  if [ "$torch_mode" = system ]; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ "$torch_mode" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then torch_mode=cuda; else torch_mode=cpu; fi
  fi
  case "$torch_mode" in
    cpu)
      echo "[setup] installing torch==$torch_version (CPU build)"
      # PyTorch's CPU index keeps pip from pulling a multi-GB CUDA build onto a machine without a
      # GPU. Where that host is unreachable (an offline mirror with a local CPU wheel, as on our CI
      # machines), asking it would cost pip minutes of retries, so it is probed first.
      cpu_index=https://download.pytorch.org/whl/cpu
      if "$venv/bin/python" -c "import socket; socket.create_connection(('download.pytorch.org', 443), timeout=3)" 2>/dev/null; then
        "${pip[@]}" install "torch==$torch_version" numpy --extra-index-url "$cpu_index"
      else
        echo "[setup] $cpu_index unreachable: installing torch==$torch_version from the configured index"
        "${pip[@]}" install "torch==$torch_version" numpy
      fi ;;
    cuda)
      echo "[setup] installing torch==$torch_version (PyPI default build, CUDA on Linux)"
      "${pip[@]}" install "torch==$torch_version" numpy ;;
    system)
      echo "[setup] ONPOLICY_TORCH=system but no torch is importable from $venv" >&2; exit 1 ;;
    *)
      echo "[setup] unknown ONPOLICY_TORCH=$torch_mode (valid: auto, cpu, cuda, system)" >&2; exit 1 ;;
  esac
fi

# bubblewrap sandboxes the verifiers (model-written code never runs unsandboxed by default).
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
    echo "[setup] installing bubblewrap (apt-get)"
    $sudo apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
      || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq bubblewrap >/dev/null 2>&1; } \
      || echo "[setup] WARNING: could not install bubblewrap; verifiers will refuse to run (sudo apt-get install -y bubblewrap)" >&2
  elif command -v dnf >/dev/null 2>&1; then
    sudo -n dnf install -y bubblewrap >/dev/null 2>&1 || echo "[setup] WARNING: install bubblewrap (dnf install bubblewrap)" >&2
  else
    echo "[setup] WARNING: bubblewrap not found; install it with your package manager for sandboxed verifiers" >&2
  fi
fi

# Hold torch where it is while the rest resolves (a bare `torch` requirement would upgrade it).
installed_torch="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
constraints="$venv/onpolicy-constraints.txt"
{ cat "$root/constraints.txt"; echo "torch==$installed_torch"; } > "$constraints"
echo "[setup] installing onpolicy (torch $installed_torch)"
"${pip[@]}" install -c "$constraints" -e "$root[${ONPOLICY_EXTRAS:-dev,trl}]"
export PATH="$venv/bin:$PATH"
