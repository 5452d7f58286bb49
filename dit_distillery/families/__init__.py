"""The DiT families, in one place: one module per family (`qwen_image`, `aaadit`, ...), this registry, and the
protocol they meet (`base.Family`).

    from dit_distillery import families
    families.get("qwen_image")          # the family object (raises a DistilleryError naming the known ones)
    families.all()                      # every family, by name
    families.of_model(dit)              # the family of a model (peft / DDP / torch.compile wrappers unwrapped)
    families.detect(spec)               # (name, config, source) of a path, TensorSource, model, config or preset

The registry finds family modules by itself: every module of this package except `base` that defines `FAMILY`.
Adding a family is one module here plus its tests; no other file names a family.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from pathlib import Path

from ..errors import DistilleryError
from .base import BlockGroup, Dims, Family, WidthLayout

__all__ = ["Family", "BlockGroup", "Dims", "WidthLayout", "get", "all", "names", "of_model", "detect", "presets",
           "lora_presets", "by_class_name"]

_REGISTRY: dict[str, Family] | None = None


def _registry() -> dict[str, Family]:
    global _REGISTRY
    if _REGISTRY is None:
        found = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base" or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            family = getattr(module, "FAMILY", None)
            if isinstance(family, Family):
                if family.name in found:
                    raise TypeError(f"two family modules are named {family.name!r}")
                found[family.name] = family.check()
        _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def all() -> tuple[Family, ...]:  # noqa: A001 (the registry's own `all`, as the package documents)
    """Every registered family, ordered by name."""
    return tuple(_registry().values())


def names() -> tuple[str, ...]:
    return tuple(_registry())


def get(name, field: str = "family") -> Family:
    """The family called `name` (a Family passes through); an unknown name is a DistilleryError naming `field`."""
    if isinstance(name, Family):
        return name
    try:
        return _registry()[name]
    except (KeyError, TypeError):
        raise DistilleryError(field, name, "unknown DiT family.", f"use one of {sorted(_registry())}.") from None


def of_model(model) -> Family:
    """The family of a model instance (the bare model inside peft / DDP / torch.compile wrappers)."""
    from ..velocity import base_model

    bare = base_model(model)
    for family in all():
        if isinstance(bare, _model_class(family)):
            return family
    raise DistilleryError("model", type(bare).__name__, "not a DiT family we know.",
                          f"use a {' or '.join(f.title for f in all())} DiT.")


def by_class_name(class_name: str) -> Family | None:
    """The family whose model class is called `class_name` (a diffusers config.json's `_class_name`)."""
    for family in all():
        if _model_class(family).__name__ == class_name:
            return family
    return None


_CLASSES: dict[str, type] = {}


def _model_class(family: Family) -> type:
    """`family.model_class()`, looked up once (`of_model` runs at every DiT call)."""
    cls = _CLASSES.get(family.name)
    if cls is None:
        cls = _CLASSES[family.name] = family.model_class()
    return cls


def presets() -> dict[str, tuple[str, dict]]:
    """Every family's named configs: preset name -> (family name, config)."""
    return {preset: (family.name, config) for family in all() for preset, config in family.presets().items()}


def lora_presets() -> dict[str, list[str]]:
    """Every family's LoRA target presets: preset name -> module-name suffixes."""
    return {preset: list(targets) for family in all() for preset, targets in family.lora_presets.items()}


# ----------------------------------------------------------------------------------------------------------
# The one resolver: "path, file, config or preset -> family"

def detect(spec, field: str = "model") -> tuple[str, dict, str]:
    """(family name, config, source description) of:

    * a model instance (wrappers unwrapped) or a (family, config) pair;
    * a config dict: ours (`{"family", "config"}`), a diffusers config.json's content (`_class_name`), or bare
      constructor arguments that only one family's model takes;
    * a `formats.TensorSource` (our metadata when present, else the family whose signature keys it holds);
    * a preset name (`presets()`), a config JSON file, a diffusers folder (its config.json, read exactly, heads
      included, without touching the weights), or a safetensors file / sharded folder (only its header is read).
    """
    from ..formats import TensorSource

    if isinstance(spec, TensorSource):
        family, config = _detect_tensors(spec)
        return family, config, str(spec.path)
    if _is_module(spec):
        from ..velocity import base_model

        from ..models.registry import model_config

        bare = base_model(spec)
        return of_model(bare).name, model_config(bare), type(bare).__name__
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        return get(spec[0], field).name, dict(spec[1]), f"{spec[0]} config"
    if isinstance(spec, dict):
        return (*_detect_config(spec, field, "config"), "config")
    if not isinstance(spec, (str, os.PathLike)):
        raise DistilleryError(field, type(spec).__name__, "not a model, config, path or preset name.",
                              f"give a path or one of {sorted(presets())}.")
    path = Path(spec)
    preset = str(spec).strip().lower().replace("_", "-")
    known = presets()
    if preset in known and not path.exists():
        family, config = known[preset]
        return family, dict(config), f"preset {preset}"
    if path.is_file() and path.suffix == ".json" and not path.name.endswith(".index.json"):
        return (*_detect_config(_read_json(path, field), field, str(path)), str(path))
    if path.is_dir():
        for candidate in (path / "config.json", path / "transformer" / "config.json"):
            if candidate.is_file():  # exact config (head count included) without touching the weights
                return (*_detect_config(_read_json(candidate, field), field, str(candidate)), str(path))
    if path.exists():
        with TensorSource(path, field) as src:
            family, config = _detect_tensors(src)
        return family, config, str(path)
    raise DistilleryError(field, str(spec), "no such file or folder, and not a preset name.",
                          f"give a .safetensors file, a diffusers folder, a config JSON, or one of {sorted(known)}.")


def constructor_keys(family) -> set[str]:
    """The config keys a family's model class takes."""
    import inspect

    params = inspect.signature(get(family).model_class().__init__).parameters
    return {k for k in params if k != "self"}


def _is_module(value) -> bool:
    import sys

    torch = sys.modules.get("torch")  # a model can only exist if torch is loaded
    return torch is not None and isinstance(value, torch.nn.Module)


def _read_json(path: Path, field: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DistilleryError(field, str(path), f"unreadable JSON ({exc}).", "give a valid config JSON file.") from exc


def _detect_config(raw, field: str, where: str) -> tuple[str, dict]:
    """(family, config) from a diffusers config.json, our {"family", "config"} form, or bare constructor args."""
    if not isinstance(raw, dict):
        raise DistilleryError(field, where, "the JSON is not an object.", "give a model config JSON object.")
    if isinstance(raw.get("config"), dict) and raw.get("family") in _registry():
        return raw["family"], dict(raw["config"])
    class_name = raw.get("_class_name")
    family = by_class_name(class_name) if class_name else None
    args = {k: v for k, v in raw.items() if not k.startswith("_")}
    if family is None:
        if class_name:
            raise DistilleryError(field, where, f"holds a {class_name}, not a DiT this pack knows.",
                                  f"use one of {sorted(f.model_class().__name__ for f in all())}.")
        fitting = [f for f in all() if args and set(args) <= constructor_keys(f)]
        if len(fitting) > 1:  # several classes take these arguments: the one they describe most completely
            missing = {f.name: len(constructor_keys(f) - set(args)) for f in fitting}
            fitting = [f for f in fitting if missing[f.name] == min(missing.values())]
        if len(fitting) != 1:
            classes = " or ".join(f.model_class().__name__ for f in all())
            raise DistilleryError(field, where, "cannot tell which DiT family this config describes.",
                                  f'add "_class_name" ({classes}) or use '
                                  f'{{"family": "{"|".join(names())}", "config": {{...}}}}.')
        family = fitting[0]
    # diffusers configs carry keys of older versions (Qwen-Image's pooled_projection_dim): keep the constructor's.
    keys = constructor_keys(family)
    return family.name, {k: v for k, v in args.items() if k in keys}


def _detect_tensors(src) -> tuple[str, dict]:
    """(family, config) of a stored DiT: from our metadata when present, else from its keys and shapes."""
    from ..formats import decode_metadata_value
    from ..models.registry import META_CONFIG, META_FAMILY

    family = src.metadata.get(META_FAMILY)
    config = decode_metadata_value(src.metadata.get(META_CONFIG))
    if family in _registry() and isinstance(config, dict):
        return family, config
    from ..fp8 import model_keys

    keys = model_keys(src.keys())  # without a scaled fp8 file's scales and markers
    for fam in all():
        if fam.is_family(keys):
            return fam.name, fam.config_from_shapes(src.shape, keys)
    raise DistilleryError(src.field, str(src.path), "not a DiT this pack knows (no "
                          f"{' nor '.join(f.title for f in all())} keys).",
                          f"choose a {', '.join(f.title for f in all())} diffusion model, or a file saved by DiT "
                          "Distillery.")
