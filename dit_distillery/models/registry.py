"""Save and load our DiT files: one safetensors file, bare diffusers keys, config and provenance in metadata.

The same format is written by Shrink DiT, by full training and by Build AAADiT's single-file export, and read
by Load Student, the trainer and the report. Keys are those of the diffusers class, so a depth-shrunk
Qwen-Image student loads unchanged in ComfyUI's UNETLoader; the metadata lets us rebuild any student (width-
shrunk ones included) without guessing. Files without our metadata (ComfyUI's own, DiffSynth's) are
recognised from their keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import DistilleryError
from ..formats import TensorSource, decode_metadata_value, save_safetensors

META_FAMILY = "dit_distillery.family"
META_CONFIG = "dit_distillery.config"
META_PROVENANCE = "dit_distillery.provenance"


def _families():
    from . import aaadit, qwen_image

    return {qwen_image.FAMILY: qwen_image, aaadit.FAMILY: aaadit}


def family_of(model: torch.nn.Module) -> str:
    for name, fam in _families().items():
        if isinstance(model, fam.model_class()):
            return name
    raise DistilleryError("model", type(model).__name__, "not a DiT family we know.",
                          "use a Qwen-Image DiT or an AAADiT.")


def model_config(model: torch.nn.Module) -> dict:
    """The constructor arguments of a diffusers ConfigMixin model (private `_` keys dropped)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if not k.startswith("_")}


def detect(src: TensorSource) -> tuple[str, dict]:
    """(family, config) of a stored DiT: from our metadata when present, else from its keys and shapes."""
    family = src.metadata.get(META_FAMILY)
    config = decode_metadata_value(src.metadata.get(META_CONFIG))
    families = _families()
    if family in families and isinstance(config, dict):
        return family, config
    keys = src.keys()
    for name, fam in families.items():
        if fam.is_family(keys):
            return name, fam.config_from_shapes(src.shape, keys)
    raise DistilleryError(src.field, str(src.path), "not a DiT this pack knows (neither Qwen-Image nor AAADiT keys).",
                          "choose a Qwen-Image diffusion model, an AAADiT, or a file saved by DiT Distillery.")


def build_empty(family: str, config: dict, device: str | torch.device = "meta") -> torch.nn.Module:
    """Instantiate a model without allocating (meta) or on a device, from (family, config)."""
    cls = _families()[family].model_class()
    if str(device) == "meta":
        with torch.device("meta"):
            return cls(**config)
    model = cls(**config)
    return model.to(device)


def load_dit(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             field: str = "model") -> torch.nn.Module:
    """Load a DiT from one of our files, a diffusers folder, or a ComfyUI file of a known family.

    Shapes are checked against the model from the file's header before any data is read, and every tensor is
    checked for NaN/inf as it loads (`weights_check`), so a mismatched or damaged file is refused by name."""
    from ..weights_check import check_finite, check_shapes

    with TensorSource(path, field) as src:
        family, config = detect(src)
        # accelerate's init_empty_weights puts only parameters on meta: plain tensor attributes built in
        # __init__ (Qwen-Image's RoPE tables in pos_embed) stay real, so the loaded model can run.
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = _families()[family].model_class()(**config)
        check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: src.shape(k) for k in src.keys()},
                     field=field, path=path, what=f"{family} model of its config ({_config_words(family, config)})",
                     fix=_dit_fix(src))
        state = {k: check_finite(k, src.get(k), field=field, path=path) for k in src.keys()}
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.to(device).eval()


def _config_words(family: str, config: dict) -> str:
    """The sizes a user recognises: width and block count."""
    if family == "qwen_image":
        width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
        blocks = config.get("num_layers")
    else:
        width, blocks = config.get("width"), config.get("num_blocks")
    return f"width {width}, {blocks} blocks"


def _dit_fix(src: TensorSource) -> str:
    if META_CONFIG in src.metadata:  # our file: its own metadata and tensors disagree
        return ("the file's tensors do not match the configuration stored in its metadata: it was edited or is "
                "damaged. Export or train it again.")
    return ("the file is incomplete, or a variant of the model this pack does not read: download it again, or load "
            "a file saved by DiT Distillery (which records its configuration).")


def save_dit(model: torch.nn.Module, path: str | os.PathLike, provenance: dict | None = None,
             dtype: torch.dtype | None = None, extra_metadata: dict | None = None) -> Path:
    """Write a DiT as one safetensors file with bare diffusers keys and our metadata (atomic)."""
    state = model.state_dict()
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    metadata = {
        "format": "pt",
        META_FAMILY: family_of(model),
        META_CONFIG: json.dumps(model_config(model), sort_keys=True),
        META_PROVENANCE: json.dumps(provenance or {}, sort_keys=True, default=str),
    }
    metadata.update(extra_metadata or {})
    return save_safetensors(state, path, metadata)
