"""Sigma schedules: DiffSynth-Studio's templates, computed by diffusers' `FlowMatchEulerDiscreteScheduler`.

Every template starts from the same evenly spaced `linspace(1, 1/N, N)` and applies the exponential time shift
`sigma' = e^mu / (e^mu + 1/sigma - 1)`; they differ only in how mu is chosen and whether the last value is
stretched to a terminal sigma:

| template | mu from the resolution (L = packed image tokens) | terminal |
|---|---|---|
| "Qwen-Image" | diffusers' `calculate_shift(L, 256, 8192, 0.5, 0.9)` | 0.02 |
| "Qwen-Image-Lightning" | ln 3 whatever L | none |
| "FLUX.2" | diffusers' `compute_empirical_mu(L, N)` | none |

A family may add templates of its own (`Family.schedule_templates`: scheduler settings, and "mu_rule":
"empirical" for FLUX.2's rule, else diffusers' `calculate_shift`); `template_for(family)` is the one it was
trained with.

Without a resolution DiffSynth uses mu = 0.8 ("it yields better training results"): that is what its training
grid and its Direct Distill student schedule use. Here the caller picks: `mu=`, `image_seq_len=` (the
resolution's own mu, what inference uses), or `training=True` (DiffSynth's fixed 0.8).

The diffusers scheduler has no training-time loss weights, so `TrainingSchedule` adds DiffSynth's (a Gaussian
around sigma 0.5 over the 1000-step grid, normalised to mean 1) by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DistilleryError

TEMPLATES = ("Qwen-Image", "Qwen-Image-Lightning", "FLUX.2")  # built in; families may add more (`templates()`)
TRAINING_MU = 0.8  # DiffSynth's mu whenever no resolution is given (training grid, Direct Distill student)
TRAIN_STEPS = 1000
MU_POLICIES = ("diffsynth", "resolution")

_QWEN = dict(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02)
# Qwen/Qwen-Image scheduler/scheduler_config.json, and the Lightning LoRAs' published config (mu = ln 3, no terminal).
SCHEDULER_CONFIGS = {
    "Qwen-Image": dict(_QWEN),
    "Qwen-Image-Lightning": dict(_QWEN, base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None),
    # base/max shift unused: FLUX.2's mu is empirical
    "FLUX.2": dict(_QWEN, shift_terminal=None, mu_rule="empirical"),
}
_COMMON = dict(num_train_timesteps=1000, shift=1.0, time_shift_type="exponential", use_dynamic_shifting=True)


def _templates() -> dict[str, dict]:
    """Every template: the built-in ones, then those the families add."""
    from . import families

    table = dict(SCHEDULER_CONFIGS)
    for family in families.all():
        for name, config in family.schedule_templates.items():
            table.setdefault(name, dict(config))
    return table


def templates() -> tuple[str, ...]:
    """Names of every sigma schedule template."""
    return tuple(_templates())


def _config(template: str) -> dict:
    table = _templates()
    if template not in table:
        raise DistilleryError("template", template, "unknown sigma schedule template.", f"use one of {list(table)}.")
    return dict(_COMMON, **table[template])


def _check_template(template: str) -> str:
    _config(template)
    return template


def template_for(family: str) -> str:
    """The schedule a DiT family was trained with (its `Family.schedule_template`)."""
    from . import families

    return families.get(family).schedule_template


def scheduler(template: str):
    """A diffusers `FlowMatchEulerDiscreteScheduler` configured as the template (what a diffusers folder saves)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = _config(template)
    config.pop("mu_rule", None)
    return FlowMatchEulerDiscreteScheduler(**config)


def mu_for(template: str, image_seq_len: int, num_steps: int) -> float:
    """The resolution-dependent shift DiffSynth and diffusers use at inference (`image_seq_len` = packed tokens)."""
    c = _config(template)
    if c.get("mu_rule") == "empirical":
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return float(compute_empirical_mu(int(image_seq_len), int(num_steps)))
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    # (a template without these settings gets diffusers' scheduler defaults; with a static shift, mu is unused)
    return float(calculate_shift(int(image_seq_len), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                 c.get("base_shift", 0.5), c.get("max_shift", 1.15)))


def training_mu(policy: str, template: str, image_seq_len: int | None = None, num_steps: int = TRAIN_STEPS) -> float:
    """mu for training: "diffsynth" = DiffSynth's fixed 0.8; "resolution" = the same mu inference will use."""
    if policy == "diffsynth":
        return TRAINING_MU
    if policy == "resolution":
        if image_seq_len is None:
            raise DistilleryError("mu_policy", policy, "needs the image size to compute the resolution's mu.",
                                  "give the training height and width, or use mu_policy 'diffsynth'.")
        return mu_for(template, image_seq_len, num_steps)
    raise DistilleryError("mu_policy", policy, "unknown mu policy.", f"use one of {list(MU_POLICIES)}.")


def sigmas(template: str, num_steps: int, *, image_seq_len: int | None = None, mu: float | None = None,
           training: bool = False) -> list[float]:
    """The N sigmas of a template, from 1 down (the final 0 the sampler steps to is not included).

    mu: explicit > DiffSynth's training 0.8 when `training` > the resolution's when `image_seq_len` > 0.8.
    """
    _check_template(template)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise DistilleryError("steps", num_steps, "must be a whole number of steps, at least 1.", "use e.g. 4, 8 or 30.")
    if num_steps == 1:
        # every template starts at sigma 1; with one step the terminal stretch is 0/0 (NaN in both DiffSynth and
        # diffusers), and the only sensible schedule is the single jump from pure noise to 0
        return [1.0]
    if mu is None:
        mu = TRAINING_MU if training or image_seq_len is None else mu_for(template, image_seq_len, num_steps)
    sched = scheduler(template)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=float(mu))
    return [float(s) for s in sched.sigmas[:-1]]


def diffsynth_training_weights(grid: torch.Tensor) -> torch.Tensor:
    """DiffSynth's `set_training_weight`: exp(-2 (sigma - 0.5)^2), minus its minimum, scaled to mean 1.

    Written by hand because diffusers' scheduler has no such weights. Only the 1000-point grid is supported
    (DiffSynth's "empirical" rescale for other lengths is not reproduced).
    """
    y = torch.exp(-2 * (grid.double() - 0.5) ** 2)
    y = y - y.min()
    return (y * len(grid) / y.sum()).float()


@dataclass(frozen=True)
class TrainingSchedule:
    """The 1000-sigma training grid of a template with DiffSynth's per-sigma loss weights (mean 1).

    SFT draws grid indices uniformly (`sample`), noises with the picked sigma and weights the loss with
    `weight(sigma)`. Unlike DiffSynth we keep sigma in float32 (DiffSynth casts the timestep to bf16, which
    merges neighbouring grid points near sigma 1).
    """

    template: str
    mu: float
    sigmas: torch.Tensor  # [1000], float32, 1 -> terminal
    weights: torch.Tensor  # [1000], float32, mean 1

    def sample(self, n: int, generator: torch.Generator | None = None, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        """n grid sigmas drawn uniformly over indices [lo*len, hi*len) (DiffSynth's min/max timestep boundary)."""
        size = len(self.sigmas)
        start, stop = int(lo * size), max(int(hi * size), int(lo * size) + 1)
        idx = torch.randint(start, min(stop, size), (n,), generator=generator)
        return self.sigmas[idx]

    def index(self, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1).cpu()
        return (self.sigmas.reshape(1, -1) - sigma).abs().argmin(1)

    def weight(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Loss weight of the grid point nearest each sigma (DiffSynth's `training_weight`)."""
        return self.weights[self.index(sigma)]


def training_schedule(template: str, *, mu: float | None = None, image_seq_len: int | None = None,
                      mu_policy: str = "diffsynth") -> TrainingSchedule:
    """The training grid: DiffSynth's `set_timesteps(1000, training=True)` (mu 0.8) unless told otherwise."""
    if mu is None:
        mu = training_mu(mu_policy, template, image_seq_len, TRAIN_STEPS)
    grid = torch.tensor(sigmas(template, TRAIN_STEPS, mu=mu), dtype=torch.float32)
    return TrainingSchedule(template, float(mu), grid, diffsynth_training_weights(grid))
