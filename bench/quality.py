"""Quality experiments on the embedded synthetic task, and the one command that turns them into a report.

    python bench/quality.py                 # every stage (resumes: finished stages are reused)
    python bench/quality.py --only report   # re-render bench/results/quality.md from the cached runs

Three questions, all answered on ONE teacher: the demo's (`dit_distillery.demo`: a 0.85M-parameter AAADiT trained
from scratch on centred synthetic shapes, 32x32, lossless `PixelCodec(4)`), trained once under `--out`:

1. **From scratch** (stage `curve`): the teacher's run keeps every checkpoint; each is sampled on fixed held-out
   prompt/seed pairs and scored by `data.synthetic.classify_image` (colour / shape / background), giving
   prompt-following accuracy against training steps and wall time.
2. **Direct Distill** (stage `distill`): LoRA students distilled from the same teacher dataset with the same budget
   and seeds, comparing our defaults (stored teacher latents as target, the student trained on the sigma schedule
   it samples with) against DiffSynth's exact recipe (the teacher image as an 8-bit JPEG re-encoded by the codec,
   mu = 0.8), and the two factors separately. Each is scored against the 50-step CFG-4 teacher next to the
   undistilled teacher at 4 steps CFG 1.
3. **Which blocks to drop** (stage `shrink`): every 2-of-4-block student (the last block always kept), labelled with
   the strategies that choose it (uniform / first / interval / importance), before and after the same
   full-weight distillation budget.

Held-out pairs are the demo's (`demo.eval_pairs`: seeds from `demo.EVAL_SEED_OFFSET`, never in the teacher
dataset). Every stage writes its results as JSON under `--out`; the `report` stage only reads them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from dit_distillery.demo import QUICK, DemoConfig, LogCallbacks, colour_shape_accuracy, eval_pairs, job_for  # noqa: E402
from dit_distillery.errors import DistilleryError  # noqa: E402
from dit_distillery.tiny import DEFAULT_DIT  # noqa: E402
from dit_distillery.formats import atomic_output, atomic_write_json, atomic_write_text, save_safetensors  # noqa: E402

STAGES = ("teacher", "curve", "data", "distill", "shrink", "report")
OUT = ROOT / "bench" / "out" / "quality"
STRATEGIES = ("uniform", "first", "interval", "importance")

# Direct-Distill variants: name -> (dataset, loss target, mu policy, label). "latents" is the teacher dataset as
# gen-dataset writes it; "jpeg" is the same rows as DiffSynth's example stores them (see `write_jpeg_dataset`).
DISTILL_RUNS = {
    "ours": ("latents", "latents", "resolution", "ours: stored latents, μ of the resolution"),
    "latents_mu08": ("latents", "latents", "diffsynth", "stored latents, μ 0.8"),
    "jpeg_resolution": ("jpeg", "image", "resolution", "JPEG image, μ of the resolution"),
    "diffsynth": ("jpeg", "image", "diffsynth", "DiffSynth: JPEG image, μ 0.8"),
}
# Our recipe with more budget: name -> (mode, step multiplier, teacher-row multiplier, label). How far the main runs
# are from the goal because of the steps, the capacity (a rank-16 LoRA against every weight) or the data (the
# teacher dataset's rows); full weights use the demo's full-weight learning rate (`shrunk_lr`). A larger teacher
# dataset starts with the same prompts and seeds (`synthetic_prompts` and `seed_for` are prefix-stable).
BUDGET_RUNS = {
    "ours_lora_x4": ("lora", 4, 1, "ours, LoRA, 4x the steps"),
    "ours_lora_x8": ("lora", 8, 1, "ours, LoRA, 8x the steps"),
    "ours_full": ("full", 1, 1, "ours, full weights"),
    "ours_full_x4": ("full", 4, 1, "ours, full weights, 4x the steps"),
    "ours_lora_x4_rows_x4": ("lora", 4, 4, "ours, LoRA, 4x the steps, 4x the teacher rows"),
}


@dataclass
class QualityConfig:
    name: str = "full"
    # teacher, dataset, students: the demo's settings when these runs were made (the demo now uses the "4x steps,
    # 4x rows" budget found here; pinned so the cached runs and the report stay what they were)
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(
        eval_pairs=64, distill_prompts=96, distill_seeds=2, teacher_steps=1500, teacher_lr=1e-3, lora_steps=300,
        lora_lr=2e-3, shrunk_steps=300, shrunk_lr=5e-4))
    checkpoint_every: int = 100  # teacher checkpoints on the accuracy curve
    calibration_batches: int = 4  # importance scores: batches of teacher-dataset rows
    calibration_batch: int = 8
    jpeg_quality: int = 75  # PIL's default: DiffSynth's example `image.save("image.jpg")`
    max_block_sets: int = 6  # shrink: try every kept set when there are at most this many, else the strategies'


PRESETS = {
    "full": QualityConfig(),
    # seconds-long: proves every stage and the report run (tests/test_quality_smoke.py); numbers are meaningless
    "smoke": QualityConfig(name="smoke", demo=replace(QUICK, teacher_steps=20, lora_steps=2, shrunk_steps=2,
                                                      eval_pairs=4, grid_rows=2, teacher_sample_steps=6),
                           checkpoint_every=10, calibration_batches=1, calibration_batch=4),
}


def _log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# The context: paths, the shared pipeline pieces, cached evaluations

class Run:
    """One experiment folder: its config (guarded), the base pipeline, the held-out pairs and the reference."""

    def __init__(self, out: Path, cfg: QualityConfig, log=_log):
        self.out, self.cfg, self.d, self.log = Path(out), cfg, cfg.demo, log
        self._base = self._reference = None
        self.prompts, self.seeds = eval_pairs(self.d)

    # -- paths
    @property
    def data(self) -> Path:
        return self.out / "data"

    def teacher_data(self, rows: int = 1) -> Path:
        """The teacher dataset, or a `rows`-times larger one (for a budget run)."""
        return self.out / ("distill_data" if rows == 1 else f"distill_data_x{rows}")

    @property
    def teacher_file(self) -> Path:
        return self.out / "teacher" / "teacher.safetensors"

    def need(self, path: Path, stage: str) -> Path:
        if not path.exists():
            raise DistilleryError("stage", stage, f"needs {path}, which an earlier stage writes.",
                                  "run without --only (finished stages are reused), or run that stage first.")
        return path

    def check_config(self) -> None:
        """One folder holds one configuration: results made with other settings must not be mixed in."""
        path, now = self.out / "config.json", json.loads(json.dumps(asdict(self.cfg)))
        if path.is_file():
            old = json.loads(path.read_text())
            if old != now:
                diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
                raise DistilleryError("out", str(self.out), f"holds runs made with other settings ({diff}).",
                                      "use another --out folder, or delete this one to start over.")
        else:
            atomic_write_json(path, now)

    # -- pipelines
    def base(self):
        """The default pipeline (prompt encoder + codec shared by every DiT here; its DiT is the random init)."""
        if self._base is None:
            from dit_distillery.pipelines.loading import load_pipeline

            self._base = load_pipeline("default")  # seed 0, as the trainer builds it for every job here
        return self._base

    def pipe(self, dit_file):
        from dit_distillery.pipelines.loading import load_dit

        return self.base().with_dit(load_dit(dit_file))

    def images(self, latents: torch.Tensor) -> list:
        from dit_distillery.pipelines.base import to_pil

        return to_pil(self.base().decode(latents))

    # -- evaluation on the held-out pairs
    def sample(self, pipe, steps: int, cfg: float):
        return pipe.sample(self.prompts, seeds=self.seeds, steps=steps, cfg_scale=cfg, height=self.d.size,
                           width=self.d.size, output="both")

    def reference(self):
        """The 50-step CFG-4 teacher's latents and pixels on the held-out pairs (computed once)."""
        if self._reference is None:
            path = self.out / "eval" / "reference.safetensors"
            if not path.is_file():
                self.log("[eval] reference: the teacher at "
                         f"{self.d.teacher_sample_steps} steps, CFG {self.d.teacher_cfg:g}")
                result = self.sample(self.pipe(self.need(self.teacher_file, "eval")), self.d.teacher_sample_steps,
                                     self.d.teacher_cfg)
                save_safetensors({"latents": result.latents, "pixels": result.pixels}, path)
            from safetensors.torch import load_file

            self._reference = load_file(str(path))
        return self._reference

    def evaluate(self, name: str, make_pipe, steps: int, cfg: float, **extra) -> dict:
        """Latent MSE, PSNR and accuracy of a model against the reference; cached in eval/<name>.json."""
        path = self.out / "eval" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        ref = self.reference()
        result = self.sample(make_pipe(), steps, cfg)
        metrics = dict(name=name, steps=steps, cfg=cfg, **score(result.latents, result.pixels, ref, result.images,
                                                                self.prompts), **extra)
        save_safetensors({"latents": result.latents}, self.out / "eval" / f"{name}.safetensors")
        atomic_write_json(path, metrics)
        self.log(f"[eval] {name}: latent MSE {metrics['latent_mse']:.5f}, PSNR {_db(metrics['psnr_db'])}, "
                 f"accuracy {metrics['accuracy']['all']:.1%}")
        return metrics

    def train_pairs_mse(self, name: str, make_pipe) -> float:
        """Latent MSE on the teacher dataset's own (prompt, seed) rows against their stored targets, at the
        student's settings (eval/<name>.train.json): next to the held-out MSE it shows how much a student has
        fitted its training rows rather than learnt the teacher."""
        path = self.out / "eval" / f"{name}.train.json"
        if path.is_file():
            return json.loads(path.read_text())["latent_mse"]
        from safetensors.torch import load_file

        from dit_distillery.data.metadata import read_metadata

        rows = read_metadata(self.teacher_data()).rows
        target = torch.stack([load_file(str(r.latents))["latents"] for r in rows])
        result = make_pipe().sample([r.prompt for r in rows], seeds=[r.seed for r in rows], steps=self.d.student_steps,
                                    cfg_scale=self.d.student_cfg, height=self.d.size, width=self.d.size,
                                    output="latent")
        mse = float(((result.latents - target) ** 2).mean())
        atomic_write_json(path, {"latent_mse": mse, "rows": len(rows)})
        return mse

    def eval_images(self, name: str) -> list | None:
        path = self.out / "eval" / f"{name}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return self.images(load_file(str(path))["latents"])


def score(latents, pixels, ref: dict, images, prompts) -> dict:
    """Per-pair latent MSE and image PSNR against the reference, their means, and prompt accuracy.

    PSNR is over decoded pixels in [-1, 1] (peak-to-peak 2, i.e. the usual PSNR of [0, 1] images), per image then
    averaged; an image equal to the reference has no finite PSNR and is left out of the mean (counted)."""
    mse = ((latents.float() - ref["latents"].float()) ** 2).flatten(1).mean(1)
    pix = ((pixels.float() - ref["pixels"].float()) ** 2).flatten(1).mean(1)
    psnr = [10 * math.log10(4.0 / float(p)) for p in pix if p > 0]
    n = len(mse)
    return {"latent_mse": float(mse.mean()), "latent_mse_se": float(mse.std() / math.sqrt(n)) if n > 1 else 0.0,
            "latent_mse_per_pair": [float(x) for x in mse], "pixel_mse": float(pix.mean()),
            "psnr_db": sum(psnr) / len(psnr) if psnr else None, "identical_images": n - len(psnr),
            "accuracy": colour_shape_accuracy(images, prompts), "pairs": n}


def _db(x) -> str:
    return "∞" if x is None else f"{x:.2f} dB"


class _Clock(LogCallbacks):
    """The demo's progress log, plus the run's wall time at every checkpoint (teacher/checkpoint_times.json).

    Wall time = seconds since this `train()` call began (data caching, the step-0 held-out loss, steps and
    checkpoint writes included), added to the time the run had reached at the checkpoint it resumed from."""

    def __init__(self, path: Path, log, resumed_step: int):
        super().__init__("teacher", log)
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {"0": 0.0}
        self.offset = self.times.get(str(resumed_step))
        self.start = time.perf_counter()

    def on_checkpoint(self, step, path, weights):
        elapsed = time.perf_counter() - self.start
        self.times[str(step)] = None if self.offset is None else round(self.offset + elapsed, 2)
        atomic_write_json(self.path, self.times)


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the teacher, and its accuracy along the way

def stage_teacher(run: Run) -> None:
    """The demo's teacher job (dit_distillery.demo.run_demo, step 2), keeping every checkpoint."""
    from dit_distillery.data.synthetic import write_dataset
    from dit_distillery.trainer import train
    from dit_distillery.trainer.state import latest_checkpoint

    d = run.d
    if not (run.data / "metadata.csv").is_file():
        write_dataset(run.data, d.samples, seed=d.seed, size=d.size)
    folder = run.out / "teacher"
    job = job_for(folder, data={"path": str(run.data), "height": d.size, "width": d.size, "caption_dropout": 0.1},
               loss={"kind": "flow_matching"}, mode="full", steps=d.teacher_steps, batch_size=d.teacher_batch,
               gradient_checkpointing=False, seed=d.seed,
               optim={"lr": d.teacher_lr, "warmup_steps": min(100, d.teacher_steps // 10), "schedule": "cosine",
                      "min_lr_ratio": 0.1, "weight_decay": 0.0},
               output={"name": "teacher", "save_dtype": "fp32", "save_every": run.cfg.checkpoint_every,
                       "keep_last": 0},
               validation={"eval_samples": 32})
    last = latest_checkpoint(folder / "checkpoints")
    done = int(last.name.split("-")[1]) if last else 0
    if done >= d.teacher_steps and run.teacher_file.is_file():
        return
    clock = _Clock(folder / "checkpoint_times.json", run.log, done)
    train(job, callbacks=clock)


def stage_curve(run: Run) -> None:
    """Accuracy of every teacher checkpoint (and the random initial model) on the held-out pairs."""
    from dit_distillery.trainer.state import list_checkpoints

    d = run.d
    folder = run.out / "teacher"
    checkpoints = {0: None} | {int(p.name.split("-")[1]): p / "teacher.safetensors"
                               for p in list_checkpoints(run.need(folder / "checkpoints", "curve"))}
    for step, weights in checkpoints.items():
        path = run.out / "curve" / f"step-{step:07d}.json"
        if path.is_file():
            continue
        pipe = run.pipe(weights) if weights is not None else run.base()  # step 0: the job's random initial DiT
        point = {"step": step}
        for key, steps, cfg in (("teacher_settings", d.teacher_sample_steps, d.teacher_cfg),
                                ("student_settings", d.student_steps, d.student_cfg)):
            result = run.sample(pipe, steps, cfg)
            point[key] = {"steps": steps, "cfg": cfg, "accuracy": colour_shape_accuracy(result.images, run.prompts)}
            if key == "teacher_settings":
                save_safetensors({"latents": result.latents}, path.with_suffix(".safetensors"))
        atomic_write_json(path, point)
        run.log(f"[curve] step {step}: {point['teacher_settings']['accuracy']}")


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the teacher dataset, DiffSynth's JPEG copy of it, and the classifier's own accuracy

def stage_data(run: Run) -> None:
    from dit_distillery.gen_dataset import generate_distill_dataset, synthetic_prompts

    d = run.d
    teacher = run.pipe(run.need(run.teacher_file, "data"))
    for rows in sorted({1} | {r for _, _, r, _ in BUDGET_RUNS.values()}):
        report = generate_distill_dataset(teacher, synthetic_prompts(d.distill_prompts * rows, seed=d.seed + 1),
                                          run.teacher_data(rows), seeds_per_prompt=d.distill_seeds,
                                          start_seed=d.seed, teacher_steps=d.teacher_sample_steps,
                                          teacher_cfg=d.teacher_cfg, height=d.size, width=d.size,
                                          student_steps=d.student_steps, student_cfg=d.student_cfg, batch_size=32)
        run.log(f"[data] teacher dataset x{rows}: {report['rows_written']} rows written, "
                f"{report['rows_skipped']} reused")
    write_jpeg_dataset(run.teacher_data(), run.out / "distill_jpeg", run.base().codec, run.cfg.jpeg_quality)
    path = run.out / "classifier_check.json"
    if not path.is_file():
        atomic_write_json(path, classifier_check(run.data, run.cfg.jpeg_quality))


def write_jpeg_dataset(src: Path, dst: Path, codec, quality: int) -> Path:
    """The teacher dataset as DiffSynth's Direct-Distill example stores it.

    Each row's image is made from the teacher's stored final latents the way DiffSynth's pipeline makes its
    output: decoded, then `((x + 1) * 127.5).clip(0, 255).to(uint8)` (a truncation, `vae_output_to_image`), saved
    with `image.save("<name>.jpg")` (PIL's defaults: quality 75, 4:2:0 chroma). The metadata has DiffSynth's
    columns only (no `latents`), so the student's target is the codec's encoding of that JPEG. Written once."""
    from PIL import Image
    from safetensors.torch import load_file

    from dit_distillery.data.metadata import read_metadata

    meta = dst / "metadata.csv"
    if meta.is_file():
        return meta
    rows = read_metadata(src)
    lines = ["image,prompt,seed,rand_device,num_inference_steps,cfg_scale"]
    for row in rows:
        latents = load_file(str(row.latents))["latents"]
        pixels = codec.decode(latents[None].to(codec.device, codec.dtype)).float().cpu()[0]
        array = ((pixels + 1) * 127.5).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        name = f"images/{row.image.stem}.jpg"
        with atomic_output(dst / name) as tmp:
            Image.fromarray(array).save(tmp, format="JPEG", quality=quality)
        prompt = '"' + row.prompt.replace('"', '""') + '"'
        cfg = int(row.cfg_scale) if float(row.cfg_scale).is_integer() else row.cfg_scale
        lines.append(f"{name},{prompt},{row.seed},{row.rand_device},{row.num_inference_steps},{cfg}")
    atomic_write_text(meta, "\n".join(lines) + "\n")  # last: a folder with metadata.csv is complete
    return meta


def classifier_check(data: Path, quality: int) -> dict:
    """How often `classify_image` reads the ground truth back from the clean training images, and from the same
    images after a JPEG round trip: the ceiling of every accuracy in the report."""
    import csv
    import io

    from PIL import Image

    from dit_distillery.data.synthetic import classify_image

    rows = list(csv.DictReader((data / "metadata.csv").open(encoding="utf-8")))
    out = {}
    for kind in ("png", "jpeg"):
        hits = {"colour": 0, "shape": 0, "background": 0, "all": 0}
        for r in rows:
            image = Image.open(data / r["image"]).convert("RGB")
            if kind == "jpeg":
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=quality)
                image = Image.open(buffer).convert("RGB")
            got = dict(zip(("colour", "shape", "background"), classify_image(image)))
            ok = {k: got[k] == r[k] for k in ("colour", "shape", "background")}
            for k, v in ok.items():
                hits[k] += v
            hits["all"] += all(ok.values())
        out[kind] = {k: v / len(rows) for k, v in hits.items()}
    out["images"] = len(rows)
    return out


# ----------------------------------------------------------------------------------------------------------
# Stage 3: Direct Distill, ours against DiffSynth's recipe

def _distill_job(run: Run, folder: Path, data: Path, loss: dict, mode: str, dit: Path, steps: int, lr: float,
                 **extra):
    """The demo's student jobs (dit_distillery.demo.run_demo, steps 4-5) with a chosen dataset and loss."""
    d = run.d
    return job_for(folder, model={"pipeline": "default", "dit": str(dit)}, mode=mode, steps=steps,
                data={"path": str(data), "height": d.size, "width": d.size}, loss={"kind": "direct_distill", **loss},
                batch_size=d.distill_batch, gradient_checkpointing=True, seed=d.seed,
                optim={"lr": lr, "warmup_steps": min(20, steps // 10), "weight_decay": 0.0},
                output={"name": "student", "save_dtype": "fp32"}, **extra)


def _train_once(run: Run, folder: Path, job, stage: str) -> dict:
    """Train (resuming) unless the run's record exists; the record keeps the training seconds and final loss."""
    from dit_distillery.trainer import train

    record = folder / "run.json"
    if record.is_file():
        return json.loads(record.read_text())
    result = train(job, callbacks=LogCallbacks(stage, run.log, every=100))
    info = {"weights": str(result.weights), "steps": result.steps, "train_seconds": round(result.seconds, 1),
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "note": None if len(result.history) == result.steps else "resumed: seconds cover the last segment"}
    atomic_write_json(record, info)
    return info


def stage_distill(run: Run) -> None:
    from dit_distillery.student import load_student

    d = run.d
    teacher_file = run.need(run.teacher_file, "distill")
    datasets = {"latents": run.need(run.teacher_data(), "distill"),
                "jpeg": run.need(run.out / "distill_jpeg" / "metadata.csv", "distill").parent}
    teacher = run.pipe(teacher_file)
    run.evaluate("teacher_4step", lambda: teacher, d.student_steps, d.student_cfg)
    run.train_pairs_mse("teacher_4step", lambda: teacher)
    for name, (data, target, mu, _) in DISTILL_RUNS.items():
        folder = run.out / "distill" / name
        job = _distill_job(run, folder, datasets[data], {"mu": mu, "target": target}, "lora", teacher_file,
                           d.lora_steps, d.lora_lr, lora={"rank": d.lora_rank})
        info = _train_once(run, folder, job, f"distill {name}")
        make = (lambda: load_student(teacher, lora=info["weights"]))
        run.evaluate(f"distill_{name}", make, d.student_steps, d.student_cfg, train=info)
        run.train_pairs_mse(f"distill_{name}", make)
    for name, (mode, times, rows, _) in BUDGET_RUNS.items():
        folder = run.out / "distill" / name
        lora = {"lora": {"rank": d.lora_rank}} if mode == "lora" else {}
        data = run.need(run.teacher_data(rows), "distill")
        job = _distill_job(run, folder, data, {"mu": "resolution", "target": "latents"}, mode,
                           teacher_file, d.lora_steps * times, d.lora_lr if mode == "lora" else d.shrunk_lr, **lora)
        info = _train_once(run, folder, job, f"distill {name}")
        student = (lambda: load_student(teacher, lora=info["weights"])) if mode == "lora" else \
            (lambda: run.pipe(info["weights"]))
        run.evaluate(f"distill_{name}", student, d.student_steps, d.student_cfg, train=info)
        run.train_pairs_mse(f"distill_{name}", student)


# ----------------------------------------------------------------------------------------------------------
# Stage 4: which blocks to drop

def importance_scores(run: Run, teacher) -> list[float]:
    """ShortGPT's block influence (`shrink.blocks.block_influence`) averaged over calibration batches: teacher-
    dataset latents noised at sigmas spread evenly over (0, 1), with their prompts; fixed noise (seed)."""
    from safetensors.torch import load_file

    from dit_distillery.data.metadata import read_metadata
    from dit_distillery.shrink.blocks import block_influence

    rows = read_metadata(run.need(run.teacher_data(), "shrink")).rows
    n, b = run.cfg.calibration_batches, run.cfg.calibration_batch
    g = torch.Generator().manual_seed(run.d.seed)
    total = None
    for k in range(n):
        chunk = [rows[(k * b + i) % len(rows)] for i in range(b)]
        x0 = torch.stack([load_file(str(r.latents))["latents"] for r in chunk])
        sigma = (torch.arange(b) + 0.5) / b
        s4 = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s4) * x0 + s4 * torch.randn(x0.shape, generator=g)
        scores = block_influence(teacher.dit, x_t, sigma, teacher.encode_prompts([r.prompt for r in chunk]))
        total = scores if total is None else [a + s for a, s in zip(total, scores)]
    return [s / n for s in total]


def block_sets(num_blocks: int, layers: int, scores: list[float], limit: int) -> dict[tuple[int, ...], list[str]]:
    """Kept block sets to compare -> the strategies that choose each. Every set (the last block always kept) when
    there are at most `limit`, so the strategies are ranked against all the alternatives; else theirs only."""
    from dit_distillery.shrink.plan import select_blocks

    sets: dict[tuple[int, ...], list[str]] = {}
    if math.comb(num_blocks - 1, layers - 1) <= limit:
        for rest in itertools.combinations(range(num_blocks - 1), layers - 1):
            sets[(*rest, num_blocks - 1)] = []
    for strategy in STRATEGIES:
        kept = select_blocks(strategy, num_blocks, layers, scores=scores if strategy == "importance" else None)
        sets.setdefault(tuple(kept), []).append(strategy)
    return dict(sorted(sets.items()))


def stage_shrink(run: Run) -> None:
    from dit_distillery.models.registry import save_dit
    from dit_distillery.shrink.blocks import drop_blocks

    d = run.d
    teacher_file = run.need(run.teacher_file, "shrink")
    teacher = run.pipe(teacher_file)
    path = run.out / "shrink" / "importance.json"
    if not path.is_file():
        atomic_write_json(path, {"scores": importance_scores(run, teacher)})
    scores = json.loads(path.read_text())["scores"]
    sets = block_sets(len(scores), d.shrunk_layers, scores, run.cfg.max_block_sets)
    atomic_write_json(run.out / "shrink" / "sets.json",
                      {"scores": scores, "sets": [{"kept": list(k), "strategies": v} for k, v in sets.items()]})
    for kept, strategies in sets.items():
        name = "keep_" + "_".join(map(str, kept))
        folder = run.out / "shrink" / name
        initial = folder / "initial.safetensors"
        if not initial.is_file():
            small, _ = drop_blocks(teacher.dit, strategy="list", keep_blocks=list(kept))
            save_dit(small, initial, provenance={"source": str(teacher_file), "kept": list(kept)})
        extra = dict(kept=list(kept), strategies=strategies)
        run.evaluate(f"{name}_before", lambda: run.pipe(initial), d.student_steps, d.student_cfg, **extra)
        run.evaluate(f"{name}_before_teacher_settings", lambda: run.pipe(initial), d.teacher_sample_steps,
                     d.teacher_cfg, **extra)
        job = _distill_job(run, folder, run.teacher_data(), {"mu": "resolution", "target": "latents"}, "full",
                           initial, d.shrunk_steps, d.shrunk_lr)
        info = _train_once(run, folder, job, f"shrink {name}")
        run.evaluate(f"{name}_after", lambda: run.pipe(info["weights"]), d.student_steps, d.student_cfg,
                     train=info, **extra)


# ----------------------------------------------------------------------------------------------------------
# Stage 5: the report

def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def collect(run: Run) -> dict:
    """Everything the stages wrote, in one dict (the report's JSON)."""
    out = run.out
    curve = [json.loads(p.read_text()) for p in sorted((out / "curve").glob("step-*.json"))]
    times = _load(out / "teacher" / "checkpoint_times.json") or {}
    for point in curve:
        point["wall_s"] = times.get(str(point["step"]))
    history = [json.loads(line) for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()] \
        if (out / "teacher" / "metrics.jsonl").is_file() else []
    every = run.cfg.checkpoint_every
    for point in curve:  # the mean training loss over the steps since the previous checkpoint
        losses = [h["loss"] for h in history if point["step"] - every < h["step"] <= point["step"]]
        point["train_loss"] = sum(losses) / len(losses) if losses and point["step"] else None
    evals = {p.stem: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*.json"))
             if not p.name.endswith(".train.json")}
    train_mse = {p.name[:-len(".train.json")]: json.loads(p.read_text())["latent_mse"]
                 for p in sorted((out / "eval").glob("*.train.json"))}
    reference = None
    if (out / "eval" / "reference.safetensors").is_file():
        ref = run.reference()
        from dit_distillery.pipelines.base import to_pil

        reference = {"accuracy": colour_shape_accuracy(to_pil(ref["pixels"]), run.prompts),
                     "steps": run.d.teacher_sample_steps, "cfg": run.d.teacher_cfg}
    return {"config": asdict(run.cfg), "eval_pairs": {"prompts": run.prompts, "seeds": run.seeds},
            "classifier_check": _load(out / "classifier_check.json"), "curve": curve,
            "teacher_parameters": sum(p.numel() for p in run.base().dit.parameters()),
            "teacher_dit": dict(DEFAULT_DIT), "reference": reference, "evals": evals, "train_pairs_mse": train_mse,
            "shrink": _load(out / "shrink" / "sets.json"),
            "seconds": _load(out / "stage_seconds.json") or {}}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _acc_cells(acc: dict | None) -> list[str]:
    return ["—"] * 4 if acc is None else [_pct(acc[k]) for k in ("colour", "shape", "background", "all")]


def write_report(run: Run, results: Path, command: str) -> list[Path]:
    data = collect(run)
    d = run.d
    rec = {"benchmark": "quality", "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "machine": common.machine("cpu"), "versions": common.versions(), "git": common.git_commit(),
           "load_average": list(__import__("os").getloadavg()), **data}
    charts, lines = [], [*_header(rec)]
    lines += _section_setup(rec, d)
    curve_lines, curve_charts = _section_curve(rec, d)
    distill_lines, distill_charts = _section_distill(rec, d)
    shrink_lines, shrink_charts = _section_shrink(rec, d)
    lines += curve_lines + distill_lines + shrink_lines + _section_caveats(rec, d)
    charts += curve_charts + distill_charts + shrink_charts
    written = common.write_results(results, "quality", rec, "\n".join(lines) + "\n", charts)
    for suffix, grid in _grids(run, rec):
        path = results / f"quality{suffix}.png"
        with atomic_output(path) as tmp:
            grid.save(tmp, format="PNG")
        written.append(path)
    return written


def _header(rec: dict) -> list[str]:
    m, v, g = rec["machine"], rec["versions"], rec["git"]
    secs = rec["seconds"]
    lines = ["# Quality experiments (embedded synthetic task, CPU)", "",
             "Generated by `bench/quality.py` from its cached runs; regenerate with the command below "
             "(`--only report` re-renders without training).", "", f"`{rec['command']}`", "",
             f"Machine: {m['device']} ({m['cpu_cores']} cores shared with other jobs, {m['ram_gib']} GiB RAM), "
             f"{m['os']}; load average at report time {rec['load_average'][0]:.1f}.  ",
             f"Python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, transformers "
             f"{v['transformers']}, peft {v['peft']}, accelerate {v['accelerate']}, safetensors {v['safetensors']}.  ",
             f"Commit {(g['commit'] or '?')[:12]}" + (f" (+{g['dirty_files']} uncommitted tracked files)"
                                                     if g["dirty_files"] else "") + f"; {rec['date']}.", ""]
    if rec["config"]["name"] != "full":
        lines += [f"**Preset `{rec['config']['name']}`: a smoke run whose numbers mean nothing.**", ""]
    if secs:
        total = sum(secs[k] for k in STAGES if k in secs)
        lines += [f"Compute per stage (s, {secs.get('threads', '?')} torch thread(s), training on "
                  f"{secs.get('training_device', '?')}): "
                  + ", ".join(f"{k} {secs[k]:.0f}" for k in STAGES if k in secs)
                  + f"; {total / 60:.0f} minutes in all. Step counts are the demo's (teacher "
                  f"{rec['config']['demo']['teacher_steps']}, students {rec['config']['demo']['lora_steps']}), sized "
                  "for a shared 2-core CPU, plus the budget runs of section 2.", ""]
    return lines


def _section_setup(rec: dict, d: DemoConfig) -> list[str]:
    cc = rec["classifier_check"]
    lines = ["## Set-up", "",
             f"* **Task**: {d.samples} synthetic {d.size}x{d.size} images, a shape (5 kinds) of one colour on a "
             "background of another (8 colours), centred, captioned \"a red circle on a blue background\" "
             "(`data.synthetic`, the demo's default).",
             f"* **Teacher**: the demo's AAADiT (width {rec['teacher_dit']['width']} x "
             f"{rec['teacher_dit']['num_blocks']} blocks, {rec['teacher_parameters'] / 1e6:.2f}M parameters, "
             f"lossless `PixelCodec(4)`, tiny Qwen3 text encoder) trained from scratch: {d.teacher_steps} steps, "
             f"batch {d.teacher_batch}, lr {d.teacher_lr:g} (warm-up, cosine to 0.1x), DiffSynth's SFT sigma "
             "sampling and weights, captions dropped 10% of the time.",
             f"* **Teacher dataset**: {d.distill_prompts} prompts x {d.distill_seeds} seeds sampled by the teacher at "
             f"{d.teacher_sample_steps} steps CFG {d.teacher_cfg:g} (`gen_dataset`).",
             f"* **Held-out evaluation**: {len(rec['eval_pairs']['seeds'])} (prompt, seed) pairs, seeds "
             f"{rec['eval_pairs']['seeds'][0]}.. never in the teacher dataset. Latent MSE and PSNR are measured "
             f"against the teacher at {d.teacher_sample_steps} steps CFG {d.teacher_cfg:g} from the same noise; "
             "± is the standard error over pairs. Students sample at "
             f"{d.student_steps} steps CFG {d.student_cfg:g} on the pipeline's own schedule (the resolution's μ, as "
             "DiffSynth's and diffusers' inference do).",
             "* **Classifier** (`data.synthetic.classify_image`): background = most common palette colour (nearest "
             "RGB) on the border; shape colour = most common other palette colour; shape = the vocabulary shape "
             "whose drawing in the mask's bounding box overlaps the mask best (IoU). No learnt model."]
    if cc:
        lines.append(f"  On the {cc['images']} clean training images it reads colour/shape/background/all "
                     f"{' / '.join(_acc_cells(cc['png']))}; after a JPEG (quality 75) round trip "
                     f"{' / '.join(_acc_cells(cc['jpeg']))}: the ceiling of every accuracy below.")
    return lines + [""]


def _section_curve(rec: dict, d: DemoConfig) -> tuple[list[str], list]:
    curve = rec["curve"]
    lines = ["## 1. From scratch: prompt-following accuracy against training", ""]
    if not curve:
        return lines + ["Not run yet (stage `curve`).", ""], []
    lines += [f"Every {rec['config']['checkpoint_every']}-step checkpoint of the teacher run, sampled on the held-out "
              f"pairs. Wall time: seconds since the run's `train()` call (data caching, held-out loss, checkpoint "
              "writes included), recorded by a callback at each checkpoint and carried across resumed segments; "
              "one thread on a shared 2-core CPU, so read it as an order of magnitude.", "",
              *common.md_table(["step", "wall s", "colour", "shape", "background", "all",
                                f"all @ {d.student_steps} steps CFG {d.student_cfg:g}", "train loss"],
                               [[p["step"], common.fmt(p["wall_s"], ".0f"),
                                 *_acc_cells(p["teacher_settings"]["accuracy"]),
                                 _pct(p["student_settings"]["accuracy"]["all"]),
                                 common.fmt(p["train_loss"], ".4f")] for p in curve]), "",
              f"Accuracy columns: {d.teacher_sample_steps} steps CFG {d.teacher_cfg:g}. Train loss: the mean SFT loss "
              "(DiffSynth-weighted) over the steps since the previous checkpoint.",
              ""]
    walls = [(a["step"], b["step"], b["wall_s"] - a["wall_s"]) for a, b in zip(curve, curve[1:])
             if a.get("wall_s") is not None and b.get("wall_s") is not None]
    if walls:
        fast, slow = min(walls, key=lambda w: w[2]), max(walls, key=lambda w: w[2])
        lines += [f"Checkpoint intervals took {fast[2]:.0f} s (steps {fast[0]}-{fast[1]}) to {slow[2]:.0f} s (steps "
                  f"{slow[0]}-{slow[1]}) for the same work: the spread is the other jobs on the machine.", ""]
    last = curve[-1]["teacher_settings"]["accuracy"]
    met = last["colour"] >= 0.9 and last["shape"] >= 0.9
    first = next((p for p in curve if p["teacher_settings"]["accuracy"]["colour"] >= 0.9
                  and p["teacher_settings"]["accuracy"]["shape"] >= 0.9), None)
    lines += [f"**Goal ≥ 90% colour and shape: {'met' if met else 'NOT met'}** at the end of training "
              f"(colour {_pct(last['colour'])}, shape {_pct(last['shape'])})"
              + (f"; first reached at step {first['step']} ({common.fmt(first['wall_s'], '.0f')} s)."
                 if first else "."),
              "", "![accuracy vs steps](quality_curve_steps.png) ![accuracy vs wall time](quality_curve_time.png)",
              "", "Teacher samples along the run: ![checkpoints](quality_grid_curve.png)", ""]

    def series(x_key):
        out = {}
        for k in ("colour", "shape", "background", "all"):
            pts = [(p[x_key], p["teacher_settings"]["accuracy"][k]) for p in curve if p.get(x_key) is not None]
            out[k] = ([x for x, _ in pts], [100 * y for _, y in pts])
        return out

    charts = [("_curve_steps", lambda p: common.line_chart(p, "Teacher accuracy vs training steps", series("step"),
                                                            "training step", "accuracy (%)", logx=False, logy=False)),
              ("_curve_time", lambda p: common.line_chart(p, "Teacher accuracy vs wall time", series("wall_s"),
                                                           "wall time (s)", "accuracy (%)", logx=False, logy=False))]
    return lines, charts


DISTILL_COLUMNS = ["model", "latent MSE", "÷ baseline", "PSNR", "colour", "shape", "background", "all",
                   "MSE on training pairs", "train s"]


def _metric_row(label: str, m: dict | None, base: float | None, train_mse: float | None) -> list[str]:
    if m is None:
        return [label, "not run"] + [""] * (len(DISTILL_COLUMNS) - 2)
    ratio = common.ratio(m["latent_mse"], base)
    train = m.get("train") or {}
    return [label, f"{m['latent_mse']:.5f} ± {m['latent_mse_se']:.5f}", common.fmt(ratio, ".3f"), _db(m["psnr_db"]),
            *_acc_cells(m["accuracy"]), common.fmt(train_mse, ".5f"), common.fmt(train.get("train_seconds"), ".0f")]


def _section_distill(rec: dict, d: DemoConfig) -> tuple[list[str], list]:
    ev = rec["evals"]
    base = ev.get("teacher_4step")
    lines = ["## 2. Direct Distill: does it work, and do our changes matter?", ""]
    if base is None:
        return lines + ["Not run yet (stage `distill`).", ""], []
    b = base["latent_mse"]
    tm = rec["train_pairs_mse"]
    lines += [f"LoRA students (rank {d.lora_rank}, {d.lora_steps} steps, batch {d.distill_batch}, lr {d.lora_lr:g}, "
              "the demo's settings) on the same teacher dataset, with the same seeds and budget; only the target and "
              "the student's training schedule differ. *Stored latents*: the teacher's final latents (gen-dataset "
              "stores them). *JPEG image*: DiffSynth's example dataset: the teacher output truncated to 8 bits, saved "
              "by PIL as JPEG quality 75, re-encoded by the codec. *μ of the resolution*: the student trains on "
              f"the 4-step schedule it samples with (μ = {_mu(d)}); *μ 0.8*: DiffSynth's fixed training μ.", "",
              *common.md_table(DISTILL_COLUMNS,
                               [_metric_row(f"undistilled teacher, {d.student_steps} steps CFG {d.student_cfg:g} "
                                            "(baseline)", base, b, tm.get("teacher_4step"))]
                               + [_metric_row(label, ev.get(f"distill_{name}"), b, tm.get(f"distill_{name}"))
                                  for name, (_, _, _, label) in DISTILL_RUNS.items()]), "",
              "MSE on training pairs: the same measure on the teacher dataset's own rows (the prompts and seeds "
              "the students were trained on); a student far below its held-out MSE there has fitted its "
              f"{d.distill_prompts * d.distill_seeds} training rows more than it has learnt the teacher.", ""]
    if rec["reference"]:
        lines += [f"The reference itself ({d.teacher_sample_steps} steps CFG {d.teacher_cfg:g}) is "
                  f"{' / '.join(_acc_cells(rec['reference']['accuracy']))} accurate (colour / shape / background / "
                  "all).", ""]
    ours, theirs = ev.get("distill_ours"), ev.get("distill_diffsynth")
    if ours:
        r = ours["latent_mse"] / b
        lines.append(f"**Goal: student MSE ≤ 0.25x the baseline's: {'met' if r <= 0.25 else 'NOT met'}** "
                     f"(ours: {r:.3f}x).")
    if ours and theirs:
        lines.append(f"Ours against DiffSynth's recipe: {ours['latent_mse'] / theirs['latent_mse']:.3f}x its latent "
                     f"MSE, {_delta_db(ours, theirs)} PSNR.")
    lines += _factor_lines(ev)
    budget = {n: ev.get(f"distill_{n}") for n in BUDGET_RUNS}
    if any(budget.values()):
        lines += ["", f"**More budget for our recipe** (same loss and seeds; LoRA lr {d.lora_lr:g}, full weights lr "
                  f"{d.shrunk_lr:g}; 1x = {d.lora_steps} steps, {d.distill_prompts * d.distill_seeds} teacher rows; "
                  "a larger teacher dataset starts with the same rows). MSE on training pairs is on the 1x rows, "
                  "which every run trains on:", "",
                  *common.md_table(DISTILL_COLUMNS, [_metric_row(label, budget[n], b, tm.get(f"distill_{n}"))
                                                     for n, (_, _, _, label) in BUDGET_RUNS.items()])]
        met = [f"{BUDGET_RUNS[n][3]} ({m['latent_mse'] / b:.3f}x; the 0.25x line is "
               f"{(0.25 * b - m['latent_mse']) / m['latent_mse_se']:.1f} standard errors of its MSE above it)"
               for n, m in budget.items() if m and m["latent_mse"] / b <= 0.25]
        lines += ["", "Goal met by: " + ("; ".join(met) if met else "none of them") + "."]
    lines += ["", "![latent MSE](quality_distill_mse.png)", "",
              "Teacher vs students (held-out pairs): ![grid](quality_grid_distill.png)", ""]
    runs = [n for n in [*DISTILL_RUNS, *BUDGET_RUNS] if f"distill_{n}" in ev]
    names = ["teacher\n4 steps"] + [n.replace("_", "\n") for n in runs]
    values = [b] + [ev[f"distill_{n}"]["latent_mse"] for n in runs]
    charts = [("_distill_mse", lambda p: common.bar_chart(p, f"Latent MSE vs the {d.teacher_sample_steps}-step "
                                                             f"CFG-{d.teacher_cfg:g} teacher (lower is better)",
                                                          names, {"latent MSE": values}, "MSE"))]
    return lines, charts


def _factor_lines(ev: dict) -> list[str]:
    """Each factor of the 2x2 alone: the MSE ratio it causes with the other factor held at either value."""
    m = {n: ev.get(f"distill_{n}", {}).get("latent_mse") for n in DISTILL_RUNS}
    if None in m.values():
        return []
    return ["", f"One factor at a time: μ 0.8 instead of the resolution's multiplies the MSE by "
            f"{m['latents_mu08'] / m['ours']:.2f} (stored-latents target) and "
            f"{m['diffsynth'] / m['jpeg_resolution']:.2f} (JPEG target); the JPEG target instead of the stored "
            f"latents by {m['jpeg_resolution'] / m['ours']:.2f} (μ of the resolution) and "
            f"{m['diffsynth'] / m['latents_mu08']:.2f} (μ 0.8)."]


def _section_caveats(rec: dict, d: DemoConfig) -> list[str]:
    from dit_distillery.schedule import mu_for

    qwen, aaa = mu_for("Qwen-Image", (1328 // 16) ** 2, d.student_steps), mu_for("FLUX.2", 16 * 16, d.student_steps)
    return ["## Caveats", "",
            f"* **μ**: here the student samples at μ = {_mu(d)} (FLUX.2's empirical μ for {(d.size // 4) ** 2} "
            f"tokens and {d.student_steps} steps), far from DiffSynth's training 0.8, so the schedule mismatch is "
            f"large. For Qwen-Image at 1328² inference uses μ = {qwen:.3f}, close to 0.8: expect a much smaller μ "
            f"effect there. AAADiT at 256² (FLUX.2 template, 256 tokens) samples at μ = {aaa:.2f}, the same regime "
            "as this task.",
            "* **Target**: `PixelCodec` is lossless, so the JPEG target here differs from the stored latents only by "
            "8-bit truncation, clipping to [-1, 1] and JPEG; a real VAE adds its own reconstruction error to that "
            "route (not measured here).",
            "* **Seeds**: one training run per configuration; ± is the spread over the held-out pairs, not over "
            "training seeds.",
            f"* **Scale**: a {rec['teacher_parameters'] / 1e6:.2f}M-parameter DiT on {d.size}x{d.size} images; no "
            "larger (GPU) run was made. "
            "Wall times come from one thread on a 2-core CPU shared with other jobs.", ""]


def _mu(d: DemoConfig) -> str:
    from dit_distillery.schedule import mu_for, template_for

    tokens = (d.size // 4) ** 2  # PixelCodec(4): one token per 4x4 pixels
    return f"{mu_for(template_for('aaadit'), tokens, d.student_steps):.2f}"


def _delta_db(a: dict, b: dict) -> str:
    if a["psnr_db"] is None or b["psnr_db"] is None:
        return "—"
    return f"{a['psnr_db'] - b['psnr_db']:+.2f} dB"


def _section_shrink(rec: dict, d: DemoConfig) -> tuple[list[str], list]:
    ev, sh = rec["evals"], rec["shrink"]
    if not sh or "teacher_4step" not in ev:
        return ["## 3. Which blocks to drop", "", "Not run yet (stage `shrink`).", ""], []
    n = len(sh["scores"])
    lines = [f"## 3. Which blocks to drop ({n} → {d.shrunk_layers} blocks)", ""]
    b = ev["teacher_4step"]["latent_mse"]
    scores = ", ".join(f"{i}: {s:.3f}" for i, s in enumerate(sh["scores"]))
    lines += [f"Each student keeps {d.shrunk_layers} of the teacher's blocks (the last always last) as exact copies, "
              f"then is distilled with full weights ({d.shrunk_steps} steps, lr {d.shrunk_lr:g}, batch "
              f"{d.distill_batch}, our default loss). Block influence (1 − cos(in, out), the importance strategy's "
              f"score, {rec['config']['calibration_batches']} calibration batches): {scores}. Every choice of kept "
              "blocks is trained (at most " f"{rec['config']['max_block_sets']}; beyond that only the strategies'), "
              "so the strategies are ranked against all the alternatives; \"chosen by\" names the strategies that "
              "pick each set.", "",
              *common.md_table(["kept blocks", "chosen by", f"MSE before ({d.student_steps} st)",
                                f"MSE before ({d.teacher_sample_steps} st CFG {d.teacher_cfg:g})", "MSE after",
                                "after ÷ baseline", "PSNR after", "all-correct after", "train s"],
                               [_shrink_row(s, ev, b) for s in sh["sets"]]), "",
              f"Baseline: the undistilled {n}-block teacher at {d.student_steps} steps CFG {d.student_cfg:g} (MSE "
              f"{b:.5f}).", *_shrink_ranking(sh, ev), "", "![shrink MSE](quality_shrink_mse.png)", "",
              "Teacher vs shrunk students: ![grid](quality_grid_shrink.png)", ""]
    labels = ["+".join(map(str, s["kept"])) for s in sh["sets"]]

    def get(s, suffix):
        m = ev.get(_set_name(s) + suffix)
        return None if m is None else m["latent_mse"]

    series = {"before": [get(s, "_before") for s in sh["sets"]], "after": [get(s, "_after") for s in sh["sets"]]}
    charts = [("_shrink_mse", lambda p: common.bar_chart(p, "Shrunk students: latent MSE vs the teacher", labels,
                                                         series, "MSE", log=True))]
    return lines, charts


def _shrink_ranking(sh: dict, ev: dict) -> list[str]:
    """Which set ends best, whether each strategy found it, and whether importance's choice was a near tie."""
    done = [(ev[_set_name(s) + "_after"]["latent_mse"], s) for s in sh["sets"] if _set_name(s) + "_after" in ev]
    if len(done) < len(sh["sets"]):
        return []
    ranked = [s for _, s in sorted(done, key=lambda pair: pair[0])]
    best = ranked[0]
    lines = [f"Best after distillation: blocks {', '.join(map(str, best['kept']))} (chosen by "
             f"{', '.join(best['strategies']) or 'no strategy'})."]
    for strategy in STRATEGIES:
        rank = next(i for i, s in enumerate(ranked) if strategy in s["strategies"]) + 1
        lines.append(f"{strategy}: rank {rank} of {len(ranked)}.")
    scores, last = sh["scores"], len(sh["scores"]) - 1
    chosen = next(s["kept"] for s in sh["sets"] if "importance" in s["strategies"])
    kept = [scores[i] for i in chosen if i != last]
    dropped = [scores[i] for i in range(last) if i not in chosen]
    if kept and dropped and min(kept) - max(dropped) < 0.01 * min(kept):
        lines.append(f"Importance's choice was a near tie: its weakest kept block scored {min(kept):.4f}, the "
                     f"strongest dropped one {max(dropped):.4f}.")
    return ["", " ".join(lines)]


def _set_name(s: dict) -> str:
    return "keep_" + "_".join(map(str, s["kept"]))


def _shrink_row(s: dict, ev: dict, base: float) -> list[str]:
    name = _set_name(s)
    before, before_t, after = (ev.get(name + k) for k in ("_before", "_before_teacher_settings", "_after"))

    def mse(m):
        return "—" if m is None else f"{m['latent_mse']:.5f}"

    return [", ".join(map(str, s["kept"])), ", ".join(s["strategies"]) or "(none)", mse(before), mse(before_t),
            mse(after) + (f" ± {after['latent_mse_se']:.5f}" if after else ""),
            common.fmt(common.ratio(after and after["latent_mse"], base), ".3f"),
            _db(after["psnr_db"]) if after else "—", _pct(after["accuracy"]["all"]) if after else "—",
            common.fmt(((after or {}).get("train") or {}).get("train_seconds"), ".0f")]


def _grids(run: Run, rec: dict):
    """Teacher-vs-student image grids (the first `grid_rows` held-out pairs), from the cached latents."""
    from dit_distillery.charts import image_grid

    d, rows = run.d, min(run.d.grid_rows, len(run.prompts))
    labels = [p.replace("a ", "").replace("an ", "").replace(" background", "") for p in run.prompts[:rows]]
    if not (run.out / "eval" / "reference.safetensors").is_file():
        return
    reference = run.images(run.reference()["latents"])

    def grid(columns: list[tuple[str, list | None]]):
        columns = [(name, ims) for name, ims in columns if ims is not None]
        return image_grid([[ims[i] for _, ims in columns] for i in range(rows)], row_labels=labels,
                          col_labels=[name for name, _ in columns])

    teacher_col = (f"teacher {d.teacher_sample_steps}st cfg{d.teacher_cfg:g}", reference)
    base_col = (f"teacher {d.student_steps}st", run.eval_images("teacher_4step"))
    yield "_grid_distill", grid([teacher_col, base_col] + [(n, run.eval_images(f"distill_{n}"))
                                                          for n in [*DISTILL_RUNS, *BUDGET_RUNS]])
    if rec["shrink"]:
        cols = [teacher_col, base_col]
        for s in rec["shrink"]["sets"]:
            name = _set_name(s)
            cols += [(f"{'+'.join(map(str, s['kept']))} before", run.eval_images(name + "_before")),
                     (f"{'+'.join(map(str, s['kept']))} after", run.eval_images(name + "_after"))]
        yield "_grid_shrink", grid(cols)
    if rec["curve"]:
        from safetensors.torch import load_file

        points = rec["curve"]
        picks = sorted({points[round(i * (len(points) - 1) / 5)]["step"] for i in range(6)})
        cols = [(f"step {s}", run.images(load_file(str(run.out / "curve" / f"step-{s:07d}.safetensors"))["latents"]))
                for s in picks]
        yield "_grid_curve", grid(cols)


# ----------------------------------------------------------------------------------------------------------
# Command line

STAGE_FUNCS = {"teacher": stage_teacher, "curve": stage_curve, "data": stage_data, "distill": stage_distill,
               "shrink": stage_shrink}


def run_all(out: Path = OUT, cfg: QualityConfig | None = None, *, results: Path = common.RESULTS,
            only: list[str] | None = None, command: str = "python bench/quality.py", log=_log) -> list[Path]:
    """Run the asked stages in order (all by default), then the report; returns the report's files."""
    run = Run(out, cfg or PRESETS["full"], log)
    stages = list(only or STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise DistilleryError("--only", bad, "unknown stage(s).", f"use a comma list of {list(STAGES)}.")
    run.check_config()
    seconds_path = run.out / "stage_seconds.json"
    for stage in STAGES[:-1]:
        if stage in stages:
            start = time.perf_counter()
            log(f"[{stage}] start")
            STAGE_FUNCS[stage](run)
            seconds = json.loads(seconds_path.read_text()) if seconds_path.is_file() else {}
            seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - start, 1)
            seconds["threads"] = torch.get_num_threads()
            seconds["training_device"] = "cuda" if torch.cuda.is_available() else "cpu"  # what the trainer used
            atomic_write_json(seconds_path, seconds)
    if "report" not in stages:
        return []
    written = write_report(run, Path(results), command)
    log(f"[report] wrote {', '.join(str(p) for p in written)}")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT), help="cached runs (git-ignored); rerunning reuses finished stages")
    ap.add_argument("--results", default=str(common.RESULTS), help="where quality.md/.json/.png go")
    ap.add_argument("--only", default=None, help=f"comma list of stages among {','.join(STAGES)}")
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    return run_all(Path(args.out), PRESETS[args.preset], results=Path(args.results), only=only,
                   command="python " + shlex.join(["bench/quality.py", *argv]))


if __name__ == "__main__":
    main()
