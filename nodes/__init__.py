"""The ComfyUI nodes: thin adapters over `dit_distillery`, one module per node family.

Each module defines `NODE_CLASS_MAPPINGS` and `NODE_DISPLAY_NAME_MAPPINGS`; they are merged here. Nothing in
this package imports ComfyUI at import time (ComfyUI modules are imported inside the functions that need them),
so the pack imports, and its nodes can be called, without ComfyUI.
"""

import importlib

_MODULES = ["models", "comfy_models", "data", "losses", "train", "student", "evaluate"]

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _name in _MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
