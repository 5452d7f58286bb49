"""ComfyUI's `/object_info` for node classes, built without ComfyUI.

Why: our bundled workflows must be checked (converted UI -> API and validated) in every test run, and most runs
have no ComfyUI. This mirrors `node_info()` in ComfyUI 0.3.64's `server.py` (`PromptServer.add_routes`) field
by field for V1 classes; V3 classes (`comfy_api` `io.ComfyNode`) carry their own `GET_NODE_INFO_V1`, which is
called as the server does. The result goes through a JSON round trip, as the server's `web.json_response` does,
so tuples become lists and the dict compares equal to what a live server serves (which
`tests/test_comfyui_integration.py` checks).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
CORE_FIXTURE = Path(__file__).with_name("core_object_info.json")


def node_info(name: str, cls: type, display_name: str | None = None, python_module: str = "nodes") -> dict:
    """One node's entry, as `GET /object_info/<name>` serves it.

    `python_module` is used when the class has no `RELATIVE_PYTHON_MODULE` (which ComfyUI sets while loading a
    pack: `custom_nodes.<folder name>`).
    """
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 node: the schema knows its V1 form
        return json.loads(json.dumps(cls.GET_NODE_INFO_V1()))
    input_types = cls.INPUT_TYPES()
    info = {
        "input": input_types,
        "input_order": {key: list(value.keys()) for key, value in input_types.items()},
        "output": cls.RETURN_TYPES,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
        "name": name,
        "display_name": display_name if display_name is not None else name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", python_module),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False) == True),  # noqa: E712  (as server.py compares)
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = cls.OUTPUT_TOOLTIPS
    if getattr(cls, "DEPRECATED", False):
        info["deprecated"] = True
    if getattr(cls, "EXPERIMENTAL", False):
        info["experimental"] = True
    if hasattr(cls, "API_NODE"):
        info["api_node"] = cls.API_NODE
    return json.loads(json.dumps(info))


def object_info(class_mappings: Mapping[str, type], display_names: Mapping[str, str] | None = None,
                python_module: str = "nodes") -> dict:
    """`GET /object_info` for a `NODE_CLASS_MAPPINGS` (+ `NODE_DISPLAY_NAME_MAPPINGS`)."""
    display_names = display_names or {}
    return {name: node_info(name, cls, display_names.get(name), python_module) for name, cls in class_mappings.items()}


def pack_object_info(pack, folder_name: str = "dit-distillery") -> dict:
    """`/object_info` entries of a loaded pack module, as ComfyUI shows them when the pack is `custom_nodes/<folder>`."""
    return object_info(pack.NODE_CLASS_MAPPINGS, getattr(pack, "NODE_DISPLAY_NAME_MAPPINGS", None),
                       python_module=f"custom_nodes.{folder_name}")


def load_pack(root: str | Path = REPO_ROOT, module_name: str = "dit_distillery_pack"):
    """Import the pack's `__init__.py` the way ComfyUI's `load_custom_node` does (a file spec, relative imports)."""
    init = Path(root) / "__init__.py"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def core_object_info() -> dict:
    """Real `/object_info` entries of the ComfyUI 0.3.64 core nodes our tests and workflows use.

    File-picker combos are empty, as a ComfyUI without models serves them. To add nodes, run a ComfyUI
    (see scripts/setup_comfyui.sh) and `python -m tests.comfyui_support.object_info http://127.0.0.1:PORT NAME...`.
    """
    return json.loads(CORE_FIXTURE.read_text())


_IN_COMFYUI = r"""
import asyncio, importlib.util, json, sys
comfyui_dir, base_dir, helper = sys.argv[1:4]
sys.path.insert(0, comfyui_dir)
from comfy.cli_args import args
args.cpu = True  # before comfy.model_management is imported (CPU-only torch)
args.base_directory = base_dir or None
import nodes
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
spec = importlib.util.spec_from_file_location("dd_object_info", helper)
helper = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helper)
out = {}
for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
    try:
        out[name] = helper.node_info(name, cls, nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name))
    except Exception as e:
        out[name] = {"error": repr(e)}
print("OBJECT_INFO_JSON" + json.dumps(out))
"""


def core_object_info_in_comfyui(comfyui_dir: str | Path, python: str = sys.executable, base_dir: str | Path = "",
                                timeout: float = 300) -> dict:
    """This module's `node_info` applied to every core node class of a ComfyUI checkout (API nodes excepted),
    in a subprocess of that ComfyUI's python: what the offline builder makes of ComfyUI's own classes."""
    result = subprocess.run([python, "-c", _IN_COMFYUI, str(comfyui_dir), str(base_dir), __file__],
                            cwd=comfyui_dir, capture_output=True, text=True, timeout=timeout)
    line = next((l for l in result.stdout.splitlines() if l.startswith("OBJECT_INFO_JSON")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"node_info inside ComfyUI failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(line[len("OBJECT_INFO_JSON"):])


def _add_to_fixture(url: str, names: list[str]) -> None:
    fixture = core_object_info()
    for name in names:
        with urllib.request.urlopen(f"{url.rstrip('/')}/object_info/{name}", timeout=30) as response:
            entry = json.load(response)
        if name not in entry:
            raise SystemExit(f"{url} has no node {name!r}")
        fixture[name] = entry[name]
    CORE_FIXTURE.write_text(json.dumps(dict(sorted(fixture.items())), indent=1, sort_keys=True) + "\n")
    print(f"{CORE_FIXTURE}: {len(fixture)} nodes")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m tests.comfyui_support.object_info http://127.0.0.1:PORT NODE [NODE...]")
    _add_to_fixture(sys.argv[1], sys.argv[2:])
