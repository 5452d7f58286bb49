"""What a shrunk DiT keeps: which source blocks (depth) and which heads, FFN units and channels (width).

Pure decisions on block counts and score vectors; no file I/O, so the ComfyUI node can preview a plan cheaply.

Depth strategies (the source's last block is always kept, as the student's last block: DiffSynth's QA notes that
its text branch never affected the output and so was never trained; anywhere but last it would feed untrained
text states forward):
* `uniform`: N evenly spaced blocks, first and last included.
* `first`: the first N-1 blocks, then the last.
* `interval`: the first K and the last N-K blocks, dropping ONE contiguous middle span. OPPO's Qwen-Image-Pruning
  found contiguous removal beats scattered removal, and Flux-Lite/BK-SDM that early blocks matter most. Default
  K = round(N/3) (at least 1 when N >= 2): the early blocks, where removal hurts most, are kept as a group, and
  the late blocks that turn features into the velocity are kept as a larger group.
* `list`: explicit indices and ranges ("0-9,50-59"), which must include the last block.
* `importance`: ShortGPT's block influence, 1 - cos(block input, block output) over image tokens on calibration
  inputs (see `importance.py`); the N-1 most influential of the other blocks are kept.
* `learnable`: TinyFusion's learnt selection (see `learnable.py`): per local group of blocks, a mask distribution
  trained with a shared LoRA on calibration inputs, so the kept set is the one a short fine-tune recovers best.

Width: the student keeps H of the source's heads in every block (head dim and RoPE axes unchanged), so its
residual stream is H x head_dim wide and its FFNs as wide as the family's layout says for that width (Qwen-Image
4x, diffusers' FeedForward default; Z-Image 8/3x; FLUX.2 its `mlp_ratio`, kept). Every index
set is chosen by `top_k` on a score vector (see `importance.py` for the two ways scores are made) and kept in
source order, so every student weight is an exact slice of the source's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DistilleryError

STRATEGIES = ("uniform", "first", "interval", "list", "importance", "learnable")
WIDTH_METHODS = ("magnitude", "importance")


def why_last(family=None) -> str:
    """Why the source's last block must stay, in the terms of `family` (a `families.Family`; None: any DiT)."""
    if family is None:
        return "Shrink DiT always keeps it as the student's last block"
    layout = family.width_layout
    if layout is not None and layout.last_block_untrained:
        return (f"{family.title}'s last block has a text branch that was never trained, so it is always kept as "
                "the student's last block")
    return f"Shrink DiT always keeps the last block of each {family.title} block stack as the student's last block"


def parse_block_list(spec, num_source: int, field: str = "keep_blocks", family=None) -> list[int]:
    """'0-9,50-59' (or a list of ints) -> sorted source indices; rejects out-of-range and duplicate entries
    (`family` names the model in the last-block message)."""
    if isinstance(spec, str):
        indices = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    lo, hi = int(lo), int(hi)
                    if hi < lo:
                        raise ValueError
                    indices.extend(range(lo, hi + 1))
                else:
                    indices.append(int(part))
            except ValueError:
                raise DistilleryError(field, spec, f"cannot read {part!r} as a block index or range.",
                                      "write indices and ranges like '0-9,50-59'.") from None
    else:
        try:
            indices = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise DistilleryError(field, spec, "not a list of block indices.",
                                  "give integers or a string like '0-9,50-59'.") from None
    if not indices:
        raise DistilleryError(field, spec, "no blocks listed.", "list at least the blocks to keep, e.g. '0-9,50-59'.")
    bad = [i for i in indices if not 0 <= i < num_source]
    if bad:
        raise DistilleryError(field, spec, f"block(s) {bad[:5]} out of range: the source has blocks 0..{num_source - 1}.",
                              f"use indices between 0 and {num_source - 1}.")
    dup = sorted({i for i in indices if indices.count(i) > 1})
    if dup:
        raise DistilleryError(field, spec, f"block(s) {dup[:5]} listed more than once.", "list each block once.")
    if num_source - 1 not in indices:
        raise DistilleryError(field, spec, f"the source's last block ({num_source - 1}) is missing: "
                              f"{why_last(family)}.", f"add {num_source - 1} to the list.")
    return sorted(indices)


def default_keep_first(layers: int) -> int:
    """The `interval` strategy's default K: about a third of the kept blocks, at least 1 (see module docstring)."""
    if layers < 2:
        return 0
    return min(layers - 1, max(1, round(layers / 3)))


def check_layers(layers, num_source: int) -> int:
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise DistilleryError("layers", layers, "must be a whole number of blocks.", f"use 1..{num_source}.")
    if not 1 <= layers <= num_source:
        raise DistilleryError("layers", layers, f"the source has {num_source} blocks; a student keeps 1..{num_source}.",
                              f"choose a number between 1 and {num_source}.")
    return layers


def select_blocks(strategy: str, num_source: int, layers: int | None, *, keep_blocks=None, keep_first=None,
                  scores=None, family=None, learned=None) -> list[int]:
    """Source indices of the kept blocks, ascending (student block i = source block result[i]); `family` (a
    `families.Family`) names the model in messages; `learned`: the blocks `learnable.learn_blocks` chose, for
    strategy 'learnable' (checked: `layers` of them, the last included)."""
    if strategy not in STRATEGIES:
        raise DistilleryError("strategy", strategy, "unknown depth strategy.", f"use one of {list(STRATEGIES)}.")
    if keep_blocks is not None and strategy != "list":
        raise DistilleryError("keep_blocks", keep_blocks, f"an explicit block list needs strategy 'list', not {strategy!r}.",
                              "set strategy='list' (the CLI does so when --keep-blocks is given).")
    if keep_first is not None and strategy != "interval":
        raise DistilleryError("keep_first", keep_first, f"only the 'interval' strategy uses it, not {strategy!r}.",
                              "set strategy='interval' or drop keep_first.")
    if strategy == "list":
        if keep_blocks is None:
            raise DistilleryError("keep_blocks", None, "strategy 'list' needs the blocks to keep.",
                                  "give keep_blocks like '0-9,50-59'.")
        kept = parse_block_list(keep_blocks, num_source, family=family)
        if layers is not None and check_layers(layers, num_source) != len(kept):
            raise DistilleryError("layers", layers, f"the block list keeps {len(kept)} blocks, not {layers}.",
                                  "drop layers or make it match the list.")
        return kept
    if strategy == "learnable":
        if layers is None:
            raise DistilleryError("layers", None, "the learnable strategy needs the number of blocks to keep.",
                                  f"give layers between 1 and {num_source}.")
        check_layers(layers, num_source)
        if learned is None:
            raise ValueError("learnable selection needs the learnt blocks (shrink.learnable.learn_blocks)")
        kept = sorted(int(i) for i in learned)
        if len(kept) != layers or len(set(kept)) != layers or kept[-1] != num_source - 1 or kept[0] < 0:
            raise ValueError(f"learnt blocks {kept} are not {layers} distinct blocks ending with {num_source - 1}")
        return kept
    layers = num_source if layers is None else check_layers(layers, num_source)
    last = num_source - 1
    if layers == 1:
        return [last]
    if strategy == "uniform":
        # round half up (not Python's half-to-even); the step is >= 1, so the indices are distinct
        return [int(i * last / (layers - 1) + 0.5) for i in range(layers)]
    if strategy == "first":
        return list(range(layers - 1)) + [last]
    if strategy == "interval":
        k = default_keep_first(layers) if keep_first is None else keep_first
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= layers - 1:
            raise DistilleryError("keep_first", keep_first, f"must be 0..{layers - 1}: the last block always stays, "
                                  f"so at most {layers - 1} of the {layers} kept blocks can come first.",
                                  f"choose keep_first between 0 and {layers - 1}.")
        m = layers - k
        return list(range(k)) + list(range(num_source - m, num_source))
    # importance: the N-1 most influential blocks among all but the last, plus the last
    if scores is None or len(scores) != num_source:
        raise ValueError("importance selection needs one score per source block")
    others = top_k(torch.as_tensor(list(scores[:last]), dtype=torch.float64), layers - 1)
    return others + [last]


def space_parts(space: str) -> list[tuple[str, int]]:
    """'heads*3+mlp*2' -> [('heads', 3), ('mlp', 2)]: the parts of an index space laid end to end, each `chunks`
    stacked copies of one space (FLUX.2's fused q | k | v | SwiGLU gate | up rows); 'res' -> [('res', 1)]."""
    parts = []
    for part in space.split("+"):
        name, _, chunks = part.partition("*")
        parts.append((name, int(chunks) if chunks else 1))
    return parts


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order; ties keep the lower index (deterministic)."""
    order = torch.argsort(scores.to(torch.float64), descending=True, stable=True)[:k]
    return sorted(int(i) for i in order)


@dataclass
class WidthScores:
    """Importance of every prunable index, one vector per index space (higher = keep)."""

    channels: torch.Tensor  # [D] residual-stream channels
    temb: torch.Tensor  # [D] timestep-embedding channels (the modulation layers' input)
    temb_hidden: torch.Tensor  # [D] hidden units of the timestep MLP
    heads: list[torch.Tensor]  # per kept block, [H]
    units: dict[str, list[torch.Tensor]]  # FFN unit space (the layout's `ffn_spaces`) -> per kept block, [units]


@dataclass
class WidthPlan:
    """Kept index sets. The residual stream has ONE channel subset for the whole model; the timestep embedding
    (read only by the modulation layers and norm_out, never added to the residual stream) and the timestep MLP's
    hidden layer each get their own subset, chosen on their own scores."""

    heads: int
    head_dim: int
    method: str
    channels: list[int]
    temb: list[int]
    temb_hidden: list[int]
    block_heads: list[list[int]]
    units: dict[str, list[list[int]]]  # FFN unit space -> per kept block, the kept units

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def img_units(self) -> list[list[int]]:  # Qwen-Image's spaces, by their old names
        return self.units["img_ffn"]

    @property
    def txt_units(self) -> list[list[int]]:
        return self.units["txt_ffn"]


def select_width(scores: WidthScores, heads: int, head_dim: int, method: str, ffn_units=None) -> WidthPlan:
    """Kept index sets for `heads` heads; `ffn_units(width)`: FFN units kept per unit space (the family layout's;
    default 4x the width, Qwen-Image's)."""
    from ..families.base import four_times

    width = heads * head_dim
    units = (ffn_units or four_times)(width)
    return WidthPlan(
        heads=heads, head_dim=head_dim, method=method,
        channels=top_k(scores.channels, width), temb=top_k(scores.temb, width),
        temb_hidden=top_k(scores.temb_hidden, width),
        block_heads=[top_k(s, heads) for s in scores.heads],
        units={space: [top_k(s, units) for s in per_block] for space, per_block in scores.units.items()},
    )


@dataclass
class ShrinkPlan:
    """Everything needed to write the student, and what its provenance records."""

    source: str
    source_config: dict
    config: dict
    strategy: str
    kept_blocks: list[int] | dict[str, list[int]]  # per block stack for a `depth.DepthSource`
    width: WidthPlan | None = None
    block_scores: list[float] | dict[str, list[float]] | None = None  # per stack as kept_blocks
    calibration: str | None = None  # "proxy", "provided" or None when no calibration ran
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)
    family: str = ""  # the DiT family (`families`); not part of the provenance, which the source already fixes

    def provenance(self) -> dict:
        w = self.width
        return {
            "tool": "dit_distillery.shrink",
            "source": self.source,
            "source_config": self.source_config,
            "strategy": self.strategy,
            "kept_blocks": self.kept_blocks,
            "kept_heads": w.block_heads if w else None,
            "kept_channels": w.channels if w else None,
            "kept_temb_channels": w.temb if w else None,
            "channel_selection": w.method if w else None,
            "block_scores": self.block_scores,
            "calibration": self.calibration,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }

    def summary(self) -> dict:
        """A readable report (no per-unit index lists)."""
        from .. import families

        family = families.get(self.family)
        layout = family.width_layout
        src, dst = self.source_config, self.config
        if isinstance(self.kept_blocks, dict):  # blocks per stack (`depth.DepthSource`); heads per block slot
            counts = {a: family.group(a).count_key for a in self.kept_blocks}
            return {
                "source": self.source, "strategy": self.strategy,
                "layers_before": {a: src[k] for a, k in counts.items()},
                "layers_after": {a: dst[k] for a, k in counts.items()},
                "kept_blocks": self.kept_blocks, "heads_before": src.get(family.heads_key),
                "heads_after": dst.get(family.heads_key), "width_before": family.dims(src).width,
                "width_after": family.dims(dst).width, "kept_heads": self.width.block_heads if self.width else None,
                "width_method": self.width.method if self.width else None,
                "block_scores": self.block_scores, "calibration": self.calibration,
                "params_before": self.params_before, "params_after": self.params_after, "notes": self.notes,
            }
        count = family.group(layout.group).count_key
        return {
            "source": self.source,
            "strategy": self.strategy,
            "layers_before": src[count], "layers_after": dst[count],
            "kept_blocks": self.kept_blocks,
            "heads_before": layout.heads(src), "heads_after": layout.heads(dst),
            "width_before": layout.width(src),
            "width_after": layout.width(dst),
            "kept_heads": self.width.block_heads if self.width else None,
            "width_method": self.width.method if self.width else None,
            "block_scores": self.block_scores,
            "calibration": self.calibration,
            "params_before": self.params_before, "params_after": self.params_after,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------------------------------------
# Index spaces: which kept subset applies to the rows and to the columns of every tensor. The tables are the
# family's (`families.WidthLayout`, e.g. families/qwen_image.py). "res" = the residual-stream channels (ONE subset
# for the whole model); "res*2"/"res*6" = that subset inside each of 2 or 6 stacked chunks; "temb" = the
# timestep-embedding channels; "temb_hidden" = the timestep MLP's hidden units; "heads" = the kept heads' whole
# head_dim-row groups ("heads*3": inside each of 3 stacked chunks, a fused qkv); an FFN unit space (the layout's `ffn_spaces`, e.g. "img_ffn"/"txt_ffn") = the kept FFN
# units of that FFN ("img_ffn*2": a SwiGLU's gate | up rows); "a+b" = parts laid end to end (`space_parts`:
# FLUX.2's fused "heads*3+mlp*2" rows, q | k | v | gate | up); None = kept whole. A weight [out, in] uses (row
# space, column space); its bias uses the row space.


def split_key(key: str, prefix: str) -> tuple[int | None, str, str]:
    """('transformer_blocks.3.attn.to_q.weight', 'transformer_blocks.') -> (3, 'attn.to_q', 'weight'); keys
    outside the blocks give block None; a bare parameter (Z-Image's 'x_pad_token') is its own module, param ''."""
    block = None
    rest = key
    if key.startswith(prefix):
        index, rest = key[len(prefix):].split(".", 1)
        block = int(index)
    if "." not in rest:
        return block, rest, ""
    module, param = rest.rsplit(".", 1)
    return block, module, param


def spaces_of(key: str, ndim: int, layout) -> tuple[str | None, str | None]:
    """(row space, column space) of a tensor under a `families.WidthLayout`; KeyError for a module it lacks."""
    block, module, _ = split_key(key, layout.group + ".")
    table = layout.block_spaces if block is not None else layout.global_spaces
    if block is None:
        for group, spaces in layout.sliced_groups.items():
            index, inner, _ = split_key(key, group + ".")
            if index is not None:
                table, module = spaces, inner
                break
    rows, cols = table[module]
    return (rows, cols) if ndim == 2 else (rows, None) if ndim == 1 else (None, None)
