"""Shrink DiT: a smaller DiT made of exact slices of the source's weights, written by streaming (the families with
a `WidthLayout`, Qwen-Image, Z-Image and FLUX.2 [klein], by depth and width; FLUX.2 and the families without a
layout (AAADiT, depth only) with every droppable block stack keeping its own count: `depth.py`; the tensors it
slices are the family's, families/*.py).

Depth keeps N of the source's blocks (renumbered 0..N-1, in source order); width keeps H of the heads in every
block, which narrows the residual stream to H x head_dim and the FFNs with it. What is kept is decided in
`plan.py`, scored in `importance.py` and copied in `stream.py`. The output is one safetensors file with bare
diffusers keys (a depth-only student loads in stock ComfyUI's UNETLoader) and our metadata (student config +
provenance), so `models.registry.load_dit` rebuilds any student, width-shrunk ones included.

    report = shrink("qwen_image_bf16.safetensors", "qwen_30.safetensors", layers=30, strategy="interval")
    plan = plan_shrink("qwen_image_bf16.safetensors", layers=30, heads=16)   # preview, writes nothing
    shrink("flux-2-klein-4b.safetensors", "klein_s.safetensors", layers="transformer_blocks=3,single_transformer_blocks=12")
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .. import families
from ..errors import DistilleryError
from ..formats import TensorSource, dtype_from_name, dtype_name
from .depth import DepthSource, parse_groups, plan_depth, same_depth_student, write_depth
from .importance import Calibration, check_calibration, magnitude_scores, proxy_calibration, run_calibration
from .learnable import PROXY_LEARN_BATCH, LearnSettings, learn_from_source
from .plan import STRATEGIES, WIDTH_METHODS, ShrinkPlan, WidthPlan, check_layers, select_blocks, select_width
from .stream import SourceModel, expected_shapes, student_config, student_tensors, write_diffusers_folder, write_student

__all__ = ["shrink", "plan_shrink", "Calibration", "proxy_calibration", "ShrinkPlan", "WidthPlan", "STRATEGIES",
           "WIDTH_METHODS", "OUTPUT_DTYPES", "LearnSettings"]

OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def plan_shrink(source, *, layers=None, strategy="uniform", keep_blocks=None, keep_first=None, heads=None,
                width_method="magnitude", calibration=None, device=None, progress=None, stop=None,
                learn=None) -> ShrinkPlan:
    """Decide which blocks, heads, FFN units and channels a student keeps, without writing anything.

    Cheap for the uniform/first/interval/list strategies with no width change; width shrinking reads the kept
    blocks once (magnitude), importance runs the source block by block on calibration inputs, and learnable loads
    it whole and trains on them (`learn`: `learnable.LearnSettings` or a dict of them).
    """
    with open_source(source) as src:
        return _plan(src, layers=layers, strategy=strategy, keep_blocks=keep_blocks, keep_first=keep_first,
                     heads=heads, width_method=width_method, calibration=calibration, device=device,
                     progress=progress, stop=stop, learn=learn)


def shrink(source, out, *, layers=None, strategy="uniform", keep_blocks=None, keep_first=None, heads=None,
           width_method="magnitude", calibration=None, dtype=None, diffusers_folder=None, device=None,
           progress=None, stop=None, reuse=False, overwrite=True, out_field="out", learn=None) -> dict:
    """Write a shrunk copy of the DiT `source` to `out` (one safetensors file) and return a report.

    `layers`: blocks to keep (default all): a number for the main block stack, or per stack for a family with
    several ('transformer_blocks=3,single_transformer_blocks=12' or a dict; an unnamed stack is kept whole); `strategy`: uniform | first | interval | list | importance | learnable
    (TinyFusion's learnt selection, `learnable.py`: the source is loaded whole and trained briefly on the
    calibration inputs; `learn`: its `LearnSettings` or a dict such as {'steps': 200, 'seed': 0});
    `keep_blocks`: '0-9,50-59' for 'list' (per stack: 'transformer_blocks=0-2,4; single_transformer_blocks=0-9,19');
    `keep_first`: K for 'interval' (per stack as `layers`); a depth-only family (no `WidthLayout`: AAADiT) refuses
    `heads` and the importance strategy; every student keeps the source's naming (FLUX.2's BFL stays BFL);
    `heads`: heads per block (default all);
    `width_method`: magnitude | importance; `calibration`: a `Calibration` (None = seeded Gaussian proxy, used
    only when a strategy needs scores); `dtype`: None/'keep', 'bf16', 'fp16', 'fp32' or 'fp8' (e4m3fn weight
    matrices; from ComfyUI's scaled fp8, keep and fp8 keep its fp8 weights with their scales, wider dtypes
    dequantise them); `diffusers_folder`: also write config.json + weights there; `device`: where calibration runs;
    `progress(done, total, stage=...)`, `stop()`: as for every long job (stopping leaves nothing on disk).

    An existing `out`: with `reuse`, a student made from the same plan (same source, blocks, heads, calibration)
    in the same dtype is kept as it is (the report says `reused: True`; nothing is written); otherwise it is
    replaced when `overwrite`, else refused before anything is written. `out_field` names `out` in errors (the
    node's file name).
    """
    start = time.perf_counter()
    out = _check_out(out, source, out_field)
    target = dtype_from_name(dtype)
    if target is not None and target not in OUTPUT_DTYPES:
        raise DistilleryError("dtype", dtype, "not an output dtype Shrink DiT writes.", "use keep, bf16, fp16, fp32 or fp8.")
    if diffusers_folder is not None and Path(diffusers_folder).is_file():
        raise DistilleryError("diffusers_folder", str(diffusers_folder), "is a file, not a folder.",
                              "give a folder path (it is created if missing).")
    with open_source(source) as src:
        plan = _plan(src, layers=layers, strategy=strategy, keep_blocks=keep_blocks, keep_first=keep_first,
                     heads=heads, width_method=width_method, calibration=calibration, device=device,
                     progress=progress, stop=stop, learn=learn)
        if out.exists() and (reuse or not overwrite):
            same = same_depth_student if isinstance(src, DepthSource) else _same_student
            if reuse and same(out, src, plan, target):
                return {"out": str(out), "reused": True, **plan.summary()}
            if not overwrite:
                raise DistilleryError(out_field, str(out), "already exists and was made with other settings.",
                                      "choose another name, or turn on overwrite.")
        write = write_depth if isinstance(src, DepthSource) else write_student
        written = write(src, plan, out, target, progress=progress, stop=stop)
    if diffusers_folder is not None:
        write_diffusers_folder(out, Path(diffusers_folder), plan.config, plan.family)
    report = {"out": str(out), **plan.summary()}
    report.update(dtype=dtype_name(target) if target is not None else "keep", bytes_written=written,
                  diffusers_folder=None if diffusers_folder is None else str(diffusers_folder),
                  seconds=round(time.perf_counter() - start, 3))
    return report


def open_source(source, field: str = "source"):
    """The opened source: a `SourceModel` (depth and width) for a family with a single-stack `WidthLayout`, a
    `depth.DepthSource` (every stack its own count; width with a per-stack layout) for the others; a file no
    family reads gets `SourceModel`'s message."""
    family = None
    try:
        with TensorSource(source, field) as probe:
            family = families.get(families.detect(probe, field)[0])
    except DistilleryError:
        pass
    if family is not None and (family.width_layout is None or family.width_layout.per_stack):
        return DepthSource(source, field)
    return SourceModel(source, field)


def _one_group(value, src: SourceModel, field: str, count: bool):
    """`layers` / `keep_blocks` / `keep_first` given per block stack ('transformer_blocks=30' or a dict) for a
    family whose width layout drops one stack: that stack's value."""
    if not (isinstance(value, dict) or (isinstance(value, str) and "=" in value)):
        return value
    per = parse_groups(value, src.family, field, count)
    other = [g for g in per if g != src.layout.group]
    if other:
        raise DistilleryError(field, value, f"Shrink DiT drops only {src.family.title}'s {src.layout.group}.",
                              f"name only {src.layout.group}, or give a plain value.")
    return per.get(src.layout.group)


def _check_out(out, source, field: str = "out") -> Path:
    if out is None or str(out) == "":
        raise DistilleryError(field, out, "no output file given.", "give a path ending in .safetensors.")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise DistilleryError(field, str(out), "the student is written as one .safetensors file.",
                              "give a path ending in .safetensors.")
    if out.is_dir():
        raise DistilleryError(field, str(out), "is a folder.", "give a file path ending in .safetensors.")
    if out.exists() and Path(source).exists() and os.path.samefile(out, source):
        raise DistilleryError(field, str(out), "is the source file itself.", "write the student to a new file.")
    return out


def _same_student(out: Path, src: SourceModel, plan: ShrinkPlan, target: torch.dtype | None) -> bool:
    """Whether `out` is the student this plan writes: our provenance equal to the plan's and, unless the dtype is
    kept, every tensor in the dtype it would be written in. An unreadable file is not."""
    import json

    from ..formats import TensorSource
    from ..models.registry import META_PROVENANCE

    try:
        with TensorSource(out, "out") as existing:
            if existing.metadata_value(META_PROVENANCE) != json.loads(json.dumps(plan.provenance(), default=str)):
                return False
            if target is None:
                return True
            return all(t.name in existing and existing.dtype(t.name) == t.dtype
                       for t in student_tensors(src, plan, target))
    except DistilleryError:
        return False


def _plan(src: SourceModel, *, layers, strategy, keep_blocks, keep_first, heads, width_method, calibration,
          device, progress, stop, learn=None) -> ShrinkPlan:
    if isinstance(src, DepthSource):
        return plan_depth(src, layers=layers, strategy=strategy, keep_blocks=keep_blocks, keep_first=keep_first,
                          heads=heads, width_method=width_method, calibration=calibration, device=device,
                          progress=progress, stop=stop, learn=learn)
    layers = _one_group(layers, src, "layers", True)
    keep_blocks = _one_group(keep_blocks, src, "keep_blocks", False)
    keep_first = _one_group(keep_first, src, "keep_first", True)
    config = src.config
    n = src.num_blocks
    # every cheap check first, so bad input fails before any (possibly long) calibration or scoring
    if strategy not in STRATEGIES:
        raise DistilleryError("strategy", strategy, "unknown depth strategy.", f"use one of {list(STRATEGIES)}.")
    if width_method not in WIDTH_METHODS:
        raise DistilleryError("width_method", width_method, "unknown channel-selection method.",
                              f"use one of {list(WIDTH_METHODS)}.")
    source_heads = src.heads
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= source_heads):
        raise DistilleryError("heads", heads, f"the source has {source_heads} heads per block; a student keeps "
                              f"1..{source_heads} (head dim {src.head_dim} is kept).",
                              f"choose a whole number between 1 and {source_heads}.")
    width_shrink = heads is not None and heads < source_heads
    if width_shrink and heads * src.head_dim < src.layout.min_width:
        raise DistilleryError("heads", heads, f"{src.family.title} students are at least {src.layout.min_width} wide "
                              f"({heads} x {src.head_dim} = {heads * src.head_dim}).",
                              f"keep at least {-(-src.layout.min_width // src.head_dim)} heads.")
    if width_shrink and not src.layout.slices_width:
        raise DistilleryError("heads", heads, f"Shrink DiT keeps {src.family.title}'s width ({source_heads} heads): "
                              f"{src.layout.why_not_width}", f"leave heads at {source_heads} (or empty) and shrink "
                              "by depth (layers).")
    if strategy in ("importance", "learnable"):
        if layers is None:
            raise DistilleryError("layers", None, f"the {strategy} strategy needs the number of blocks to keep.",
                                  f"give layers between 1 and {n}.")
        check_layers(layers, n)
    settings = LearnSettings.of(learn) if strategy == "learnable" else None
    select_blocks(strategy, n, layers, keep_blocks=keep_blocks, keep_first=keep_first, scores=[0.0] * n,
                  family=src.family, learned=list(range(layers - 1)) + [n - 1] if settings else None)
    scored = strategy == "importance" or (width_shrink and width_method == "importance")
    stats = cal = learned = None
    if scored or settings:
        given = calibration if calibration is not None else proxy_calibration(
            config, batch=PROXY_LEARN_BATCH if settings else 2, family=src.family)
        cal = check_calibration(given, config, family=src.family)
    if settings:
        learned = learn_from_source(src.path, src.family, config, {src.layout.group: layers}, cal, settings,
                                    device=device, progress=progress, stop=stop)
    if scored:
        stats = run_calibration(src, cal, device=device, progress=progress, stop=stop)
    kept = select_blocks(strategy, n, layers, keep_blocks=keep_blocks, keep_first=keep_first,
                         scores=stats.block_scores if stats else None, family=src.family,
                         learned=learned.kept[src.layout.group] if learned else None)
    width = None
    if width_shrink:
        scores = (stats.width_scores(kept) if width_method == "importance"
                  else magnitude_scores(src, kept, progress=progress, stop=stop))
        width = select_width(scores, heads, src.head_dim, width_method, src.layout.ffn_units)
    student = student_config(src, len(kept), heads if width_shrink else None)
    notes = []
    loadable, why = src.family.comfy_loadable(student)
    if width_shrink and not loadable:
        notes.append(why)
    if src.layout.last_block_untrained:
        notes.append(f"source block {n - 1} (its text branch was never trained) is kept as the student's last block.")
    if cal is not None and cal.kind == "proxy":
        notes.append("scores came from a seeded Gaussian PROXY of latents and prompts; pass a Calibration of real "
                     "encoded prompts for scores that reflect real images.")
    if learned:
        notes.append(learned.note())
    block_scores = learned.keep_probability[src.layout.group] if learned else stats.block_scores if stats else None
    return ShrinkPlan(
        source=Path(src.path).name, source_config=config, config=student, strategy=strategy, kept_blocks=kept,
        width=width, block_scores=block_scores, calibration=cal.kind if cal else None,
        params_before=_count(src.shapes.values()), params_after=_count(expected_shapes(student, src.family).values()),
        notes=notes, family=src.family.name,
    )


def _count(shapes) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
