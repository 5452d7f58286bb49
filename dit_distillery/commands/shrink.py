"""`python -m dit_distillery shrink SRC --out OUT --layers N ...`: Shrink DiT from the command line."""

from __future__ import annotations

import sys

HELP = ("make a smaller DiT by streaming exact slices of the source: Qwen-Image / Z-Image (fewer blocks and/or "
        "heads), FLUX.2 [klein] (fewer blocks per stack and/or heads)")

# `shrink.plan.STRATEGIES` / `WIDTH_METHODS`, repeated because importing the shrink package imports torch, which
# `--help` must not; tests/test_cli_fast.py checks they agree.
STRATEGIES = ("uniform", "first", "interval", "list", "importance", "learnable")
WIDTH_METHODS = ("magnitude", "importance")


def add_arguments(p) -> None:
    p.add_argument("source", help="DiT (Qwen-Image, Z-Image, FLUX.2 [klein]): .safetensors (bare or ComfyUI-named) "
                   "or a diffusers folder")
    p.add_argument("--out", default=None, help="output .safetensors file (not needed with --dry-run)")
    p.add_argument("--layers", default=None, help="blocks to keep; none = all, or the --keep-blocks count. A number "
                   "is the main stack's; per stack (FLUX.2): 'transformer_blocks=3,single_transformer_blocks=12' "
                   "(a stack not named is kept whole)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="which blocks to keep; none = list with --keep-blocks, else interval. Measured best "
                   "(bench/results/block_selection.md): learnable when the source fits --device for training, "
                   "else importance; uniform was the worst")
    p.add_argument("--keep-blocks", default=None, help="explicit source blocks for --strategy list, e.g. '0-9,50-59'; "
                   "per stack: 'transformer_blocks=0-2,4;single_transformer_blocks=0-9,19'")
    p.add_argument("--keep-first", default=None,
                   help="interval strategy: keep this many first blocks (per stack like --layers); none = about a "
                   "third of --layers")
    p.add_argument("--heads", type=int, default=None, help="attention heads per block to keep (width shrink; "
                   "the residual stream and FFNs narrow with them)")
    p.add_argument("--width-method", choices=WIDTH_METHODS, default="magnitude",
                   help="how kept heads/FFN units/channels are chosen")
    p.add_argument("--dtype", default="keep", help="keep | bf16 | fp16 | fp32 | fp8 (e4m3fn weight matrices)")
    p.add_argument("--diffusers-folder", default=None, help="also write a diffusers folder (config.json + weights)")
    p.add_argument("--device", default=None, help="device for importance calibration and learnable training; "
                   "none = cpu")
    p.add_argument("--learn-steps", type=int, default=None, help="learnable strategy (TinyFusion: mask logits + a "
                   "shared LoRA trained on calibration inputs, the whole source loaded): training steps; none = 200")
    p.add_argument("--learn-seed", type=int, default=None, help="learnable strategy: seed of its sampling and LoRA "
                   "(the choice is deterministic given it); none = 0")
    p.add_argument("--dry-run", action="store_true", help="print the plan (kept blocks, heads) without writing")
    p.add_argument("--no-progress", action="store_true", help="do not print progress to stderr")


def _progress_printer():
    state = {"stage": None, "last": -1}

    def progress(done, total, stage="", **info):
        pct = int(100 * done / max(total, 1))
        if stage != state["stage"] or pct // 10 != state["last"] // 10 or done == total:
            print(f"[shrink] {stage}: {done}/{total} ({pct}%)", file=sys.stderr, flush=True)
            state.update(stage=stage, last=pct)

    return progress


def _number(value, field: str):
    """A plain whole number as an int; 'STACK=N,...' stays text for the core (`shrink.depth.parse_groups`)."""
    from ..errors import DistilleryError

    if value is None or "=" in value:
        return value
    try:
        return int(value)
    except ValueError:
        raise DistilleryError(field, value, "not a whole number or STACK=N entries.",
                              "write e.g. 20, or transformer_blocks=3,single_transformer_blocks=12.") from None


def run(args) -> dict:
    from ..errors import DistilleryError
    from ..shrink import plan_shrink, shrink

    strategy = args.strategy or ("list" if args.keep_blocks else "interval")
    common = dict(layers=_number(args.layers, "layers"), strategy=strategy, keep_blocks=args.keep_blocks,
                  keep_first=_number(args.keep_first, "keep_first"), heads=args.heads, width_method=args.width_method, device=args.device,
                  progress=None if (args.no_progress or args.json) else _progress_printer())
    learn = {k: v for k, v in (("steps", args.learn_steps), ("seed", args.learn_seed)) if v is not None}
    if learn and strategy != "learnable":
        raise DistilleryError("learn_steps" if "steps" in learn else "learn_seed", next(iter(learn.values())),
                              f"only the learnable strategy uses it, not {strategy!r}.",
                              "add --strategy learnable, or drop --learn-steps / --learn-seed.")
    if strategy == "learnable":
        common["learn"] = learn or None
    if args.dry_run:
        return {"dry_run": True, **plan_shrink(args.source, **common).summary()}
    if not args.out:
        raise DistilleryError("out", None, "no output file given.", "add --out STUDENT.safetensors (or --dry-run).")
    return shrink(args.source, args.out, dtype=args.dtype, diffusers_folder=args.diffusers_folder, **common)
