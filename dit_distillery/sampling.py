"""The Euler + classifier-free-guidance loop shared by sampling, dataset generation and Direct Distill.

`x <- x + v * (sigma_next - sigma)` over the given sigmas and finally to 0 (DiffSynth's `FlowMatchScheduler.step`
and diffusers' `FlowMatchEulerDiscreteScheduler.step` are this same update). Guidance is DiffSynth's plain
`v_neg + cfg * (v_pos - v_neg)` (diffusers' QwenImagePipeline additionally rescales the norm; DiffSynth, whose
teachers and students we reproduce, does not), with the positive and negative halves in ONE batched DiT call.

Written by hand rather than driving the diffusers scheduler because Direct Distill backpropagates through every
step: the loop must be a pure function of its inputs (no scheduler state, no in-place updates), and the
scheduler's `step` casts to float32 and back, which would fight an autocast training step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .conditioning import TextEmbeds
from .errors import DistilleryError, StopRequested

VelocityFn = Callable[[torch.Tensor, torch.Tensor, TextEmbeds], torch.Tensor]


def guided_velocity(velocity_fn: VelocityFn, x: torch.Tensor, sigma: torch.Tensor, text: TextEmbeds,
                    cfg_scale: float = 1.0, negative_text: TextEmbeds | None = None) -> torch.Tensor:
    """The (guided) velocity at one point: one DiT call on [positive; negative] when cfg != 1."""
    if cfg_scale == 1.0:
        return velocity_fn(x, sigma, text)
    both = TextEmbeds.cat([text, negative_text])
    v_pos, v_neg = velocity_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
    return v_neg + cfg_scale * (v_pos - v_neg)


def _batched(text: TextEmbeds, batch: int, field: str) -> TextEmbeds:
    if len(text) == batch:
        return text
    if len(text) == 1:
        return text.repeat(batch)
    raise DistilleryError(field, len(text), f"{len(text)} prompt embeddings for a batch of {batch} latents.",
                          "give one embedding per latent, or a single one for all.")


def euler_denoise(velocity_fn: VelocityFn, noise: torch.Tensor, sigmas: Sequence[float], text: TextEmbeds, *,
                  cfg_scale: float = 1.0, negative_text: TextEmbeds | None = None,
                  callback: Callable[[int, int, torch.Tensor], None] | None = None,
                  stop: Callable[[], bool] | None = None,
                  states: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise `noise` (at sigmas[0]) through `sigmas` and then to 0; returns the final latents.

    velocity_fn(x, sigma [B], text) -> v (e.g. `functools.partial(predict_velocity, dit)`).
    callback(step, total, x0_preview) after each step: the current clean-image estimate `x - sigma * v`
    (detached), a far more legible preview than the noisy latents. stop() is polled before each step and
    raises `StopRequested`. states(i, x) before step i: the latents at sigmas[i] themselves (what Generate
    Distill Dataset records as the teacher's trajectory). Differentiable when grad is enabled: nothing is
    updated in place.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not 0.0 < s <= 1.0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise DistilleryError("sigmas", sigmas[:8], "must be a non-empty, strictly decreasing list within (0, 1] "
                              "(the final 0 is implied).", "use dit_distillery.schedule.sigmas(...).")
    batch = noise.shape[0]
    text = _batched(text, batch, "text")
    if cfg_scale != 1.0:
        if negative_text is None:
            raise DistilleryError("negative_text", None, f"cfg_scale {cfg_scale} needs negative prompt embeddings.",
                                  "encode the negative prompt (\"\" is fine), or use cfg_scale 1.")
        negative_text = _batched(negative_text, batch, "negative_text")
    x = noise
    total = len(sigmas)
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:] + [0.0])):
        if stop is not None and stop():
            raise StopRequested(f"stopped before step {i + 1} of {total}")
        if states is not None:
            states(i, x)
        sigma = torch.full((batch,), s, device=x.device, dtype=torch.float32)
        v = guided_velocity(velocity_fn, x, sigma, text, cfg_scale, negative_text)
        if callback is not None:
            callback(i + 1, total, (x - s * v).detach())
        x = x + v * (s_next - s)
    return x
