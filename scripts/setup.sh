#!/usr/bin/env bash
# Set up a fresh machine for DiT Distillery: torch if absent (the CPU build is enough for the demo and the
# tests), then the pack's requirements. `--test` adds the test requirements. Safe to run again: already
# satisfied requirements are left as they are, and an installed torch (e.g. ComfyUI's CUDA build) is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
req=requirements.txt
[ "${1:-}" = "--test" ] && req=requirements-test.txt
"$PY" -m pip install -q -r "$req"
