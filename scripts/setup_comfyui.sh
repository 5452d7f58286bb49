#!/usr/bin/env bash
# Make a ComfyUI checkout runnable headless on a CPU-only machine, in its own virtual environment, so that
# tests/test_comfyui_integration.py can run our pack inside a real ComfyUI server.
#
#   scripts/setup_comfyui.sh COMFYUI_DIR [VENV]          (VENV defaults to COMFYUI_DIR-venv)
#
# COMFYUI_DIR must already hold ComfyUI's source: this script never downloads ComfyUI's code. If it is empty
# and COMFYUI_GIT names a (bare) git repository of ComfyUI, the commit COMFYUI_REF (default HEAD) is checked
# out into it first, blob by blob, because `git archive` aborts on a snapshot that lacks a blob.
#
# The venv is made with --system-site-packages so the installed torch (and this pack's own dependencies) are
# reused, and nothing of ComfyUI's lands in the system site-packages. ComfyUI's requirements are installed with
# torch pinned to the installed version; a --dry-run first refuses any plan that would change torch or pull
# CUDA wheels. torchaudio is left out (its PyPI wheel links libtorch_cuda and breaks at import: only ComfyUI's
# audio nodes miss it). torchvision's PyPI wheel has the same problem; tests/comfyui_support/torchvision_shim.py
# is installed into the venv (+ a .pth line) so `import torchvision` works. `requests` is added because
# ComfyUI's app/frontend_management.py imports it without listing it. Safe to run again.
#
# Then run the tests with:
#   COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfyui-venv/bin/python python -m pytest -m comfyui tests/
set -euo pipefail

usage() { echo "usage: $0 COMFYUI_DIR [VENV]   (env: PYTHON, COMFYUI_GIT, COMFYUI_REF)" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
REPO="$(cd "$(dirname "$0")/.." && pwd)"
COMFYUI_DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
VENV="${2:-${COMFYUI_DIR%/}-venv}"
PY="${PYTHON:-python3}"

# 1. ComfyUI's source.
if [ ! -f "$COMFYUI_DIR/main.py" ]; then
  if [ -z "${COMFYUI_GIT:-}" ]; then
    echo "$COMFYUI_DIR has no ComfyUI (no main.py). Put a ComfyUI checkout there, or set COMFYUI_GIT to a" \
         "local git repository of ComfyUI to check it out from." >&2
    exit 2
  fi
  if [ -n "$(ls -A "$COMFYUI_DIR")" ]; then
    echo "$COMFYUI_DIR is not empty and has no main.py: refusing to check out into it." >&2
    exit 2
  fi
  ref="${COMFYUI_REF:-HEAD}"
  echo "checking out $ref of $COMFYUI_GIT into $COMFYUI_DIR"
  missing=0
  while IFS= read -r -d '' entry; do
    read -r mode _ blob <<<"${entry%%$'\t'*}"
    path="${entry#*$'\t'}"
    mkdir -p "$COMFYUI_DIR/$(dirname "$path")"
    if [ "$mode" = 120000 ]; then
      ln -sfn "$(git --git-dir="$COMFYUI_GIT" cat-file blob "$blob")" "$COMFYUI_DIR/$path"
    elif git --git-dir="$COMFYUI_GIT" cat-file blob "$blob" >"$COMFYUI_DIR/$path" 2>/dev/null; then
      [ "$mode" = 100755 ] && chmod +x "$COMFYUI_DIR/$path"
    else
      rm -f "$COMFYUI_DIR/$path"
      echo "  blob missing from the repository, skipped: $path" >&2
      missing=$((missing + 1))
    fi
  done < <(git --git-dir="$COMFYUI_GIT" ls-tree -r -z "$ref")
  [ "$missing" = 0 ] || echo "  $missing file(s) missing (llama_tokenizer/tokenizer.json is only used by HiDream/Hunyuan-Video text encoders)." >&2
fi
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFYUI_DIR/comfyui_version.py" 2>/dev/null || true)"
echo "ComfyUI ${version:-(unknown version)} in $COMFYUI_DIR"

# 2. The venv, sharing the system torch.
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
VPY="$VENV/bin/python"
torch_version="$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])')" || {
  echo "no torch visible from $VENV: install torch for $PY first (scripts/setup.sh does)." >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "torch==$torch_version" >"$work/constraints.txt"
grep -v -E '^\s*torchaudio\s*($|[<>=!~;#])' "$COMFYUI_DIR/requirements.txt" >"$work/requirements.txt"
echo "requests" >>"$work/requirements.txt"

# 3. Look before installing: torch must stay, and no CUDA wheel may come in.
"$VPY" -m pip install -q --dry-run --report "$work/plan.json" -r "$work/requirements.txt" -c "$work/constraints.txt"
"$VPY" - "$work/plan.json" <<'EOF'
import json, sys
plan = [item["metadata"]["name"].lower() for item in json.load(open(sys.argv[1]))["install"]]
bad = [name for name in plan if name in ("torch", "torchaudio", "triton") or name.startswith("nvidia-")]
print("to install:", ", ".join(plan) or "nothing")
if bad:
    sys.exit(f"refusing: the plan would install {bad} (torch must stay the system build, no CUDA wheels).")
EOF
"$VPY" -m pip install -q -r "$work/requirements.txt" -c "$work/constraints.txt"

# 4. torchvision shim (see tests/comfyui_support/torchvision_shim.py).
site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$REPO/tests/comfyui_support/torchvision_shim.py" "$site/dit_distillery_torchvision_shim.py"
echo "import dit_distillery_torchvision_shim; dit_distillery_torchvision_shim.install()" \
  >"$site/dit_distillery_torchvision_shim.pth"

# 5. Smoke check: the imports ComfyUI needs at startup, and the version it reports.
"$VPY" - "$COMFYUI_DIR" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import torch, torchvision, torchvision.transforms  # noqa: F401  (torchvision goes through the shim)
import aiohttp, av, comfyui_frontend_package, kornia, requests, spandrel, sqlalchemy  # noqa: F401
from comfyui_version import __version__
print(f"ok: ComfyUI {__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, python {sys.executable}")
EOF
echo "start it with: cd $COMFYUI_DIR && $VPY main.py --cpu --listen 127.0.0.1 --port 8188 --base-directory DIR"
