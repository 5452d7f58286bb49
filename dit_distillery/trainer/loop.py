"""The training loop: one `TrainJob` in, trained weights out, on accelerate (one process, or DDP on many).

What a step does: the batch (cached latents + prompt embeddings, same size thanks to buckets) goes through a
`TrainingModule` whose forward is the whole loss (for Direct Distill: the student's full N-step sampler), so DDP
sees one forward and one backward per micro-batch. Gradients are accumulated over `grad_accum` micro-batches
(DDP sync only on the last), clipped, applied by the optimiser, and the LR follows warm-up then constant/cosine.

Checkpoints (every `output.save_every` steps, at the end, and when stopped) hold the trainable weights, the
optimiser, the LR schedule, the data position, the loss history and the EMA (see `state.py`), so `resume`
continues exactly where it stopped (bit-for-bit on CPU); each also gets the user-facing weights: a LoRA file that
stock ComfyUI and diffusers load, or a full DiT file in our format. A NaN/inf loss stops the run with a clear
message and leaves the last good checkpoint untouched: a checkpoint is written only with finite weights, is
marked not good when the loss its weights give next is NaN/inf, and pruning and `resume: "auto"` go by that mark.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..charts import image_grid, loss_chart
from ..conditioning import TextEmbeds
from ..errors import DistilleryError, StopRequested
from ..formats import atomic_write_json, atomic_write_text
from ..losses import DirectDistillLoss, SampleRNG, loss_from_dict
from ..progress import Eta
from .job import TrainJob, synthetic_options
from .state import (is_good, last_good_checkpoint, latest_checkpoint, load_checkpoint, mark_not_good, prune_checkpoints,
                    rng_state, save_checkpoint, set_rng_state)


class TrainingDiverged(DistilleryError):
    """The loss or the weights became NaN or infinite."""


DIVERGED_FIX = "lower optim.lr, keep optim.grad_clip on (e.g. 1.0), or train in fp32."


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    images_per_s: float  # averaged since this process's first step (progress.Eta), checkpoints included
    eta_s: float  # seconds left at that pace
    epoch: int


@dataclass
class TrainResult:
    output_dir: Path
    weights: Path | None  # the final LoRA or full-weights file
    checkpoint: Path | None
    steps: int
    history: list[dict]  # [{"step", "loss", "lr"}]
    chart: Path | None
    validation: list[Path] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)  # [{"step", "eval_loss"}] with validation.eval_samples
    stopped: bool = False
    data: dict = field(default_factory=dict)  # cache report etc.
    seconds: float = 0.0
    is_main_process: bool = True


class Callbacks:
    """Override what you need: the ComfyUI node forwards these to the UI, the CLI to tqdm."""

    def on_message(self, text: str) -> None: ...
    def on_data_progress(self, done: int, total: int) -> None: ...
    def on_step(self, info: StepInfo) -> None: ...
    def on_validation(self, step: int, grid, path: Path) -> None: ...
    def on_checkpoint(self, step: int, path: Path, weights: Path) -> None: ...


class TrainingModule(torch.nn.Module):
    """The DiT plus the loss: `forward(batch, rng) -> (loss, logs)`. DDP wraps this, so the whole unrolled
    distillation sampler is one forward pass for gradient synchronisation."""

    def __init__(self, dit: torch.nn.Module, loss, empty_text: TextEmbeds | None, caption_dropout: float,
                 offload_activations: bool):
        super().__init__()
        self.dit = dit
        self.loss = loss
        self.empty_text = empty_text
        self.caption_dropout = caption_dropout
        self.offload_activations = offload_activations

    def forward(self, batch: dict, rng: SampleRNG):
        device = next(p for p in self.dit.parameters()).device
        empty = None if self.empty_text is None else self.empty_text.to(device)
        ctx = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") if self.offload_activations \
            else contextlib.nullcontext()
        with ctx:
            return self.loss(self.dit, batch, rng, empty, self.caption_dropout)


# --------------------------------------------------------------------------------------------------------------
# Set-up pieces

def _accelerator(job: TrainJob):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    precision = job.mixed_precision if job.mixed_precision != "auto" else ("bf16" if cuda else "no")
    # accelerate keeps one process-wide state and refuses a second Accelerator with other settings. ComfyUI runs
    # many jobs in one process, so a later job's own precision replaces the earlier one's (the process group of a
    # multi-process launch, PartialState, is kept).
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    # find_unused_parameters is decided once the model is known (see Trainer.run)
    return Accelerator(mixed_precision=precision, cpu=not cuda, kwargs_handlers=[DistributedDataParallelKwargs()])


def load_job_pipeline(job: TrainJob, device, dtype):
    """The pipeline a job names (built-in, diffusers folder, single files)."""
    from ..pipelines.loading import load_pipeline

    spec = job.model
    return load_pipeline(spec.pipeline, dit=spec.dit, text_encoder=spec.text_encoder, vae=spec.vae,
                         device=device, dtype=dtype)


def _base_dtype(job: TrainJob, device: torch.device) -> torch.dtype:
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if job.model.dtype in names:
        return names[job.model.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def prepare_data(job: TrainJob, pipe, accelerator, callbacks: Callbacks, stop):
    """Rows -> (cached) dataset and bucketed, sharded batch sampler; also the empty-prompt embedding."""
    from ..data import BucketBatchSampler, CachedDataset, EncodingDataset, Resolution, build_cache, read_metadata
    from ..data.synthetic import write_dataset

    out = Path(job.output.dir)
    spec = job.data
    if spec.synthetic is not None:
        folder = Path(spec.path) if spec.path else out / "synthetic"
        options = dict({"n": 256, "size": 32, "seed": 0}, **synthetic_options(spec.synthetic))
        with accelerator.main_process_first():
            if not (folder / "metadata.csv").is_file():
                write_dataset(folder, **options)
        base, metadata = folder, None
    else:
        base, metadata = spec.path, spec.metadata
    # Without the cache, images are decoded only when trained on: check them all now, so a damaged one is
    # skipped (on_error="skip") or refused before training, as the cache build does.
    rows = read_metadata(base, metadata, on_error=spec.on_error, validate=not spec.cache)
    resolution = Resolution(spec.height, spec.width, spec.max_pixels, factor=pipe.size_multiple)
    report = {}
    skipped, reasons = rows.skipped, list(rows.reasons)  # rows left out: bad metadata, missing/unreadable files
    if spec.cache:
        cache_dir = Path(spec.cache_dir) if spec.cache_dir else out / "cache"
        with accelerator.main_process_first():
            cache, cache_report = build_cache(list(rows), cache_dir, pipe.codec, pipe.prompt_encoder, resolution,
                                              progress=callbacks.on_data_progress, stop=stop, on_error=spec.on_error)
        report.update(cache_report.to_dict())
        kept = cache.cached_rows(rows) if cache_report.skipped else list(rows)
        skipped, reasons = skipped + len(rows) - len(kept), reasons + cache_report.reasons
        if not kept:
            raise DistilleryError("data.path", str(base), f"no usable rows: all {len(rows)} were skipped (first: "
                                  f"{reasons[0]}).", "fix or replace the damaged files.")
        dataset = CachedDataset(kept, cache)
    else:
        dataset = EncodingDataset(list(rows), pipe.codec, pipe.prompt_encoder, resolution, device=pipe.device)
    report.update(rows=len(dataset.rows), skipped=skipped, reasons=reasons)
    for reason in reasons[:20]:
        callbacks.on_message(f"skipped (data.on_error=skip): {reason}")
    if len(reasons) > 20:
        callbacks.on_message(f"... and {len(reasons) - 20} more skipped rows (listed in the report's data.reasons)")
    # repeat is the sampler's: each pass over the data is its own permutation
    sampler = BucketBatchSampler(dataset.sizes, job.batch_size, seed=job.seed, repeat=spec.repeat,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    empty = pipe.prompt_encoder.encode([""])
    empty = TextEmbeds(empty.embeds.float().cpu(), None if empty.mask is None else empty.mask.cpu())
    return dataset, sampler, empty, report


def _set_trainable(job: TrainJob, dit: torch.nn.Module) -> list[str]:
    from .. import families
    from ..lora import add_lora, load_lora_into, merge_lora, read_lora

    if job.lora.preset:
        merge_lora(dit, read_lora(job.lora.preset, "lora.preset"), job.lora.preset_strength, "lora.preset")
    if job.mode == "lora":
        if job.lora.init_from:
            return load_lora_into(dit, read_lora(job.lora.init_from, "lora.init_from"), "lora.init_from")
        targets = job.lora.targets
        if targets in (None, "", "preset"):
            targets = families.of_model(dit).default_lora_preset
        return add_lora(dit, targets, rank=job.lora.rank, alpha=job.lora.alpha)
    chosen = []
    for name, p in dit.named_parameters():
        train = any(name.startswith(prefix) for prefix in job.full_trainable)
        p.requires_grad_(train)
        if train:
            p.data = p.data.float()  # fp32 master weights; autocast computes in bf16 on GPU
            chosen.append(name)
    if not chosen:
        raise DistilleryError("full_trainable", job.full_trainable, "selects no parameter.",
                              'use [""] for all, or prefixes like ["transformer_blocks."].')
    return chosen


def _optimizer(job: TrainJob, params: list[torch.nn.Parameter]):
    o = job.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DistilleryError("optim.name", o.name, "needs the bitsandbytes package (CUDA only).",
                                  "pip install bitsandbytes, or use 'adamw'.") from None
        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=o.lr, weight_decay=o.weight_decay, scale_parameter=False, relative_step=False,
                     warmup_init=False)


def lr_factor(job: TrainJob, step: int) -> float:
    """LR multiplier after `step` optimiser steps: linear warm-up, then constant or cosine to min_lr_ratio."""
    o = job.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, job.steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _move(batch: dict, device) -> dict:
    out = dict(batch)
    out["latents"] = batch["latents"].to(device)
    out["text"] = batch["text"].to(device)
    if batch.get("target_latents") is not None:
        out["target_latents"] = batch["target_latents"].to(device)
    return out


# --------------------------------------------------------------------------------------------------------------
# The run

class Trainer:
    """Runs one job. `train(job, ...)` is the usual entry point; the object exists so nodes can inspect it."""

    def __init__(self, job: TrainJob, *, pipeline=None, callbacks: Callbacks | None = None,
                 stop: Callable[[], bool] | None = None):
        job.validate()
        self.job = job
        self.callbacks = callbacks or Callbacks()
        self.stop = stop or (lambda: False)
        self.out = Path(job.output.dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.accelerator = _accelerator(job)
        kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            # their parameters and optimiser states are sharded across processes; our checkpoints (one process
            # writes every tensor) would be incomplete, so refuse rather than write checkpoints that cannot resume
            raise DistilleryError("accelerate config", kind, "sharded training is not supported yet: checkpoints "
                                  "would hold only one process's shard.",
                                  "use plain DDP (accelerate launch --multi_gpu), LoRA to fit memory, or gradient "
                                  "checkpointing with CPU offload.")
        self.device = self.accelerator.device
        dtype = _base_dtype(job, self.device)
        self.pipe = pipeline if pipeline is not None else load_job_pipeline(job, self.device, dtype)
        self.pipe.to(device=self.device)
        self.loss = loss_from_dict(job.loss)
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.validation_paths: list[Path] = []
        self.teacher_images = None

    # -- helpers
    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.dit.named_parameters() if p.requires_grad}

    def _export_weights(self, path: Path) -> Path:
        from .. import families
        from ..formats import dtype_from_name
        from ..lora import save_lora
        from ..models.registry import save_dit

        dtype = dtype_from_name(self.job.output.save_dtype, "output.save_dtype")
        settings = {"job": self.job.fingerprint(), "mode": self.job.mode, "loss": self.job.loss,
                    "rank": self.job.lora.rank, "alpha": self.job.lora.alpha or self.job.lora.rank,
                    "lr": self.job.optim.lr, "steps": self.step, "batch_size": self.job.batch_size,
                    "base": {"pipeline": self.job.model.pipeline, "dit": self.job.model.dit}}
        meta = {"dit_distillery.training": json.dumps(settings, default=str),
                "dit_distillery.family": families.of_model(self.dit).name}
        if self.job.mode == "lora":
            return save_lora(self.dit, path, meta, dtype=dtype or torch.float32)
        return save_dit(self.dit, path, provenance={"trained": settings}, dtype=dtype, extra_metadata=meta)

    def _save(self, prune: bool = True) -> Path:
        """A resumable checkpoint + the user-facing weights, written by the main process.

        Only finite weights are saved, and the checkpoint is recorded as good (`finite` in its state.json). With
        `prune=False` older checkpoints are pruned only once the next step's loss, computed from these weights,
        is finite (`_confirm_checkpoint`): weights can be finite yet already blown up (~1e30), and the checkpoint
        that pruning keeps must be one to resume from."""
        self.accelerator.wait_for_everyone()
        self._check_weights()  # on every process: DDP keeps the weights identical, so all of them stop together
        path = None
        if self.main:
            state = {"fingerprint": self.job.fingerprint(), "data_position": self.sampler.state(self.epoch, self.batches_done),
                     "history": self.history, "eval_history": self.eval_history, "rng": rng_state(), "lr_scheduler": self.lr_scheduler.state_dict(),
                     "world_size": self.accelerator.num_processes,
                     "finite": all(math.isfinite(h["loss"]) for h in self.history)}
            ema = {n: t.clone() for n, t in self.ema.items()} if self.ema else None
            path = save_checkpoint(self.ckpt_dir, self.step, self._trainable(), self.optimizer.state_dict(), state, ema)
            weights = self._export_weights(path / f"{self.job.output.name}.safetensors")
            self._prune_pending = not prune
            if prune:
                prune_checkpoints(self.ckpt_dir, self.job.output.keep_last)
            self._write_chart()
            self.callbacks.on_checkpoint(self.step, path, weights)
        self.accelerator.wait_for_everyone()
        return path

    def _check_memory(self, height: int, width: int) -> None:
        """Refuse, before anything is allocated at this size, a training step (and validation samples) that cannot
        fit: a closed-form lower bound (`report.training_activation_bytes`, times the unrolled student steps for
        Direct Distill) plus the gradients and optimiser states not yet allocated, against the free memory."""
        from ..report import training_activation_bytes
        from ..velocity import base_model
        from ..weights_check import check_fits

        job, pipe = self.job, self.pipe
        dit = base_model(pipe.dit)
        config = {k: v for k, v in dict(dit.config).items() if not k.startswith("_")}
        text_tokens = 0 if pipe.prompt_encoder.trims_padding else int(getattr(pipe.prompt_encoder, "max_length", 0))
        mixed = self.accelerator.mixed_precision != "no"
        dtype_bytes = 2 if mixed else torch.empty((), dtype=pipe.dtype).element_size()
        unrolled = (self.loss.steps or 1) if isinstance(self.loss, DirectDistillLoss) else 1
        acts = unrolled * training_activation_bytes(pipe.family, config, batch=job.batch_size,
                                                    tokens=pipe.image_seq_len(height, width) + text_tokens,
                                                    checkpointing=job.gradient_checkpointing, dtype_bytes=dtype_bytes)
        trainable = 0 if job.mode == "lora" else sum(
            p.numel() for n, p in dit.named_parameters() if any(n.startswith(x) for x in job.full_trainable))
        per_param = 4 + (8 if job.optim.name == "adamw" else 0) + (4 if pipe.dtype != torch.float32 else 0)
        error = None
        try:
            check_fits(acts + trainable * per_param, self.device, field="data.height/width", value=f"{width}x{height}",
                       what=f"a training step on {width}x{height} images in batches of {job.batch_size}",
                       fix="train at a smaller size (data.height/width or data.max_pixels), a smaller batch_size "
                           "(with grad_accum to keep the effective batch), gradient_checkpointing on, or mode 'lora'.")
            v = job.validation
            if v.prompts and self.main:
                settings = self._validation_settings()
                count = len(v.prompts) * len(v.seeds)
                pipe.check_memory(count, count, settings["height"], settings["width"], settings["cfg_scale"] != 1.0)
        except DistilleryError as exc:
            error = exc
        if self.accelerator.num_processes > 1:  # one refusal stops every process (none waits at a barrier)
            refused = self.accelerator.reduce(torch.tensor(float(error is not None), device=self.device), "sum")
            if error is None and float(refused) > 0:
                error = DistilleryError("data.height/width", f"{width}x{height}", "another process's device has too "
                                        "little memory for this size (its error says how much).",
                                        "see that process's error.")
        if error is not None:
            raise error

    def _check_weights(self) -> None:
        """Stop the run if a trainable weight (or its EMA) holds NaN/inf: such a checkpoint is never written."""
        from ..weights_check import first_nonfinite

        bad = first_nonfinite([*self._trainable().items(), *((f"EMA of {n}", t) for n, t in self.ema.items())])
        if bad is not None:
            raise TrainingDiverged("weights", bad, f"this trained tensor holds NaN/inf at step {self.step} although "
                                   f"the loss was finite; no checkpoint was written for this step. {self._good_words()}",
                                   DIVERGED_FIX)

    def _good_words(self) -> str:
        good = last_good_checkpoint(self.ckpt_dir)
        if good is None:
            return "No good checkpoint had been saved yet."
        return (f"The last good checkpoint (finite weights and loss) is {good}; resume: \"auto\" continues from "
                "it.")

    def _diverged(self, loss: float) -> TrainingDiverged:
        """The error for a NaN/inf loss at step `self.step + 1`. The newest checkpoint, when it holds the weights
        that gave this loss, is marked not good, so resuming and pruning skip it."""
        from ..weights_check import first_nonfinite

        newest = latest_checkpoint(self.ckpt_dir) if self.main else None
        if newest is not None and newest.name == f"checkpoint-{self.step:07d}":
            mark_not_good(newest, f"the loss its weights gave at step {self.step + 1} was {loss}")
        bad = first_nonfinite(self._trainable().items())
        where = f" (the trained tensor {bad!r} holds NaN/inf)" if bad is not None else ""
        return TrainingDiverged("loss", loss, f"became {loss} at step {self.step + 1}{where}; the run was stopped. "
                                f"{self._good_words()}", DIVERGED_FIX)

    def _confirm_checkpoint(self) -> None:
        """The loss of the newest checkpoint's weights was finite: now older ones may be pruned."""
        if self._prune_pending and self.main:
            prune_checkpoints(self.ckpt_dir, self.job.output.keep_last)
        self._prune_pending = False

    def _write_chart(self) -> Path | None:
        if not self.history:
            return None
        chart = loss_chart([h["step"] for h in self.history], [h["loss"] for h in self.history],
                           lrs=[h["lr"] for h in self.history], title=f"{self.job.output.name}: {self.loss.kind} loss",
                           evals=[(e["step"], e["eval_loss"]) for e in self.eval_history])
        path = self.out / "loss.png"
        from ..formats import atomic_output

        with atomic_output(path) as tmp:
            chart.save(tmp, format="PNG")
        evals = {e["step"]: e["eval_loss"] for e in self.eval_history}
        lines = "".join(json.dumps(dict(h, **({"eval_loss": evals[h["step"]]} if h["step"] in evals else {}))) + "\n"
                        for h in self.history)
        atomic_write_text(self.out / "metrics.jsonl", lines)
        return path

    def _resume(self) -> None:
        resume = self.job.resume
        if resume in (None, "", "none"):
            return
        # a folder means its newest good checkpoint (see state.is_good); a checkpoint named explicitly is taken
        # as given (load_checkpoint still refuses non-finite weights)
        path = last_good_checkpoint(self.ckpt_dir) if resume == "auto" else Path(resume)
        if resume != "auto" and path.is_dir() and not (path / "state.json").exists():
            path = last_good_checkpoint(path)
        if path is None:
            return
        newest = latest_checkpoint(path.parent)
        if newest is not None and newest != path and not is_good(newest):
            self.callbacks.on_message(f"resuming from {path.name}, not the newer {newest.name}: its weights are not "
                                      "good (see \"not_good\" in its state.json)")
        ckpt = load_checkpoint(path)
        state = ckpt["state"]
        if state.get("fingerprint") != self.job.fingerprint():
            raise DistilleryError("resume", str(path), "this checkpoint was made by a different job (model, data, loss "
                                  "or training settings changed).",
                                  "use a new output folder, set resume to null to start over, or restore the settings.")
        own = self._trainable()
        missing = sorted(set(own) - set(ckpt["trainable"]))
        if missing:
            raise DistilleryError("resume", str(path), f"the checkpoint lacks trainable weights such as {missing[0]}.",
                                  "resume with the same mode and LoRA settings.")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(ckpt["trainable"][name].to(p.dtype))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch = self.sampler.resume(state["data_position"])
        self.batches_done = self.sampler.start
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.eval_history = list(state.get("eval_history", []))
        if ckpt["ema"] is not None:
            self.ema = {n: t.to(self.device) for n, t in ckpt["ema"].items()}
        set_rng_state(state["rng"])
        self.resumed_from = path
        self.callbacks.on_message(f"resumed from {path} at step {self.step}")

    # -- validation
    def evaluate(self) -> float | None:
        """Mean loss over the first `validation.eval_samples` samples with fixed randomness (main process)."""
        n = min(self.job.validation.eval_samples, len(self.dataset))
        if not n or not self.main:
            return None
        from ..data import collate

        was_training = self.dit.training
        self.dit.eval()
        total = 0.0
        try:
            with torch.no_grad(), self.accelerator.autocast():
                for i in range(n):
                    batch = _move(collate([self.dataset[i]]), self.device)
                    rng = SampleRNG(self.job.seed + 1_000_003, 0, [f"eval:{i}"])
                    loss, _ = self.loss(self.dit, batch, rng, None, 0.0)
                    total += float(loss)
        finally:
            self.dit.train(was_training)
        value = total / n
        self.eval_history = [e for e in self.eval_history if e["step"] != self.step] + [{"step": self.step, "eval_loss": value}]
        self.callbacks.on_message(f"eval loss at step {self.step}: {value:.5f}")
        return value

    def _validation_settings(self) -> dict:
        v = self.job.validation
        d = self.pipe.defaults
        distill = isinstance(self.loss, DirectDistillLoss)
        if distill:  # the student's own settings: the loss's, else the dataset's rows', else the loss defaults
            row = self.dataset.rows[0] if getattr(self, "dataset", None) is not None else None
            steps = v.steps or self.loss.steps or (row and row.num_inference_steps) or self.loss.default_steps
            cfg = next(c for c in (v.cfg, self.loss.cfg, row and row.cfg_scale, self.loss.default_cfg) if c is not None)
        else:
            steps, cfg = v.steps or d["steps"], v.cfg if v.cfg is not None else d["cfg_scale"]
        height = v.height or self.job.data.height or d["height"]
        width = v.width or self.job.data.width or d["width"]
        return dict(steps=steps, cfg_scale=cfg, height=height, width=width, negative_prompt=v.negative_prompt)

    def _sample(self, **settings) -> list:
        v = self.job.validation
        prompts = [p for p in v.prompts for _ in v.seeds]
        seeds = [s for _ in v.prompts for s in v.seeds]
        was_training = self.dit.training
        self.dit.eval()
        try:
            with torch.no_grad(), self.accelerator.autocast():
                return self.pipe.sample(prompts, seeds=seeds, **settings).images
        finally:
            self.dit.train(was_training)

    def _validate(self) -> Path | None:
        v = self.job.validation
        self.evaluate()
        if not v.prompts or not self.main:
            return None
        settings = self._validation_settings()
        student = self._sample(**settings)
        rows, labels = [[im] for im in student], [f"{p} #{s}" for p in v.prompts for s in v.seeds]
        cols = [f"step {self.step}: {settings['steps']} steps cfg {settings['cfg_scale']:g}"]
        if self.teacher_images:
            rows = [[t, s] for t, s in zip(self.teacher_images, student)]
            cols = [f"teacher {v.teacher_steps} steps cfg {v.teacher_cfg:g}"] + cols
        grid = image_grid(rows, row_labels=labels, col_labels=cols)
        path = self.out / "validation" / f"step-{self.step:07d}.png"
        from ..formats import atomic_output

        with atomic_output(path) as tmp:
            grid.save(tmp, format="PNG")
        self.validation_paths.append(path)
        self.callbacks.on_validation(self.step, grid, path)
        return path

    # -- main loop
    def run(self) -> TrainResult:
        """Train. torch's global RNG (adapter init, data loader seeds) is seeded from the job inside a fork, so the
        same job gives the same result in any process, and the caller's RNG state (e.g. ComfyUI's) is given back."""
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with self._folder_lock(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.job.seed)
            return self._run()

    @contextlib.contextmanager
    def _folder_lock(self):
        """Hold the output folder for the whole run, before anything (job.json included) is written: a second run
        on it is refused instead of pruning this one's checkpoints. Only the main process locks (and then removes
        what killed writes left there); the others learn its outcome from one collective, so none of them hangs."""
        from ..runlock import RunLock, remove_leftovers

        lock, error = RunLock(self.out, "output.dir"), None
        if self.main:
            try:
                lock.acquire()
                removed, freed = remove_leftovers(self.out, checkpoints=True)
                if removed:
                    self.callbacks.on_message(f"removed {len(removed)} leftover(s) of killed writes "
                                              f"({freed / 1e6:.1f} MB)")
            except BaseException as exc:
                lock.release()
                error = exc
        if self.accelerator.num_processes > 1:
            failed = self.accelerator.reduce(torch.tensor(float(error is not None), device=self.device), "sum")
            if error is None and float(failed) > 0:
                error = DistilleryError("output.dir", str(self.out), "the main process could not lock the output "
                                        "folder (its error says why).", "see the main process's error.")
        if error is not None:
            raise error
        try:
            yield lock
        finally:
            lock.release()

    def _run(self) -> TrainResult:
        started = time.time()
        job, acc = self.job, self.accelerator
        if job.data.height is not None:  # a fixed size is known now: refuse it before the cache is built at it
            self._check_memory(job.data.height, job.data.width)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            job.save(self.out / "job.json")
        self.callbacks.on_message("preparing data")
        self.dataset, self.sampler, empty, data_report = prepare_data(job, self.pipe, acc, self.callbacks, self.stop)
        dataset = self.dataset
        if job.data.height is None and dataset.sizes:  # aspect buckets: the largest one the data gave
            self._check_memory(*max(dataset.sizes, key=lambda hw: hw[0] * hw[1]))
        # Training runs only the DiT: the text encoder (and the VAE, until validation decodes) leave the GPU.
        if job.data.cache:
            self.pipe.prompt_encoder.to(device="cpu")
        self.dit = self.pipe.dit
        if self.main and job.validation.prompts and job.validation.teacher and isinstance(self.loss, DirectDistillLoss):
            self.teacher_images = self._teacher_images()  # the base model, before any change
        self.dit.train()
        # New adapters are initialised from torch's global RNG: seed it from the job (and give the caller's state
        # back afterwards, e.g. ComfyUI's), so the same job starts from the same weights in every process.
        names = _set_trainable(job, self.dit)
        if job.gradient_checkpointing and hasattr(self.dit, "enable_gradient_checkpointing"):
            self.dit.enable_gradient_checkpointing()
        if job.compile:  # block by block: one compiled graph reused by every block, names and hooks unchanged
            from ..shrink.blocks import block_list

            for block in block_list(self.dit)[0]:
                block.compile()
        self.dit.to(self.device)
        params = [p for _, p in sorted(self._trainable().items())]
        self.callbacks.on_message(f"training {sum(p.numel() for p in params):,} parameters in {len(names)} tensors/modules")
        self.optimizer = _optimizer(job, params)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(job, s))
        self.ema = {n: p.detach().float().clone() for n, p in self._trainable().items()} if job.ema_decay else {}
        # Some families train parameters that never reach the output (Qwen-Image's last text branch): DDP must
        # tolerate them (DiffSynth's --find_unused_parameters); elsewhere the check only costs a traversal.
        acc.ddp_handler.find_unused_parameters = self.pipe.family_spec.ddp_find_unused_parameters
        module = TrainingModule(self.dit, self.loss, empty, job.data.caption_dropout, job.checkpoint_offload)
        self.module, self.optimizer = acc.prepare(module, self.optimizer)
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.resumed_from = None
        self._resume()
        self.sampler.set_epoch(self.epoch, self.batches_done)
        if self.step == 0:
            self.evaluate()

        from ..data import collate

        loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate,
                                             num_workers=job.data.num_workers if job.data.cache else 0)
        last_saved = self.step if self.resumed_from else None
        self._prune_pending = False
        batch_iter = iter(loader)
        eta = Eta(job.steps, done=self.step)  # steady: the average since this process's first step
        stopped = False
        try:
            while self.step < job.steps:
                if self.stop():
                    raise StopRequested(f"stopped at step {self.step}")
                losses = []
                for micro in range(job.grad_accum):
                    batch = next(batch_iter, None)
                    if batch is None:  # epoch boundary
                        self.epoch, self.batches_done = self.epoch + 1, 0
                        self.sampler.set_epoch(self.epoch)
                        batch_iter = iter(loader)
                        batch = next(batch_iter)
                    self.batches_done += 1
                    batch = _move(batch, self.device)
                    world = acc.num_processes
                    ids = [f"{self.epoch}:{r}" for r in batch["row"]]
                    rng = SampleRNG(job.seed, self.step * job.grad_accum + micro, ids)
                    sync = micro == job.grad_accum - 1
                    ctx = contextlib.nullcontext() if sync or world == 1 else acc.no_sync(self.module)
                    with ctx:
                        with acc.autocast():
                            loss, _ = self.module(batch, rng)
                        acc.backward(loss / job.grad_accum)
                    losses.append(loss.detach())
                mean_loss = float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))
                if not math.isfinite(mean_loss):
                    raise self._diverged(mean_loss)
                self._confirm_checkpoint()
                if job.optim.grad_clip:
                    acc.clip_grad_norm_(params, job.optim.grad_clip)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.ema:
                    with torch.no_grad():
                        for n, p in self._trainable().items():
                            self.ema[n].lerp_(p.detach().float(), 1 - job.ema_decay)
                lr = self.optimizer.param_groups[0]["lr"]
                self.history.append({"step": self.step, "loss": mean_loss, "lr": lr})
                left = eta.update(self.step)
                per_step = eta.seconds_per_unit
                images = job.batch_size * job.grad_accum * acc.num_processes
                self.callbacks.on_step(StepInfo(self.step, job.steps, mean_loss, lr,
                                                images / per_step if per_step else 0.0, left, self.epoch))
                if job.output.save_every and self.step % job.output.save_every == 0 and self.step < job.steps:
                    self._save(prune=False)
                    last_saved = self.step
                if job.validation.every and self.step % job.validation.every == 0 and self.step < job.steps:
                    self._validate()
        except (StopRequested, KeyboardInterrupt):
            stopped = True
        if acc.num_processes > 1:
            data_report["ranks_identical"] = self._ranks_identical()
        # a stopped run prunes nothing: its last checkpoint's weights have not given a loss yet
        checkpoint = (self._save(prune=not stopped) if last_saved != self.step or stopped
                      else latest_checkpoint(self.ckpt_dir))
        weights = None
        if self.main:
            weights = self._export_weights(self.out / f"{job.output.name}.safetensors")
        if not stopped:
            self._validate()
        chart = self._write_chart() if self.main else None
        result = TrainResult(self.out, weights, checkpoint, self.step, list(self.history), chart,
                             list(self.validation_paths), list(self.eval_history), stopped, data_report,
                             time.time() - started, self.main)
        if stopped:
            raise StopRequested(f"stopped at step {self.step}; checkpoint {checkpoint}")
        return result

    def _ranks_identical(self) -> bool:
        """Whether every process ends with bit-identical trainable weights (DDP's promise; a cheap check)."""
        sums = torch.stack([p.detach().double().sum() for _, p in sorted(self._trainable().items())])
        everyone = self.accelerator.gather(sums[None].to(self.device))
        return bool((everyone == everyone[0]).all())

    def _teacher_images(self):
        """The base model's images for the validation prompts (many steps, CFG), sampled before any update and
        kept on disk, so a resumed run (whose DiT has already changed) shows the same teacher."""
        from PIL import Image

        v = self.job.validation
        settings = self._validation_settings()
        settings.update(steps=v.teacher_steps, cfg_scale=v.teacher_cfg)
        folder = self.out / "validation" / "teacher"
        key = {"job": self.job.fingerprint(), "prompts": v.prompts, "seeds": v.seeds, **settings}
        record = folder / "teacher.json"
        if record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(key)):
            return [Image.open(folder / f"{i:03d}.png").convert("RGB") for i in range(len(v.prompts) * len(v.seeds))]
        images = self._sample(**settings)
        from ..formats import atomic_output

        for i, im in enumerate(images):
            with atomic_output(folder / f"{i:03d}.png") as tmp:
                im.save(tmp, format="PNG")
        atomic_write_json(record, key)
        return images


def train(job: TrainJob, *, pipeline=None, callbacks: Callbacks | None = None,
          stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run a training job (see the module docstring). `pipeline` replaces the job's model spec (ComfyUI passes
    the loaded pipeline); the trainer takes ownership of its DiT and modifies it in place."""
    return Trainer(job, pipeline=pipeline, callbacks=callbacks, stop=stop).run()
