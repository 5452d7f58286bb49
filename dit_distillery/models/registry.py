"""Save and load our DiT files: one safetensors file, config and provenance in metadata.

The same format is written by Shrink DiT, by full training and by Build AAADiT's single-file export, and read
by Load Student, the trainer and the report. Tensor names are those stock ComfyUI reads for the family
(`Family.to_comfy`: bare diffusers keys for Qwen-Image, DiffSynth's for AAADiT), so a depth-shrunk Qwen-Image
student loads unchanged in ComfyUI's UNETLoader; the metadata lets us rebuild any student (width-shrunk ones
included) without guessing. Files without our metadata (ComfyUI's own, DiffSynth's) are recognised from their
keys (`families.detect`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import families
from ..formats import TensorSource, save_safetensors

META_FAMILY = "dit_distillery.family"
META_CONFIG = "dit_distillery.config"
META_PROVENANCE = "dit_distillery.provenance"


def model_config(model: torch.nn.Module) -> dict:
    """The constructor arguments of a diffusers ConfigMixin model (private `_` keys dropped)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if not k.startswith("_")}


def detect(src: TensorSource) -> tuple[str, dict]:
    """(family, config) of a stored DiT: `families.detect` (the one resolver) for an open file."""
    return families.detect(src)[:2]


def build_empty(family: str, config: dict, device: str | torch.device = "meta") -> torch.nn.Module:
    """Instantiate a model without allocating (meta) or on a device, from (family, config)."""
    cls = families.get(family).model_class()
    if str(device) == "meta":
        with torch.device("meta"):
            return cls(**config)
    model = cls(**config)
    return model.to(device)


def load_dit(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             field: str = "model", fp8: str = "keep") -> torch.nn.Module:
    """Load a DiT from one of our files, a diffusers folder, or a ComfyUI file of a known family.

    Shapes are checked against the model from the file's header before any data is read, and every tensor is
    checked for NaN/inf as it loads (`weights_check`), so a mismatched or damaged file is refused by name.
    fp8 files (plain float8_e4m3fn, or ComfyUI's scaled fp8 with its scales) keep their Linear weights in fp8,
    computed in `dtype` (bf16 when None), or, with `fp8="dequantise"`, load as plain `dtype` weights (`fp8.py`)."""
    from .. import fp8 as fp8_weights
    from ..weights_check import check_finite, check_shapes

    fp8_weights.check_mode(fp8)
    with TensorSource(path, field) as src:
        name, config, _ = families.detect(src)
        family = families.get(name)
        layout = fp8_weights.read_layout(src, field)  # the model's tensors, and a scaled fp8 file's scales
        shapes = {k: src.shape(k) for k in layout.keys}
        # accelerate's init_empty_weights puts only parameters on meta: plain tensor attributes built in
        # __init__ (Qwen-Image's RoPE tables in pos_embed) stay real, so the loaded model can run.
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = family.model_class()(**config)
        # the file may use ComfyUI's names for the family: its header shapes, renamed as the tensors will be
        header = family.from_comfy({k: torch.empty(shapes[k], device="meta") for k in layout.keys})
        check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                     {k: tuple(v.shape) for k, v in header.items()},
                     field=field, path=path, what=f"{name} model of its config ({family.describe(config)})",
                     fix=_dit_fix(src))
        state = family.from_comfy({k: check_finite(k, src.get(k), field=field, path=path) for k in layout.keys})
        scales = fp8_weights.rename_scales(layout.scales, shapes, family.from_comfy)
    fp8_weights.load_weights(model, state, scales, dtype=dtype, mode=fp8, scaled=layout.scaled, field=field,
                             path=path)
    return model.to(device).eval()


def _dit_fix(src: TensorSource) -> str:
    if META_CONFIG in src.metadata:  # our file: its own metadata and tensors disagree
        return ("the file's tensors do not match the configuration stored in its metadata: it was edited or is "
                "damaged. Export or train it again.")
    return ("the file is incomplete, or a variant of the model this pack does not read: download it again, or load "
            "a file saved by DiT Distillery (which records its configuration).")


def save_dit(model: torch.nn.Module, path: str | os.PathLike, provenance: dict | None = None,
             dtype: torch.dtype | None = None, extra_metadata: dict | None = None) -> Path:
    """Write a DiT as one safetensors file with our metadata (atomic), under the tensor names stock ComfyUI
    reads for its family (`Family.to_comfy`; bare diffusers names for Qwen-Image and AAADiT)."""
    from ..fp8 import dequantised_state

    state = dequantised_state(model, dtype)  # a scaled fp8 model's weights times their scales: plain weights
    return save_dit_state(state, families.of_model(model).name, model_config(model), path, provenance, dtype,
                          extra_metadata)


def save_dit_state(state: dict[str, torch.Tensor], family: str, config: dict, path: str | os.PathLike,
                   provenance: dict | None = None, dtype: torch.dtype | None = None,
                   extra_metadata: dict | None = None) -> Path:
    """`save_dit` from a state dict (the model's own names) and its (family, config), without the model: what
    consolidating a sharded checkpoint writes (trainer/sharded.py), in the same names and metadata."""
    family = families.get(family)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    state = family.to_comfy(state)
    metadata = {
        "format": "pt",
        META_FAMILY: family.name,
        META_CONFIG: json.dumps(config, sort_keys=True),
        META_PROVENANCE: json.dumps(provenance or {}, sort_keys=True, default=str),
    }
    metadata.update(extra_metadata or {})
    return save_safetensors(state, path, metadata)
