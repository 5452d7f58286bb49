"""A streamed shrink of every block stack of a family, each by its own count, in the file's own names: one block
in memory.

`shrink()` slices the families with a single-stack `WidthLayout` in stream.py; the others come here through
`DepthSource`, `plan_depth` and `write_depth`: every droppable stack gets its own count / list (`parse_groups`),
one strategy for all. A family with a per-stack `WidthLayout` (FLUX.2: BFL names where q, k and v are one fused
tensor, and two droppable stacks, double- and single-stream) is also narrowed here: heads per block (the residual
stream and FFNs with them), chosen by weight magnitude or, with its calibration runner, by activations, and block
influence for the importance strategy; a family without one (AAADiT) is shrunk by depth only. It reads the source
one unit at a time (one global tensor, or every tensor of one kept block, with plain file reads:
`stream.RawReader`), maps it to our names (`Family.from_comfy`), renumbers the block, slices the kept rows and
columns (the layout's tables are in our names, so a fused BFL qkv is sliced as its q, k and v), maps it back to
the source's naming (`Family.to_comfy` for a ComfyUI-named file) and writes it before reading the next; dropped
blocks are never read. Kept tensors are exact slices (or casts to `dtype`); a scaled fp8 source's scales go with
their weights, or the weights are dequantised for a wider `dtype` (`stream.Quantisation`). The student carries our
metadata (family, config, provenance) like every DiT file we write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import families
from ..errors import DistilleryError, StopRequested
from ..formats import StreamingSafetensorsWriter, TensorSource
from ..models import registry
from .plan import select_blocks, select_width

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


def select_groups(family, config: dict, *, layers, strategy: str, keep_blocks=None, keep_first=None,
                  scores: dict | None = None, learned: dict | None = None) -> dict:
    """{stack: kept source indices} for every droppable stack of `family` (a stack nobody names is kept whole);
    one `strategy` (plan.select_blocks) applied to each named stack with its own count, list and first-K (and
    block scores, `scores[stack]`, for 'importance'; the learnt blocks, `learned[stack]`, for 'learnable')."""
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
                                         keep_first=firsts.get(g.attr),
                                         scores=None if scores is None else scores[g.attr], family=family,
                                         learned=None if learned is None else learned.get(g.attr))
        except DistilleryError as exc:
            prefix = "" if len(family.block_groups()) == 1 else f"{g.attr}: "
            raise DistilleryError(exc.field, exc.value, prefix + exc.problem, exc.fix) from None
    return kept


class DepthSource:
    """An opened, checked DiT source whose block stacks are shrunk each by its own count (a family without a
    `WidthLayout`, or with a per-stack one): its family, config, whether its file uses ComfyUI's names
    (`Family.to_comfy`), and its tensors grouped into units (one global tensor, or every tensor of one block)."""

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
        from .stream import Quantisation, expected_shapes, file_shapes

        self.quant = Quantisation(self.src, field)  # a scaled fp8 file's scales and markers go with their weights
        name, config, _ = families.detect(self.src, field)
        self.family, self.config = families.get(name), dict(config)
        have = {k: tuple(self.src.shape(k)) for k in self.quant.keys}
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

    @property
    def width_layout(self):
        """The family's per-stack `WidthLayout`, or None (shrunk by depth only)."""
        layout = self.family.width_layout
        return layout if layout is not None and layout.per_stack else None

    def slots(self, kept: dict) -> list[tuple[str, int]]:
        """(stack, source index) of every block of the student in writing order: a width plan's block slots."""
        return [(attr, index) for _, attr, index in self.units(kept) if index is not None]

    def read_state(self, keys) -> dict:
        """Source tensors `keys` (file names: all of a unit) under our names, in fresh buffers, as the model
        computes with them (a scaled fp8 weight times its scale, in fp32): what scoring and calibration read."""
        return self.family.from_comfy({k: self.quant.value(k, self.reader.read(k)) for k in keys})

    def global_state(self) -> dict:
        """Every tensor outside the blocks, under our names (a calibration runner's stem)."""
        return self.read_state(self.globals)

    def block_state(self, attr: str, index: int) -> dict:
        """Block `index` of stack `attr` under our names, relative to the block (`attn.to_q.weight`)."""
        head = f"{self.family.group(attr).prefix}{index}."
        return {k[len(head):]: v for k, v in self.read_state(self.blocks[(attr, index)]).items()}

    def units(self, kept: dict) -> list[tuple[list[str], str, int | None]]:
        """(source keys, stack, source block index) in writing order: global tensors one by one, then each kept
        block of each stack (stacks not in `kept` whole)."""
        units = [([k], "", None) for k in self.globals]
        for g in self.family.block_groups():
            for index in kept.get(g.attr, range(self.config[g.count_key])):
                units.append((self.blocks[(g.attr, index)], g.attr, index))
        return units

    def convert(self, tensors: dict, attr: str, index: int | None, kept: dict, comfy_names: bool,
                width=None) -> dict:
        """One unit's tensors under the student's names: block `index` of `attr` renumbered to its place in
        `kept[attr]`, its kept rows and columns when a width plan (`plan.WidthPlan`) is given, written in ComfyUI's
        names (`comfy_names`) or ours. Meta tensors give the student's shapes."""
        state = self.family.from_comfy(tensors)
        if index is not None and attr in kept:
            state = _renumber(state, self.family.group(attr).prefix, index, kept[attr].index(index))
        if width is not None:
            state = self._slice(state, attr, index, kept, width)
        return self.family.to_comfy(state) if comfy_names else state

    def spaces(self, attr: str, name: str, ndim: int) -> tuple[str | None, str | None]:
        """(row space, column space) of one of our tensor names (`attr` "": outside the blocks)."""
        layout = self.width_layout
        if attr:
            name = name[len(self.family.group(attr).prefix):].split(".", 1)[1]
        rows, cols = (layout.stack_spaces(attr) if attr else layout.global_spaces)[name.rsplit(".", 1)[0]]
        return (rows, cols) if ndim == 2 else (rows, None) if ndim == 1 else (None, None)

    def _slice(self, state: dict, attr: str, index: int | None, kept: dict, width) -> dict:
        from .stream import _index, slice_tensor

        dim = self.heads * self.head_dim
        units = self.width_layout.units(self.config, dim)
        slot = None if index is None else self.slots(kept).index((attr, index))
        out = {}
        for name, t in state.items():
            rows, cols = (_index(space, width, slot, dim, units) for space in self.spaces(attr, name, t.ndim))
            if t.is_meta:
                shape = [len(ix) if ix is not None else n for ix, n in zip((rows, cols), t.shape)] + list(t.shape[2:])
                out[name] = torch.empty(shape, dtype=t.dtype, device="meta")
            else:
                out[name] = slice_tensor(t, rows, cols)
        return out

    def layout(self, kept: dict, dtype, comfy_names: bool, width=None) -> list[tuple[str, torch.dtype, tuple]]:
        """(name, dtype, shape) of every student tensor in writing order (dtype: `stream.output_dtype`)."""
        out = [(k, t.dtype, tuple(t.shape)) for k, t in self.student_head(dtype, meta=True).items()]
        for keys, attr, index in self.units(kept):
            unit = self.student_unit(keys, attr, index, kept, dtype, comfy_names, width, meta=True)
            out += [(name, t.dtype, tuple(t.shape)) for name, t in unit.items()]
        return out

    def _read(self, key: str, meta: bool) -> torch.Tensor:
        if meta:
            return torch.empty(self.src.shape(key), dtype=self.src.dtype(key), device="meta")
        return self.reader.read(key)

    def student_head(self, dtype, meta: bool = False) -> dict:
        """What the student starts with: a scaled fp8 source's `scaled_fp8` marker when it keeps fp8."""
        marker = self.quant.marker
        return {marker: self._read(marker, meta)} if marker and self.quant.keeps(dtype) else {}

    def student_unit(self, keys, attr: str, index: int | None, kept: dict, dtype, comfy_names: bool, width=None,
                     meta: bool = False) -> dict:
        """One unit of the student, {name: tensor} in its output dtype (`meta`: nothing read). From a scaled fp8
        source (`stream.Quantisation`), a student that keeps fp8 gets every kept weight's exact slice followed by
        its scale (unchanged; a per-row one sliced with the weight's rows), input scale and `comfy_quant` entry;
        a wider student gets the weights dequantised in fp32 (weight x scale), then cast."""
        from .stream import convert, output_dtype

        quant = self.quant
        keep = quant.keeps(dtype)
        if keep and quant.scales and comfy_names != self.comfy_names:
            raise DistilleryError(self.field, str(self.path), "a scaled fp8 file whose student would be renamed "
                                  f"({'to' if comfy_names else 'from'} ComfyUI's names): fused and split weights "
                                  "cannot keep their per-tensor scales.", "keep the source's naming (shrink.shrink "
                                  "does), or write the student in bf16 (dtype bf16).")
        target = quant.target(dtype)
        tensors = {k: (lambda t: t if keep else quant.value(k, t))(self._read(k, meta)) for k in keys}
        state = self.convert(tensors, attr, index, kept, comfy_names, width)
        out = {name: convert(t, output_dtype(name, t.ndim, t.dtype, target)) for name, t in state.items()}
        if not keep:
            return out
        for key in keys:
            companions = quant.companions(key)
            if not companions:
                continue
            scale = quant.scales.get(key)
            per_row = scale is not None and scale.numel() > 1
            rows = self.src.shape(key)[0]
            # the weight's student name, and its per-row scale's kept rows: a column moved as the weight's rows are
            column = self._read(companions[0], meta).reshape(-1) if per_row else torch.empty(rows, device="meta")
            ((name, moved),) = self.convert({key: column}, attr, index, kept, comfy_names, width).items()
            for companion in companions:
                value = self._read(companion, meta)
                if per_row and quant.per_row(companion):
                    value = moved.reshape(-1, *self.src.shape(companion)[1:])
                out[quant.renamed(companion, key, name)] = value
        return out

    def student_pairs(self, kept: dict, comfy_names: bool, width=None) -> list[tuple[str, str]]:
        """(student weight, source weight) of every kept weight the `_quantization_metadata` header names: the
        pairs `Quantisation.metadata` renames its layers by."""
        pairs = []
        for keys, attr, index in self.units(kept):
            for key in keys:
                if key.endswith(".weight") and key[: -len(".weight")] in self.quant.layers:
                    column = torch.empty(self.src.shape(key)[0], device="meta")
                    ((name, _),) = self.convert({key: column}, attr, index, kept, comfy_names, width).items()
                    pairs.append((name, key))
        return pairs

    @property
    def heads(self) -> int | None:
        return self.config.get(self.family.heads_key)

    @property
    def head_dim(self) -> int:
        return self.width_layout.head_dim(self.config)

    def close(self) -> None:
        self.reader.close()
        self.src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def plan_depth(source: DepthSource, *, layers, strategy, keep_blocks, keep_first, heads, width_method,
               calibration=None, device=None, progress=None, stop=None, learn=None):
    """The `ShrinkPlan` of a `DepthSource`: every cheap check before anything is read. Width (`heads`) needs the
    family's per-stack `WidthLayout`, and block or activation importance its calibration runner; a family without
    them is refused by name."""
    from . import plan as plan_module
    from .importance import check_calibration, proxy_calibration
    from .stream import expected_shapes

    family, config, layout = source.family, source.config, source.width_layout
    stacks = [g.attr for g in family.block_groups() if not g.keep]
    example = ",".join(f"{g.attr}={max(1, config[g.count_key] // 2)}" for g in family.block_groups() if not g.keep)
    if strategy not in plan_module.STRATEGIES:
        raise DistilleryError("strategy", strategy, "unknown depth strategy.",
                              f"use one of {list(plan_module.STRATEGIES)}.")
    if width_method not in plan_module.WIDTH_METHODS:
        raise DistilleryError("width_method", width_method, "unknown channel-selection method.",
                              f"use one of {list(plan_module.WIDTH_METHODS)}.")
    source_heads = source.heads
    if layout is None and heads is not None and heads != source_heads:
        raise DistilleryError("heads", heads, f"Shrink DiT shrinks {family.title} by depth only: it has no width "
                              f"layout to slice heads from (the source keeps its {source_heads} heads).",
                              f"leave heads empty (or {source_heads}) and shrink by depth: layers per block stack, "
                              f"e.g. '{example}'.")
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= source_heads):
        raise DistilleryError("heads", heads, f"the source has {source_heads} heads per block; a student keeps "
                              f"1..{source_heads} (head dim {source.head_dim} is kept).",
                              f"choose a whole number between 1 and {source_heads}.")
    width_shrink = layout is not None and heads is not None and heads < source_heads
    if width_shrink and heads * source.head_dim < layout.min_width:
        raise DistilleryError("heads", heads, f"{family.title} students are at least {layout.min_width} wide "
                              f"({heads} x {source.head_dim} = {heads * source.head_dim}).",
                              f"keep at least {-(-layout.min_width // source.head_dim)} heads.")
    runner = None if layout is None else layout.calibrate
    if strategy == "importance" and runner is None:
        raise DistilleryError("strategy", strategy, f"block importance needs a calibration runner, which "
                              f"{family.title} does not have.", f"use one of {list(DEPTH_STRATEGIES)}.")
    if width_shrink and width_method == "importance" and runner is None:
        raise DistilleryError("width_method", width_method, f"activation importance needs a calibration runner, "
                              f"which {family.title} does not have.", "use width_method magnitude.")
    needs_calibration = strategy == "importance" or (width_shrink and width_method == "importance")
    settings = None
    if strategy == "learnable":  # the model's own forward on the whole source: no runner needed
        from .learnable import LearnSettings

        settings = LearnSettings.of(learn)
    unsupported = [k for k in (layout.unsupported if layout else ()) if config.get(k)]
    if unsupported and (width_shrink or needs_calibration):
        raise DistilleryError("source", str(source.path), f"a {family.title} variant with {unsupported}, which "
                              "Shrink DiT slices and scores by depth only.", f"use a text-to-image {family.title} "
                              "DiT, or shrink this one by depth (no heads, no importance).")
    counts = parse_groups(layers, family, "layers", True)
    if strategy in ("importance", "learnable") and not counts:
        raise DistilleryError("layers", layers, f"the {strategy} strategy needs the number of blocks to keep.",
                              f"give layers per block stack, e.g. '{example}'.")
    zeros = {g.attr: [0.0] * config[g.count_key] for g in family.block_groups()}
    placeholder = None if settings is None else {  # any valid choice of each named stack's count: checks only
        a: list(range(k - 1)) + [config[family.group(a).count_key] - 1] for a, k in counts.items()
        if isinstance(k, int) and 1 <= k <= config[family.group(a).count_key]}
    select_groups(family, config, layers=layers, strategy=strategy, keep_blocks=keep_blocks, keep_first=keep_first,
                  scores=zeros, learned=placeholder)  # bad counts and lists fail here, before any calibration
    stats = cal = learned = None
    if needs_calibration or settings:
        from .learnable import PROXY_LEARN_BATCH

        given = calibration if calibration is not None else proxy_calibration(
            config, batch=PROXY_LEARN_BATCH if settings else 2, family=family)
        cal = check_calibration(given, config, family=family)
    if settings:
        from .learnable import learn_from_source

        learned = learn_from_source(source.path, family, config, counts, cal, settings, device=device,
                                    progress=progress, stop=stop, field=source.field)
    if needs_calibration:
        stats = runner(source, cal, device=device, progress=progress, stop=stop)
    kept = select_groups(family, config, layers=layers, strategy=strategy, keep_blocks=keep_blocks,
                         keep_first=keep_first, scores=stats.block_scores if stats else None,
                         learned=learned.kept if learned else None)
    student = dict(config, **{family.group(a).count_key: len(k) for a, k in kept.items()})
    width = None
    if width_shrink:
        units = lambda w: layout.units(config, w)  # noqa: E731
        dim = source_heads * source.head_dim
        scores = (stats.width_scores(source.slots(kept), layout.ffn_spaces, units(dim))
                  if width_method == "importance" else magnitude_scores(source, kept, progress=progress, stop=stop))
        width = select_width(scores, heads, source.head_dim, width_method, units)
        student = layout.with_heads(student, heads)
    notes = [f"{a} kept whole ({len(k)} blocks)." for a, k in kept.items() if len(stacks) > 1
             and len(k) == config[family.group(a).count_key]]
    loadable, why = family.comfy_loadable(student)
    if not loadable:
        notes.append(why)
    if cal is not None and cal.kind == "proxy":
        notes.append("scores came from a seeded Gaussian PROXY of latents and prompts; pass a Calibration of real "
                     "encoded prompts for scores that reflect real images.")
    if learned:
        notes.append(learned.note())
    block_scores = learned.keep_probability if learned else stats.block_scores if stats else None
    count = lambda shapes: sum(_numel(s) for s in shapes)  # noqa: E731
    return plan_module.ShrinkPlan(
        source=source.path.name, source_config=config, config=student, strategy=strategy, kept_blocks=kept,
        width=width, block_scores=block_scores, calibration=cal.kind if cal else None,
        params_before=count(source.shapes.values()),
        params_after=count(expected_shapes(student, family).values()), notes=notes, family=family.name)


def magnitude_scores(source: DepthSource, kept: dict, progress=None, stop=None):
    """Weight-mass scores (`importance.MassScores`) of every index space, reading the non-block tensors and the
    kept blocks once, one unit at a time, under our names; norms do not vote."""
    from .importance import MassScores

    layout = source.width_layout
    dim = source.heads * source.head_dim
    slots = source.slots(kept)
    mass = MassScores(source.heads, source.head_dim, layout.units(source.config, dim), layout.ffn_spaces, len(slots))
    units = source.units(kept)
    for done, (keys, attr, index) in enumerate(units):
        if stop is not None and stop():
            raise StopRequested("scoring stopped")
        slot = None if index is None else slots.index((attr, index))
        # the source's last block of the layout's main stack: its untrained modules do not vote
        last = attr == layout.group and index == source.config[source.family.group(attr).count_key] - 1
        for name, t in source.read_state(keys).items():
            rows, cols = source.spaces(attr, name, t.ndim)
            if (rows, cols) == (None, None):
                continue
            module = name.split(".", 2)[-1].rsplit(".", 1)[0]
            mass.add(slot, t, rows, cols, untrained=last and module in layout.last_block_untrained)
        if progress is not None:
            progress(done + 1, len(units), stage="score", tensor=keys[0])
    return mass.scores()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_depth(source: DepthSource, plan, out: Path, dtype: torch.dtype | None, progress=None, stop=None,
                comfy_names: bool | None = None) -> int:
    """Stream the student of `plan` (depth, and width when it has a width plan) into `out` (atomically), one unit
    in memory, in the source's naming unless `comfy_names` says; returns the bytes written. Dropped blocks are
    never read."""
    from ..runlock import remove_leftovers
    from ..fp8 import is_quant_key
    from .stream import _write_error, check_free_space, metadata_for

    names = source.comfy_names if comfy_names is None else comfy_names
    kept, width = plan.kept_blocks, plan.width
    layout = source.layout(kept, dtype, names, width)
    produced = source.family.from_comfy({k: torch.empty(s, device="meta") for k, _, s in layout
                                         if not is_quant_key(k)})
    expected = registry.build_empty(source.family.name, plan.config).state_dict()
    if {k: tuple(v.shape) for k, v in produced.items()} != {k: tuple(v.shape) for k, v in expected.items()}:
        raise RuntimeError(f"depth shrink of {source.path}: the student's tensors do not build its config")
    metadata = metadata_for(plan)
    if source.quant.keeps(dtype):
        metadata.update(source.quant.metadata(source.student_pairs(kept, names, width)))
    remove_leftovers(out.parent, recursive=False, target=out.name)
    check_free_space(out, sum(_numel(s) * torch.empty((), dtype=d).element_size() for _, d, s in layout)
                     + (1 << 20))
    units = source.units(kept)
    try:
        writer = StreamingSafetensorsWriter(out, layout, metadata)
    except OSError as exc:
        raise _write_error(out, exc) from exc
    try:
        for name, t in source.student_head(dtype).items():
            writer.write(name, t)
        for done, (keys, attr, index) in enumerate(units):
            if stop is not None and stop():
                raise StopRequested("depth shrink stopped before the student was complete; nothing was written")
            for name, t in source.student_unit(keys, attr, index, kept, dtype, names, width).items():
                writer.write(name, t)
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
            layout = source.layout(plan.kept_blocks, dtype, source.comfy_names, plan.width)
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
