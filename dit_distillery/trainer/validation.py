"""What a run shows of itself besides the training loss: the held-out loss (`evaluate`), validation grids (student
samples beside the teacher's for Direct Distill), the teacher's images (sampled once, kept on disk), and the loss
chart with `metrics.jsonl`. Only the main process samples and writes; a sharded DiT (`sharded.py`) runs on every
process at once (each holds a part of its weights), so there every process samples and the main one writes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..charts import image_grid, loss_chart
from ..formats import atomic_output, atomic_write_json, atomic_write_text
from ..losses import DirectDistillLoss, DMDLoss, SampleRNG, TrajectoryLoss

DISTILL = (DirectDistillLoss, TrajectoryLoss, DMDLoss)  # losses whose student samples with few steps, beside a teacher
from .job import TrainJob
from .sharded import is_sharded


def sample_settings(job: TrainJob, pipe, loss, dataset=None) -> dict:
    """Steps, CFG and size of the validation samples. For distillation (Direct Distill, Trajectory, DMD), the
    student's own settings: the validation's, else the loss's, else the dataset's rows', else the loss defaults
    (a DMD student samples at CFG 1)."""
    v, d = job.validation, pipe.defaults
    if isinstance(loss, DISTILL):
        row = dataset.rows[0] if dataset is not None else None
        steps = v.steps or loss.steps or (row and row.num_inference_steps) or loss.default_steps
        if isinstance(loss, DMDLoss):
            cfg = v.cfg if v.cfg is not None else 1.0
        else:
            cfg = next(c for c in (v.cfg, loss.cfg, row and row.cfg_scale, loss.default_cfg) if c is not None)
    else:
        steps, cfg = v.steps or d["steps"], v.cfg if v.cfg is not None else d["cfg_scale"]
    height = v.height or job.data.height or d["height"]
    width = v.width or job.data.width or d["width"]
    return dict(steps=steps, cfg_scale=cfg, height=height, width=width, negative_prompt=v.negative_prompt)


def teacher_settings(job: TrainJob, pipe, loss, dataset=None) -> dict:
    """The teacher column's settings: the student's size, and the teacher's steps and CFG as training sees them:
    the validation's, else the loss's (DMD's real-score CFG), else the dataset rows' (how Generate Distill Dataset
    sampled the teacher), else 50 steps CFG 4."""
    v = job.validation
    row = dataset.rows[0] if dataset is not None and len(dataset.rows) else None
    steps = v.teacher_steps or (row and row.teacher_steps) or 50
    cfg = next(c for c in (v.teacher_cfg, getattr(loss, "teacher_cfg", None), row and row.teacher_cfg, 4.0)
               if c is not None)
    return dict(sample_settings(job, pipe, loss, dataset), steps=steps, cfg_scale=cfg)


def student_sigmas(loss, pipe, settings: dict) -> list[float] | None:
    """The student's schedule when the loss names its own template (e.g. Qwen-Image-Lightning's for a student with
    the Lightning LoRA merged): validation samples on the schedule training targets. None: the pipeline's."""
    if not isinstance(loss, DISTILL) or not getattr(loss, "template", None):
        return None
    distill = loss._distill() if isinstance(loss, TrajectoryLoss) else loss
    probe = torch.empty((1, *pipe.latent_shape(settings["height"], settings["width"])))
    return distill.student_sigmas(pipe.family, settings["steps"], probe)


def load_teacher(job: TrainJob, device, dtype) -> torch.nn.Module:
    """`model.teacher`'s DiT on `device` (stored in fp8 when the job's base is), frozen, for sampling."""
    from ..pipelines.loading import load_dit

    fp8_base = job.base_dtype == "fp8"
    dit = load_dit(job.model.teacher, dtype=dtype, device="cpu" if fp8_base else device, field="model.teacher")
    dit.requires_grad_(False)
    if fp8_base:
        from ..fp8 import store_in_fp8

        store_in_fp8(dit, dtype)
    return dit.to(device).eval()


def write_chart(out: Path, title: str, history: list[dict], eval_history: list[dict]) -> Path | None:
    """`loss.png` (loss, LR, held-out loss, the loss's own e.g. DMD's fake-score loss) and `metrics.jsonl` (one line
    per step, those included) in the run folder."""
    if not history:
        return None
    chart = loss_chart([h["step"] for h in history], [h["loss"] for h in history], lrs=[h["lr"] for h in history],
                       title=title, evals=[(e["step"], e["eval_loss"]) for e in eval_history],
                       **aux_series(history))
    path = out / "loss.png"
    with atomic_output(path) as tmp:
        chart.save(tmp, format="PNG")
    evals = {e["step"]: e["eval_loss"] for e in eval_history}
    lines = "".join(json.dumps(dict(h, **({"eval_loss": evals[h["step"]]} if h["step"] in evals else {}))) + "\n"
                    for h in history)
    atomic_write_text(out / "metrics.jsonl", lines)
    return path


def aux_series(history: list[dict]) -> dict:
    """The chart's second series: the first loss of the loss's own that the history logs (DMD's "fake_loss")."""
    names = [k for h in history[:1] for k in h if k not in ("step", "loss", "lr")]
    if not names:
        return {}
    return {"aux": [(h["step"], h[names[0]]) for h in history if names[0] in h], "aux_label": names[0]}


class Components:
    """The text encoder and VAE between their uses. With cached data the DiT is all a training step runs: `park()`
    moves them to the CPU once the cache is built, and `in_use()` brings them to the device for a validation's
    sampling and parks them again (on the CPU both are no-ops in effect, the calls still made). `keep_codec`: a
    loss that decodes images while training (Trajectory's image term) keeps the VAE on the device."""

    def __init__(self, pipe, device, keep_codec: bool = False):
        self.pipe, self.device, self.keep_codec = pipe, torch.device(device), keep_codec
        self.parked = False

    def parts(self) -> list:
        return [self.pipe.prompt_encoder] + ([] if self.keep_codec else [self.pipe.codec])

    def _move(self, device) -> None:
        for part in self.parts():
            part.to(device=device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # (the freed blocks back to the driver: block swap's "auto" reads free memory)

    def park(self) -> None:
        self._move("cpu")
        self.parked = True

    @contextlib.contextmanager
    def in_use(self):
        if not self.parked:
            yield
            return
        self._move(self.device)
        try:
            yield
        finally:
            self._move("cpu")


class Validator:
    """The run's validation, reading the step and writing `eval_history` in the shared `state`
    (`checkpoints.RunState`); `paths` lists the grids written. `components` (`Components`): where the text
    encoder and VAE wait between samplings."""

    def __init__(self, job: TrainJob, pipe, loss, accelerator, dataset, callbacks, state,
                 components: Components | None = None):
        self.components = components or Components(pipe, accelerator.device)
        self.job, self.pipe, self.loss, self.accelerator = job, pipe, loss, accelerator
        self.dataset, self.callbacks, self.state = dataset, callbacks, state
        self.out = Path(job.output.dir)
        self.paths: list[Path] = []
        self.teacher_images = None
        self.collective = is_sharded(job, accelerator)  # every process runs the DiT's forward

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def settings(self) -> dict:
        return sample_settings(self.job, self.pipe, self.loss, self.dataset)

    def write_chart(self) -> Path | None:
        return write_chart(self.out, f"{self.job.output.name}: {self.loss.kind} loss", self.state.history,
                           self.state.eval_history)

    def evaluate(self) -> float | None:
        """Mean loss over the first `validation.eval_samples` samples with fixed randomness (main process)."""
        n = min(self.job.validation.eval_samples, len(self.dataset))
        if not n or not (self.main or self.collective):
            return None
        from ..data import collate
        from .setup import move_batch  # (setup imports this module)

        dit = self.pipe.dit
        was_training = dit.training
        dit.eval()
        total = 0.0
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for i in range(n):
                    batch = move_batch(collate([self.dataset[i]]), self.accelerator.device)
                    rng = SampleRNG(self.job.seed + 1_000_003, 0, [f"eval:{i}"])
                    loss, _ = self.loss(dit, batch, rng, None, 0.0)
                    total += float(loss)
        finally:
            dit.train(was_training)
        if not self.main:
            return None
        value, step = total / n, self.state.step
        self.state.eval_history = [e for e in self.state.eval_history if e["step"] != step] + [
            {"step": step, "eval_loss": value}]
        self.callbacks.on_message(f"eval loss at step {step}: {value:.5f}")
        return value

    def _sample(self, pipe=None, **settings) -> list:
        pipe = pipe or self.pipe
        v, dit = self.job.validation, pipe.dit
        prompts = [p for p in v.prompts for _ in v.seeds]
        seeds = [s for _ in v.prompts for s in v.seeds]
        was_training = dit.training
        dit.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast(), self.components.in_use():
                return pipe.sample(prompts, seeds=seeds, **settings).images
        finally:
            dit.train(was_training)

    def validate(self) -> Path | None:
        """The held-out loss, then (main process, with prompts) a grid of student samples beside the teacher's."""
        v, step = self.job.validation, self.state.step
        self.evaluate()
        if not v.prompts or not (self.main or self.collective):
            return None
        settings = self.settings()
        sigmas = student_sigmas(self.loss, self.pipe, settings)
        student = self._sample(**settings, **({} if sigmas is None else {"sigmas": sigmas}))
        if not self.main:
            return None
        rows, labels = [[im] for im in student], [f"{p} #{s}" for p in v.prompts for s in v.seeds]
        cols = [f"step {step}: {settings['steps']} steps cfg {settings['cfg_scale']:g}"
                + (f" ({self.loss.template})" if sigmas is not None else "")]
        if self.teacher_images:
            teacher = teacher_settings(self.job, self.pipe, self.loss, self.dataset)
            rows = [[t, s] for t, s in zip(self.teacher_images, student)]
            cols = [f"teacher {teacher['steps']} steps cfg {teacher['cfg_scale']:g}"] + cols
        grid = image_grid(rows, row_labels=labels, col_labels=cols)
        path = self.out / "validation" / f"step-{step:07d}.png"
        with atomic_output(path) as tmp:
            grid.save(tmp, format="PNG")
        self.paths.append(path)
        self.callbacks.on_validation(step, grid, path)
        return path

    def sample_teacher(self) -> None:
        """For distillation with `validation.teacher`: the teacher's images for the validation prompts (many steps,
        CFG: `teacher_settings`), kept on disk, so a resumed run (whose DiT has already changed) shows the same
        teacher. The teacher is `model.teacher` when the job names one (loaded for this, then dropped), else the
        pipeline's DiT before any update (call it before `prepare_model`)."""
        v, separate = self.job.validation, self.job.model.teacher
        if not ((self.main or self.collective) and v.prompts and v.teacher and isinstance(self.loss, DISTILL)):
            return
        if separate and not self.main:  # (a separate teacher is not sharded: the main process samples it)
            return
        from PIL import Image

        settings = teacher_settings(self.job, self.pipe, self.loss, self.dataset)
        folder = self.out / "validation" / "teacher"
        key = {"job": self.job.fingerprint(), "prompts": v.prompts, "seeds": v.seeds, **settings}
        record = folder / "teacher.json"
        if record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(key)):
            self.teacher_images = [Image.open(folder / f"{i:03d}.png").convert("RGB")
                                   for i in range(len(v.prompts) * len(v.seeds))]
            return
        if separate:
            from .setup import base_dtype  # (setup imports this module)

            device = self.accelerator.device
            teacher = self.pipe.with_dit(load_teacher(self.job, device, base_dtype(self.job, device)))
            images = self._sample(teacher, **settings)
            del teacher
            if self.accelerator.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            images = self._sample(**settings)
        self.teacher_images = images
        if not self.main:
            return
        for i, im in enumerate(images):
            with atomic_output(folder / f"{i:03d}.png") as tmp:
                im.save(tmp, format="PNG")
        atomic_write_json(record, key)
        self.teacher_images = images
