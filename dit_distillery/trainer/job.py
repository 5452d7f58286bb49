"""A training job: one serialisable description shared by the CLI, the ComfyUI nodes and `accelerate launch`.

`python -m dit_distillery train JOB.json` runs it; the Export Training Job node writes it. Every field has the
default a user would expect; unknown keys are errors (a typo must not be silently ignored), and values are
checked before anything runs. Each DiffSynth training argument (seed 003) has a counterpart, named in comments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
    teacher: str | None = None  # for validation beside a distilled student; defaults to the base pipeline


@dataclass
class DataSpec:
    """The dataset (DiffSynth: --dataset_base_path, --dataset_metadata_path, --height/--width/--max_pixels, --dataset_repeat)."""

    path: str | None = None  # a DiffSynth-format folder, or a folder of images + .txt captions
    metadata: str | None = None  # metadata.csv/.json/.jsonl (default: found in `path`)
    synthetic: dict | None = None  # the embedded synthetic shapes, e.g. {"count": 512, "size": 32, "seed": 0}
    height: int | None = None
    width: int | None = None
    max_pixels: int = 1024 * 1024
    repeat: int = 1
    cache: bool = True  # encode latents/prompts once, train the DiT only
    cache_dir: str | None = None  # default: <output dir>/cache
    on_error: str = "raise"  # or "skip" bad rows (counted in the report)
    caption_dropout: float = 0.0  # DiffSynth never drops captions; >0 teaches the unconditional branch for CFG
    num_workers: int = 0


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
    teacher: bool = True  # distillation: also sample the teacher (many steps, CFG) for side-by-side images
    teacher_steps: int = 50
    teacher_cfg: float = 4.0
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
    seed: int = 0
    output: OutputSpec = field(default_factory=OutputSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    resume: str | None = "auto"  # "auto" = continue from the output folder's latest checkpoint, None = fresh

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
        for key in ("output", "resume", "validation", "steps", "compile"):
            data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> None:
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
        if self.data.path is None and self.data.synthetic is None:
            raise DistilleryError("data.path", None, "no dataset given.",
                                  "set data.path to a dataset folder, or data.synthetic to {} for the embedded shapes.")
        if self.output.save_every < 0:
            raise DistilleryError("output.save_every", self.output.save_every, "must be >= 0.", "0 saves only at the end.")
        if not isinstance(self.loss, dict) or "kind" not in self.loss:
            raise DistilleryError("loss", self.loss, "must be an object with a 'kind'.",
                                  'use {"kind": "flow_matching"} or {"kind": "direct_distill"}.')


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
        raise DistilleryError(f"{where}.{unknown[0]}", data[unknown[0]], "is not a known setting.",
                              f"valid keys here: {sorted(fields)}.")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        if sub is not None:
            value = _build(sub, value, f"{where}.{name}")
        elif name == "betas" and value is not None:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


_NESTED = {
    (TrainJob, "model"): ModelSpec, (TrainJob, "data"): DataSpec, (TrainJob, "lora"): LoraSpec,
    (TrainJob, "optim"): OptimSpec, (TrainJob, "output"): OutputSpec, (TrainJob, "validation"): ValidationSpec,
}
