"""Read a DiffSynth-format dataset: a base folder plus a metadata file, or a folder of captioned images.

DiffSynth-Studio's `UnifiedDataset` reads `metadata.csv` (any non-JSON file, through pandas), `.json` (a list of
dicts) or `.jsonl` (one dict per line); image paths are joined onto the base folder with `os.path.join`, so
absolute paths stay absolute. Its distill dataset adds `seed,rand_device,num_inference_steps,cfg_scale`; we add
`teacher_steps,teacher_cfg` (how the teacher made the image) and `latents` (a safetensors file holding the
teacher's final latents, which avoids the VAE-decode -> uint8 -> JPEG -> VAE-encode round trip of the target).

We parse with the `csv`/`json` modules rather than pandas: pandas turns a seed column with one blank into
floats and blanks into NaN; here every value is checked and a bad one is reported with the row as the user sees
it (the CSV line, the JSONL line, the JSON entry) and how to fix it. With `on_error="skip"` bad rows are left
out and counted instead.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DistilleryError

METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KNOWN_COLUMNS = ("image", "prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale",
                 "teacher_steps", "teacher_cfg", "latents")


@dataclass(frozen=True)
class Row:
    """One training sample as described by the metadata (files resolved, numbers parsed)."""

    row: int                       # 1-based: CSV/JSONL line, JSON entry, or position in a captioned folder
    where: str                     # how the user finds it: "metadata.csv line 3", "cat.png"
    image: Path | None             # None: a prompts-only row (`prompt_rows`, `prompts_only`): no image to encode
    prompt: str
    seed: int | None = None
    rand_device: str = "cpu"       # DiffSynth's inference default; the teacher's noise was drawn there
    num_inference_steps: int | None = None
    cfg_scale: float | None = None
    teacher_steps: int | None = None
    teacher_cfg: float | None = None
    latents: Path | None = None
    extra: dict = field(default_factory=dict, compare=False)   # other columns, passed through as DiffSynth does


@dataclass
class Metadata:
    """The rows that were read, and the ones left out with `on_error="skip"` (with why)."""

    rows: list[Row]
    source: Path
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


def read_metadata(base_path: str | os.PathLike, metadata_path: str | os.PathLike | None = None, *,
                  on_error: str = "raise", validate: bool = False, image_key: str = "image",
                  prompt_key: str = "prompt", prompts_only: bool = False) -> Metadata:
    """Read a dataset the way DiffSynth's `--dataset_base_path/--dataset_metadata_path` describe it.

    `metadata_path=None` looks for `metadata.csv|jsonl|json` in the base folder, else treats the folder as
    images with same-name `.txt` captions. Missing files are always checked; `validate=True` also opens every
    image and latents file (otherwise an unreadable image is reported when it is first loaded).
    `prompts_only`: only the prompt column (and seeds, steps, cfg) is read, image and latents columns are ignored
    and every row's `image` is None: the data of a loss that needs prompts only (DMD).
    """
    if on_error not in ("raise", "skip"):
        raise DistilleryError("on_error", on_error, "unknown mode.", "use 'raise' or 'skip'.")
    base = Path(base_path)
    if not base.is_dir():
        raise DistilleryError("base_path", str(base_path), "no such folder.",
                              "give the dataset's base folder (image paths in the metadata are relative to it).")
    if metadata_path is None:
        found = [base / n for n in METADATA_NAMES if (base / n).is_file()]
        if not found and prompts_only:
            raise DistilleryError("base_path", str(base), "no metadata.csv/.json/.jsonl for a prompts-only dataset.",
                                  "write the prompts into metadata.csv under a 'prompt' column.")
        if not found:
            return _read_captioned_folder(base, on_error, validate)
        metadata_path = found[0]
    meta = Path(metadata_path)
    if not meta.is_file():
        raise DistilleryError("metadata_path", str(metadata_path), "no such file.",
                              "give the path of metadata.csv, .json or .jsonl.")
    suffix = meta.suffix.lower()
    records = _json_records(meta) if suffix == ".json" else _jsonl_records(meta) if suffix == ".jsonl" \
        else _csv_records(meta, (prompt_key,) if prompts_only else (image_key, prompt_key))
    result = Metadata(rows=[], source=meta)
    for number, where, record in records:
        try:
            result.rows.append(_parse_row(record, number, where, base, None if prompts_only else image_key,
                                          prompt_key, validate))
        except DistilleryError as exc:
            if on_error == "raise":
                raise skip_hint(exc) from exc.__cause__
            result.skipped += 1
            result.reasons.append(str(exc))
    if not result.rows:
        raise DistilleryError("metadata_path", str(meta), "no usable rows" +
                              (f" ({result.skipped} skipped, first: {result.reasons[0]})" if result.skipped else "")
                              + ".", "add rows with a prompt." if prompts_only else "add rows with an image and a prompt.")
    return result


def prompt_rows(prompts, field: str = "data.prompts") -> Metadata:
    """A prompts-only dataset from a list of prompts (a training job's `data.prompts`): rows without an image."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise DistilleryError(field, prompts, "must be a non-empty list of prompts.",
                              'write a JSON list, e.g. ["a red circle", "a blue square"].')
    rows = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise DistilleryError(f"{field}[{i}]", prompt, "empty prompt or not text.", "write a prompt or remove it.")
        rows.append(Row(row=i + 1, where=f"{field}[{i}]", image=None, prompt=prompt))
    return Metadata(rows=rows, source=Path(field))


def skip_hint(exc: DistilleryError) -> DistilleryError:
    """A bad row's error with the other way out added to its fix: leaving such rows out (`on_error="skip"`)."""
    fix = (exc.fix.rstrip(". ") + "; or " if exc.fix else "") + \
        'leave bad rows out with on_error="skip" (data.on_error in a training job).'
    return DistilleryError(exc.field, exc.value, exc.problem, fix)


# ----------------------------------------------------------------------------------------------------------
# Record sources: each yields (1-based number, "file line N" / "file entry N", dict)

def _csv_records(path: Path, required: tuple[str, ...]):
    # utf-8-sig: spreadsheets save CSV with a byte-order mark that would otherwise stick to the first column name
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True), restkey="__extra_fields__")
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise DistilleryError(f"{path.name} line 1 (header)", reader.fieldnames, f"missing column(s) {missing}.",
                              f"the first line must name the columns, at least {', '.join(required)}.")
    records = []
    line = 1  # the header
    for record in reader:
        start = line + 1
        line = reader.line_num  # a quoted field may span lines: report where the record starts
        records.append((start, f"{path.name} line {start}", record))
    return records


def _jsonl_records(path: Path):
    records = []
    for n, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            records.append((n, where, json.loads(text)))
        except json.JSONDecodeError as exc:
            records.append((n, where, _BadRecord(f"not valid JSON ({exc.msg} at column {exc.colno}).")))
    return records


def _json_records(path: Path):
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DistilleryError(f"{path.name} line {exc.lineno}", exc.doc[max(0, exc.pos - 30):exc.pos + 30],
                              f"not valid JSON ({exc.msg}).", "fix the syntax (a .json file holds a list of objects).")
    if not isinstance(data, list):
        raise DistilleryError(str(path.name), type(data).__name__, "a .json metadata file must hold a list.",
                              'write [{"image": "a.png", "prompt": "..."}, ...] or use .jsonl / .csv.')
    return [(n, f"{path.name} entry {n}", rec) for n, rec in enumerate(data, start=1)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DistilleryError("metadata_path", str(path), f"cannot read the file ({exc}).",
                              "save the metadata as UTF-8 text.") from exc


class _BadRecord:
    def __init__(self, problem: str):
        self.problem = problem


# ----------------------------------------------------------------------------------------------------------
# One row

def _parse_row(record, number: int, where: str, base: Path, image_key: str, prompt_key: str,
               validate: bool) -> Row:
    def fail(column, value, problem, fix):
        return DistilleryError(f"{where}, {column}", value, problem, fix)

    if isinstance(record, _BadRecord):
        raise fail("row", None, record.problem, "fix the line's JSON syntax.")
    if not isinstance(record, dict):
        raise fail("row", record, "each entry must be an object with image and prompt.",
                   'write {"image": "a.png", "prompt": "..."}.')
    if any(str(v).strip() for v in record.get("__extra_fields__") or ()):  # trailing empty cells are harmless
        raise fail("row", record["__extra_fields__"], "more fields than columns in the header.",
                   "quote values that contain commas, e.g. \"a red, round ball\".")
    for key in (image_key, prompt_key):
        if key is not None and key not in record:
            raise fail(key, None, f"the {key!r} column is missing.", f"add {key!r} to this row.")

    image = None  # image_key None: a prompts-only row
    if image_key is not None:
        image_value = _blank_to_none(record.get(image_key))
        if image_value is None or not isinstance(image_value, str):
            raise fail(image_key, image_value, "no image path.", "give the image's path relative to the base folder.")
        image = Path(os.path.join(base, image_value))
        if not image.is_file():
            raise fail(image_key, image_value, f"the file {image} does not exist.",
                       "check the path (relative to the dataset's base folder) and the file name's case.")
    prompt = record.get(prompt_key)
    if prompt is not None and not isinstance(prompt, str):
        raise fail(prompt_key, prompt, "the prompt is not text.", "write the caption as a string.")
    if not prompt or not prompt.strip():
        raise fail(prompt_key, prompt, "empty prompt.", "write a caption for this image (or remove the row).")

    latents = _blank_to_none(record.get("latents")) if image is not None else None  # (prompts only: not read)
    if latents is not None:
        if not isinstance(latents, str):
            raise fail("latents", latents, "not a path.", "give the teacher latents' .safetensors path or leave it blank.")
        latents_path = Path(os.path.join(base, latents))
        if latents_path.suffix != ".safetensors":
            raise fail("latents", latents, "teacher latents are read from .safetensors files only.",
                       "save the latents with safetensors.")
        if not latents_path.is_file():
            raise fail("latents", latents, f"the file {latents_path} does not exist.",
                       "check the path (relative to the dataset's base folder) or leave the column blank.")
        latents = latents_path

    rand_device = _blank_to_none(record.get("rand_device"))
    if rand_device is None:
        rand_device = "cpu"
    elif not isinstance(rand_device, str) or not _is_device(rand_device):
        raise fail("rand_device", rand_device, "not a torch device name.", "use 'cpu' or 'cuda' (as the teacher used).")

    row = Row(
        row=number, where=where, image=image, prompt=prompt,
        seed=_int(record, "seed", fail, minimum=0),
        rand_device=rand_device,
        num_inference_steps=_int(record, "num_inference_steps", fail, minimum=1),
        cfg_scale=_float(record, "cfg_scale", fail),
        teacher_steps=_int(record, "teacher_steps", fail, minimum=1),
        teacher_cfg=_float(record, "teacher_cfg", fail),
        latents=latents,
        extra={k: v for k, v in record.items() if k not in KNOWN_COLUMNS and k not in (image_key, prompt_key)
               and k != "__extra_fields__"},
    )
    if validate:
        from .images import check_image

        if row.image is not None:
            check_image(row.image, where)
        if row.latents is not None:
            check_latents_file(row.latents, where)
    return row


def _blank_to_none(value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value.strip() if isinstance(value, str) else value


def _is_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _number(record, column, fail):
    value = _blank_to_none(record.get(column))
    if value is None:
        return None
    if isinstance(value, bool):
        raise fail(column, value, "not a number.", f"write a number in {column} or leave it blank.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise fail(column, value, "not a number.", f"write a number in {column} or leave it blank.") from None
    if not math.isfinite(number):
        raise fail(column, value, "not a finite number.", f"write a number in {column} or leave it blank.")
    return number


def _int(record, column, fail, minimum: int):
    number = _number(record, column, fail)
    if number is None:
        return None
    # "3.0" is accepted: pandas (and so DiffSynth's own tools) writes integer columns with blanks as floats
    if number != int(number) or number < minimum:
        raise fail(column, record.get(column), f"must be a whole number >= {minimum}.",
                   f"write an integer in {column} or leave it blank.")
    return int(number)


def _float(record, column, fail):
    return _number(record, column, fail)


def check_latents_file(path: Path, where: str) -> None:
    """Open a teacher-latents file's header: a readable safetensors file holding exactly one tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise DistilleryError(f"{where}, latents", str(path), f"not a readable safetensors file ({exc}).",
                              "regenerate the teacher latents for this row or leave the column blank.") from exc
    if len(keys) != 1 and "latents" not in keys:
        raise DistilleryError(f"{where}, latents", str(path), f"holds {len(keys)} tensors {keys[:4]} and none is "
                              "named 'latents'.", "store the teacher's final latents as one tensor named 'latents'.")


# ----------------------------------------------------------------------------------------------------------
# A folder of images with same-name .txt captions

def _read_captioned_folder(base: Path, on_error: str, validate: bool) -> Metadata:
    images = sorted(p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DistilleryError("base_path", str(base), "no metadata.csv/.json/.jsonl and no images in the folder.",
                              "add a metadata file, or images with same-name .txt captions.")
    result = Metadata(rows=[], source=base)
    for n, image in enumerate(images, start=1):
        try:
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                raise DistilleryError(f"{image.name}, caption", str(caption), "no caption file.",
                                      f"write the prompt into {caption.name} beside the image.")
            prompt = _read_text(caption).strip()
            if not prompt:
                raise DistilleryError(f"{image.name}, caption", str(caption), "empty caption.",
                                      f"write the prompt into {caption.name}.")
            if validate:
                from .images import check_image

                check_image(image, image.name)
            result.rows.append(Row(row=n, where=image.name, image=image, prompt=prompt))
        except DistilleryError as exc:
            if on_error == "raise":
                raise skip_hint(exc) from exc.__cause__
            result.skipped += 1
            result.reasons.append(str(exc))
    if not result.rows:
        raise DistilleryError("base_path", str(base), f"no usable captioned images ({result.skipped} skipped, first: "
                              f"{result.reasons[0]}).", "add same-name .txt captions beside the images.")
    return result
