"""LoRA: add adapters with peft, save them in a file stock ComfyUI and diffusers load, read LoRA files back, merge.

File format (what `save_lora` writes): the module names stock ComfyUI maps for the model's family
(`Family.lora_to_comfy`; bare diffusers names for Qwen-Image), peft's suffixes, and one `.alpha` scalar per
module, e.g. `transformer_blocks.0.attn.to_q.lora_A.weight` [r, in], `...lora_B.weight` [out, r],
`transformer_blocks.0.attn.to_q.alpha` (= lora_alpha). ComfyUI's LoRA loader accepts exactly these names for
Qwen-Image and scales by alpha/rank like peft; without the `.alpha` tensor it would use scale 1 and a LoRA trained
with alpha != rank would come out at the wrong strength (comfyui-facts.md A5). diffusers' Qwen-Image LoRA loader
folds the same `.alpha` into the weights. Adapter weights are kept in fp32 whatever the base dtype (DiffSynth
casts them to bf16, losing small updates).

Reading (`read_lora`) also accepts DiffSynth's files (`lora_A.default.weight`, no alpha: alpha = rank),
`diffusion_model.`/`transformer.` prefixes and kohya-style `lora_down`/`lora_up` names; merging or loading into a
model first maps the family's ComfyUI names back to ours (`Family.lora_from_comfy`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DistilleryError
from .formats import TensorSource, save_safetensors

ADAPTER = "default"
_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.")
_SUFFIXES = {  # file suffix -> which matrix
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora_A.default.weight": "A", ".lora_B.default.weight": "B",
    ".lora_down.weight": "A", ".lora_up.weight": "B",
    ".alpha": "alpha",
}


@dataclass
class LoraModule:
    down: torch.Tensor  # A: [rank, in]
    up: torch.Tensor  # B: [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """The weight update B·A·alpha/rank, computed in fp32."""
        return (self.up.float() @ self.down.float() * self.scale).to(dtype)


@dataclass
class LoraWeights:
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None  # the file it was read from, named in errors

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())


# ----------------------------------------------------------------------------------------------------------
# Adding and collecting adapters

def add_lora(model: torch.nn.Module, targets, rank: int = 32, alpha: float | None = None,
             dropout: float = 0.0) -> list[str]:
    """Inject a trainable LoRA (peft) into `model` in place; returns the adapted module names.

    `targets` is a preset name or module-name suffixes (see `lora_presets`). Base weights are frozen; the
    adapters are fp32. alpha defaults to rank (scale 1, DiffSynth's choice).
    """
    from peft import LoraConfig, inject_adapter_in_model

    from .lora_presets import resolve_targets

    if rank < 1:
        raise DistilleryError("lora_rank", rank, "must be at least 1.", "use e.g. 16 or 32.")
    names = resolve_targets(model, targets)
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=dropout,
                        target_modules=names, init_lora_weights=True)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return names


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module name -> peft LoRA layer, for every adapted module of `model`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_weights_of(model: torch.nn.Module) -> LoraWeights:
    modules = {}
    for name, layer in lora_layers(model).items():
        modules[name] = LoraModule(layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                                   layer.lora_B[ADAPTER].weight.detach().float().cpu().clone(),
                                   float(layer.lora_alpha[ADAPTER]))
    if not modules:
        raise DistilleryError("model", type(model).__name__, "has no LoRA adapters to save.",
                              "train with mode 'lora', or save full weights instead.")
    return LoraWeights(modules)


def lora_state_dict(weights: LoraWeights, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of our file format (see the module docstring)."""
    sd = {}
    for name, m in weights.modules.items():
        sd[f"{prefix}{name}.lora_A.weight"] = m.down.float().contiguous()
        sd[f"{prefix}{name}.lora_B.weight"] = m.up.float().contiguous()
        sd[f"{prefix}{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return sd


def _family(model: torch.nn.Module):
    """The model's DiT family, or None for a model of no family (LoRA works on any module)."""
    from . import families

    try:
        return families.of_model(model)
    except DistilleryError:
        return None


def _our_names(model: torch.nn.Module, weights: LoraWeights) -> LoraWeights:
    """`weights` under the model's own module names (a file may use the names ComfyUI gives its family)."""
    family = _family(model)
    if family is None:
        return weights
    return LoraWeights(family.lora_from_comfy(dict(weights.modules)), weights.metadata, weights.path)


def save_lora(model_or_weights, path: str | os.PathLike, metadata: dict | None = None,
              dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    """Save a LoRA atomically in the ComfyUI/diffusers-compatible format, settings in the metadata. Given a model,
    its modules are named as stock ComfyUI maps them for its family (`Family.lora_to_comfy`)."""
    if isinstance(model_or_weights, LoraWeights):
        weights = model_or_weights
    else:
        weights = lora_weights_of(model_or_weights)
        family = _family(model_or_weights)
        if family is not None:
            weights = LoraWeights(family.lora_to_comfy(dict(weights.modules)), weights.metadata, weights.path)
    sd = {k: (v.to(dtype) if not k.endswith(".alpha") else v) for k, v in lora_state_dict(weights, prefix).items()}
    meta = {"format": "pt", "dit_distillery.kind": "lora", "dit_distillery.rank": weights.rank}
    meta.update(metadata or {})
    return save_safetensors(sd, path, meta)


# ----------------------------------------------------------------------------------------------------------
# Reading LoRA files

def read_lora(path: str | os.PathLike, field: str = "lora") -> LoraWeights:
    """Read a LoRA file (ours, DiffSynth's, diffusers', kohya-named) into per-module (A, B, alpha).

    A tensor holding NaN/inf is refused by name as it is read (`weights_check`)."""
    from .weights_check import check_finite

    with TensorSource(path, field, prefixes=_PREFIXES) as src:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key in src.keys():
            for suffix, which in _SUFFIXES.items():
                if key.endswith(suffix):
                    parts.setdefault(key[: -len(suffix)], {})[which] = check_finite(key, src.get(key), field=field,
                                                                                      path=path)
                    break
        metadata = dict(src.metadata)
    modules = {}
    for name, p in parts.items():
        if "A" not in p or "B" not in p:
            raise DistilleryError(field, str(path), f"module {name} has only {sorted(p)} of its LoRA pair.",
                                  "the file is incomplete; save it again.")
        if p["A"].shape[0] != p["B"].shape[1]:
            raise DistilleryError(field, str(path), f"module {name}: rank mismatch {tuple(p['A'].shape)} vs "
                                  f"{tuple(p['B'].shape)}.", "the file is corrupt; save it again.")
        alpha = float(p["alpha"].item()) if "alpha" in p else float(p["A"].shape[0])
        modules[name] = LoraModule(p["A"].float(), p["B"].float(), alpha)
    if not modules:
        raise DistilleryError(field, str(path), "no LoRA weights found (expected *.lora_A.weight / *.lora_B.weight).",
                              "choose a LoRA file.")
    return LoraWeights(modules, metadata, str(path))


def _check_targets(model: torch.nn.Module, weights: LoraWeights, field: str) -> dict[str, torch.nn.Module]:
    """Every module the LoRA adapts exists here with the LoRA's (out, in) shape, or a DistilleryError that names
    the file, the first module that does not fit (both shapes), how many do not, and what the LoRA was made for."""
    from .weights_check import check_shapes

    named = dict(model.named_modules())
    expected = {}
    for name in weights.modules:
        w = getattr(getattr(named.get(name), "base_layer", named.get(name)), "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            expected[name] = tuple(w.shape)
    found = {n: (m.up.shape[0], m.down.shape[1]) for n, m in weights.modules.items()}
    check_shapes(expected, found, field=field, path=weights.path or f"LoRA of {len(found)} modules",
                 what="model", fix=_mismatch_fix(model, expected, found), require_all=False,
                 unit="LoRA modules")
    return named


def _mismatch_fix(model: torch.nn.Module, expected: dict, found: dict) -> str:
    """Say what the LoRA was made for when its shapes tell: a layer's dimension equal to this model's width
    that the LoRA has at another size is the width of the model it was trained on."""
    config = dict(getattr(model, "config", None) or {})
    width = config.get("width") or config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    for name in found:
        if name in expected and found[name] != expected[name]:
            for have, want in zip(found[name], expected[name]):
                if want == width and have != want:
                    return (f"this LoRA was trained for a model with width {have} but the model has {width}: train "
                            "it on this model, or load it on the base it was made for.")
    if any(n not in expected for n in found):
        return ("this LoRA adapts layers this model does not have (more blocks, or another architecture): train it "
                "on this model, or load it on the base it was made for.")
    return "this LoRA was trained for another model: train it on this model, or load it on the base it was made for."


def _base_weight(module: torch.nn.Module) -> torch.Tensor:
    base = getattr(module, "base_layer", module)
    return base.weight


def merge_lora(model: torch.nn.Module, weights: LoraWeights, strength: float = 1.0, field: str = "lora") -> int:
    """W += strength·alpha/rank·B·A in place (fp32 maths, stored back in W's dtype). Returns modules merged.

    Callers that must not change their input (ComfyUI nodes) merge into a copy.
    """
    weights = _our_names(model, weights)
    named = _check_targets(model, weights, field)
    from . import fp8

    with torch.no_grad():
        for name, m in weights.modules.items():
            base = getattr(named[name], "base_layer", named[name])
            w = base.weight
            if fp8.is_fp8_linear(base):  # an fp8 weight with its scale: merged into what it computes with
                fp8.update_weight(base, fp8.dequantised_weight(base) + strength * m.delta().to(w.device))
                continue
            w.copy_((w.float() + strength * m.delta().to(w.device)).to(w.dtype))
    return len(weights.modules)


def load_lora_into(model: torch.nn.Module, weights: LoraWeights, field: str = "lora") -> list[str]:
    """Inject adapters shaped like `weights` and copy its values in (to continue training a LoRA)."""
    from peft import LoraConfig, inject_adapter_in_model

    weights = _our_names(model, weights)
    named = _check_targets(model, weights, field)
    ranks = {m.rank for m in weights.modules.values()}
    alphas = {m.alpha for m in weights.modules.values()}
    rank_pattern = {n: m.rank for n, m in weights.modules.items()} if len(ranks) > 1 else {}
    alpha_pattern = {n: m.alpha for n, m in weights.modules.items()} if len(alphas) > 1 else {}
    config = LoraConfig(r=max(ranks), lora_alpha=next(iter(alphas)), target_modules=sorted(weights.modules),
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if not lora_layers(model):
        for p in model.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    named = dict(model.named_modules())
    with torch.no_grad():
        for name, m in weights.modules.items():
            layer = named[name]
            layer.lora_A[ADAPTER].weight.data = m.down.float().to(_base_weight(layer).device).clone()
            layer.lora_B[ADAPTER].weight.data = m.up.float().to(_base_weight(layer).device).clone()
            layer.lora_A[ADAPTER].weight.requires_grad_(True)
            layer.lora_B[ADAPTER].weight.requires_grad_(True)
            layer.lora_alpha[ADAPTER] = m.alpha
            layer.scaling[ADAPTER] = m.alpha / m.rank
    return sorted(weights.modules)


def lora_summary(weights: LoraWeights) -> dict:
    params = sum(m.down.numel() + m.up.numel() for m in weights.modules.values())
    settings = weights.metadata.get("dit_distillery.training")
    return {"modules": len(weights.modules), "rank": weights.rank, "params": params,
            "training": json.loads(settings) if settings else None}
