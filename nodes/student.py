"""Student nodes: Load Student (base + full weights and/or LoRA -> our pipeline and a ComfyUI MODEL) and Sample.

Sample draws with our pipeline, so it works for every family, AAADiT included (ComfyUI's KSampler has no AAADiT).
Load Student's MODEL output is for students of the families ComfyUI knows (Qwen-Image), in stock samplers: one
stock ComfyUI loads (`Family.comfy_loadable`, e.g. a depth-shrunk Qwen-Image) is loaded exactly as UNETLoader loads a
file; another (a width-shrunk Qwen-Image: fewer heads than the 24 ComfyUI's detector assumes) is built from an
explicit config (`Family.comfy_model_config`, comfyui-facts.md A5). It is built only when something reads it.

Input names and their order are part of every saved workflow: never rename, remove or reorder them; add new inputs
at the end of "optional".
"""

from __future__ import annotations

import os

import torch

from dit_distillery import schedule
from dit_distillery.errors import DistilleryError

from .common import (DIT, NONE, PIPELINE, STUDENT_CATEGORY, Progress, comfy_module, find_model, list_models,
                     model_dirs, model_write_dir, output_connected, path_inside, pixels_to_image, stat_key, user_errors)

MODEL_SLOT = 1  # index of Load Student's MODEL output
PIPELINE_SCHEDULE = "pipeline"  # Sample's schedule_template: the pipeline's own
EXPORT_DTYPE = torch.bfloat16  # export_name's files


class LoadStudent:
    DESCRIPTION = ("Loads a trained or shrunk student: the base pipeline with its DiT replaced by full weights "
                   "(Shrink DiT or full training) and/or a LoRA merged at a strength. Returns our pipeline (for "
                   "Sample, more training) and, for Qwen-Image students, a ComfyUI MODEL for stock samplers. "
                   "export_name also saves the merged DiT to models/diffusion_models (stock UNETLoader loads it "
                   "when the student keeps Qwen-Image's width), and the pipeline output then uses that file.")
    CATEGORY = STUDENT_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PIPELINE, "MODEL", "STRING")
    RETURN_NAMES = ("pipeline", "model", "summary")
    OUTPUT_TOOLTIPS = ("The student as our pipeline (Sample, Train).",
                       "The student's DiT as a ComfyUI MODEL (Qwen-Image family only), for KSampler & co.",
                       "What was loaded, and whether stock ComfyUI can load the exported file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "The base: gives the text encoder and VAE, and the DiT unless "
                                        "weights replace it."}),
                "weights": ([NONE] + list_models("diffusion_models"), {"tooltip":
                            "Student DiT file replacing the base's (a shrunk or fully trained student)."}),
                "lora": ([NONE] + list_models("loras"), {"tooltip": "LoRA file merged on top (ours, DiffSynth's, "
                         "diffusers' or kohya-named)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip":
                             "LoRA strength (1 = as trained, 0 = off)."}),
                "export_name": ("STRING", {"default": "", "tooltip":
                                "If set, save the student's DiT (LoRA merged, bf16) as models/diffusion_models/<name>, "
                                "and continue from that file: a Train node after it merges one more LoRA of its own "
                                "(e.g. Qwen-Image + a Lightning LoRA exported here, then your LoRA)."}),
            },
            "optional": {
                "dit": (DIT, {"tooltip": "Student DiT from another node (Shrink DiT, Load DiT); wins over weights."}),
                "trained_weights": ("STRING", {"forceInput": True, "tooltip":
                                    "Connect Train's `weights` output: a LoRA file is merged at `strength` (instead "
                                    "of `lora`), a full DiT file replaces the base's DiT (instead of `weights`)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, weights=NONE, lora=NONE, export_name="", **_):
        paths = []
        for kind, name in (("diffusion_models", weights), ("loras", lora)):
            if name and name != NONE:
                try:
                    paths.append(find_model(kind, name, kind))
                except DistilleryError:
                    paths.append(name)
        return f"{stat_key(*paths)}|{export_name}"

    def load(self, pipeline, weights, lora, strength, export_name, dit=None, trained_weights=None, unique_id=None,
             prompt=None):
        from dit_distillery import families
        from dit_distillery.student import export_comfy
        from dit_distillery.velocity import base_model

        ref = pipeline
        weights_path = dit.path if dit is not None else (None if weights in (None, "", NONE)
                                                         else str(find_model("diffusion_models", weights, "weights")))
        lora_path = None if lora in (None, "", NONE) else str(find_model("loras", lora, "lora"))
        if trained_weights:
            kind, path = _trained_file(trained_weights)
            if kind == "lora":
                lora_path = path
            else:
                weights_path = path
        if weights_path is not None:
            ref = ref.with_dit(weights_path)
        if lora_path is not None:
            ref = ref.with_lora(lora_path, float(strength))
        exported = None
        if str(export_name).strip():
            exported = path_inside(model_write_dir("diffusion_models"), export_name, "export_name", ".safetensors")
        with user_errors():
            pipe = ref.load()
            dit_module = base_model(pipe.dit)
            family, config, _ = families.detect(dit_module)
            spec = families.get(family)
            loadable, note = spec.comfy_loadable(config)
            lines = [ref.describe(), f"{family}, {sum(p.numel() for p in dit_module.parameters()):,} parameters"]
            if exported is not None:
                info = export_comfy(pipe, exported, dtype=EXPORT_DTYPE, provenance={
                    "exported_by": "DiT Distillery Load Student", "student": ref.describe()})
                lines.append(f"saved {info['path']}: {info['note']}")
                # downstream: one DiT file, nothing left to merge; the merged DiT in memory is that file when it
                # has the file's dtype (bf16, as on a GPU), else the file is read back
                ref = pipeline.saved_as(str(exported), pipe if pipe.dtype == EXPORT_DTYPE else None)
            else:
                lines.append(note)
            model = None
            if output_connected(prompt, unique_id, MODEL_SLOT):
                if spec.comfy_model_config(config) is None:
                    raise DistilleryError("model", family, "ComfyUI has no model class for this family, so the MODEL "
                                          "output cannot be made.",
                                          "disconnect the MODEL output and draw images with the Sample node.")
                model = comfy_model(dit_module, config, loadable)
        return (ref, model, "\n".join(lines))


def _trained_file(path: str) -> tuple[str, str]:
    """("lora" | "dit", path) of a file Train wrote; only files inside ComfyUI's loras/diffusion_models folders."""
    from dit_distillery.formats import TensorSource

    real = os.path.realpath(path)
    for kind in ("loras", "diffusion_models"):
        for root in model_dirs(kind):
            root = os.path.realpath(root)
            if os.path.commonpath([root, real]) == root and os.path.isfile(real):
                with TensorSource(real, "trained_weights", prefixes=()) as src:
                    is_lora = src.metadata.get("dit_distillery.kind") == "lora" or any(
                        k.endswith(".lora_A.weight") for k in src.keys())
                return ("lora" if is_lora else "dit"), real
    raise DistilleryError("trained_weights", path, "is not a file in ComfyUI's loras or diffusion_models folders.",
                          "connect the `weights` output of Train LoRA / Full.")


def comfy_model(dit: torch.nn.Module, config: dict, loadable: bool):
    """A ComfyUI ModelPatcher for a DiT of a family ComfyUI knows (module docstring); our module is only read,
    never shared. Its tensor names and ComfyUI model class are the family's (`Family.to_comfy`,
    `Family.comfy_model_config`)."""
    from dit_distillery import families

    family = families.of_model(dit)
    sd_module = comfy_module("comfy.sd")
    if sd_module is None:
        raise DistilleryError("model", "MODEL", "only ComfyUI can make a MODEL.", "run this node inside ComfyUI.")
    # ComfyUI copies these into its own model
    state = family.to_comfy({k: v.detach() for k, v in dit.state_dict().items()})
    if loadable:
        model = sd_module.load_diffusion_model_state_dict(state)  # exactly what UNETLoader does with a file
        if model is None:
            raise DistilleryError("model", family.name, "ComfyUI did not recognise the student.",
                                  f"update ComfyUI to a version that knows {family.title}.")
        return model
    mm = comfy_module("comfy.model_management")
    supported = comfy_module("comfy.supported_models")
    patcher = comfy_module("comfy.model_patcher")
    class_name, unet_config = family.comfy_model_config(config)
    model_config = getattr(supported, class_name)(unet_config)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    params = sum(v.numel() for v in state.values())
    weight_dtype = next(iter(state.values())).dtype
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(model_config.supported_inference_dtypes),
                          weight_dtype=weight_dtype)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                model_config.supported_inference_dtypes))
    model = model_config.get_model(state, "").to(offload_device)
    model.load_model_weights(state, "")
    return patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class Sample:
    DESCRIPTION = ("Draws images with a pipeline (any family: AAADiT, Qwen-Image, students) using DiffSynth's noise "
                   "and schedules, so a seed gives the image DiffSynth would. Shows progress; Cancel stops it.")
    CATEGORY = STUDENT_CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The images (one per seed).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": (PIPELINE, {"tooltip": "The pipeline to sample (Load Pipeline, Load Student, Train)."}),
                "prompt": ("STRING", {"multiline": True, "default": "a red circle on a blue background",
                                      "tooltip": "The prompt."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Negative prompt (used when cfg is not 1)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 63 - 1, "tooltip":
                         "Seed of the first image; image i uses seed + i."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                          "Sampling steps; 0 = the pipeline's default (Qwen-Image 50, AAADiT 30, demo 20)."}),
                "cfg": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 50.0, "step": 0.1, "tooltip":
                        "Classifier-free guidance; -1 = the pipeline's default; 1 = off (half the compute)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                  "tooltip": "Image width; 0 = the pipeline's default."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                   "tooltip": "Image height; 0 = the pipeline's default."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Number of images."}),
            },
            "optional": {
                "schedule_template": ([PIPELINE_SCHEDULE, *schedule.templates()], {
                    "default": PIPELINE_SCHEDULE, "tooltip": "Sigma schedule: the pipeline's own, or another one "
                    "(Qwen-Image-Lightning for a student trained on it: Direct Distill Loss's schedule_template)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, pipeline, prompt, negative_prompt, seed, steps, cfg, width, height, batch_size, unique_id=None,
               schedule_template=PIPELINE_SCHEDULE):
        if not str(prompt).strip():
            raise DistilleryError("prompt", prompt, "is empty.", "type what the image should show.")
        seeds = [int(seed) + i for i in range(int(batch_size))]
        with user_errors():
            pipe = pipeline.load()
        steps = steps or pipe.defaults["steps"]
        sigmas = None
        if schedule_template not in (None, "", PIPELINE_SCHEDULE):  # at the size sampled, as the pipeline's own
            with user_errors():
                sigmas = schedule.sigmas(schedule_template, steps, image_seq_len=pipe.image_seq_len(
                    height or pipe.defaults["height"], width or pipe.defaults["width"]))
        progress = Progress(steps * len(seeds), unique_id)
        with user_errors(progress):
            result = pipe.sample(str(prompt), seeds=seeds, steps=steps, cfg_scale=None if cfg < 0 else float(cfg),
                                 negative_prompt=str(negative_prompt), height=height or None, width=width or None,
                                 callback=progress.sampler_callback, stop=progress.stop, batch_size=1, sigmas=sigmas)
        return (pixels_to_image(result.pixels),)


NODE_CLASS_MAPPINGS = {"DD_LoadStudent": LoadStudent, "DD_Sample": Sample}
NODE_DISPLAY_NAME_MAPPINGS = {"DD_LoadStudent": "Load Student", "DD_Sample": "Sample"}
