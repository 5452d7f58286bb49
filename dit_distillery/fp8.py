"""fp8 weight storage: Linear weights kept in float8 (one byte per value) and computed in a wider dtype.

Where fp8 weights come from:
* plain fp8 files (ComfyUI's `qwen_image_fp8_e4m3fn.safetensors`): weights stored as float8, no scale;
* ComfyUI's "scaled fp8" files: `<layer>.weight` in fp8 with one float32 scale, in either of ComfyUI's layouts
  (`read_layout`): the original one (a `scaled_fp8` marker tensor, `<layer>.scale_weight`, optional
  `<layer>.scale_input`; e.g. `qwen_2.5_vl_7b_fp8_scaled.safetensors`) or the newer "comfy_quant" one
  (`<layer>.weight_scale`, each quantised layer marked by `<layer>.comfy_quant` or the `_quantization_metadata`
  header entry, optional `<layer>.input_scale`). The weight is `weight.to(compute) * scale`.
* `store_in_fp8`: a frozen bf16 base quantised in memory for training (one scale per tensor, as ComfyUI's).

How they run: every such nn.Linear gets an `Fp8LinearHook`, registered in diffusers' hook registry under the name
of its layerwise casting (so `ModelMixin.dtype` reports the compute dtype, as for diffusers' own hook) and computing
`linear(x, weight.to(compute) * scale, bias)`, what ComfyUI's scaled-fp8 ops compute when fp8 matrix
multiplication is off. diffusers' own `LayerwiseCastingHook` is not used for Linears, by hand for three reasons:
it has no scale (diffusers has no scaled fp8 at all), it casts the whole module, bias included, to the storage
dtype (the files and `store_in_fp8` keep biases as they are), and under autograd it leaves the compute-dtype copy
of every weight alive until the backward pass; `Fp8LinearHook` saves the fp8 weight and rebuilds the copy in the
backward pass, so a frozen fp8 base costs one byte per weight during training too. Modules diffusers names as
precision-sensitive for its layerwise casting (`_skip_layerwise_casting_patterns`, e.g. Z-Image's timestep
embedder, which casts its input to its weight's dtype) and every non-Linear module are given compute-dtype
weights instead (dequantised on load).

fp8-stored weights are frozen (fp8 has no useful gradients); biases, norms, embeddings and LoRA adapters keep
their dtype. `fp8="dequantise"` on the loaders gives plain compute-dtype weights instead (more memory).
"""

from __future__ import annotations

import json
import re
from typing import Iterable, NamedTuple

import torch

from .errors import DistilleryError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
MODES = ("keep", "dequantise")
HOOK_NAME = "layerwise_casting"  # diffusers' name: `get_parameter_dtype` reads `compute_dtype` from it
FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}

MARKER = "scaled_fp8"
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's original / comfy_quant names
_INPUT_SUFFIXES = (".scale_input", ".input_scale")  # activation scales: only fp8 matmuls use them, we do not
_QUANT_META = "_quantization_metadata"
_CONF = ".comfy_quant"


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def check_mode(mode: str, field: str = "fp8") -> str:
    if mode not in MODES:
        raise DistilleryError(field, mode, "unknown fp8 weight handling.",
                              "use 'keep' (fp8 storage, computed in the model dtype) or 'dequantise' (plain weights).")
    return mode


def is_quant_key(key: str) -> bool:
    """A tensor that describes quantisation (scales, markers) rather than being a model weight."""
    return key == MARKER or key.endswith(_SCALE_SUFFIXES + _INPUT_SUFFIXES + (_CONF, ".weight_scale_2"))


def model_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if not is_quant_key(k)]


# ----------------------------------------------------------------------------------------------------------
# Reading ComfyUI's layouts

class Layout(NamedTuple):
    """What `read_layout` finds in a file: the model tensors' names, the scales by weight name, and whether the
    file is a scaled one (then every fp8 Linear weight must have its scale)."""

    keys: list[str]
    scales: dict[str, torch.Tensor]
    scaled: bool


def _conf(raw, where: str, field: str, path) -> dict:
    try:
        conf = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError as exc:
        raise DistilleryError(field, str(path), f"unreadable quantisation entry for {where!r} ({exc}).",
                              "the file is damaged: download it again.") from exc
    return {"format": conf} if isinstance(conf, str) else dict(conf or {})


def read_layout(src, field: str = "source") -> Layout:
    """The quantisation of an open `formats.TensorSource` (scales are read, weights are not).

    Refuses, naming the file: quantisation formats other than per-tensor float8 (nvfp4, mxfp8, int8: ComfyUI
    reads them with its comfy-kitchen kernels, we do not), a scale whose weight is missing, and block-wise scales."""
    keys = src.keys()
    confs: dict[str, dict] = {}
    meta = src.metadata.get(_QUANT_META)
    if meta:
        layers = _conf(meta, _QUANT_META, field, src.path).get("layers", {})
        confs.update({layer: _conf(c, layer, field, src.path) for layer, c in layers.items()})
    for k in keys:
        if k.endswith(_CONF):
            raw = bytes(src.get(k).to(torch.uint8).tolist())
            confs[k[: -len(_CONF)]] = _conf(raw, k, field, src.path)
    for layer, conf in confs.items():
        if conf.get("format") not in FORMATS:
            raise DistilleryError(field, str(src.path), f"layer {layer!r} is quantised as {conf.get('format')!r}, "
                                  "a ComfyUI format this pack does not read (only per-tensor float8).",
                                  "use the model's bf16 or fp8 (float8_e4m3fn / fp8_scaled) file.")
    scales = {}
    for k in keys:
        if not k.endswith(_SCALE_SUFFIXES):
            continue
        weight = k.rsplit(".", 1)[0] + ".weight"
        if weight not in src:
            raise DistilleryError(field, str(src.path), f"holds the scale {k!r} but not its weight {weight!r}.",
                                  "the file is incomplete or was edited: download it again.")
        scale = src.get(k).float()
        rows = src.shape(weight)[0] if src.shape(weight) else 1
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() == rows:  # one scale per output row (broadcast over the row)
            scale = scale.reshape(rows, *([1] * (len(src.shape(weight)) - 1)))
        else:
            raise DistilleryError(field, str(src.path), f"the scale {k!r} has {scale.numel()} values: block-wise "
                                  "scales are not read (one per tensor or per row only).",
                                  "use the model's bf16 or fp8 (float8_e4m3fn / fp8_scaled) file.")
        if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
            raise DistilleryError(field, str(src.path), f"the scale {k!r} is zero, NaN or infinite.",
                                  "the file is damaged: download it again.")
        scales[weight] = scale
    return Layout(model_keys(keys), scales, bool(scales) or MARKER in src or bool(confs))


def rename_scales(scales: dict[str, torch.Tensor], shapes: dict[str, tuple], rename) -> dict[str, torch.Tensor]:
    """Scales under the names a key map (`Family.from_comfy`) gives their weights, following the map's row
    operations: each scale goes through as a [rows, 1] column, so a fused qkv weight's scale reaches q, k and v,
    and row swaps (FLUX.2's final modulation) move it with the rows."""
    if not scales:
        return {}
    columns = {k: s.float().reshape(-1, 1).expand(shapes[k][0], 1).contiguous() if s.numel() == 1
               else s.float().reshape(-1, 1) for k, s in scales.items()}
    out = {}
    for k, col in rename(columns).items():
        col = col.reshape(-1)
        out[k] = col[0].clone() if bool((col == col[0]).all()) else col.reshape(-1, 1)
    return out


# ----------------------------------------------------------------------------------------------------------
# Running fp8 Linears

def _dequant(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    return w if scale is None else w * scale.to(device=w.device, dtype=dtype)


class _Fp8Linear(torch.autograd.Function):
    """linear(x, weight.to(x.dtype) * scale): saves the fp8 weight for the backward pass, not its wide copy."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, _dequant(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x = grad.matmul(_dequant(weight, scale, grad.dtype)) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias


def _hook_class():
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class Fp8LinearHook(LayerwiseCastingHook):
        """diffusers' layerwise casting for one nn.Linear whose weight is stored in fp8 (with its `weight_scale`
        buffer when the source had one): nothing is cast in place, the forward computes in `compute_dtype`."""

        def __init__(self, compute_dtype: torch.dtype, storage_dtype: torch.dtype):
            super().__init__(storage_dtype, compute_dtype, non_blocking=False)

        def initialize_hook(self, module):
            return module

        def pre_forward(self, module, *args, **kwargs):
            return args, kwargs

        def post_forward(self, module, output):
            return output

        def new_forward(self, module, x, *args, **kwargs):
            if module.weight.requires_grad:  # it would get no gradient: say so instead of training nothing
                raise DistilleryError("dit", "fp8 weights", "an fp8-stored Linear weight was set to train; fp8 "
                                      "storage is for frozen weights (a LoRA's base).",
                                      "load the model with fp8='dequantise' (CLI: --fp8 dequantise) to train all of "
                                      "its weights, or train a LoRA on it.")
            # a model cast as a whole afterwards (`.to(dtype=...)`) computes in its new dtype, scale still applied
            dtype = self.compute_dtype if module.weight.dtype in FP8_DTYPES else module.weight.dtype
            bias = None if module.bias is None else module.bias.to(dtype)
            return _Fp8Linear.apply(x.to(dtype), module.weight, getattr(module, "weight_scale", None), bias)

    return Fp8LinearHook


_HOOK = None
_COPYABLE: dict[type, type] = {}


def _deepcopy_fp8_linear(self, memo):
    """A deep copy that computes with its own weight. diffusers' hook registry replaces `forward` by a closure over
    this module, which copy.deepcopy cannot follow (functions are copied by reference): a plain copy would run
    the original's hook on the original's weight (a merged LoRA or a block swap of the copy silently ignored).
    The copy is made without the hook and attaches its own (the scale buffer comes with it)."""
    import copy

    hidden = {k: self.__dict__.pop(k) for k in ("forward", "_diffusers_hook") if k in self.__dict__}
    try:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
    finally:
        self.__dict__.update(hidden)
    attach(new, new.compute_dtype)
    return new


def _copyable(module: torch.nn.Module) -> None:
    """Give an fp8 Linear the deep copy of `_deepcopy_fp8_linear` (a subclass of its class, made once per class)."""
    cls = type(module)
    if "__deepcopy__" in cls.__dict__:
        return
    if cls not in _COPYABLE:
        _COPYABLE[cls] = type(cls.__name__, (cls,), {"__deepcopy__": _deepcopy_fp8_linear,
                                                    "__module__": cls.__module__})
    module.__class__ = _COPYABLE[cls]


def attach(module: torch.nn.Linear, compute_dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
    """Run an nn.Linear whose weight is fp8 (frozen) in `compute_dtype`, with its per-tensor (or per-row) scale."""
    global _HOOK
    from diffusers.hooks import HookRegistry

    if _HOOK is None:
        _HOOK = _hook_class()
    module.weight.requires_grad_(False)
    if scale is not None:
        module.register_buffer("weight_scale", scale.detach().float().to(module.weight.device))
    module.compute_dtype = compute_dtype  # peft reads it (as bitsandbytes' layers give it) for its adapters' dtype
    _copyable(module)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(_HOOK(compute_dtype, module.weight.dtype),
                                                                     HOOK_NAME)


def is_fp8_linear(module: torch.nn.Module) -> bool:
    hooks = getattr(module, "_diffusers_hook", None)
    return _HOOK is not None and hooks is not None and isinstance(hooks.get_hook(HOOK_NAME), _HOOK)


def compute_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype a model with fp8-stored Linears computes in (None: it has none)."""
    for m in module.modules():
        if is_fp8_linear(m):
            return m.compute_dtype
    return None


def skip_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """The module-name patterns diffusers keeps out of layerwise casting for this model (its class's own list, else
    diffusers' default), plus norms: these stay in the compute dtype."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = getattr(model, "_skip_layerwise_casting_patterns", None)
    return tuple(own if own is not None else DEFAULT_SKIP_MODULES_PATTERN) + ("norm",)


def _skipped(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], *,
                 dtype: torch.dtype | None, mode: str = "keep", scaled: bool = False, field: str = "model",
                 path=None) -> torch.nn.Module:
    """Load `state` (already checked against the model's shapes) into `model` (built with empty weights), keeping
    fp8 Linear weights in fp8 (`mode` "keep") or dequantising them ("dequantise"); every other floating tensor
    goes to `dtype` (None: fp8 models compute in bf16 and the rest keep the file's dtype).

    A scaled file's fp8 Linear weight without its scale is refused by name: computing it unscaled would give wrong
    outputs silently."""
    check_mode(mode, "fp8")
    has_fp8 = any(is_fp8(v) for v in state.values())
    compute = dtype if dtype is not None and dtype not in FP8_DTYPES else (torch.bfloat16 if has_fp8 else None)
    patterns = skip_patterns(model)
    linears = {f"{n}.weight": (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if scaled:
        unscaled = [k for k, v in state.items() if k in linears and is_fp8(v) and k not in scales]
        if unscaled:
            raise DistilleryError(field, str(path), f"is a scaled fp8 file but {len(unscaled)} fp8 weights have no "
                                  f"scale (first {unscaled[0]!r}): they would compute wrongly.",
                                  "the file is incomplete or was edited: download it again, or use the bf16 file.")
    out, kept = {}, []
    for k, v in state.items():
        scale = scales.get(k)
        if is_fp8(v) and mode == "keep" and k in linears and not _skipped(linears[k][0], patterns):
            out[k] = v
            kept.append(k)
        elif is_fp8(v) or scale is not None:  # dequantised: the compute dtype (bf16 when none is asked)
            out[k] = _dequant(v.float(), scale, torch.float32).to(compute or v.dtype)
        elif v.is_floating_point() and compute is not None:
            out[k] = v.to(compute)
        else:
            out[k] = v
    model.load_state_dict(out, assign=True, strict=True)
    for k in kept:
        attach(linears[k][1], compute, scales.get(k))
    return model


def dequantised_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every scaled fp8 Linear as a plain weight (`dtype`, else its compute dtype) and
    no `weight_scale` entries: what a file without scale support (diffusers, ComfyUI's plain loaders) must get.
    Plain fp8 weights without a scale stay fp8 unless `dtype` is given."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if is_fp8_linear(m):
            prefix = f"{name}." if name else ""
            scale = state.pop(prefix + "weight_scale", None)
            if scale is not None or dtype is not None:
                state[prefix + "weight"] = _dequant(m.weight.float(), scale, torch.float32).to(dtype or m.compute_dtype)
    return state


def update_weight(module: torch.nn.Module, wide: torch.Tensor) -> None:
    """Give an fp8 Linear (`is_fp8_linear`) a new value `wide` (its dequantised weight, e.g. with a LoRA merged),
    in place: scaled weights get their scale recomputed (per tensor or per row, as it was) so the new values are
    stored as exactly as fp8 allows; a weight without a scale is cast as it is."""
    w, scale = module.weight, getattr(module, "weight_scale", None)
    with torch.no_grad():
        if scale is None:
            w.copy_(wide.to(w.dtype))
            return
        fmax = torch.finfo(w.dtype).max
        wide = wide.float()
        amax = wide.abs().amax() if scale.numel() == 1 else wide.abs().reshape(wide.shape[0], -1).amax(1)
        new = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).reshape(scale.shape)
        w.copy_((wide / new.reshape(-1, *([1] * (wide.dim() - 1))) if new.numel() > 1 else wide / new)
                .clamp(-fmax, fmax).to(w.dtype))
        scale.copy_(new)


def dequantised_weight(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an fp8 Linear computes with (`weight * weight_scale`), in `dtype`."""
    return _dequant(module.weight.float(), getattr(module, "weight_scale", None), torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Quantising a frozen base for training

def store_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype, skip: Iterable[str] = ()) -> dict:
    """Store the frozen Linear weights of `module` in float8_e4m3fn with one float32 scale each (max|W| / 448, as
    ComfyUI's scaled files), computed in `compute_dtype`.

    Left alone: weights being trained (`requires_grad`), peft's LoRA layers (`lora_` in the name), modules matching
    `skip` or the model's layerwise-casting skip patterns (`skip_patterns`: norms, precision-sensitive embedders),
    and every non-Linear parameter (biases, norms, embeddings). Returns what was converted and the bytes saved."""
    patterns = skip_patterns(module) + tuple(skip)
    layers, before, after = 0, 0, 0
    for name, m in list(module.named_modules()):
        if not isinstance(m, torch.nn.Linear) or "lora_" in name or _skipped(name, patterns) or is_fp8_linear(m):
            continue
        w = m.weight
        if w.requires_grad or w.dtype in FP8_DTYPES or w.device.type == "meta":
            continue
        with torch.no_grad():
            wide = w.detach().float()
            amax = float(wide.abs().max()) if wide.numel() else 0.0
            scale = torch.tensor(amax / E4M3_MAX if amax > 0 else 1.0, dtype=torch.float32)
            q = (wide / scale.to(wide.device)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        before += w.numel() * w.element_size()
        after += q.numel() + 4
        m.weight = torch.nn.Parameter(q, requires_grad=False)
        attach(m, compute_dtype, scale)
        layers += 1
    return {"layers": layers, "bytes_before": before, "bytes_after": after}
