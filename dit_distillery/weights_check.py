"""Checks that weights fit before they are used: shapes, finiteness, and memory.

Every loader (DiT files and folders, LoRAs, Shrink DiT's source, training checkpoints) calls the same functions,
so a bad file gets the same clear message wherever it is opened, instead of torch's `size mismatch` traceback or,
worse, NaN weights that load silently and sample black images.

* `check_shapes`: the file's tensor shapes (read from the safetensors header: no data) against the shapes the
  model expects; names the field, the file, the first mismatching tensor with both shapes and how many differ.
* `is_finite` / `check_finite`: one tensor at a time as it loads, so the check adds one pass over data already
  in memory. `torch.aminmax` is the pass (NaN and +-inf show up in min or max; it reads at memory speed and,
  unlike a sum, cannot overflow to a false alarm); fp8 has no CPU reductions and its upcast is slow, so its
  NaN/inf bit patterns are found with integer maxima of the raw bytes.
* `available_memory` / `check_fits`: what the device can still allocate (CUDA: `torch.cuda.mem_get_info`;
  CPU: psutil's available RAM, psutil being a dependency of accelerate, else Linux's available pages), and
  a refusal naming the request, the estimate and what is available.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch

from .errors import DistilleryError

GIB = 1024 ** 3
NONFINITE_FIX = ("use an earlier checkpoint of the training run (its checkpoints/ folder keeps the last one whose "
                 "weights were finite), or download or export the file again.")


# ----------------------------------------------------------------------------------------------------------
# Shapes

def _shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], *, field: str, path, what: str,
                 fix: str, require_all: bool = True, unit: str = "tensors") -> None:
    """Raise a DistilleryError unless every tensor in `found` has the shape `expected` says (no data read).

    `expected`: what the model wants (name -> shape); `found`: what the file holds. With `require_all`, names the
    model wants but the file lacks are an error too (a LoRA adapts a subset, so it passes False).
    """
    wrong = [k for k in found if k in expected and tuple(found[k]) != tuple(expected[k])]
    unexpected = [k for k in found if k not in expected]
    missing = [k for k in expected if k not in found] if require_all else []
    if not (wrong or unexpected or missing):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of {len(found)} {unit} have the wrong shape, first {k!r}: {_shape(found[k])} in "
                     f"the file, {_shape(expected[k])} in the {what}")
    if missing:
        parts.append(f"{len(missing)} {unit} the {what} needs are missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} {unit} have no place in the {what} (e.g. {unexpected[0]!r})")
    raise DistilleryError(field, str(path), "; ".join(parts) + ".", fix)


# ----------------------------------------------------------------------------------------------------------
# Finiteness

_FP8_NONFINITE = {  # smallest byte (sign bit clear) whose pattern is NaN/inf: all-ones exponent
    torch.float8_e4m3fn: 0x7F,  # e4m3fn: only S.1111.111 is NaN, there is no inf
    torch.float8_e5m2: 0x7C,  # e5m2: S.11111.xx are inf and NaN
}


def is_finite(t: torch.Tensor) -> bool:
    """Whether every value of a tensor is finite (integer and empty tensors are)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    limit = _FP8_NONFINITE.get(t.dtype)
    if limit is not None:
        # bytes >= limit (sign clear) are the positive NaN/inf patterns: signed-int8 maximum; with the sign bit
        # set they are >= 0x80|limit: unsigned maximum. Two integer reductions, no upcast.
        return int(torch.aminmax(t.view(torch.int8).reshape(-1)).max) < limit and \
            int(t.view(torch.uint8).max()) < (0x80 | limit)
    low, high = torch.aminmax(t.detach().reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many values are NaN or infinite (only called on a tensor that failed `is_finite`: may be slow)."""
    return int((~torch.isfinite(t.detach().float())).sum())


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or inf, or None when all are finite."""
    for name, t in named:
        if not is_finite(t):
            return name
    return None


def nonfinite_error(field: str, path, name: str, t: torch.Tensor, fix: str = NONFINITE_FIX) -> DistilleryError:
    return DistilleryError(field, str(path), f"tensor {name!r} holds {count_nonfinite(t)} NaN/inf values (of "
                           f"{t.numel()}): the weights are damaged (a diverged training run or a corrupt file).", fix)


def check_finite(name: str, t: torch.Tensor, *, field: str, path, fix: str = NONFINITE_FIX) -> torch.Tensor:
    """Return `t`, or raise a DistilleryError naming the file and the tensor when it holds NaN/inf."""
    if not is_finite(t):
        raise nonfinite_error(field, path, name, t, fix)
    return t


# ----------------------------------------------------------------------------------------------------------
# Memory

def available_memory(device: str | torch.device) -> int:
    """Bytes the device can still allocate: free GPU memory (plus what PyTorch's allocator holds unused, which it
    reuses), or the RAM the OS reports as available."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil  # accelerate's dependency, so installed wherever we run

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown (not Linux, no psutil): never refuse on a guess


def gib(n: int | float) -> str:
    if n >= GIB / 100:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 / 10 else f"{n / 1024:.1f} KiB"


def check_fits(estimate: int, device: str | torch.device, *, field: str, value, what: str, fix: str) -> None:
    """Refuse, before allocating, a request whose estimated memory exceeds what the device has available."""
    free = available_memory(device)
    if estimate > free:
        where = "free GPU memory" if torch.device(device).type == "cuda" else "available RAM"
        raise DistilleryError(field, value, f"{what} needs about {gib(estimate)} but only {gib(free)} of {where} "
                              f"is left on {device}; it was refused before allocating anything.", fix)
