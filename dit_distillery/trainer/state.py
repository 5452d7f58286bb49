"""Resumable training checkpoints, written with safetensors + JSON only (never pickle).

accelerate's `save_state` pickles the optimizer with `torch.save`; loading that back can run code, which we
refuse. A checkpoint here is a folder `checkpoint-<step>/` holding:

* `trainable.safetensors` — the trainable parameters (fp32, by name);
* `optimizer.safetensors` — every optimizer state tensor, keyed `<param index>.<name>`, with the param groups and
  non-tensor state as JSON in its metadata;
* `ema.safetensors` — the EMA shadow weights, when EMA is on;
* `loss.safetensors` — the tensors of the loss's own trainables, when it has some (`trainer.setup`'s loss
  protocol; the rest of its state is JSON in `state.json`);
* `state.json` — step, data position, LR-scheduler state, loss history, RNG states (as lists), the job's hash,
  and `finite`: whether the checkpoint is good (finite weights and loss; set to false with the reason in
  `not_good` when the loss its weights gave next was NaN/inf). Resuming and pruning go by it.

The folder is written under a temporary name and renamed when complete, so a killed run never leaves a
checkpoint that looks valid but is not; `latest_checkpoint` only ever returns complete ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import DistilleryError
from ..formats import TensorSource, atomic_write_text, decode_metadata_value, give_usual_permissions, save_safetensors
from ..weights_check import check_finite

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def optimizer_to_tensors(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, extra = {}, {}
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                extra.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "extra": extra}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in structure.get("extra", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": structure["param_groups"]}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(folder: str | os.PathLike, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict, ema: dict[str, torch.Tensor] | None = None,
                    loss: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `folder/checkpoint-<step>/` atomically (see module docstring); returns its path."""
    folder = Path(folder)
    final = folder / f"checkpoint-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step:07d}.", dir=folder))
    try:
        save_safetensors({k: v.detach().float() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        tensors, structure = optimizer_to_tensors(optimizer_state)
        save_safetensors(tensors, tmp / "optimizer.safetensors", {"structure": structure})
        if ema is not None:
            save_safetensors(ema, tmp / "ema.safetensors")
        if loss is not None:
            save_safetensors(loss, tmp / "loss.safetensors")
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(dict(state, step=step), f, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        give_usual_permissions(tmp)  # a plain folder's mode, not mkdtemp's 0700
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistilleryError("output", str(folder), f"could not write the checkpoint ({exc.strerror or exc}).",
                              "free disk space or choose another output folder; the previous checkpoint is intact.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _jsonable(value):
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def is_good(path: str | os.PathLike) -> bool:
    """Whether a checkpoint is good: its weights were finite when saved, and its loss (and the loss its weights
    gave next, when training went on) finite. `state.json` records this as `finite`; checkpoints written before
    the field existed count as good (the run then stopped on a NaN loss before saving)."""
    try:
        return json.loads((Path(path) / "state.json").read_text()).get("finite", True) is not False
    except (OSError, ValueError):
        return False


def last_good_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest good checkpoint (see `is_good`): what a run resumes from and what pruning never deletes."""
    for p in reversed(list_checkpoints(folder)):
        if is_good(p):
            return p
    return None


def mark_not_good(path: str | os.PathLike, reason: str) -> None:
    """Record in a checkpoint's state.json (atomically) that its weights cannot be resumed from, and why."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    state.update(finite=False, not_good=reason)
    atomic_write_text(path / "state.json", json.dumps(state, default=_jsonable))


def prune_checkpoints(folder: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all), never the newest good one; returns the
    deleted folders."""
    found = list_checkpoints(folder)
    good = last_good_checkpoint(folder)
    doomed = [p for p in (found[:-keep_last] if keep_last > 0 else []) if p != good]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint folder: {'trainable', 'optimizer', 'ema' (or None), 'loss' (or None), 'state'}."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise DistilleryError("resume", str(path), "not a complete checkpoint folder (no state.json).",
                              "point at a checkpoint-<step> folder, or at the run's output folder to use its latest.")
    state = json.loads((path / "state.json").read_text())
    fix = "resume from an earlier checkpoint (resume: \"auto\" picks the newest good one)."
    with TensorSource(path / "trainable.safetensors", "resume", prefixes=()) as src:
        trainable = {k: check_finite(k, src.get(k), field="resume", path=src.files[0], fix=fix) for k in src.keys()}
    with TensorSource(path / "optimizer.safetensors", "resume", prefixes=()) as src:
        optimizer = optimizer_from_tensors({k: src.get(k) for k in src.keys()},
                                           decode_metadata_value(src.metadata["structure"]))
    ema = None
    if (path / "ema.safetensors").is_file():
        with TensorSource(path / "ema.safetensors", "resume", prefixes=()) as src:
            ema = {k: check_finite(k, src.get(k), field="resume", path=src.files[0], fix=fix) for k in src.keys()}
    loss = None
    if (path / "loss.safetensors").is_file():
        with TensorSource(path / "loss.safetensors", "resume", prefixes=()) as src:
            loss = {k: src.get(k) for k in src.keys()}
    return {"trainable": trainable, "optimizer": optimizer, "ema": ema, "loss": loss, "state": state}
