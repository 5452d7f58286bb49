"""Memory plan: the peak GPU memory a run will take, by part, before anything is loaded, and how many blocks to
swap (`block_swap`) for it to fit a budget.

Built on the size report (`report`): the model on the meta device, its parameters by block, the LoRA parameter
count, and the activations autograd keeps, *measured* in a meta forward (`report.measure_saved_activations`). The
plan adds what the report does not vary: the base weights' dtype (an fp8 base keeps its Linear weights in one
byte plus a float32 scale each, as `fp8.store_in_fp8` stores them; biases, norms and the layers diffusers keeps
out of layerwise casting stay bf16), the loss (Direct Distill keeps every unrolled student step's activations for
one backward), sampling (no grad; the lower bound of `report.inference_bytes`), and blocks swapped. Parts, in
bytes:

* `weights_resident`: frozen base weights not swapped (base dtype) + trainable weights (fp32 masters and their bf16
  autocast copies, as in the report);
* `swap_buffers`: GPU copies of swapped blocks in flight: two (the running block and the prefetched one) as big as
  the largest swapped block; in training without gradient checkpointing autograd keeps every swapped block's copy
  until its backward, so then all of them (swap saves nothing there);
* `activations`: measured per forward, times the forwards one backward spans; sampling: one guided forward;
* `gradients`, `optimizer` (AdamW, fp32 m and v): trainable parameters only;
* `workspace`: the backward of one block (gradients as large as its saved activations) and, with an fp8 base, the
  dequantised copy of one Linear weight and its scaled product (`fp8._Fp8Linear` saves the fp8 weight for backward
  and rebuilds the copy there, one layer at a time).

`total()` is the predicted peak of `torch.cuda.max_memory_allocated`; `reserve_bytes` (CUDA context, cuBLAS
workspace, allocator slack, which a card's budget must also hold) is added when comparing to a budget.
`blocks_needed(budget)` is the fewest blocks to swap for `total + reserve <= budget`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import families
from .errors import DistilleryError

GIB = 1024 ** 3
BASE_DTYPES = {"bf16": 2, "fp8": 1}  # bytes per weight of a frozen Linear; everything else frozen is bf16
MODES = ("lora", "full", "sample")
RESERVE_BYTES = GIB
DIRECT_DEFAULT_STEPS = 4

ASSUMPTIONS = [
    "weights: frozen base in the base dtype (fp8: the Linears fp8.store_in_fp8 converts, 1 B + a scale; the rest "
    "bf16); trainable "
    "weights in fp32 with bf16 autocast copies, fp32 gradients, AdamW m and v in fp32.",
    "activations: measured on the meta device (saved_tensors_hooks, flash attention's saved tensors), per forward; "
    "Direct Distill keeps every unrolled student step; sampling: a lower bound on one guided forward.",
    "swap: two block buffers in flight (running + prefetched); in training without gradient checkpointing "
    "autograd keeps every swapped block's copy until its backward.",
    "fp8: a Linear computes with a bf16 copy of its weight made for that matmul (forward and backward) and dropped "
    "after it; autograd keeps the fp8 weight only.",
    "not in total: CUDA context, cuBLAS workspace and allocator slack (reserve, added against a budget); text "
    "encoder and VAE (cached before training).",
]


def parse_loss(value) -> tuple[str, int]:
    """'sft' -> ('sft', 1); 'direct' / 'direct:N' (Direct Distill with N student steps) -> ('direct', N)."""
    text = str(value).strip().lower().replace("direct_distill", "direct")
    m = re.fullmatch(r"(sft|direct)(?::(\d+))?", text)
    if not m or (m.group(1) == "sft" and m.group(2)) or (m.group(2) and int(m.group(2)) < 1):
        raise DistilleryError("loss", value, "unknown loss for the memory plan.",
                              "use 'sft' or 'direct:N' (Direct Distill with N student steps, e.g. direct:4).")
    return m.group(1), int(m.group(2) or (DIRECT_DEFAULT_STEPS if m.group(1) == "direct" else 1))


_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_bytes(value, field: str = "budget") -> int:
    """Bytes from a number or '24GB' / '24GiB' / '24G' / '512MB'. GB means GiB here: a card sold as 24 GB
    (an RTX 4090: 24,564 MiB) has 24 GiB."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if not m or not re.fullmatch(r"\d+(\.\d+)?", m.group(1)) or float(m.group(1)) <= 0:
        raise DistilleryError(field, value, "not a memory size.", "write e.g. 24GB, 16GiB or 12000MB.")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise DistilleryError(field, value, "is not one of the choices.", f"use one of {list(allowed)}.")


@dataclass
class MemoryPlan:
    """Predicted peak GPU memory of one run, by part (see the module docstring); cheap to re-evaluate at any
    number of swapped blocks (`parts(n)`, `total(n)`, `blocks_needed(budget)`)."""

    family: str
    config: dict
    source: str
    setting: dict
    block_names: list[str]
    block_bytes: list[int]  # frozen bytes per block at the base dtype: what a swap of it moves
    outside_frozen_bytes: int  # frozen weights outside the blocks (always resident)
    trainable_params: int
    activations_bytes: int
    workspace_bytes: int
    blocks_swapped: int = 0
    reserve_bytes: int = RESERVE_BYTES
    notes: list[str] = field(default_factory=list)

    @property
    def training(self) -> bool:
        return self.setting["mode"] != "sample"

    @property
    def max_swappable(self) -> int:
        return sum(1 for b in self.block_bytes if b > 0)

    def swapped(self, n: int | None = None) -> list[int]:
        from .block_swap import chosen_blocks

        return chosen_blocks(self.block_bytes, self.blocks_swapped if n is None else n)

    def parts(self, n: int | None = None) -> dict[str, int]:
        n = self.blocks_swapped if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.max_swappable:
            raise DistilleryError("blocks_to_swap", n, f"must be a whole number from 0 to {self.max_swappable} "
                                  "(blocks with frozen weights).", f"use 0..{self.max_swappable}.")
        swapped = [self.block_bytes[i] for i in self.swapped(n)]
        trainable = self.trainable_params
        if swapped and self.training and not self.setting["gradient_checkpointing"]:
            buffers = sum(swapped)  # autograd keeps every copy until its block's backward
        else:
            buffers = min(len(swapped), 2) * max(swapped, default=0)
        return {
            "weights_resident": self.outside_frozen_bytes + sum(self.block_bytes) - sum(swapped) + trainable * 6,
            "swap_buffers": buffers,
            "activations": self.activations_bytes,
            "gradients": trainable * 4,
            "optimizer": trainable * 8,
            "workspace": self.workspace_bytes,
        }

    def total(self, n: int | None = None) -> int:
        return sum(self.parts(n).values())

    def blocks_needed(self, budget_bytes: int) -> int | None:
        """The fewest blocks to swap so that total + reserve fits `budget_bytes`; None if even all do not."""
        for n in range(self.max_swappable + 1):
            if self.total(n) + self.reserve_bytes <= budget_bytes:
                return n
        return None

    def with_swap(self, n: int) -> "MemoryPlan":
        self.parts(n)  # checks n
        return MemoryPlan(**{**self.__dict__, "blocks_swapped": n})

    def to_dict(self, budget_bytes: int | None = None) -> dict:
        out = {"family": self.family, "config": self.config, "source": self.source, "setting": self.setting,
               "blocks_swapped": self.blocks_swapped, "swapped_blocks": [self.block_names[i] for i in self.swapped()],
               "max_swappable": self.max_swappable, "block_bytes": max(self.block_bytes, default=0),
               "parts_bytes": self.parts(), "total_bytes": self.total(), "reserve_bytes": self.reserve_bytes,
               "notes": self.notes, "assumptions": ASSUMPTIONS}
        if budget_bytes is not None:
            need = self.blocks_needed(budget_bytes)
            out["budget_bytes"] = budget_bytes
            out["fits"] = self.total() + self.reserve_bytes <= budget_bytes
            out["blocks_needed"] = need
            if need is not None:
                out["total_bytes_at_blocks_needed"] = self.total(need)
        return out

    def summary_lines(self, budget_bytes: int | None = None) -> dict[str, str]:
        from .report import _size

        s = self.setting
        loss = "sample" if not self.training else (
            f"{s['mode']} SFT" if s["loss"] == "sft" else f"{s['mode']} Direct Distill, {s['steps']} steps")
        parts = self.parts()
        lines = {
            "plan": f"{self.family} ({self.source}): {loss}, {s['width']}x{s['height']}, batch {s['batch']}, base "
                    f"{s['base_dtype']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
                    f"{self.blocks_swapped} of {len(self.block_bytes)} blocks swapped",
            "peak": f"{_size(self.total())} = " + " + ".join(f"{k.replace('_', ' ')} {_size(v)}"
                                                             for k, v in parts.items()),
        }
        if budget_bytes is not None:
            need = self.blocks_needed(budget_bytes)
            verdict = "fits" if self.total() + self.reserve_bytes <= budget_bytes else "does not fit"
            lines["budget"] = (f"{_size(budget_bytes)} (with {_size(self.reserve_bytes)} reserve for the CUDA "
                               f"context): {verdict}; " + (
                                   f"blocks to swap: {need} (peak {_size(self.total(need))})" if need is not None
                                   else f"does not fit even with all {self.max_swappable} blocks swapped"))
        if self.notes:
            lines["notes"] = " ".join(self.notes)
        return lines


def _kept(acts) -> int:
    """Bytes a checkpointed forward keeps (outside the blocks and the blocks' inputs; `report.SavedActivations`)."""
    return sum({**acts.outside, **acts.block_inputs}.values())


def fp8_linears(model) -> dict[str, int]:
    """Linear layers `fp8.store_in_fp8` stores in fp8 (name -> weight elements): every nn.Linear but LoRA's and
    those matching the model's layerwise-casting skip patterns (norms, precision-sensitive embedders)."""
    import torch

    from .fp8 import _skipped, skip_patterns

    patterns = skip_patterns(model)
    return {name: m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name and not _skipped(name, patterns)}


def weight_bytes(model, family: str, base_dtype: str) -> tuple[list[str], list[int], int]:
    """Frozen weight bytes of a (meta) model at a base dtype: (block names in `block_swap.block_list` order, bytes
    per block, bytes outside the blocks). fp8: the Linears `fp8.store_in_fp8` converts hold one byte per weight
    and a float32 scale; everything else is bf16."""
    _check_choice("base_dtype", base_dtype, BASE_DTYPES)
    groups = families.get(family).block_groups()
    names = [f"{g.attr}.{i}" for g in groups for i in range(len(getattr(model, g.attr)))]
    position = {name: i for i, name in enumerate(names)}
    fp8 = {f"{name}.weight" for name in fp8_linears(model)} if base_dtype == "fp8" else set()
    per_block, outside = [0] * len(names), 0
    for name, p in model.named_parameters():
        nbytes = p.numel() + 4 if name in fp8 else p.numel() * BASE_DTYPES["bf16"]
        owner = next((g for g in groups if name.startswith(g.prefix)), None)
        if owner is None:
            outside += nbytes
        else:
            per_block[position[owner.prefix + name[len(owner.prefix):].split(".", 1)[0]]] += nbytes
    return names, per_block, outside


def memory_plan(spec, *, height: int = 1024, width: int = 1024, batch: int = 1, mode: str = "lora",
                loss="sft", base_dtype: str = "bf16", gradient_checkpointing: bool = True, blocks_to_swap: int = 0,
                lora_rank: int = 32, lora_targets=None, text_tokens: int | None = None,
                cfg_scale: float | None = None) -> MemoryPlan:
    """The memory plan of a run (see the module docstring). `spec`: what `report.size_report` takes (a model,
    (family, config), a preset, a config JSON, a diffusers folder, a safetensors file). `mode`: 'lora', 'full'
    or 'sample' (teacher sampling, guided when `cfg_scale` != 1; default the family's); `loss`: 'sft' or
    'direct:N'."""
    from .lora_presets import lora_parameter_count, resolve_targets
    from .report import (_check_size, _measure, _pixels_per_latent, _pixels_per_token, build_meta, example_inputs,
                         inference_bytes, parameter_counts)

    family, config, source = families.detect(spec)
    fam = families.get(family)
    _check_choice("mode", mode, MODES)
    _check_choice("base_dtype", base_dtype, BASE_DTYPES)
    kind, steps = parse_loss(loss)
    step = _pixels_per_token(family)
    _check_size("height", height, step)
    _check_size("width", width, step)
    _check_size("batch", batch)
    _check_size("lora_rank", lora_rank)
    text_tokens = fam.report_text_tokens if text_tokens is None else text_tokens
    _check_size("text_tokens", text_tokens)
    if mode == "full" and base_dtype != "bf16":
        raise DistilleryError("base_dtype", base_dtype, "full training updates every weight: there is no frozen "
                              "base to store in fp8.", "use bf16, or mode 'lora'.")

    model = build_meta(family, config)
    counts = parameter_counts(model, family)
    names, per_block, outside = weight_bytes(model, family, base_dtype)
    # fp8 Linears compute with a dequantised copy of their weight (and its scaled product), one layer at a time
    dequant = 2 * BASE_DTYPES["bf16"] * max(fp8_linears(model).values(), default=0) if base_dtype == "fp8" else 0

    per_latent = _pixels_per_latent(family)
    image_tokens = fam.image_tokens(height // per_latent, width // per_latent)
    notes: list[str] = []
    if mode == "sample":
        kind, steps = "sample", 1
        cfg = float(fam.sampling_defaults.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale)
        rows = batch * (2 if cfg != 1.0 else 1)
        channels = fam.latent_channels(config)
        euler = 4 * batch * channels * (height // per_latent) * (width // per_latent) * 4  # fp32 Euler state
        activations = inference_bytes(family, config, batch=rows, tokens=image_tokens + text_tokens,
                                      dtype_bytes=2) + euler
        workspace = dequant
        trainable = 0
        frozen_blocks, frozen_outside = per_block, outside
    else:
        cfg = None
        inputs = example_inputs(family, config, batch=batch, height=height, width=width, text_tokens=text_tokens)
        lora = None
        trainable = counts["params"]
        if mode == "lora":
            lora_names = resolve_targets(model, lora_targets or fam.default_lora_preset)
            lora = (lora_names, lora_rank)
            trainable = lora_parameter_count(model, lora_names, lora_rank)
            frozen_blocks, frozen_outside = per_block, outside
        else:  # full: everything trains, nothing is frozen or swappable
            frozen_blocks, frozen_outside = [0] * len(names), 0
        acts = _measure(family, config, inputs, lora)
        activations = acts.total(gradient_checkpointing)
        if steps > 1:  # each further step adds what a second forward adds (persistent tables are shared)
            two = _measure(family, config, inputs, lora, calls=2)
            if gradient_checkpointing:
                activations += (steps - 1) * (_kept(two) - _kept(acts))
            else:
                activations += (steps - 1) * (two.total(False) - acts.total(False))
        workspace = acts.largest_block() + dequant
        if not gradient_checkpointing:
            notes.append("without gradient checkpointing swapped blocks stay on the GPU until their backward: swap "
                         "saves no training memory.")
    setting = {"height": height, "width": width, "batch": batch, "mode": mode, "loss": kind, "steps": steps,
               "base_dtype": base_dtype, "gradient_checkpointing": bool(gradient_checkpointing),
               "lora_rank": lora_rank if mode == "lora" else None, "image_tokens": image_tokens,
               "text_tokens": text_tokens, "cfg_scale": cfg}
    plan = MemoryPlan(family, config, source, setting, names, frozen_blocks, frozen_outside, trainable, activations,
                      workspace, notes=notes)
    return plan.with_swap(blocks_to_swap)
