"""A training job: one serialisable description shared by the CLI, the ComfyUI nodes and `accelerate launch`.

`python -m dit_distillery train JOB.json` runs it; the Export Training Job node writes it. Every field has the
default a user would expect; unknown keys are errors (a typo must not be silently ignored), and values are
checked before anything runs: every value against its field's annotation (`"lr": "1e-4"`, `"steps": true`,
`Infinity`, a string where a list belongs are refused, naming the dotted field), then the settings' own rules
(ranges, choices, the loss and synthetic-data options as their constructors take them). Each DiffSynth training
argument (seed 003) has a counterpart, named in comments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DistilleryError


@dataclass
class ModelSpec:
    """Where the model comes from (DiffSynth: --model_paths / --model_id_with_origin_paths)."""

    # "default" (the embedded tiny text-to-image model), "tiny-qwen-image", or a diffusers pipeline folder
    pipeline: str = "default"
    dit: str | None = None  # replaces the pipeline's DiT: a safetensors file (e.g. a shrunk student) or folder
    text_encoder: str | None = None
    vae: str | None = None
    dtype: str = "auto"  # base weights: auto = bf16 on GPU, fp32 on CPU
    # The teacher, a DiT file or transformer folder: DMD's real score, and validation's teacher column (default: the
    # pipeline's DiT before training). Needed when `dit` replaces the pipeline's DiT with a student for DMD.
    teacher: str | None = None


@dataclass
class DataSpec:
    """The dataset (DiffSynth: --dataset_base_path, --dataset_metadata_path, --height/--width/--max_pixels, --dataset_repeat)."""

    path: str | None = None  # a DiffSynth-format folder, or a folder of images + .txt captions
    metadata: str | None = None  # metadata.csv/.json/.jsonl (default: found in `path`)
    synthetic: dict | None = None  # the embedded synthetic shapes, e.g. {"n": 512, "size": 32, "seed": 0} ("count" = n)
    height: int | None = None
    width: int | None = None
    max_pixels: int = 1024 * 1024
    repeat: int = 1
    cache: bool = True  # encode latents/prompts once, train the DiT only
    cache_dir: str | None = None  # default: <output dir>/cache
    on_error: str = "raise"  # or "skip" bad rows (counted in the report)
    caption_dropout: float = 0.0  # DiffSynth never drops captions; >0 teaches the unconditional branch for CFG
    num_workers: int = 0
    # Prompts only, no images (a loss that needs prompts only: DMD): `prompts` lists them here, or `prompts_only`
    # reads the prompt column of `path`'s metadata. Samples are height x width (default: the pipeline's size).
    prompts: list[str] | None = None
    prompts_only: bool = False


@dataclass
class LoraSpec:
    """LoRA settings (DiffSynth: --lora_rank, --lora_target_modules, --lora_checkpoint, --preset_lora_path)."""

    rank: int = 32
    alpha: float | None = None  # None = rank (scale 1, as DiffSynth)
    targets: Any = "preset"  # "preset" (the family's), a preset name, or a list / comma string of module suffixes
    init_from: str | None = None  # continue from a LoRA file
    preset: str | None = None  # merged into the base before training ("differential" LoRA training)
    preset_strength: float = 1.0


@dataclass
class OptimSpec:
    """Optimiser and LR schedule (DiffSynth: --learning_rate, --weight_decay; it has no warm-up, clipping or cosine)."""

    name: str = "adamw"  # adamw | adamw8bit | adafactor
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float | None = 1.0


@dataclass
class OutputSpec:
    """Outputs (DiffSynth: --output_path, --save_steps)."""

    dir: str = "out/train"
    name: str = "student"
    save_every: int = 500  # steps between checkpoints (also written at the end and on stop)
    keep_last: int = 3  # resumable checkpoints kept (0 = all)
    save_dtype: str = "bf16"  # dtype of the exported weights (training itself keeps fp32 adapters/masters)


@dataclass
class ValidationSpec:
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    every: int = 0  # steps between validations (0 = only at the end, when prompts are given)
    steps: int | None = None  # default: the loss's student steps for distillation, else 30
    cfg: float | None = None  # default: the loss's student cfg for distillation, else 4
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    teacher: bool = True  # distillation: also sample the teacher (model.teacher, else the base) beside the student
    teacher_steps: int | None = None  # default: the dataset rows' teacher_steps, else 50
    teacher_cfg: float | None = None  # default: the loss's (DMD's teacher_cfg), else the rows' teacher_cfg, else 4
    # A stable held-out measure (SimpleTuner's "evaluation loss"): the loss on the first N samples with fixed
    # noise and sigmas, at the start, at every validation and at the end. The training loss itself is too noisy
    # (it depends on the sigma drawn) to compare two checkpoints.
    eval_samples: int = 0


@dataclass
class TrainJob:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    loss: dict = field(default_factory=lambda: {"kind": "flow_matching"})  # see dit_distillery.losses
    mode: str = "lora"  # lora | full (DiffSynth: --lora_base_model vs --trainable_models)
    lora: LoraSpec = field(default_factory=LoraSpec)
    full_trainable: list[str] = field(default_factory=lambda: [""])  # module-name prefixes ("" = everything)
    optim: OptimSpec = field(default_factory=OptimSpec)
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1  # DiffSynth: --gradient_accumulation_steps
    mixed_precision: str = "auto"  # auto = bf16 on GPU, no on CPU
    gradient_checkpointing: bool = True  # DiffSynth: --use_gradient_checkpointing
    checkpoint_offload: bool = False  # DiffSynth: --use_gradient_checkpointing_offload
    ema_decay: float = 0.0  # 0 = off
    compile: bool = False  # torch.compile each DiT block (regional): faster GPU steps after a one-off warm-up
    # The frozen DiT weights: "bf16" as loaded, or "fp8" (their Linear weights stored in float8_e4m3fn with one
    # scale each, computed in model.dtype: bf16 on a GPU, fp32 on the CPU; fp8.store_in_fp8). LoRA only.
    base_dtype: str = "bf16"
    # DiT blocks whose frozen weights stay in CPU memory and are streamed to the GPU as they run (block_swap.py):
    # a number, or "auto" = the fewest that fit the GPU's free memory by the run's memory plan (0 on the CPU).
    blocks_to_swap: Any = 0
    seed: int = 0
    output: OutputSpec = field(default_factory=OutputSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    resume: str | None = "auto"  # "auto" = continue from the output folder's latest checkpoint, None = fresh
    # Several processes (accelerate launch): "ddp" replicates the model on each; "fsdp" shards parameters,
    # gradients and optimiser states over them (accelerate's FSDP2; full training of a DiT that does not fit one
    # GPU). One process trains the same either way. See trainer/sharded.py.
    distributed: str = "ddp"

    # ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        from ..formats import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainJob":
        job = _build(cls, data, "job")
        job.validate()
        return job

    @classmethod
    def load(cls, path: str | Path) -> "TrainJob":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DistilleryError("job", str(path), "no such file.", "give the path of a job JSON file.") from None
        except json.JSONDecodeError as exc:
            raise DistilleryError("job", str(path), f"not valid JSON ({exc}).", "fix the JSON syntax.") from None
        return cls.from_dict(data)

    def fingerprint(self) -> str:
        """A hash of what a resumed run must share with the one that wrote the checkpoint: not where it is
        written, how often it is saved or validated, nor the total step count (extending a run is allowed)."""
        data = self.to_dict()
        for key in ("output", "resume", "validation", "steps", "compile", "distributed", "blocks_to_swap"):
            data.pop(key)  # (distributed: checked on resume against the checkpoint's own, with its own message)
        if data["base_dtype"] == "bf16":  # the default: checkpoints written before the setting existed still match
            data.pop("base_dtype")
        for key, default in (("prompts", None), ("prompts_only", False)):  # (the same for these)
            if data["data"][key] == default:
                data["data"].pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> None:
        """Refuse bad settings before any work (see the module docstring); the first problem is raised."""
        _check_fields(self, "job")
        _choice("mode", self.mode, ("lora", "full"))
        _choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        _choice("optim.name", self.optim.name, ("adamw", "adamw8bit", "adafactor"))
        _choice("optim.schedule", self.optim.schedule, ("constant", "cosine"))
        _choice("data.on_error", self.data.on_error, ("raise", "skip"))
        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        _positive("grad_accum", self.grad_accum)
        _positive("data.repeat", self.data.repeat)
        _positive("lora.rank", self.lora.rank)
        if not self.optim.lr > 0:
            raise DistilleryError("optim.lr", self.optim.lr, "must be > 0.", "LoRA: ~1e-4; full training: ~1e-5.")
        if self.optim.warmup_steps < 0:
            raise DistilleryError("optim.warmup_steps", self.optim.warmup_steps, "must be >= 0.", "use 0 for none.")
        if not 0 <= self.ema_decay < 1:
            raise DistilleryError("ema_decay", self.ema_decay, "must be in [0, 1).", "use 0 (off) or e.g. 0.999.")
        if not 0 <= self.data.caption_dropout < 1:
            raise DistilleryError("data.caption_dropout", self.data.caption_dropout, "must be in [0, 1).",
                                  "use 0 (DiffSynth) or ~0.1 so CFG has an unconditional branch to use.")
        if self.data.path is None and self.data.synthetic is None and self.data.prompts is None:
            raise DistilleryError("data.path", None, "no dataset given.",
                                  "set data.path to a dataset folder, data.synthetic to {} for the embedded shapes, "
                                  "or data.prompts to a list of prompts (DMD).")
        if self.output.save_every < 0:
            raise DistilleryError("output.save_every", self.output.save_every, "must be >= 0.", "0 saves only at the end.")
        if not isinstance(self.loss, dict) or "kind" not in self.loss:
            raise DistilleryError("loss", self.loss, "must be an object with a 'kind'.",
                                  'use {"kind": "flow_matching"} or {"kind": "direct_distill"}.')
        _check_loss(self.loss, self)
        _check_prompts_only(self)
        _check_ranges(self)
        _check_dtypes(self)
        _check_memory_options(self)
        _check_targets(self.lora.targets)
        _check_distributed(self)
        _check_synthetic(self.data.synthetic)
        if self.validation.prompts and not self.validation.seeds:
            raise DistilleryError("validation.seeds", self.validation.seeds, "no seed for the validation prompts.",
                                  "give at least one seed, e.g. [0].")


def _choice(name, value, allowed):
    if value not in allowed:
        raise DistilleryError(name, value, "is not one of the allowed values.", f"use one of {list(allowed)}.")


def _positive(name, value):
    if not isinstance(value, int) or value < 1:
        raise DistilleryError(name, value, "must be a whole number >= 1.", "use e.g. 1.")


def _build(cls, data, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise DistilleryError(where, data, "must be a JSON object.", "see the example job in the README.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DistilleryError(_dotted(where, unknown[0]), data[unknown[0]], "is not a known setting.",
                              f"valid keys here: {sorted(fields)}.")
    kwargs = {}
    hints = _hints(cls)
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        if sub is not None:
            value = _build(sub, value, _dotted(where, name))
        else:
            value = _typed(value, hints[name], _dotted(where, name))
        kwargs[name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Typed fields: each value is checked against its dataclass annotation, so a JSON value of the wrong type is
# refused here, naming the field, instead of failing deep in a run (or, worse, running: a string where a list
# of prompts belongs is a list of one-character prompts).

def _dotted(where: str, name: str) -> str:
    return name if where == "job" else f"{where}.{name}"


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_fields(obj, where: str) -> None:
    """Check (and normalise: lists, tuples) every field of a dataclass instance against its annotation."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = _dotted(where, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                raise DistilleryError(name, value, "must be a JSON object.", "see the example job in the README.")
            _check_fields(value, name)
        else:
            setattr(obj, f.name, _typed(value, hints[f.name], name))


_KINDS = {int: "a whole number", float: "a number", str: "text (a JSON string)", bool: "true or false",
          dict: "a JSON object"}


def _typed(value, hint, name: str, nullable: bool = False):
    """`value` if it fits the annotation `hint` (lists/tuples normalised), else a DistilleryError naming `name`."""
    if hint is Any or hint is object:
        return value  # free-form: checked by the setting's own rule
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            return _typed(value, options[0], name, nullable=len(options) < len(args))
        for option in options:
            with contextlib.suppress(DistilleryError):
                return _typed(value, option, name)
        raise DistilleryError(name, value, "has the wrong type.", f"use one of {options}.")
    if origin in (list, tuple):
        item_hints = args if origin is tuple and Ellipsis not in args else (args[0] if args else Any,)
        if not isinstance(value, (list, tuple)):
            what = f"a list of {len(args)} numbers" if origin is tuple else f"a list of {_describe(args[0], True)}"
            example = '["a red circle"]' if args == (str,) else "[0, 1]" if origin is list else "[0.9, 0.999]"
            raise DistilleryError(name, value, f"must be {what}{_or_null(nullable)}, not {_json_type(value)}.",
                                  f"write a JSON list, e.g. {example} (a single value is not a list).")
        if origin is tuple and len(value) != len(item_hints):
            raise DistilleryError(name, value, f"must hold exactly {len(item_hints)} values.", "e.g. [0.9, 0.999].")
        if origin is tuple:
            return tuple(_typed(v, h, f"{name}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints)))
        return [_typed(v, item_hints[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if finite:
                return value
            raise DistilleryError(name, value, f"must be a finite number{_or_null(nullable)}.",
                                  "write an ordinary number (JSON Infinity and NaN are not allowed).")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise DistilleryError(name, value, f"must be {_describe(hint)}{_or_null(nullable)}, not {_json_type(value)}.",
                          _type_fix(value, hint))


def _or_null(nullable: bool) -> str:
    return " or null" if nullable else ""


def _describe(hint, plural: bool = False) -> str:
    if plural:
        return {int: "whole numbers", float: "numbers", str: "strings", bool: "true/false values"}.get(hint, str(hint))
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _type_fix(value, hint) -> str:
    if hint in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number) and (hint is float or number == int(number)):
            shown = repr(number if hint is float else int(number))
            return f"write the number without quotes: {shown}."
    if hint is int:
        return "write a whole number without quotes, e.g. 1."
    if hint is float:
        return "write a number without quotes, e.g. 0.5."
    if hint is bool:
        return "write true or false (without quotes)."
    if hint is str:
        return "put the text in quotes."
    return "see the example job in the README."


# ----------------------------------------------------------------------------------------------------------
# The settings' own rules

def _check_loss(loss: dict, job: "TrainJob | None" = None) -> None:
    """The loss as the trainer will build it (`losses.loss_from_dict`), with its options typed the same way, and
    the job's other settings as the loss needs them (its `check_job`, when it has one)."""
    from ..losses import LOSSES, loss_from_dict

    cls = LOSSES.get(loss.get("kind"))
    if cls is not None:
        hints = _hints(cls)
        for key, value in loss.items():
            if key in hints:
                _typed(value, hints[key], f"loss.{key}")
        mu = loss.get("mu")
        if mu is not None and mu not in ("diffsynth", "resolution"):
            _typed(mu, float, "loss.mu")
    built = loss_from_dict(loss)
    if job is not None and hasattr(built, "check_job"):
        built.check_job(job)


def is_prompts_only(job: TrainJob) -> bool:
    """Whether the job's dataset holds prompts only (no images, no teacher latents)."""
    return job.data.prompts is not None or job.data.prompts_only


def _check_prompts_only(job: TrainJob) -> None:
    """data.prompts / data.prompts_only: one source of prompts, and a loss that needs nothing else."""
    d = job.data
    if d.prompts is not None:
        from ..data.metadata import prompt_rows

        prompt_rows(d.prompts)  # a non-empty list of non-empty prompts
        for name, value in (("data.path", d.path), ("data.synthetic", d.synthetic)):
            if value is not None:
                raise DistilleryError(name, value, "given together with data.prompts.",
                                      "give the prompts either as data.prompts or in a folder's metadata "
                                      "(data.path with data.prompts_only), not both.")
    if d.prompts_only and d.synthetic is not None:
        raise DistilleryError("data.prompts_only", True, "the synthetic shapes are images.",
                              "drop data.prompts_only, or give data.path / data.prompts instead of data.synthetic.")
    if not is_prompts_only(job):
        return
    from ..losses import LOSSES

    kind = job.loss.get("kind")
    if getattr(LOSSES.get(kind), "needs_images", True):
        raise DistilleryError("loss.kind", kind, f"the {kind} loss trains on each row's image or teacher latents, "
                              "and this dataset holds prompts only (data.prompts / data.prompts_only).",
                              'use the DMD loss ("dmd": it needs prompts only), or a dataset with images: a folder '
                              "of images and captions, or a Generate Distill Dataset folder for distillation.")


def _check_ranges(job: TrainJob) -> None:
    o, v, d = job.optim, job.validation, job.data
    for name, value in (("optim.betas[0]", o.betas[0]), ("optim.betas[1]", o.betas[1])):
        if not 0 <= value < 1:
            raise DistilleryError(name, value, "must be in [0, 1).", "use AdamW's usual (0.9, 0.999).")
    if not o.eps > 0:
        raise DistilleryError("optim.eps", o.eps, "must be > 0.", "use e.g. 1e-8.")
    for name, value in (("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip or 0),
                        ("data.num_workers", d.num_workers), ("output.keep_last", job.output.keep_last),
                        ("validation.every", v.every), ("validation.eval_samples", v.eval_samples)):
        if value < 0:
            raise DistilleryError(name, value, "must be >= 0.", "use 0 for none/off.")
    if not 0 <= o.min_lr_ratio <= 1:
        raise DistilleryError("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1].", "use 0 to decay to 0.")
    if job.lora.alpha is not None and not job.lora.alpha > 0:
        raise DistilleryError("lora.alpha", job.lora.alpha, "must be > 0.", "use null for alpha = rank (scale 1).")
    for name, value in (("validation.steps", v.steps), ("validation.teacher_steps", v.teacher_steps)):
        if value is not None and value < 1:
            raise DistilleryError(name, value, "must be a whole number >= 1.", "use e.g. 4, or null for the default.")
    for name, value in (("validation.cfg", v.cfg), ("validation.teacher_cfg", v.teacher_cfg)):
        if value is not None and value < 0:
            raise DistilleryError(name, value, "must be >= 0.", "use 1 for no CFG, or null for the default.")
    if (d.height is None) != (d.width is None):
        raise DistilleryError("data.height/width", (d.height, d.width), "give both or neither.",
                              "set both for a fixed size, or neither (and data.max_pixels) for aspect buckets.")
    for name, value in (("data.height", d.height), ("data.width", d.width), ("data.max_pixels", d.max_pixels),
                        ("validation.height", v.height), ("validation.width", v.width)):
        if value is not None and value < 1:
            raise DistilleryError(name, value, "must be a whole number >= 1.", "use e.g. 512.")


def _check_dtypes(job: TrainJob) -> None:
    from ..formats import dtype_from_name

    # model.dtype is the base weights' dtype (trainer.loop._base_dtype); auto = bf16 on a GPU, fp32 on the CPU
    _choice("model.dtype", job.model.dtype, ("auto", "bf16", "fp16", "fp32"))
    dtype_from_name(job.output.save_dtype, "output.save_dtype")


def _check_memory_options(job: TrainJob) -> None:
    """base_dtype and blocks_to_swap: what they can be, and what they cannot be combined with."""
    _choice("base_dtype", job.base_dtype, ("bf16", "fp8"))
    if job.base_dtype == "fp8" and job.mode == "full":
        raise DistilleryError("base_dtype", job.base_dtype, "full training updates the DiT's weights, and fp8 "
                              "storage is for frozen weights (a LoRA's base).",
                              'use base_dtype "bf16" for full training, or mode "lora" on an fp8 base.')
    n = job.blocks_to_swap
    if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DistilleryError("blocks_to_swap", n, "must be a whole number >= 0 or \"auto\".",
                              'use 0 (every block on the GPU), e.g. 8, or "auto" (the fewest that fit the GPU).')
    if n != 0 and job.compile:
        raise DistilleryError("blocks_to_swap", n, "swapped blocks change their tensors at every call, which "
                              "compiled blocks (compile) cannot follow.",
                              "set compile to false, or blocks_to_swap to 0.")


def _check_distributed(job: TrainJob) -> None:
    """What sharded training (FSDP) covers: full training with AdamW and a loss that trains nothing of its own."""
    _choice("distributed", job.distributed, ("ddp", "fsdp"))
    if job.distributed != "fsdp":
        return
    if job.mode != "full":
        # LoRA trainables and their optimiser states are small: DDP keeps a copy on every GPU at little cost, and
        # what fills a GPU is the frozen base, which base_dtype / gradient checkpointing shrink without sharding.
        raise DistilleryError("distributed", job.distributed, "sharding (FSDP) is for full training: a LoRA's "
                              "adapters and optimiser states are small enough to replicate.",
                              'use distributed "ddp" for LoRA, or mode "full" to train every weight sharded.')
    if job.optim.name != "adamw":
        raise DistilleryError("optim.name", job.optim.name, "sharded training (distributed fsdp) checkpoints and "
                              "resumes AdamW's states only (8-bit and factored states are not sharded).",
                              'use optim.name "adamw" (its states are sharded too), or distributed "ddp".')
    from ..losses import LOSSES

    if hasattr(LOSSES.get(job.loss.get("kind")), "state_dict"):
        raise DistilleryError("loss.kind", job.loss.get("kind"), "this loss trains a model of its own (e.g. DMD's "
                              "fake score), which sharded training (distributed fsdp) does not shard yet.",
                              'use distributed "ddp", or a loss without trainables of its own (flow_matching, '
                              'direct_distill, trajectory).')
    if getattr(job, "blocks_to_swap", 0):
        raise DistilleryError("blocks_to_swap", job.blocks_to_swap, "block swapping and sharding (distributed "
                              "fsdp) both manage where the weights live; they cannot be combined.",
                              "set blocks_to_swap to 0 (sharding already divides the memory by the processes).")


def _check_targets(targets) -> None:
    if targets in (None, "", "preset"):
        return
    if not isinstance(targets, (str, list, tuple)) or not all(isinstance(t, str) for t in (
            [targets] if isinstance(targets, str) else targets)):
        raise DistilleryError("lora.targets", targets, "must be a preset name, a comma list or a list of module names.",
                              '"preset" (the family\'s), e.g. "qwen_image", "to_q,to_k" or ["to_q", "to_k"].')
    from ..lora_presets import parse_targets

    try:
        parse_targets(targets)
    except DistilleryError as exc:
        raise DistilleryError("lora.targets", targets, exc.problem, exc.fix) from None


def synthetic_options(spec: dict) -> dict:
    """`data.synthetic` as `data.synthetic.write_dataset` keyword arguments ("count" is an alias of "n"), checked
    against that function's own signature, so the job accepts exactly what the writer takes."""
    from ..data.synthetic import MIN_SIZE, write_dataset

    params = {name: p for name, p in inspect.signature(write_dataset).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY or (p.default is not p.empty)}
    params.pop("overwrite", None)  # the trainer writes the dataset only when it is missing
    hints = typing.get_type_hints(write_dataset)
    options, n_name = dict(spec), "data.synthetic.n"
    if "count" in options:
        n_name = "data.synthetic.count"
        if "n" in options:
            raise DistilleryError(n_name, options["count"], "given together with n (the same thing).",
                                  "give only one of them.")
        options["n"] = options.pop("count")
    for key, value in options.items():
        if key not in params:
            raise DistilleryError(f"data.synthetic.{key}", value, "is not a setting of the synthetic dataset.",
                                  f"valid keys: {sorted(params) + ['count']}.")
        _typed(value, hints[key], n_name if key == "n" else f"data.synthetic.{key}")
    if options.get("n", 1) < 1:
        raise DistilleryError(n_name, options["n"], "must be >= 1.", "ask for at least one image.")
    if options.get("size", MIN_SIZE) < MIN_SIZE:
        raise DistilleryError("data.synthetic.size", options["size"], f"must be >= {MIN_SIZE}.", "use e.g. 32.")
    return options


def _check_synthetic(spec) -> None:
    if spec is not None:
        synthetic_options(spec)


_NESTED = {
    (TrainJob, "model"): ModelSpec, (TrainJob, "data"): DataSpec, (TrainJob, "lora"): LoraSpec,
    (TrainJob, "optim"): OptimSpec, (TrainJob, "output"): OutputSpec, (TrainJob, "validation"): ValidationSpec,
}
