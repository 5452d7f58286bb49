"""Every node of the pack, called as ComfyUI calls it (inputs -> outputs), on tiny models and the synthetic shapes,
with ComfyUI faked (`fake_comfy`) or absent (`no_comfy`). Training behaviour is in test_nodes_train.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.errors import DistilleryError
from tests.comfyui_support import object_info as oi
from tests.comfyui_support.workflow_api import validate_prompt, widget_layout
from tests.test_nodes_common import call, defaults, fake_comfy, load_pack, no_comfy  # noqa: F401  (fixtures)

NODES = {
    "DD_BuildAAADiT": "Build AAADiT", "DD_ShrinkDiT": "Shrink DiT", "DD_LoadDiT": "Load DiT",
    "DD_LoadPipeline": "Load Pipeline", "DD_ModelSizeReport": "Model Size Report",
    "DD_DatasetFolder": "Dataset (Folder)", "DD_SyntheticShapesDataset": "Synthetic Shapes Dataset",
    "DD_DatasetFromImages": "Dataset from Images", "DD_GenerateDistillDataset": "Generate Distill Dataset",
    "DD_DirectDistillLoss": "Direct Distill Loss", "DD_FlowMatchingLoss": "Flow-Matching Loss",
    "DD_TrainLoRAFull": "Train LoRA / Full", "DD_ExportTrainingJob": "Export Training Job",
    "DD_LossChart": "Loss Chart", "DD_LoadStudent": "Load Student", "DD_Sample": "Sample",
    "DD_EvaluateStudent": "Evaluate Student", "DD_PipelineFromComfyModels": "Pipeline from ComfyUI Models",
    "DD_DMDLoss": "DMD Loss", "DD_TrajectoryLoss": "Trajectory Loss", "DD_PromptsDataset": "Prompts Dataset",
}

# Saved workflows store widget values by position and links by input name and output slot, so these may only
# grow at the end (new optional inputs, new outputs); see the docstring of every nodes/ module.
FROZEN = {
    "DD_BuildAAADiT": (["preset", "width", "num_blocks", "num_heads", "ffn_ratio", "latent_channels", "text_width",
                        "pos_grid", "use_text_mask", "seed", "dtype", "name", "overwrite"], [],
                       [("dit", "DD_DIT"), ("summary", "STRING")]),
    "DD_DatasetFolder": (["folder", "metadata", "sizing", "width", "height", "max_pixels", "repeat", "cache",
                          "on_error", "caption_dropout"], [], [("dataset", "DD_DATASET"), ("summary", "STRING")]),
    "DD_DatasetFromImages": (["images", "captions", "name", "sizing", "width", "height", "max_pixels", "repeat",
                              "cache"], [], [("dataset", "DD_DATASET"), ("summary", "STRING")]),
    "DD_EvaluateStudent": (["student", "prompts", "synthetic_prompts", "seeds_per_prompt", "start_seed", "steps", "cfg",
                            "teacher_steps", "teacher_cfg", "width", "height", "batch_size", "grid_rows", "clip_model"],
                           ["teacher", "teacher_dataset", "baseline"],
                           [("table", "STRING"), ("grid", "IMAGE"), ("report_json", "STRING")]),
    "DD_DirectDistillLoss": (["student_steps", "student_cfg", "schedule_mu", "target", "default_steps",
                              "default_cfg"], ["schedule_template"], [("loss", "DD_LOSS")]),
    "DD_ExportTrainingJob": (["pipeline", "dataset", "loss", "mode", "output_name", "steps", "batch_size",
                              "grad_accum", "learning_rate", "lr_schedule", "warmup_steps", "optimizer",
                              "weight_decay", "grad_clip", "lora_rank", "lora_alpha", "lora_targets", "init_lora",
                              "full_trainable", "gradient_checkpointing", "checkpoint_offload", "mixed_precision", "ema_decay",
                              "save_every", "keep_last", "save_dtype", "validation_prompts", "validation_seeds",
                              "validation_every", "validation_steps", "validation_cfg", "eval_samples", "seed",
                              "resume", "num_processes", "cluster_output_dir"], ["distributed"],
                             [("job_path", "STRING"), ("command", "STRING")]),
    "DD_PromptsDataset": (["prompts", "width", "height", "repeat", "cache", "caption_dropout"], [],
                          [("dataset", "DD_DATASET"), ("summary", "STRING")]),
    "DD_DMDLoss": (["student_steps", "teacher_cfg", "fake_updates", "fake_rank", "fake_learning_rate",
                    "regression_weight", "min_sigma", "max_sigma", "schedule_mu"], [], [("loss", "DD_LOSS")]),
    "DD_TrajectoryLoss": (["student_steps", "student_cfg", "schedule_mu", "weighting", "image_weight"], [],
                          [("loss", "DD_LOSS")]),
    "DD_FlowMatchingLoss": (["sigma_sampling", "weighting", "schedule_mu", "logit_mean", "logit_std", "min_sigma",
                             "max_sigma"], [], [("loss", "DD_LOSS")]),
    "DD_GenerateDistillDataset": (["teacher", "prompts", "synthetic_prompts", "seeds_per_prompt", "start_seed",
                                   "teacher_steps", "teacher_cfg", "negative_prompt", "width", "height",
                                   "student_steps", "student_cfg", "rand_device", "batch_size", "output_name",
                                   "repeat", "cache"], ["record_trajectory"],
                                  [("dataset", "DD_DATASET"), ("preview", "IMAGE"), ("report", "STRING")]),
    "DD_LoadDiT": (["dit_name"], [], [("dit", "DD_DIT"), ("summary", "STRING")]),
    "DD_LoadPipeline": (["source", "dit_name", "text_encoder_name", "vae_name", "text_max_length", "dtype", "device"],
                        ["dit"], [("pipeline", "DD_PIPELINE"), ("summary", "STRING")]),
    "DD_PipelineFromComfyModels": (["model", "clip", "vae"], [], [("pipeline", "DD_PIPELINE"), ("summary", "STRING")]),
    "DD_LoadStudent": (["pipeline", "weights", "lora", "strength", "export_name"], ["dit", "trained_weights"],
                       [("pipeline", "DD_PIPELINE"), ("model", "MODEL"), ("summary", "STRING")]),
    "DD_LossChart": (["loss_history", "smoothing", "log_scale", "width", "height"], [], [("chart", "IMAGE")]),
    "DD_ModelSizeReport": (["preset", "layers", "heads", "height", "width", "batch", "text_tokens", "lora_rank",
                            "lora_targets", "gradient_checkpointing"],
                           ["dit", "pipeline", "plan", "plan_loss", "base_dtype", "budget_gb", "blocks_to_swap"],
                           [("report", "STRING"), ("report_json", "STRING")]),
    "DD_Sample": (["pipeline", "prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "batch_size"],
                  ["schedule_template"], [("images", "IMAGE")]),
    "DD_ShrinkDiT": (["source", "target_blocks", "strategy", "block_list", "keep_first", "heads", "width_method",
                      "calibration_prompts", "calibration_size", "calibration_seed", "dtype", "name", "overwrite"],
                     ["dit", "pipeline"], [("dit", "DD_DIT"), ("report", "STRING")]),
    "DD_SyntheticShapesDataset": (["count", "size", "seed", "repeat", "cache"], ["caption_dropout"],
                                  [("dataset", "DD_DATASET"), ("preview", "IMAGE"), ("summary", "STRING")]),
    "DD_TrainLoRAFull": (["pipeline", "dataset", "loss", "mode", "output_name", "steps", "batch_size", "grad_accum",
                          "learning_rate", "lr_schedule", "warmup_steps", "optimizer", "weight_decay", "grad_clip",
                          "lora_rank", "lora_alpha", "lora_targets", "init_lora", "full_trainable",
                          "gradient_checkpointing", "checkpoint_offload", "mixed_precision", "ema_decay", "save_every", "keep_last",
                          "save_dtype", "validation_prompts", "validation_seeds", "validation_every",
                          "validation_steps", "validation_cfg", "eval_samples", "seed", "resume"], [],
                         [("model", "DD_PIPELINE"), ("weights", "STRING"), ("loss_history", "DD_LOSS_HISTORY"),
                          ("validation", "IMAGE")]),
}


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def info(pack):
    return oi.pack_object_info(pack)


# ----------------------------------------------------------------------------------------------------------
# The pack as ComfyUI sees it

def test_pack_imports_without_comfyui_and_maps_every_node(pack):
    import sys

    assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == NODES
    assert set(pack.NODE_CLASS_MAPPINGS) == set(NODES)
    assert pack.WEB_DIRECTORY == "./js"


def test_every_node_is_documented(info):
    for name, entry in info.items():
        assert name.startswith("DD_") and entry["category"].startswith("DiT Distillery/"), name
        assert len(entry["description"]) > 40, name
        assert len(entry["output_tooltips"]) == len(entry["output"]) == len(entry["output_name"]), name
        for section in ("required", "optional"):
            for input_name, spec in entry["input"].get(section, {}).items():
                assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_input_specs_are_valid_widgets(info):
    for name, entry in info.items():
        layout = widget_layout(entry)  # raises on a spec the frontend could not turn into widgets
        for widget in layout:
            spec = entry["input"].get("required", {}).get(widget.name) or entry["input"]["optional"][widget.name]
            kind, options = spec[0], spec[1]
            if isinstance(kind, list):
                assert options.get("default", kind[0] if kind else None) in kind or not kind, (name, widget.name)
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], (name, widget.name)
        seeds = [w for w in layout if w.control]
        assert [w.name for w in seeds] == (["seed"] if name == "DD_Sample" else []), (name, seeds)


def test_widget_names_are_never_renamed_or_reordered(info):
    assert set(FROZEN) == set(info)
    for name, (required, optional, outputs) in FROZEN.items():
        order = info[name]["input_order"]
        assert order.get("required", [])[:len(required)] == required, name
        assert order.get("optional", [])[:len(optional)] == optional, name
        assert len(order.get("required", [])) == len(required), f"{name}: add new inputs to 'optional'"
        assert list(zip(info[name]["output_name"], info[name]["output"]))[:len(outputs)] == outputs, name


def test_an_api_prompt_of_our_nodes_validates(info):
    everything = {**oi.core_object_info(), **info}
    prompt = {"1": {"class_type": "DD_BuildAAADiT", "inputs": dict(defaults(info_class("DD_BuildAAADiT")),
                                                                   preset="tiny", name="t.safetensors")},
              "2": {"class_type": "DD_ModelSizeReport", "inputs": dict(defaults(info_class("DD_ModelSizeReport")),
                                                                       dit=["1", 0])},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    assert validate_prompt(prompt, everything) == []
    prompt["2"]["inputs"]["pipeline"] = ["1", 0]  # a DiT is not a pipeline
    assert [p.kind for p in validate_prompt(prompt, everything)] == ["type_mismatch"]


def info_class(name):
    return load_pack().NODE_CLASS_MAPPINGS[name]


# ----------------------------------------------------------------------------------------------------------
# Models

def test_build_aaadit_writes_reuses_and_refuses_to_clobber(fake_comfy):
    folder = fake_comfy.base / "models" / "diffusion_models"
    dit, summary = call("DD_BuildAAADiT", preset="tiny", name="mini")
    path = folder / "mini.safetensors"
    assert dit.path == str(path) and dit.family == "aaadit" and dit.config["latent_channels"] == 128
    assert "wrote" in summary
    mtime = path.stat().st_mtime_ns
    seed0 = load_file(str(path))["proj_out.weight"]
    again, summary = call("DD_BuildAAADiT", preset="tiny", name="mini.safetensors")
    assert "reused" in summary and path.stat().st_mtime_ns == mtime and again.config == dit.config
    with pytest.raises(DistilleryError, match="other settings") as err:
        call("DD_BuildAAADiT", preset="tiny", name="mini", seed=1)
    assert err.value.field == "name"
    other, _ = call("DD_BuildAAADiT", preset="tiny", name="mini", seed=1, overwrite=True)
    assert not torch.equal(load_file(str(path))["proj_out.weight"], seed0) and other.provenance["seed"] == 1


def test_build_aaadit_checks_the_config_before_writing(fake_comfy):
    with pytest.raises(DistilleryError):
        call("DD_BuildAAADiT", preset="tiny", width=64, num_heads=5, name="bad")
    assert not (fake_comfy.base / "models" / "diffusion_models" / "bad.safetensors").exists()
    with pytest.raises(DistilleryError) as err:
        call("DD_BuildAAADiT", preset="tiny", name="../../escape")
    assert err.value.field == "name"


def test_tutorial_preset_is_the_tutorials_model(no_comfy):
    from dit_distillery.models.aaadit import TUTORIAL_PARAMS

    text, report_json = call("DD_ModelSizeReport", preset="aaadit", height=256, width=256)
    assert json.loads(report_json)["params"] == TUTORIAL_PARAMS and "aaadit" in text


@pytest.fixture
def qwen_source(fake_comfy):
    """A 4-block tiny Qwen-Image DiT in models/diffusion_models (random values, real key layout)."""
    from dit_distillery.models import qwen_image
    from dit_distillery.shrink.synthetic import write_synthetic_source

    path = fake_comfy.base / "models" / "diffusion_models" / "qwen_tiny.safetensors"
    write_synthetic_source(path, qwen_image.tiny_config(num_layers=4), dtype=torch.float32)
    return path


def test_shrink_dit_depth_then_reuse(qwen_source, fake_comfy):
    dit, report = call("DD_ShrinkDiT", source="qwen_tiny.safetensors", target_blocks=2, name="qwen_2")
    assert dit.family == "qwen_image" and dit.config["num_layers"] == 2
    assert "kept_blocks: [0, 3]" in report and "layers_after: 2" in report
    out = Path(dit.path)
    assert out.parent == fake_comfy.base / "models" / "diffusion_models"
    assert fake_comfy.bar_updates  # progress reached ComfyUI's bar
    mtime = out.stat().st_mtime_ns
    _, report = call("DD_ShrinkDiT", source="qwen_tiny.safetensors", target_blocks=2, name="qwen_2")
    assert "reused: True" in report and out.stat().st_mtime_ns == mtime
    with pytest.raises(DistilleryError, match="other settings"):
        call("DD_ShrinkDiT", source="qwen_tiny.safetensors", target_blocks=3, name="qwen_2")


def test_shrink_dit_from_a_connected_dit_with_width(qwen_source):
    source, _ = call("DD_LoadDiT", dit_name="qwen_tiny.safetensors")
    dit, report = call("DD_ShrinkDiT", source="[dit input]", dit=source, target_blocks=0, heads=2,
                       strategy="first", name="narrow")
    assert dit.config["num_attention_heads"] == 2 and dit.config["num_layers"] == 4
    assert "heads_after: 2" in report
    with pytest.raises(DistilleryError, match="no DiT is connected"):
        call("DD_ShrinkDiT", source="[dit input]", name="x")


def test_shrink_importance_encodes_prompts_with_the_pipeline(qwen_source):
    with pytest.raises(DistilleryError, match="need a pipeline") as err:
        call("DD_ShrinkDiT", source="qwen_tiny.safetensors", target_blocks=2, strategy="importance",
             calibration_prompts="a red circle on a blue background", name="imp")
    assert err.value.field == "calibration_prompts"
    pipe, _ = call("DD_LoadPipeline", source="tiny:qwen_image")
    dit, report = call("DD_ShrinkDiT", source="qwen_tiny.safetensors", target_blocks=2, strategy="importance",
                       calibration_prompts="a red circle on a blue background\na green square on a white background",
                       calibration_size=64, name="imp", pipeline=pipe)
    assert "calibration: provided" in report and dit.provenance["block_scores"]
    _, proxy = call("DD_ShrinkDiT", source="qwen_tiny.safetensors", target_blocks=2, strategy="importance",
                    name="imp_proxy")
    assert "calibration: proxy" in proxy


def test_load_dit_reads_only_the_header(qwen_source):
    dit, summary = call("DD_LoadDiT", dit_name="qwen_tiny.safetensors")
    assert dit.family == "qwen_image" and dit.config["num_layers"] == 4 and "qwen_image" in summary
    with pytest.raises(DistilleryError):
        call("DD_LoadDiT", dit_name="missing.safetensors")
    cls = info_class("DD_LoadDiT")
    before = cls.IS_CHANGED(dit_name="qwen_tiny.safetensors")
    assert before == cls.IS_CHANGED(dit_name="qwen_tiny.safetensors")
    qwen_source.write_bytes(qwen_source.read_bytes() + b"")
    import os
    os.utime(qwen_source, ns=(1, 1))
    assert cls.IS_CHANGED(dit_name="qwen_tiny.safetensors") != before  # a replaced file re-runs the node


def test_load_pipeline_builtin_with_a_built_dit_samples(fake_comfy):
    dit, _ = call("DD_BuildAAADiT", preset="demo", name="demo")
    pipe, summary = call("DD_LoadPipeline", source="default", dit=dit)
    assert "demo.safetensors" in summary and not pipe.loaded()  # nothing is loaded until a node needs it
    images, = call("DD_Sample", pipeline=pipe, prompt="a red circle on a blue background", steps=3, batch_size=2)
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() <= images.max() <= 1
    again, = call("DD_Sample", pipeline=pipe, prompt="a red circle on a blue background", steps=3, batch_size=2)
    assert torch.equal(images, again)  # same seeds, same images
    other, = call("DD_Sample", pipeline=pipe, prompt="a red circle on a blue background", steps=3, seed=5)
    assert not torch.equal(other[0], images[0])
    assert torch.equal(pipe.load().dit.state_dict()["proj_out.weight"], load_file(dit.path)["proj_out.weight"])


def test_load_pipeline_errors_name_the_field(fake_comfy):
    (fake_comfy.base / "models" / "vae" / "v.safetensors").write_bytes(b"")
    with pytest.raises(DistilleryError) as err:
        call("DD_LoadPipeline", source="default", vae_name="v.safetensors")
    assert err.value.field == "source"
    with pytest.raises(DistilleryError) as err:
        call("DD_LoadPipeline", source="not_there")
    assert err.value.field == "source"
    with pytest.raises(DistilleryError) as err:
        call("DD_LoadPipeline", source="default", dit_name="missing.safetensors")
    assert err.value.field == "dit_name"
    aaadit, _ = call("DD_BuildAAADiT", preset="tiny", name="tiny_aaa")
    with pytest.raises(DistilleryError, match="aaadit DiT, but the tiny:qwen_image pipeline is qwen_image") as err:
        call("DD_LoadPipeline", source="tiny:qwen_image", dit=aaadit)
    assert err.value.field == "dit"


def test_diffusers_folders_are_listed_and_loaded(fake_comfy):
    from dit_distillery.pipelines.loading import save_pipeline
    from dit_distillery.tiny import tiny_pipeline

    save_pipeline(tiny_pipeline("aaadit"), fake_comfy.base / "models" / "diffusers" / "tiny_aaa")
    spec = info_class("DD_LoadPipeline").INPUT_TYPES()["required"]["source"][0]
    from dit_distillery import families

    builtins = ["default", *(f"tiny:{name}" for name in families.names())]  # every family's tiny pipeline
    assert spec[:len(builtins)] == builtins and "tiny:qwen_image" in builtins and "tiny_aaa" in spec
    pipe, _ = call("DD_LoadPipeline", source="tiny_aaa")
    text, report_json = call("DD_ModelSizeReport", pipeline=pipe, height=64, width=64)
    assert json.loads(report_json)["family"] == "aaadit" and not pipe.loaded()  # read from config.json only
    images, = call("DD_Sample", pipeline=pipe, prompt="a cat", steps=2)
    assert images.shape[0] == 1


def test_model_size_report_overrides_and_ui_text(no_comfy):
    cls = info_class("DD_ModelSizeReport")
    out = cls().report(**dict(defaults(cls), preset="qwen-image", layers=2, height=256, width=256))
    text, report_json = out["result"]
    report = json.loads(report_json)
    assert report["config"]["num_layers"] == 2 and "with layers 2" in report["source"]
    assert out["ui"]["text"] == [text] and "full training" in text


def test_model_size_report_memory_plan(no_comfy):
    """The optional memory plan: its lines in the text, the plan in the JSON, -1 blocks = the fewest that fit."""
    cls = info_class("DD_ModelSizeReport")
    out = cls().report(**dict(defaults(cls), preset="qwen-image", layers=4, height=256, width=256, plan="lora",
                              plan_loss="direct:2", base_dtype="fp8", budget_gb=2.5, blocks_to_swap=-1))
    text, report_json = out["result"]
    plan = json.loads(report_json)["memory_plan"]
    assert "memory peak" in text and "memory budget" in text
    assert plan["setting"]["steps"] == 2 and plan["setting"]["base_dtype"] == "fp8"
    assert plan["blocks_swapped"] == plan["blocks_needed"] == 4 and plan["fits"]  # 1.97 GiB at 0, 0.32 GiB a block


# ----------------------------------------------------------------------------------------------------------
# Data and losses

def test_dataset_folder_relative_to_input_and_checked(fake_comfy):
    from dit_distillery.data import write_dataset

    write_dataset(fake_comfy.base / "input" / "shapes", 6, size=32)
    dataset, summary = call("DD_DatasetFolder", folder="shapes", sizing="fixed", width=32, height=32, repeat=2)
    assert dataset.rows == 6 and dataset.spec["path"] == str(fake_comfy.base / "input" / "shapes")
    assert dataset.spec["height"] == 32 and dataset.spec["repeat"] == 2 and "6 samples" in summary
    buckets, _ = call("DD_DatasetFolder", folder=str(fake_comfy.base / "input" / "shapes"), max_pixels=512)
    assert buckets.spec["height"] is None and buckets.spec["max_pixels"] == 512
    (fake_comfy.base / "input" / "shapes" / "00001.png").unlink()
    with pytest.raises(DistilleryError, match="line 3"):
        call("DD_DatasetFolder", folder="shapes")
    skipped, summary = call("DD_DatasetFolder", folder="shapes", on_error="skip")
    assert skipped.rows == 5 and "skipped 1" in summary
    with pytest.raises(DistilleryError) as err:
        call("DD_DatasetFolder", folder="")
    assert err.value.field == "folder"


def test_synthetic_shapes_dataset_writes_once_and_previews(fake_comfy):
    dataset, preview, summary = call("DD_SyntheticShapesDataset", count=20, size=32)
    folder = Path(dataset.spec["path"])
    assert folder.parent == fake_comfy.base / "output" / "dit_distillery" / "datasets"
    assert dataset.spec["synthetic"] == {"count": 20, "size": 32, "seed": 0} and dataset.rows == 20
    assert preview.shape == (16, 32, 32, 3)
    mtime = (folder / "metadata.csv").stat().st_mtime_ns
    call("DD_SyntheticShapesDataset", count=20, size=32)
    assert (folder / "metadata.csv").stat().st_mtime_ns == mtime


def test_dataset_from_images(fake_comfy):
    images = torch.rand(3, 32, 48, 3)
    dataset, summary = call("DD_DatasetFromImages", images=images, captions="a\nb\nc", name="mine")
    folder = fake_comfy.base / "output" / "dit_distillery" / "datasets" / "mine"
    assert dataset.spec["path"] == str(folder) and dataset.rows == 3
    assert (folder / "metadata.csv").read_text().splitlines() == ["image,prompt", "00000.png,a", "00001.png,b",
                                                                  "00002.png,c"]
    one, _ = call("DD_DatasetFromImages", images=images, captions="same for all", name="mine")
    assert one.rows == 3
    with pytest.raises(DistilleryError) as err:
        call("DD_DatasetFromImages", images=images, captions="a\nb", name="mine")
    assert err.value.field == "captions"


def test_dmd_and_trajectory_loss_nodes_build_the_cores_losses():
    from dit_distillery.losses import DMDLoss, TrajectoryLoss, loss_from_dict

    dmd, = call("DD_DMDLoss")
    loss = loss_from_dict(dmd)
    assert isinstance(loss, DMDLoss) and (loss.steps, loss.fake_updates, loss.fake_lr) == (4, 5, None)
    one, = call("DD_DMDLoss", student_steps=1, fake_learning_rate=1e-5, regression_weight=0.5)
    assert (loss_from_dict(one).steps, loss_from_dict(one).fake_lr, one["regression_weight"]) == (1, 1e-5, 0.5)
    with pytest.raises(DistilleryError, match="min_sigma"):
        call("DD_DMDLoss", min_sigma=0.9, max_sigma=0.1)
    path, = call("DD_TrajectoryLoss")
    loss = loss_from_dict(path)
    assert isinstance(loss, TrajectoryLoss) and loss.steps is None and loss.cfg is None and loss.image_weight == 0
    fixed, = call("DD_TrajectoryLoss", student_steps=2, student_cfg=1.0, weighting="diffsynth")
    assert (fixed["steps"], fixed["cfg"], fixed["weighting"]) == (2, 1.0, "diffsynth")


def test_loss_nodes_describe_the_cores_losses():
    from dit_distillery.losses import DirectDistillLoss, FlowMatchingLoss, loss_from_dict

    flow, = call("DD_FlowMatchingLoss")
    assert isinstance(loss_from_dict(flow), FlowMatchingLoss) and flow["sigma_sampling"] == "diffsynth"
    distill, = call("DD_DirectDistillLoss")
    loss = loss_from_dict(distill)
    assert isinstance(loss, DirectDistillLoss) and loss.steps is None and loss.cfg is None
    fixed, = call("DD_DirectDistillLoss", student_steps=4, student_cfg=1.0)
    assert (fixed["steps"], fixed["cfg"]) == (4, 1.0)
    with pytest.raises(DistilleryError):
        call("DD_FlowMatchingLoss", min_sigma=0.8, max_sigma=0.2)


def test_generate_distill_dataset_then_distill(fake_comfy):
    small, _ = call("DD_BuildAAADiT", preset="demo", width=32, num_blocks=1, num_heads=2, name="small")
    teacher, _ = call("DD_LoadPipeline", source="default", dit=small)
    dataset, preview, report = call("DD_GenerateDistillDataset", teacher=teacher, synthetic_prompts=3,
                                    teacher_steps=2, student_steps=2, batch_size=2, output_name="distill")
    folder = fake_comfy.base / "output" / "dit_distillery" / "datasets" / "distill"
    assert dataset.rows == 3 and dataset.spec["path"] == str(folder) and preview.shape == (3, 32, 32, 3)
    assert "3 written" in report and dataset.spec["height"] == 32
    assert fake_comfy.bar_updates[-1][:2] == (3, 3)  # progress per image
    _, _, again = call("DD_GenerateDistillDataset", teacher=teacher, synthetic_prompts=3, teacher_steps=2,
                       student_steps=2, batch_size=2, output_name="distill")
    assert "0 written, 3 already there" in again
    loss, = call("DD_DirectDistillLoss")
    model, weights, history, _ = call("DD_TrainLoRAFull", pipeline=teacher, dataset=dataset, loss=loss,
                                      output_name="distilled", steps=2, batch_size=1, lora_rank=4, save_every=0)
    assert len(history["history"]) == 2 and Path(weights).is_file()


def test_generate_distill_dataset_prompts_from_a_file(fake_comfy):
    (fake_comfy.base / "input" / "prompts.txt").write_text("# teacher prompts\na red circle on a blue background\n")
    teacher, _ = call("DD_LoadPipeline", source="default")
    dataset, _, _ = call("DD_GenerateDistillDataset", teacher=teacher, prompts="prompts.txt", teacher_steps=1,
                         student_steps=1, output_name="from_file")
    assert dataset.rows == 1
    with pytest.raises(DistilleryError) as err:
        call("DD_GenerateDistillDataset", teacher=teacher, output_name="none")
    assert err.value.field == "prompts"


# ----------------------------------------------------------------------------------------------------------
# Students, export, charts

@pytest.fixture
def trained_lora(fake_comfy):
    dataset, _, _ = call("DD_SyntheticShapesDataset", count=8, size=32)
    small, _ = call("DD_BuildAAADiT", preset="demo", width=32, num_blocks=1, num_heads=2, name="small")
    base, _ = call("DD_LoadPipeline", source="default", dit=small)
    loss, = call("DD_FlowMatchingLoss")
    model, weights, history, _ = call("DD_TrainLoRAFull", pipeline=base, dataset=dataset, loss=loss, steps=3,
                                      batch_size=2, learning_rate=1e-2, lora_rank=4, save_every=0,
                                      output_name="lora_run")
    return base, model, Path(weights), history, dataset, loss


def test_load_student_merges_a_lora_and_exports(trained_lora, fake_comfy):
    base, _, weights, _, _, _ = trained_lora
    assert weights == fake_comfy.base / "models" / "loras" / "lora_run.safetensors"
    cls = info_class("DD_LoadStudent")
    prompt = {"9": {"class_type": "DD_LoadStudent", "inputs": {}},
              "10": {"class_type": "DD_Sample", "inputs": {"pipeline": ["9", 0]}}}
    student, model, summary = call("DD_LoadStudent", pipeline=base, lora="lora_run.safetensors",
                                   export_name="student_merged", unique_id="9", prompt=prompt)
    assert model is None  # nothing reads the MODEL output, so none was built
    assert "LoRA lora_run.safetensors" in summary and "ComfyUI has no aaadit" in summary
    in_memory, _, _ = call("DD_LoadStudent", pipeline=base, lora="lora_run.safetensors", unique_id="9", prompt=prompt)
    merged = in_memory.load().dit.state_dict()
    original = base.load().dit.state_dict()
    changed = [k for k in original if not torch.equal(original[k], merged[k])]
    assert changed and all(k.startswith("blocks.") for k in changed)
    exported = fake_comfy.base / "models" / "diffusion_models" / "student_merged.safetensors"
    assert exported.is_file() and set(load_file(str(exported))) == set(original)
    # with export_name the pipeline continues from the exported file (bf16 here, read back into fp32)
    assert student.dit == str(exported) and not student.loras
    from_file = load_file(str(exported))
    assert all(torch.equal(v, from_file[k].float()) for k, v in student.load().dit.state_dict().items())
    half, _, _ = call("DD_LoadStudent", pipeline=base, lora="lora_run.safetensors", strength=0.0, unique_id="9",
                      prompt=prompt)
    assert all(torch.equal(v, half.load().dit.state_dict()[k]) for k, v in original.items())
    with pytest.raises(DistilleryError, match="Sample node"):
        call("DD_LoadStudent", pipeline=base, lora="lora_run.safetensors", unique_id="9",
             prompt={**prompt, "11": {"class_type": "KSampler", "inputs": {"model": ["9", 1]}}})
    assert cls.IS_CHANGED(lora="lora_run.safetensors") == cls.IS_CHANGED(lora="lora_run.safetensors")


def test_load_student_takes_trains_weights_output(trained_lora, fake_comfy, tmp_path):
    base, _, weights, _, _, _ = trained_lora
    by_name, _, _ = call("DD_LoadStudent", pipeline=base, lora="lora_run.safetensors", unique_id="9", prompt={})
    wired, _, summary = call("DD_LoadStudent", pipeline=base, trained_weights=str(weights), unique_id="9", prompt={})
    a, b = by_name.load().dit.state_dict(), wired.load().dit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(weights.read_bytes())
    with pytest.raises(DistilleryError, match="trained_weights"):
        call("DD_LoadStudent", pipeline=base, trained_weights=str(outside), unique_id="9", prompt={})


def test_synthetic_shapes_caption_dropout_reaches_the_job():
    dataset, _, _ = call("DD_SyntheticShapesDataset", count=8, size=32, caption_dropout=0.1)
    assert dataset.data_spec()["caption_dropout"] == 0.1


def test_load_student_with_shrunk_weights(qwen_source):
    shrunk, _ = call("DD_ShrinkDiT", source="qwen_tiny.safetensors", target_blocks=2, name="qwen_2")
    base, _ = call("DD_LoadPipeline", source="tiny:qwen_image")
    student, model, summary = call("DD_LoadStudent", pipeline=base, dit=shrunk, unique_id="1", prompt={})
    assert model is None and student.load().dit.config.num_layers == 2
    assert "loads in stock UNETLoader" not in summary  # tiny width: not Qwen-Image's 24 x 128 heads
    images, = call("DD_Sample", pipeline=student, prompt="a cat", steps=2, width=32, height=32)
    assert images.shape == (1, 32, 32, 3)


def test_export_training_job_writes_a_loadable_job(trained_lora, fake_comfy):
    from dit_distillery.trainer import TrainJob

    base, model, weights, _, dataset, loss = trained_lora
    cls = info_class("DD_ExportTrainingJob")
    out = cls().export(**dict(defaults(cls), pipeline=model, dataset=dataset, loss=loss, output_name="cluster",
                              num_processes=8, steps=5000))
    job_path, command = out["result"]
    assert Path(job_path) == fake_comfy.base / "output" / "dit_distillery" / "jobs" / "cluster.json"
    job = TrainJob.load(job_path)
    assert job.steps == 5000 and job.output.dir == "out/cluster" and job.model.pipeline == "default"
    assert job.lora.preset == str(weights)  # training continues on top of the trained LoRA, merged first
    assert job.data.synthetic == {"count": 8, "size": 32, "seed": 0} and job.data.path is None
    config = Path(job_path).with_name("cluster.accelerate.yaml")
    assert command == f"accelerate launch --config_file {config} -m dit_distillery train {job_path}"
    assert "distributed_type: MULTI_GPU" in config.read_text() and "num_processes: 8" in config.read_text()
    assert Path(job_path).with_suffix(".sh").read_text().strip().endswith(command)
    assert out["ui"]["text"][0].startswith("job: ")
    # sharded full training: the job says so and the config launches FSDP2; a LoRA is refused by name
    out = cls().export(**dict(defaults(cls), pipeline=model, dataset=dataset, loss=loss, output_name="cluster",
                              num_processes=8, mode="full", distributed="fsdp"))
    assert TrainJob.load(out["result"][0]).distributed == "fsdp"
    assert "distributed_type: FSDP" in config.read_text() and "fsdp_version: 2" in config.read_text()
    with pytest.raises(DistilleryError) as err:
        cls().export(**dict(defaults(cls), pipeline=model, dataset=dataset, loss=loss, num_processes=8,
                            distributed="fsdp"))
    assert err.value.field == "distributed"


def test_export_explains_what_a_job_cannot_express(fake_comfy):
    dataset, _, _ = call("DD_SyntheticShapesDataset", count=4, size=32)
    pipe, _ = call("DD_LoadPipeline", source="default", text_max_length=16)
    loss, = call("DD_FlowMatchingLoss")
    with pytest.raises(DistilleryError, match="text_max_length") as err:
        call("DD_ExportTrainingJob", pipeline=pipe, dataset=dataset, loss=loss)
    assert err.value.fix


def test_loss_chart_draws_the_history(trained_lora):
    history = trained_lora[3]
    chart, = call("DD_LossChart", loss_history=history, width=320, height=200)
    assert chart.shape == (1, 200, 320, 3) and chart.std() > 0
    empty, = call("DD_LossChart", loss_history={"history": [], "eval": [], "title": "nothing"})
    assert empty.shape == (1, 360, 640, 3)
