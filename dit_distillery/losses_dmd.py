"""DMD2 (distribution matching distillation) for any family: prompts in, no teacher images needed.

Three networks, one of them trained online beside the student:

* the generator is the student: `steps` Euler steps (1, 2, 4, ...) on its own schedule, CFG 1;
* the real score is the frozen teacher with CFG `teacher_cfg` (negative = the empty prompt);
* the fake score is a LoRA (`fake_rank`, `fake_targets`) on the teacher, trained by flow matching on the student's
  samples, `fake_updates` times per generator update (DMD2's two time-scale rule, 5). When the student is the
  teacher plus a LoRA (mode lora, no separate teacher), the three share ONE base: the student's adapter, the fake
  adapter and the bare base (the teacher) are switched per call (peft multi-adapter). A separate teacher (a shrunk
  student, or full fine-tuning, where the student's weights move) carries the fake adapter itself.

Generator step: backward simulation (DMD2's, for multi-step students): the student runs its own sampler from noise without grad for a
random number k of its steps to the x_k it will see at sampling time, then one step with grad gives its clean
estimate `x0 = x_k - s_k v`. That sample is noised to a random sigma t in [min_sigma, max_sigma], both scores
give clean estimates there, and the DMD gradient `(x0_fake - x0_real) / mean|x0 - x0_real|` (per sample, DMD's
normalisation) enters as `0.5 * mse(x0, stopgrad(x0 - grad))`, whose gradient is exactly it. With
`regression_weight` > 0 and a batch holding teacher latents (a Generate Distill Dataset folder), Direct Distill's
loss on those pairs is added (DMD's regression term). No GAN term.

The trainer's loss protocol (`trainer.setup`): `setup(ctx)` once before training and any resume (`attach` is the
same without a trainer), `before_step(step, next_batch)` before each generator update (the fake-score updates,
each on the next batch of the run's data, with their own AdamW), and `state_dict()` / `load_state_dict()` (the
fake LoRA and its optimiser state) for an exact resume. The student's trainables, optimiser and exported weights
never include the fake adapter: its parameters require grad only inside a fake update.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .conditioning import TextEmbeds
from .errors import DistilleryError
from .sampling import guided_velocity
from .velocity import base_model, predict_velocity
from . import families

FAKE_ADAPTER = "dmd_fake"


def _tuner_layers(model: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def active_adapter(model: torch.nn.Module, name: str | None):
    """Run `model` with only adapter `name` active (None: none, the bare base), then restore the adapters and
    every flag peft's switches touch (requires_grad included: the trainer's trainables must not change).
    Backward passes through these calls must happen inside the block (gradient checkpointing recomputes there)."""
    layers = _tuner_layers(model)
    saved = [(m, list(m.active_adapters), m.disable_adapters, [(p, p.requires_grad) for p in m.parameters()])
             for m in layers]
    try:
        for m in layers:
            if name is None:
                m.enable_adapters(False)
            else:
                m.enable_adapters(True)
                m.set_adapter(name)
        yield model
    finally:
        for m, active, disabled, grads in saved:
            m.set_adapter(active)
            m.enable_adapters(not disabled)
            for p, flag in grads:
                p.requires_grad_(flag)


def add_fake_adapter(model: torch.nn.Module, targets, rank: int, alpha: float | None) -> list[torch.nn.Parameter]:
    """Inject the fake-score LoRA as a second adapter (its B is zero: fake = teacher at the start, as DMD2 starts
    the fake score from the teacher); the model's other adapters stay active and every requires_grad as it was.
    Returns its parameters (fp32, requires_grad False until a fake update)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from .lora_presets import parse_targets

    if rank < 1:
        raise DistilleryError("loss.fake_rank", rank, "must be at least 1.", "use e.g. 16.")
    if targets in (None, "", "preset"):
        targets = families.of_model(model).default_lora_preset
    suffixes = parse_targets(targets)
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and ".lora_" not in n]
    linears = [n[: -len(".base_layer")] if n.endswith(".base_layer") else n for n in linears]  # already adapted
    names = sorted({n for n in linears for s in suffixes if n == s or n.endswith("." + s)})
    missing = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in linears)]
    if missing:
        raise DistilleryError("loss.fake_targets", targets, f"{missing} match no Linear layer of "
                              f"{type(model).__name__}.", "use 'preset' (the family's LoRA targets).")
    before = {m: list(m.active_adapters) for m in _tuner_layers(model)}
    resting = sorted({a for active in before.values() for a in active})  # what plain calls use: the student's
    grads = [(p, p.requires_grad) for p in model.parameters()]
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), target_modules=names,
                        init_lora_weights=True)
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(config, model, adapter_name=FAKE_ADAPTER)
    params = []
    for m in model.modules():
        if isinstance(m, LoraLayer) and FAKE_ADAPTER in m.lora_A:
            m.set_adapter(before.get(m, resting))  # injecting made the fake adapter the active one everywhere
            for sub in (m.lora_A[FAKE_ADAPTER], m.lora_B[FAKE_ADAPTER]):
                sub.weight.data = sub.weight.data.float()
                params.append(sub.weight)
    for p, flag in grads:  # peft's switches set requires_grad: the trainer's trainables stay as they were
        p.requires_grad_(flag)
    for p in params:
        p.requires_grad_(False)
    return params


@dataclass
class DMDLoss:
    """DMD2 without GAN (see the module docstring)."""

    steps: int | None = None  # the student's steps; None = each row's num_inference_steps, else default_steps
    default_steps: int = 4
    teacher_cfg: float = 4.0  # the real score's CFG
    fake_updates: int = 5  # fake-score updates per generator update (DMD2: 5)
    fake_rank: int = 16
    fake_alpha: float | None = None  # None = fake_rank
    fake_targets: object = "preset"  # the family's LoRA preset, a preset name or module-name suffixes
    fake_lr: float | None = None  # None = the job's learning rate
    fake_weight_decay: float = 0.0
    min_sigma: float = 0.02  # where the scores are compared (DMD: t in [0.02, 0.98])
    max_sigma: float = 0.98
    mu: object = "resolution"  # the student's schedule: "resolution", "diffsynth" (0.8) or a number
    template: str | None = None
    regression_weight: float = 0.0  # Direct Distill on (seed, teacher latents) pairs, when the batch has them
    backward_simulation: bool = True  # False: the student is trained at its first step only (from pure noise)

    kind = "dmd"
    needs_images = False  # prompts are all it needs: a prompts-only dataset (data.prompts) is accepted

    def __post_init__(self):
        from .losses import _mu_ok

        _mu_ok(self.mu)
        for name in ("fake_updates", "fake_rank", "default_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "fake_updates" else 1):
                raise DistilleryError(f"loss.{name}", value, "must be a whole number >= "
                                      f"{0 if name == 'fake_updates' else 1}.", "see the DMD Loss node's defaults.")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise DistilleryError("loss.steps", self.steps, "must be a whole number >= 1.", "use 1, 2 or 4.")
        if not 0 < self.min_sigma < self.max_sigma <= 1:
            raise DistilleryError("loss.min_sigma/max_sigma", (self.min_sigma, self.max_sigma),
                                  "need 0 < min < max <= 1.", "use DMD's 0.02 and 0.98.")
        if not self.teacher_cfg > 0:
            raise DistilleryError("loss.teacher_cfg", self.teacher_cfg, "must be > 0.", "use e.g. 4 (1 = no CFG).")
        for name in ("regression_weight", "fake_weight_decay"):
            if not getattr(self, name) >= 0:
                raise DistilleryError(f"loss.{name}", getattr(self, name), "must be >= 0.", "use 0 for none.")
        if self.fake_lr is not None and not self.fake_lr > 0:
            raise DistilleryError("loss.fake_lr", self.fake_lr, "must be > 0.", "leave it empty for the job's lr.")
        # run-time state (not settings): made by setup()
        self.student = None
        self.host = None  # the teacher, carrying the fake adapter (the student's own base when `shared`)
        self.shared = False
        self.fake_params: list[torch.nn.Parameter] = []
        self.optimizer = None
        self.empty_text, self.caption_dropout, self.accelerator = None, 0.0, None

    # ------------------------------------------------------------------------------------------------------
    # set-up and state

    def check_job(self, job) -> None:
        """Refuse, when the job is validated (before any work), what `setup` could not do."""
        if job.model.dit and not job.model.teacher:
            raise DistilleryError("model.teacher", None, "DMD needs the teacher: model.dit replaces the pipeline's "
                                  "DiT with the student.", "set model.teacher to the teacher's DiT file.")

    def setup(self, ctx) -> None:
        """The trainer's hook (`trainer.setup.LossContext`): the student is `ctx.model.dit`; the teacher is
        `job.model.teacher` (a DiT file) when given, else the student's base (mode lora) or a copy of the student
        as it is before any update (mode full); the fake score's lr is the job's unless `fake_lr` is set."""
        from .pipelines.loading import load_dit
        from .trainer.setup import base_dtype

        job = ctx.job
        dtype = base_dtype(job, ctx.device)
        self.check_job(job)
        teacher = None
        if job.model.teacher:
            fp8_base = getattr(job, "base_dtype", "bf16") == "fp8"  # stored as the student's base is, then placed
            teacher = load_dit(job.model.teacher, dtype=dtype, device="cpu" if fp8_base else ctx.device,
                               field="model.teacher")
            if fp8_base:
                from .fp8 import store_in_fp8

                store_in_fp8(teacher.requires_grad_(False), dtype)
                teacher.to(ctx.device)
        self.attach(ctx.model.dit, teacher=teacher, lr=job.optim.lr, empty_text=ctx.data.empty,
                    caption_dropout=job.data.caption_dropout, accelerator=ctx.accelerator, dtype=dtype)

    def attach(self, student: torch.nn.Module, *, teacher: torch.nn.Module | None = None, lr: float | None = None,
               empty_text: TextEmbeds | None = None, caption_dropout: float = 0.0, accelerator=None,
               dtype: torch.dtype | None = None) -> None:
        """Build the fake score and its optimiser for `student` (adapters already added). `teacher`: a separate
        teacher DiT; without one the teacher is the student's base when the student is a LoRA (one base, the
        adapters switched per call), else a copy of the student now (in `dtype`). Call before any update."""
        dit = base_model(student)
        has_lora = any(".lora_A." in n for n, p in dit.named_parameters() if p.requires_grad)
        self.shared = teacher is None and has_lora
        if self.shared:
            host = dit  # the teacher is this base with every adapter off
        else:
            if teacher is None:  # full training moves the student's own weights: keep them as they are now
                teacher = copy.deepcopy(dit)
                if dtype is not None:
                    teacher.to(dtype)
            host = base_model(teacher)
            for p in host.parameters():
                p.requires_grad_(False)
            host.eval()
        self.fake_params = add_fake_adapter(host, self.fake_targets, self.fake_rank, self.fake_alpha)
        self.student, self.host = student, host
        lr = self.fake_lr if self.fake_lr is not None else lr
        if lr is None:
            raise DistilleryError("loss.fake_lr", None, "no learning rate for the fake score.",
                                  "set fake_lr, or train through train() (the job's lr is used).")
        self.optimizer = torch.optim.AdamW(self.fake_params, lr=float(lr), weight_decay=self.fake_weight_decay)
        self.empty_text, self.caption_dropout, self.accelerator = empty_text, caption_dropout, accelerator

    def unrolled_steps(self) -> int:
        """DiT calls whose activations the generator's step keeps (the trainer's memory refusal): one, plus Direct
        Distill's unrolled sampler for the regression term."""
        return 1 + ((self.steps or 1) if self.regression_weight > 0 else 0)

    def _ready(self):
        if self.optimizer is None:
            raise DistilleryError("loss", self.kind, "the DMD loss was not set up (it has no fake score yet).",
                                  "call loss.setup(ctx) or loss.attach(student, ...) before training (train() does).")

    def state_dict(self) -> dict:
        """The fake LoRA and its AdamW state: what an exact resume needs (the trainer checkpoints it)."""
        self._ready()
        return {"fake": [p.detach().float().cpu().clone() for p in self.fake_params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}  # a snapshot, not live tensors

    def load_state_dict(self, state: dict) -> None:
        self._ready()
        fake = list(state.get("fake") or [])
        shapes = [tuple(p.shape) for p in self.fake_params]
        if [tuple(t.shape) for t in fake] != shapes:
            raise DistilleryError("resume", f"{len(fake)} fake-score tensors", f"the DMD fake score has {len(shapes)} "
                                  "of other shapes.", "resume with the same loss settings (fake_rank, fake_targets).")
        with torch.no_grad():
            for p, value in zip(self.fake_params, fake):
                p.copy_(value.to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------------------------------------------------
    # the three networks

    def _real_velocity(self, x, sigma, text, negative):
        with active_adapter(self.host, None):
            return guided_velocity(partial(predict_velocity, self.host), x, sigma, text, self.teacher_cfg,
                                   negative)

    def _fake_velocity(self, x, sigma, text):
        with active_adapter(self.host, FAKE_ADAPTER):
            return predict_velocity(self.host, x, sigma, text)

    def student_sigmas(self, family, steps: int, latents: torch.Tensor) -> list[float]:
        from .losses import DirectDistillLoss

        return DirectDistillLoss(mu=self.mu, template=self.template).student_sigmas(family, steps, latents)

    def row_steps(self, batch: dict, i: int) -> int:
        rows = batch.get("num_inference_steps") or [None] * len(batch["text"])
        return int(self.steps or rows[i] or self.default_steps)

    def generate(self, dit, batch: dict, rng, tag: str, grad: bool = True):
        """The student's samples by backward simulation: per row a random step k of its own schedule, x_k reached
        by its own sampler from noise without grad, then one step (with grad when `grad`) to its clean estimate.
        Returns (x0 [B, C, h, w], x_k, sigma_k [B])."""
        shape = _latent_shape(batch)
        text = batch["text"]
        b, device = len(text), text.embeds.device
        family = families.of_model(dit)
        velocity = partial(predict_velocity, dit)
        probe = torch.empty((1, *shape))
        groups: dict[int, list[int]] = {}
        for i in range(b):
            groups.setdefault(self.row_steps(batch, i), []).append(i)
        x0, xk, sk = [None] * b, [None] * b, [None] * b
        for steps, rows in groups.items():
            grid = self.student_sigmas(family, steps, probe)
            k = [int(torch.randint(steps, (), generator=rng.generator(i, f"{tag}/step")))
                 if self.backward_simulation else 0 for i in rows]
            x = torch.stack([torch.randn(shape, generator=rng.generator(i, f"{tag}/noise", device), device=device)
                             for i in rows])
            sub = text.select(rows) if len(rows) < b else text
            with torch.no_grad():
                for j in range(max(k)):
                    idx = [n for n, kk in enumerate(k) if kk > j]
                    sigma = torch.full((len(idx),), grid[j], device=device)
                    v = velocity(x[idx], sigma, sub.select(idx) if len(idx) < len(rows) else sub).float()
                    x[idx] = x[idx] + v * (grid[j + 1] - grid[j])
            sigma = torch.tensor([grid[kk] for kk in k], device=device, dtype=torch.float32)
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                out = x - sigma.view(-1, 1, 1, 1) * velocity(x, sigma, sub).float()
            for n, i in enumerate(rows):
                x0[i], xk[i], sk[i] = out[n], x[n], sigma[n]
        return torch.stack(x0), torch.stack(xk), torch.stack(sk)

    def _noised(self, x0: torch.Tensor, rng, tag: str):
        """x0 noised to a per-row sigma drawn uniformly in [min_sigma, max_sigma]: (x_t, t, noise)."""
        b, device = x0.shape[0], x0.device
        t = torch.stack([self.min_sigma + (self.max_sigma - self.min_sigma)
                         * torch.rand((), generator=rng.generator(i, f"{tag}/sigma")) for i in range(b)]).to(device)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=rng.generator(i, f"{tag}/eps", device), device=device)
                             for i in range(b)])
        t4 = t.view(-1, 1, 1, 1)
        return (1 - t4) * x0 + t4 * noise, t.float(), noise

    # ------------------------------------------------------------------------------------------------------
    # the fake score's updates

    def _autocast(self):
        """The student's precision (the trainer runs its forward under the accelerator's autocast; a bf16 base
        with fp32 adapters needs it outside too)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def fake_update(self, x0: torch.Tensor, text: TextEmbeds, rng, tag: str = "fake") -> float:
        """One flow-matching step of the fake score on (detached) student samples `x0`; returns its loss. With
        several processes the gradients are averaged first, so every process keeps the same fake score."""
        self._ready()
        x_t, t, noise = self._noised(x0.detach().float(), rng, tag)
        try:
            with active_adapter(self.host, FAKE_ADAPTER), self._autocast():
                for p in self.fake_params:  # trained here only (the switch restores every flag on exit)
                    p.requires_grad_(True)
                v = predict_velocity(self.host, x_t, t, text).float()
                loss = F.mse_loss(v, noise - x0.detach().float())
                loss.backward()
            if self.accelerator is not None and self.accelerator.num_processes > 1:
                for p in self.fake_params:
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            for p in self.fake_params:
                p.requires_grad_(False)
        return float(loss.detach())

    def fake_step(self, batch: dict, rng) -> float:
        """One fake-score update on fresh student samples for this batch's prompts."""
        self._ready()
        text = _dropped(batch, rng, self.empty_text, self.caption_dropout)
        with torch.no_grad(), self._autocast():
            x0, _, _ = self.generate(self.student, dict(batch, text=text), rng, "fake", grad=False)
        return self.fake_update(x0, text, rng, "fake")

    def before_step(self, step: int, next_batch) -> dict:
        """The trainer's hook: `fake_updates` fake-score updates before each student update, each on the next
        batch of the run's data stream (`next_batch() -> (batch, rng)`)."""
        losses = [self.fake_step(*next_batch()) for _ in range(self.fake_updates)]
        return {"fake_loss": sum(losses) / len(losses)} if losses else {}

    # ------------------------------------------------------------------------------------------------------
    # the generator's loss

    def __call__(self, dit, batch: dict, rng, empty_text: TextEmbeds | None = None, caption_dropout: float = 0.0):
        self._ready()
        empty_text = empty_text if empty_text is not None else self.empty_text
        text = _dropped(batch, rng, empty_text, caption_dropout)
        negative = None
        if self.teacher_cfg != 1.0:
            if empty_text is None:
                raise DistilleryError("loss.teacher_cfg", self.teacher_cfg, "the real score's CFG needs the "
                                      "negative (empty) prompt.", "train through train(), or use teacher_cfg 1.")
            negative = empty_text.to(text.embeds.device)
            negative = negative.repeat(len(text)) if len(negative) == 1 else negative
        x0, _, _ = self.generate(dit, dict(batch, text=text), rng, "gen")
        x_t, t, _ = self._noised(x0.detach().float(), rng, "gen")
        with torch.no_grad():
            x0_real = x_t - t.view(-1, 1, 1, 1) * self._real_velocity(x_t, t, text, negative).float()
            x0_fake = x_t - t.view(-1, 1, 1, 1) * self._fake_velocity(x_t, t, text).float()
            scale = (x0.detach() - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6).view(-1, 1, 1, 1)
            grad = (x0_fake - x0_real) / scale
            target = x0.detach() - grad
        dmd = 0.5 * F.mse_loss(x0, target)
        loss, logs = dmd, {"dmd": float(dmd.detach())}
        if self.regression_weight > 0 and batch.get("target_latents") is not None:
            from .losses import DirectDistillLoss

            regression, _ = DirectDistillLoss(steps=self.steps, cfg=1.0, mu=self.mu, template=self.template,
                                              target="latents", default_steps=self.default_steps)(
                dit, batch, rng, empty_text, 0.0)
            loss = loss + self.regression_weight * regression
            logs["regression"] = float(regression.detach())
        return loss, logs

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


def _latent_shape(batch: dict) -> tuple[int, ...]:
    """[C, h, w] of the student's samples: the batch's latents (their values are not used) or `latent_shape`."""
    if batch.get("latents") is not None:
        return tuple(batch["latents"].shape[1:])
    if batch.get("latent_shape") is not None:
        return tuple(batch["latent_shape"])
    raise DistilleryError("batch", sorted(batch), "no latents nor latent_shape to size the student's samples.",
                          "give the batch latents (any dataset) or a latent_shape [C, h, w].")


def _dropped(batch: dict, rng, empty_text, p: float) -> TextEmbeds:
    from .losses import drop_captions

    return drop_captions(batch["text"], empty_text, rng, p)
