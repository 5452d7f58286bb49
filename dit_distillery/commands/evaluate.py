"""`evaluate`: Evaluate Student on held-out prompt/seed pairs against its teacher and its undistilled base
(`dit_distillery.evaluate`); writes evaluation.json, evaluation.txt and grid.png (teacher | undistilled | student)
to --out.

The student is loaded like `load-student` (--base + --weights and/or --lora). By default the teacher and the
undistilled baseline are both the base itself (for a LoRA or a shrunk student distilled from its base, that is the
teacher); --teacher/--teacher-dit, --teacher-dataset and --baseline/--baseline-dit replace them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DistilleryError

HELP = ("evaluate a student against its teacher and its undistilled base on held-out pairs: latent MSE, PSNR, "
        "SSIM, seed diversity, speed; writes JSON + a grid PNG")

HELD_OUT_START_SEED = 100_000  # = evaluate.HELD_OUT_START_SEED (that module imports torch; --help must not)


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="folder for evaluation.json, evaluation.txt and grid.png")
    p.add_argument("--base", default="default", help="the student's base pipeline: diffusers folder, 'default', "
                   "'tiny:<family>'")
    p.add_argument("--weights", help="student DiT file replacing the base's (a shrunk or fully trained student)")
    p.add_argument("--lora", help="student LoRA file merged into the base's DiT")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength")
    p.add_argument("--teacher", help="teacher pipeline (default: the base)")
    p.add_argument("--teacher-dit", help="teacher DiT file replacing the teacher pipeline's")
    p.add_argument("--teacher-dataset", help="Generate Distill Dataset folder of held-out rows: its stored teacher "
                   "latents, seeds and settings are used instead of sampling a teacher")
    p.add_argument("--baseline", help="undistilled pipeline sampled at the student's steps (default: the base)")
    p.add_argument("--baseline-dit", help="baseline DiT file replacing the baseline pipeline's (e.g. the shrunk "
                   "student before distillation)")
    p.add_argument("--no-baseline", action="store_true", help="skip the undistilled baseline")
    p.add_argument("--prompt", action="append", help="held-out prompt (repeat for several)")
    p.add_argument("--prompts", help="text file with one held-out prompt per line")
    p.add_argument("--synthetic-prompts", type=int, help="this many captions of the synthetic shapes task (then "
                   "colour/shape/background accuracy is reported too)")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="seeds per prompt (2 or more give the diversity)")
    p.add_argument("--start-seed", type=int, default=HELD_OUT_START_SEED, help="first held-out seed (gen-dataset "
                   "starts at 0; keep evaluation seeds apart from training ones)")
    p.add_argument("--steps", type=int, help="student steps (default: the teacher dataset's student steps, else 4)")
    p.add_argument("--cfg", type=float, help="student CFG (default: the teacher dataset's, else 1)")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher steps (a teacher pipeline)")
    p.add_argument("--teacher-cfg", type=float, default=4.0, help="teacher CFG (a teacher pipeline)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (used where CFG is not 1)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--rand-device", default="cpu", help="device the noise is drawn on")
    p.add_argument("--batch-size", type=int, help="images denoised together (default: all)")
    p.add_argument("--max-pairs", type=int, help="use at most this many pairs (e.g. of a teacher dataset)")
    p.add_argument("--clip", help="local folder of a transformers CLIPModel (safetensors) for the CLIP score; "
                   "never downloaded, skipped when not given")
    p.add_argument("--grid-rows", type=int, default=8, help="rows of grid.png")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16 or fp32 (auto: bf16 on GPU, fp32 on CPU)")


def _check(args) -> None:
    """What can be refused before any model is loaded."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DistilleryError("out", args.out, "exists and is not a folder.", "give a folder path for the results.")
    given = [name for name, v in (("--prompt", args.prompt), ("--prompts", args.prompts),
                                  ("--synthetic-prompts", args.synthetic_prompts)) if v]
    if args.teacher_dataset:
        if not Path(args.teacher_dataset).is_dir():
            raise DistilleryError("teacher_dataset", args.teacher_dataset, "no such folder.",
                                  "give the folder gen-dataset wrote.")
        for name, value in (("teacher", args.teacher), ("teacher_dit", args.teacher_dit),
                            ("prompt", given[0] if given else None), ("height", args.height), ("width", args.width)):
            if value:
                raise DistilleryError(name, value, "--teacher-dataset fixes the teacher, its prompts, seeds and size.",
                                      f"drop --{name.replace('_', '-')}, or drop --teacher-dataset.")
    elif len(given) != 1:
        raise DistilleryError("prompt", given or None, "give the held-out prompts one way.",
                              "use --prompt (repeatable), --prompts FILE or --synthetic-prompts N, or "
                              "--teacher-dataset FOLDER.")
    if args.synthetic_prompts is not None and args.synthetic_prompts < 1:
        raise DistilleryError("synthetic_prompts", args.synthetic_prompts, "must be >= 1.", "use e.g. 8.")
    for name in ("weights", "lora", "teacher_dit", "baseline_dit", "clip"):
        value = getattr(args, name)
        if value and not Path(value).exists():
            raise DistilleryError(name, value, "no such file or folder.", f"check the --{name.replace('_', '-')} path.")
    if args.no_baseline and (args.baseline or args.baseline_dit):
        raise DistilleryError("no_baseline", True, "--no-baseline with --baseline/--baseline-dit.", "drop one.")


def run(args) -> dict:
    _check(args)  # before the heavy imports: a wrong argument answers at once
    from ..evaluate import HELD_OUT_PROMPT_SEED, evaluate_student, held_out_pairs
    from ..gen_dataset import read_prompts, synthetic_prompts
    from ..pipelines.loading import load_dit, load_pipeline
    from ..student import load_student
    from .sample import _placement

    prompts = seeds = None
    if not args.teacher_dataset:
        if args.prompts:
            if not Path(args.prompts).is_file():
                raise DistilleryError("prompts", args.prompts, "no such file.", "check the path of the prompts file.")
            listed = read_prompts(args.prompts)
        elif args.synthetic_prompts:
            listed = synthetic_prompts(args.synthetic_prompts, seed=HELD_OUT_PROMPT_SEED)
        else:
            listed = read_prompts(args.prompt)
        prompts, seeds = held_out_pairs(listed, args.seeds_per_prompt, args.start_seed)
    device, dtype = _placement(args.device, args.dtype)
    base = load_pipeline(args.base, device=device, dtype=dtype)
    student = load_student(base, weights=args.weights, lora=args.lora, strength=args.strength) \
        if args.weights or args.lora else base

    def other(source, dit, field):
        if source is None and dit is None:
            return base
        pipe = base if source is None else load_pipeline(source, device=device, dtype=dtype)
        return pipe.with_dit(load_dit(dit, dtype=dtype, device=device, field=field)) if dit else pipe

    teacher = None if args.teacher_dataset else other(args.teacher, args.teacher_dit, "teacher_dit")
    baseline = None if args.no_baseline else other(args.baseline, args.baseline_dit, "baseline_dit")
    note = None
    if baseline is student:
        baseline, note = None, "the student is its base (no --weights/--lora): give --baseline to compare with."
    evaluation = evaluate_student(
        student, teacher=teacher, teacher_dataset=args.teacher_dataset, baseline=baseline, prompts=prompts,
        seeds=seeds, steps=args.steps, cfg=args.cfg, teacher_steps=args.teacher_steps, teacher_cfg=args.teacher_cfg,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, rand_device=args.rand_device,
        batch_size=args.batch_size, max_pairs=args.max_pairs, clip_model=args.clip, grid_rows=args.grid_rows)
    if note:
        evaluation.metrics["notes"].insert(0, note)
        evaluation.table += f"\nnote: {note}"
    files = evaluation.save(args.out)
    report = dict(evaluation.metrics)
    report["files"] = files
    if not args.json:
        report = {"table": "\n" + evaluation.table, "files": files}
    return report
