"""Model nodes: Build AAADiT, Shrink DiT, Load DiT, Load Pipeline, Model Size Report.

Input names and their order are part of every saved workflow (ComfyUI stores widget values by position and links
by name): never rename, remove or reorder them; add new inputs at the end of "optional".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dit_distillery.errors import DistilleryError
from dit_distillery.models import aaadit_presets

from .common import (DIT, MODELS_CATEGORY, NONE, PIPELINE, Progress, check_relative, find_model, list_diffusers_folders,
                     list_models, lines, model_dirs, model_write_dir, path_inside, resolve_name, stat_key, user_errors)
from .refs import BUILTIN_PIPELINES, DTYPES, DitRef, PipelineRef, check_base_dtype, memory_inputs, swap_setting

FROM_INPUT = "[dit input]"  # Shrink DiT's source when the DiT comes from the `dit` socket


# ----------------------------------------------------------------------------------------------------------
# Build AAADiT

# The presets are the core's table (the CLI's `build-aaadit --preset` uses the same one).
AAADIT_PRESETS = tuple(aaadit_presets.PRESETS)
_AAADIT_FIELDS = ("width", "num_blocks", "num_heads", "ffn_ratio", "latent_channels", "text_width")


class BuildAAADiT:
    DESCRIPTION = ("Builds a randomly initialised AAADiT, the 0.1B text-to-image DiT of DiffSynth-Studio's "
                   "train-from-scratch tutorial (or a smaller one), and saves it to models/diffusion_models. "
                   "Re-running with the same settings reuses the file.")
    CATEGORY = MODELS_CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (DIT, "STRING")
    RETURN_NAMES = ("dit", "summary")
    OUTPUT_TOOLTIPS = ("The saved DiT (connect to Load Pipeline's dit, Model Size Report or Train).",
                       "Parameters, config and file.")

    @classmethod
    def INPUT_TYPES(cls):
        size = lambda what: ("INT", {"default": 0, "min": 0, "max": 65536,  # noqa: E731
                                     "tooltip": f"{what}; 0 keeps the preset's."})
        return {"required": {
            "preset": (list(AAADIT_PRESETS), {"default": "tutorial", "tooltip": aaadit_presets.describe_presets()}),
            "width": size("Hidden width"),
            "num_blocks": size("Number of transformer blocks"),
            "num_heads": size("Attention heads (must divide the width)"),
            "ffn_ratio": size("MLP width / width"),
            "latent_channels": size("Latent channels of the VAE/codec"),
            "text_width": size("Width of the text encoder's embeddings"),
            "pos_grid": ("STRING", {"default": "", "tooltip": "Learned position grid HxW, e.g. 16x16 (resized to any "
                                    "image size); empty keeps the preset's."}),
            "use_text_mask": ("BOOLEAN", {"default": False, "tooltip": "Mask padded prompt tokens in attention (the "
                                          "tutorial attends to them)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 32 - 1, "control_after_generate": False,
                             "tooltip": "Seed of the random initialisation."}),
            "dtype": (["fp32", "bf16"], {"default": "fp32", "tooltip": "dtype of the saved weights."}),
            "name": ("STRING", {"default": "aaadit.safetensors", "tooltip": "File name in models/diffusion_models."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file built with other settings."}),
        }}

    def build(self, preset, width, num_blocks, num_heads, ffn_ratio, latent_channels, text_width, pos_grid,
              use_text_mask, seed, dtype, name, overwrite):
        from dit_distillery.commands.build_aaadit import parse_grid

        config = aaadit_presets.preset_config(preset)  # refuses an unknown preset
        for key, value in zip(_AAADIT_FIELDS, (width, num_blocks, num_heads, ffn_ratio, latent_channels, text_width)):
            if value:
                config[key] = int(value)
        if str(pos_grid).strip():
            config["pos_grid"] = parse_grid(pos_grid)
        config["use_text_mask"] = bool(use_text_mask) or config.get("use_text_mask", False)
        aaadit_presets.check_config(config)  # (heads divide width...) before anything is written
        out = path_inside(model_write_dir("diffusion_models"), name, "name", ".safetensors")
        provenance = {"built_by": "DiT Distillery Build AAADiT", "preset": preset, "seed": int(seed), "dtype": dtype,
                      "config": config}
        reused = aaadit_presets.build_file(out, config, seed=int(seed), dtype=DTYPES[dtype], provenance=provenance,
                                           overwrite=bool(overwrite), field="name")
        ref = DitRef.from_path(out, "name")
        summary = f"{ref.describe()}\n{'reused' if reused else 'wrote'} {out}\nconfig: {json.dumps(config)}"
        return (ref, summary)


# ----------------------------------------------------------------------------------------------------------
# Shrink DiT

class ShrinkDiT:
    DESCRIPTION = ("Makes a smaller DiT from exact slices of a source's weights: fewer blocks (depth; per block "
                   "stack for FLUX.2 [klein]) and/or fewer heads per block (width; Qwen-Image, Z-Image, FLUX.2), "
                   "streamed tensor by tensor so a 41 GB source needs about one "
                   "tensor of memory. Saves the student to models/diffusion_models (a depth-only student loads in "
                   "stock UNETLoader). Re-running with the same settings reuses the file.")
    CATEGORY = MODELS_CATEGORY
    FUNCTION = "shrink"
    RETURN_TYPES = (DIT, "STRING")
    RETURN_NAMES = ("dit", "report")
    OUTPUT_TOOLTIPS = ("The student DiT file.", "What was kept (blocks, heads), parameters before/after, notes.")

    @classmethod
    def INPUT_TYPES(cls):
        from dit_distillery.shrink import STRATEGIES, WIDTH_METHODS

        return {
            "required": {
                "source": ([FROM_INPUT] + list_models("diffusion_models"), {"tooltip":
                           "The DiT to shrink (Qwen-Image, Z-Image, FLUX.2 [klein]; models/diffusion_models), or "
                           "'[dit input]' to use the DiT "
                           "connected below (which wins when both are given)."}),
                "target_blocks": ("INT", {"default": 30, "min": 0, "max": 1000, "tooltip":
                                  "Blocks the student keeps (Qwen-Image has 60); 0 keeps all (or the block list's "
                                  "count). For a DiT with several block stacks (FLUX.2: transformer_blocks 5/8, "
                                  "single_transformer_blocks 20/24) this is the single stack's count; give per-stack "
                                  "counts in block_list instead."}),
                "strategy": (list(STRATEGIES), {"default": "interval", "tooltip":
                             "Which blocks: uniform (evenly spaced), first, interval (first K + last N-K: drops one "
                             "contiguous middle span), list (block_list), importance (ShortGPT block influence on "
                             "calibration inputs), learnable (TinyFusion: which blocks a short fine-tune recovers "
                             "best, learnt on the calibration inputs with the whole source loaded; 200 steps, seeded "
                             "by calibration_seed). The source's last block is always kept last. Recommended "
                             "(bench/results/block_selection.md, 12 -> 6 and 12 -> 4 blocks): learnable when the "
                             "source fits this device for training (best, or within one standard error of it, at "
                             "both); else importance with calibration_prompts and a pipeline (best at 4, second "
                             "tier at 6); without calibration interval (the default); uniform was the worst at "
                             "both."}),
                "block_list": ("STRING", {"default": "", "tooltip": "strategy 'list': source blocks to keep, e.g. "
                               "'0-9,50-59' (must include the last block); per block stack: 'transformer_blocks=0-2,4; "
                               "single_transformer_blocks=0-9,19'. Other strategies: per-stack counts "
                               "'transformer_blocks=3, single_transformer_blocks=12' (these win over target_blocks; "
                               "a stack not named is kept whole); a plain list is ignored by them."}),
                "keep_first": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                               "strategy 'interval': how many first blocks to keep; 0 = about a third."}),
                "heads": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip":
                          "Attention heads per block to keep (width shrink; Qwen-Image has 24 of 128 channels); "
                          "0 keeps all. A width-shrunk Qwen-Image or Z-Image student needs Load Student to load in "
                          "ComfyUI; FLUX.2 [klein] ones (whole heads of 128, FFN 3x) load in UNETLoader too."}),
                "width_method": (list(WIDTH_METHODS), {"default": "magnitude", "tooltip":
                                 "How kept heads/FFN units/channels are chosen: magnitude (weights only) or importance "
                                 "(activations on calibration inputs)."}),
                "calibration_prompts": ("STRING", {"multiline": True, "default": "", "tooltip":
                                        "For importance scoring and the learnable strategy: one prompt per line, "
                                        "encoded with the connected "
                                        "pipeline's text encoder. Empty: seeded Gaussian proxy inputs (reported)."}),
                "calibration_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 16, "tooltip":
                                     "Image side in pixels of the calibration inputs."}),
                "calibration_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 32 - 1,
                                             "control_after_generate": False,
                                             "tooltip": "Seed of the calibration noise (and of the learnable "
                                             "strategy's sampling and LoRA)."}),
                "dtype": (["keep", "bf16", "fp16", "fp32", "fp8"], {"default": "keep", "tooltip":
                          "dtype of the written student (fp8 = e4m3fn weight matrices)."}),
                "name": ("STRING", {"default": "qwen_image_student.safetensors", "tooltip":
                         "File name in models/diffusion_models."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                              "Replace an existing file made with other settings."}),
            },
            "optional": {
                "dit": (DIT, {"tooltip": "A DiT from another node (e.g. Load DiT); used when source is '[dit input]' "
                              "or instead of the source file."}),
                "pipeline": (PIPELINE, {"tooltip": "Encodes the calibration prompts (a pipeline of the source's "
                             "family)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def shrink(self, source, target_blocks, strategy, block_list, keep_first, heads, width_method,
               calibration_prompts, calibration_size, calibration_seed, dtype, name, overwrite, dit=None,
               pipeline=None, unique_id=None):
        from dit_distillery.shrink import shrink

        if dit is not None:
            src = Path(dit.path)
        elif source == FROM_INPUT:
            raise DistilleryError("source", source, "no DiT is connected to the dit input.",
                                  "pick a file in source, or connect a DiT (e.g. Load DiT).")
        else:
            src = find_model("diffusion_models", source, "source")
        out = path_inside(model_write_dir("diffusion_models"), name, "name", ".safetensors")
        per_stack = "=" in block_list  # 'transformer_blocks=3, ...': counts (or lists) per stack, not target_blocks
        layers = (None if strategy == "list" else block_list.strip()) if per_stack else target_blocks or None
        options = dict(layers=layers, strategy=strategy,
                       keep_blocks=block_list.strip() or None if strategy == "list" else None,
                       keep_first=keep_first or None if strategy == "interval" else None,
                       heads=heads or None, width_method=width_method)
        needs_scores = strategy in ("importance", "learnable") or (heads and width_method == "importance")
        if strategy == "learnable":
            options["learn"] = {"seed": int(calibration_seed)}
        calibration = None
        prompts = lines(calibration_prompts)
        if prompts and needs_scores:
            if pipeline is None:
                raise DistilleryError("calibration_prompts", prompts[0], "prompts need a pipeline to encode them.",
                                      "connect a pipeline of the source's family (Load Pipeline), or clear the "
                                      "prompts to score with the seeded proxy.")
            calibration = _calibration(pipeline, prompts, int(calibration_size), int(calibration_seed))
        progress = Progress(100, unique_id)
        with user_errors(progress):  # the same settings reuse the file (the core checks it)
            report = shrink(src, out, dtype=dtype, calibration=calibration, progress=progress, stop=progress.stop,
                            reuse=True, overwrite=bool(overwrite), out_field="name", **options)
        ref = DitRef.from_path(out, "name")
        return (ref, _shrink_text(report) + "\n" + _size_text(ref))


def _calibration(pipeline: PipelineRef, prompts: list[str], size: int, seed: int):
    """Real prompt states from the pipeline's text encoder, over the sampler's starting noise (DiffSynth's draw)
    at noise levels spread over (0, 1): no teacher images are needed, and the text, which a Gaussian proxy gets
    most wrong, is real."""
    from dit_distillery.conditioning import TextEmbeds
    from dit_distillery.shrink import Calibration

    pipe = pipeline.load()
    with torch.no_grad():
        text = pipe.encode_prompts(prompts)
        latents = pipe.initial_noise(list(range(seed, seed + len(prompts))), size, size)
    mask = None if text.mask is None else text.mask.cpu()
    return Calibration(latents.float().cpu(), TextEmbeds(text.embeds.float().cpu(), mask), None, kind="provided")


def _size_text(ref: DitRef) -> str:
    """The student's size and training memory at 1024x1024 (the Model Size Report's main lines)."""
    from dit_distillery.report import size_report, summary_lines

    lines_ = summary_lines(size_report((ref.family, ref.config), height=1024, width=1024))
    return "\n".join(f"student {k}: {lines_[k]}" for k in ("params", "weights", "full training", "lora training"))


def _shrink_text(report: dict) -> str:
    keep = ("out", "reused", "strategy", "layers_before", "layers_after", "kept_blocks", "heads_before", "heads_after",
            "width_before", "width_after", "width_method", "calibration", "params_before", "params_after", "dtype",
            "bytes_written", "seconds", "notes")
    return "\n".join(f"{k}: {json.dumps(report[k]) if isinstance(report[k], (list, dict)) else report[k]}"
                     for k in keep if k in report and report[k] is not None)


# ----------------------------------------------------------------------------------------------------------
# Loaders

class LoadDiT:
    DESCRIPTION = ("Picks a DiT file from models/diffusion_models (Qwen-Image, AAADiT, or a student saved by this "
                   "pack). Only the header is read here; weights load when a node needs them.")
    CATEGORY = MODELS_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DIT, "STRING")
    RETURN_NAMES = ("dit", "summary")
    OUTPUT_TOOLTIPS = ("The DiT file, with its family and config.", "Family, parameters, file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dit_name": (list_models("diffusion_models"), {"tooltip":
                                          "A .safetensors DiT in models/diffusion_models."})}}

    @classmethod
    def IS_CHANGED(cls, dit_name, **_):
        try:
            return stat_key(find_model("diffusion_models", dit_name, "dit_name"))
        except DistilleryError:
            return dit_name

    def load(self, dit_name):
        ref = DitRef.from_path(find_model("diffusion_models", dit_name, "dit_name"), "dit_name")
        return (ref, ref.describe())


BUILTIN_HELP = ("default: the embedded demo pipeline (a small AAADiT on a pixel codec, random weights, trains on "
                "the synthetic shapes on a CPU); tiny:aaadit / tiny:qwen_image: tiny random pipelines of each family; "
                "others: diffusers folders in models/diffusers (e.g. a local Qwen/Qwen-Image).")


class LoadPipeline:
    DESCRIPTION = ("A text-to-image pipeline (DiT + text encoder + VAE) for sampling, training, calibration and "
                   "teacher datasets: a diffusers folder from models/diffusers or a built-in one, with any part "
                   "replaced by a file from ComfyUI's model folders. Weights load when a node first needs them.")
    CATEGORY = MODELS_CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "summary")
    OUTPUT_TOOLTIPS = ("The pipeline (a description; loaded once, on first use).", "What it is made of.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source": (list(BUILTIN_PIPELINES) + list_diffusers_folders(), {"default": "default",
                                                                                "tooltip": BUILTIN_HELP}),
                "dit_name": ([NONE] + list_models("diffusion_models"), {"tooltip":
                             "Replace the source's DiT by this file (models/diffusion_models), e.g. a shrunk student."}),
                "text_encoder_name": ([NONE] + list_models("text_encoders"), {"tooltip":
                                      "Replace the text encoder by this file (models/text_encoders; needs a diffusers "
                                      "source whose text_encoder/config.json describes it)."}),
                "vae_name": ([NONE] + list_models("vae"), {"tooltip": "Replace the VAE by this file (models/vae)."}),
                "text_max_length": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip":
                                    "Prompt tokens; 0 = the pipeline's own (AAADiT attends to padding: use the length "
                                    "it was trained with)."}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: bf16 on a GPU, fp32 on the CPU."}),
                "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "auto: ComfyUI's device."}),
            },
            "optional": {
                "dit": (DIT, {"tooltip": "A DiT from another node (Build AAADiT, Shrink DiT, Load DiT); wins over "
                              "dit_name."}),
                **memory_inputs("sampling with this pipeline (Sample, Generate Distill Dataset's teacher)"),
            },
        }

    @classmethod
    def IS_CHANGED(cls, source, dit_name=NONE, text_encoder_name=NONE, vae_name=NONE, **_):
        paths = []
        for kind, name in (("diffusion_models", dit_name), ("text_encoders", text_encoder_name), ("vae", vae_name)):
            if name and name != NONE:
                try:
                    paths.append(find_model(kind, name, kind))
                except DistilleryError:
                    paths.append(name)
        return f"{source}|{stat_key(*paths)}"

    def load(self, source, dit_name, text_encoder_name, vae_name, text_max_length, dtype, device, dit=None,
             base_dtype="bf16", blocks_to_swap=0):
        if source in BUILTIN_PIPELINES:
            src = source
        else:
            src = str(_diffusers_folder(source))
        picked = {kind: (None if name in (None, "", NONE) else str(find_model(kind, name, field)))
                  for kind, name, field in (("diffusion_models", dit_name, "dit_name"),
                                            ("text_encoders", text_encoder_name, "text_encoder_name"),
                                            ("vae", vae_name, "vae_name"))}
        dit_path = dit.path if dit is not None else picked["diffusion_models"]
        if source in BUILTIN_PIPELINES and (picked["text_encoders"] or picked["vae"]):
            raise DistilleryError("source", source, "a built-in pipeline takes only a replacement DiT.",
                                  "use a diffusers folder from models/diffusers as the source to replace its text "
                                  "encoder or VAE.")
        if device == "cuda" and not torch.cuda.is_available():
            raise DistilleryError("device", device, "no CUDA device is available.", "use auto or cpu.")
        if dit_path is not None:  # a file we cannot read, or of another family, fails here, not in a later node
            from dit_distillery.pipelines.loading import source_family

            family = DitRef.from_path(dit_path, "dit").family
            expected = source_family(src)
            if expected is not None and family != expected:
                raise DistilleryError("dit" if dit is not None else "dit_name", Path(dit_path).name,
                                      f"is a {family} DiT, but the {source} pipeline is {expected}: its text encoder "
                                      "and VAE do not fit.", f"pick a {family} pipeline as the source, or a "
                                      f"{expected} DiT.")
        ref = PipelineRef(source=src, dit=dit_path, text_encoder=picked["text_encoders"], vae=picked["vae"],
                          text_max_length=text_max_length or None, device=device, dtype=dtype,
                          base_dtype=check_base_dtype(base_dtype), blocks_to_swap=swap_setting(blocks_to_swap))
        return (ref, ref.describe())


def _diffusers_folder(name: str) -> Path:
    """A folder DiffusersLoader lists in models/diffusers (symlinked model folders followed, as ComfyUI does); a
    typed name outside it (absolute, '..', a symlink out that ComfyUI does not list) is refused."""
    missing = ("no diffusers folder of this name in models/diffusers.",
               "put the model folder (with model_index.json) in models/diffusers and refresh (press R).")
    check_relative(name, "source")
    path = resolve_name(name, "source", model_dirs("diffusers"), listed=list_diffusers_folders, kind="dir",
                        missing=missing)
    if not (path / "model_index.json").is_file():
        raise DistilleryError("source", name, *missing)
    return path


# ----------------------------------------------------------------------------------------------------------
# Model Size Report

class ModelSizeReport:
    DESCRIPTION = ("Parameters, weight memory and the memory training needs (full and LoRA, with or without "
                   "gradient checkpointing) of a DiT, computed on PyTorch's meta device: nothing is loaded. Use it "
                   "to choose a shrink target or a resolution before spending GPU time.")
    CATEGORY = MODELS_CATEGORY
    FUNCTION = "report"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("report", "report_json")
    OUTPUT_TOOLTIPS = ("Readable lines (connect to a preview node).", "The whole report as JSON (sizes in bytes).")

    @classmethod
    def INPUT_TYPES(cls):
        from dit_distillery.report import PRESETS

        return {
            "required": {
                "preset": (list(PRESETS), {"default": "qwen-image", "tooltip":
                           "The model to report on when no dit or pipeline is connected."}),
                "layers": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                           "Report with this many blocks instead (what a depth shrink gives); 0 = as is."}),
                "heads": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip":
                          "Report with this many heads (Qwen-Image: width = heads x 128); 0 = as is."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                   "tooltip": "Training image height in pixels."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                  "tooltip": "Training image width in pixels."}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip": "Training batch size."}),
                "text_tokens": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip":
                                "Prompt length in tokens; 0 = 256 for Qwen-Image, 128 for AAADiT."}),
                "lora_rank": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "Rank for the LoRA estimate."}),
                "lora_targets": ("STRING", {"default": "", "tooltip":
                                 "LoRA preset or comma-separated module names; empty = the family's preset."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip":
                                           "Estimate with per-block gradient checkpointing."}),
            },
            "optional": {
                "dit": (DIT, {"tooltip": "Report on this DiT (wins over pipeline and preset)."}),
                "pipeline": (PIPELINE, {"tooltip": "Report on this pipeline's DiT (wins over preset)."}),
                "plan": (["off", "lora", "full", "sample"], {"default": "off", "tooltip":
                         "Also plan one run's peak GPU memory by part (LoRA or full training, or teacher sampling) "
                         "and the blocks to swap for budget_gb."}),
                "plan_loss": ("STRING", {"default": "sft", "tooltip":
                              "sft, or direct:N (Direct Distill unrolling N student steps)."}),
                "base_dtype": (["bf16", "fp8"], {"default": "bf16", "tooltip":
                               "dtype of the frozen base weights (fp8: Linear weights in one byte)."}),
                "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 1.0, "tooltip":
                              "GPU memory to fit (GB as cards are sold, i.e. GiB); 0 = no budget."}),
                "blocks_to_swap": ("INT", {"default": -1, "min": -1, "max": 1000, "tooltip":
                                   "Blocks kept on the CPU and streamed to the GPU; -1 = the fewest that fit "
                                   "budget_gb (0 without a budget)."}),
            },
        }

    def report(self, preset, layers, heads, height, width, batch, text_tokens, lora_rank, lora_targets,
               gradient_checkpointing, dit=None, pipeline=None, plan="off", plan_loss="sft", base_dtype="bf16",
               budget_gb=0.0, blocks_to_swap=-1):
        from dit_distillery import families
        from dit_distillery.report import size_report, summary_lines, with_overrides

        if dit is not None:
            family, config, source = dit.family, dict(dit.config), Path(dit.path).name
        elif pipeline is not None:
            family, config, source = _pipeline_dit_spec(pipeline)
        else:
            family, config, source = families.detect(preset, "preset")
        config = with_overrides(family, config, layers=layers or None, heads=heads or None)
        report = size_report((family, config), height=height, width=width, batch=batch,
                             gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
                             lora_targets=lora_targets.strip() or None, text_tokens=text_tokens or None)
        overrides = [f"{n} {v}" for n, v in (("layers", layers), ("heads", heads)) if v]
        report["source"] = source + (f", with {' and '.join(overrides)}" if overrides else "")
        lines = summary_lines(report)
        if plan != "off":
            from dit_distillery.memory_plan import GIB, memory_plan

            budget = int(budget_gb * GIB) if budget_gb > 0 else None
            planned = memory_plan((family, config), height=height, width=width, batch=batch, mode=plan,
                                  loss=plan_loss, base_dtype=base_dtype, gradient_checkpointing=gradient_checkpointing,
                                  lora_rank=lora_rank, lora_targets=lora_targets.strip() or None,
                                  text_tokens=text_tokens or None)
            planned.source = report["source"]
            n = blocks_to_swap if blocks_to_swap >= 0 else (planned.blocks_needed(budget) if budget else 0)
            planned = planned.with_swap(planned.max_swappable if n is None else n)
            lines.update({f"memory {k}": v for k, v in planned.summary_lines(budget).items()})
            report["memory_plan"] = planned.to_dict(budget)
        text = "\n".join(f"{k}: {v}" for k, v in lines.items())
        return {"ui": {"text": [text]}, "result": (text, json.dumps(report, default=str))}


def _pipeline_dit_spec(pipeline: PipelineRef) -> tuple[str, dict, str]:
    from dit_distillery import families

    comfy = getattr(pipeline, "comfy", None)  # Pipeline from ComfyUI Models: the MODEL's family and config
    if comfy is not None and not pipeline.dit:
        return comfy.family, dict(comfy.config), comfy.describe()
    if pipeline.dit and not pipeline.loaded():
        family, config, _ = families.detect(pipeline.dit, "pipeline")
        return family, config, Path(pipeline.dit).name
    if pipeline.source not in BUILTIN_PIPELINES and not pipeline.loaded():
        family, config, _ = families.detect(pipeline.source, "pipeline")
        return family, config, Path(pipeline.source).name
    family, config, _ = families.detect(pipeline.load().dit)  # a built-in pipeline (tiny) or one already in memory
    return family, config, pipeline.describe()


NODE_CLASS_MAPPINGS = {
    "DD_BuildAAADiT": BuildAAADiT,
    "DD_ShrinkDiT": ShrinkDiT,
    "DD_LoadDiT": LoadDiT,
    "DD_LoadPipeline": LoadPipeline,
    "DD_ModelSizeReport": ModelSizeReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DD_BuildAAADiT": "Build AAADiT",
    "DD_ShrinkDiT": "Shrink DiT",
    "DD_LoadDiT": "Load DiT",
    "DD_LoadPipeline": "Load Pipeline",
    "DD_ModelSizeReport": "Model Size Report",
}
