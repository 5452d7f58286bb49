"""Build AAADiT: the one preset table and the one builder behind `build-aaadit` and the Build AAADiT node.

Names and descriptions are plain strings, so the command line lists them without importing torch or diffusers
(`--help` stays instant); `preset_config` builds the config itself, importing the model code only then.
`check_config` refuses a config the model rejects before any time is spent, `build` initialises the model
under a seed, and `build_file` saves it as our single file, reusing one made with the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DistilleryError

# name -> what it is for (the CLI's help and the node's tooltip)
PRESETS = {
    "tutorial": "DiffSynth's 128.8M model (1024 wide, 10 blocks, Flux2 VAE, Qwen3-0.6B)",
    "tiny": "fits the built-in 'tiny:aaadit' pipeline",
    "demo": "fits the built-in 'default' pipeline and learns the synthetic shapes on a CPU",
}


def describe_presets() -> str:
    """'tutorial: ... tiny: ... demo: ...' for help texts and tooltips."""
    return " ".join(f"{name}: {text}." for name, text in PRESETS.items())


def preset_config(name: str) -> dict:
    """A fresh (caller-owned) AAADiT config for preset `name`."""
    from . import aaadit

    if name == "tutorial":
        return dict(aaadit.TUTORIAL_CONFIG)
    if name == "tiny":  # the widths of the built-in 'tiny:aaadit' pipeline: tiny Qwen3 (32) and tiny Flux2 VAE (128)
        return aaadit.tiny_config(latent_channels=128, text_width=32)
    if name == "demo":  # the DiT of `tiny.embedded_default_pipeline()` (pixel codec, tiny Qwen3)
        from .. import tiny

        config = aaadit.tiny_config(latent_channels=3 * tiny.DEFAULT_PIXEL_PATCH ** 2, text_width=tiny.DEFAULT_TEXT_WIDTH)
        config.update(tiny.DEFAULT_DIT)
        return config
    raise DistilleryError("preset", name, "unknown preset.", f"use one of {list(PRESETS)}.")


def check_config(config: dict) -> None:
    """A DistilleryError for a config the model rejects (unknown keys, heads not dividing the width, ...), from a
    meta-device build: nothing is allocated."""
    from ..report import build_meta

    build_meta("aaadit", config)


def build(config: dict, *, seed: int = 0, dtype=None):
    """A freshly initialised AAADiT: the config checked first, the weights drawn under `seed` (the caller's RNG is
    left as it was) outside any inference mode, then cast to `dtype` (None keeps fp32)."""
    import torch

    from ..tiny import seeded
    from .aaadit import AAADiT

    check_config(config)
    with torch.inference_mode(False), seeded(int(seed)):
        model = AAADiT(**config)
    if dtype is not None:
        torch.nn.Module.to(model, dtype)  # diffusers' ModelMixin.to warns on every dtype cast
    return model


def made_with(path, provenance: dict) -> bool:
    """Whether `path` is one of our DiT files whose recorded provenance is `provenance` (compared as JSON)."""
    from ..errors import DistilleryError
    from ..formats import TensorSource
    from .registry import META_PROVENANCE

    if not Path(path).is_file():
        return False
    try:
        with TensorSource(path, "out") as src:
            existing = src.metadata_value(META_PROVENANCE)
    except DistilleryError:
        return False
    return json.loads(json.dumps(existing, sort_keys=True)) == json.loads(json.dumps(provenance, sort_keys=True))


def build_file(out, config: dict, *, seed: int = 0, dtype=None, provenance: dict | None = None,
               overwrite: bool = False, field: str = "out") -> bool:
    """Build and save an AAADiT as our single file `out`; True when a file made with the same provenance was
    already there (it is reused, not rewritten). Another existing file is replaced only when `overwrite`, and
    refused before anything is built otherwise (`field` names `out` in the error)."""
    from .registry import save_dit

    check_config(config)
    provenance = dict(provenance or {})
    if made_with(out, provenance):
        return True
    if Path(out).exists() and not overwrite:
        raise DistilleryError(field, str(out), "already exists and was made with other settings.",
                              "choose another name, or turn on overwrite.")
    save_dit(build(config, seed=seed, dtype=dtype), out, provenance=provenance)
    return False
