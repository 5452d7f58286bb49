"""A run's state and what keeps it: `RunState` (step, data position, histories, EMA), the output-folder lock,
saving (checkpoint + the user-facing weights, then pruning), resuming, and the good/finite marks.

Checkpoints (every `output.save_every` steps, at the end, and when stopped) hold the trainable weights, the
optimiser, the LR schedule, the data position, the loss history, the EMA and the loss's own state (the loss
protocol in `setup.py`), on disk as `state.py` writes them, so a resume continues exactly where the run stopped
(bit-for-bit on CPU). Each also gets the user-facing weights: a LoRA file that stock ComfyUI and diffusers load,
or a full DiT file in our format. A checkpoint is written only with finite weights, is marked not good when the
loss its weights give next is NaN/inf, and pruning and `resume: "auto"` go by that mark.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import DistilleryError
from .job import TrainJob
from .state import (is_good, last_good_checkpoint, latest_checkpoint, load_checkpoint, mark_not_good, prune_checkpoints,
                    rng_state, save_checkpoint, set_rng_state)


class TrainingDiverged(DistilleryError):
    """The loss or the weights became NaN or infinite."""


DIVERGED_FIX = "lower optim.lr, keep optim.grad_clip on (e.g. 1.0), or train in fp32."


@dataclass
class RunState:
    """Everything about a run that changes as it trains, besides weights and optimiser (all of it checkpointed)."""
    step: int = 0  # optimiser updates done
    epoch: int = 0
    batches_done: int = 0  # in this epoch, on this process
    history: list[dict] = field(default_factory=list)  # [{"step", "loss", "lr"}]
    eval_history: list[dict] = field(default_factory=list)  # [{"step", "eval_loss"}]
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32 shadows of the trainables, when EMA is on
    resumed_from: Path | None = None

    def start_ema(self, trainable: dict[str, torch.Tensor], decay: float) -> None:
        self.ema = {n: p.detach().float().clone() for n, p in trainable.items()} if decay else {}

    def update_ema(self, trainable: dict[str, torch.Tensor], decay: float) -> None:
        if self.ema:
            with torch.no_grad():
                for n, p in trainable.items():
                    self.ema[n].lerp_(p.detach().float(), 1 - decay)


@contextlib.contextmanager
def folder_lock(out: Path, accelerator, callbacks):
    """Hold the output folder for the whole run, before anything (job.json included) is written: a second run on
    it is refused instead of pruning this one's checkpoints. Only the main process locks (and then removes what
    killed writes left there); the others learn its outcome from one collective, so none of them hangs."""
    from ..runlock import RunLock, remove_leftovers

    lock, error = RunLock(out, "output.dir"), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
            removed, freed = remove_leftovers(out, checkpoints=True)
            if removed:
                callbacks.on_message(f"removed {len(removed)} leftover(s) of killed writes ({freed / 1e6:.1f} MB)")
        except BaseException as exc:
            lock.release()
            error = exc
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
        if error is None and float(failed) > 0:
            error = DistilleryError("output.dir", str(out), "the main process could not lock the output folder "
                                    "(its error says why).", "see the main process's error.")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------------------
# A loss's own state as safetensors + JSON

def flatten_state(value, tensors: dict[str, torch.Tensor], key: str = "s"):
    """A nested state (dicts, lists, tuples, tensors, JSON values) as JSON, its tensors moved into `tensors`
    under generated names. Dict keys keep their type (optimiser states are keyed by int)."""
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, flatten_state(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [flatten_state(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"a loss state holds a {type(value).__name__} at {key}: only tensors, dicts, lists, tuples and "
                    "JSON values are checkpointed (never pickled)")


def unflatten_state(flat, tensors: dict[str, torch.Tensor]):
    """The inverse of `flatten_state`."""
    (kind, value), = flat.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: unflatten_state(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [unflatten_state(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    return value


# --------------------------------------------------------------------------------------------------------------
# Weights, checks

def training_metadata(job: TrainJob, family: str, step: int) -> tuple[dict, dict]:
    """(the run's settings, the file metadata) the user-facing weights carry; also a sharded run's consolidation."""
    settings = {"job": job.fingerprint(), "mode": job.mode, "loss": job.loss, "rank": job.lora.rank,
                "alpha": job.lora.alpha or job.lora.rank, "lr": job.optim.lr, "steps": step,
                "batch_size": job.batch_size, "base": {"pipeline": job.model.pipeline, "dit": job.model.dit}}
    return settings, {"dit_distillery.training": json.dumps(settings, default=str), "dit_distillery.family": family}


def export_weights(job: TrainJob, dit: torch.nn.Module, step: int, path: Path) -> Path:
    """The user-facing file: a LoRA (ComfyUI/diffusers) or a full DiT in our format, with the run's settings."""
    from .. import families
    from ..formats import dtype_from_name
    from ..lora import save_lora
    from ..models.registry import save_dit

    dtype = dtype_from_name(job.output.save_dtype, "output.save_dtype")
    settings, meta = training_metadata(job, families.of_model(dit).name, step)
    if job.mode == "lora":
        return save_lora(dit, path, meta, dtype=dtype or torch.float32)
    return save_dit(dit, path, provenance={"trained": settings}, dtype=dtype, extra_metadata=meta)


def ranks_identical(accelerator, trainable: dict[str, torch.Tensor]) -> bool:
    """Whether every process ends with bit-identical trainable weights (DDP's promise; a cheap check)."""
    sums = torch.stack([p.detach().double().sum() for _, p in sorted(trainable.items())])
    everyone = accelerator.gather(sums[None].to(accelerator.device))
    return bool((everyone == everyone[0]).all())


class Checkpoints:
    """Saving and resuming one run: the trainables of `model`, the `optim` (`setup.Optimisation`), the loss's own
    state, the sampler's position and the `RunState`. `write_chart` is called after each save."""

    def __init__(self, job: TrainJob, accelerator, callbacks, model, optim, loss, sampler, state: RunState,
                 write_chart: Callable[[], object]):
        self.job, self.accelerator, self.callbacks = job, accelerator, callbacks
        self.model, self.optim, self.loss, self.sampler, self.state = model, optim, loss, sampler, state
        self.write_chart = write_chart
        self.folder = Path(job.output.dir) / "checkpoints"
        self.prune_pending = False
        self.sharded = getattr(optim, "sharded", False)  # FSDP: checkpoints and checks are collective (sharded.py)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def latest(self) -> Path | None:
        return latest_checkpoint(self.folder)

    def finish(self, stopped: bool, last_saved: int | None, report: dict) -> tuple[Path | None, Path | None]:
        """The run's end: the last checkpoint (unless the last step was just saved; a stopped run prunes nothing:
        its last checkpoint's weights have not given a loss yet) and the weights file (main process; None
        elsewhere). Under DDP `report` also says whether every process holds the same trainables."""
        job, step = self.job, self.state.step
        if self.accelerator.num_processes > 1 and not self.sharded:  # (sharded: each holds its own part)
            report["ranks_identical"] = ranks_identical(self.accelerator, self.model.trainable())
        checkpoint = self.save(prune=not stopped) if last_saved != step or stopped else self.latest()
        if not self.main:
            return checkpoint, None
        path = Path(job.output.dir) / f"{job.output.name}.safetensors"
        if self.sharded:
            from .sharded import publish

            return checkpoint, publish(checkpoint, path)
        return checkpoint, export_weights(job, self.model.dit, step, path)

    def save(self, prune: bool = True) -> Path | None:
        """A resumable checkpoint + the user-facing weights, written by the main process.

        Only finite weights are saved, and the checkpoint is recorded as good (`finite` in its state.json). With
        `prune=False` older checkpoints are pruned only once the next step's loss, computed from these weights,
        is finite (`confirm`): weights can be finite yet already blown up (~1e30), and the checkpoint that
        pruning keeps must be one to resume from."""
        self.accelerator.wait_for_everyone()
        self.check_weights()  # on every process: DDP keeps the weights identical, so all of them stop together
        path, s, job, state = None, self.state, self.job, None
        if self.main:
            state = {"fingerprint": job.fingerprint(), "data_position": self.sampler.state(s.epoch, s.batches_done),
                     "history": s.history, "eval_history": s.eval_history, "rng": rng_state(),
                     "lr_scheduler": self.optim.lr_scheduler.state_dict(),
                     "world_size": self.accelerator.num_processes,
                     "finite": all(math.isfinite(h["loss"]) for h in s.history)}
            loss_tensors = None
            if hasattr(self.loss, "state_dict"):
                loss_tensors = {}
                state["loss_state"] = flatten_state(self.loss.state_dict(), loss_tensors)
        if self.sharded:  # every process writes its shards; the main one also the consolidated weights file
            from . import sharded

            state = state and dict(state, export=sharded.export_settings(job, self.model.dit, s.step))
            path = sharded.save(self.folder, s.step, self.model.dit, self.optim.optimizer, s.ema, state,
                                self.accelerator)
        if self.main:
            if self.sharded:
                weights = path / f"{job.output.name}.safetensors"  # (consolidated by sharded.save)
            else:
                ema = {n: t.clone() for n, t in s.ema.items()} if s.ema else None
                path = save_checkpoint(self.folder, s.step, self.model.trainable(),
                                       self.optim.optimizer.state_dict(), state, ema, loss_tensors)
                weights = export_weights(job, self.model.dit, s.step, path / f"{job.output.name}.safetensors")
            self.prune_pending = not prune
            if prune:
                prune_checkpoints(self.folder, job.output.keep_last)
            self.write_chart()
            self.callbacks.on_checkpoint(s.step, path, weights)
        self.accelerator.wait_for_everyone()
        return path

    def confirm(self) -> None:
        """The loss of the newest checkpoint's weights was finite: now older ones may be pruned."""
        if self.prune_pending and self.main:
            prune_checkpoints(self.folder, self.job.output.keep_last)
        self.prune_pending = False

    def check_weights(self) -> None:
        """Stop the run if a trainable weight (or its EMA) holds NaN/inf: such a checkpoint is never written."""
        ema = ((f"EMA of {n}", t) for n, t in self.state.ema.items())
        bad = self.first_nonfinite([*self.model.trainable().items(), *ema])
        if bad is not None:
            raise TrainingDiverged("weights", bad, f"this trained tensor holds NaN/inf at step {self.state.step} "
                                   "although the loss was finite; no checkpoint was written for this step. "
                                   f"{self.good_words()}", DIVERGED_FIX)

    def first_nonfinite(self, named) -> str | None:
        """The first tensor holding NaN/inf (sharded: over every process's shards, on every process)."""
        from ..weights_check import first_nonfinite

        if self.sharded:
            from .sharded import first_nonfinite as sharded_first_nonfinite

            return sharded_first_nonfinite(named, self.accelerator)
        return first_nonfinite(named)

    def good_words(self) -> str:
        good = last_good_checkpoint(self.folder)
        if good is None:
            return "No good checkpoint had been saved yet."
        return f"The last good checkpoint (finite weights and loss) is {good}; resume: \"auto\" continues from it."

    def diverged(self, loss: float) -> TrainingDiverged:
        """The error for a NaN/inf loss at step `step + 1`. The newest checkpoint, when it holds the weights that
        gave this loss, is marked not good, so resuming and pruning skip it."""
        step = self.state.step
        newest = self.latest() if self.main else None
        if newest is not None and newest.name == f"checkpoint-{step:07d}":
            mark_not_good(newest, f"the loss its weights gave at step {step + 1} was {loss}")
        bad = self.first_nonfinite(self.model.trainable().items())
        where = f" (the trained tensor {bad!r} holds NaN/inf)" if bad is not None else ""
        return TrainingDiverged("loss", loss, f"became {loss} at step {step + 1}{where}; the run was stopped. "
                                f"{self.good_words()}", DIVERGED_FIX)

    def resume(self) -> None:
        """Continue the checkpoint `job.resume` names (a folder: its newest good one; "auto": this run's), if any."""
        resume = self.job.resume
        if resume in (None, "", "none"):
            return
        # a folder means its newest good checkpoint (see state.is_good); a checkpoint named explicitly is taken
        # as given (load_checkpoint still refuses non-finite weights)
        path = last_good_checkpoint(self.folder) if resume == "auto" else Path(resume)
        if resume != "auto" and path.is_dir() and not (path / "state.json").exists():
            path = last_good_checkpoint(path)
        if path is None:
            return
        newest = latest_checkpoint(path.parent)
        if newest is not None and newest != path and not is_good(newest):
            self.callbacks.on_message(f"resuming from {path.name}, not the newer {newest.name}: its weights are not "
                                      "good (see \"not_good\" in its state.json)")
        state = self._load(path)
        s = self.state
        s.epoch = self.sampler.resume(state["data_position"])
        s.batches_done = self.sampler.start
        s.step = int(state["step"])
        s.history = list(state.get("history", []))
        s.eval_history = list(state.get("eval_history", []))
        set_rng_state(state["rng"])
        s.resumed_from = path
        self.callbacks.on_message(f"resumed from {path} at step {s.step}")

    def _check_job(self, path: Path, state: dict) -> None:
        if state.get("fingerprint") != self.job.fingerprint():
            raise DistilleryError("resume", str(path), "this checkpoint was made by a different job (model, data, loss "
                                  "or training settings changed).",
                                  "use a new output folder, set resume to null to start over, or restore the settings.")

    def _load(self, path: Path) -> dict:
        """Load a checkpoint's weights, optimiser, LR schedule, loss state and EMA; returns its state.json."""
        from .sharded import check_resumable

        if (path / "state.json").is_file():  # (else load_checkpoint refuses it, naming what it lacks)
            check_resumable(path, json.loads((path / "state.json").read_text()), self.sharded,
                            self.accelerator.num_processes)
        if self.sharded:
            from . import sharded

            state = json.loads((path / "state.json").read_text())
            self._check_job(path, state)
            sharded.load(path, state, self.model.dit, self.optim.optimizer, self.state.ema)
            bad = self.first_nonfinite(self.model.trainable().items())
            if bad is not None:
                raise DistilleryError("resume", str(path), f"the checkpoint's tensor {bad!r} holds NaN/inf.",
                                      "resume from an earlier checkpoint (resume: \"auto\" picks the newest good one).")
            self.optim.lr_scheduler.load_state_dict(state["lr_scheduler"])
            return state
        ckpt = load_checkpoint(path)
        state = ckpt["state"]
        self._check_job(path, state)
        own = self.model.trainable()
        missing = sorted(set(own) - set(ckpt["trainable"]))
        if missing:
            raise DistilleryError("resume", str(path), f"the checkpoint lacks trainable weights such as {missing[0]}.",
                                  "resume with the same mode and LoRA settings.")
        if hasattr(self.loss, "load_state_dict") and "loss_state" not in state:
            raise DistilleryError("resume", str(path), "the checkpoint lacks the state of the loss's own trainables.",
                                  "resume from a checkpoint written with this loss, or set resume to null.")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(ckpt["trainable"][name].to(p.dtype))
        self.optim.optimizer.load_state_dict(ckpt["optimizer"])
        self.optim.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if hasattr(self.loss, "load_state_dict"):
            self.loss.load_state_dict(unflatten_state(state["loss_state"], ckpt["loss"] or {}))
        if ckpt["ema"] is not None:
            self.state.ema = {n: t.to(self.accelerator.device) for n, t in ckpt["ema"].items()}
        return state
