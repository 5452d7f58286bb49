"""A streamed depth shrink of every block group of any family, in the file's own names: one block in memory.

`shrink()` streams the families with a `WidthLayout` and slices one block group; this is its depth-only sibling
for families whose ComfyUI files use other names than ours (FLUX.2's BFL names, where q, k and v are one fused
tensor) and that have several droppable groups (FLUX.2's double- and single-stream blocks). It reads the source
one unit at a time (one global tensor, or every tensor of one kept block), maps it to our names
(`Family.from_comfy`), renumbers the block, maps it back to the names stock ComfyUI reads (`Family.to_comfy`)
and writes it before reading the next; dropped blocks are never read. Kept tensors are exact copies (or casts to
`dtype`). The student carries our metadata (family, config, provenance) like every DiT file we write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import families
from ..errors import DistilleryError, StopRequested
from ..formats import StreamingSafetensorsWriter, TensorSource
from ..models import registry
from ..weights_check import check_finite
from .plan import check_layers, select_blocks

DEPTH_STRATEGIES = ("uniform", "first", "interval", "list")


def _unit_of(family, key: str, shape) -> tuple[str, int | None]:
    """(group attr or "", block index or None) of a source tensor, from its name under our names."""
    ours = next(iter(family.from_comfy({key: torch.empty(shape, device="meta")})))
    for g in family.block_groups():
        if ours.startswith(g.prefix):
            return g.attr, int(ours[len(g.prefix):].split(".", 1)[0])
    return "", None


def _renumber(state: dict, prefix: str, old: int, new: int) -> dict:
    head = f"{prefix}{old}."
    return {(f"{prefix}{new}." + k[len(head):] if k.startswith(head) else k): v for k, v in state.items()}


def shrink_depth(source, out, *, layers: dict[str, int], strategy: str = "uniform",
                 keep_blocks: dict[str, list[int]] | None = None, dtype: torch.dtype | None = None,
                 overwrite: bool = False, progress=None, stop=None) -> dict:
    """Keep `layers[group]` blocks of each named block group (others whole) and write the student to `out`.

    `strategy`: uniform | first | interval | list (`keep_blocks[group]` = the source indices to keep). Returns
    {"path", "family", "config", "kept_blocks": {group: [source indices]}}."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DistilleryError("out", str(out), "already exists.", "choose a new name or allow overwriting.")
    if strategy not in DEPTH_STRATEGIES:
        raise DistilleryError("strategy", strategy, "a streamed depth shrink of several groups picks blocks by "
                              "position.", f"use one of {list(DEPTH_STRATEGIES)}.")
    if not isinstance(layers, dict) or not layers:
        raise DistilleryError("layers", layers, "give the blocks to keep per block group.",
                              'e.g. {"single_transformer_blocks": 10, "transformer_blocks": 3}.')
    with TensorSource(source, "source") as src:
        name, config, _ = families.detect(src, "source")
        family = families.get(name)
        kept: dict[str, list[int]] = {}
        for attr, count in layers.items():
            g = family.group(attr)
            if g.keep:
                raise DistilleryError("layers", attr, f"{family.title}'s {attr} are never dropped.",
                                      f"shrink {family.main_group().attr} instead.")
            n = config[g.count_key]
            check_layers(count, n)
            kept[attr] = select_blocks(strategy, n, count, keep_blocks=(keep_blocks or {}).get(attr))
        student = dict(config, **{family.group(a).count_key: len(k) for a, k in kept.items()})
        groups = {g.attr: g for g in family.block_groups()}

        # the units in writing order: global tensors one by one, then each kept block of each group
        units: list[tuple[list[str], str, int | None]] = []
        blocks: dict[tuple[str, int], list[str]] = {}
        for key in src.keys():
            attr, index = _unit_of(family, key, src.shape(key))
            if index is None:
                units.append(([key], "", None))
            else:
                blocks.setdefault((attr, index), []).append(key)
        for g in family.block_groups():
            for index in kept.get(g.attr, range(config[g.count_key])):
                if (g.attr, index) not in blocks:
                    raise DistilleryError("source", str(source), f"has no {g.attr} block {index}.",
                                          "the file is incomplete: download or export it again.")
                units.append((blocks[(g.attr, index)], g.attr, index))

        def convert(tensors: dict, attr: str, index: int | None) -> dict:
            state = family.from_comfy(tensors)
            if index is not None:
                order = kept.get(attr)
                state = _renumber(state, groups[attr].prefix, index, order.index(index) if order else index)
            return family.to_comfy(state)

        layout = []
        for keys, attr, index in units:
            meta = convert({k: torch.empty(src.shape(k), dtype=src.dtype(k), device="meta") for k in keys}, attr,
                           index)
            layout += [(k, dtype if dtype is not None and v.is_floating_point() else v.dtype, tuple(v.shape))
                       for k, v in meta.items()]
        expected = registry.build_empty(name, student).state_dict()
        produced = family.from_comfy({k: torch.empty(s, device="meta") for k, _, s in layout})
        if {k: tuple(v.shape) for k, v in produced.items()} != {k: tuple(v.shape) for k, v in expected.items()}:
            raise DistilleryError("source", str(source), f"does not hold a complete {family.title} DiT of its "
                                  "config.", "the file is incomplete or from another model: download it again.")
        provenance = {"source": os.path.basename(str(source)), "strategy": strategy, "kept_blocks": kept,
                      "dtype": str(dtype).replace("torch.", "") if dtype is not None else "source"}
        metadata = {"format": "pt", registry.META_FAMILY: name,
                    registry.META_CONFIG: json.dumps(student, sort_keys=True),
                    registry.META_PROVENANCE: json.dumps(provenance, sort_keys=True)}
        writer = StreamingSafetensorsWriter(out, layout, metadata)
        try:
            for done, (keys, attr, index) in enumerate(units):
                if stop is not None and stop():
                    raise StopRequested("depth shrink stopped; nothing was written")
                tensors = {k: check_finite(k, src.get(k), field="source", path=source) for k in keys}
                for k, v in convert(tensors, attr, index).items():
                    writer.write(k, v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                if progress is not None:
                    progress(done + 1, len(units))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return {"path": str(out), "family": name, "config": student, "kept_blocks": kept}
