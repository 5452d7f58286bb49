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


def run(args) -> dict:
    from ..report import size_report, summary_lines, with_overrides

    family, config, source = families.detect(args.model)
    config = with_overrides(family, config, layers=args.layers, heads=args.heads)
    report = size_report((family, config), height=args.height, width=args.width, batch=args.batch,
                         gradient_checkpointing=not args.no_checkpointing, lora_rank=args.lora_rank,
                         lora_targets=args.lora_targets, text_tokens=args.text_tokens)
    overrides = [f"{name} {value}" for name, value in (("layers", args.layers), ("heads", args.heads)) if value]
    report["source"] = source + (f", with {' and '.join(overrides)}" if overrides else "")
    return report if args.json else summary_lines(report)
