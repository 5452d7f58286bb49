"""`sample`: text-to-image with any pipeline (a diffusers folder, the tiny/default ones) and, optionally, a
trained student DiT file in place of the pipeline's own.

Several `--prompt`s and `--seed`s make several images (a single one of either is paired with all of the other);
with more than one image, `--out x.png` becomes `x_0.png`, `x_1.png`, ... Everything is checked and the
pipeline loaded before anything is written; each PNG is written atomically.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import DistilleryError

HELP = "Generate images from prompts with a pipeline folder (or 'tiny' / 'default') and optionally a student DiT."


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several images)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (used when --cfg is not 1)")
    p.add_argument("--seed", type=int, action="append", help="seed (repeat for several images) (default: 0)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale; 1 disables it (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--mu", type=float, help="schedule shift mu (default: the resolution's own; 0.8 = DiffSynth training)")
    p.add_argument("--rand-device", default="cpu", help="device the noise is drawn on (cpu matches every machine)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16 or fp32 (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, help="images denoised together (default: all)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--latents-out", help="also save the final latents to this .safetensors file")


def add_model_arguments(p, what: str = "") -> None:
    """--pipeline, the component files and --fp8 (shared by sample and gen-dataset)."""
    p.add_argument("--pipeline", default="default", help=f"{what}diffusers-layout folder (e.g. a local "
                   "Qwen/Qwen-Image), 'tiny', 'tiny:qwen_image' or 'default'; not needed when --dit, --text-encoder "
                   "and --vae are all files (ComfyUI's models/diffusion_models, text_encoders, vae)")
    p.add_argument("--dit", help="DiT file or transformer folder replacing the pipeline's (e.g. a trained student, "
                   "or ComfyUI's bf16 / fp8 / fp8_scaled file)")
    p.add_argument("--text-encoder", help="text encoder folder or .safetensors file (ComfyUI's bf16 / fp8_scaled "
                   "files need nothing else; another file needs --text-encoder-config)")
    p.add_argument("--text-encoder-config", help="folder with the text encoder's config.json (for a single file "
                   "the family cannot read alone)")
    p.add_argument("--tokenizer", help="tokenizer folder replacing the pipeline's (default for single files: the one "
                   "shipped with the pack)")
    p.add_argument("--vae", help="VAE folder or .safetensors file replacing the pipeline's")
    p.add_argument("--fp8", default="keep", choices=("keep", "dequantise"),
                   help="fp8 DiT / text-encoder weights: keep them in fp8 (half the memory of bf16, computed in "
                        "--dtype) or dequantise them on load")


def load_model(args, device, dtype):
    """The pipeline the model arguments name."""
    from ..pipelines.loading import load_pipeline

    return load_pipeline(args.pipeline, dit=args.dit, text_encoder=args.text_encoder,
                         text_encoder_config=args.text_encoder_config, tokenizer=args.tokenizer, vae=args.vae,
                         device=device, dtype=dtype, fp8=args.fp8)


def _placement(device: str, dtype: str):
    """(device, torch dtype) from the --device/--dtype strings ('auto': the GPU in bf16 when there is one)."""
    import torch

    from ..formats import dtype_from_name

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistilleryError("device", device, "no CUDA device is available.", "use --device cpu.")
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype_from_name(dtype, "dtype")


# Where `python -m dit_distillery demo` (default --out demo_out) leaves its trained teacher: the embedded default
# pipeline's DiT after training (`demo.run_demo`: the teacher job writes <out>/teacher/teacher.safetensors).
DEMO_TEACHER = "demo_out/teacher/teacher.safetensors"


def untrained_warning(pipeline: str, dit: str | None) -> str | None:
    """The warning for a built-in pipeline sampled with its own random DiT (no --dit), else None.

    The built-ins ('default', 'tiny', ...) are untrained: their images are noise. Saying so, and where a trained
    DiT for 'default' comes from, saves a newcomer from concluding the tool is broken.
    """
    if dit or not (str(pipeline) in ("default", "tiny") or str(pipeline).startswith("tiny:")):
        return None
    text = (f"the built-in '{pipeline}' pipeline has random, untrained weights: its images are noise. ")
    if str(pipeline) == "default":
        return text + ("Train its DiT with `python -m dit_distillery demo --out demo_out` (or `--preset quick` for a "
                       f"smoke run), then sample the trained teacher it writes: --pipeline default --dit {DEMO_TEACHER} "
                       "--steps 50 --cfg 4.")
    return text + "It exists for tests; use --pipeline default --dit TRAINED.safetensors or a real pipeline folder."


def output_paths(out: str, count: int) -> list[Path]:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise DistilleryError("out", str(out), "the output must be a .png file.", "use e.g. --out image.png.")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def run(args) -> dict:
    from ..formats import atomic_output, save_safetensors

    if args.latents_out and not args.latents_out.endswith(".safetensors"):
        raise DistilleryError("latents_out", args.latents_out, "must be a .safetensors file.", "use e.g. latents.safetensors.")
    warning = untrained_warning(args.pipeline, args.dit)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    device, dtype = _placement(args.device, args.dtype)
    pipe = load_model(args, device, dtype)
    seeds = args.seed or [0]
    count = max(len(args.prompt), len(seeds))
    paths = output_paths(args.out, count)
    bar = None
    if not args.json:
        from tqdm import tqdm

        bar = tqdm(desc="sampling", unit="step", leave=False)

    def progress(step, total, _preview):
        if bar is not None:
            bar.total = total
            bar.update(step - bar.n)

    start = time.perf_counter()
    result = pipe.sample(args.prompt, seeds=seeds, steps=args.steps, cfg_scale=args.cfg,
                         negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                         rand_device=args.rand_device, batch_size=args.batch_size, mu=args.mu, callback=progress)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    for image, path in zip(result.images, paths):
        with atomic_output(path) as tmp:
            image.save(tmp, format="PNG")
    if args.latents_out:
        save_safetensors({"latents": result.latents}, args.latents_out,
                         {"prompts": result.prompts, "seeds": result.seeds, "sigmas": result.sigmas})
    report = {
        "images": [str(p) for p in paths],
        "prompts": result.prompts,
        "seeds": result.seeds,
        "family": pipe.family,
        "steps": len(result.sigmas),
        "sigmas": [round(s, 6) for s in result.sigmas],
        "cfg_scale": args.cfg if args.cfg is not None else pipe.defaults["cfg_scale"],
        "size": list(result.images[0].size) if result.images else None,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": round(seconds, 3),
    }
    if warning:
        report["warning"] = warning
    return report
