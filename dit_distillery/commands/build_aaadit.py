"""`build-aaadit`: a freshly initialised AAADiT (DiffSynth's train-from-scratch DiT), saved for training.

Writes a diffusers folder (`save_pretrained`: config.json + safetensors) and/or one safetensors file in our
registry format (`--single-file`). The folder appears only when complete: it is written beside its target
and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DistilleryError
from ..models.aaadit_presets import PRESETS, describe_presets, preset_config

HELP = "Build a randomly initialised AAADiT (DiffSynth's 0.1B train-from-scratch DiT) and save it."

# torch is imported only by `run`, so `--help` and argument errors stay instant; dtype names resolve there.
DTYPES = ("fp32", "bf16")

# CLI option -> config key (options left unset keep the preset's value)
_OPTIONS = {"width": "width", "blocks": "num_blocks", "heads": "num_heads", "ffn_ratio": "ffn_ratio",
            "latent_channels": "latent_channels", "text_width": "text_width"}


def add_arguments(p) -> None:
    p.add_argument("--out", help="diffusers folder to write (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--single-file", help="also (or only) write one .safetensors file in DiT Distillery's format")
    p.add_argument("--preset", choices=list(PRESETS), default="tutorial",
                   help=f"starting config; the options below override it. {describe_presets()}")
    p.add_argument("--width", type=int, help="hidden width (tutorial 1024)")
    p.add_argument("--blocks", type=int, help="number of blocks (tutorial 10)")
    p.add_argument("--heads", type=int, help="attention heads; must divide the width (tutorial 32)")
    p.add_argument("--ffn-ratio", type=int, help="MLP width / width (tutorial 3)")
    p.add_argument("--latent-channels", type=int, help="latent channels of the VAE (tutorial 128: Flux2 VAE)")
    p.add_argument("--text-width", type=int, help="text encoder width (tutorial 1024: Qwen3-0.6B)")
    p.add_argument("--pos-grid", help="learned position grid HxW, e.g. 16x16 (resized to any latent size)")
    p.add_argument("--text-mask", action="store_true", help="mask padded text tokens in attention (tutorial: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def parse_grid(text: str) -> list[int]:
    """'16x16' or '16' -> [16, 16]."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        grid = [int(v) for v in parts]
    except ValueError:
        grid = []
    if len(grid) == 1:
        grid = grid * 2
    if len(grid) != 2 or min(grid) < 1:
        raise DistilleryError("pos_grid", text, "must be HEIGHTxWIDTH with positive sizes.", "use e.g. 16x16.")
    return grid


def config_from_args(args) -> dict:
    config = preset_config(args.preset)
    for option, key in _OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            config[key] = value
    if args.pos_grid is not None:
        config["pos_grid"] = parse_grid(args.pos_grid)
    if args.text_mask:
        config["use_text_mask"] = True
    return config


def _check_outputs(out: Path | None, single: Path | None, overwrite: bool) -> None:
    if out is None and single is None:
        raise DistilleryError("out", None, "no output given.", "pass --out FOLDER and/or --single-file FILE.safetensors.")
    if single is not None and single.suffix != ".safetensors":
        raise DistilleryError("single_file", str(single), "must end in .safetensors.", "e.g. --single-file aaadit.safetensors.")
    if out is not None and out.exists():
        if not out.is_dir():
            raise DistilleryError("out", str(out), "is a file, not a folder.", "choose a folder path for --out.")
        if any(out.iterdir()) and not overwrite:
            raise DistilleryError("out", str(out), "the folder already holds files.",
                                  "choose a new folder, or pass --overwrite to replace it.")


def save_folder(model, out: Path) -> None:
    """`save_pretrained` into a temporary folder beside `out`, then swap it into place."""
    from ..formats import give_usual_permissions

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise DistilleryError("out", str(out), f"cannot create the folder ({exc.strerror or exc}).",
                              "check that the parent folder is writable.") from exc
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        give_usual_permissions(tmp)  # mkdtemp's 0700 and safetensors' 0600 are for the temporary only
        if out.exists():
            old = out.with_name(tmp.name + ".old")
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        raise DistilleryError("out", str(out), f"cannot write the model ({exc.strerror or exc}); nothing was replaced.",
                              "free some disk space or choose another folder.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def run(args) -> dict:
    import torch

    from ..formats import dtype_from_name
    from ..models import registry
    from ..models.aaadit_presets import build

    config = config_from_args(args)
    out = Path(args.out) if args.out else None
    single = Path(args.single_file) if args.single_file else None
    _check_outputs(out, single, args.overwrite)
    dtype = dtype_from_name(args.dtype)
    model = build(config, seed=args.seed, dtype=dtype)  # the Build AAADiT node's builder
    if out is not None:
        save_folder(model, out)
    if single is not None:
        registry.save_dit(model, single, provenance={"built_by": "build-aaadit", "preset": args.preset,
                                                     "seed": args.seed})
    params = sum(p.numel() for p in model.parameters())
    return {"out": str(out) if out else None, "single_file": str(single) if single else None, "params": params,
            "config": registry.model_config(model), "dtype": args.dtype, "seed": args.seed,
            "weights_bytes": params * torch.finfo(dtype).bits // 8}
