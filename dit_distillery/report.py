"""How big a DiT is and how much memory training it takes, computed without allocating a single weight.

Everything runs on PyTorch's `meta` device: the model is built there (shapes, no data) and so are the inputs.
Parameter counts come from the module tree, by part (embedders, each block, output head).

Activation memory is *measured*, not guessed: a meta-device forward pass runs under
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the backward pass; we
sum their storages (each once; weights excluded since they are counted as weights). Meta ops do no compute, so
a 20B model at 1024x1024 takes about a second. Block hooks attribute each saved tensor to a block or to the
code outside the blocks, which gives the gradient-checkpointing figure from the same pass: checkpointing keeps
only the blocks' inputs and what is saved outside them, and recomputes one block at a time during backward.

Attention: on meta, PyTorch's SDPA takes its math path, which saves the full [B, heads, S, S] softmax. Training
runs flash or memory-efficient attention, which saves only q, k, v, the output and one fp32 logsumexp per query
(O(tokens)). During the measurement SDPA is therefore replaced by a stand-in that saves exactly that; the math
path's extra is measured too and reported beside it. tests/test_report.py checks the meta measurement, stand-in
included, against the autograd graph of a real CPU forward (whose SDPA runs PyTorch's CPU flash kernel).
"""

from __future__ import annotations

import contextlib
import unittest.mock
import weakref
from dataclasses import dataclass, field

import torch

from . import families
from .errors import DistilleryError
from .lora_presets import LORA_PRESETS, lora_parameter_count, parse_targets, resolve_targets
from .models import registry

GIB = 1024 ** 3

# Named configurations the report (and its CLI) accepts instead of a file: every family's (`Family.presets`).
PRESETS = families.presets()

COMPUTE_DTYPE = torch.bfloat16
ASSUMPTIONS = [
    "full training: fp32 master weights (4 B/param), their bf16 autocast copies (2 B), fp32 gradients (4 B), "
    "AdamW m and v in fp32 (8 B).",
    "LoRA training: frozen base weights in bf16 (2 B/param); adapters in fp32 with bf16 copies, fp32 gradients "
    "and fp32 AdamW states, as for full training.",
    "activations: bytes autograd saves for backward in a bf16 forward (measured on the meta device, weights "
    "excluded); the bf16 weight copies above are counted separately.",
    "attention: flash / memory-efficient SDPA (saves q, k, v, output and a per-query logsumexp, O(tokens)); the "
    "math path also saves the [B, heads, S, S] softmax, reported as math_attention_extra.",
    "gradient checkpointing: per block; keeps each block's inputs and recomputes one block at a time.",
    "not counted: the CUDA context and allocator slack (~0.5-1.5 GiB), transient backward buffers, the text "
    "encoder and VAE (cache their outputs before training, or add their weights).",
]


# ----------------------------------------------------------------------------------------------------------
# What to report on

def resolve_spec(spec, field: str = "model") -> tuple[str, dict, str]:
    """(family, config, source description) of a model, a (family, config) pair, a preset name, a JSON config, a
    diffusers folder or a safetensors file (only its header is read): `families.detect`, the one resolver."""
    return families.detect(spec, field)


def _pixels_per_latent(family) -> int:
    return families.get(family).vae_factor


def _pixels_per_token(family) -> int:
    spec = families.get(family)
    return spec.vae_factor * spec.patch


def _all_blocks(model: torch.nn.Module, family) -> list[torch.nn.Module]:
    """Every transformer block of every group, in the family's group order."""
    return [block for group in families.get(family).block_groups() for block in getattr(model, group.attr)]


def with_overrides(family: str, config: dict, layers: int | None = None, heads: int | None = None) -> dict:
    """The config with another block count (of the main block group) and/or head count (Qwen-Image: width =
    heads x head dim)."""
    spec = families.get(family)
    config = dict(config)
    for option, value, key in (("layers", layers, spec.main_group().count_key), ("heads", heads, spec.heads_key)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DistilleryError(option, value, "must be a positive integer.", f"give a whole number >= 1 for {option}.")
        config[key] = value
    return config


def build_meta(family: str, config: dict, field: str = "config") -> torch.nn.Module:
    """The model on the meta device (no memory); a config the class rejects becomes a DistilleryError."""
    allowed = families.constructor_keys(family)
    unknown = set(config) - allowed
    if unknown:
        raise DistilleryError(field, sorted(unknown), f"not {family} config keys.",
                              f"use keys among {sorted(allowed)}.")
    try:
        return registry.build_empty(family, config, "meta")
    except DistilleryError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise DistilleryError(field, config, f"cannot build a {family} model from it ({exc}).",
                              "check the sizes (width divisible by heads, positive counts).") from exc


# ----------------------------------------------------------------------------------------------------------
# Parameters

def parameter_counts(model: torch.nn.Module, family: str) -> dict:
    """Parameters in total and by part: embedders (everything outside the blocks and the head), blocks (and each,
    over every block group in order), head."""
    spec = families.get(family)
    groups = spec.block_groups()
    start, offset = {}, 0
    for group in groups:
        start[group.prefix] = offset
        offset += len(getattr(model, group.attr))
    per_block = [0] * offset
    parts = {"embedders": 0, "blocks": 0, "head": 0}
    for name, p in model.named_parameters():
        prefix = next((g.prefix for g in groups if name.startswith(g.prefix)), None)
        if prefix is not None:
            per_block[start[prefix] + int(name[len(prefix):].split(".", 1)[0])] += p.numel()
            parts["blocks"] += p.numel()
        elif name.startswith(spec.head_prefixes):
            parts["head"] += p.numel()
        else:
            parts["embedders"] += p.numel()
    return {"params": sum(parts.values()), "parts": parts, "per_block": per_block}


# ----------------------------------------------------------------------------------------------------------
# Activations

class _FlashAttentionAccounting(torch.autograd.Function):
    """Stands in for SDPA during a measurement: saves what flash / memory-efficient kernels save for backward
    (q, k, v, output, fp32 logsumexp per query row, the mask if any), and returns the output in their layout
    ([B, S, heads, D] in memory), so merging the heads afterwards is a view as in training, not a copy.
    Forward only: reports never backprop."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        out = _real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)
        out = out.transpose(-3, -2).contiguous().transpose(-3, -2)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp, *([attn_mask] if attn_mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the attention stand-in is for memory accounting only")


_real_sdpa = torch.nn.functional.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if query.device.type != "meta":  # real tensors (another thread, a CPU check) keep the real kernels
        return _real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    return _FlashAttentionAccounting.apply(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@contextlib.contextmanager
def flash_attention_accounting():
    """Within the block, SDPA on meta tensors saves what flash attention saves (see the module docstring).

    The patch is process-wide for its (short) duration, so the stand-in leaves real tensors alone.
    """
    with unittest.mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_sdpa):
        yield


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    return []


@dataclass
class _Record:
    """One saved storage: its size, where it was first saved (-1 = outside the blocks), the tensors saved on it."""

    key: int
    nbytes: int
    region: int
    refs: list = field(default_factory=list)

    def alive(self) -> bool:
        return any(ref() is not None for ref in self.refs)


@dataclass
class SavedActivations:
    """Bytes autograd saved in one forward, by storage: outside the blocks, in each block, and the blocks'
    inputs (what gradient checkpointing keeps)."""

    outside: dict[int, int] = field(default_factory=dict)
    blocks: list[dict[int, int]] = field(default_factory=list)
    block_inputs: dict[int, int] = field(default_factory=dict)

    def total(self, checkpointing: bool) -> int:
        if not checkpointing:
            everything = dict(self.outside)
            for block in self.blocks:
                everything.update(block)
            return sum(everything.values())
        kept = {**self.outside, **self.block_inputs}
        recompute = max((sum(n for k, n in block.items() if k not in kept) for block in self.blocks), default=0)
        return sum(kept.values()) + recompute

    def largest_block(self) -> int:
        return max((sum(block.values()) for block in self.blocks), default=0)


def measure_saved_activations(model: torch.nn.Module, blocks: torch.nn.ModuleList, inputs: dict,
                              flash_attention: bool = True) -> SavedActivations:
    """Run `model(**inputs)` with grad on and record what autograd saves (any device; meta costs nothing).

    Only tensors still held by the graph when the forward returns count (a branch whose result is dropped,
    like the text stream of Qwen-Image's last block, frees what it saved). Checkpointing must be off for the
    pass: its own hooks would hide the blocks' saved tensors.
    """
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    result = SavedActivations(blocks=[{} for _ in blocks])
    records: dict[int, _Record] = {}  # storage id -> its latest record
    every: list[_Record] = []
    block_inputs: list[torch.Tensor] = []  # held: checkpointing keeps them, and their ids must stay unique
    region = [-1]  # -1: outside the blocks

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in weights:
            record = records.get(key)
            if record is None or not record.alive():  # a dead record's id may have been reused by a new storage
                record = records[key] = _Record(key, storage.nbytes(), region[-1])
                every.append(record)
            record.refs.append(weakref.ref(t))
        return t

    def enter(i):
        def hook(module, args, kwargs):
            block_inputs.extend(t for t in _tensors_in((args, kwargs)) if t.untyped_storage()._cdata not in weights)
            region.append(i)
        return hook

    def leave(module, args, output):
        region.pop()

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    attention = flash_attention_accounting() if flash_attention else contextlib.nullcontext()
    try:
        with attention, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    for record in every:
        if record.alive():
            (result.outside if record.region < 0 else result.blocks[record.region])[record.key] = record.nbytes
    for t in block_inputs:
        result.block_inputs[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
    del output
    return result


def example_inputs(family: str, config: dict, *, batch: int, height: int, width: int, text_tokens: int,
                   device="meta", dtype=COMPUTE_DTYPE) -> dict:
    """Forward kwargs of the right shapes for an image of height x width (no data on meta)."""
    step = _pixels_per_latent(family)
    return families.get(family).example_inputs(config, batch=batch, h=height // step, w=width // step,
                                               text_tokens=text_tokens, device=device, dtype=dtype)


class _Repeated(torch.nn.Module):
    """The model called `calls` times on the same inputs, every output kept: what stays saved across forwards
    that share one backward (Direct Distill's unrolled student steps), persistent tables counted once."""

    def __init__(self, model: torch.nn.Module, calls: int):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, **inputs):
        return [self.model(**inputs) for _ in range(self.calls)]


def _measure(family: str, config: dict, inputs: dict, lora: tuple[list[str], int] | None,
             flash_attention: bool = True, calls: int = 1) -> SavedActivations:
    model = build_meta(family, config)
    if lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        names, rank = lora
        model.requires_grad_(False)
        with torch.device("meta"):
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), model)
    torch.nn.Module.to(model, COMPUTE_DTYPE)  # nn.Module.to: diffusers' .to warns about fp32 modules
    runner = model if calls == 1 else _Repeated(model, calls)
    return measure_saved_activations(runner, _all_blocks(model, family), inputs, flash_attention)


# ----------------------------------------------------------------------------------------------------------
# Closed-form lower bounds, cheap enough to check before every sample and training run

# Bytes autograd saves per block, per token and per unit of width, in bf16, are each family's
# `saved_per_token_width`: the meta measurement above at every size and resolution tried, rounded down so the
# estimate stays a lower bound (tests/test_faults_weights.py holds them to it).


def dit_dims(family: str, config: dict) -> tuple[int, int, int]:
    """(width, blocks, FFN hidden width) of a DiT config."""
    return tuple(families.get(family).dims(config))


def inference_bytes(family: str, config: dict, *, batch: int, tokens: int, dtype_bytes: int) -> int:
    """A lower bound on one DiT forward's working memory without grad: a block holds its input, q, k, v, the
    attention output (each [batch, tokens, width]) and the FFN's hidden layer. Attention is counted as the
    flash/memory-efficient kernels need it, O(tokens): a math-path [tokens x tokens] score matrix would add more."""
    width, _, ffn = dit_dims(family, config)
    return batch * tokens * (5 * width + ffn) * dtype_bytes


def training_activation_bytes(family: str, config: dict, *, batch: int, tokens: int, checkpointing: bool,
                              dtype_bytes: int = 2) -> int:
    """A lower bound on the activations one training forward keeps for backward (the closed form of
    `measure_saved_activations`): per block `Family.saved_per_token_width` x tokens x width bytes in bf16; with
    gradient checkpointing, every block's input plus one block recomputed at a time."""
    width, blocks, _ = dit_dims(family, config)
    per_block = families.get(family).saved_per_token_width * batch * tokens * width * dtype_bytes // 2
    if checkpointing:
        return blocks * batch * tokens * width * dtype_bytes + per_block
    return blocks * per_block


# ----------------------------------------------------------------------------------------------------------
# The report

def _check_size(field: str, value, multiple: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % multiple:
        need = f"a positive multiple of {multiple}" if multiple > 1 else "a positive integer"
        raise DistilleryError(field, value, f"must be {need}.", f"give {need} for {field}.")


def size_report(spec, *, height: int = 1024, width: int = 1024, batch: int = 1, gradient_checkpointing: bool = True,
                lora_rank: int = 32, lora_targets=None, text_tokens: int | None = None) -> dict:
    """Parameters, weight memory and estimated training memory (full and LoRA) of a DiT. See the module doc.

    `spec`: a model, (family, config), a preset name (`PRESETS`), a JSON config, a diffusers folder or a
    safetensors file. Sizes are in bytes; `summary_lines` turns the report into readable text.
    """
    family, config, source = families.detect(spec)
    step = _pixels_per_token(family)
    _check_size("height", height, step)
    _check_size("width", width, step)
    _check_size("batch", batch)
    _check_size("lora_rank", lora_rank)
    text_tokens = families.get(family).report_text_tokens if text_tokens is None else text_tokens
    _check_size("text_tokens", text_tokens)

    model = build_meta(family, config)
    counts = parameter_counts(model, family)
    params = counts["params"]
    preset = lora_targets or families.get(family).default_lora_preset
    lora_names = resolve_targets(model, preset)
    lora_params = lora_parameter_count(model, lora_names, lora_rank)

    inputs = example_inputs(family, config, batch=batch, height=height, width=width, text_tokens=text_tokens)
    full_acts = _measure(family, config, inputs, None)
    math_acts = _measure(family, config, inputs, None, flash_attention=False)
    lora_acts = _measure(family, config, inputs, (lora_names, lora_rank))

    def training(frozen: int, trainable: int, acts: SavedActivations) -> dict:
        parts = {"weights_bytes": frozen * 2 + trainable * 4, "bf16_copies_bytes": trainable * 2,
                 "gradients_bytes": trainable * 4, "optimizer_bytes": trainable * 8,
                 "activations_bytes": acts.total(gradient_checkpointing)}
        return {"trainable_params": trainable, **parts, "total_bytes": sum(parts.values())}

    per_latent = _pixels_per_latent(family)
    image_tokens = families.get(family).image_tokens(height // per_latent, width // per_latent)
    return {
        "family": family,
        "config": config,
        "source": source,
        **counts,
        "weights_bytes": {"fp32": params * 4, "bf16": params * 2, "fp8": params},
        "setting": {"height": height, "width": width, "batch": batch, "image_tokens": image_tokens,
                    "text_tokens": text_tokens, "gradient_checkpointing": gradient_checkpointing,
                    "compute_dtype": "bf16"},
        "training": {
            "full": training(0, params, full_acts),
            "lora": {"rank": lora_rank,
                     "targets": preset if isinstance(preset, str) and preset in LORA_PRESETS else parse_targets(preset),
                     "modules": len(lora_names), **training(params, lora_params, lora_acts)},
        },
        "activations": {
            "method": "measured: saved_tensors_hooks on a meta-device forward (bf16)",
            "full": {"checkpointing_bytes": full_acts.total(True), "no_checkpointing_bytes": full_acts.total(False),
                     "largest_block_bytes": full_acts.largest_block()},
            "lora": {"checkpointing_bytes": lora_acts.total(True), "no_checkpointing_bytes": lora_acts.total(False),
                     "largest_block_bytes": lora_acts.largest_block()},
            "math_attention_extra_bytes": math_acts.total(gradient_checkpointing) - full_acts.total(gradient_checkpointing),
        },
        "assumptions": ASSUMPTIONS,
    }


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _training_line(t: dict) -> str:
    return (f"{_size(t['total_bytes'])} = weights {_size(t['weights_bytes'])} + bf16 copies {_size(t['bf16_copies_bytes'])}"
            f" + gradients {_size(t['gradients_bytes'])} + AdamW {_size(t['optimizer_bytes'])}"
            f" + activations {_size(t['activations_bytes'])}")


def summary_lines(report: dict) -> dict[str, str]:
    """The report as short human-readable lines (the CLI's text output, the ComfyUI node's text)."""
    s, per_block = report["setting"], report["per_block"]
    blocks = (f"{len(per_block)} x {per_block[0]:,}" if per_block and len(set(per_block)) == 1
              else f"{len(per_block)} blocks {report['parts']['blocks']:,}")
    lora, acts = report["training"]["lora"], report["activations"]
    targets = lora["targets"] if isinstance(lora["targets"], str) else ",".join(lora["targets"])
    return {
        "model": f"{report['family']} ({report['source']})",
        "params": f"{report['params']:,} ({_count(report['params'])}): embedders {report['parts']['embedders']:,}, "
                  f"blocks {blocks}, head {report['parts']['head']:,}",
        "weights": " | ".join(f"{k} {_size(v)}" for k, v in report["weights_bytes"].items()),
        "setting": f"{s['width']}x{s['height']}, batch {s['batch']}, {s['image_tokens']} image + {s['text_tokens']} "
                   f"text tokens, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
        "full training": _training_line(report["training"]["full"]),
        "lora training": f"rank {lora['rank']} on {lora['modules']} layers ({targets}), {lora['trainable_params']:,} "
                         f"params: {_training_line(lora)}",
        "activations": f"full: {_size(acts['full']['checkpointing_bytes'])} with checkpointing, "
                       f"{_size(acts['full']['no_checkpointing_bytes'])} without; largest block "
                       f"{_size(acts['full']['largest_block_bytes'])}; math-path attention would add "
                       f"{_size(acts['math_attention_extra_bytes'])}",
        "assumptions": " ".join(report["assumptions"]),
    }
