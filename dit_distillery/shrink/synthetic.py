"""Synthetic Qwen-Image sources for memory tests and the benchmark: the real tensor names and shapes, random
values, written tensor by tensor (no model is instantiated, so a multi-GB source costs one tensor of memory).
"""

from __future__ import annotations

import torch

from ..formats import StreamingSafetensorsWriter
from ..families import qwen_image
from .stream import expected_shapes


def full_width_config(num_layers: int, num_attention_heads: int = 24) -> dict:
    """Qwen-Image's real configuration (3072 wide, 128-dim heads, 3584-dim text) with fewer blocks/heads."""
    return dict(qwen_image.QWEN_IMAGE_CONFIG, num_layers=num_layers, num_attention_heads=num_attention_heads)


def write_synthetic_source(path, config: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           prefix: str = "", std: float = 0.02) -> int:
    """Write a random Qwen-Image DiT for `config` to `path` (bare keys, or under `prefix`); returns its bytes.

    Values are windows of one seeded Gaussian pool (16 M values): random enough for scoring, and cheap enough
    that writing is disk-bound. fp8 sources are made by casting the same values.
    """
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=g) * std).to(dtype)
    shapes = expected_shapes(config)
    layout = [(prefix + k, dtype, shape) for k, shape in shapes.items()]
    with StreamingSafetensorsWriter(path, layout) as writer:
        for k, shape in shapes.items():
            n = 1
            for s in shape:
                n *= s
            start = int(torch.randint(0, pool.numel(), (1,), generator=g))
            reps = (start + n + pool.numel() - 1) // pool.numel()
            values = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
            if k.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight",
                           "txt_norm.weight")):
                values = (values.float() + 1).to(dtype)  # RMSNorm scales sit around 1
            writer.write(prefix + k, values.reshape(shape))
        total = writer.total_bytes
    return total
