#!/usr/bin/env bash
# Set up a fresh machine for DiT Distillery: torch if absent (the CPU build is enough for the demo and the
# tests), then the pack's requirements at the tested versions of constraints.txt, then the pack itself
# (editable, so `dit-distillery` and `python -m dit_distillery` work from any folder). Safe to run again:
# already satisfied requirements are left as they are, and an installed torch (e.g. ComfyUI's CUDA build) is
# never replaced.
#   --test     also the test requirements
#   --latest   the newest releases instead of the tested versions (the scheduled compatibility check)
#   --freeze   after installing, rewrite constraints.txt from what is installed (after a green --latest run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
req=requirements.txt constraints=(-c constraints.txt) upgrade=() freeze=0
for arg in "$@"; do
  case "$arg" in
    --test) req=requirements-test.txt ;;
    --latest) constraints=() upgrade=(--upgrade --upgrade-strategy eager) ;;
    --freeze) freeze=1 ;;
    *) echo "setup.sh: unknown option $arg (use --test, --latest, --freeze)" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q "${upgrade[@]}" "${constraints[@]}" -r "$req"
"$PY" -m pip install -q --no-deps -e .
if [ "$freeze" = 1 ]; then
  { sed -n '/^#/p' constraints.txt
    "$PY" -m pip freeze --exclude-editable | grep -viE '^(torch|torchvision|torchaudio)([=@ ]|$)'; } > constraints.txt.new
  mv constraints.txt.new constraints.txt
fi
