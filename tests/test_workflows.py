"""The bundled workflows (`workflows/*.json` + `.jpg`) and the frontend extension (`js/`), checked offline.

Every workflow is converted to the API format the way ComfyUI's frontend does and validated against our nodes'
specs plus the recorded core specs, in a ComfyUI whose model folders hold the files the workflow names (empty
placeholders: only names matter for validation), and with every muted node switched on. Without those files,
the only problems must be the model pickers, which is what a user without the models sees. The recipes the
workflows promise (seed 002/003/004, the quickstart's 50-step CFG-4 teacher and 4-step CFG-1 student) are read
back from the converted prompts. The live-server counterparts are in `tests/test_comfyui_integration.py`.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.comfyui_support import object_info as oi
from tests.comfyui_support.workflow_api import VIRTUAL_TYPES, check_workflow, ui_to_api, validate_prompt

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
EXPECTED = {"quickstart", "shrink_qwen_image", "distill_qwen_image_lora", "aaadit_from_scratch",
            "qwen_image_finetune", "keep_lora_few_step_z_image", "keep_lora_few_step_qwen_image",
            "distill_flux2_klein_4step"}
# Files a user brings (their own LoRA, no download link): a workflow names a placeholder until it is picked.
USER_FILES = {("loras", "my_z_image_lora.safetensors"), ("loras", "my_qwen_image_lora.safetensors")}
BUILTIN_SOURCES = ("default", "tiny:aaadit", "tiny:qwen_image")
FILE_PICKERS = {  # inputs whose options are ComfyUI's model files: what a user without the models gets wrong
    "UNETLoader": ("unet_name",), "CLIPLoader": ("clip_name",), "VAELoader": ("vae_name",),
    "DD_LoadPipeline": ("source", "dit_name", "text_encoder_name", "vae_name"),
    "DD_ShrinkDiT": ("source",), "DD_LoadDiT": ("dit_name",), "DD_LoadStudent": ("weights", "lora"),
    "DD_TrainLoRAFull": ("init_lora",), "DD_ExportTrainingJob": ("init_lora",),
}


def _load(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def model_files(workflow: dict) -> set[tuple[str, str]]:
    """(model folder, name) of everything a workflow needs from ComfyUI's model folders: its nodes'
    `properties.models` entries, Load Pipeline's diffusers folders and the user's own files it names."""
    needed = set()
    for node in workflow["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            needed.add((model["directory"], model["name"]))
        needed |= {(folder, name) for folder, name in USER_FILES if name in node.get("widgets_values", [])}
        if node["type"] == "DD_LoadPipeline" and node["widgets_values"][0] not in BUILTIN_SOURCES:
            needed.add(("diffusers", node["widgets_values"][0]))
    return needed


@pytest.fixture
def comfy_home(tmp_path, monkeypatch):
    """An empty ComfyUI layout our nodes list their model pickers from (nodes/common.py, outside ComfyUI)."""
    monkeypatch.setenv("DIT_DISTILLERY_COMFY_HOME", str(tmp_path))
    return tmp_path


# The stock loaders' pickers (recorded empty) list a model folder as ComfyUI does, plus their fixed entries.
CORE_PICKERS = {"UNETLoader": ("unet_name", "diffusion_models"), "CLIPLoader": ("clip_name", "text_encoders"),
                "VAELoader": ("vae_name", "vae")}


def _specs() -> dict:
    """Node specs as a ComfyUI serves them now (our pickers and the stock loaders' list the current home's files)."""
    info = {**oi.core_object_info(), **oi.pack_object_info(oi.load_pack())}
    home = os.environ.get("DIT_DISTILLERY_COMFY_HOME")
    for node, (name, folder) in CORE_PICKERS.items():
        files = sorted(p.name for p in (Path(home) / "models" / folder).glob("*.safetensors")) if home else []
        info[node]["input"]["required"][name][0] = files + info[node]["input"]["required"][name][0]
    return info


def _provide(home: Path, needed) -> None:
    for folder, name in needed:
        path = home / "models" / folder / name
        if folder == "diffusers":
            path.mkdir(parents=True, exist_ok=True)
            (path / "model_index.json").write_text("{}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")


def _all_on(workflow: dict) -> dict:
    on = copy.deepcopy(workflow)
    for node in on["nodes"]:
        node["mode"] = 0
    return on


def _prompt(name: str, info: dict) -> dict:
    return ui_to_api(_load(name), info, name)


def _by_title(prompt: dict, title: str) -> dict:
    matches = [n["inputs"] for n in prompt.values() if n["_meta"]["title"] == title]
    assert len(matches) == 1, (title, [n["_meta"]["title"] for n in prompt.values()])
    return matches[0]


def _of_type(prompt: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]


# ----------------------------------------------------------------------------------------------------------
# Files

def test_the_workflows_and_their_thumbnails_are_there():
    assert set(NAMES) == EXPECTED
    assert sorted(p.stem for p in WORKFLOW_DIR.glob("*.jpg")) == sorted(NAMES)
    for name in NAMES:
        path = WORKFLOW_DIR / f"{name}.jpg"
        assert path.stat().st_size < 100_000, path
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (768, 768)
            assert len(set(image.convert("L").resize((32, 32)).getdata())) > 8  # a drawing, not a blank


def test_workflows_are_what_the_script_writes():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_workflows
    finally:
        sys.path.remove(str(REPO / "scripts"))
    stale = [name for name in NAMES if make_workflows.render(name) != (WORKFLOW_DIR / f"{name}.json").read_text()]
    assert not stale, f"run python scripts/make_workflows.py (then make_workflow_thumbnails.py): {stale}"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_ui_format_with_a_note(name):
    workflow = _load(name)
    assert workflow["version"] == 0.4 and workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] == max(l[0] for l in workflow["links"])
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and len(notes[0]["widgets_values"][0]) > 300
    ids = {n["id"] for n in workflow["nodes"]}
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        source = next(n for n in workflow["nodes"] if n["id"] == origin)
        sink = next(n for n in workflow["nodes"] if n["id"] == target)
        assert {origin, target} <= ids and link_id in source["outputs"][slot]["links"]
        assert sink["inputs"][target_slot]["link"] == link_id and source["outputs"][slot]["type"] == kind


# ----------------------------------------------------------------------------------------------------------
# Conversion and validation

@pytest.mark.parametrize("name", NAMES)
def test_workflow_validates_where_its_models_exist(name, comfy_home):
    workflow = _load(name)
    _provide(comfy_home, model_files(workflow))
    info = _specs()
    unknown = sorted({n["type"] for n in workflow["nodes"]} - set(info) - VIRTUAL_TYPES)
    assert not unknown, f"no spec for {unknown}: add core nodes with python -m tests.comfyui_support.object_info"
    prompt = check_workflow(workflow, info, name, check_files=True)
    assert any(info[n["class_type"]]["output_node"] for n in prompt.values())
    check_workflow(_all_on(workflow), info, name, check_files=True)  # muted nodes are valid too


@pytest.mark.parametrize("name", NAMES)
def test_without_the_models_only_the_model_pickers_fail(name, comfy_home):
    workflow = _load(name)
    needed = {n for _, n in model_files(workflow)}
    prompt = ui_to_api(_all_on(workflow), _specs(), name)
    problems = validate_prompt(prompt, _specs(), check_files=True)
    for problem in problems:
        node = prompt[problem.node]
        assert problem.kind == "bad_value" and problem.input in FILE_PICKERS.get(node["class_type"], ()), problem
        assert node["inputs"][problem.input] in needed, problem
    assert {prompt[p.node]["inputs"][p.input] for p in problems} == needed


def test_quickstart_needs_no_model_files(comfy_home):
    workflow = _load("quickstart")
    assert model_files(workflow) == set()
    prompt = check_workflow(workflow, _specs(), "quickstart", check_files=True)
    assert [n["source"] for n in _of_type(prompt, "DD_LoadPipeline")] == ["default"]


QWEN_TEMPLATE = {  # ComfyUI's Qwen-Image template: loader -> (widget values, the file's folder)
    "UNETLoader": (["qwen_image_fp8_e4m3fn.safetensors", "fp8_e4m3fn"], "diffusion_models"),
    "CLIPLoader": (["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "default"], "text_encoders"),
    "VAELoader": (["qwen_image_vae.safetensors"], "vae"),
}
QWEN_TEMPLATE_URL = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/{}/{}"
LOADER_OUTPUT = {"UNETLoader": "MODEL", "CLIPLoader": "CLIP", "VAELoader": "VAE"}


@pytest.mark.parametrize("name", ["shrink_qwen_image", "distill_qwen_image_lora", "qwen_image_finetune"])
def test_qwen_workflows_start_from_stock_loaders_with_the_templates_files(name):
    """UNETLoader / CLIPLoader (qwen_image) / VAELoader with the file names of ComfyUI's Qwen-Image template and
    their download links (`properties.models`), into Pipeline from ComfyUI Models, the pipeline of every node of
    ours; Shrink DiT reads the same DiT file (it streams a file)."""
    workflow = _load(name)
    by_id = {n["id"]: n for n in workflow["nodes"]}
    loaders = {n["type"]: n for n in workflow["nodes"] if n["type"] in QWEN_TEMPLATE}
    assert sorted(loaders) == sorted(QWEN_TEMPLATE) and len(loaders) == 3
    (pipeline,) = [n for n in workflow["nodes"] if n["type"] == "DD_PipelineFromComfyModels"]
    for node_type, (values, folder) in QWEN_TEMPLATE.items():
        loader = loaders[node_type]
        assert loader["widgets_values"] == values and loader["mode"] == 0
        url = QWEN_TEMPLATE_URL.format(folder, values[0])
        assert loader["properties"]["models"] == [{"name": values[0], "url": url, "directory": folder}]
        assert loader["properties"]["cnr_id"] == "comfy-core"
        (link,) = [l for l in workflow["links"] if l[1] == loader["id"]]
        assert (link[3], link[5]) == (pipeline["id"], LOADER_OUTPUT[node_type])
    assert not [n for n in workflow["nodes"] if n["type"] == "DD_LoadPipeline"]
    assert model_files(workflow) == {(folder, values[0]) for values, folder in QWEN_TEMPLATE.values()}

    def root(node: dict) -> dict:  # up the `pipeline` inputs to where the pipeline was made
        up = next((i["link"] for i in node["inputs"] if i["name"] == "pipeline"), None)
        return node if up is None else root(by_id[next(l[1] for l in workflow["links"] if l[0] == up)])

    sources = [by_id[origin] for _, origin, _, _, _, kind in workflow["links"] if kind == "DD_PIPELINE"]
    assert len(sources) >= 4 and all(root(node) is pipeline for node in sources)
    for node in workflow["nodes"]:
        if node["type"] == "DD_ShrinkDiT":
            assert node["widgets_values"][0] == "qwen_image_fp8_e4m3fn.safetensors"
            assert node["properties"]["models"] == loaders["UNETLoader"]["properties"]["models"]
    memory = workflow["nodes"][0]["widgets_values"][0].split("### Memory")[1]
    assert "predicted" in memory and "--plan" in workflow["nodes"][0]["widgets_values"][0] and "GiB" in memory


def test_keep_lora_qwen_workflow_names_comfyui_model_files_with_download_links():
    workflow = _load("keep_lora_few_step_qwen_image")
    loaders = [n for n in workflow["nodes"] if n["type"] == "DD_LoadPipeline"]
    assert loaders
    for node in loaders:
        assert node["widgets_values"][1:4] == ["qwen_image_bf16.safetensors", "qwen_2.5_vl_7b.safetensors",
                                               "qwen_image_vae.safetensors"]
        models = {m["name"]: m for m in node["properties"]["models"]}
        assert {m["directory"] for m in models.values()} == {"diffusion_models", "text_encoders", "vae"}
        for file_name, model in models.items():
            assert model["url"].startswith("https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/")
            assert model["url"].endswith(f"/{model['directory']}/{file_name}")


@pytest.mark.parametrize("name, files, repos", [
    ("keep_lora_few_step_z_image", ["z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"],
     ("Comfy-Org/z_image_turbo/",)),
    ("distill_flux2_klein_4step",
     ["flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors"],
     ("Comfy-Org/flux2-klein/", "Comfy-Org/flux2-dev/")),
])
def test_recipe_workflows_name_comfyui_model_files_with_download_links(name, files, repos):
    """ComfyUI's own file names for Z-Image and FLUX.2 [klein], each with its download link; the user's LoRA is the
    only file without one."""
    workflow = _load(name)
    (loader,) = [n for n in workflow["nodes"] if n["type"] == "DD_LoadPipeline"]
    assert loader["widgets_values"][1:4] == files
    for node in workflow["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            urls = tuple(f"https://huggingface.co/{r}" for r in repos + ("Comfy-Org/z_image/",))
            assert model["url"].startswith(urls)
            assert model["url"].endswith(f"/{model['directory']}/{model['name']}")
    assert {m["name"] for m in loader["properties"]["models"]} == set(files)


# ----------------------------------------------------------------------------------------------------------
# The recipes

def test_quickstart_recipe(comfy_home):
    prompt = _prompt("quickstart", _specs())
    teacher = _by_title(prompt, "Train teacher (from scratch)")
    assert teacher["mode"] == "full" and teacher["loss"][0] in prompt
    assert prompt[teacher["loss"][0]]["class_type"] == "DD_FlowMatchingLoss"
    assert prompt[teacher["pipeline"][0]]["class_type"] == "DD_LoadPipeline"
    data = _of_type(prompt, "DD_GenerateDistillDataset")[0]
    assert (data["teacher_steps"], data["teacher_cfg"], data["student_steps"], data["student_cfg"]) == (50, 4.0, 4, 1.0)
    assert data["teacher"][0] == [k for k, v in prompt.items() if v["inputs"] is teacher][0]
    student = _by_title(prompt, "Train student LoRA (Direct Distill)")
    assert student["mode"] == "lora" and prompt[student["loss"][0]]["class_type"] == "DD_DirectDistillLoss"
    assert prompt[student["pipeline"][0]]["inputs"] is teacher  # the student is a LoRA on the trained teacher
    assert (_by_title(prompt, "Student: 4 steps, CFG 1")["steps"], _by_title(prompt, "Teacher: 50 steps, CFG 4")["cfg"]) \
        == (4, 4.0)
    # small enough for a few minutes on two CPU cores
    assert teacher["steps"] * teacher["batch_size"] <= 6000 and student["steps"] * student["batch_size"] <= 100
    assert data["synthetic_prompts"] * data["seeds_per_prompt"] <= 32
    assert _of_type(prompt, "SaveImage") and _of_type(prompt, "PreviewImage")


def test_distill_lora_recipe_is_diffsynths(comfy_home):
    prompt = _prompt("distill_qwen_image_lora", _specs())
    data = _of_type(prompt, "DD_GenerateDistillDataset")[0]
    assert (data["teacher_steps"], data["teacher_cfg"], data["width"], data["height"]) == (40, 4.0, 1328, 1328)
    assert (data["student_steps"], data["student_cfg"], data["rand_device"]) == (4, 1.0, "cpu")
    train = _of_type(prompt, "DD_TrainLoRAFull")[0]
    assert (train["mode"], train["lora_rank"], train["lora_targets"], train["learning_rate"]) == ("lora", 32, "preset", 1e-4)
    from dit_distillery.lora_presets import LORA_PRESETS

    assert LORA_PRESETS["qwen_image"] == ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                                          "to_add_out", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"]
    loss = prompt[train["loss"][0]]
    assert loss["class_type"] == "DD_DirectDistillLoss" and loss["inputs"]["student_steps"] == 0  # the rows' 4 steps
    sample = _of_type(prompt, "DD_Sample")[0]
    assert prompt[sample["pipeline"][0]]["class_type"] == "DD_LoadStudent" and (sample["steps"], sample["cfg"]) == (4, 1.0)


def test_shrink_recipe(comfy_home):
    prompt = _prompt("shrink_qwen_image", _specs())
    shrink = _of_type(prompt, "DD_ShrinkDiT")[0]
    assert (shrink["target_blocks"], shrink["strategy"]) == (20, "importance")
    assert len(shrink["calibration_prompts"].splitlines()) >= 4 and shrink["pipeline"][0] in prompt
    student = _of_type(prompt, "DD_LoadStudent")[0]
    assert prompt[student["dit"][0]]["class_type"] == "DD_ShrinkDiT"
    train = _of_type(prompt, "DD_TrainLoRAFull")[0]
    assert prompt[train["pipeline"][0]]["class_type"] == "DD_LoadStudent" and train["mode"] == "full"
    data = prompt[train["dataset"][0]]
    assert data["class_type"] == "DD_GenerateDistillDataset"
    assert data["inputs"]["teacher"] == student["pipeline"]  # the full 60-block teacher
    assert prompt[train["loss"][0]]["class_type"] == "DD_DirectDistillLoss"


def test_aaadit_recipe_is_the_tutorials(comfy_home):
    prompt = _prompt("aaadit_from_scratch", _specs())
    build = _of_type(prompt, "DD_BuildAAADiT")[0]
    assert build["preset"] == "tutorial" and all(build[k] == 0 for k in ("width", "num_blocks", "num_heads"))
    from dit_distillery.models.aaadit import TUTORIAL_CONFIG

    assert (TUTORIAL_CONFIG["width"], TUTORIAL_CONFIG["num_blocks"]) == (1024, 10)
    data = _of_type(prompt, "DD_DatasetFolder")[0]
    assert (data["sizing"], data["width"], data["height"]) == ("fixed", 256, 256)
    train = _of_type(prompt, "DD_TrainLoRAFull")[0]
    assert (train["mode"], train["learning_rate"], train["batch_size"]) == ("full", 2e-4, 1)
    assert prompt[train["loss"][0]]["class_type"] == "DD_FlowMatchingLoss"
    assert prompt[prompt[train["pipeline"][0]]["inputs"]["dit"][0]]["class_type"] == "DD_BuildAAADiT"


def _source(prompt: dict, inputs: dict, name: str = "pipeline") -> dict:
    return prompt[inputs[name][0]]


def test_keep_lora_z_image_recipe(comfy_home):
    """Teacher = Z-Image Base + your LoRA at 50 steps CFG 4; student = Turbo + your LoRA, a new LoRA trained by
    Direct Distill at the rows' 8 steps CFG 1; teacher | before | after from one prompt and seed."""
    prompt = _prompt("keep_lora_few_step_z_image", _specs())
    (loader,) = _of_type(prompt, "DD_LoadPipeline")
    assert loader["dit_name"] == "z_image_turbo_bf16.safetensors"
    data = _of_type(prompt, "DD_GenerateDistillDataset")[0]
    assert (data["teacher_steps"], data["teacher_cfg"], data["student_steps"], data["student_cfg"]) == (50, 4.0, 8, 1.0)
    teacher = _source(prompt, data, "teacher")
    assert teacher["class_type"] == "DD_LoadStudent"
    assert (teacher["inputs"]["weights"], teacher["inputs"]["lora"]) == ("z_image_bf16.safetensors",
                                                                       "my_z_image_lora.safetensors")
    train = _of_type(prompt, "DD_TrainLoRAFull")[0]
    assert (train["mode"], train["lora_rank"], train["learning_rate"]) == ("lora", 32, 1e-4)
    assert train["validation_prompts"] == ""  # the trainer's teacher column would be Turbo + LoRA, not this teacher
    student = _source(prompt, train)
    assert (student["inputs"]["weights"], student["inputs"]["lora"]) == ("[none]", "my_z_image_lora.safetensors")
    assert _source(prompt, student["inputs"])["inputs"] is loader
    assert _source(prompt, teacher["inputs"])["inputs"] is loader
    loss = _source(prompt, train, "loss")["inputs"]
    assert (loss["student_steps"], loss["student_cfg"]) == (0, -1.0)  # the rows' 8 steps, CFG 1
    samples = {s["_meta"]["title"]: s["inputs"] for s in prompt.values() if s["class_type"] == "DD_Sample"}
    assert {(s["steps"], s["cfg"], s["seed"]) for s in samples.values()} == {(50, 4.0, 0), (8, 1.0, 0)}
    assert _source(prompt, samples["After (repair LoRA): 8 steps, CFG 1"])["class_type"] == "DD_TrainLoRAFull"
    assert _source(prompt, samples["Before: 8 steps, CFG 1"])["inputs"] is student["inputs"]


def test_keep_lora_qwen_image_recipe(comfy_home):
    """Teacher = Qwen-Image + your LoRA at 40 steps CFG 4; student = Qwen-Image + Lightning (merged, saved) + your
    LoRA, trained at 8 steps CFG 1 on Lightning's schedule, which the before/after samples use too."""
    prompt = ui_to_api(_all_on(_load("keep_lora_few_step_qwen_image")), _specs())
    data = _of_type(prompt, "DD_GenerateDistillDataset")[0]
    assert (data["teacher_steps"], data["teacher_cfg"], data["student_steps"], data["student_cfg"]) == (40, 4.0, 8, 1.0)
    assert (data["width"], data["height"]) == (1328, 1328)
    teacher = _source(prompt, data, "teacher")["inputs"]
    assert teacher["lora"] == "my_qwen_image_lora.safetensors" and teacher["weights"] == "[none]"
    for train in _of_type(prompt, "DD_TrainLoRAFull") + _of_type(prompt, "DD_ExportTrainingJob"):
        student = _source(prompt, train)["inputs"]
        assert student["lora"] == "my_qwen_image_lora.safetensors"
        baked = _source(prompt, student)["inputs"]
        assert baked["lora"] == "Qwen-Image-Lightning-8steps-V1.0.safetensors" and baked["export_name"]
        assert _source(prompt, baked) is _source(prompt, teacher)  # the same Qwen-Image pipeline
        assert _source(prompt, train, "loss")["inputs"]["schedule_template"] == "Qwen-Image-Lightning"
    lightning = [n for n in _load("keep_lora_few_step_qwen_image")["nodes"] if n["properties"].get("models") and
                 n["type"] == "DD_LoadStudent"][0]["properties"]["models"][0]
    assert lightning["url"] == ("https://huggingface.co/lightx2v/Qwen-Image-Lightning/resolve/main/"
                                "Qwen-Image-Lightning-8steps-V1.0.safetensors") and lightning["directory"] == "loras"
    few = [s for s in _of_type(prompt, "DD_Sample") if s["steps"] == 8]
    assert len(few) == 2 and all(s["schedule_template"] == "Qwen-Image-Lightning" and s["cfg"] == 1.0 for s in few)


def test_distill_klein_recipe(comfy_home):
    """klein base 4B: teacher 50 steps CFG 4, a LoRA on the same base trained by Direct Distill to 4 steps CFG 1."""
    prompt = _prompt("distill_flux2_klein_4step", _specs())
    data = _of_type(prompt, "DD_GenerateDistillDataset")[0]
    assert (data["teacher_steps"], data["teacher_cfg"], data["student_steps"], data["student_cfg"]) == (50, 4.0, 4, 1.0)
    train = _of_type(prompt, "DD_TrainLoRAFull")[0]
    assert (train["mode"], train["lora_rank"], train["learning_rate"]) == ("lora", 32, 1e-4)
    assert data["teacher"] == train["pipeline"]  # the student is a LoRA on the teacher itself
    assert _source(prompt, train)["inputs"]["dit_name"] == "flux-2-klein-base-4b.safetensors"
    assert _source(prompt, train, "loss")["class_type"] == "DD_DirectDistillLoss"
    student_sample = _by_title(prompt, "Student: 4 steps, CFG 1")
    assert (student_sample["steps"], student_sample["cfg"]) == (4, 1.0)
    assert _source(prompt, student_sample)["class_type"] == "DD_LoadStudent"


def test_finetune_recipes_are_diffsynths(comfy_home):
    prompt = ui_to_api(_all_on(_load("qwen_image_finetune")), _specs())
    trains = {t["mode"]: t for t in _of_type(prompt, "DD_TrainLoRAFull")}
    assert (trains["lora"]["learning_rate"], trains["lora"]["lora_rank"]) == (1e-4, 32)
    assert trains["full"]["learning_rate"] == 1e-5
    data = _of_type(prompt, "DD_DatasetFolder")[0]
    assert (data["sizing"], data["max_pixels"]) == ("buckets", 1048576)
    muted = [n for n in _load("qwen_image_finetune")["nodes"] if n["mode"] == 2]
    assert {n["type"] for n in muted} == {"DD_TrainLoRAFull", "DD_Sample", "SaveImage"}  # full: opt-in


# ----------------------------------------------------------------------------------------------------------
# The frontend extension's event handling, in Node.js with stand-ins for ComfyUI's app/api and the browser

JS_HARNESS = r"""
const store = new Map();
globalThis.sessionStorage = {getItem: (k) => store.has(k) ? store.get(k) : null, setItem: (k, v) => store.set(k, String(v))};
globalThis.requestAnimationFrame = (fn) => setTimeout(fn, 0);
const { app, api, registered } = await import("./scripts/app.js");
const mod = await import("./extensions/dit-distillery/dit_distillery.js");
const ext = registered[0];
await ext.setup();
const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));
const tick = () => new Promise((r) => setTimeout(r, 5));
const out = { name: ext.name, hasHooks: typeof ext.beforeRegisterNodeDef === "function" };
send("dit_distillery.train", { node: "12", prompt_id: "a", phase: "data", step: null, total: 10, history: [] });
send("dit_distillery.train", { node: 12, prompt_id: "a", phase: "train", step: 3, total: 10, loss: 0.5, history: [[1, 0.9], [2, 0.7], [3, 0.5]] });
send("dit_distillery.validation", { node: "12", prompt_id: "a", step: 3,
      url: "/view?filename=v.png&subfolder=dit_distillery%2Frun%2Fvalidation&type=output" });
send("dit_distillery.train", { node: "12", prompt_id: "a", phase: "checkpoint", step: 3, total: 10, history: [] });
send("dit_distillery.train", { node: "99", prompt_id: "a", phase: "train", step: 1, total: 2, loss: 1.0, history: [[1, 1.0]] });
send("dit_distillery.train", null);
send("dit_distillery.validation", { node: "12" });
await tick();
out.first = mod.trainMonitorStates.get("12");
out.other = mod.trainMonitorStates.get("99");
out.saved = JSON.parse(store.get("dit_distillery.monitor.12"));
send("dit_distillery.train", { node: "12", prompt_id: "b", phase: "data", step: null, total: 20, history: [[1, 0.9], [2, 0.7], [3, 0.5]] });
await tick();
out.second = mod.trainMonitorStates.get("12");
// the page was away when run "b" ended: the server's history says so, and its metrics.jsonl has the curve
const requests = [];
let finished = false;
api.fetchApi = async (route) => {
  requests.push(route);
  if (route.startsWith("/history/")) return { ok: true, json: async () => finished ? { b: { status: { status_str: "success", completed: true } } } : {} };
  return { ok: true, text: async () => '{"step": 1, "loss": 0.8}\n{"step": 2, "loss": 0.6, "lr": 1e-4}\n{"step": 3, "lo' };
};
await mod.reconcile("12", null);
out.running = mod.trainMonitorStates.get("12").phase;
finished = true;
await mod.reconcile("12", null);
await tick();
out.caughtUp = mod.trainMonitorStates.get("12");
out.requests = requests;
console.log(JSON.stringify(out));
"""
JS_APP_STUB = """
export const registered = [];
export const app = { registerExtension: (e) => registered.push(e), graph: null };
export const api = new EventTarget();
api.apiURL = (route) => "/api" + route;
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_js_extension_keeps_the_state_of_every_train_node(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(JS_APP_STUB)
    (tmp_path / "scripts" / "api.js").write_text('export { api } from "./app.js";\n')
    (tmp_path / "extensions" / "dit-distillery").mkdir(parents=True)
    shutil.copy(REPO / "js" / "dit_distillery.js", tmp_path / "extensions" / "dit-distillery")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "run.js").write_text(JS_HARNESS)
    result = subprocess.run(["node", "run.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["name"].startswith("dit_distillery.") and out["hasHooks"]
    first = out["first"]
    assert first["phase"] == "checkpoint" and first["step"] == 3 and first["loss"] == 0.5  # an empty history
    assert first["history"] == [[1, 0.9], [2, 0.7], [3, 0.5]]  # in the same run keeps the curve
    assert first["validation"]["step"] == 3 and first["validation"]["prompt_id"] == "a"
    assert out["other"]["step"] == 1  # a node that is not on the canvas: kept for later, no error
    assert out["saved"]["history"] == first["history"]  # survives a page reload (sessionStorage)
    second = out["second"]
    assert second["prompt_id"] == "b" and second["total"] == 20 and second["validation"]["stale"] is True
    assert out["running"] == "data"  # not in the history yet: nothing changes
    caught_up = out["caughtUp"]
    assert caught_up["phase"] == "done" and "away" in caught_up["message"]
    assert caught_up["history"] == [[1, 0.8], [2, 0.6]] and caught_up["step"] == 2  # a torn last line is skipped
    assert out["requests"][-1] == "/view?filename=metrics.jsonl&subfolder=dit_distillery%2Frun&type=output"
