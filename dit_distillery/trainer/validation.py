"""What a run shows of itself besides the training loss: the held-out loss (`evaluate`), validation grids (student
samples beside the teacher's for Direct Distill), the teacher's images (sampled once, kept on disk), and the loss
chart with `metrics.jsonl`. Only the main process samples and writes; a sharded DiT (`sharded.py`) runs on every
process at once (each holds a part of its weights), so there every process samples and the main one writes."""

from __future__ import annotations

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


def write_chart(out: Path, title: str, history: list[dict], eval_history: list[dict]) -> Path | None:
    """`loss.png` (loss, LR, held-out loss) and `metrics.jsonl` (one line per step) in the run folder."""
    if not history:
        return None
    chart = loss_chart([h["step"] for h in history], [h["loss"] for h in history], lrs=[h["lr"] for h in history],
                       title=title, evals=[(e["step"], e["eval_loss"]) for e in eval_history])
    path = out / "loss.png"
    with atomic_output(path) as tmp:
        chart.save(tmp, format="PNG")
    evals = {e["step"]: e["eval_loss"] for e in eval_history}
    lines = "".join(json.dumps(dict(h, **({"eval_loss": evals[h["step"]]} if h["step"] in evals else {}))) + "\n"
                    for h in history)
    atomic_write_text(out / "metrics.jsonl", lines)
    return path


class Validator:
    """The run's validation, reading the step and writing `eval_history` in the shared `state`
    (`checkpoints.RunState`); `paths` lists the grids written."""

    def __init__(self, job: TrainJob, pipe, loss, accelerator, dataset, callbacks, state):
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

    def _sample(self, **settings) -> list:
        v, dit = self.job.validation, self.pipe.dit
        prompts = [p for p in v.prompts for _ in v.seeds]
        seeds = [s for _ in v.prompts for s in v.seeds]
        was_training = dit.training
        dit.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                return self.pipe.sample(prompts, seeds=seeds, **settings).images
        finally:
            dit.train(was_training)

    def validate(self) -> Path | None:
        """The held-out loss, then (main process, with prompts) a grid of student samples beside the teacher's."""
        v, step = self.job.validation, self.state.step
        self.evaluate()
        if not v.prompts or not (self.main or self.collective):
            return None
        settings = self.settings()
        student = self._sample(**settings)
        if not self.main:
            return None
        rows, labels = [[im] for im in student], [f"{p} #{s}" for p in v.prompts for s in v.seeds]
        cols = [f"step {step}: {settings['steps']} steps cfg {settings['cfg_scale']:g}"]
        if self.teacher_images:
            rows = [[t, s] for t, s in zip(self.teacher_images, student)]
            cols = [f"teacher {v.teacher_steps} steps cfg {v.teacher_cfg:g}"] + cols
        grid = image_grid(rows, row_labels=labels, col_labels=cols)
        path = self.out / "validation" / f"step-{step:07d}.png"
        with atomic_output(path) as tmp:
            grid.save(tmp, format="PNG")
        self.paths.append(path)
        self.callbacks.on_validation(step, grid, path)
        return path

    def sample_teacher(self) -> None:
        """For Direct Distill with `validation.teacher`: the base model's images for the validation prompts (many
        steps, CFG), sampled before any update (call it before `prepare_model`) and kept on disk, so a resumed
        run (whose DiT has already changed) shows the same teacher."""
        v = self.job.validation
        if not ((self.main or self.collective) and v.prompts and v.teacher and isinstance(self.loss, DISTILL)):
            return
        from PIL import Image

        settings = self.settings()
        settings.update(steps=v.teacher_steps, cfg_scale=v.teacher_cfg)
        folder = self.out / "validation" / "teacher"
        key = {"job": self.job.fingerprint(), "prompts": v.prompts, "seeds": v.seeds, **settings}
        record = folder / "teacher.json"
        if record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(key)):
            self.teacher_images = [Image.open(folder / f"{i:03d}.png").convert("RGB")
                                   for i in range(len(v.prompts) * len(v.seeds))]
            return
        images = self._sample(**settings)
        self.teacher_images = images
        if not self.main:
            return
        for i, im in enumerate(images):
            with atomic_output(folder / f"{i:03d}.png") as tmp:
                im.save(tmp, format="PNG")
        atomic_write_json(record, key)
        self.teacher_images = images
