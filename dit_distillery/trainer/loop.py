"""The training loop: one `TrainJob` in, trained weights out, on accelerate (one process, or DDP on many).

`Trainer._run` reads top to bottom: the set-up (`setup.py`: data, model, optimiser, the loss's own trainables),
the resume (`checkpoints.py`), the steps, then the last checkpoint, the weights file, the final validation and the
chart (`validation.py`). A step: the loss may first update trainables of its own (`before_step`, the protocol in
`setup.py`); then each of `grad_accum` micro-batches (cached latents + prompt embeddings, one size per bucket)
goes through the `TrainingModule`, whose forward is the whole loss (for Direct Distill the student's full N-step
sampler), so DDP sees one forward and one backward per micro-batch and syncs on the last only. A NaN/inf loss
stops the run and leaves the last good checkpoint untouched; otherwise the gradients are clipped, the optimiser
and the LR schedule (warm-up, then constant/cosine) step, and the EMA follows. (Kept under 200 lines, to be read in
one sitting: what is not the loop goes to setup.py, checkpoints.py or validation.py.)
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import StopRequested
from ..losses import loss_from_dict
from ..progress import Eta
from .checkpoints import RunState, TrainingDiverged, folder_lock
from .job import TrainJob
from .setup import (Batches, PeakMemory, TrainingModule, load_job_pipeline, lr_factor, make_accelerator,
                    place_pipeline, prepare_data, set_up)

__all__ = ["train", "Trainer", "TrainResult", "StepInfo", "Callbacks", "TrainingDiverged", "TrainingModule",
           "lr_factor", "prepare_data", "load_job_pipeline"]


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    images_per_s: float  # averaged since this process's first step (progress.Eta), checkpoints included
    eta_s: float  # seconds left at that pace
    epoch: int
    peak_memory_bytes: int | None = None  # CUDA: torch.cuda.max_memory_allocated over the steps so far
    predicted_peak_bytes: int | None = None  # the memory plan's total, to compare with it
    aux_losses: dict = field(default_factory=dict)  # what the loss's `before_step` returned, e.g. {"fake_loss"}


@dataclass
class TrainResult:
    output_dir: Path
    weights: Path | None  # the final LoRA or full-weights file
    checkpoint: Path | None
    steps: int
    history: list[dict]  # [{"step", "loss", "lr"}, plus the loss's own from before_step, e.g. "fake_loss"]
    chart: Path | None
    validation: list[Path] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)  # [{"step", "eval_loss"}] with validation.eval_samples
    stopped: bool = False
    data: dict = field(default_factory=dict)  # cache report etc.
    seconds: float = 0.0
    is_main_process: bool = True


class Callbacks:
    """Override what you need: the ComfyUI node forwards these to the UI, the CLI to tqdm. The loss history is
    `on_history` (once, before the first step: a resumed run's earlier steps, [] for a fresh run) followed by one
    `on_step` per step, so a caller keeps the whole curve without reading the run's files."""

    def on_message(self, text: str) -> None: ...
    def on_data_progress(self, done: int, total: int) -> None: ...
    def on_history(self, history: list[dict]) -> None: ...  # [{"step", "loss", "lr"}]
    def on_step(self, info: StepInfo) -> None: ...
    def on_validation(self, step: int, grid, path: Path) -> None: ...
    def on_checkpoint(self, step: int, path: Path, weights: Path) -> None: ...


class Trainer:
    """Runs one job. `train(job, ...)` is the usual entry point; the object exists so nodes can inspect it: its
    `state` (`checkpoints.RunState`) and, once set up, its `parts` (`setup.Parts`: data, model, optimiser, ...)."""

    def __init__(self, job: TrainJob, *, pipeline=None, callbacks: Callbacks | None = None,
                 stop: Callable[[], bool] | None = None):
        job.validate()
        self.job, self.callbacks, self.stop = job, callbacks or Callbacks(), stop or (lambda: False)
        self.out = Path(job.output.dir)
        self.accelerator = make_accelerator(job)  # FSDP for distributed "fsdp" (sharded.py); DeepSpeed refused
        self.device = self.accelerator.device
        self.pipe = place_pipeline(job, self.accelerator, pipeline)
        self.loss = loss_from_dict(job.loss)
        self.state = RunState()
        self.parts = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def run(self) -> TrainResult:
        """Train. torch's global RNG (adapter init, data loader seeds) is seeded from the job inside a fork, so the
        same job gives the same result in any process, and the caller's RNG state (e.g. ComfyUI's) is given back."""
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with folder_lock(self.out, self.accelerator, self.callbacks), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.job.seed)
            return self._run()

    def _run(self) -> TrainResult:
        started = time.time()
        job, acc, state = self.job, self.accelerator, self.state
        self.parts = p = set_up(job, self.pipe, self.loss, acc, self.callbacks, self.stop, state)
        if hasattr(self.callbacks, "on_history"):  # (duck-typed callbacks written before it existed lack it)
            self.callbacks.on_history(list(state.history))
        if state.step == 0:
            p.validator.evaluate()
        batches = Batches(job, p.data, state, self.device)
        peak = PeakMemory(self.device, p.memory)
        opt, sched = p.optim.optimizer, p.optim.lr_scheduler
        last_saved = state.step if state.resumed_from else None
        eta = Eta(job.steps, done=state.step)  # steady: the average since this process's first step
        stopped = False
        try:
            while state.step < job.steps:
                if self.stop():
                    raise StopRequested(f"stopped at step {state.step}")
                aux = {}
                if hasattr(self.loss, "before_step"):  # the loss's own updates, on batches of the same stream
                    draws = itertools.count()
                    aux = self.loss.before_step(state.step, lambda: batches.draw(state.step, f"aux{next(draws)}:"))
                    aux = {k: float(v) for k, v in (aux or {}).items()}  # logged beside the loss (metrics.jsonl)
                loss = self._forward_backward(batches)
                if not math.isfinite(loss):
                    raise p.checkpoints.diverged(loss)
                p.checkpoints.confirm()  # these weights' loss is finite: older checkpoints may go
                if job.optim.grad_clip:
                    acc.clip_grad_norm_(p.optim.params, job.optim.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state.step += 1
                state.update_ema(p.model.trainable(), job.ema_decay)
                lr = opt.param_groups[0]["lr"]
                state.history.append({"step": state.step, "loss": loss, "lr": lr, **aux})
                left, per_step = eta.update(state.step), eta.seconds_per_unit
                images = job.batch_size * job.grad_accum * acc.num_processes
                self.callbacks.on_step(StepInfo(state.step, job.steps, loss, lr,
                                                images / per_step if per_step else 0.0, left, state.epoch,
                                                peak.measured(), peak.predicted, aux))
                if job.output.save_every and state.step % job.output.save_every == 0 and state.step < job.steps:
                    p.checkpoints.save(prune=False)
                    last_saved = state.step
                if job.validation.every and state.step % job.validation.every == 0 and state.step < job.steps:
                    with peak.paused():  # (validation brings the text encoder and VAE back: not a training step)
                        p.validator.validate()
        except (StopRequested, KeyboardInterrupt):
            stopped = True
        peak.report(p.data.report, self.callbacks, self.out if self.main else None)
        return self._finish(started, stopped, last_saved)

    def _forward_backward(self, batches: Batches) -> float:
        """Forward and backward over `grad_accum` micro-batches (DDP syncs on the last one only); returns the
        mean loss over them and over the processes."""
        job, acc, module = self.job, self.accelerator, self.parts.optim.module
        losses = []
        for micro in range(job.grad_accum):
            batch, rng = batches.draw(self.state.step * job.grad_accum + micro)
            # FSDP reduce-scatters every micro-batch: its gradients then accumulate sharded
            sync = micro == job.grad_accum - 1 or acc.num_processes == 1 or self.parts.optim.sharded
            with contextlib.nullcontext() if sync else acc.no_sync(module):
                with acc.autocast():
                    loss, _ = module(batch, rng)
                acc.backward(loss / job.grad_accum)
            losses.append(loss.detach())
        return float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))

    def _finish(self, started: float, stopped: bool, last_saved: int | None) -> TrainResult:
        """The last checkpoint (a stopped run prunes nothing: its last checkpoint's weights have not given a loss
        yet), the weights file, the final validation and the chart; a stopped run then raises StopRequested."""
        state, p = self.state, self.parts
        report = p.data.report
        checkpoint, weights = p.checkpoints.finish(stopped, last_saved, report)
        if not stopped:
            p.validator.validate()
        chart = p.validator.write_chart() if self.main else None
        result = TrainResult(self.out, weights, checkpoint, state.step, list(state.history), chart,
                             list(p.validator.paths), list(state.eval_history), stopped, report,
                             time.time() - started, self.main)
        if stopped:
            raise StopRequested(f"stopped at step {state.step}; checkpoint {checkpoint}")
        return result


def train(job: TrainJob, *, pipeline=None, callbacks: Callbacks | None = None,
          stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run a training job (see the module docstring). `pipeline` replaces the job's model spec (ComfyUI passes
    the loaded pipeline); the trainer takes ownership of its DiT and modifies it in place."""
    return Trainer(job, pipeline=pipeline, callbacks=callbacks, stop=stop).run()
