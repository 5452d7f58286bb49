"""Recipes: what users ask for, as a sequence of the existing stages (issue 12 §3). `python -m dit_distillery
recipe ...` runs them; the bundled workflows draw the same graphs in ComfyUI.

* `keep_lora_few_step`: a LoRA trained on an undistilled base breaks the few-step sampling of its step-distilled
  ("turbo") version (Z-Image-Turbo blurry at 8 steps). The teacher is the base with the LoRA, sampled the slow way
  (e.g. 50 steps, CFG 4); the student is the turbo model with the LoRA merged, and a *new* LoRA is trained on it by
  Direct Distill to match the teacher at the few-step setting (8 steps, CFG 1). The turbo model is a DiT
  (Z-Image-Turbo) or a LoRA merged into the base (Qwen-Image + a Lightning LoRA). Shown on tiny models in
  bench/keep_lora_few_step.py.
* `distill_few_step`: the plain Direct-Distill recipe: teacher = the base at many steps with CFG, student = the same
  base + a LoRA at few steps without CFG (FLUX.2 [klein] base 4B: 50 steps CFG 4 -> 4 steps CFG 1).

Stages, each resumable on its own, so running the same call again continues where it stopped:
1. `student_base.safetensors` (only when a turbo LoRA is given): the student's DiT with the turbo LoRA merged. A
   training job merges one LoRA (`lora.preset`, the user's), so the other one is baked into a file first.
2. `teacher_data/`: `gen_dataset.generate_distill_dataset` (finished rows are kept; a finished stage is not even
   loaded again: `recipe_state.json` records the settings and input files it was made from).
3. `job.json` + `train/`: the `TrainJob` (the same JSON `python -m dit_distillery train` and `accelerate launch`
   run), then `trainer.train` (resumes its latest checkpoint).

Every setting and input is checked before the first stage starts.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import DistilleryError

STATE_NAME = "recipe_state.json"
STUDENT_BASE_NAME = "student_base.safetensors"


@dataclass
class RecipeSettings:
    """What the recipes share: the teacher's and the student's sampling, the data, the LoRA training."""

    prompts: list
    seeds_per_prompt: int = 1
    start_seed: int = 0
    teacher_steps: int = 50
    teacher_cfg: float = 4.0
    negative_prompt: str = ""
    student_steps: int = 8
    student_cfg: float = 1.0
    student_schedule: str | None = None  # the student's sigma schedule template; None = the family's
    height: int | None = None  # None = the base pipeline's default size
    width: int | None = None
    gen_batch_size: int = 1
    train_steps: int = 1000
    rank: int = 32
    lr: float = 1e-4
    batch_size: int = 1
    gradient_checkpointing: bool = True
    save_every: int = 250
    validation_prompts: int = 2  # the first N prompts, sampled by the student at the end (and every save_every)
    seed: int = 0
    name: str = "student_lora"


@dataclass
class Inputs:
    """The models: `base` (a diffusers folder or built-in name) whose text encoder and VAE both sides use, with
    `base_dit` replacing its DiT (e.g. ComfyUI's z_image_bf16.safetensors); `turbo` replaces the DiT on the
    student side, `turbo_lora` is merged into the student's DiT; `lora` is the user's LoRA (both sides)."""

    base: str
    base_dit: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    turbo: str | None = None
    turbo_lora: str | None = None
    turbo_lora_strength: float = 1.0
    lora: str | None = None
    lora_strength: float = 1.0


def _file(path, field: str, kind: str = "file") -> str | None:
    if path is None:
        return None
    p = Path(path)
    ok = p.is_file() if kind == "file" else p.exists()
    if not ok:
        raise DistilleryError(field, str(path), f"no such {kind}.", f"give the path of an existing {kind}.")
    return str(p)


def _dit_path(path: str | None, field: str) -> str | None:
    """A DiT given as a file, a transformer folder, or a whole pipeline folder (its transformer/ is used)."""
    if path is None:
        return None
    p = Path(_file(path, field, "file or folder"))
    if p.is_dir() and (p / "model_index.json").is_file():
        p = p / "transformer"
        if not p.is_dir():
            raise DistilleryError(field, str(path), "is a pipeline folder without a transformer/ folder.",
                                  "give the DiT file or the transformer folder.")
    return str(p)


def _family_of(inputs: Inputs) -> str | None:
    """The DiT family of the teacher side, from headers and model_index.json only (no weights read)."""
    from . import families
    from .pipelines.loading import source_family

    if inputs.base_dit is not None:
        return families.detect(inputs.base_dit, "base_dit")[0]
    return source_family(inputs.base)


def check_inputs(inputs: Inputs, family: str | None = None) -> str | None:
    """Refuse missing files, a turbo DiT of another family than the base, and a `family` the base is not, before
    anything is loaded; returns the family (None when a folder does not say)."""
    from . import families
    from .lora import read_lora
    from .pipelines.loading import builtin_names

    if str(inputs.base) not in builtin_names():
        _file(inputs.base, "base", "file or folder")
    inputs.base_dit = _dit_path(inputs.base_dit, "base_dit")
    inputs.turbo = _dit_path(inputs.turbo, "turbo")
    for field in ("text_encoder", "vae"):
        _file(getattr(inputs, field), field, "file or folder")
    for field in ("lora", "turbo_lora"):
        if getattr(inputs, field) is not None:
            read_lora(_file(getattr(inputs, field), field), field)  # a file that is not a LoRA fails here
    found = _family_of(inputs)
    if family is not None:
        families.get(family, "family")
        if found is not None and found != family:
            raise DistilleryError("family", family, f"the base is a {found} model.",
                                  f"use --family {found}, or a {family} base.")
    if inputs.turbo is not None and found is not None:
        turbo_family = families.detect(inputs.turbo, "turbo")[0]
        if turbo_family != found:
            raise DistilleryError("turbo", inputs.turbo, f"is a {turbo_family} DiT, but the base is {found}.",
                                  "give the step-distilled DiT of the same model as the base.")
    return found or family


def _whole(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DistilleryError(name, value, f"must be a whole number >= {minimum}.", f"use e.g. {max(minimum, 1)}.")


def check_settings(s: RecipeSettings) -> None:
    from . import schedule
    from .gen_dataset import read_prompts

    s.prompts = read_prompts(s.prompts)
    for name, minimum in (("seeds_per_prompt", 1), ("start_seed", 0), ("teacher_steps", 1), ("student_steps", 1),
                          ("gen_batch_size", 1), ("train_steps", 1), ("rank", 1), ("batch_size", 1),
                          ("save_every", 0), ("validation_prompts", 0)):
        _whole(name, getattr(s, name), minimum)
    for name in ("height", "width"):
        if getattr(s, name) is not None:
            _whole(name, getattr(s, name), 16)
    if s.student_schedule is not None and s.student_schedule not in schedule.templates():
        raise DistilleryError("student_schedule", s.student_schedule, "unknown schedule template.",
                              f"use one of {list(schedule.templates())}, or leave it out for the family's.")
    if s.teacher_steps <= s.student_steps:
        raise DistilleryError("teacher_steps", s.teacher_steps, f"the teacher must take more steps than the student "
                              f"({s.student_steps}).", "use e.g. 50 teacher steps.")


def job_spec(out: Path, inputs: Inputs, s: RecipeSettings, student_dit: str | None, size: tuple[int, int],
             dtype: str = "auto") -> dict:
    """The training job (a `TrainJob` dict) of the recipe's last stage."""
    width, height = size
    loss = {"kind": "direct_distill", "mu": "resolution"}
    if s.student_schedule:
        loss["template"] = s.student_schedule
    lora = {"rank": s.rank}
    if inputs.lora is not None:
        lora.update(preset=inputs.lora, preset_strength=float(inputs.lora_strength))
    teacher, show_teacher = _teacher_dit(inputs, student_dit)
    return {
        "model": {"pipeline": str(inputs.base), "dit": student_dit, "text_encoder": inputs.text_encoder,
                  "vae": inputs.vae, "dtype": dtype, "teacher": teacher},
        "data": {"path": str(out / "teacher_data"), "height": height, "width": width},
        "loss": loss,
        "mode": "lora",
        "lora": lora,
        "optim": {"lr": s.lr, "warmup_steps": min(50, s.train_steps // 10)},
        "steps": s.train_steps, "batch_size": s.batch_size, "gradient_checkpointing": s.gradient_checkpointing,
        "seed": s.seed,
        "output": {"dir": str(out / "train"), "name": s.name, "save_every": s.save_every, "keep_last": 2},
        # the teacher column beside the student's samples, when the trainer can show this recipe's teacher
        "validation": {"prompts": list(s.prompts[:s.validation_prompts]), "seeds": [s.seed],
                       "every": s.save_every, "teacher": show_teacher, "teacher_steps": s.teacher_steps,
                       "teacher_cfg": s.teacher_cfg},
        "resume": "auto",
    }


def _teacher_dit(inputs: Inputs, student_dit: str | None) -> tuple[str | None, bool]:
    """(the job's model.teacher, whether validation can show the recipe's teacher). The teacher is the base with
    the user's LoRA: without a LoRA it is the job's own base (the student's DiT before training: no model.teacher
    needed) or, when the student is a turbo DiT, the base's DiT file; with a LoRA it is no file the job can name,
    and the column is left out."""
    if inputs.lora is not None:
        return None, False
    if student_dit == inputs.base_dit:  # the student starts from the teacher's own DiT
        return None, True
    if inputs.base_dit is not None:
        return inputs.base_dit, True
    folder = Path(str(inputs.base))
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        return str(folder / "transformer"), True
    return None, False  # a built-in base: its DiT is no file


def _fingerprint(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():  # a folder: its weight files (and model_index.json)
        files = sorted(q for q in p.rglob("*") if q.suffix in (".safetensors", ".json") and q.is_file())
        return {"path": os.path.abspath(p), "files": [[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files]}
    if not p.exists():
        return {"name": str(path)}  # a built-in pipeline
    stat = p.stat()
    return {"path": os.path.abspath(p), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_state(out: Path) -> dict:
    path = out / STATE_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable: every stage checks its own files again


def _write_state(out: Path, **changes) -> None:
    from .formats import atomic_write_json

    atomic_write_json(out / STATE_NAME, {**_read_state(out), **changes})


def _free() -> None:
    """Give a finished stage's models back before the next one loads its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _student_base(out: Path, inputs: Inputs, device, dtype, log) -> str:
    """Stage 1: the student's DiT (turbo, else the base's) with the turbo LoRA merged, as one file (reused)."""
    from .formats import TensorSource
    from .lora import merge_lora, read_lora
    from .models.registry import META_PROVENANCE, save_dit
    from .pipelines.loading import builtin_names, load_dit, load_pipeline

    path = out / STUDENT_BASE_NAME
    provenance = {"recipe": "student base", "dit": _fingerprint(inputs.turbo or inputs.base_dit or inputs.base),
                  "turbo_lora": _fingerprint(inputs.turbo_lora), "strength": inputs.turbo_lora_strength}
    if path.is_file():
        with TensorSource(path, "out") as src:
            if src.metadata_value(META_PROVENANCE) == json.loads(json.dumps(provenance)):
                log(f"[student base] reusing {path}")
                return str(path)
        raise DistilleryError("out", str(path), "holds a student base merged from other files.",
                              "delete it, or choose another --out folder.")
    source = inputs.turbo or inputs.base_dit
    if source is not None:
        dit = load_dit(source, dtype=dtype, device=device, field="turbo" if inputs.turbo else "base_dit")
    elif str(inputs.base) in builtin_names():
        dit = load_pipeline(inputs.base, device=device, dtype=dtype).dit
    else:
        dit = load_dit(Path(inputs.base) / "transformer", dtype=dtype, device=device, field="base")
    merged = merge_lora(dit, read_lora(inputs.turbo_lora, "turbo_lora"), inputs.turbo_lora_strength, "turbo_lora")
    log(f"[student base] merged {merged} LoRA modules of {Path(inputs.turbo_lora).name}; writing {path}")
    save_dit(dit, path, provenance=provenance)
    del dit
    _free()
    return str(path)


def _teacher_data(out: Path, inputs: Inputs, s: RecipeSettings, device, dtype, log, progress, stop) -> list[int]:
    """Stage 2: the teacher's dataset; returns its [width, height]."""
    from .gen_dataset import generate_distill_dataset
    from .lora import merge_lora, read_lora
    from .pipelines.loading import load_pipeline

    key = {"settings": {k: v for k, v in asdict(s).items() if k in (
               "prompts", "seeds_per_prompt", "start_seed", "teacher_steps", "teacher_cfg", "negative_prompt",
               "student_steps", "student_cfg", "height", "width")},
           "inputs": {f: _fingerprint(getattr(inputs, f)) for f in ("base", "base_dit", "text_encoder", "vae", "lora")},
           "lora_strength": inputs.lora_strength, "dtype": str(dtype)}
    key = json.loads(json.dumps(key))
    state = _read_state(out).get("teacher_data")
    if state and state.get("key") == key and (out / "teacher_data" / "metadata.csv").is_file():
        log(f"[teacher data] reusing {out / 'teacher_data'} ({state['rows']} rows)")
        return state["size"]
    teacher = load_pipeline(inputs.base, dit=inputs.base_dit, text_encoder=inputs.text_encoder, vae=inputs.vae,
                            device=device, dtype=dtype)
    if inputs.lora is not None:  # merged in place: this pipeline is ours alone, so no second copy of the DiT
        merge_lora(teacher.dit, read_lora(inputs.lora, "lora"), inputs.lora_strength, "lora")
    report = generate_distill_dataset(
        teacher, s.prompts, out / "teacher_data", seeds_per_prompt=s.seeds_per_prompt, start_seed=s.start_seed,
        teacher_steps=s.teacher_steps, teacher_cfg=s.teacher_cfg, negative_prompt=s.negative_prompt,
        height=s.height, width=s.width, student_steps=s.student_steps, student_cfg=s.student_cfg,
        batch_size=s.gen_batch_size, progress=progress, stop=stop)
    log(f"[teacher data] {report['rows_written']} rows written, {report['rows_skipped']} already there")
    del teacher
    _free()
    _write_state(out, teacher_data={"key": key, "size": report["size"], "rows": report["rows_in_metadata"]})
    return report["size"]


def run_recipe(out: str | os.PathLike, inputs: Inputs, settings: RecipeSettings, *, family: str | None = None,
               device: str = "cpu", dtype=None, until: str = "train", log: Callable[[str], None] = print,
               data_progress: Callable | None = None, train_callbacks=None,
               stop: Callable[[], bool] | None = None, on_stage: Callable[[str], None] | None = None) -> dict:
    """Run the stages (module docstring) up to `until` ("data": the teacher dataset and job.json; "train": also
    the training). `dtype`: a torch dtype for the teacher and the merge (None: fp32 on the CPU, bf16 on a GPU).
    `on_stage(name)` is called as each stage starts (a progress display's cue)."""
    import torch

    from .formats import atomic_write_json
    from .trainer import TrainJob, train

    if until not in ("data", "train"):
        raise DistilleryError("until", until, "unknown stage.", "use 'data' or 'train'.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DistilleryError("out", str(out), "exists and is not a folder.", "give a folder path.")
    found = check_inputs(inputs, family)
    check_settings(settings)
    dtype = dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)
    # the job's settings are checked now (the size and the student's DiT are known only later)
    TrainJob.from_dict(job_spec(out, inputs, settings, inputs.turbo, (settings.width or 1024,
                                                                      settings.height or 1024)))
    out.mkdir(parents=True, exist_ok=True)
    on_stage = on_stage or (lambda name: None)
    student_dit = inputs.turbo or inputs.base_dit
    if inputs.turbo_lora is not None:
        on_stage("student base")
        student_dit = _student_base(out, inputs, device, dtype, log)
    on_stage("teacher data")
    size = _teacher_data(out, inputs, settings, device, dtype, log, data_progress, stop)
    job = TrainJob.from_dict(job_spec(out, inputs, settings, student_dit, tuple(size)))
    job_path = job.save(out / "job.json")
    report = {"family": found, "out": str(out), "teacher_data": str(out / "teacher_data"), "job": str(job_path),
              "student_dit": student_dit, "size": list(size),
              "train_command": f"python -m dit_distillery train {job_path}"}
    atomic_write_json(out / "recipe.json", {"inputs": asdict(inputs), "settings": asdict(settings), **report})
    if until == "data":
        return report
    on_stage("train")
    result = train(job, callbacks=train_callbacks, stop=stop)
    if not result.is_main_process:
        return None
    report.update(weights=str(result.weights), steps=result.steps, chart=str(result.chart),
                  validation=[str(p) for p in result.validation],
                  final_loss=result.history[-1]["loss"] if result.history else None)
    return report
