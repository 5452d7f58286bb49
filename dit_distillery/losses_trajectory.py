"""Trajectory imitation: the student's N-step velocities matched to the teacher's recorded many-step trajectory.

Generate Distill Dataset with `record_trajectory` K stores, beside each row's final latents, the latents before K
of the teacher's steps and their sigmas. The trajectory `X(sigma)` is those points plus the final latents at
sigma 0, linearly interpolated in between (an Euler step moves x linearly in sigma, so this is the teacher's own
path where it was recorded and its chord elsewhere); the teacher's and the student's sigma grids need not share a
point. For each student step `s_i -> s_{i+1}` (and finally to 0) the student, started ON the teacher's path at
`X(s_i)`, must predict the chord velocity `(X(s_{i+1}) - X(s_i)) / (s_{i+1} - s_i)`: the step that lands on the
teacher's path again. Each step is one DiT call on the teacher's path (no gradient runs through the student's
own chain, unlike Direct Distill); the N calls' graphs are kept until the one backward, as Direct Distill's are.

This is DiffSynth's TrajectoryImitationLoss (Z-Image) made generic over families and fed from the dataset instead
of running the teacher in the training step. Its optional image term (DiffSynth: LPIPS between the decoded
student sample and the decoded teacher result) is here the pixel MSE of the two decodings, weight `image_weight`
(default 0; it unrolls the student's N steps from the trajectory's start and decodes with grad through the VAE,
the codec comes from the trainer's `setup`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .conditioning import TextEmbeds
from .errors import DistilleryError
from .sampling import euler_denoise, guided_velocity
from .velocity import predict_velocity
from . import families


def trajectory_at(trajectory: torch.Tensor, sigmas: torch.Tensor, final: torch.Tensor, at: float) -> torch.Tensor:
    """X(at) of one row: `trajectory` [K, ...] at decreasing `sigmas` [K], `final` [...] at sigma 0, linear in
    between. `at` above the first recorded sigma is refused (nothing was recorded there)."""
    points = torch.cat([sigmas.float().cpu(), torch.zeros(1)])
    if at > float(points[0]) + 1e-6 or at < 0:
        raise DistilleryError("trajectory", round(at, 6), f"the student's sigma lies above the recorded trajectory "
                              f"(it starts at {float(points[0]):.6f}).",
                              "record the trajectory from the teacher's first step (Generate Distill Dataset does), "
                              "or use the same schedule template for student and teacher.")
    j = int(torch.searchsorted(-points, torch.tensor([-at]), right=True)[0]) - 1  # points[j] >= at > points[j+1]
    j = min(max(j, 0), len(points) - 2)
    hi, lo = float(points[j]), float(points[j + 1])
    w = (hi - at) / (hi - lo)
    a = trajectory[j]
    b = trajectory[j + 1] if j + 1 < len(trajectory) else final
    return a if w == 0 else (b if w == 1 else torch.lerp(a.float(), b.float(), w))


@dataclass
class TrajectoryLoss:
    """Trajectory imitation (see the module docstring)."""

    steps: int | None = None  # None = each row's num_inference_steps, else default_steps
    cfg: float | None = None  # None = each row's cfg_scale, else default_cfg
    mu: object = "resolution"  # the student's schedule: "resolution", "diffsynth" (0.8) or a number
    template: str | None = None
    weighting: str = "none"  # none | diffsynth (DiffSynth's Gaussian training weight of each step's sigma)
    image_weight: float = 0.0  # pixel MSE of the decoded student sample vs the decoded teacher result
    default_steps: int = 4
    default_cfg: float = 1.0

    kind = "trajectory"

    def __post_init__(self):
        from .losses import _choice, _mu_ok

        _choice("loss.weighting", self.weighting, ("none", "diffsynth"))
        _mu_ok(self.mu)
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise DistilleryError("loss.steps", self.steps, "must be a whole number >= 1.", "use e.g. 4.")
        if not self.image_weight >= 0:
            raise DistilleryError("loss.image_weight", self.image_weight, "must be >= 0.", "use 0 for none.")
        self.codec = None  # set by `setup` for the image term

    def setup(self, ctx) -> None:
        """Take the codec the image term decodes with (`ctx.codec`, or `ctx.pipe.codec`)."""
        self.codec = getattr(ctx, "codec", None) or getattr(getattr(ctx, "pipe", None), "codec", None)

    def unrolled_steps(self) -> int:
        """DiT calls whose activations one training step keeps (the trainer's memory refusal)."""
        return (self.steps or 1) * (2 if self.image_weight > 0 else 1)

    def _distill(self):
        from .losses import DirectDistillLoss

        return DirectDistillLoss(steps=self.steps, cfg=self.cfg, mu=self.mu, template=self.template,
                                 default_steps=self.default_steps, default_cfg=self.default_cfg)

    def __call__(self, dit, batch: dict, rng=None, empty_text: TextEmbeds | None = None,
                 caption_dropout: float = 0.0):
        path, path_sigmas, final = batch.get("trajectory"), batch.get("trajectory_sigmas"), batch.get("target_latents")
        if path is None or path_sigmas is None or final is None:
            raise DistilleryError("dataset", batch.get("where", [])[:3], "the Trajectory loss needs each row's "
                                  "recorded teacher trajectory and final latents.",
                                  "generate the dataset with Generate Distill Dataset and record_trajectory > 0.")
        if self.image_weight > 0 and self.codec is None:
            raise DistilleryError("loss.image_weight", self.image_weight, "the image term needs the codec.",
                                  "set image_weight to 0, or train through train() (it gives the loss the codec).")
        final = final.float()
        device, b = final.device, final.shape[0]
        family = families.of_model(dit)
        distill = self._distill()
        groups: dict[tuple[int, float], list[int]] = {}
        for i in range(b):
            groups.setdefault(distill.row_settings(batch, i), []).append(i)
        schedule = None
        if self.weighting == "diffsynth":
            from .schedule import TRAINING_MU, training_schedule

            schedule = training_schedule(self.template or family.schedule_template, mu=TRAINING_MU)
        velocity = partial(predict_velocity, dit)
        total, image_total = final.new_zeros(()), final.new_zeros(())
        for (steps, cfg), rows in groups.items():
            negative = None
            if cfg != 1.0:
                if empty_text is None:
                    raise DistilleryError("cfg_scale", cfg, "a student CFG != 1 needs the negative (empty) prompt.",
                                          "use cfg 1 (the usual distillation target).")
                negative = empty_text.to(device)
            text = batch["text"].select(rows) if len(rows) < b else batch["text"]
            grid = distill.student_sigmas(family, steps, final)
            points = [torch.stack([trajectory_at(path[i], path_sigmas[i], final[i], s) for i in rows]).to(device)
                      for s in grid + [0.0]]
            for k, (s, s_next) in enumerate(zip(grid, grid[1:] + [0.0])):
                sigma = torch.full((len(rows),), s, device=device)
                v = guided_velocity(velocity, points[k], sigma, text, cfg, negative).float()
                target = (points[k + 1] - points[k]) / (s_next - s)
                per_sample = F.mse_loss(v, target, reduction="none").flatten(1).mean(1)
                weight = float(schedule.weight(torch.tensor([s]))[0]) if schedule is not None else 1.0
                total = total + weight * per_sample.sum() / steps
            if self.image_weight > 0:
                x = euler_denoise(velocity, points[0], grid, text, cfg_scale=cfg, negative_text=negative)
                with torch.no_grad():
                    want = self.codec.decode(final[rows]).float()
                got = self.codec.decode(x).float()
                image_total = image_total + F.mse_loss(got, want.to(got.device), reduction="none").flatten(1).mean(1).sum()
        loss = total / b + self.image_weight * image_total.to(total.device) / b
        return loss, {"groups": len(groups), "trajectory": float(total.detach()) / b,
                      "image": float(image_total.detach()) / b}

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}
