"""Qwen-Image's DiT, as diffusers' `QwenImageTransformer2DModel` (whose keys ComfyUI shares, unconverted).

We do not re-implement the model: this module holds its real configuration, a tiny one for tests, and how to
read a configuration back from a checkpoint's keys (ComfyUI's UNETLoader does the same from `img_in` and the
block count; we also read the width, heads and text width so shrunk students load too).
"""

from __future__ import annotations

from ..errors import DistilleryError

FAMILY = "qwen_image"

# Qwen/Qwen-Image transformer/config.json (60 blocks, 24 heads x 128 = 3072 wide, 20,430,401,088 parameters).
QWEN_IMAGE_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
QWEN_IMAGE_PARAMS = 20_430_401_088

# Keys that only a Qwen-Image DiT has (ComfyUI's detector uses txt_norm.weight).
SIGNATURE_KEYS = ("txt_norm.weight", "img_in.weight", "txt_in.weight", "proj_out.weight")
BLOCK_PREFIX = "transformer_blocks."


def tiny_config(num_layers: int = 4, num_attention_heads: int = 4, attention_head_dim: int = 16,
                joint_attention_dim: int = 32, latent_channels: int = 16) -> dict:
    """A small config with Qwen-Image's structure (RoPE axes scaled to the head dim) for tests and demos."""
    quarter = attention_head_dim // 4
    if attention_head_dim % 8:
        raise DistilleryError("attention_head_dim", attention_head_dim, "must be a multiple of 8 (RoPE axes).",
                              "use 16, 32, 64 or 128.")
    axes = [quarter, (attention_head_dim - quarter) // 2, (attention_head_dim - quarter) // 2]
    if sum(axes) != attention_head_dim or any(a % 2 for a in axes):
        axes = [attention_head_dim // 4, attention_head_dim * 3 // 8, attention_head_dim * 3 // 8]
    return {
        "patch_size": 2,
        "in_channels": latent_channels * 4,
        "out_channels": latent_channels,
        "num_layers": num_layers,
        "attention_head_dim": attention_head_dim,
        "num_attention_heads": num_attention_heads,
        "joint_attention_dim": joint_attention_dim,
        "guidance_embeds": False,
        "axes_dims_rope": axes,
    }


def is_family(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in SIGNATURE_KEYS)


def block_indices(keys) -> list[int]:
    """Sorted indices of the transformer blocks present in a key set."""
    found = set()
    for k in keys:
        if k.startswith(BLOCK_PREFIX):
            found.add(int(k[len(BLOCK_PREFIX):].split(".", 1)[0]))
    return sorted(found)


def config_from_shapes(shape_of, keys) -> dict:
    """Rebuild a diffusers config from tensor shapes (`shape_of(key) -> tuple`) and the key set."""
    keys = list(keys)
    if not is_family(keys):
        missing = [k for k in SIGNATURE_KEYS if k not in set(keys)]
        raise DistilleryError("source", f"{len(keys)} tensors", f"not a Qwen-Image DiT (missing {missing}).",
                              "give a Qwen-Image diffusion model (e.g. models/diffusion_models/qwen_image_bf16.safetensors "
                              "or a Qwen/Qwen-Image transformer folder).")
    blocks = block_indices(keys)
    if blocks != list(range(len(blocks))):
        raise DistilleryError("source", f"blocks {blocks[:5]}...", "block indices are not contiguous from 0.",
                              "renumber the blocks 0..N-1 (files written by Shrink DiT already are).")
    inner_dim, in_channels = shape_of("img_in.weight")
    joint_dim = shape_of("txt_in.weight")[1]
    out_channels = shape_of("proj_out.weight")[0] // 4
    head_dim = shape_of("transformer_blocks.0.attn.norm_q.weight")[0] if blocks else 128
    if inner_dim % head_dim:
        raise DistilleryError("source", f"width {inner_dim}", f"width is not a multiple of the head dim {head_dim}.",
                              "the file is not a Qwen-Image DiT we can read.")
    config = dict(QWEN_IMAGE_CONFIG)
    config.update(
        in_channels=in_channels, out_channels=out_channels, num_layers=len(blocks),
        attention_head_dim=head_dim, num_attention_heads=inner_dim // head_dim, joint_attention_dim=joint_dim,
    )
    if head_dim != 128:
        config["axes_dims_rope"] = tiny_config(attention_head_dim=head_dim)["axes_dims_rope"]
    return config


def model_class():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel
