"""DiT Distillery: ComfyUI entry point.

Import scheme (see README, "Developing"): the core package `dit_distillery/` is always imported by its
absolute name. When ComfyUI loads this folder from `custom_nodes/`, the folder is appended to `sys.path`
(appended, never prepended, so ComfyUI's own top-level modules such as `nodes` keep precedence). Under pytest
and the CLI the repository root is already on `sys.path`. Node modules import each other relatively.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
