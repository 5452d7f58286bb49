"""Load Student: a trained student back as something that samples, and as a file stock ComfyUI loads.

A student is a base pipeline (text encoder, VAE, DiT), optionally with its DiT replaced by full weights (a shrunk
or fully trained student) and optionally a LoRA on top, at a strength:

* merged (default): W += strength * alpha/rank * B·A into a copy of the DiT — no extra cost at sampling;
* unmerged: peft adapters stay separate with their scale multiplied by `strength`, so the base weights are
  untouched (what you want to compare strengths quickly or keep the base shared).

The base is never modified: a pipeline passed in is copied before anything is merged (ComfyUI caches node outputs
and shares them between graphs).

Qwen-Image students also export to one safetensors file with bare diffusers keys, which stock ComfyUI's
UNETLoader loads when the student keeps Qwen-Image's width (24 heads x 128, text width 3584): ComfyUI reads only
the block count and input channels from the file and takes the rest from its defaults (comfyui-facts.md A5).
Width-shrunk students need the pack's Load Student node, which builds the model from our metadata.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .errors import DistilleryError
from .models.qwen_image import QWEN_IMAGE_CONFIG

COMFY_FIXED = ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "axes_dims_rope", "patch_size")


def comfy_loadable(family: str, config: dict) -> tuple[bool, str]:
    """Whether stock ComfyUI's UNETLoader can load a DiT with this config, and why not."""
    if family != "qwen_image":
        return False, f"ComfyUI has no {family} architecture; load it with the pack's Load Student node."
    for key in COMFY_FIXED:
        have, want = config.get(key), QWEN_IMAGE_CONFIG[key]
        if (list(have) if isinstance(have, (list, tuple)) else have) != want:
            return False, (f"{key}={have} differs from Qwen-Image's {want}; ComfyUI's UNETLoader assumes the latter. "
                           "Load it with the pack's Load Student node.")
    return True, "loads in stock UNETLoader (models/diffusion_models)"


def _copy_pipeline(pipe):
    """A copy whose DiT can be changed; the prompt encoder and codec (never modified) are shared."""
    from .pipelines import TextToImagePipeline

    dit = copy.deepcopy(pipe.dit)
    return TextToImagePipeline(dit, pipe.prompt_encoder, pipe.codec, pipe.family, template=pipe.template,
                               defaults=pipe.defaults)


def load_student(base, *, weights: str | os.PathLike | None = None, lora: str | os.PathLike | None = None,
                 strength: float = 1.0, merge: bool = True, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
    """A `TextToImagePipeline` for the student (see the module docstring).

    base: a pipeline, or what `pipelines.loading.load_pipeline` takes ("default", "tiny", a diffusers folder).
    weights: a DiT file/folder replacing the base's DiT (a shrunk or fully trained student).
    lora: a LoRA file (ours, DiffSynth's, diffusers'); strength scales it (0 = off, 1 = as trained).
    """
    from .lora import load_lora_into, lora_layers, merge_lora, read_lora
    from .pipelines import TextToImagePipeline
    from .pipelines.loading import load_dit, load_pipeline

    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not -4 <= strength <= 4:
        raise DistilleryError("strength", strength, "must be a number in [-4, 4].", "use 1.0 for the LoRA as trained.")
    if isinstance(base, TextToImagePipeline):
        pipe = base
        if weights is not None:
            dit = load_dit(weights, dtype=dtype or pipe.dtype, device=pipe.device, field="weights")
            pipe = TextToImagePipeline(dit, pipe.prompt_encoder, pipe.codec, template=pipe.template,
                                       defaults=pipe.defaults)
        elif lora is not None:
            pipe = _copy_pipeline(pipe)
    else:
        pipe = load_pipeline(base, dit=weights, device=device or "cpu", dtype=dtype)
    if lora is not None:
        lw = read_lora(lora, "lora")
        if merge:
            merge_lora(pipe.dit, lw, strength, "lora")
        else:
            load_lora_into(pipe.dit, lw, "lora")
            for layer in lora_layers(pipe.dit).values():
                for name in layer.scaling:
                    layer.scaling[name] *= strength
            pipe.dit.requires_grad_(False)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    pipe.dit.eval()
    return pipe


def export_comfy(pipe_or_dit, path: str | os.PathLike, *, dtype: torch.dtype | None = torch.bfloat16,
                 provenance: dict | None = None) -> dict:
    """Write the student's DiT (LoRA merged) as one safetensors file with bare diffusers keys and our metadata.

    Returns {"path", "family", "comfy_loadable", "note"}. Unmerged peft adapters are merged into a copy first.
    """
    from .lora import lora_layers, lora_weights_of, merge_lora
    from .models.registry import family_of, model_config, save_dit
    from .velocity import base_model

    dit = base_model(getattr(pipe_or_dit, "dit", pipe_or_dit))
    if lora_layers(dit):
        weights = lora_weights_of(dit)
        scales = {n: layer.scaling["default"] for n, layer in lora_layers(dit).items()}
        clean = _without_adapters(dit)
        for name, module in weights.modules.items():  # fold the live scaling (strength included) into alpha
            module.alpha = scales[name] * module.rank
        merge_lora(clean, weights, 1.0)
        dit = clean
    family = family_of(dit)
    loadable, note = comfy_loadable(family, model_config(dit))
    out = save_dit(dit, Path(path), provenance=provenance, dtype=dtype)
    return {"path": str(out), "family": family, "comfy_loadable": loadable, "note": note}


def _without_adapters(dit: torch.nn.Module) -> torch.nn.Module:
    """A copy of a peft-injected model with its LoRA layers replaced by their (unmerged) base layers."""
    from .lora import lora_layers

    clean = copy.deepcopy(dit)
    for name in list(lora_layers(clean)):
        parent_name, _, child = name.rpartition(".")
        parent = clean.get_submodule(parent_name) if parent_name else clean
        setattr(parent, child, getattr(clean.get_submodule(name), "base_layer"))
    return clean
