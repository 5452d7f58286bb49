"""`python -m dit_distillery train JOB.json` (also under `accelerate launch` / `torchrun` for several processes)."""

from __future__ import annotations

import sys

HELP = "run a training job (SFT or Direct Distill, LoRA or full) described by a job JSON file"


def add_arguments(parser) -> None:
    parser.add_argument("job", help="the job JSON (written by the Export Training Job node, or by hand)")
    parser.add_argument("--steps", type=int, help="override the job's number of steps")
    parser.add_argument("--out", help="override the job's output folder")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming the latest checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class _Progress:
    """A tqdm bar on a terminal (a line every 10% in a log), messages above it; all on stderr."""

    def __init__(self, quiet: bool):
        from ..progress import Stages

        self.quiet = quiet
        self.bar = Stages(log=lambda text: print(text, file=sys.stderr, flush=True), bars=True, file=sys.stderr)
        self.bar.start("train")

    def on_message(self, text):
        if not self.quiet:
            self.bar.message(text)

    def on_data_progress(self, done, total):
        pass

    def on_step(self, info):
        if not self.quiet:
            self.bar.update(info.step, info.total, loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}",
                            img_s=f"{info.images_per_s:.1f}")

    def on_validation(self, step, grid, path):
        self.on_message(f"validation images: {path}")

    def on_checkpoint(self, step, path, weights):
        self.on_message(f"checkpoint: {path}")


def run(args) -> dict:
    from ..trainer import TrainJob, train

    job = TrainJob.load(args.job)
    if args.steps is not None:
        job.steps = args.steps
    if args.out is not None:
        job.output.dir = args.out
    if args.no_resume:
        job.resume = None
    job.validate()
    progress = _Progress(args.quiet)
    try:
        result = train(job, callbacks=progress)
    finally:
        progress.bar.close()
    if not result.is_main_process:
        return None  # one report per job, from the main process
    last = result.history[-1]["loss"] if result.history else None
    return {"output_dir": str(result.output_dir), "weights": str(result.weights), "checkpoint": str(result.checkpoint),
            "steps": result.steps, "final_loss": last, "chart": str(result.chart),
            "validation": [str(p) for p in result.validation], "data": result.data, "seconds": round(result.seconds, 2)}
