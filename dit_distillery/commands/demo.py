"""`demo`: the main job on the embedded default — teacher from scratch, teacher dataset, two distilled students."""

from __future__ import annotations

import sys

HELP = "run the embedded end-to-end demo on CPU (no download): teacher, teacher dataset, distilled students, metrics"


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (rerunning resumes finished stages)")
    p.add_argument("--preset", default="full", choices=["full", "quick"],
                   help="full: the real demo (minutes on CPU); quick: a seconds-long smoke run")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice in the demo")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core but one, at least 1: when every core runs a "
                        "thread, any other program stalls them all; on 2 cores, 2 threads were 1.5x faster on an "
                        "idle machine but 4-6x slower beside one busy process)")


def default_threads() -> int:
    """torch's threads (one per core), but one CPU left free: the demo's ops are small, so its threads wait for
    each other at every op, and a thread whose core another program takes holds up the rest (README, "Measured")."""
    import os

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cpus - 1))


def run(args) -> dict:
    from dataclasses import replace

    import torch

    from ..demo import PRESETS, run_demo, stage_names
    from ..progress import Stages

    if args.threads is not None and args.threads < 1:
        from ..errors import DistilleryError

        raise DistilleryError("--threads", args.threads, "must be at least 1.", "omit it for the default.")
    config = replace(PRESETS[args.preset], seed=args.seed)
    log = (lambda text: print(text, file=sys.stderr, flush=True))
    # a bar per stage on a terminal; in a log (not a terminal) a line at every 10% of a stage
    stages = Stages(stage_names(config), log=log, bars=True, file=sys.stderr)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        metrics = run_demo(args.out, config, progress=stages)
    finally:
        torch.set_num_threads(before)  # the caller's (tests call the CLI in-process)
    summary = {name: {"latent_mse": m["latent_mse"], "accuracy": m["accuracy"]["all"]}
               for name, m in metrics.items() if isinstance(m, dict) and "latent_mse" in m}
    return {"out": args.out, "metrics": f"{args.out}/metrics.json", "grid": metrics["files"]["grid"],
            "teacher_accuracy": metrics["teacher"]["accuracy"], "results": summary, "seconds": metrics["seconds"]}
