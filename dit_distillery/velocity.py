"""One call for every DiT family: `predict_velocity(dit, latents, sigma, text) -> velocity`.

Latents travel unpacked `[B, C, h, w]` everywhere in this package; each family's adapter packs them the way its
model expects and unpacks the prediction, so samplers, losses and datasets never see a family's layout.

Each family's adapter is its `Family.velocity` (dit_distillery/families/): how its DiT is called, its time input,
how latents are packed into tokens, and how its output becomes a velocity.

The model may be wrapped (peft `PeftModel`, DDP, `torch.compile`): the wrapper is called (so its hooks run)
and the family is read from the model inside. The latents keep their dtype; the DiT runs in its own.
"""

from __future__ import annotations

import torch

from .conditioning import TextEmbeds
from .errors import DistilleryError


def base_model(dit: torch.nn.Module) -> torch.nn.Module:
    """The bare family model inside peft / DDP / torch.compile wrappers."""
    seen = set()
    while id(dit) not in seen:
        seen.add(id(dit))
        if hasattr(dit, "get_base_model"):  # peft PeftModel
            dit = dit.get_base_model()
        elif hasattr(dit, "_orig_mod"):  # torch.compile
            dit = dit._orig_mod
        elif isinstance(dit, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            dit = dit.module
    return dit


def model_dtype(dit: torch.nn.Module) -> torch.dtype:
    for p in base_model(dit).parameters():
        # fp8-stored weights compute in the dtype of the rest (`fp8.load_weights` / `store_in_fp8`)
        if p.is_floating_point() and p.element_size() > 1:
            return p.dtype
    return torch.float32


def _check(latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeds) -> torch.Tensor:
    if latents.ndim != 4:
        raise DistilleryError("latents", tuple(latents.shape), "expected unpacked latents [B, C, h, w].",
                              "pass the codec's latents, not packed tokens.")
    b = latents.shape[0]
    sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).reshape(-1)
    if sigma.numel() == 1 and b > 1:
        sigma = sigma.expand(b)
    if sigma.numel() != b or len(text) != b:
        raise DistilleryError("batch", (b, sigma.numel(), len(text)), "latents, sigma and text embeddings must have "
                              "the same batch size.", "repeat the prompt embeddings once per latent.")
    return sigma


def predict_velocity(dit: torch.nn.Module, latents: torch.Tensor, sigma, text: TextEmbeds) -> torch.Tensor:
    """The DiT's velocity (noise - x0) at `latents` [B, C, h, w] and noise level `sigma` [B] (or a scalar)."""
    from . import families

    sigma = _check(latents, sigma, text)
    return families.of_model(dit).velocity(dit, latents, sigma, text)
