"""Setting a training run up, one function per piece, each returning plain objects: the accelerator, the pipeline,
the data (`prepare_data`), the model (`prepare_model`: trainables, checkpointing, compile, device), the optimiser
and its LR schedule (`prepare_optimisation`), and the loss's own trainables (`setup_loss`). `set_up` calls them
in order (with the memory refusals, the teacher's images and the resume) and returns them as `Parts` for the
loop (`loop.py`); the benchmarks (bench/ours_step.py) run the very same pieces.

Auxiliary trainables: the loss protocol. A loss is called `loss(dit, batch, rng, empty_text, caption_dropout) ->
(loss, logs)`. A loss that trains models of its own (e.g. DMD2's fake-score LoRA on the teacher, with its own
optimiser and several updates per student update) may also define these; the trainer calls each one present:

* `setup(ctx: LossContext)`: once, after the student, its optimiser and its DDP wrapper exist and before a resume.
  Build the loss's own models and optimisers here and `ctx.accelerator.prepare` them; they stay outside the
  student's module (`TrainingModule` never registers the loss), so the student's DDP and checkpoints ignore them.
* `before_step(step, next_batch)`: before each student update (`step` = updates done so far). `next_batch()` gives
  `(batch, rng)`: the next batch of the run's own data stream, on the device, with per-sample randomness of its
  own, so the data position the checkpoints record covers what the loss used and a resume repeats it exactly.
* `state_dict() -> dict` / `load_state_dict(state)`: all it needs to continue exactly (weights, optimiser and LR
  states, counters) as nested dicts/lists/tuples of tensors and JSON values. Checkpoints store it as safetensors +
  JSON (`checkpoints.flatten_state`), never pickled; tensors come back on the CPU.

`FlowMatchingLoss` and `DirectDistillLoss` define none of them; `DMDLoss` (losses_dmd) defines all (its fake score),
`TrajectoryLoss` only `setup` (the codec of its image term).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..conditioning import TextEmbeds
from ..errors import DistilleryError
from ..losses import DirectDistillLoss, SampleRNG
from .checkpoints import Checkpoints, RunState
from .job import TrainJob, is_prompts_only, synthetic_options
from .sharded import fsdp_plugin, is_sharded
from .validation import Components, Validator, sample_settings


def make_accelerator(job: TrainJob):
    """The job's `Accelerator` (its precision; bf16 on CUDA for "auto"), with accelerate's FSDP2 on CUDA for
    distributed "fsdp" (`sharded.py`); DeepSpeed, Megatron and an FSDP launch config for a "ddp" job are refused."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    precision = job.mixed_precision if job.mixed_precision != "auto" else ("bf16" if cuda else "no")
    # accelerate keeps one process-wide state and refuses a second Accelerator with other settings. ComfyUI runs
    # many jobs in one process, so a later job's own precision replaces the earlier one's (the process group of a
    # multi-process launch, PartialState, is kept).
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    # find_unused_parameters is decided once the model is known (prepare_optimisation)
    # the job decides: its plugin replaces one an accelerate config gave (on the CPU accelerate ignores it and
    # sharded.shard applies FSDP2 itself; one process trains unsharded)
    plugin = fsdp_plugin(precision) if job.distributed == "fsdp" and cuda and PartialState().num_processes > 1 \
        else None
    acc = Accelerator(mixed_precision=precision, cpu=not cuda, kwargs_handlers=[DistributedDataParallelKwargs()],
                      fsdp_plugin=plugin)
    kind = str(acc.distributed_type).rsplit(".", 1)[-1]
    if kind in ("DEEPSPEED", "MEGATRON_LM") or (kind == "FSDP" and job.distributed != "fsdp"):
        # other sharding engines: our checkpoints (sharded.py for FSDP) would miss what they split
        raise DistilleryError("accelerate config", kind, f"this launch configuration shards the model with {kind}"
                              + (", which this trainer does not checkpoint." if kind != "FSDP" else
                                 ", but the job trains with distributed \"ddp\"."),
                              'set "distributed": "fsdp" in the job for sharded full training (accelerate\'s FSDP2), '
                              "or launch with a DDP config (accelerate launch --multi_gpu).")
    return acc


def base_dtype(job: TrainJob, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: the job's, else bf16 on CUDA and fp32 elsewhere."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if job.model.dtype in names:
        return names[job.model.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def place_pipeline(job: TrainJob, accelerator, pipeline=None):
    """The run's pipeline (`pipeline`, else the job's, loaded in the base dtype), on the device. A sharded run keeps
    its DiT on the CPU until it is sharded (each GPU then receives only its shards); a DiT to store in fp8 or
    block-swap is placed by `set_up` once it is (as loaded it may not fit)."""
    device = accelerator.device
    offload = is_sharded(job, accelerator) or job.base_dtype == "fp8" or job.blocks_to_swap != 0
    pipe = pipeline if pipeline is not None else load_job_pipeline(job, "cpu" if offload else device,
                                                                   base_dtype(job, device))
    for part in (pipe.prompt_encoder, pipe.codec) if offload else (pipe,):
        part.to(device=device)
    return pipe


def load_job_pipeline(job: TrainJob, device, dtype):
    """The pipeline a job names (built-in, diffusers folder, single files)."""
    from ..pipelines.loading import load_pipeline

    spec = job.model
    return load_pipeline(spec.pipeline, dit=spec.dit, text_encoder=spec.text_encoder, vae=spec.vae,
                         device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Data

class Data(NamedTuple):
    """What `prepare_data` gives (a tuple, so `dataset, sampler, empty, report = prepare_data(...)` works)."""
    dataset: Any  # CachedDataset or EncodingDataset
    sampler: Any  # BucketBatchSampler: bucketed, sharded over the processes, resumable
    empty: TextEmbeds  # the empty prompt's embedding (CPU), for caption dropout
    report: dict  # rows, skipped rows and why, cache statistics


def prepare_data(job: TrainJob, pipe, accelerator, callbacks, stop) -> Data:
    """Rows -> (cached) dataset and bucketed, sharded batch sampler; also the empty-prompt embedding."""
    from ..data import BucketBatchSampler, CachedDataset, EncodingDataset, Resolution, build_cache, read_metadata
    from ..data.metadata import prompt_rows
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
    if spec.prompts is not None:
        rows = prompt_rows(spec.prompts)
    else:
        rows = read_metadata(base, metadata, on_error=spec.on_error, validate=not spec.cache,
                             prompts_only=spec.prompts_only)
    height, width = spec.height, spec.width
    if is_prompts_only(job) and height is None:  # no image to size the samples by: the pipeline's default size
        height, width = pipe.defaults["height"], pipe.defaults["width"]
    resolution = Resolution(height, width, spec.max_pixels, factor=pipe.size_multiple)
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
        dataset = EncodingDataset(list(rows), pipe.codec, pipe.prompt_encoder, resolution, device=accelerator.device)
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
    return Data(dataset, sampler, empty, report)


def move_batch(batch: dict, device) -> dict:
    """A collated batch with its tensors (latents, text, teacher latents) on `device`."""
    out = dict(batch)
    out["text"] = batch["text"].to(device)
    for name in ("latents", "target_latents", "trajectory", "trajectory_sigmas"):  # (latents: None, prompts only)
        if batch.get(name) is not None:
            out[name] = batch[name].to(device)
    return out


class Batches:
    """The run's data stream: the sampler's batches epoch after epoch, on the device. Its position lives in
    `state` (`epoch`, `batches_done`: what checkpoints record), so every draw, the loss's own included, moves it."""

    def __init__(self, job: TrainJob, data: Data, state, device):
        from ..data import collate

        self.seed, self.sampler, self.state, self.device = job.seed, data.sampler, state, device
        self.sampler.set_epoch(state.epoch, state.batches_done)
        self.loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=data.sampler, collate_fn=collate,
                                                  num_workers=job.data.num_workers if job.data.cache else 0)
        self.iter = iter(self.loader)

    def draw(self, counter: int, tag: str = "") -> tuple[dict, SampleRNG]:
        """The next batch and its per-sample randomness, keyed (job seed, counter, tag + "epoch:row")."""
        batch = next(self.iter, None)
        if batch is None:  # epoch boundary
            self.state.epoch, self.state.batches_done = self.state.epoch + 1, 0
            self.sampler.set_epoch(self.state.epoch)
            self.iter = iter(self.loader)
            batch = next(self.iter)
        self.state.batches_done += 1
        ids = [f"{tag}{self.state.epoch}:{r}" for r in batch["row"]]
        return move_batch(batch, self.device), SampleRNG(self.seed, counter, ids)


# --------------------------------------------------------------------------------------------------------------
# Model, trainables, optimiser, LR schedule

def set_trainable(job: TrainJob, dit: torch.nn.Module) -> list[str]:
    """Merge the preset LoRA, then add (or load) the LoRA, or pick the full-training parameters (fp32 masters);
    returns the names of what trains."""
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


@dataclass
class Model:
    """The student as training sees it: the pipeline's DiT, changed in place, on the device."""
    dit: torch.nn.Module
    names: list[str]  # what `set_trainable` chose (modules for a LoRA, tensors for full training)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.dit.named_parameters() if p.requires_grad}

    def params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters in name order: the optimiser's order, which checkpoints rely on."""
        return [p for _, p in sorted(self.trainable().items())]


def prepare_model(job: TrainJob, pipe, device, place: bool = True, blocks_to_swap: int = 0) -> Model:
    """Everything done to the DiT before training: trainables, the frozen base in fp8 (`job.base_dtype`), gradient
    checkpointing, block-wise compile, device (with `blocks_to_swap` blocks swapped: `block_swap`). New adapters
    are initialised from torch's global RNG, which the trainer seeds from the job. `place=False` leaves the DiT
    where it is (a sharded run: sharding moves each process's shards to its device).

    The order matters: a preset LoRA is merged and the adapters are injected into the weights as loaded, then the
    frozen Linears (the LoRA layers' base_layer included, `lora_` adapters not) are stored in fp8, computing in
    the DiT's dtype; the adapters are made in that dtype and kept fp32, as on a bf16 base. A resumed run quantises
    the same file the same way, so its base is bit-identical. The swap comes last: it places what trains."""
    dit = pipe.dit
    compute = pipe.dtype  # (before the fp32 adapters): bf16 on a GPU, fp32 on the CPU, or model.dtype
    dit.train()
    names = set_trainable(job, dit)
    if job.base_dtype == "fp8":
        from ..fp8 import store_in_fp8

        store_in_fp8(dit, compute)
    if job.gradient_checkpointing and hasattr(dit, "enable_gradient_checkpointing"):
        dit.enable_gradient_checkpointing()
    if job.compile:  # block by block: one compiled graph reused by every block, names and hooks unchanged
        from ..shrink.blocks import block_list

        for block in block_list(dit)[0]:
            block.compile()
    if place and blocks_to_swap:
        from ..block_swap import enable_block_swap

        enable_block_swap(dit, blocks_to_swap, device)
    elif place:
        dit.to(device)
    return Model(dit, names)


def make_optimizer(job: TrainJob, params: list[torch.nn.Parameter]):
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


def make_lr_scheduler(job: TrainJob, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(job, s))


class TrainingModule(torch.nn.Module):
    """The DiT plus the loss: `forward(batch, rng) -> (loss, logs)`. DDP wraps this, so the whole unrolled
    distillation sampler is one forward pass for gradient synchronisation. The loss is kept outside the module
    tree: models a loss trains itself (see the module docstring) are not the student's parameters."""

    def __init__(self, dit: torch.nn.Module, loss, empty_text: TextEmbeds | None, caption_dropout: float,
                 offload_activations: bool):
        super().__init__()
        self.dit = dit
        object.__setattr__(self, "loss", loss)  # never registered, even when the loss is a Module
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


@dataclass
class Optimisation:
    """The student's update machinery: the DDP-wrapped `TrainingModule`, its optimiser and LR schedule."""
    module: torch.nn.Module
    optimizer: Any
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]  # what is clipped
    sharded: bool = False  # FSDP (sharded.py): the DiT's parameters are DTensors, each process holds its shards


def prepare_optimisation(job: TrainJob, model: Model, loss, empty: TextEmbeds | None, accelerator,
                         family) -> Optimisation:
    """The optimiser over the trainables (name order), its LR schedule, and the model + loss wrapped for DDP; or,
    sharded, the DiT sharded first and the optimiser over its shards (`sharded.shard`)."""
    if is_sharded(job, accelerator):
        from .sharded import shard

        optimizer, params = shard(job, model, accelerator, make_optimizer)
        module = TrainingModule(model.dit, loss, empty, job.data.caption_dropout, job.checkpoint_offload)
        return Optimisation(module, optimizer, make_lr_scheduler(job, optimizer), params, sharded=True)
    params = model.params()
    optimizer = make_optimizer(job, params)
    scheduler = make_lr_scheduler(job, optimizer)
    # Some families train parameters that never reach the output (Qwen-Image's last text branch): DDP must
    # tolerate them (DiffSynth's --find_unused_parameters); elsewhere the check only costs a traversal.
    accelerator.ddp_handler.find_unused_parameters = family.ddp_find_unused_parameters
    module = TrainingModule(model.dit, loss, empty, job.data.caption_dropout, job.checkpoint_offload)
    from ..block_swap import block_swap_of

    swap = block_swap_of(model.dit)
    if swap is None:
        module, optimizer = accelerator.prepare(module, optimizer)
    else:  # the swap placed the DiT (its swapped blocks' masters stay on the CPU, which DDP must not touch)
        prefix = next(n for n, m in module.named_modules() if m is swap.model)
        module._ddp_params_and_buffers_to_ignore = swap.swapped_tensor_names(f"{prefix}." if prefix else "")
        module, optimizer = accelerator.prepare(module, optimizer, device_placement=[False, True])
    return Optimisation(module, optimizer, scheduler, params)


# --------------------------------------------------------------------------------------------------------------
# The loss's own trainables (see the module docstring)

@dataclass
class LossContext:
    """What `loss.setup(ctx)` gets."""
    job: TrainJob
    accelerator: Any
    device: torch.device
    pipe: Any  # the job's pipeline; its DiT is the student (already changed: LoRA/trainables added)
    model: Model
    data: Data


def setup_loss(loss, ctx: LossContext) -> None:
    """Let a loss with trainables of its own build them (a no-op for the losses without `setup`)."""
    if hasattr(loss, "setup"):
        loss.setup(ctx)


# --------------------------------------------------------------------------------------------------------------
# Memory refusal

def check_memory(job: TrainJob, pipe, loss, accelerator, height: int, width: int, dataset=None) -> None:
    """Refuse, before anything is allocated at this size, a training step (and the main process's validation
    samples) that cannot fit: a closed-form lower bound
    (`report.training_activation_bytes`, times the unrolled student steps for Direct Distill) plus the gradients
    and optimiser states not yet allocated, against the free memory. Under DDP one refusal stops every process."""
    from ..report import training_activation_bytes
    from ..velocity import base_model
    from ..weights_check import check_fits

    device = accelerator.device
    dit = base_model(pipe.dit)
    config = {k: v for k, v in dict(dit.config).items() if not k.startswith("_")}
    text_tokens = 0 if pipe.prompt_encoder.trims_padding else int(getattr(pipe.prompt_encoder, "max_length", 0))
    mixed = accelerator.mixed_precision != "no"
    dtype_bytes = 2 if mixed else torch.empty((), dtype=pipe.dtype).element_size()
    unrolled = loss.unrolled_steps() if hasattr(loss, "unrolled_steps") else \
        (loss.steps or 1) if isinstance(loss, DirectDistillLoss) else 1
    acts = unrolled * training_activation_bytes(pipe.family, config, batch=job.batch_size,
                                                tokens=pipe.image_seq_len(height, width) + text_tokens,
                                                checkpointing=job.gradient_checkpointing, dtype_bytes=dtype_bytes)
    trainable = 0 if job.mode == "lora" else sum(
        p.numel() for n, p in dit.named_parameters() if any(n.startswith(x) for x in job.full_trainable))
    if is_sharded(job, accelerator):  # each process keeps its share of the masters, gradients, AdamW states
        trainable = -(-trainable // accelerator.num_processes)
    per_param = 4 + (8 if job.optim.name == "adamw" else 0) + (4 if pipe.dtype != torch.float32 else 0)
    error = None
    try:
        check_fits(acts + trainable * per_param, device, field="data.height/width", value=f"{width}x{height}",
                   what=f"a training step on {width}x{height} images in batches of {job.batch_size}",
                   fix="train at a smaller size (data.height/width or data.max_pixels), a smaller batch_size "
                       "(with grad_accum to keep the effective batch), gradient_checkpointing on, or mode 'lora'.")
        v = job.validation
        if v.prompts and accelerator.is_main_process:
            settings, count = sample_settings(job, pipe, loss, dataset), len(v.prompts) * len(v.seeds)
            pipe.check_memory(count, count, settings["height"], settings["width"], settings["cfg_scale"] != 1.0)
    except DistilleryError as exc:
        error = exc
    if accelerator.num_processes > 1:  # one refusal stops every process (none waits at a barrier)
        refused = accelerator.reduce(torch.tensor(float(error is not None), device=device), "sum")
        if error is None and float(refused) > 0:
            error = DistilleryError("data.height/width", f"{width}x{height}", "another process's device has too "
                                    "little memory for this size (its error says how much).",
                                    "see that process's error.")
    if error is not None:
        raise error


# --------------------------------------------------------------------------------------------------------------
# Memory plan and block swap

@dataclass
class Memory:
    """The run's memory plan (`memory_plan.MemoryPlan` at the blocks swapped; None when not planned) and the
    blocks swapped."""
    plan: Any
    blocks_to_swap: int

    def predicted_peak(self) -> int | None:
        return None if self.plan is None else self.plan.total()


def unrolled_steps(loss, dataset=None) -> int:
    """DiT calls with grad one training step keeps (Direct Distill's unrolled sampler: its steps, else the most
    a dataset row asks for; DMD's and Trajectory's own count)."""
    if hasattr(loss, "unrolled_steps"):
        return loss.unrolled_steps()
    if not isinstance(loss, DirectDistillLoss):
        return 1
    rows = getattr(dataset, "rows", None) or []
    return loss.steps or max((r.num_inference_steps or loss.default_steps for r in rows), default=loss.default_steps)


def _text_tokens(dataset, rows: int = 64) -> int | None:
    """The longest prompt, in tokens, among a cached dataset's first rows (an encoder that trims padding gives
    each prompt its own length; a batch is as long as its longest). None (the family's default) without a cache."""
    if dataset is None or getattr(dataset, "cache", None) is None or not len(dataset):
        return None
    return max(int(dataset[i]["text"][0].shape[0]) for i in range(min(rows, len(dataset)))) or None


def plan_memory(job: TrainJob, pipe, loss, accelerator, height: int, width: int, callbacks, dataset=None) -> Memory:
    """The peak GPU memory of this run by part (`memory_plan.memory_plan` from the job's resolution, batch, mode,
    unrolled steps, base dtype and checkpointing) and the blocks to swap: `job.blocks_to_swap`, or for "auto" the
    fewest for which the plan fits the device's free memory (0 on the CPU). Planned on a GPU (the loop compares
    the measured peak with it) and wherever blocks are swapped; both are logged and written to memory_plan.json."""
    from .. import fp8
    from ..block_swap import auto_blocks_to_swap
    from ..formats import atomic_write_json
    from ..velocity import base_model

    device = accelerator.device
    n = job.blocks_to_swap
    if n == "auto" and device.type != "cuda":
        callbacks.on_message(f"blocks_to_swap auto: 0 on {device.type} (every block is in the same memory)")
        n = 0
    if device.type != "cuda" and n == 0:
        return Memory(None, 0)
    from ..memory_plan import memory_plan

    dit = base_model(pipe.dit)
    config = {k: v for k, v in dict(dit.config).items() if not k.startswith("_")}
    steps = unrolled_steps(loss, dataset)
    base = "fp8" if job.base_dtype == "fp8" or fp8.compute_dtype(dit) is not None else "bf16"
    tokens = _text_tokens(dataset) if pipe.prompt_encoder.trims_padding else \
        int(getattr(pipe.prompt_encoder, "max_length", 0)) or None
    targets = None if job.lora.targets in (None, "", "preset") else job.lora.targets
    try:
        plan = memory_plan((pipe.family, config), height=height, width=width, batch=job.batch_size, mode=job.mode,
                           loss="sft" if steps == 1 else f"direct:{steps}", base_dtype=base,
                           gradient_checkpointing=job.gradient_checkpointing, lora_rank=job.lora.rank,
                           lora_targets=targets, text_tokens=tokens)
    except DistilleryError as exc:
        if n == "auto":
            raise DistilleryError("blocks_to_swap", "auto", f"needs the run's memory plan, which failed: "
                                  f"{exc.problem}", "give a number of blocks to swap.") from exc
        callbacks.on_message(f"no memory plan for this run: {exc.problem}")
        return Memory(None, n)
    if n == "auto":
        n = auto_blocks_to_swap(dit, device, plan)
        callbacks.on_message(f"blocks_to_swap auto: {n} of {plan.max_swappable} (the fewest whose plan fits "
                             f"{device}'s free memory)")
    plan = plan.with_swap(n)  # (a number above the blocks there are is refused here, naming blocks_to_swap)
    lines = plan.summary_lines()
    callbacks.on_message(f"memory plan: {lines['plan']}")
    callbacks.on_message(f"predicted peak: {lines['peak']}")
    if accelerator.is_main_process:
        atomic_write_json(Path(job.output.dir) / "memory_plan.json", plan.to_dict())
    return Memory(plan, n)


class PeakMemory:
    """CUDA: the peak of `torch.cuda.max_memory_allocated` over the training steps (validation left out), beside
    the memory plan's prediction (`setup.Memory`). Elsewhere it measures nothing (None)."""

    def __init__(self, device, memory):
        self.cuda = device.type == "cuda"
        self.device = device
        self.predicted = memory.predicted_peak() if memory is not None else None
        self.plan = memory.plan if memory is not None else None
        self.peak = 0
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def measured(self) -> int | None:
        if not self.cuda:
            return None
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        return self.peak

    @contextlib.contextmanager
    def paused(self):
        self.measured()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)

    def report(self, report: dict, callbacks, out: Path | None) -> None:
        """The measured peak beside the prediction: in the run's data report, the log and memory_plan.json."""
        measured = self.measured()
        if measured is None:
            return
        entry = {"measured_peak_bytes": measured, "predicted_peak_bytes": self.predicted}
        if self.predicted:
            entry["predicted_over_measured"] = self.predicted / measured if measured else None
        report["memory"] = entry
        gib = 1024 ** 3
        callbacks.on_message(f"peak GPU memory of the training steps: {measured / gib:.2f} GiB measured"
                             + (f", {self.predicted / gib:.2f} GiB predicted" if self.predicted else ""))
        if out is not None and self.plan is not None:
            from ..formats import atomic_write_json

            atomic_write_json(out / "memory_plan.json", {**self.plan.to_dict(), **entry})


# --------------------------------------------------------------------------------------------------------------
# All of it, in order

@dataclass
class Parts:
    """A set-up run, as `set_up` returns it to the loop."""
    data: Data
    model: Model
    optim: Optimisation
    validator: Validator
    checkpoints: Checkpoints
    memory: Memory | None = None


def set_up(job: TrainJob, pipe, loss, accelerator, callbacks, stop, state: RunState) -> Parts:
    """Everything before the first step, in this order, ending with the resume (which fills `state`)."""
    out = Path(job.output.dir)
    if job.data.height is not None:  # a fixed size is known now: refuse it before the cache is built at it
        check_memory(job, pipe, loss, accelerator, job.data.height, job.data.width)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        job.save(out / "job.json")
    callbacks.on_message("preparing data")
    data = prepare_data(job, pipe, accelerator, callbacks, stop)
    if job.data.height is None and data.dataset.sizes:  # aspect buckets: the largest one the data gave
        check_memory(job, pipe, loss, accelerator, *max(data.dataset.sizes, key=lambda hw: hw[0] * hw[1]),
                     dataset=data.dataset)
    # training runs only the DiT: with the cache the text encoder and VAE leave the GPU (validation brings them back
    # while it samples); without it they encode every batch, and a loss decoding images keeps the VAE
    components = Components(pipe, accelerator.device, keep_codec=getattr(loss, "image_weight", 0) > 0)
    if job.data.cache:
        components.park()
    validator = Validator(job, pipe, loss, accelerator, data.dataset, callbacks, state, components)
    sharded = is_sharded(job, accelerator)
    # a DiT not on the device yet (sharded, or loaded on the CPU to be stored in fp8 / block-swapped: it may not
    # fit as loaded) samples the teacher once placed, with its adapters off (a preset LoRA is merged by then)
    late_teacher = sharded or pipe.device.type != accelerator.device.type
    if not late_teacher:
        validator.sample_teacher()  # the base model's images, before any change
    size = (job.data.height, job.data.width) if job.data.height is not None else \
        max(data.dataset.sizes, key=lambda hw: hw[0] * hw[1]) if data.dataset.sizes else (None, None)
    # (a sharded run's plan would be of the whole model, not of a process's shards)
    planned = size[0] is not None and not sharded
    memory = plan_memory(job, pipe, loss, accelerator, *size, callbacks, data.dataset) if planned else Memory(None, 0)
    model = prepare_model(job, pipe, accelerator.device, place=not sharded, blocks_to_swap=memory.blocks_to_swap)
    count = sum(p.numel() for p in model.params())
    callbacks.on_message(f"training {count:,} parameters in {len(model.names)} tensors/modules"
                         + (f", sharded over {accelerator.num_processes} processes" if sharded else ""))
    optim = prepare_optimisation(job, model, loss, data.empty, accelerator, pipe.family_spec)
    state.start_ema(model.trainable(), job.ema_decay)  # (after sharding: the shadows of each process's shards)
    if late_teacher:  # (sharded: every process samples with the sharded DiT) still the base weights: no update yet
        from ..losses_dmd import active_adapter

        with active_adapter(model.dit, None):
            validator.sample_teacher()
    setup_loss(loss, LossContext(job, accelerator, accelerator.device, pipe, model, data))
    from ..block_swap import block_swap_of

    if block_swap_of(model.dit) is not None:  # what the loss added (DMD's fake adapters) goes to the device too
        block_swap_of(model.dit).place_resident()
    checkpoints = Checkpoints(job, accelerator, callbacks, model, optim, loss, data.sampler, state,
                              validator.write_chart)
    checkpoints.resume()
    return Parts(data, model, optim, validator, checkpoints, memory)
