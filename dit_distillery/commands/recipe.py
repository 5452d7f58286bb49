"""`recipe`: what users ask for, in one command that runs every stage (see `dit_distillery.recipes`).

    python -m dit_distillery recipe keep-lora-few-step --base models/Z-Image --turbo models/Z-Image-Turbo \\
        --lora my_style.safetensors --prompts prompts.txt --out runs/my_style_turbo
    python -m dit_distillery recipe distill-klein --base models/FLUX.2-klein-base-4B --prompts prompts.txt \\
        --out runs/klein_4step

Each stage resumes, so the same command continues a stopped run; `--until data` stops after the teacher dataset
and job.json (then `accelerate launch -m dit_distillery train OUT/job.json` on several GPUs).
"""

from __future__ import annotations

import sys

HELP = ("run a recipe end to end: keep-lora-few-step (repair your LoRA on a turbo/Lightning model by Direct "
        "Distill) or distill-klein (a base model to 4 steps, CFG 1)")

# recipe -> (student steps, LoRA file name) when not given
RECIPES = {"keep-lora-few-step": (8, "repair_lora"), "distill-klein": (4, "distill_lora")}


def add_arguments(p) -> None:
    from ..families import names

    p.add_argument("recipe", choices=sorted(RECIPES), help="which recipe")
    p.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    p.add_argument("--family", choices=names(), help="check that the base is this family (default: detected)")
    p.add_argument("--base", required=True, help="the undistilled base: a diffusers folder (e.g. Tongyi-MAI/Z-Image, "
                   "Qwen/Qwen-Image, FLUX.2-klein-base-4B) or a built-in such as tiny:z_image; gives both sides "
                   "their text encoder and VAE")
    p.add_argument("--base-dit", help="DiT file replacing the base's (e.g. ComfyUI's z_image_bf16.safetensors)")
    p.add_argument("--text-encoder", help="text encoder file replacing the base's (e.g. qwen_3_4b.safetensors)")
    p.add_argument("--vae", help="VAE file replacing the base's (e.g. ae.safetensors)")
    p.add_argument("--turbo", help="keep-lora-few-step: the step-distilled DiT (a file such as "
                   "z_image_turbo_bf16.safetensors, a transformer folder, or a pipeline folder)")
    p.add_argument("--turbo-lora", help="keep-lora-few-step: a step-distillation LoRA merged into the student's "
                   "DiT (e.g. Qwen-Image-Lightning-8steps-V1.0.safetensors)")
    p.add_argument("--turbo-lora-strength", type=float, default=1.0, help="strength of --turbo-lora")
    p.add_argument("--lora", help="keep-lora-few-step: your LoRA (trained on the base); merged on both sides")
    p.add_argument("--lora-strength", type=float, default=1.0, help="strength of --lora")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", help="a text file with one prompt per line (blank and # lines skipped), or "
                         "the prompt text itself; use prompts your LoRA is meant for (its trigger words)")
    prompts.add_argument("--synthetic-prompts", type=int, metavar="N",
                         help="N captions of the built-in shapes task instead (tests, the tiny models)")
    p.add_argument("--seeds-per-prompt", type=int, default=1, help="teacher images per prompt")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher denoising steps")
    p.add_argument("--teacher-cfg", type=float, default=4.0, help="teacher classifier-free guidance scale")
    p.add_argument("--negative-prompt", default="", help="teacher negative prompt")
    p.add_argument("--student-steps", type=int,
                   help="steps the student is trained to sample with (default: 8 for keep-lora-few-step, 4 for "
                   "distill-klein)")
    p.add_argument("--student-cfg", type=float, default=1.0, help="student CFG (1 = none)")
    p.add_argument("--student-schedule", help="the student's sigma schedule template, e.g. Qwen-Image-Lightning for "
                   "a Lightning LoRA (default: the family's)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the base pipeline's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the base pipeline's)")
    p.add_argument("--gen-batch-size", type=int, default=1, help="teacher images sampled together")
    p.add_argument("--train-steps", type=int, default=1000, help="LoRA training steps")
    p.add_argument("--rank", type=int, default=32, help="rank of the trained LoRA")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--batch-size", type=int, default=1, help="training batch size")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep every activation (faster, far more memory)")
    p.add_argument("--save-every", type=int, default=250, help="steps between checkpoints and validation images")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--until", choices=("data", "train"), default="train",
                   help="last stage to run: data (teacher dataset + job.json) or train")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="teacher and merge dtype: bf16, fp16 or fp32 (auto: bf16 on GPU, "
                   "fp32 on CPU)")


def _check_recipe(args) -> None:
    from ..errors import DistilleryError

    if args.recipe == "keep-lora-few-step":
        if not args.lora:
            raise DistilleryError("lora", None, "keep-lora-few-step needs your LoRA.", "add --lora FILE.")
        if not (args.turbo or args.turbo_lora):
            raise DistilleryError("turbo", None, "keep-lora-few-step needs the few-step model.",
                                  "add --turbo DIT (e.g. Z-Image-Turbo) or --turbo-lora LORA (e.g. a Lightning LoRA).")
    else:
        for name in ("lora", "turbo", "turbo_lora"):
            if getattr(args, name):
                raise DistilleryError(name, getattr(args, name), "distill-klein distills the base itself.",
                                      f"leave --{name.replace('_', '-')} out (or use keep-lora-few-step).")


def run(args) -> dict:
    from ..demo import LogCallbacks
    from ..gen_dataset import synthetic_prompts
    from ..progress import Stages
    from ..recipes import Inputs, RecipeSettings, run_recipe
    from .sample import _placement

    _check_recipe(args)
    steps, name = RECIPES[args.recipe]
    prompts = synthetic_prompts(args.synthetic_prompts) if args.synthetic_prompts is not None else args.prompts
    inputs = Inputs(base=args.base, base_dit=args.base_dit, text_encoder=args.text_encoder, vae=args.vae,
                    turbo=args.turbo, turbo_lora=args.turbo_lora, turbo_lora_strength=args.turbo_lora_strength,
                    lora=args.lora, lora_strength=args.lora_strength)
    settings = RecipeSettings(
        prompts=prompts, seeds_per_prompt=args.seeds_per_prompt, teacher_steps=args.teacher_steps,
        teacher_cfg=args.teacher_cfg, negative_prompt=args.negative_prompt,
        student_steps=args.student_steps or steps, student_cfg=args.student_cfg,
        student_schedule=args.student_schedule, height=args.height, width=args.width,
        gen_batch_size=args.gen_batch_size, train_steps=args.train_steps, rank=args.rank, lr=args.lr,
        batch_size=args.batch_size, gradient_checkpointing=not args.no_gradient_checkpointing,
        save_every=args.save_every, seed=args.seed, name=name)
    device, dtype = _placement(args.device, args.dtype)
    log = (lambda text: print(text, file=sys.stderr, flush=True))
    bar = Stages(log=log, bars=not args.json, file=sys.stderr)

    def data_progress(done, total, **_info):
        bar.update(done, total, unit="row")

    try:
        report = run_recipe(args.out, inputs, settings, family=args.family, device=device, dtype=dtype,
                            until=args.until, log=bar.message, data_progress=data_progress,
                            train_callbacks=LogCallbacks("train", bar.message, progress=bar), on_stage=bar.start)
    finally:
        bar.close()
    if report is not None and "weights" in report:
        model = "the few-step model + your LoRA" if args.lora else "the base"
        report["use"] = (f"{model} + {report['weights']} (strength 1), {settings.student_steps} steps, "
                         f"CFG {settings.student_cfg:g}")
    return report
