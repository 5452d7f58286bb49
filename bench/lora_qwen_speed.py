"""LoRA training (SFT) on the full Qwen-Image config: s/step and peak memory, ours against DiffSynth-Studio and
against ComfyUI's native Train LoRA node, same model shape, same device, one run.

    python bench/lora_qwen_speed.py --device cuda   # the issue's sizes (GPU)
    python bench/lora_qwen_speed.py --device cpu    # tiny sizes: correctness only

Real sizes: Qwen-Image's DiT (60 blocks, 3072 wide, 24 heads x 128, text 3584; 20.4B parameters) with random bf16
weights, 1024² (latents 16x128x128 = 4096 image tokens), 64 text tokens, batch 1, LoRA rank 32 on DiffSynth's
targets (ComfyUI: every weight, it has no choice), per-block gradient checkpointing everywhere, cached latents and
prompt embeddings everywhere (ComfyUI's node only trains from them).

Ours: `bench/ours_step.py` (the trainer's step function) with `losses.FlowMatchingLoss`. DiffSynth: its
`QwenImageTrainingModule` with task `sft:train` in its `launch_training_task`. ComfyUI: `TrainLoraNode.train` in
ComfyUI's own Python (`COMFYUI_DIR`, `COMFYUI_PYTHON`), see `comfyui_baseline.py`.
Writes bench/results/lora_qwen_speed[_cpu_tiny].{json,md} and two charts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common, qwen_training  # noqa: E402

BENCH = "lora_qwen_speed"
SIDES = ("ours", "diffsynth", "comfyui")


def defaults(tiny: bool) -> dict:
    if tiny:  # one full-width block (DiffSynth's QwenImageDiT cannot be narrower), 64²
        return {"num_layers": 1, "image_size": 64, "text_tokens": 16, "batch_sizes": [1], "warmup": 3, "steps": 2}
    return {"num_layers": 60, "image_size": 1024, "text_tokens": 64, "batch_sizes": [1], "warmup": 3, "steps": 10}


def diffsynth(settings: dict) -> dict:
    from bench.diffsynth_baselines import qwen_lora_train

    return qwen_lora_train(settings)


def comfyui(settings: dict) -> dict:
    from bench.comfyui_baseline import train_lora

    return train_lora(settings)


FNS = {"ours": qwen_training.ours, "diffsynth": diffsynth, "comfyui": comfyui}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, sides=SIDES)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-sizes", default=None, help="comma list for our side")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args(argv)
    tiny = common.is_tiny(args)
    d = defaults(tiny)
    settings = {"device": args.device, "tiny": tiny, "task": "sft", "rank": args.rank,
                "num_layers": args.num_layers or d["num_layers"], "image_size": args.image_size or d["image_size"],
                "text_tokens": d["text_tokens"], "gradient_checkpointing": True, "dataset_size": 4,
                "batch_sizes": [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else d["batch_sizes"],
                "warmup": args.warmup if args.warmup is not None else d["warmup"],
                "steps": args.steps if args.steps is not None else d["steps"], "seed": args.seed,
                "training_dtype": "bf16", "lora_dtype": "bf16"}
    rec = common.record(BENCH, args, argv)
    sides = {}
    for name in [s for s in args.sides.split(",") if s]:
        if name == "comfyui":  # ComfyUI always runs in its own Python, in a child process
            from bench.comfyui_baseline import locate

            root, python = locate()
            sides[name] = ({"skipped": "no COMFYUI_DIR"} if root is None else
                           common.run_side(__file__, name, settings, comfyui, inline=False, python=python, cwd=root,
                                           timeout=common.side_timeout(args, name)))
        else:
            sides[name] = common.run_side(__file__, name, settings, FNS[name], inline=args.inline,
                                          timeout=common.side_timeout(args, name))
    rec.update(settings=settings, sides=sides)
    s = settings
    intro = [f"Model: Qwen-Image DiT, {s['num_layers']} full-width blocks (3072 wide, 24 heads x 128, text 3584), random "
             f"bf16 weights; {s['image_size']}² (latents 16x{s['image_size'] // 8}x{s['image_size'] // 8}), "
             f"{s['text_tokens']} text tokens; flow-matching SFT, LoRA rank {s['rank']} (ours and DiffSynth: DiffSynth's "
             "targets; ComfyUI: every weight), per-block gradient checkpointing everywhere, cached latents and prompt "
             f"embeddings everywhere. {s['warmup']} warm-up steps dropped, median of {s['steps']}."]
    md = qwen_training.report(rec, "LoRA training on Qwen-Image: speed and memory", intro)
    stem = common.run_name(BENCH, args)
    rec["files"] = [str(p) for p in common.write_results(args.out, stem, rec, md, qwen_training.charts(
        rec, f"Qwen-Image LoRA step on {rec['machine']['device']}" + (" (tiny, CPU)" if tiny else "")))]
    print(md)
    return rec


if __name__ == "__main__":
    if not common.child_main(FNS):
        main()
