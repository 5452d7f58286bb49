"""Load Student: a trained student back as something that samples, and as a file stock ComfyUI loads.

A student is a base pipeline (text encoder, VAE, DiT), optionally with its DiT replaced by full weights (a shrunk
or fully trained student) and optionally a LoRA on top, at a strength:

* merged (default): W += strength * alpha/rank * B·A into a copy of the DiT — no extra cost at sampling;
* unmerged: peft adapters stay separate with their scale multiplied by `strength`, so the base weights are
  untouched (what you want to compare strengths quickly or keep the base shared).

The base is never modified: a pipeline passed in is copied before anything is merged (ComfyUI caches node outputs
and shares them between graphs).

Students also export to one safetensors file under the names stock ComfyUI reads for their family
(`Family.to_comfy`); whether its UNETLoader loads a shrunk student is the family's to say (`Family.comfy_loadable`:
Qwen-Image keeps loading while the student keeps its width, since ComfyUI reads only the block count and input
channels from the file, comfyui-facts.md A5). The others need the pack's Load Student node, which builds the model
from our metadata.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from . import families
from .errors import DistilleryError


def comfy_loadable(family: str, config: dict) -> tuple[bool, str]:
    """Whether stock ComfyUI's UNETLoader can load a DiT with this config, and why not."""
    return families.get(family).comfy_loadable(config)


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
            pipe = pipe.with_dit(load_dit(weights, dtype=dtype or pipe.dtype, device=pipe.device, field="weights"))
        elif lora is not None:  # a copy whose DiT can be changed (the base is never modified)
            from .block_swap import copy_unswapped

            pipe = pipe.with_dit(copy_unswapped(pipe.dit))  # (a block-swapped base keeps its swap; the copy none)
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
    """Write the student's DiT (LoRA merged) as one safetensors file (`registry.save_dit`: the names stock ComfyUI
    reads for its family, and our metadata).

    Returns {"path", "family", "comfy_loadable", "note"}. Unmerged peft adapters are merged into a copy first.
    """
    from .lora import lora_layers, lora_weights_of, merge_lora
    from .models.registry import model_config, save_dit
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
    family = families.of_model(dit).name
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
