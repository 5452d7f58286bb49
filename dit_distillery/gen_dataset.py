"""Generate a Direct-Distill teacher dataset: the teacher samples each (prompt, seed) with many steps and CFG,
and the folder records what the student must reproduce in few steps from the same noise.

Folder layout (DiffSynth-Studio trains on it unchanged: `--dataset_base_path OUT --dataset_metadata_path
OUT/metadata.csv --extra_inputs "seed,rand_device,num_inference_steps,cfg_scale"`; it ignores extra columns):

    OUT/metadata.csv                 image,prompt,seed,rand_device,num_inference_steps,cfg_scale,
                                     teacher_steps,teacher_cfg,latents
    OUT/images/<name>.png            the teacher's image, PNG (lossless; DiffSynth's example JPEG adds error)
    OUT/latents/<name>.safetensors   the teacher's final latents [C, h, w] float32: the exact distillation target;
                                     with `record_trajectory` K > 0 also `trajectory` [K, C, h, w] (the latents
                                     before K of the teacher's steps, evenly spread, the first one its noise) and
                                     `trajectory_sigmas` [K] (their sigmas, decreasing): the Trajectory loss's
                                     targets. metadata.csv is the same either way.
    OUT/gen_dataset.json             the folder's settings and teacher identity (see "Settings" below)

`num_inference_steps`/`cfg_scale` are the STUDENT's (DiffSynth's DirectDistillLoss reads them from the row);
`teacher_steps`/`teacher_cfg` say how the target was made. `<name>` is `<seed>-<prompt slug>-<prompt hash>`,
a function of (prompt, seed) only, so a rerun writes a row's files to the same place.

Seeds: prompt p (0-based position in the list) gets `seeds_per_prompt` rows with seeds
`start_seed + p * seeds_per_prompt + k`, k = 0 .. seeds_per_prompt - 1: distinct within a run and reproducible.
Appending prompts to the list keeps the earlier rows' seeds (a rerun only adds rows); changing `seeds_per_prompt`
or inserting a prompt reassigns the later seeds (existing rows are kept, the new pairs are added). Every row's
noise is `noise.initial_noise(seed, rand_device)`, the same draw the student starts from.

Resuming: a row is identified by (prompt, seed); rows already in `metadata.csv` whose image and latents files
are present are skipped, rows whose files are missing or unreadable are regenerated. Rows in the folder that
this run did not ask for are kept, so a folder can grow over several runs.

Crash safety: each batch's PNGs and latents are written atomically first, then `metadata.csv` is rewritten
atomically (temp file + fsync + rename) with the batch's rows. So the CSV is always a complete, parseable file
whose rows all have their files; an interrupted run leaves at most orphan files, which the rerun overwrites.
We rewrite rather than append because an append can be torn by a crash (a half line, or a quoted multi-line
prompt cut in two) and then needs repair logic; the rewrite costs O(rows) per batch, a few milliseconds for
thousands of rows, nothing next to one batch of many-step CFG teacher samples.

Settings: a folder holds one teacher configuration. `gen_dataset.json` records the teacher identity (DiT
fingerprint, prompt encoder and codec identities, family, schedule template and sigmas), teacher steps/CFG,
negative prompt, size, rand_device and the student's steps/CFG. Rerunning with any of these changed raises a
DistilleryError naming the differences (use a new folder): mixing targets from two teachers in one dataset
would silently train the student towards an average of both.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import operator
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import noise as noise_mod
from .codecs import module_fingerprint
from .errors import DistilleryError, StopRequested
from .formats import atomic_output, atomic_write_json, atomic_write_text, save_safetensors
from .runlock import RunLock, remove_leftovers

FORMAT = "dit_distillery.distill_dataset/1"
METADATA_NAME = "metadata.csv"
SETTINGS_NAME = "gen_dataset.json"
IMAGES_DIR = "images"
LATENTS_DIR = "latents"
COLUMNS = ("image", "prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale",
           "teacher_steps", "teacher_cfg", "latents")
PROMPT_FILE_SUFFIXES = (".txt", ".prompts", ".csv", ".md", ".lst")


# ----------------------------------------------------------------------------------------------------------
# Prompts and seeds

def read_prompts(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Prompts from a text file, from text (one prompt per line), or a list; blank lines and `#` lines skipped.

    A single line that names a missing `.txt`-like file is an error, not a prompt: a mistyped path must not
    silently become the only prompt of a dataset.
    """
    if isinstance(source, (list, tuple)):
        return _check_prompt_list(list(source))
    if not isinstance(source, (str, os.PathLike)):
        raise DistilleryError("prompts", source, "expected a file path, text or a list of prompts.",
                              "give a .txt file with one prompt per line, or a list of strings.")
    text = str(source)
    path = Path(text) if "\n" not in text and len(text) < 4096 else None
    if path is not None and path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DistilleryError("prompts", str(path), f"cannot read the file ({exc}).",
                                  "save the prompts as UTF-8 text, one per line.") from exc
    elif path is not None and path.suffix.lower() in PROMPT_FILE_SUFFIXES:
        raise DistilleryError("prompts", text, "no such file.", "check the path of the prompts file.")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DistilleryError("prompts", text[:200], "no prompts (only blank or # comment lines).",
                              "write one prompt per line.")
    return prompts


def _check_prompt_list(prompts: list) -> list[str]:
    if not prompts:
        raise DistilleryError("prompts", prompts, "the prompt list is empty.", "give at least one prompt.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DistilleryError(f"prompts[{i}]", p, "not a non-empty string.", "remove it or write the prompt.")
    return prompts


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` captions of the built-in shapes task ("a red circle on a blue background"), reproducible from `seed`.

    Drawn from every (shape, colour, background) combination of `data.synthetic`, each once before any repeats,
    so a teacher dataset covers the vocabulary the embedded demo's student is scored on.
    """
    import itertools

    from .data.synthetic import COLOURS, SHAPES, caption

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DistilleryError("n", n, "must be a whole number >= 1.", "ask for at least one prompt.")
    rng = random.Random(seed)
    combos = [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]
    out: list[str] = []
    while len(out) < n:
        batch = combos[:]
        rng.shuffle(batch)
        out.extend(caption(*combo) for combo in batch[: n - len(out)])
    return out


def seed_for(prompt_index: int, k: int, *, start_seed: int, seeds_per_prompt: int) -> int:
    """The seed of row k of prompt `prompt_index` (see the module docstring)."""
    return start_seed + prompt_index * seeds_per_prompt + k


def row_name(prompt: str, seed: int) -> str:
    """File stem of a row: `<seed>-<ascii slug of the prompt>-<hash of the prompt>`, legible and unique."""
    slug = "_".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].strip("_")
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:10]
    return f"{seed}-{slug}-{digest}" if slug else f"{seed}-{digest}"


# ----------------------------------------------------------------------------------------------------------
# Settings

def teacher_identity(pipeline) -> dict:
    """What the teacher's outputs depend on besides the per-row settings: weights and schedule template. A
    pipeline over a front end's model (`external.ExternalPipeline`) names its DiT itself (`dit_identity`)."""
    from .velocity import base_model

    dit = getattr(pipeline, "dit_identity", None) or module_fingerprint(base_model(pipeline.dit))
    return {"family": pipeline.family, "template": pipeline.template, "dit": dit,
            "prompt_encoder": pipeline.prompt_encoder.identity, "codec": pipeline.codec.identity}


def _whole(name: str, value, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise DistilleryError(name, value, "must be a whole number.", f"use a whole number >= {minimum}.") from None
    if value < minimum:
        raise DistilleryError(name, value, f"must be >= {minimum}.", f"use a whole number >= {minimum}.")
    return value


def _scale(name: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise DistilleryError(name, value, "must be a number.", "use e.g. 1 (no guidance) or 4.") from None
    if not math.isfinite(number) or number <= 0:
        raise DistilleryError(name, value, "must be a finite number > 0.", "use e.g. 1 (no guidance) or 4.")
    return number


def _csv_number(x: float) -> str:
    """4.0 -> "4" (as in DiffSynth's example rows), 3.5 -> "3.5"; exact round trip either way."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ----------------------------------------------------------------------------------------------------------
# The existing folder

@dataclass
class _Existing:
    fieldnames: list[str]
    rows: list[dict]               # complete rows, in file order
    broken: list[dict]             # rows whose files are missing or unreadable: regenerated
    settings: dict | None


def _row_complete(base: Path, record: dict) -> bool:
    from .data.metadata import check_latents_file

    image, latents = base / (record.get("image") or ""), base / (record.get("latents") or "")
    if not record.get("image") or not record.get("latents") or not image.is_file() or image.stat().st_size == 0:
        return False
    try:
        check_latents_file(latents, "row")  # a readable safetensors header holding the latents
    except DistilleryError:
        return False
    return True


def _read_existing(out: Path) -> _Existing:
    meta, settings_path = out / METADATA_NAME, out / SETTINGS_NAME
    settings = None
    if settings_path.is_file():
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DistilleryError("out", str(settings_path), f"unreadable settings file ({exc}).",
                                  "restore it, or generate into a new folder.") from exc
        if not isinstance(settings, dict) or settings.get("format") != FORMAT:
            raise DistilleryError("out", str(settings_path), "is not a gen-dataset settings file.",
                                  "generate into a new folder.")
    if not meta.exists():
        return _Existing(list(COLUMNS), [], [], settings)
    if settings is None:
        raise DistilleryError("out", str(out), f"holds a {METADATA_NAME} not written by gen-dataset "
                              f"(no {SETTINGS_NAME}).", "generate into a new folder; rows of unknown origin "
                              "must not be mixed with teacher rows.")
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DistilleryError("out", str(meta), f"cannot read the metadata ({exc}).",
                              "restore it or use a new folder.") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fieldnames = list(reader.fieldnames or [])
    missing = [c for c in COLUMNS if c not in fieldnames]
    if missing:
        raise DistilleryError("out", str(meta), f"the metadata lacks column(s) {missing}.",
                              "restore the file written by gen-dataset, or use a new folder.")
    rows, broken, seen = [], [], set()
    for number, record in enumerate(reader, start=1):
        record.pop(None, None)  # cells beyond the header: not ours
        try:
            key = (record["prompt"], int(record["seed"]))
        except (TypeError, ValueError):
            raise DistilleryError(f"{METADATA_NAME} row {number}", record.get("seed"), "the seed is not a whole "
                                  "number, so the row cannot be checked or regenerated.",
                                  "fix or delete the row.") from None
        if not key[0] or key in seen:
            continue  # an empty or repeated row is dropped at the next rewrite
        seen.add(key)
        (rows if _row_complete(out, record) else broken).append(record)
    return _Existing(fieldnames, rows, broken, settings)


def _settings_diff(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in _settings_diff(a, b)]
        elif a != b:
            diffs.append(f"{key} (folder: {a!r}, now: {b!r})" if not isinstance(a, (list, dict)) else key)
    return diffs


# ----------------------------------------------------------------------------------------------------------
# Generation

def generate_distill_dataset(pipeline, prompts: str | os.PathLike | Sequence[str], out_dir: str | os.PathLike, *,
                             seeds_per_prompt: int = 1, start_seed: int = 0, teacher_steps: int = 40,
                             teacher_cfg: float = 4.0, negative_prompt: str = "", height: int | None = None,
                             width: int | None = None, student_steps: int = 4, student_cfg: float = 1.0,
                             rand_device: str = "cpu", batch_size: int = 4, record_trajectory: int = 0,
                             progress: Callable[[int, int], None] | None = None,
                             stop: Callable[[], bool] | None = None) -> dict:
    """Sample the teacher for every (prompt, seed) not yet in `out_dir` and write images, latents and rows.

    Defaults follow DiffSynth's Direct Distill example: teacher 40 steps CFG 4, student 4 steps CFG 1.
    `progress(done, total)` after each batch is committed; `stop()` is polled before each batch and at each
    denoising step, and raises `StopRequested` with every finished row already written. Returns a report.
    """
    # -- every check before anything is written
    prompts = read_prompts(prompts)
    seeds_per_prompt = _whole("seeds_per_prompt", seeds_per_prompt, 1)
    start_seed = _whole("start_seed", start_seed, 0)
    last_seed = seed_for(len(prompts) - 1, seeds_per_prompt - 1, start_seed=start_seed,
                         seeds_per_prompt=seeds_per_prompt)
    if last_seed > noise_mod.MAX_SEED:
        raise DistilleryError("start_seed", start_seed, f"the last row's seed {last_seed} exceeds {noise_mod.MAX_SEED}.",
                              "use a smaller start seed.")
    teacher_steps = _whole("teacher_steps", teacher_steps, 1)
    student_steps = _whole("student_steps", student_steps, 1)
    teacher_cfg, student_cfg = _scale("teacher_cfg", teacher_cfg), _scale("student_cfg", student_cfg)
    record_trajectory = _whole("record_trajectory", record_trajectory, 0)
    if record_trajectory > teacher_steps:
        raise DistilleryError("record_trajectory", record_trajectory, f"more trajectory points than the teacher's "
                              f"{teacher_steps} steps.", f"use at most {teacher_steps} (or 0 for none).")
    batch_size = _whole("batch_size", batch_size, 1)
    if not isinstance(negative_prompt, str):
        raise DistilleryError("negative_prompt", negative_prompt, "must be text.", 'use "" for none.')
    if not isinstance(rand_device, str):
        raise DistilleryError("rand_device", rand_device, "must be a device name.", "use 'cpu'.")
    noise_mod.initial_noise(0, (1,), rand_device=rand_device)  # an unusable device fails here, not mid-run
    height = pipeline.defaults["height"] if height is None else height
    width = pipeline.defaults["width"] if width is None else width
    pipeline.latent_shape(height, width)  # sizes must be multiples of pipeline.size_multiple
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DistilleryError("out", str(out), "exists and is not a folder.", "give a folder path.")
    settings = {
        "format": FORMAT, "teacher": teacher_identity(pipeline), "teacher_steps": teacher_steps,
        "teacher_cfg": teacher_cfg, "sigmas": pipeline.sigmas(teacher_steps, height, width),
        "negative_prompt": negative_prompt, "height": height, "width": width, "rand_device": rand_device,
        "student_steps": student_steps, "student_cfg": student_cfg,
    }
    record = trajectory_steps(teacher_steps, record_trajectory)
    if record:  # only then: folders made before the option keep equal settings
        settings["record_trajectory"] = record_trajectory
    # -- one run per folder (another one's rows would vanish from metadata.csv); what killed writes left is removed
    with RunLock(out, "out"):
        existing = _read_existing(out) if out.is_dir() else _Existing(list(COLUMNS), [], [], None)
        if existing.settings is not None and (existing.rows or existing.broken):
            diffs = _settings_diff(existing.settings, settings)
            if diffs:
                raise DistilleryError("out", str(out), "this folder was generated with other settings: "
                                      + "; ".join(diffs) + ". Rows from two teacher set-ups must not be mixed.",
                                      "generate into a new folder, or rerun with the folder's settings "
                                      f"(see {SETTINGS_NAME}).")
        remove_leftovers(out)  # the folder is ours (or new): no other run writes in it now

        # -- what to do
        done_keys = {(r["prompt"], int(r["seed"])) for r in existing.rows}
        todo: list[tuple[str, int]] = [(r["prompt"], int(r["seed"])) for r in existing.broken]
        queued = set(todo)
        skipped = 0
        for p, prompt in enumerate(prompts):
            for k in range(seeds_per_prompt):
                key = (prompt, seed_for(p, k, start_seed=start_seed, seeds_per_prompt=seeds_per_prompt))
                if key in done_keys:
                    skipped += 1
                elif key not in queued:
                    queued.add(key)
                    todo.append(key)
        total = len(todo)
        report = {"rows_written": 0, "rows_skipped": skipped, "rows_repaired": len(existing.broken),
                  "total": total + skipped, "seconds": 0.0, "images_per_second": 0.0, "out_dir": str(out),
                  "metadata": str(out / METADATA_NAME), "settings": str(out / SETTINGS_NAME),
                  "rows_in_metadata": len(existing.rows), "size": [width, height], "teacher_steps": teacher_steps,
                  "teacher_cfg": teacher_cfg, "student_steps": student_steps, "student_cfg": student_cfg}
        if not todo:
            return report

        # -- write
        out.mkdir(parents=True, exist_ok=True)
        if existing.settings != settings:
            atomic_write_json(out / SETTINGS_NAME, settings)
        rows = existing.rows
        if progress is not None:
            progress(0, total)
        start = time.perf_counter()
        try:
            for first in range(0, total, batch_size):
                if stop is not None and stop():
                    raise StopRequested("stop requested")
                chunk = todo[first:first + batch_size]
                result = pipeline.sample([p for p, _ in chunk], seeds=[s for _, s in chunk], steps=teacher_steps,
                                         cfg_scale=teacher_cfg, negative_prompt=negative_prompt, height=height,
                                         width=width, rand_device=rand_device, output="both", batch_size=len(chunk),
                                         stop=stop, record=record or None)
                paths = result.trajectory if record else [None] * len(chunk)
                new_rows = [_write_row(out, prompt, seed, image, latents, settings, path, record)
                            for (prompt, seed), image, latents, path
                            in zip(chunk, result.images, result.latents, paths)]
                rows = rows + new_rows
                _write_metadata(out, existing.fieldnames, rows)  # the commit point of the batch
                report["rows_written"] += len(new_rows)
                if progress is not None:  # once per batch (its rows are committed together), so a rate is real
                    progress(report["rows_written"], total)
        except StopRequested as exc:
            raise StopRequested(f"gen-dataset stopped with {report['rows_written']} of {total} rows written "
                                f"({exc}); run it again with the same settings to finish.") from exc
        finally:
            seconds = time.perf_counter() - start
            report.update(seconds=round(seconds, 3), rows_in_metadata=len(rows),
                          images_per_second=round(report["rows_written"] / seconds, 4) if seconds > 0 else 0.0)
        return report


def trajectory_steps(teacher_steps: int, points: int) -> list[int]:
    """The teacher steps whose input latents are recorded: `points` of them evenly spread, the first (its noise)
    always included."""
    if points <= 0:
        return []
    return sorted({round(k * (teacher_steps - 1) / max(1, points - 1)) for k in range(points)}) if points > 1 else [0]


def _write_row(out: Path, prompt: str, seed: int, image, latents: torch.Tensor, settings: dict,
               trajectory: torch.Tensor | None = None, record: list[int] | None = None) -> dict:
    """Write one row's PNG and latents (and trajectory) atomically; return its CSV record (not yet committed)."""
    name = row_name(prompt, seed)
    image_rel, latents_rel = f"{IMAGES_DIR}/{name}.png", f"{LATENTS_DIR}/{name}.safetensors"
    with atomic_output(out / image_rel) as tmp:
        image.save(tmp, format="PNG")
    tensors = {"latents": latents.float().contiguous()}
    if trajectory is not None:
        tensors["trajectory"] = trajectory.float().contiguous()
        tensors["trajectory_sigmas"] = torch.tensor([settings["sigmas"][i] for i in record], dtype=torch.float32)
    save_safetensors(tensors, out / latents_rel, metadata={
        "dit_distillery.teacher_latents": {
            "prompt": prompt, "seed": seed, "rand_device": settings["rand_device"],
            "teacher_steps": settings["teacher_steps"], "teacher_cfg": settings["teacher_cfg"],
            "negative_prompt": settings["negative_prompt"], "height": settings["height"],
            "width": settings["width"], "teacher": settings["teacher"]}})
    return {"image": image_rel, "prompt": prompt, "seed": str(seed), "rand_device": settings["rand_device"],
            "num_inference_steps": str(settings["student_steps"]), "cfg_scale": _csv_number(settings["student_cfg"]),
            "teacher_steps": str(settings["teacher_steps"]), "teacher_cfg": _csv_number(settings["teacher_cfg"]),
            "latents": latents_rel}


def _write_metadata(out: Path, fieldnames: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / METADATA_NAME, buffer.getvalue())
