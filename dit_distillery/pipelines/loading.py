"""Build `TextToImagePipeline`s from disk, and save them.

Sources:
* a diffusers-layout folder (a local `Qwen/Qwen-Image`: `model_index.json`, `transformer/`, `text_encoder/`,
  `tokenizer/`, `vae/`, `scheduler/`), or one written by `save_pipeline` (the same layout; AAADiT pipelines and
  the pixel codec are described under the private `_dit_distillery` key, which diffusers ignores);
* single files, as ComfyUI users keep them, each replacing one component of a folder or given all together:
  the DiT (`models/diffusion_models`, read by `models.registry.load_dit`), the VAE (`models/vae`: diffusers keys,
  or the original Wan/LDM layouts converted with diffusers' own converters) and the text encoder
  (`models/text_encoders`: ComfyUI's files, bf16, fp8 or scaled fp8, built with transformers' own classes and
  the family's released config, `Family.text_encoder_from_shapes`; other transformers checkpoint files with their
  `config.json` folder), the tokenizer then being the one shipped with the pack (`text.bundled_tokenizer`);
* "default" (the demo's), "tiny" (= "tiny:aaadit") and "tiny:<family>": the built-in random pipelines (`tiny`,
  `Family.tiny_pipeline`).

Only safetensors are read (`use_safetensors=True` everywhere). Anything missing raises a DistilleryError naming it.
fp8 weights (DiT and text-encoder files) stay in fp8 and compute in the pipeline's dtype unless `fp8="dequantise"`
(`dit_distillery.fp8`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import families, schedule
from ..codecs import Codec, PixelCodec
from ..errors import DistilleryError
from ..formats import give_usual_permissions
from ..text import PromptEncoder, Qwen3PromptEncoder
from ..velocity import base_model
from .base import TextToImagePipeline

MODEL_INDEX = "model_index.json"
META_KEY = "_dit_distillery"  # leading underscore: diffusers' from_pretrained skips it
TINY_DEFAULT_FAMILY = "aaadit"  # what plain "tiny" builds (the first built-in, kept for saved jobs)


def builtin_names() -> tuple[str, ...]:
    """The built-in pipeline names: "tiny", "default" and "tiny:<family>" for every family."""
    return ("tiny", *(f"tiny:{name}" for name in families.names()), "default")


def source_family(source) -> str | None:
    """The DiT family a pipeline source (built-in name or diffusers folder) is made for; None when its
    model_index.json does not say (or cannot be read)."""
    source = str(source)
    if source in builtin_names():
        return TINY_DEFAULT_FAMILY if ":" not in source else source.split(":", 1)[1]
    try:
        index = json.loads((Path(source) / MODEL_INDEX).read_text())
    except (OSError, ValueError):
        return None
    return _index_family(index)


def _index_family(index: dict) -> str | None:
    """The family a model_index.json names: our own key, else its diffusers pipeline class."""
    named = index.get(META_KEY, {}).get("family")
    if named:
        return named
    return next((f.name for f in families.all() if f.pipeline_class == index.get("_class_name")), None)


# ----------------------------------------------------------------------------------------------------------
# Saving

def save_pipeline(pipe: TextToImagePipeline, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a diffusers-layout folder (all safetensors). Written beside the target, renamed into place whole."""
    import diffusers

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise DistilleryError("out", str(folder), "already exists and is not empty.", "choose a new folder or overwrite.")
    dit = base_model(pipe.dit)
    if any("lora_" in name for name, _ in dit.named_parameters()):
        raise DistilleryError("dit", type(dit).__name__, "holds LoRA adapters; a pipeline folder stores plain weights.",
                              "merge the LoRA (peft merge_and_unload) or save the LoRA file on its own.")
    encoder, codec = pipe.prompt_encoder, pipe.codec
    from ..fp8 import compute_dtype

    for what, module in (("dit", dit), ("text_encoder", encoder.text_encoder)):
        if compute_dtype(module) is not None:
            raise DistilleryError(what, type(module).__name__, "holds fp8-stored weights, which a diffusers folder "
                                  "cannot describe (no scales).",
                                  "load the pipeline with fp8='dequantise' (CLI: --fp8 dequantise) to save it.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        dit.save_pretrained(tmp / "transformer", safe_serialization=True)
        encoder.text_encoder.save_pretrained(tmp / "text_encoder")
        encoder.tokenizer.save_pretrained(tmp / "tokenizer")
        schedule.scheduler(pipe.template).save_pretrained(tmp / "scheduler")
        vae = getattr(codec, "vae", None)
        if vae is not None:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
        index = {
            "_class_name": pipe.family_spec.pipeline_class,
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", type(encoder.text_encoder).__name__],
            "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
            "transformer": [pipe.family_spec.transformer_library, type(dit).__name__],
            "vae": ["diffusers", type(vae).__name__] if vae is not None else [None, None],
            META_KEY: {
                "family": pipe.family, "template": pipe.template, "defaults": pipe.defaults,
                "codec": _codec_meta(codec), "prompt_encoder": _encoder_meta(encoder),
            },
        }
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        give_usual_permissions(tmp)  # mkdtemp's 0700 and safetensors' 0600 are for the temporary only
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_dir(tmp: Path, folder: Path) -> None:
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _codec_meta(codec: Codec) -> dict:
    if isinstance(codec, PixelCodec):
        return {"kind": "pixel", "patch": codec.patch}
    return {"kind": codec.kind}


def _encoder_meta(encoder: PromptEncoder) -> dict:
    meta = {"kind": encoder.kind, "max_length": encoder.max_length}
    if isinstance(encoder, Qwen3PromptEncoder):
        meta["hidden_layers"] = list(encoder.hidden_layers)
    return meta


# ----------------------------------------------------------------------------------------------------------
# Loading components

def _exists(path, field: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DistilleryError(field, str(path), "no such file or folder.", f"check the {field} path.")
    return path


def load_dit(path, *, dtype=None, device="cpu", field: str = "dit", fp8: str = "keep") -> torch.nn.Module:
    """A DiT from a diffusers `transformer/` folder (config.json) or any file/folder `registry.load_dit` reads
    (fp8 files as `fp8` says: "keep" or "dequantise")."""
    from ..models import registry

    path = _exists(path, field)
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        cls = families.get(families.detect(config, field)[0]).model_class()
        _check_folder_shapes(cls, path, field)
        model = cls.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
        from ..weights_check import check_finite

        for key, tensor in model.state_dict().items():
            check_finite(key, tensor, field=field, path=path)
        return model.to(device).eval()
    return registry.load_dit(path, dtype=dtype, device=device, field=field, fp8=fp8)


def _check_folder_shapes(cls, path: Path, field: str) -> None:
    """config.json against the weights' header (no data read), before diffusers' own `size mismatch` error."""
    from accelerate import init_empty_weights

    from ..formats import TensorSource
    from ..weights_check import check_shapes

    try:
        with init_empty_weights():
            empty = cls.from_config(cls.load_config(path))
    except (TypeError, ValueError) as exc:
        raise DistilleryError(field, str(path / "config.json"), f"not a valid {cls.__name__} configuration ({exc}).",
                              "restore the config.json that came with these weights.") from exc
    with TensorSource(path, field, prefixes=()) as src:
        found = {k: src.shape(k) for k in src.keys()}
    check_shapes({k: tuple(v.shape) for k, v in empty.state_dict().items()}, found, field=field, path=path,
                 what="model its config.json describes",
                 fix="config.json and the weights beside it disagree: restore the config.json that came with "
                     "these weights, or download the folder again.")


def load_tokenizer(path, field: str = "tokenizer", family: str | None = None):
    """A tokenizer folder; None: the tokenizer shipped with the pack for `family` (single-file pipelines)."""
    from transformers import AutoTokenizer

    if path is None:
        bundled = families.get(family).bundled_tokenizer if family is not None else ""
        if not bundled:
            raise DistilleryError(field, None, "no tokenizer given, and none ships with the pack for this model.",
                                  "give the model's tokenizer/ folder (--tokenizer), or a diffusers folder.")
        from ..text import bundled_tokenizer

        return bundled_tokenizer(bundled, field)
    path = _exists(path, field)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DistilleryError(field, str(path), f"not a tokenizer folder ({exc}).",
                              "give the model's tokenizer/ folder (tokenizer.json or vocab.json + merges.txt).") from exc


def load_text_encoder(path, family: str, *, config_dir=None, dtype=None, device="cpu", field: str = "text_encoder",
                      fp8: str = "keep"):
    """A transformers text encoder from its folder, or from a single safetensors file: ComfyUI's (bf16, fp8, scaled
    fp8) read with the family's own configuration, or another checkpoint file with its config.json folder."""
    import transformers

    spec = families.get(family)
    path = _exists(path, field)
    if path.is_file():
        return _text_encoder_from_file(path, family, config_dir, dtype, device, field, fp8)
    config = path / "config.json"
    if not config.is_file():
        raise DistilleryError(field, str(path), "has no config.json.", "give a transformers model folder.")
    arch = (json.loads(config.read_text()).get("architectures") or [spec.text_encoder_class])[0]
    # Qwen3 checkpoints are usually Qwen3ForCausalLM: we only need the hidden states, so skip the LM head.
    arch = {"Qwen3ForCausalLM": "Qwen3Model"}.get(arch, arch)
    if arch not in {c for f in families.all() for c in (f.text_encoder_class, f.text_only_encoder_class) if c}:
        raise DistilleryError(field, str(path), f"holds a {arch}.",
                              f"use {spec.text_encoder_class} for a {family} pipeline.")
    cls = getattr(transformers, arch)
    return cls.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()


def _text_encoder_from_file(path: Path, family: str, config_dir, dtype, device, field: str, fp8: str = "keep"):
    from ..formats import TensorSource
    from ..fp8 import read_layout

    if path.suffix != ".safetensors":
        raise DistilleryError(field, str(path), "only .safetensors weights are read.", "convert the file to safetensors.")
    with TensorSource(path, field, prefixes=()) as src:
        layout = read_layout(src, field)
        quantised = layout.scaled or any(src.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2) for k in layout.keys)
        given = config_dir is not None and (Path(config_dir) / "config.json").is_file()
        if not given or quantised:  # the family's own configuration: ComfyUI's files, fp8 ones included
            built = _text_encoder_single(src, layout, families.get(family), dtype, field, fp8)
            if built is not None:
                return built.to(device).eval()
            if quantised:
                raise DistilleryError(field, str(path), "is an fp8 text encoder, which this pack reads only for the "
                                      "families that know their encoder's configuration.",
                                      "use the bf16 file with its config folder, or the model's text_encoder/ folder.")
            raise DistilleryError(field, str(path), "a single text-encoder file has no configuration, and the "
                                  f"{family} family cannot build its encoder from the file alone.",
                                  "also give the config folder: the text_encoder/ folder of the diffusers model "
                                  "(config.json is enough), or use that folder instead of the file.")
    # transformers reads a folder: give it one made of the config and a link to the file, so its own key
    # conversions (e.g. older Qwen2.5-VL layouts) apply.
    with tempfile.TemporaryDirectory(prefix="dit_distillery_te_") as tmp:
        shutil.copy(Path(config_dir) / "config.json", Path(tmp) / "config.json")
        os.symlink(path.resolve(), Path(tmp) / "model.safetensors")
        return load_text_encoder(tmp, family, dtype=dtype, device=device, field=field)


def _text_encoder_single(src, layout, spec, dtype, field: str, fp8: str):
    """A text encoder from one file without config folder (ComfyUI's `models/text_encoders`), built with the family's
    configuration for it (`Family.text_encoder_from_shapes`) and checked against the file's shapes before any data is
    read; fp8 weights kept in fp8 (`fp8.load_weights`). None when the family has no such configuration."""
    import transformers
    from accelerate import init_empty_weights

    from ..fp8 import load_weights
    from ..weights_check import check_finite, check_shapes

    names = {}  # the model's name -> the file's
    for key in layout.keys:
        ours = spec.text_encoder_key(key)
        if ours is not None:
            names[ours] = key
    shapes = {ours: tuple(src.shape(key)) for ours, key in names.items()}
    try:
        built = spec.text_encoder_from_shapes(shapes.__getitem__, list(shapes))
    except DistilleryError as exc:  # name the file, not the tensors
        raise DistilleryError(field, str(src.path), exc.problem, exc.fix) from exc
    if built is None:
        return None
    class_name, config = built
    with init_empty_weights():
        model = getattr(transformers, class_name)(config)
    size = f"{config.num_hidden_layers} layers, width {config.hidden_size}"
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, field=field, path=src.path,
                 what=f"{class_name} of {spec.title}'s text encoder ({size})",
                 fix=f"the file is incomplete or not {spec.title}'s text encoder: download it again, or give the "
                     "file that goes with this model.")
    state = {ours: check_finite(key, src.get(key), field=field, path=src.path) for ours, key in names.items()}
    scales = {ours: layout.scales[key] for ours, key in names.items() if key in layout.scales}
    return load_weights(model, state, scales, dtype=dtype, mode=fp8, scaled=layout.scaled, field=field,
                        path=src.path)


def load_vae(path, family: str, *, config_dir=None, dtype=None, device="cpu", field: str = "vae"):
    """A diffusers VAE from its folder, or from one safetensors file (diffusers, Wan or LDM key layout)."""
    import diffusers

    spec = families.get(family)
    path = _exists(path, field)
    cls = getattr(diffusers, spec.vae_class)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DistilleryError(field, str(path), "has no config.json.", "give a diffusers vae/ folder or a .safetensors file.")
        return cls.from_pretrained(path, torch_dtype=dtype, use_safetensors=True).to(device).eval()
    if path.suffix != ".safetensors":
        raise DistilleryError(field, str(path), "only .safetensors weights are read.", "convert the file to safetensors.")
    from safetensors.torch import load_file

    state = load_file(str(path))
    if config_dir is not None:
        vae = cls.from_config(cls.load_config(config_dir))
    else:  # the real model's config: the family's, or the class defaults (Qwen-Image's / FLUX.2's VAE)
        vae = cls(**(spec.vae_config() or {}))
    expected = set(vae.state_dict())
    if not expected <= set(state):  # the original layout (ComfyUI's files): diffusers' own converters
        # (they expect the real models' block layout, the class defaults, not arbitrary sizes)
        state = spec.convert_vae_state(state, dict(vae.config))
    missing = sorted(expected - set(state))
    if missing:
        raise DistilleryError(field, str(path), f"does not hold a {cls.__name__} (missing {missing[:3]}).",
                              f"give the {family} VAE file (or its diffusers vae/ folder; add the vae/ config folder "
                              "for a non-default VAE size).")
    from ..weights_check import check_shapes

    check_shapes({k: tuple(v.shape) for k, v in vae.state_dict().items()}, {k: tuple(state[k].shape) for k in expected},
                 field=field, path=path, what=f"{cls.__name__} of {'the given config' if config_dir else 'default size'}",
                 fix=f"give the {family} VAE file of this model, with its vae/ config folder when it is not the "
                     "default size.")
    vae.load_state_dict({k: state[k] for k in expected}, strict=True)
    return vae.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}).eval()


def _codec(family: str, meta: dict, vae) -> Codec:
    if meta.get("kind") == "pixel":
        return PixelCodec(int(meta.get("patch", 4)))
    if vae is None:
        raise DistilleryError("vae", None, "this pipeline needs a VAE and none was found.",
                              "give the vae/ folder or a VAE .safetensors file.")
    return families.get(family).codec(vae)


# ----------------------------------------------------------------------------------------------------------
# Loading pipelines

def load_pipeline(source: str | os.PathLike | None = None, *, dit=None, text_encoder=None, text_encoder_config=None,
                  tokenizer=None, vae=None, vae_config=None, text_max_length: int | None = None, device="cpu",
                  dtype: torch.dtype | None = None, seed: int = 0, fp8: str = "keep") -> TextToImagePipeline:
    """A pipeline from a diffusers folder / built-in name, with any component replaced by a file or folder.

    source: a diffusers-layout folder, a built-in name (`builtin_names()`), or None (then give the DiT, text
    encoder and VAE; the tokenizer defaults to the one shipped for the family). "default" (the CLI's and the
    training job's default) given with all three of dit, text_encoder and vae means the same as None.
    dit: a DiT file (ComfyUI diffusion_models, our trained students) or transformer folder.
    text_encoder (+ text_encoder_config, a folder with its config.json), tokenizer, vae (+ vae_config): likewise.
    text_max_length: prompt tokens (default: the folder's setting, else 1024 Qwen-Image / 128 AAADiT). It matters
    for AAADiT, which attends to the padding: use the length the DiT was trained with.
    fp8: "keep" (fp8 weights of the DiT and text encoder stay fp8, computed in `dtype`) or "dequantise".
    """
    from ..fp8 import check_mode

    check_mode(fp8)
    if str(source) == "default" and all(x is not None for x in (dit, text_encoder, vae)):
        source = None  # the model given as files: nothing of the built-in would be used
    if source is not None and str(source) in builtin_names():
        if any(x is not None for x in (text_encoder, tokenizer, vae)):
            raise DistilleryError("source", str(source), "built-in pipelines only take a replacement DiT.",
                                  "save the built-in pipeline with save_pipeline, then replace components of the folder.")
        pipe = _builtin(str(source), seed)
        if dit is not None:
            pipe = pipe.with_dit(load_dit(dit, dtype=dtype, fp8=fp8))
        return pipe.to(device=device, dtype=dtype)

    root = None if source is None else _exists(source, "pipeline")
    index = {}
    if root is not None:
        if not (root / MODEL_INDEX).is_file():
            raise DistilleryError("pipeline", str(root), f"is not a diffusers pipeline folder (no {MODEL_INDEX}).",
                                  "give a folder like a local Qwen/Qwen-Image download, or one written by save_pipeline.")
        try:
            index = json.loads((root / MODEL_INDEX).read_text())
        except ValueError as exc:
            raise DistilleryError("pipeline", str(root / MODEL_INDEX), f"is not valid JSON ({exc}).",
                                  "restore the file from the model's download.") from exc
    meta = index.get(META_KEY, {})
    encoder_meta = dict(meta.get("prompt_encoder", {}))
    if text_max_length is not None:
        encoder_meta["max_length"] = text_max_length

    def part(given, sub: str, what: str):
        if given is not None:
            return given
        if root is not None and (root / sub).exists():
            return root / sub
        raise DistilleryError(what, None, f"no {what} given" + (f" and {root} has no {sub}/ folder." if root else "."),
                              f"give the {what} (a file or folder), or a diffusers folder that contains {sub}/.")

    model = load_dit(part(dit, "transformer", "dit"), dtype=dtype, device=device, fp8=fp8)
    family = families.of_model(model).name
    expected = _index_family(index)
    if dit is None and expected and expected != family:
        raise DistilleryError("pipeline", str(root), f"model_index says {expected} but the transformer is {family}.",
                              "the folder is inconsistent; re-save it.")
    te_config = text_encoder_config or (root / "text_encoder" if root is not None else None)
    encoder_model = load_text_encoder(part(text_encoder, "text_encoder", "text_encoder"), family, config_dir=te_config,
                                      dtype=dtype, device=device, fp8=fp8)
    if tokenizer is None and not (root is not None and (root / "tokenizer").exists()):
        tok = load_tokenizer(None, family=family)  # the one shipped with the pack
    else:
        tok = load_tokenizer(part(tokenizer, "tokenizer", "tokenizer"))
    codec_meta = meta.get("codec", {"kind": "vae"})
    vae_model = None
    if codec_meta.get("kind") != "pixel" or vae is not None:
        codec_meta = {"kind": "vae"} if vae is not None else codec_meta
        vae_cfg = vae_config or (root / "vae" if root is not None and (root / "vae" / "config.json").is_file() else None)
        vae_model = load_vae(part(vae, "vae", "vae"), family, config_dir=vae_cfg, dtype=dtype, device=device)
    pipe = TextToImagePipeline(model, families.get(family).prompt_encoder(encoder_model, tok, encoder_meta),
                               _codec(family, codec_meta, vae_model), family, template=meta.get("template"),
                               defaults=meta.get("defaults") or families.get(family).folder_defaults(index, root))
    return pipe


def _builtin(name: str, seed: int) -> TextToImagePipeline:
    from .. import tiny

    if name == "default":
        return tiny.embedded_default_pipeline(seed)
    return families.get(source_family(name), "pipeline").tiny_pipeline(seed)
