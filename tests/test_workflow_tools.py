"""Offline workflow tools: `/object_info` from V1 classes, UI -> API conversion (frontend 1.27 rules), validation.

The core-node specs come from a real ComfyUI 0.3.64 (`tests/comfyui_support/core_object_info.json`); the
bundled workflows in `workflows/` are converted and validated with these tools in `tests/test_workflows.py`.
"""

import copy

import pytest

from tests.comfyui_support import object_info as oi
from tests.comfyui_support.ui_builder import node as _node, workflow as _workflow
from tests.comfyui_support.workflow_api import WorkflowError, check_workflow, ui_to_api, validate_prompt, widget_layout

CORE = oi.core_object_info()

# Test-only node specs for the cases no core node in the fixture has.
EXTRA = {
    "IntSource": {"input": {"required": {}}, "input_order": {"required": []}, "output": ["INT"],
                  "output_is_list": [False], "output_name": ["INT"], "name": "IntSource", "display_name": "Int Source",
                  "description": "", "python_module": "test", "category": "test", "output_node": False},
    "Knobs": {
        "input": {
            "required": {
                "noise_seed": ["INT", {"default": 0, "min": 0, "max": 100}],  # legacy name: control by default
                "seed": ["INT", {"default": 0, "control_after_generate": False}],  # explicitly no control
                "mode": [["a", "b", "c"], {"control_after_generate": True}],  # combo control: 2 extra values
                "tags": ["COMBO", {"options": ["x", "y", "z"], "multiselect": True}],
                "count": ["INT", {"forceInput": True}],  # socket only
                "image": ["IMAGE"],
            },
            "optional": {"flag": ["BOOLEAN", {"default": False}], "override": ["INT", {"defaultInput": True}]},
        },
        "input_order": {"required": ["noise_seed", "seed", "mode", "tags", "count", "image"],
                        "optional": ["flag", "override"]},
        "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "name": "Knobs",
        "display_name": "Knobs", "description": "", "python_module": "test", "category": "test", "output_node": True,
    },
}
INFO = {**CORE, **EXTRA}


# ----------------------------------------------------------------------------------------------------------
# UI-format workflows (the shapes the frontend saves)

def txt2img():
    """The default SD1.5 graph, as the frontend saves it."""
    nodes = [
        _node(4, "CheckpointLoaderSimple", ["sd15.safetensors"],
              outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [3, 5]), ("VAE", "VAE", [8])]),
        _node(6, "CLIPTextEncode", ["a cat", ], inputs=[("clip", "CLIP", 3)], outputs=[("CONDITIONING", "CONDITIONING", [4])],
              title="Positive"),
        _node(7, "CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP", 5)], outputs=[("CONDITIONING", "CONDITIONING", [6])]),
        _node(5, "EmptyLatentImage", [512, 512, 1], outputs=[("LATENT", "LATENT", [2])]),
        _node(3, "KSampler", [156680208700286, "randomize", 20, 8, "euler", "normal", 1],
              inputs=[("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
                      ("latent_image", "LATENT", 2)], outputs=[("LATENT", "LATENT", [7])]),
        _node(8, "VAEDecode", inputs=[("samples", "LATENT", 7), ("vae", "VAE", 8)], outputs=[("IMAGE", "IMAGE", [9])]),
        _node(9, "SaveImage", ["ComfyUI"], inputs=[("images", "IMAGE", 9)]),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"],
             [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"],
             [9, 8, 0, 9, 0, "IMAGE"]]
    return _workflow(nodes, links)


TXT2IMG_API = {
    "3": {"inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}, "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "4": {"inputs": {"ckpt_name": "sd15.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "6": {"inputs": {"text": "a cat", "clip": ["4", 1]}, "class_type": "CLIPTextEncode", "_meta": {"title": "Positive"}},
    "7": {"inputs": {"text": "blurry", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode", "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
}


def _by_id(workflow, node_id):
    return next(n for n in workflow["nodes"] if n["id"] == node_id)


def _kinds(problems):
    return sorted({p.kind for p in problems})


# ----------------------------------------------------------------------------------------------------------
# object_info from V1 classes

class _FullNode:
    DESCRIPTION = "Does everything."
    CATEGORY = "test/full"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("image", "count")
    OUTPUT_IS_LIST = (False, True)
    OUTPUT_TOOLTIPS = ("the image", "how many")
    OUTPUT_NODE = True
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "mode": (["a", "b"], {"default": "a"})},
                "optional": {"strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0})},
                "hidden": {"unique_id": "UNIQUE_ID"}}


class _BareNode:
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}


def test_object_info_of_a_full_v1_class():
    info = oi.node_info("Full", _FullNode, "Full Node", python_module="custom_nodes.pack")
    assert info == {
        "input": {"required": {"image": ["IMAGE"], "mode": [["a", "b"], {"default": "a"}]},
                  "optional": {"strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0}]},
                  "hidden": {"unique_id": "UNIQUE_ID"}},
        "input_order": {"required": ["image", "mode"], "optional": ["strength"], "hidden": ["unique_id"]},
        "output": ["IMAGE", "INT"], "output_is_list": [False, True], "output_name": ["image", "count"],
        "name": "Full", "display_name": "Full Node", "description": "Does everything.",
        "python_module": "custom_nodes.pack", "category": "test/full", "output_node": True,
        "output_tooltips": ["the image", "how many"], "experimental": True,
    }


def test_object_info_defaults_match_server_py():
    info = oi.object_info({"Bare": _BareNode})["Bare"]
    assert info == {"input": {"required": {}}, "input_order": {"required": []}, "output": ["LATENT"],
                    "output_is_list": [False], "output_name": ["LATENT"], "name": "Bare", "display_name": "Bare",
                    "description": "", "python_module": "nodes", "category": "sd", "output_node": False}


def test_object_info_reproduces_a_live_core_entry():
    class LatentUpscaleBy:  # verbatim from ComfyUI 0.3.64 nodes.py
        upscale_methods = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]

        @classmethod
        def INPUT_TYPES(s):
            return {"required": {"samples": ("LATENT",), "upscale_method": (s.upscale_methods,),
                                 "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01})}}
        RETURN_TYPES = ("LATENT",)
        FUNCTION = "upscale"
        CATEGORY = "latent"

    assert oi.node_info("LatentUpscaleBy", LatentUpscaleBy, "Upscale Latent By") == CORE["LatentUpscaleBy"]


def test_object_info_rejects_what_the_server_could_not_serve():
    class Bad(_BareNode):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": (object(),)}}

    with pytest.raises(TypeError):
        oi.node_info("Bad", Bad)


def test_pack_nodes_have_consistent_object_info():
    pack = oi.load_pack()
    info = oi.pack_object_info(pack)
    assert set(info) == set(pack.NODE_CLASS_MAPPINGS)
    for name, entry in info.items():
        assert entry["python_module"] == "custom_nodes.dit-distillery" or "RELATIVE_PYTHON_MODULE" in vars(
            pack.NODE_CLASS_MAPPINGS[name]), name
        n_out = len(entry["output"])
        assert len(entry["output_name"]) == n_out and len(entry["output_is_list"]) == n_out, name
        for section, names in entry["input_order"].items():
            assert names == list(entry["input"][section]), (name, section)
        widget_layout(entry)  # every input spec is readable by the converter


# ----------------------------------------------------------------------------------------------------------
# UI -> API

def test_txt2img_converts_like_the_frontend():
    assert ui_to_api(txt2img(), INFO) == TXT2IMG_API
    assert validate_prompt(TXT2IMG_API, INFO) == []


def test_upload_widget_value_is_skipped():
    wf = _workflow([_node(1, "LoadImage", ["example.png", "image"], outputs=[("IMAGE", "IMAGE", [1]), ("MASK", "MASK", None)]),
                    _node(2, "PreviewAny", inputs=[("source", "*", 1)])], [[1, 1, 0, 2, 0, "IMAGE"]])
    prompt = ui_to_api(wf, INFO)
    assert prompt["1"]["inputs"] == {"image": "example.png"}
    assert prompt["2"]["inputs"] == {"source": ["1", 0]}
    assert validate_prompt(prompt, INFO) == []


def test_control_widgets_forceinput_and_list_values():
    wf = _workflow([
        _node(1, "IntSource", outputs=[("INT", "INT", [1])]),
        _node(2, "LoadImage", ["example.png", "image"], outputs=[("IMAGE", "IMAGE", [2])]),
        # noise_seed + control, seed (no control), mode + control + filter, tags (list), flag
        _node(3, "Knobs", [7, "fixed", 3, "b", "increment", "", ["x", "z"], True],
              inputs=[("count", "INT", 1), ("image", "IMAGE", 2), ("override", "INT", None)]),
    ], [[1, 1, 0, 3, 0, "INT"], [2, 2, 0, 3, 1, "IMAGE"]])
    layout = [(w.name, w.width) for w in widget_layout(INFO["Knobs"])]
    assert layout == [("noise_seed", 2), ("seed", 1), ("mode", 3), ("tags", 1), ("flag", 1)]
    prompt = ui_to_api(wf, INFO)
    assert prompt["3"]["inputs"] == {"noise_seed": 7, "seed": 3, "mode": "b", "tags": {"__value__": ["x", "z"]},
                                     "flag": True, "count": ["1", 0], "image": ["2", 0]}
    assert validate_prompt(prompt, INFO) == []
    prompt["3"]["inputs"]["tags"] = {"__value__": ["x", "w"]}
    assert _kinds(validate_prompt(prompt, INFO)) == ["bad_value"]


def test_linked_widget_overrides_value_and_primitive_is_inlined():
    wf = txt2img()
    ks = _by_id(wf, 3)
    ks["inputs"] += [{"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 10},
                     {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 11},
                     {"name": "cfg", "type": "FLOAT", "widget": {"name": "cfg"}, "link": None}]
    wf["nodes"] += [_node(10, "PrimitiveNode", [42, "fixed"], outputs=[("INT", "INT", [10])]),
                    _node(11, "IntSource", outputs=[("INT", "INT", [11])])]
    wf["links"] += [[10, 10, 0, 3, 4, "INT"], [11, 11, 0, 3, 5, "INT"]]
    prompt = ui_to_api(wf, INFO)
    assert prompt["3"]["inputs"]["seed"] == 42
    assert prompt["3"]["inputs"]["steps"] == ["11", 0]
    assert prompt["3"]["inputs"]["cfg"] == 8  # unlinked widget input keeps the widget value
    assert "10" not in prompt and prompt["11"]["class_type"] == "IntSource"
    assert validate_prompt(prompt, INFO) == []


def test_reroutes_notes_bypass_and_mute():
    wf = txt2img()
    # VAE through two Reroutes; an upscale between the latent and the sampler, bypassed; notes everywhere.
    wf["links"] = [l for l in wf["links"] if l[0] not in (8, 2)]
    wf["links"] += [[8, 21, 0, 8, 1, "VAE"], [20, 4, 2, 20, 0, "VAE"], [21, 20, 0, 21, 0, "*"],
                    [2, 22, 0, 3, 3, "LATENT"], [22, 5, 0, 22, 0, "LATENT"]]
    wf["nodes"] += [
        _node(20, "Reroute", inputs=[("", "*", 20)], outputs=[("", "VAE", [21])]),
        _node(21, "Reroute", inputs=[("", "*", 21)], outputs=[("", "VAE", [8])]),
        _node(22, "LatentUpscaleBy", ["nearest-exact", 1.5], inputs=[("samples", "LATENT", 22)],
              outputs=[("LATENT", "LATENT", [2])], mode=4),
        _node(23, "Note", ["remember to..."]),
        _node(24, "MarkdownNote", ["# hi"]),
        _node(25, "SaveImage", ["muted"], inputs=[("images", "IMAGE", None)], mode=2),
    ]
    assert ui_to_api(wf, INFO) == TXT2IMG_API


def test_input_from_a_muted_node_is_dropped():
    wf = txt2img()
    _by_id(wf, 5)["mode"] = 2
    prompt = ui_to_api(wf, INFO)
    assert "5" not in prompt and "latent_image" not in prompt["3"]["inputs"]
    problems = validate_prompt(prompt, INFO)
    assert [(p.node, p.kind, p.input) for p in problems] == [("3", "missing_input", "latent_image")]


def test_bypass_with_no_matching_input_drops_the_link():
    wf = txt2img()
    wf["links"] = [l for l in wf["links"] if l[0] != 2] + [[2, 22, 0, 3, 3, "LATENT"]]
    wf["nodes"].append(_node(22, "IntSource", outputs=[("LATENT", "LATENT", [2])], mode=4))
    assert "latent_image" not in ui_to_api(wf, INFO)["3"]["inputs"]


def test_links_in_object_form_and_titles():
    wf = txt2img()
    wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), l)) for l in wf["links"]]
    wf["nodes"].append(_node(30, "LatentConcat", inputs=[("samples1", "LATENT", None), ("samples2", "LATENT", None)],
                             widgets=["-y"]))
    prompt = ui_to_api(wf, INFO)
    assert {k: v for k, v in prompt.items() if k != "30"} == TXT2IMG_API
    assert prompt["30"] == {"inputs": {"dim": "-y"}, "class_type": "LatentConcat", "_meta": {"title": "LatentConcat"}}


@pytest.mark.parametrize("change, kind", [
    (lambda wf: _by_id(wf, 3)["widgets_values"].pop(), "widget_count"),
    (lambda wf: _by_id(wf, 3)["widgets_values"].remove("randomize") or _by_id(wf, 3)["widgets_values"].append(1),
     "widget_count"),  # right length, misaligned: the control word is missing
    (lambda wf: _by_id(wf, 8).update(type="VAEDecodeTurbo"), "unknown_node"),
    (lambda wf: _by_id(wf, 9)["inputs"][0].update(link=99), "bad_link"),
    (lambda wf: wf.update(definitions={"subgraphs": [{"id": "x"}]}), "unsupported"),
])
def test_unconvertible_workflows_raise(change, kind):
    wf = txt2img()
    change(wf)
    with pytest.raises(WorkflowError) as err:
        ui_to_api(wf, INFO, "broken.json")
    assert _kinds(err.value.problems) == [kind]
    assert "broken.json" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# Validation: each kind of error is caught

def _with(change):
    prompt = copy.deepcopy(TXT2IMG_API)
    change(prompt)
    return validate_prompt(prompt, INFO)


@pytest.mark.parametrize("change, kind, node_input", [
    (lambda p: p["3"].update(class_type="KSamplerTurbo"), "unknown_node", None),
    (lambda p: p["3"]["inputs"].update(steps=0), "bad_value", "steps"),  # min 1
    (lambda p: p["3"]["inputs"].update(steps=10001), "bad_value", "steps"),  # max 10000
    (lambda p: p["3"]["inputs"].update(steps=2.5), "bad_value", "steps"),
    (lambda p: p["3"]["inputs"].update(cfg="8"), "bad_value", "cfg"),
    (lambda p: p["3"]["inputs"].update(cfg=True), "bad_value", "cfg"),
    (lambda p: p["3"]["inputs"].update(sampler_name="euler_x"), "bad_value", "sampler_name"),
    (lambda p: p["6"]["inputs"].update(text=3), "bad_value", "text"),
    (lambda p: p["3"]["inputs"].update(model="model.safetensors"), "bad_value", "model"),
    (lambda p: p["3"]["inputs"].update(model=["5", 0]), "type_mismatch", "model"),  # LATENT into MODEL
    (lambda p: p["8"]["inputs"].update(vae=["4", 1]), "type_mismatch", "vae"),  # CLIP into VAE
    (lambda p: p["3"]["inputs"].update(sampler_name=["4", 0]), "type_mismatch", "sampler_name"),
    (lambda p: p["3"]["inputs"].pop("positive"), "missing_input", "positive"),
    (lambda p: p["3"]["inputs"].pop("denoise"), "missing_input", "denoise"),
    (lambda p: p["8"]["inputs"].update(samples=["99", 0]), "bad_link", "samples"),
    (lambda p: p["8"]["inputs"].update(samples=["3", 1]), "bad_link", "samples"),
    (lambda p: p["8"]["inputs"].update(samples=["3", 0, 1]), "bad_link", "samples"),
    (lambda p: p["8"]["inputs"].update(tile_size=512), "unknown_input", "tile_size"),
    (lambda p: p.pop("9"), "no_output", None),
])
def test_validator_catches(change, kind, node_input):
    problems = _with(change)
    assert [p.kind for p in problems] == [kind], problems
    assert problems[0].input == node_input


def test_validator_accepts_hidden_wildcards_and_unions():
    prompt = copy.deepcopy(TXT2IMG_API)
    prompt["9"]["inputs"]["prompt"] = {}  # hidden inputs are allowed
    prompt["10"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}  # "*" takes anything
    assert validate_prompt(prompt, INFO) == []
    info = copy.deepcopy(INFO)
    info["VAEDecode"]["input"]["required"]["samples"][0] = "IMAGE,LATENT"
    assert validate_prompt(prompt, info) == []


def test_file_combos_are_checked_only_when_asked():
    prompt = copy.deepcopy(TXT2IMG_API)  # the fixture's checkpoint list is empty, as in a ComfyUI with no models
    assert validate_prompt(prompt, INFO) == []
    assert _kinds(validate_prompt(prompt, INFO, check_files=True)) == ["bad_value"]


def test_check_workflow_reports_every_problem_at_once():
    wf = txt2img()
    _by_id(wf, 3)["widgets_values"][2] = 0  # steps below min
    _by_id(wf, 5)["widgets_values"][0] = "wide"  # width not an int
    with pytest.raises(WorkflowError) as err:
        check_workflow(wf, INFO, "two_errors.json")
    assert sorted((p.node, p.input) for p in err.value.problems) == [("3", "steps"), ("5", "width")]


# Our bundled workflows are checked in tests/test_workflows.py (with their model files present and absent).
