"""The one source of initial noise, shared by dataset generation, Direct Distill training and sampling.

Convention (DiffSynth-Studio's `BasePipeline.generate_noise`): for each seed, a fresh
`torch.Generator(rand_device).manual_seed(seed)` draws `torch.randn(shape, dtype=bfloat16, device=rand_device)`
(shape without the batch dimension, e.g. `[16, H/8, W/8]`); the draws are stacked and then moved to the
compute device and dtype. So the noise depends only on (seed, rand_device, shape, draw dtype), never on the
batch it is drawn in, the compute device or the compute dtype: a 50-step teacher sample, the dataset row that
records its seed, and the 4-step student trained on that row start from bit-identical noise. Drawing in bf16
(not fp32 then cast) is what DiffSynth does, so its datasets and ours agree.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch

from .errors import DistilleryError

DRAW_DTYPE = torch.bfloat16
MAX_SEED = 2**63 - 1


def check_seeds(seeds: int | Iterable[int]) -> list[int]:
    """Seeds as a list of ints in [0, 2^63), or a DistilleryError naming the bad one."""
    scalar = isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable) or getattr(seeds, "ndim", 1) == 0
    items = [seeds] if scalar else list(seeds)
    if not items:
        raise DistilleryError("seed", seeds, "no seed given.", "give at least one seed (a whole number >= 0).")
    out = []
    for s in items:
        try:
            if isinstance(s, bool):
                raise TypeError
            s = operator.index(s)  # ints, numpy ints, 0-d integer tensors; not floats or strings
        except TypeError:
            raise DistilleryError("seed", s, "a seed must be a whole number.", "use e.g. 0, 1, 42.") from None
        if not 0 <= s <= MAX_SEED:
            raise DistilleryError("seed", s, f"a seed must be between 0 and {MAX_SEED}.", "use a smaller non-negative seed.")
        out.append(s)
    return out


def _generator(rand_device: str | torch.device) -> torch.Generator:
    try:
        return torch.Generator(rand_device)
    except RuntimeError as exc:
        raise DistilleryError("rand_device", str(rand_device), f"cannot draw random numbers there ({exc}).",
                              "use 'cpu' (the default, the same on every machine) or an available GPU.") from exc


def initial_noise(seeds: int | Iterable[int], shape: Iterable[int], *, rand_device: str | torch.device = "cpu",
                  dtype: torch.dtype = DRAW_DTYPE, device: str | torch.device | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Noise `[len(seeds), *shape]`: one generator per seed on `rand_device`, drawn in `dtype`, then moved.

    `device`/`out_dtype` only say where the result goes; they never change the values (beyond the cast).
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise DistilleryError("shape", shape, "the latent shape must be non-empty and positive.",
                              "check the image height and width.")
    draws = []
    for seed in check_seeds(seeds):
        g = _generator(rand_device).manual_seed(seed)
        draws.append(torch.randn(shape, generator=g, device=rand_device, dtype=dtype))
    noise = torch.stack(draws)
    if device is not None or out_dtype is not None:
        noise = noise.to(device=device, dtype=out_dtype)
    return noise
