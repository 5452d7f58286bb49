"""The training objectives, as small configurable objects the trainer calls: `loss(dit, batch, rng) -> (loss, logs)`.

DMD2 (`losses_dmd.DMDLoss`, "dmd") and trajectory imitation (`losses_trajectory.TrajectoryLoss`, "trajectory")
live in their own modules and are registered in `LOSSES` at the end of this one.

* `FlowMatchingLoss` (SFT): sigma drawn per sample, `x_t = (1 - sigma) x0 + sigma * noise`, target
  `noise - x0`, MSE weighted per sample. Defaults reproduce DiffSynth's `FlowMatchSFTLoss`: sigma uniform over the
  template's 1000-point training grid (mu 0.8) and its Gaussian loss weights; uniform and logit-normal sampling
  are options.
* `DirectDistillLoss`: for each row, the student runs its own N-step Euler sampler (N and CFG from the row,
  e.g. 4 and 1) from the row's seeded noise, with gradients through every step, and its final latent is pulled
  onto the teacher's by MSE. The target is the teacher's stored final latent when the dataset has one (exact),
  else the VAE encoding of the teacher image (DiffSynth's way, which carries the decode/8-bit/JPEG/encode error).
  The student is trained on the schedule it will sample with (the resolution's mu); `mu="diffsynth"` reproduces
  DiffSynth exactly (0.8 at every resolution). Memory stays flat in N when the DiT uses per-block gradient
  checkpointing: only block inputs are kept per step.

Randomness (sigma, noise, caption dropout) comes from `SampleRNG`: one generator per (seed, step, sample), so a
sample's draws do not depend on the batch it is in, nor on how many processes share the batch. That is what makes
a 2-process run equal a 1-process run with the doubled batch, and a resumed run equal an unbroken one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .conditioning import TextEmbeds
from .errors import DistilleryError
from .noise import initial_noise
from .sampling import euler_denoise
from . import families
from .schedule import TRAINING_MU, mu_for, sigmas, training_schedule
from .velocity import predict_velocity


class SampleRNG:
    """Deterministic per-sample generators: `generator(i)` depends only on (seed, step, the sample's id)."""

    def __init__(self, seed: int, step: int, sample_ids: list):
        self.seed, self.step, self.sample_ids = int(seed), int(step), list(sample_ids)

    def generator(self, i: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for sample i; on `device` so large draws (noise) happen where the data is (a CPU draw per
        sample would keep a GPU waiting at large batch sizes). Draws differ between device types."""
        key = f"{self.seed}/{self.step}/{self.sample_ids[i]}/{purpose}".encode()
        return torch.Generator(device).manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def drop_captions(text: TextEmbeds, empty: TextEmbeds | None, rng: SampleRNG, p: float) -> TextEmbeds:
    """Replace each sample's prompt by the empty prompt with probability p (for CFG; DiffSynth never drops)."""
    if p <= 0:
        return text
    if empty is None:
        raise DistilleryError("caption_dropout", p, "needs the empty-prompt embedding.", "set caption_dropout to 0.")
    drop = [float(torch.rand((), generator=rng.generator(i, "dropout"))) < p for i in range(len(text))]
    if not any(drop):
        return text
    rows = [empty if d else text.select(i) for i, d in enumerate(drop)]
    return TextEmbeds.cat([r.to(text.embeds.device, text.embeds.dtype) for r in rows])


@dataclass
class FlowMatchingLoss:
    """Flow-matching SFT (see the module docstring)."""

    sigma_sampling: str = "diffsynth"  # diffsynth (uniform over the training grid) | uniform | logit_normal
    weighting: str = "diffsynth"  # diffsynth (Gaussian around sigma 0.5, mean 1) | none
    mu: object = "diffsynth"  # the training grid's shift: "diffsynth" (0.8), "resolution", or a number
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_sigma: float = 0.0  # DiffSynth's min/max timestep boundary, as fractions of the grid
    max_sigma: float = 1.0
    template: str | None = None  # default: the family's

    kind = "flow_matching"

    def __post_init__(self):
        _choice("loss.sigma_sampling", self.sigma_sampling, ("diffsynth", "uniform", "logit_normal"))
        _choice("loss.weighting", self.weighting, ("diffsynth", "none"))
        _mu_ok(self.mu)
        if not 0 <= self.min_sigma < self.max_sigma <= 1:
            raise DistilleryError("loss.min_sigma/max_sigma", (self.min_sigma, self.max_sigma),
                                  "need 0 <= min < max <= 1.", "use 0 and 1 for the whole range.")

    def _schedule(self, family, latents: torch.Tensor):
        family = families.get(family)
        template = self.template or family.schedule_template
        if self.mu == "diffsynth":
            mu = TRAINING_MU
        elif self.mu == "resolution":
            mu = mu_for(template, family.image_tokens(*latents.shape[-2:]), 1000)
        else:
            mu = float(self.mu)
        return training_schedule(template, mu=mu)

    def __call__(self, dit, batch: dict, rng: SampleRNG, empty_text: TextEmbeds | None = None,
                 caption_dropout: float = 0.0):
        x0 = image_latents(batch, self.kind).float()
        b = x0.shape[0]
        family = families.of_model(dit)
        schedule = self._schedule(family, x0)
        sig, noise = [], []
        for i in range(b):
            g = rng.generator(i, "sigma")
            if self.sigma_sampling == "diffsynth":
                s = schedule.sample(1, g, self.min_sigma, self.max_sigma)[0]
            elif self.sigma_sampling == "uniform":
                s = self.min_sigma + (self.max_sigma - self.min_sigma) * torch.rand((), generator=g)
            else:
                s = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn((), generator=g))
                s = s.clamp(self.min_sigma, self.max_sigma)
            sig.append(float(s))
            noise.append(torch.randn(x0.shape[1:], generator=rng.generator(i, "noise", x0.device), device=x0.device))
        sigma = torch.tensor(sig, dtype=torch.float32, device=x0.device)
        noise = torch.stack(noise)
        s4 = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s4) * x0 + s4 * noise
        text = drop_captions(batch["text"], empty_text, rng, caption_dropout)
        pred = predict_velocity(dit, x_t, sigma, text).float()
        per_sample = F.mse_loss(pred, noise - x0, reduction="none").flatten(1).mean(1)
        weight = schedule.weight(sigma).to(x0.device) if self.weighting == "diffsynth" else torch.ones_like(sigma)
        loss = (per_sample * weight).mean()
        return loss, {"sigma_mean": float(sigma.mean()), "mse": float(per_sample.mean().detach())}

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass
class DirectDistillLoss:
    """DiffSynth's Direct Distill, unrolled through the student's whole N-step sampler (see the module docstring)."""

    steps: int | None = None  # None = each row's num_inference_steps
    cfg: float | None = None  # None = each row's cfg_scale
    mu: object = "resolution"  # "resolution" (what the student samples with), "diffsynth" (0.8), or a number
    target: str = "auto"  # auto (teacher latents if stored, else encoded image) | latents | image
    template: str | None = None
    default_steps: int = 4  # used when neither `steps` nor the row gives one
    default_cfg: float = 1.0

    kind = "direct_distill"

    def __post_init__(self):
        _choice("loss.target", self.target, ("auto", "latents", "image"))
        _mu_ok(self.mu)
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise DistilleryError("loss.steps", self.steps, "must be a whole number >= 1.", "use e.g. 4.")

    def student_sigmas(self, family, steps: int, latents: torch.Tensor) -> list[float]:
        """The student's schedule (`family`: a name or a `families.Family`)."""
        family = families.get(family)
        template = self.template or family.schedule_template
        if self.mu == "diffsynth":
            return sigmas(template, steps, mu=TRAINING_MU)
        if self.mu == "resolution":
            return sigmas(template, steps, image_seq_len=family.image_tokens(*latents.shape[-2:]))
        return sigmas(template, steps, mu=float(self.mu))

    def row_settings(self, batch: dict, i: int) -> tuple[int, float]:
        steps = self.steps or batch["num_inference_steps"][i] or self.default_steps
        cfg = self.cfg if self.cfg is not None else batch["cfg_scale"][i]
        return int(steps), float(cfg if cfg is not None else self.default_cfg)

    def targets(self, batch: dict) -> torch.Tensor:
        stored = batch.get("target_latents")
        if self.target == "latents" or (self.target == "auto" and stored is not None):
            if stored is None:
                raise DistilleryError("loss.target", "latents", "this dataset stores no teacher latents.",
                                      "use target 'image' (or 'auto'), or generate the dataset with Generate Distill Dataset.")
            return stored.float()
        return image_latents(batch, self.kind).float()

    def __call__(self, dit, batch: dict, rng: SampleRNG, empty_text: TextEmbeds | None = None,
                 caption_dropout: float = 0.0):
        target = self.targets(batch)
        b = target.shape[0]
        family = families.of_model(dit)
        seeds = batch.get("seed") or [None] * b
        if any(s is None for s in seeds):
            raise DistilleryError("dataset", [w for w, s in zip(batch["where"], seeds) if s is None][:3],
                                  "Direct Distill needs each row's seed (the teacher's initial noise).",
                                  "use a dataset made by Generate Distill Dataset, or add seed,rand_device columns.")
        groups: dict[tuple[int, float], list[int]] = {}
        for i in range(b):
            groups.setdefault(self.row_settings(batch, i), []).append(i)
        velocity = partial(predict_velocity, dit)
        total = target.new_zeros(())
        for (steps, cfg), rows in groups.items():
            shape = target.shape[1:]
            noise = torch.cat([initial_noise([seeds[i]], shape, rand_device=batch["rand_device"][i] or "cpu")
                               for i in rows]).to(target.device, torch.float32)
            text = batch["text"].select(rows) if len(rows) < b else batch["text"]
            negative = None
            if cfg != 1.0:
                if empty_text is None:
                    raise DistilleryError("cfg_scale", cfg, "a student CFG != 1 needs the negative (empty) prompt.",
                                          "use cfg 1 (the usual distillation target).")
                negative = empty_text
            x = euler_denoise(velocity, noise, self.student_sigmas(family, steps, target), text,
                              cfg_scale=cfg, negative_text=negative)
            total = total + F.mse_loss(x.float(), target[rows], reduction="sum") / target[0].numel()
        loss = total / b
        return loss, {"groups": len(groups)}

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


LOSSES = {FlowMatchingLoss.kind: FlowMatchingLoss, DirectDistillLoss.kind: DirectDistillLoss}


def image_latents(batch: dict, kind: str) -> torch.Tensor:
    """The batch's image latents, refused by name for a prompts-only batch (losses with `needs_images = False`,
    DMD, train without them; `TrainJob.validate` refuses the others before any work)."""
    if batch.get("latents") is None:
        raise DistilleryError("loss.kind", kind, f"the {kind} loss trains on each row's image, and this batch "
                              "holds prompts only.", 'use the DMD loss ("dmd"), or a dataset with images.')
    return batch["latents"]


def loss_from_dict(data: dict):
    """Build a loss from its JSON description ({"kind": ..., options})."""
    if not isinstance(data, dict) or data.get("kind") not in LOSSES:
        raise DistilleryError("loss.kind", (data or {}).get("kind") if isinstance(data, dict) else data,
                              "unknown loss.", f"use one of {sorted(LOSSES)}.")
    cls = LOSSES[data["kind"]]
    options = {k: v for k, v in data.items() if k != "kind"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise DistilleryError(f"loss.{unknown[0]}", options[unknown[0]], f"is not an option of {data['kind']}.",
                              f"valid options: {sorted(names)}.")
    return cls(**options)


def _choice(name, value, allowed):
    if value not in allowed:
        raise DistilleryError(name, value, "is not one of the allowed values.", f"use one of {list(allowed)}.")


def _mu_ok(mu):
    if mu in ("diffsynth", "resolution"):
        return
    try:
        float(mu)
    except (TypeError, ValueError):
        raise DistilleryError("loss.mu", mu, "must be 'diffsynth', 'resolution' or a number.",
                              "use 'resolution' to train on the schedule the model samples with.") from None


# The losses kept in their own modules (they import this one's helpers inside functions, so either may load first).
from .losses_dmd import DMDLoss  # noqa: E402
from .losses_trajectory import TrajectoryLoss  # noqa: E402

LOSSES.update({DMDLoss.kind: DMDLoss, TrajectoryLoss.kind: TrajectoryLoss})
