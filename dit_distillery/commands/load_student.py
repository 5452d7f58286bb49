"""`load-student`: a trained student (base + full weights and/or LoRA) loaded, checked, sampled and exported."""

from __future__ import annotations

from pathlib import Path

from ..errors import DistilleryError

HELP = "load a student (base pipeline + full weights and/or LoRA), sample it, export a ComfyUI-loadable DiT file"


def add_arguments(p) -> None:
    p.add_argument("--base", default="default", help="base pipeline: diffusers folder, 'default' or 'tiny'")
    p.add_argument("--weights", help="DiT file replacing the base's (a shrunk or fully trained student)")
    p.add_argument("--lora", help="LoRA file (ours, DiffSynth's or diffusers')")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (1 = as trained)")
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA as separate adapters (base untouched)")
    p.add_argument("--prompt", action="append", help="sample these prompts (repeat for several)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, shared by every --prompt")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale; 1 disables it (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--out", help="PNG for the sampled images (a grid when several prompts)")
    p.add_argument("--export-comfy", help="write the student DiT (LoRA merged) to this .safetensors file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16 or fp32 (auto: bf16 on GPU, fp32 on CPU)")


def run(args) -> dict:
    from ..charts import image_grid
    from ..formats import atomic_output
    from ..student import export_comfy, load_student
    from .sample import _placement

    if args.prompt and not args.out:
        raise DistilleryError("out", None, "--prompt needs --out to write the images to.", "add --out student.png.")
    if args.export_comfy and not args.export_comfy.endswith(".safetensors"):
        raise DistilleryError("export_comfy", args.export_comfy, "must be a .safetensors file.",
                              "use e.g. --export-comfy models/diffusion_models/student.safetensors.")
    device, dtype = _placement(args.device, args.dtype)
    pipe = load_student(args.base, weights=args.weights, lora=args.lora, strength=args.strength,
                        merge=not args.no_merge, device=device, dtype=dtype)
    report = {"family": pipe.family, "dit_params": sum(p.numel() for p in pipe.dit.parameters()),
              "lora": args.lora, "strength": args.strength, "merged": not args.no_merge}
    if args.prompt:
        result = pipe.sample(args.prompt, seeds=args.seed, steps=args.steps, cfg_scale=args.cfg, height=args.height,
                             width=args.width)
        image = result.images[0] if len(result.images) == 1 else image_grid([[im] for im in result.images],
                                                                             row_labels=args.prompt)
        with atomic_output(Path(args.out)) as tmp:
            image.save(tmp, format="PNG")
        report["image"] = args.out
    if args.export_comfy:
        report["export"] = export_comfy(pipe, args.export_comfy,
                                        provenance={"base": args.base, "weights": args.weights, "lora": args.lora,
                                                    "strength": args.strength})
    return report
