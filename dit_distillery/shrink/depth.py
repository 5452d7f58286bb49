"""A streamed depth shrink of every block group of any family, in the file's own names: one block in memory.

`shrink()` slices the families with a `WidthLayout` (stream.py); the others (FLUX.2: BFL names where q, k and v
are one fused tensor, and two droppable stacks, double- and single-stream) come here through `DepthSource`,
`plan_depth` and `write_depth`: every droppable stack gets its own count / list (`parse_groups`), one strategy
for all. It reads the source one unit at a time (one global tensor, or every tensor of one kept block, with plain
file reads: `stream.RawReader`), maps it to our names (`Family.from_comfy`), renumbers the block, maps it back to
the source's naming (`Family.to_comfy` for a ComfyUI-named file) and writes it before reading the next; dropped
blocks are never read. Kept tensors are exact copies (or casts to
`dtype`). The student carries our metadata (family, config, provenance) like every DiT file we write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import families
from ..errors import DistilleryError, StopRequested
from ..formats import StreamingSafetensorsWriter, TensorSource
from ..models import registry
from .plan import select_blocks

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


def parse_groups(value, family, field: str, count: bool) -> dict:
    """Per-block-stack values of `layers` / `keep_first` (`count`) or `keep_blocks`: None -> {}; a dict, or a
    string of `STACK=VALUE` entries ('transformer_blocks=3,single_transformer_blocks=12'; block lists
    'transformer_blocks=0-2,4; single_transformer_blocks=0-9,19': an entry without '=' continues the list before it)
    -> {stack: value}; anything else is the main stack's value (`Family.main_group`), as single-stack calls give."""
    if value is None:
        return {}
    if isinstance(value, str) and "=" in value:
        entries: dict[str, list[str]] = {}
        current = None
        for part in (p.strip() for p in value.replace(";", ",").split(",")):
            if not part:
                continue
            if "=" in part:
                current, part = (x.strip() for x in part.split("=", 1))
                if current in entries:
                    raise DistilleryError(field, value, f"block stack {current!r} is named twice.",
                                          "name each stack once.")
                entries[current] = []
            elif current is None:
                raise DistilleryError(field, value, f"{part!r} comes before any STACK= name.",
                                      "write every entry as STACK=VALUE, e.g. 'transformer_blocks=3'.")
            entries[current].append(part)
        per = {}
        for name, parts in entries.items():
            text = ",".join(parts)
            if count:
                try:
                    per[name] = int(text)
                except ValueError:
                    raise DistilleryError(field, value, f"{name}={text!r} is not a whole number.",
                                          f"write {name}=N.") from None
            else:
                per[name] = text
        value = per
    if not isinstance(value, dict):
        return {family.main_group().attr: value}
    droppable = [g.attr for g in family.block_groups() if not g.keep]
    for name in value:
        if name not in [g.attr for g in family.block_groups()]:
            raise DistilleryError(field, name, f"{family.title} has no block stack of this name.",
                                  f"name one of {droppable}.")
        if family.group(name).keep:
            raise DistilleryError(field, name, f"{family.title}'s {name} are never dropped.",
                                  f"name one of {droppable}.")
    return dict(value)


def select_groups(family, config: dict, *, layers, strategy: str, keep_blocks=None, keep_first=None) -> dict:
    """{stack: kept source indices} for every droppable stack of `family` (a stack nobody names is kept whole);
    one `strategy` (plan.select_blocks) applied to each named stack with its own count, list and first-K."""
    counts = parse_groups(layers, family, "layers", True)
    lists = parse_groups(keep_blocks, family, "keep_blocks", False)
    firsts = parse_groups(keep_first, family, "keep_first", True)
    named = set(counts) | set(lists) | set(firsts)
    kept = {}
    for g in family.block_groups():
        if g.keep:
            continue
        n = config[g.count_key]
        if g.attr not in named:
            kept[g.attr] = list(range(n))
            continue
        try:
            kept[g.attr] = select_blocks(strategy, n, counts.get(g.attr), keep_blocks=lists.get(g.attr),
                                         keep_first=firsts.get(g.attr))
        except DistilleryError as exc:
            prefix = "" if len(family.block_groups()) == 1 else f"{g.attr}: "
            raise DistilleryError(exc.field, exc.value, prefix + exc.problem, exc.fix) from None
    return kept


class DepthSource:
    """An opened, checked DiT source shrunk by depth only (a family without a `WidthLayout`): its family, config,
    whether its file uses ComfyUI's names (`Family.to_comfy`), and its tensors grouped into units (one global
    tensor, or every tensor of one block)."""

    def __init__(self, path, field: str = "source"):
        from .stream import RawReader

        self.path, self.field = Path(path), field
        self.src = TensorSource(path, field)
        try:
            self._check(field)
            self.reader = RawReader(self.src)
        except BaseException:
            self.src.close()
            raise

    def _check(self, field: str) -> None:
        from .stream import expected_shapes, file_shapes, refuse_scaled

        refuse_scaled(self.src, self.path, field)
        name, config, _ = families.detect(self.src, field)
        self.family, self.config = families.get(name), dict(config)
        have = {k: tuple(self.src.shape(k)) for k in self.src.keys()}
        ours, theirs = expected_shapes(self.config, self.family), file_shapes(self.config, self.family)
        self.comfy_names = have == theirs and set(theirs) != set(ours)
        if have != theirs and have != ours:
            want = theirs if len(set(have) & set(theirs)) > len(set(have) & set(ours)) else ours
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            wrong = [k for k in want if k in have and have[k] != want[k]]
            raise DistilleryError(field, str(self.path), f"not a complete {self.family.title} DiT (missing "
                                  f"{missing[:3]}, unexpected {extra[:3]}, wrong shapes {wrong[:3]}).",
                                  "the file is incomplete or from another model: download or export it again.")
        self.shapes = have
        self.globals: list[str] = []
        self.blocks: dict[tuple[str, int], list[str]] = {}
        for key in (theirs if self.comfy_names else ours):
            attr, index = _unit_of(self.family, key, have[key])
            if index is None:
                self.globals.append(key)
            else:
                self.blocks.setdefault((attr, index), []).append(key)

    def units(self, kept: dict) -> list[tuple[list[str], str, int | None]]:
        """(source keys, stack, source block index) in writing order: global tensors one by one, then each kept
        block of each stack (stacks not in `kept` whole)."""
        units = [([k], "", None) for k in self.globals]
        for g in self.family.block_groups():
            for index in kept.get(g.attr, range(self.config[g.count_key])):
                units.append((self.blocks[(g.attr, index)], g.attr, index))
        return units

    def convert(self, tensors: dict, attr: str, index: int | None, kept: dict, comfy_names: bool) -> dict:
        """One unit's tensors under the student's names: block `index` of `attr` renumbered to its place in
        `kept[attr]`, written in ComfyUI's names (`comfy_names`) or ours."""
        state = self.family.from_comfy(tensors)
        if index is not None and attr in kept:
            state = _renumber(state, self.family.group(attr).prefix, index, kept[attr].index(index))
        return self.family.to_comfy(state) if comfy_names else state

    def layout(self, kept: dict, dtype, comfy_names: bool) -> list[tuple[str, torch.dtype, tuple]]:
        """(name, dtype, shape) of every student tensor in writing order (dtype: `stream.output_dtype`)."""
        from .stream import output_dtype

        out = []
        for keys, attr, index in self.units(kept):
            meta = {k: torch.empty(self.shapes[k], dtype=self.src.dtype(k), device="meta") for k in keys}
            for name, t in self.convert(meta, attr, index, kept, comfy_names).items():
                out.append((name, output_dtype(name, t.ndim, t.dtype, dtype), tuple(t.shape)))
        return out

    @property
    def heads(self) -> int | None:
        return self.config.get(self.family.heads_key)

    def close(self) -> None:
        self.reader.close()
        self.src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def plan_depth(source: DepthSource, *, layers, strategy, keep_blocks, keep_first, heads, width_method):
    """The `ShrinkPlan` of a depth-only source: every check before anything is read; width and importance
    scoring (which need a `WidthLayout` and its calibration runner) refused by name."""
    from . import plan as plan_module
    from .stream import expected_shapes

    family, config = source.family, source.config
    stacks = [g.attr for g in family.block_groups() if not g.keep]
    example = ",".join(f"{g.attr}={max(1, config[g.count_key] // 2)}" for g in family.block_groups() if not g.keep)
    if strategy not in plan_module.STRATEGIES:
        raise DistilleryError("strategy", strategy, "unknown depth strategy.",
                              f"use one of {list(plan_module.STRATEGIES)}.")
    if width_method not in plan_module.WIDTH_METHODS:
        raise DistilleryError("width_method", width_method, "unknown channel-selection method.",
                              f"use one of {list(plan_module.WIDTH_METHODS)}.")
    if heads is not None and heads != source.heads:
        raise DistilleryError("heads", heads, f"Shrink DiT shrinks {family.title} by depth only: it has no width "
                              f"layout to slice heads from (the source keeps its {source.heads} heads).",
                              f"leave heads empty (or {source.heads}) and shrink by depth: layers per block stack, "
                              f"e.g. '{example}'.")
    if strategy == "importance":
        raise DistilleryError("strategy", strategy, f"block importance needs a calibration runner, which "
                              f"{family.title} does not have.", f"use one of {list(DEPTH_STRATEGIES)}.")
    kept = select_groups(family, config, layers=layers, strategy=strategy, keep_blocks=keep_blocks,
                         keep_first=keep_first)
    student = dict(config, **{family.group(a).count_key: len(k) for a, k in kept.items()})
    notes = [f"{a} kept whole ({len(k)} blocks)." for a, k in kept.items() if len(stacks) > 1
             and len(k) == config[family.group(a).count_key]]
    loadable, why = family.comfy_loadable(student)
    if not loadable:
        notes.append(why)
    count = lambda shapes: sum(_numel(s) for s in shapes)  # noqa: E731
    return plan_module.ShrinkPlan(
        source=source.path.name, source_config=config, config=student, strategy=strategy, kept_blocks=kept,
        params_before=count(source.shapes.values()),
        params_after=count(expected_shapes(student, family).values()), notes=notes, family=family.name)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_depth(source: DepthSource, plan, out: Path, dtype: torch.dtype | None, progress=None, stop=None,
                comfy_names: bool | None = None) -> int:
    """Stream the depth-only student of `plan` into `out` (atomically), one unit in memory, in the source's
    naming unless `comfy_names` says; returns the bytes written. Dropped blocks are never read."""
    from ..runlock import remove_leftovers
    from .stream import _write_error, check_free_space, convert, metadata_for

    names = source.comfy_names if comfy_names is None else comfy_names
    kept = plan.kept_blocks
    layout = source.layout(kept, dtype, names)
    produced = source.family.from_comfy({k: torch.empty(s, device="meta") for k, _, s in layout})
    expected = registry.build_empty(source.family.name, plan.config).state_dict()
    if {k: tuple(v.shape) for k, v in produced.items()} != {k: tuple(v.shape) for k, v in expected.items()}:
        raise RuntimeError(f"depth shrink of {source.path}: the student's tensors do not build its config")
    metadata = metadata_for(plan)
    remove_leftovers(out.parent, recursive=False, target=out.name)
    check_free_space(out, sum(_numel(s) * torch.empty((), dtype=d).element_size() for _, d, s in layout)
                     + (1 << 20))
    want = {name: d for name, d, _ in layout}
    units = source.units(kept)
    try:
        writer = StreamingSafetensorsWriter(out, layout, metadata)
    except OSError as exc:
        raise _write_error(out, exc) from exc
    try:
        for done, (keys, attr, index) in enumerate(units):
            if stop is not None and stop():
                raise StopRequested("depth shrink stopped before the student was complete; nothing was written")
            tensors = {k: source.reader.read(k) for k in keys}
            for name, t in source.convert(tensors, attr, index, kept, names).items():
                writer.write(name, convert(t, want[name]))
            del tensors
            if progress is not None:
                progress(done + 1, len(units), stage="write", tensor=keys[0])
        writer.close()
    except OSError as exc:
        writer.abort()
        raise _write_error(out, exc) from exc
    except BaseException:
        writer.abort()
        raise
    return writer.total_bytes


def same_depth_student(out: Path, source: DepthSource, plan, dtype) -> bool:
    """Whether `out` is the student `plan` writes: our provenance equal to the plan's and every tensor in the
    name and dtype it would be written in. An unreadable file is not."""
    try:
        with TensorSource(out, "out", prefixes=()) as existing:
            if existing.metadata_value(registry.META_PROVENANCE) != json.loads(json.dumps(plan.provenance(),
                                                                                        default=str)):
                return False
            layout = source.layout(plan.kept_blocks, dtype, source.comfy_names)
            return set(existing.keys()) == {n for n, _, _ in layout} and all(
                existing.dtype(n) == d for n, d, _ in layout)
    except DistilleryError:
        return False


def shrink_depth(source, out, *, layers: dict[str, int], strategy: str = "uniform",
                 keep_blocks: dict[str, list[int]] | None = None, dtype: torch.dtype | None = None,
                 overwrite: bool = False, progress=None, stop=None) -> dict:
    """Keep `layers[group]` blocks of each named block group (others whole) and write the student to `out` under
    the names stock ComfyUI reads (`Family.to_comfy`), whatever the source's naming.

    `strategy`: uniform | first | interval | list (`keep_blocks[group]` = the source indices to keep). Returns
    {"path", "family", "config", "kept_blocks": {group: [source indices]}} (named groups only). `shrink.shrink`
    is the public entry (source naming, reuse, report); this is the lower-level call."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DistilleryError("out", str(out), "already exists.", "choose a new name or allow overwriting.")
    if strategy not in DEPTH_STRATEGIES:
        raise DistilleryError("strategy", strategy, "a streamed depth shrink of several groups picks blocks by "
                              "position.", f"use one of {list(DEPTH_STRATEGIES)}.")
    if not isinstance(layers, dict) or not layers:
        raise DistilleryError("layers", layers, "give the blocks to keep per block group.",
                              'e.g. {"single_transformer_blocks": 10, "transformer_blocks": 3}.')
    with DepthSource(source) as src:
        plan = plan_depth(src, layers=layers, strategy=strategy, keep_blocks=keep_blocks, keep_first=None,
                          heads=None, width_method="magnitude")
        write_depth(src, plan, out, dtype, stop=stop, comfy_names=True,
                    progress=None if progress is None else (lambda done, total, **_: progress(done, total)))
    named = set(layers) | set(keep_blocks or {})
    return {"path": str(out), "family": src.family.name, "config": plan.config,
            "kept_blocks": {a: k for a, k in plan.kept_blocks.items() if a in named}}
