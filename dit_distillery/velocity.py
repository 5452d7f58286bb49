"""One call for every DiT family: `predict_velocity(dit, latents, sigma, text) -> velocity`.

Latents travel unpacked `[B, C, h, w]` everywhere in this package; each family's adapter packs them the way its
model expects and unpacks the prediction, so samplers, losses and datasets never see a family's layout.

* Qwen-Image (diffusers `QwenImageTransformer2DModel`): 2x2 patches packed into tokens in the order of diffusers'
  `QwenImagePipeline._pack_latents`, `img_shapes = [[(1, h/2, w/2)]] * B` for RoPE, and `timestep = sigma`:
  diffusers' pipeline passes `t / 1000` and the model's time projection multiplies by 1000 again. The prompt
  mask goes in as `encoder_hidden_states_mask`.
* AAADiT: `dit(latents, prompt_embeds, timestep=sigma * 1000, text_mask)`, as DiffSynth's tutorial.

The model may be wrapped (peft `PeftModel`, DDP, `torch.compile`): the wrapper is called (so its hooks run)
and the family is read from the model inside. The latents keep their dtype; the DiT runs in its own.
"""

from __future__ import annotations

import torch
from einops import rearrange

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


def family_of(dit: torch.nn.Module) -> str:
    from .models.registry import family_of as registry_family_of

    return registry_family_of(base_model(dit))


def model_dtype(dit: torch.nn.Module) -> torch.dtype:
    for p in base_model(dit).parameters():
        if p.is_floating_point():
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


def qwen_image_velocity(dit, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeds) -> torch.Tensor:
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise DistilleryError("latents", tuple(latents.shape), "Qwen-Image packs 2x2 patches: h and w must be even.",
                              "use an image size that is a multiple of 16.")
    dtype = model_dtype(dit)
    # == QwenImagePipeline._pack_latents: view(b, c, h/2, 2, w/2, 2).permute(0, 2, 4, 1, 3, 5)
    tokens = rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2).to(dtype)
    text = text.trimmed()
    mask = None if text.mask is None or bool(text.mask.all()) else text.mask.to(latents.device)
    out = dit(hidden_states=tokens, encoder_hidden_states=text.embeds.to(latents.device, dtype),
              encoder_hidden_states_mask=mask, timestep=sigma.to(dtype), img_shapes=[[(1, h // 2, w // 2)]] * b,
              return_dict=False)[0]
    return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=h // 2, p=2, q=2).to(latents.dtype)


def aaadit_velocity(dit, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeds) -> torch.Tensor:
    dtype = model_dtype(dit)
    mask = None if text.mask is None else text.mask.to(latents.device)
    out = dit(latents.to(dtype), text.embeds.to(latents.device, dtype), (sigma * 1000).to(dtype), mask)
    return out.to(latents.dtype)


_ADAPTERS = {"qwen_image": qwen_image_velocity, "aaadit": aaadit_velocity}


def predict_velocity(dit: torch.nn.Module, latents: torch.Tensor, sigma, text: TextEmbeds) -> torch.Tensor:
    """The DiT's velocity (noise - x0) at `latents` [B, C, h, w] and noise level `sigma` [B] (or a scalar)."""
    sigma = _check(latents, sigma, text)
    return _ADAPTERS[family_of(dit)](dit, latents, sigma, text)
