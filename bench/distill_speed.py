"""Direct Distill training step on a Qwen-Image-shaped student: s/step and peak memory, ours against
DiffSynth-Studio's DirectDistillLoss loop, same model and settings, same device, one run.

    python bench/distill_speed.py --device cuda     # the issue's sizes (GPU)
    python bench/distill_speed.py --device cpu      # tiny sizes: correctness only

Real sizes: a student of 12 full-width Qwen-Image blocks (3072 wide, 24 heads x 128, text 3584) with random bf16
weights, 512² (latents 16x64x64 = 1024 image tokens), 64 text tokens, 4 student steps, CFG 1, LoRA rank 32 on
DiffSynth's targets, per-block gradient checkpointing (DiffSynth's Distill-LoRA script uses it), gradients through
all 4 steps; ours at batch 1, 2 and 4, DiffSynth at batch 1 (all it supports).

Ours: `bench/ours_step.py` (the trainer's step function) with `losses.DirectDistillLoss`. DiffSynth: its
`QwenImageTrainingModule` with task `direct_distill:train` (cached inputs, its split-training mode) in its
`launch_training_task`. Writes bench/results/distill_speed[_cpu_tiny].{json,md} and two charts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common, qwen_training  # noqa: E402

BENCH = "distill_speed"
SIDES = ("ours", "diffsynth")


def defaults(tiny: bool) -> dict:
    if tiny:  # one full-width block (DiffSynth's QwenImageDiT cannot be narrower), 64²
        return {"num_layers": 1, "image_size": 64, "text_tokens": 16, "batch_sizes": [1, 2], "warmup": 3, "steps": 3}
    return {"num_layers": 12, "image_size": 512, "text_tokens": 64, "batch_sizes": [1, 2, 4], "warmup": 3, "steps": 10}


def diffsynth(settings: dict) -> dict:
    from bench.diffsynth_baselines import qwen_lora_train

    return qwen_lora_train(settings)


FNS = {"ours": qwen_training.ours, "diffsynth": diffsynth}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, sides=SIDES)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-sizes", default=None, help="comma list for our side")
    ap.add_argument("--student-steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args(argv)
    tiny = common.is_tiny(args)
    d = defaults(tiny)
    settings = {"device": args.device, "tiny": tiny, "task": "direct_distill", "rank": args.rank,
                "num_layers": args.num_layers or d["num_layers"], "image_size": args.image_size or d["image_size"],
                "text_tokens": d["text_tokens"], "student_steps": args.student_steps, "gradient_checkpointing": True,
                "batch_sizes": [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else d["batch_sizes"],
                "warmup": args.warmup if args.warmup is not None else d["warmup"],
                "steps": args.steps if args.steps is not None else d["steps"], "seed": args.seed}
    rec = common.record(BENCH, args, argv)
    sides = {name: common.run_side(__file__, name, settings, FNS[name], inline=args.inline,
                                   timeout=common.side_timeout(args, name))
             for name in [s for s in args.sides.split(",") if s]}
    rec.update(settings=settings, sides=sides)
    s = settings
    intro = [f"Student: Qwen-Image DiT, {s['num_layers']} full-width blocks (3072 wide, 24 heads x 128, text 3584), random "
             f"weights; {s['image_size']}² (latents 16x{s['image_size'] // 8}x{s['image_size'] // 8}), {s['text_tokens']} "
             f"text tokens; {s['student_steps']} student steps, CFG 1, gradients through every step; LoRA rank "
             f"{s['rank']} on DiffSynth's targets; per-block gradient checkpointing on both sides; cached latents and "
             f"prompt embeddings. {s['warmup']} warm-up steps dropped, median of {s['steps']}."]
    title = "Direct Distill training step: speed and memory"
    md = qwen_training.report(rec, title, intro)
    stem = common.run_name(BENCH, args)
    rec["files"] = [str(p) for p in common.write_results(args.out, stem, rec, md, qwen_training.charts(
        rec, f"Direct Distill step on {rec['machine']['device']}" + (" (tiny, CPU)" if tiny else "")))]
    print(md)
    return rec


if __name__ == "__main__":
    if not common.child_main(FNS):
        main()
