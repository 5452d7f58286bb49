"""Which layers a LoRA adapts: named presets per DiT family, and their resolution to a model's module names.

The trainer (to inject adapters) and the size report (to count adapter parameters and measure their memory)
both go through `resolve_targets`, so what the report estimates is what training builds.
"""

from __future__ import annotations

import re

import torch

from . import families
from .errors import DistilleryError

# Every family's presets (`Family.lora_presets`, each family's default is its `default_lora_preset`).
LORA_PRESETS: dict[str, list[str]] = families.lora_presets()


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """A preset name or a comma list / list of module-name suffixes -> the suffixes."""
    if isinstance(targets, str):
        key = targets.strip()
        if key in LORA_PRESETS:
            return list(LORA_PRESETS[key])
        suffixes = [t.strip() for t in key.split(",")]
    else:
        suffixes = [str(t).strip() for t in targets]
    suffixes = [t for t in suffixes if t]
    if not suffixes:
        raise DistilleryError("lora_targets", targets, "names no modules.",
                              f"give a preset ({', '.join(LORA_PRESETS)}) or comma-separated module names like 'to_q,to_k'.")
    return list(dict.fromkeys(suffixes))


def resolve_targets(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """Full names of the `nn.Linear` modules of `model` whose name is, or ends with `.` + , a target suffix.

    Matching is peft's rule for `target_modules`. Call it before adapters are injected (peft replaces the
    Linears). Every suffix must match at least one Linear, so a typo or a preset of another family is caught
    here rather than training a LoRA that silently misses layers.
    """
    suffixes = parse_targets(targets)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    found: list[str] = []
    unmatched = []
    for suffix in suffixes:
        hits = [n for n in linears if n == suffix or n.endswith("." + suffix)]
        if not hits:
            unmatched.append(suffix)
        found.extend(hits)
    if unmatched:
        examples = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in linears})  # block index stripped
        raise DistilleryError("lora_targets", targets,
                              f"{unmatched} match no Linear layer of this {type(model).__name__}.",
                              f"use a preset for this model ({', '.join(LORA_PRESETS)}) or names among "
                              f"{examples[:16]}.")
    order = {name: i for i, name in enumerate(linears)}
    return sorted(set(found), key=order.__getitem__)


def lora_parameter_count(model: torch.nn.Module, names: list[str], rank: int) -> int:
    """Parameters of rank-`rank` adapters (A: rank x in, B: out x rank) on the named Linears."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)
