"""Our pack inside a real ComfyUI server (0.3.64, CPU), and our files in stock ComfyUI nodes.

Runs only where `COMFYUI_DIR` names a ComfyUI checkout (scripts/setup_comfyui.sh makes one and its venv);
`COMFYUI_PYTHON` is the python to run it with (default: this one). One server is started for the module, on
127.0.0.1, with a temporary base directory whose `custom_nodes/dit-distillery` links to this repository.

    COMFYUI_DIR=/work/comfyui COMFYUI_PYTHON=/work/comfyui-venv/bin/python python -m pytest -q tests/test_comfyui_integration.py
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.comfyui_support import interop
from tests.comfyui_support import object_info as oi
from tests.comfyui_support.server import ComfyUIServer, PromptRejected, custom_node_loaded, import_problems
from tests.comfyui_support.workflow_api import VIRTUAL_TYPES, check_workflow

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parents[1]
PACK_FOLDER = "dit-distillery"  # the folder name ComfyUI-Manager gives the pack (pyproject name)
BROKEN_PACK = "broken-probe"  # a pack that fails to import, so the import checks are seen to fail

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout (scripts/setup_comfyui.sh)"),
]

# Bundled workflows that are also queued (file name -> timeout in seconds); the others are converted and
# validated by the live server's /object_info only. Add the quickstart here once its models can be made locally.
QUEUE_WORKFLOWS: dict[str, float] = {}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    broken = base / "custom_nodes" / BROKEN_PACK
    broken.mkdir()
    (broken / "__init__.py").write_text('raise ImportError("broken on purpose")\n')
    server = ComfyUIServer(COMFYUI_DIR, base, python=COMFYUI_PYTHON)
    server.start(timeout=180)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live_info(comfy):
    # The first /object_info has side effects (Load3D's INPUT_TYPES creates input/3d, which then shows in
    # LoadImageSetFromFolderNode's folder list): use the settled second answer.
    comfy.object_info()
    return comfy.object_info()


@pytest.fixture(scope="module")
def pack():
    return oi.load_pack(REPO)


def _without_unknown_files(reference: dict, live: dict) -> dict:
    """`live` with the option lists of file pickers emptied where `reference` has them empty."""
    live = json.loads(json.dumps(live))
    for section, inputs in reference.get("input", {}).items():
        for name, spec in inputs.items() if isinstance(inputs, dict) else ():
            if isinstance(spec, list) and spec and spec[0] == [] and name in live["input"].get(section, {}):
                live["input"][section][name][0] = []
    return live


# ----------------------------------------------------------------------------------------------------------
# The server and the pack

def test_server_is_the_expected_comfyui_on_cpu(comfy):
    stats = comfy.get_json("/system_stats")
    assert stats["system"]["comfyui_version"] == "0.3.64"
    assert [d["type"] for d in stats["devices"]] == ["cpu"]
    assert comfy.startup_seconds < 120


def test_pack_imports_without_errors(comfy):
    log = comfy.log()
    assert custom_node_loaded(log, PACK_FOLDER), f"pack not in the import-times list:\n{comfy.log_tail()}"
    assert import_problems(log, PACK_FOLDER, also=(str(REPO) + "/",)) == []


def test_a_broken_pack_is_detected(comfy):
    # The negative control: a pack that raises on import, loaded by the same server.
    log = comfy.log()
    assert not custom_node_loaded(log, BROKEN_PACK)
    problems = import_problems(log, BROKEN_PACK)
    assert any("IMPORT FAILED" in p for p in problems) and any("broken on purpose" in p for p in problems), problems


def test_every_pack_node_is_served_as_built_offline(comfy, live_info, pack):
    offline = oi.pack_object_info(pack, PACK_FOLDER)
    assert set(pack.NODE_CLASS_MAPPINGS) <= set(live_info), sorted(set(pack.NODE_CLASS_MAPPINGS) - set(live_info))
    for name, entry in offline.items():
        assert _without_unknown_files(entry, live_info[name]) == entry, name


def test_core_fixture_matches_the_live_server(live_info):
    for name, entry in oi.core_object_info().items():
        assert _without_unknown_files(entry, live_info[name]) == entry, name


def test_offline_object_info_of_every_core_class_matches_live(comfy, live_info):
    offline = oi.core_object_info_in_comfyui(COMFYUI_DIR, COMFYUI_PYTHON, comfy.base_dir)
    assert len(offline) > 300  # every V1 and V3 node of nodes.py and comfy_extras (API nodes aside)
    differing = [name for name, entry in offline.items() if live_info.get(name) != entry]
    assert not differing, differing


def test_js_files_are_served(comfy, pack):
    web_dir = REPO / getattr(pack, "WEB_DIRECTORY", "./js")
    ours = sorted(p.relative_to(web_dir).as_posix() for p in web_dir.rglob("*.js")) if web_dir.is_dir() else []
    listed = sorted(url.split(f"/extensions/{PACK_FOLDER}/", 1)[1] for url in comfy.get_json("/extensions")
                    if url.startswith(f"/extensions/{PACK_FOLDER}/"))
    assert listed == ours
    for rel in ours:
        status, body = comfy.request("GET", f"/extensions/{PACK_FOLDER}/{rel}")
        assert status == 200 and body == (web_dir / rel).read_bytes(), rel


def test_bundled_workflows_are_listed_as_templates(comfy):
    ours = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    templates = comfy.get_json("/api/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == ours
    for stem in ours:
        status, body = comfy.request("GET", f"/api/workflow_templates/{PACK_FOLDER}/{stem}.json")
        assert status == 200 and json.loads(body) == json.loads((REPO / "workflows" / f"{stem}.json").read_text())


WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_bundled_workflow_against_the_live_server(comfy, live_info, path):
    workflow = json.loads(path.read_text())
    unknown = sorted({n["type"] for n in workflow["nodes"]} - set(live_info) - VIRTUAL_TYPES)
    assert not unknown, f"{path.name}: node types this ComfyUI does not have: {unknown}"
    prompt = check_workflow(workflow, live_info, path.name)
    if path.name in QUEUE_WORKFLOWS:
        entry = comfy.run_prompt(prompt, timeout=QUEUE_WORKFLOWS[path.name])
        assert entry["status"]["status_str"] == "success"


# ----------------------------------------------------------------------------------------------------------
# The harness itself: queue, history, websocket events, server-side rejection

def test_run_prompt_records_events(comfy):
    pytest.importorskip("websocket", reason="pip install websocket-client to record ComfyUI's websocket events")
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "2": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact",
                                                                "scale_by": 0.5}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    prompt["1"]["inputs"]["width"] = 64 + 8 * (int(time.time()) % 100)  # never served from ComfyUI's cache
    with comfy.events() as events:
        entry = comfy.run_prompt(prompt, timeout=60, client_id=events.client_id)
        prompt_id = entry["prompt"][1]
        events.wait_for("execution_success", prompt_id=prompt_id)
    types = events.types()
    for expected in ("status", "execution_start", "executing", "executed", "execution_success"):
        assert expected in types, types
    executed = [m["data"]["node"] for m in events.of_type("executed")]
    assert executed == ["3"]
    assert entry["outputs"]["3"]["text"], entry["outputs"]


def test_server_rejections_are_raised(comfy):
    with pytest.raises(PromptRejected) as err:
        comfy.queue_prompt({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 1, "height": 64,
                                                                               "batch_size": 1}}})
    assert "prompt_no_outputs" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# Our files in stock ComfyUI nodes

LORA_MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                "transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.txt_mod.1"]
UNTOUCHED = ["img_in", "txt_in", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.norm_q", "proj_out"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A depth-shrunk Qwen-Image student: real width, 1 block, random bf16 weights, saved by our registry."""
    from dit_distillery.formats import save_safetensors
    from dit_distillery.models.registry import save_dit

    folder = tmp_path_factory.mktemp("student")
    model = interop.random_qwen_image(num_layers=1)
    dit_file = save_dit(model, folder / "qwen_student_1block.safetensors", provenance={"test": "interop"})
    lora = interop.peft_lora_state(model, LORA_MODULES, rank=4, alpha=8.0)
    lora_file = save_safetensors(lora, folder / "qwen_student_lora.safetensors", {})
    state = {k: v for k, v in model.state_dict().items()}
    del model
    return dit_file, lora_file, lora, state


def test_depth_shrunk_student_and_peft_lora_load_in_stock_nodes(comfy, student):
    dit_file, lora_file, lora, state = student
    assert sorted(k for k in lora if "lora_" in k) == sorted(
        f"{m}.lora_{ab}.weight" for m in LORA_MODULES for ab in "AB")  # peft's own key names

    result = interop.comfy_load(comfy, dit_file, lora_file, LORA_MODULES + UNTOUCHED)
    assert "model_type FLUX" in result.log  # Qwen-Image's model type in ComfyUI (comfy/supported_models.py)
    assert result.lora_keys_not_loaded == [], result.log
    assert sorted(result.keys) == sorted(state), "ComfyUI's Qwen-Image has other keys than our 1-block student"

    for module in LORA_MODULES:
        base = state[f"{module}.weight"]
        expected = interop.expected_lora_weight(base, lora, module)
        got = result.weights[module].float()
        tolerance = 1e-6 if result.weights[module].dtype == torch.float32 else 2 ** -8 * expected.abs().max().item()
        assert (expected - base.float()).abs().max() > 100 * tolerance, "the LoRA delta is too small to test"
        assert torch.allclose(got, expected, rtol=0, atol=tolerance), (module, (got - expected).abs().max())
    for module in UNTOUCHED:
        assert torch.equal(result.weights[module].float(), state[f"{module}.weight"].float()), module


def test_unknown_lora_keys_are_reported(comfy, student, tmp_path):
    from dit_distillery.formats import save_safetensors

    dit_file, _, lora, state = student
    wrong = {k.replace("attn.to_q.", "attn.to_qq."): v for k, v in lora.items() if ".attn.to_q." in k}
    wrong_file = save_safetensors(wrong, tmp_path / "wrong_lora.safetensors", {})
    result = interop.comfy_load(comfy, dit_file, wrong_file, ["transformer_blocks.0.attn.to_q"])
    assert sorted(result.lora_keys_not_loaded) == sorted(wrong)
    assert torch.equal(result.weights["transformer_blocks.0.attn.to_q"].float(),
                       state["transformer_blocks.0.attn.to_q.weight"].float())
