"""`gen-dataset`: sample a teacher pipeline into a Direct-Distill dataset folder (see `dit_distillery.gen_dataset`).

Prompts are read and checked before the pipeline is loaded (loading a real teacher takes minutes); every
other check happens in the core before anything is written. Rerunning the same command resumes.
"""

from __future__ import annotations

import sys

HELP = "Generate a Direct-Distill teacher dataset (PNG + latents + DiffSynth metadata.csv) from prompts."


def add_arguments(p) -> None:
    from .sample import add_model_arguments

    add_model_arguments(p, "teacher: ")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", help="a text file with one prompt per line (blank and # lines skipped), "
                         "or the prompt text itself")
    prompts.add_argument("--synthetic-prompts", type=int, metavar="N",
                         help="use N captions of the built-in shapes task instead (the demo's prompts)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed choosing the --synthetic-prompts captions")
    p.add_argument("--out", required=True, help="dataset folder (created; an existing one is resumed)")
    p.add_argument("--seeds-per-prompt", type=int, default=1, help="rows per prompt, each with its own seed")
    p.add_argument("--start-seed", type=int, default=0,
                   help="row k of prompt p gets seed start_seed + p * seeds_per_prompt + k")
    p.add_argument("--teacher-steps", type=int, default=40, help="teacher denoising steps")
    p.add_argument("--teacher-cfg", type=float, default=4.0, help="teacher classifier-free guidance scale")
    p.add_argument("--negative-prompt", default="", help="teacher negative prompt (used when --teacher-cfg is not 1)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    p.add_argument("--student-steps", type=int, default=4, help="student steps written to num_inference_steps")
    p.add_argument("--student-cfg", type=float, default=1.0, help="student CFG written to cfg_scale")
    p.add_argument("--rand-device", default="cpu", help="device the noise is drawn on (cpu matches every machine)")
    p.add_argument("--batch-size", type=int, default=4, help="(prompt, seed) pairs sampled together")
    p.add_argument("--record-trajectory", type=int, default=0, metavar="K",
                   help="also store the teacher's latents before K of its steps (evenly spread, the first its "
                        "noise) beside each row's final latents, for the trajectory loss (0 = none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16 or fp32 (auto: bf16 on GPU, fp32 on CPU)")


def run(args) -> dict:
    from ..gen_dataset import generate_distill_dataset, read_prompts, synthetic_prompts
    from .sample import _placement, load_model, untrained_warning

    warning = untrained_warning(args.pipeline, args.dit)
    if warning:  # a teacher with random weights makes a dataset of noise
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.synthetic_prompts is not None:
        prompts = synthetic_prompts(args.synthetic_prompts, args.prompt_seed)
    else:
        prompts = read_prompts(args.prompts)
    device, dtype = _placement(args.device, args.dtype)
    pipe = load_model(args, device, dtype)
    bar = None
    if not args.json:  # a bar on a terminal, a line every 10% in a log
        from ..progress import Stages

        bar = Stages(log=lambda text: print(text, file=sys.stderr, flush=True), bars=True, file=sys.stderr)
        bar.start("teacher rows")

    def progress(done, total, **_info):
        if bar is not None:
            bar.update(done, total, unit="row")

    try:
        report = generate_distill_dataset(
            pipe, prompts, args.out, seeds_per_prompt=args.seeds_per_prompt, start_seed=args.start_seed,
            teacher_steps=args.teacher_steps, teacher_cfg=args.teacher_cfg, negative_prompt=args.negative_prompt,
            height=args.height, width=args.width, student_steps=args.student_steps, student_cfg=args.student_cfg,
            rand_device=args.rand_device, batch_size=args.batch_size, record_trajectory=args.record_trajectory,
            progress=progress)
    finally:
        if bar is not None:
            bar.close()
    report = dict(report, prompts=len(prompts), family=pipe.family, device=str(device),
                  dtype=str(dtype).replace("torch.", ""))
    if warning:
        report["warning"] = warning
    return report
