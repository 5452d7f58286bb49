"""Let `import torchvision` succeed where its compiled ops cannot load (CPU-only torch + PyPI torchvision).

Why: no CPU torchvision wheel matching torch 2.13.0 is reachable here; the PyPI 0.28.0 wheel's `_C.so` links
`libtorch_cuda.so`, fails to load, and torchvision's `_meta_registrations` then dies on
`register_fake("torchvision::nms")` because the op schema was never defined. ComfyUI imports torchvision at
startup (`comfy/ldm/cascade`, `cosmos`), so without this the server cannot start.

How: `scripts/setup_comfyui.sh` copies this file into the ComfyUI venv's site-packages and adds a `.pth` line
that calls `install()`. `install()` only puts a finder on `sys.meta_path` (torch is not imported at interpreter
start). On the first `import torchvision` the finder tries to load the real `_C` library; only if that fails does
it define the two op schemas torchvision registers fake kernels for (`nms`, `qnms`). Transforms and models then
work, and torchvision's own C++-op functions still raise its clean "Couldn't load custom C++ ops" error.
A torchvision whose `_C` loads is left untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

# The schemas of torchvision/csrc/ops/nms.cpp (the only ops `_meta_registrations` touches unconditionally).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library must stay alive for its definitions to stay registered


def _compiled_ops_path(package_dirs) -> str | None:
    for folder in package_dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_C" + suffix)
            if os.path.exists(path):
                return path
    return None


def prepare(package_dirs) -> bool:
    """Define the nms schemas unless torchvision's compiled ops load. Returns True when the shim was needed."""
    global _library
    import torch

    path = _compiled_ops_path(package_dirs)
    if path is not None:
        try:
            torch.ops.load_library(path)
            return False
        except (OSError, ImportError, RuntimeError):
            pass
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _library.define(schema)
    return True


class _Finder(importlib.abc.MetaPathFinder):
    """Runs `prepare` once, just before the real torchvision package is imported; never imports anything itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations:
            prepare(list(spec.submodule_search_locations))
        return None  # the regular finders import the package as usual


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path) and "torchvision" not in sys.modules:
        sys.meta_path.insert(0, _Finder())
