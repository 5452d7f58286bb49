"""Build AAADiT's named starting configs: the one table behind `build-aaadit --preset` and the Build AAADiT node.

Names and descriptions are plain strings, so the command line lists them without importing torch or diffusers
(`--help` stays instant); `preset_config` builds the config itself, importing the model code only then.
"""

from __future__ import annotations

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
    if name == "tiny":  # the widths of `tiny.tiny_pipeline("aaadit")`: tiny Qwen3 (32) and tiny Flux2 VAE (128)
        return aaadit.tiny_config(latent_channels=128, text_width=32)
    if name == "demo":  # the DiT of `tiny.embedded_default_pipeline()` (pixel codec, tiny Qwen3)
        from .. import tiny

        config = aaadit.tiny_config(latent_channels=3 * tiny.DEFAULT_PIXEL_PATCH ** 2, text_width=tiny.DEFAULT_TEXT_WIDTH)
        config.update(tiny.DEFAULT_DIT)
        return config
    raise DistilleryError("preset", name, "unknown preset.", f"use one of {list(PRESETS)}.")
