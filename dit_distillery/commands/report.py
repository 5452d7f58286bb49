"""`report`: parameters, weight memory and training-memory estimate of a DiT, without loading its weights."""

from __future__ import annotations

from .. import families

HELP = "Size and training-memory report of a DiT (safetensors file, diffusers folder, config JSON or preset)."

# Names for the help text, from the family registry (which imports no torch: `--help` stays instant).
MODEL_PRESETS = tuple(families.presets())
LORA_PRESET_NAMES = tuple(families.lora_presets())


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help=f"a .safetensors file, a diffusers folder, a config JSON, or a preset: {', '.join(MODEL_PRESETS)}")
    p.add_argument("--layers", type=int, help="report with this many blocks instead (what a depth shrink gives)")
    p.add_argument("--heads", type=int, help="report with this many heads (Qwen-Image: width = heads x 128)")
    p.add_argument("--height", type=int, default=1024, help="training image height in pixels")
    p.add_argument("--width", type=int, default=1024, help="training image width in pixels")
    p.add_argument("--batch", type=int, default=1, help="training batch size")
    p.add_argument("--text-tokens", type=int, help="prompt length in tokens (default: "
                   + ", ".join(f"{f.report_text_tokens} {f.title}" for f in families.all()) + ")")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank for the LoRA estimate")
    p.add_argument("--lora-targets", help=f"LoRA preset ({', '.join(LORA_PRESET_NAMES)}) or comma-separated module names "
                                          "(default: the family's preset)")
    p.add_argument("--no-checkpointing", action="store_true", help="estimate without gradient checkpointing")
    plan = p.add_argument_group("memory plan (--plan): peak GPU memory of one run by part, and blocks to swap")
    plan.add_argument("--plan", action="store_true", help="print the memory plan instead of the size report")
    plan.add_argument("--resolution", type=int, help="square image side in pixels (sets --height and --width)")
    plan.add_argument("--mode", default="lora", choices=("lora", "full", "sample"),
                      help="LoRA training, full training, or teacher sampling")
    plan.add_argument("--loss", default="sft", help="sft, or direct:N (Direct Distill with N student steps)")
    plan.add_argument("--base-dtype", default="bf16", choices=("bf16", "fp8"), help="dtype of the frozen base weights")
    plan.add_argument("--cfg", type=float, help="sampling CFG scale (default: the family's; != 1 doubles the batch)")
    plan.add_argument("--blocks-to-swap", default="0",
                      help="blocks kept on the CPU and streamed (block swap), or 'auto' (the fewest that fit --budget)")
    plan.add_argument("--budget", help="GPU memory to fit, e.g. 24GB (GB = GiB, as cards are sold)")


def run(args) -> dict:
    from ..report import size_report, summary_lines, with_overrides

    family, config, source = families.detect(args.model)
    config = with_overrides(family, config, layers=args.layers, heads=args.heads)
    if args.resolution is not None:
        args.height = args.width = args.resolution
    if args.plan:
        return _plan(args, family, config, source)
    report = size_report((family, config), height=args.height, width=args.width, batch=args.batch,
                         gradient_checkpointing=not args.no_checkpointing, lora_rank=args.lora_rank,
                         lora_targets=args.lora_targets, text_tokens=args.text_tokens)
    overrides = [f"{name} {value}" for name, value in (("layers", args.layers), ("heads", args.heads)) if value]
    report["source"] = source + (f", with {' and '.join(overrides)}" if overrides else "")
    return report if args.json else summary_lines(report)


def _plan(args, family: str, config: dict, source: str) -> dict:
    from ..errors import DistilleryError
    from ..memory_plan import memory_plan, parse_bytes

    budget = parse_bytes(args.budget) if args.budget else None
    auto = str(args.blocks_to_swap).strip().lower() == "auto"
    if auto and budget is None:
        raise DistilleryError("blocks-to-swap", "auto", "needs a budget to fit.", "add --budget, e.g. 24GB.")
    if not auto and not str(args.blocks_to_swap).strip().isdigit():
        raise DistilleryError("blocks-to-swap", args.blocks_to_swap, "not a number of blocks.",
                              "give a whole number >= 0, or 'auto' with --budget.")
    plan = memory_plan((family, config), height=args.height, width=args.width, batch=args.batch, mode=args.mode,
                       loss=args.loss, base_dtype=args.base_dtype, gradient_checkpointing=not args.no_checkpointing,
                       lora_rank=args.lora_rank, lora_targets=args.lora_targets, text_tokens=args.text_tokens,
                       cfg_scale=args.cfg)
    plan.source = source
    if auto:
        need = plan.blocks_needed(budget)
        plan = plan.with_swap(need if need is not None else plan.max_swappable)
    else:
        plan = plan.with_swap(int(args.blocks_to_swap))
    return plan.to_dict(budget) if args.json else plan.summary_lines(budget)
