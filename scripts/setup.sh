#!/usr/bin/env bash
# Installs everything OmniReel needs on a fresh Debian machine, idempotently:
#   1. system tools (ffmpeg, espeak-ng, prometheus, pushgateway) when missing and we are root,
#   2. a virtual environment (.venv, or $OMNIREEL_VENV; "system" installs into the current python),
#   3. torch pinned FIRST (the CPU build here, so nothing pulls CUDA wheels), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${OMNIREEL_TORCH:-torch==2.13.0}
VENV=${OMNIREEL_VENV:-.venv}
EXTRAS=${OMNIREEL_EXTRAS:-dev}          # pip extras of the project ("s3" in the container image)
TEST_TOOLS=${OMNIREEL_TEST_TOOLS:-1}    # 0: skip the system tools only the tests use

# ffmpeg: ffprobe checks MP4s; espeak-ng: test recordings for voice binding;
# prometheus + prometheus-pushgateway: real scrape and push targets in the tests.
# (PyAV bundles its own FFmpeg libraries, so rendering itself needs none of them.)
missing=()
if [ "$TEST_TOOLS" != 0 ]; then
  command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
  command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v prometheus-pushgateway >/dev/null 2>&1 || missing+=(prometheus-pushgateway)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install these system packages first: ${missing[*]}" >&2
    exit 1
  fi
fi

if [ "$VENV" = system ]; then
  PY=python3
else
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY="$VENV/bin/python"
fi
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q -e ".[$EXTRAS]"
# Resemblyzer is used only for its GE2E weights (pretrained.pt, loaded by omnireel.model.voice): its
# declared dependencies (librosa, webrtcvad) are not needed and webrtcvad does not build here.
"$PY" -m pip install -q --no-deps "resemblyzer==0.1.4"
echo "setup: ready ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
