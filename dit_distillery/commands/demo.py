"""`demo`: the main job on the embedded default — teacher from scratch, teacher dataset, two distilled students."""

from __future__ import annotations

import sys

HELP = "run the embedded end-to-end demo on CPU (no download): teacher, teacher dataset, distilled students, metrics"


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (rerunning resumes finished stages)")
    p.add_argument("--preset", default="full", choices=["full", "quick"],
                   help="full: the real demo (minutes on CPU); quick: a seconds-long smoke run")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice in the demo")


def run(args) -> dict:
    from dataclasses import replace

    from ..demo import PRESETS, run_demo, stage_names
    from ..progress import Stages

    config = replace(PRESETS[args.preset], seed=args.seed)
    log = (lambda text: print(text, file=sys.stderr, flush=True))
    # a bar per stage on a terminal; in a log (not a terminal) a line at every 10% of a stage
    stages = Stages(stage_names(config), log=log, bars=True, file=sys.stderr)
    metrics = run_demo(args.out, config, progress=stages)
    summary = {name: {"latent_mse": m["latent_mse"], "accuracy": m["accuracy"]["all"]}
               for name, m in metrics.items() if isinstance(m, dict) and "latent_mse" in m}
    return {"out": args.out, "metrics": f"{args.out}/metrics.json", "grid": metrics["files"]["grid"],
            "teacher_accuracy": metrics["teacher"]["accuracy"], "results": summary, "seconds": metrics["seconds"]}
