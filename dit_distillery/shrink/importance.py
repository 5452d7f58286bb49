"""Scores that decide what a shrunk DiT keeps: calibration activations, or weight magnitudes.

* Calibration (`run_calibration`): the source runs block by block on calibration inputs, by the family's runner
  (`WidthLayout.calibrate`; Qwen-Image's in families/qwen_image.py; FLUX.2's, which measures each block stack
  on its own, `StackCalibrationStats`, in families/flux2.py). The stem (img_in, txt_norm/txt_in, the
  timestep embedding, RoPE) is diffusers' own modules, loaded from the source's non-block weights; then ONE
  diffusers block at a time is built, loaded from the source, run and freed, so memory stays at one block (1.4 GB
  in fp32 for the real Qwen-Image) plus the activations. It measures:
  - block influence (ShortGPT): 1 - cos(input, output) of each block's IMAGE tokens, averaged over tokens and
    samples. Only the image stream reaches the output (norm_out/proj_out read image tokens only; the text stream
    is auxiliary and the last block's text output is discarded), so text tokens are left out.
  - activation magnitudes for width (Minitron-style): mean |x| per residual channel at each kept block's input
    (image tokens + real text tokens) and after the last block (image tokens); mean L2 norm of each head's
    attention output (the input of to_out / to_add_out; the text side is skipped for the source's last block,
    whose text branch was never trained); mean |GELU output| per FFN unit; mean |SiLU(.)| of the timestep
    embedding and of the timestep MLP's hidden layer (what the modulation layers and linear_2 read).
* Magnitude (`magnitude_scores`, no calibration needed): every index (channel, head, FFN unit) is scored by the
  weight mass it carries: the sum of squares of every row and column that would be removed with it, across the
  kept blocks and the non-block layers (the L2 group norm of structured pruning). Each channel of a space owns the
  same number of entries, so the comparison is fair. For the source's last block the untrained text-output
  weights (to_add_out, txt_mlp) do not vote for residual channels or heads.

Calibration inputs come from the caller (`Calibration`: the ComfyUI node encodes real prompts with the pipeline's
text encoder) or, when none is given, `proxy_calibration` makes seeded Gaussian latents and text states; reports
name which one was used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import families
from ..conditioning import TextEmbeds
from ..errors import DistilleryError, StopRequested
from .plan import WidthScores, space_parts
from .stream import SourceModel, read_ahead


@dataclass
class Calibration:
    """DiT inputs for scoring: unpacked latents [B, C, h, w] at noise levels `sigmas` [B] (the DiT's input as it
    is during sampling) and the prompts' text states. `sigmas=None` spreads the samples evenly over (0, 1)."""

    latents: torch.Tensor
    text: TextEmbeds
    sigmas: torch.Tensor | None = None
    kind: str = "provided"

    def resolved_sigmas(self) -> torch.Tensor:
        if self.sigmas is not None:
            return torch.as_tensor(self.sigmas, dtype=torch.float32).reshape(-1)
        b = self.latents.shape[0]
        return (torch.arange(b, dtype=torch.float32) + 0.5) / b


def _family(config: dict, family):
    return families.get(family if family is not None else families.detect(dict(config), "config")[0])


def proxy_calibration(config: dict, batch: int = 2, latent_size: int = 32, text_len: int = 32,
                      seed: int = 0, family=None) -> Calibration:
    """Seeded Gaussian stand-ins for real latents and prompt states (reported as kind 'proxy')."""
    family = _family(config, family)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, family.latent_channels(config), latent_size, latent_size, generator=g)
    embeds = torch.randn(batch, text_len, family.text_width(config), generator=g)
    return Calibration(latents, TextEmbeds(embeds, None), None, kind="proxy")


def check_calibration(cal, config: dict, family=None) -> Calibration:
    family = _family(config, family)
    if not isinstance(cal, Calibration):
        raise DistilleryError("calibration", type(cal).__name__, "not a Calibration.",
                              "pass dit_distillery.shrink.Calibration(latents, TextEmbeds(...)) or None for a proxy.")
    lat, text = cal.latents, cal.text
    channels, p, width = family.latent_channels(config), family.patch, family.text_width(config)
    if lat.ndim != 4 or lat.shape[1] != channels or lat.shape[2] % p or lat.shape[3] % p or lat.shape[0] < 1:
        even = f" with h and w multiples of {p}" if p > 1 else ""
        raise DistilleryError("calibration.latents", tuple(lat.shape),
                              f"must be unpacked latents [B, {channels}, h, w]{even}.",
                              f"encode images (or draw noise) at a size divisible by {p * family.vae_factor} pixels.")
    emb = text.embeds
    if emb.ndim != 3 or emb.shape[0] != lat.shape[0] or emb.shape[2] != width:
        raise DistilleryError("calibration.text", tuple(emb.shape),
                              f"must be [B={lat.shape[0]}, L, {width}] text states.",
                              f"encode one prompt per latent with the {family.title} text encoder.")
    if text.mask is not None and tuple(text.mask.shape) != tuple(emb.shape[:2]):
        raise DistilleryError("calibration.text.mask", tuple(text.mask.shape), "must be [B, L] like the embeds.",
                              "pass the encoder's attention mask.")
    sig = cal.resolved_sigmas()
    if sig.numel() != lat.shape[0] or bool(((sig < 0) | (sig > 1)).any()):
        raise DistilleryError("calibration.sigmas", sig.tolist(), "needs one sigma in [0, 1] per latent.",
                              "pass sigmas of shape [B] or None.")
    return cal


@dataclass
class CalibrationStats:
    """What one calibration pass over every source block measured (see the module docstring)."""

    block_scores: list[float]
    residual_in: list[torch.Tensor]  # per source block, [D]
    residual_out: torch.Tensor  # [D] after the last block
    heads: list[torch.Tensor]
    img_units: list[torch.Tensor]
    txt_units: list[torch.Tensor]
    temb: torch.Tensor
    temb_hidden: torch.Tensor
    # FFN unit space -> per source block; a runner of other spaces than Qwen-Image's img/txt fills this instead
    units: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def width_scores(self, kept_blocks: list[int]) -> WidthScores:
        units = self.units or {"img_ffn": self.img_units, "txt_ffn": self.txt_units}
        return WidthScores(
            channels=sum(self.residual_in[s] for s in kept_blocks) + self.residual_out,
            temb=self.temb, temb_hidden=self.temb_hidden,
            heads=[self.heads[s] for s in kept_blocks],
            units={space: [per_block[s] for s in kept_blocks] for space, per_block in units.items()},
        )


@dataclass
class StackCalibrationStats:
    """`CalibrationStats` of a family whose block stacks each keep their own count (a per-stack `WidthLayout`:
    FLUX.2): block influence per stack, and the other measurements per block, keyed (stack, source index)."""

    block_scores: dict[str, list[float]]  # stack -> per source block
    residual_in: dict[tuple[str, int], torch.Tensor]  # [D] at each block's input
    residual_out: torch.Tensor  # [D] after the last block (image tokens)
    heads: dict[tuple[str, int], torch.Tensor]  # [H]
    units: dict[tuple[str, int], dict[str, torch.Tensor]]  # FFN unit space -> [units], the spaces a block has
    temb: torch.Tensor
    temb_hidden: torch.Tensor

    def width_scores(self, slots: list[tuple[str, int]], spaces, units: int) -> WidthScores:
        """Scores of the kept blocks `slots` ((stack, source index), in the width plan's order); a space a block
        does not have scores zeros (its choice is never used)."""
        zeros = torch.zeros(units, dtype=torch.float64)
        return WidthScores(
            channels=sum(self.residual_in[b] for b in slots) + self.residual_out,
            temb=self.temb, temb_hidden=self.temb_hidden, heads=[self.heads[b] for b in slots],
            units={space: [self.units[b].get(space, zeros) for b in slots] for space in spaces},
        )


def _token_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over batch and tokens of x [B, L, ...]; `weight` [B, L] masks out padding tokens."""
    x = x.double()
    if weight is None:
        return x.flatten(0, 1).mean(0)
    w = weight.to(x.dtype).reshape(*weight.shape, *([1] * (x.ndim - 2)))
    return (x * w).flatten(0, 1).sum(0) / w.sum().clamp_min(1)


@torch.no_grad()
def run_calibration(source: SourceModel, calibration: Calibration, device=None, progress=None,
                    stop=None) -> CalibrationStats:
    """Run the source block by block on `calibration` and measure everything in `CalibrationStats` (the family's
    runner, `WidthLayout.calibrate`: how its blocks are built and called is the family's to know)."""
    runner = source.layout.calibrate
    if runner is None:
        raise DistilleryError("strategy", "importance", f"{source.family.title} has no calibration runner to score "
                              "blocks and channels on.", "use a depth strategy other than importance, and width_method "
                              "magnitude.")
    cal = check_calibration(calibration, source.config, family=source.family)
    return runner(source, cal, device=device, progress=progress, stop=stop)


# ----------------------------------------------------------------------------------------------------------
# Weight magnitudes

_ROWS_PER_CHUNK = 1024  # squares are taken in fp32 row chunks (12 MB at width 3072): bounded memory


def _row_col_mass(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of squares of every row (and of every column for a matrix): fp32 within a chunk, float64 across.

    The sums are matrix-vector products with a ones vector: on CPU, BLAS does them several times faster than
    torch's sum reductions, and this pass reads every kept weight of the model.
    """
    if t.ndim == 1:
        return t.double().square(), None
    rows = torch.empty(t.shape[0], dtype=torch.float64)
    cols = torch.zeros(t.shape[1], dtype=torch.float64)
    ones_in = torch.ones(t.shape[1], dtype=torch.float32)
    for start in range(0, t.shape[0], _ROWS_PER_CHUNK):
        chunk = t[start:start + _ROWS_PER_CHUNK].float()
        sq = chunk.mul_(chunk)
        rows[start:start + sq.shape[0]] = sq @ ones_in
        cols += torch.ones(sq.shape[0], dtype=torch.float32) @ sq
    return rows, cols


class MassScores:
    """Weight-mass accumulators of every index space: shared by the whole model (residual channels, timestep
    embedding, the timestep MLP's hidden units) and per block slot (heads, each FFN unit space)."""

    def __init__(self, heads: int, head_dim: int, units: int, spaces, slots: int):
        self.heads, self.head_dim, self.dim, self.units = heads, head_dim, heads * head_dim, units
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        self.shared = {"res": zeros(self.dim), "temb": zeros(self.dim), "temb_hidden": zeros(self.dim)}
        self.spaces = tuple(spaces)
        self.per_block = [{"heads": zeros(heads), **{space: zeros(units) for space in self.spaces}}
                          for _ in range(slots)]

    def add(self, slot: int | None, tensor: torch.Tensor, row_space, col_space, untrained: bool = False) -> None:
        """One tensor's row and column masses into its spaces (`slot`: its block's, None outside the blocks;
        `untrained`: it does not vote for residual channels or heads)."""
        rows, cols = _row_col_mass(tensor)
        local = self.per_block[slot] if slot is not None else None
        self._add(row_space, rows, local, untrained)
        self._add(col_space, cols, local, untrained)

    def _add(self, space, mass, local, skip_shared) -> None:
        if space is None or mass is None:
            return
        offset = 0
        for name, chunks in space_parts(space):  # a fused tensor: each part of its rows/columns into its space
            size = chunks * (self.units if name in self.spaces else self.dim)
            part, offset = mass[offset:offset + size], offset + size
            if name == "res":
                if not skip_shared:
                    self.shared["res"] += part.reshape(-1, self.dim).sum(0)  # res*k: summed over the chunks
            elif name in self.shared:
                self.shared[name] += part
            elif name == "heads":  # (a fused qkv: the 3 chunks summed)
                if not skip_shared:
                    local["heads"] += part.reshape(-1, self.heads, self.head_dim).sum((0, 2))
            else:
                local[name] += part.reshape(-1, self.units).sum(0)

    def scores(self) -> WidthScores:
        return WidthScores(
            channels=self.shared["res"], temb=self.shared["temb"], temb_hidden=self.shared["temb_hidden"],
            heads=[b["heads"] for b in self.per_block],
            units={space: [b[space] for b in self.per_block] for space in self.spaces},
        )


def magnitude_scores(source: SourceModel, kept_blocks: list[int], progress=None, stop=None) -> WidthScores:
    """Weight-mass scores of every index space, reading the non-block layers and the kept blocks once."""
    heads, head_dim = source.heads, source.head_dim
    mass = MassScores(heads, head_dim, source.layout.ffn_units(heads * head_dim), source.layout.ffn_spaces,
                      len(kept_blocks) + source.extra_blocks)  # the kept blocks, then those of `sliced_groups`
    keys = [(source.extra_slot(k, len(kept_blocks)), k) for k in source.global_keys()]
    for i, s in enumerate(kept_blocks):
        keys += [(i, k) for k in source.keys_of_block(s)]
    keys = [(i, k) for i, k in keys if source.spaces_of(k, len(source.shapes[k])) != (None, None)]  # norms: no vote
    last = source.num_blocks - 1
    tensors = read_ahead(source.reader, [k for _, k in keys])
    for done, ((i, key), (_, tensor)) in enumerate(zip(keys, tensors)):
        if stop is not None and stop():
            raise StopRequested("scoring stopped")
        block, module, _ = source.split_key(key)
        tensor = source.quant.value(key, tensor)  # a scaled fp8 weight's mass is that of weight x scale
        row_space, col_space = source.spaces_of(key, tensor.ndim)
        mass.add(i, tensor, row_space, col_space, untrained=block == last and module in
                 source.layout.last_block_untrained)
        del tensor
        if progress is not None:
            progress(done + 1, len(keys), stage="score", tensor=key)
    return mass.scores()
