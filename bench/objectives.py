"""Distillation objectives on the embedded task (issue 13 §4): Direct Distill, DMD2 and Trajectory imitation, each
training a student for 1, 2 and 4 steps from the demo's teacher, scored by Evaluate Student.

    python bench/objectives.py                    # every run (resumes: finished runs are reused), then the report
    python bench/objectives.py --only report      # re-render bench/results/objectives.md from the cached runs

The teacher is the demo's (`python -m dit_distillery demo`: a 0.85M-parameter AAADiT trained from scratch on
centred synthetic shapes, 32x32, lossless `PixelCodec(4)`), read from `--demo-dir` (bench/out/demo_out, which
bench/keep_lora_few_step.py also reads; the demo is run there when it holds no teacher). From it, under `--out`:

* a teacher dataset (Generate Distill Dataset, 50 steps CFG 4) with the trajectory recorded (`record_trajectory`),
  shared by the three losses: Direct Distill and Trajectory train on its latents / trajectories, DMD on its prompts
  (DMD needs no teacher images; its regression term is off, as in DMD2);
* a held-out teacher dataset: prompts never used for training, several seeds each (seeds from
  `evaluate.HELD_OUT_START_SEED`), which Evaluate Student (`evaluate.evaluate_student(teacher_dataset=...)`) reads
  as the teacher's side: accuracy (`classify_image`), diversity (same-prompt pairwise pixel distance), latent MSE;
* for each loss x student steps a rank-16 LoRA on the teacher (the demo's LoRA settings), trained for the SAME
  COMPUTE budget in CPU seconds (this process's CPU time, one torch thread: the wall-clock the run would take on an
  idle core; wall-clock itself swung 2.5x between runs of the same budget on the shared machine): a short probe run
  measures the CPU seconds per step of that loss at those steps (DMD's fake-score updates included: they run inside
  each of its steps), and the run gets `budget_cpu_s / cpu_seconds_per_step` steps (cosine LR schedule over them);
* each student evaluated by `evaluate_student` against the held-out teacher dataset, with the undistilled teacher at
  the student's steps (CFG 1) as the baseline.

Goals (issue 13): at 2 steps a student within 3 points of the 50-step teacher's accuracy with >= 0.8x its
diversity; at 1 step within 5 points. Accuracy here is "all three right" (colour, shape and background).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from dit_distillery.demo import DemoConfig, LogCallbacks, job_for, machine_info, run_demo  # noqa: E402
from dit_distillery.errors import DistilleryError  # noqa: E402
from dit_distillery.evaluate import HELD_OUT_PROMPT_SEED, HELD_OUT_START_SEED  # noqa: E402
from dit_distillery.formats import atomic_output, atomic_write_json, save_safetensors  # noqa: E402

NAME = "objectives"
OUT = ROOT / "bench" / "out" / NAME
DEMO_DIR = ROOT / "bench" / "out" / "demo_out"
STAGES = ("teacher", "data", "runs", "variants", "report")
LABELS = {"direct_distill": "Direct Distill", "dmd": "DMD2", "trajectory": "Trajectory"}
GOALS = {2: (3.0, 0.8), 1: (5.0, None)}  # steps -> (max accuracy points below the teacher, min diversity ratio)
# A brief check of DMD2's settings at the goal's 2 steps (stage `variants`; run when the matrix has that step count):
# name -> (loss, student steps, loss options over the matrix's, budget multiplier, label). Kept out of the config
# guard, as bench/quality.py's budget runs are: each is its own folder and record.
VARIANTS = {
    "dmd_2step_fake1": ("dmd", 2, {"fake_updates": 1}, 1, "DMD2, 1 fake-score update per step (more student steps)"),
    "dmd_2step_reg": ("dmd", 2, {"regression_weight": 0.25}, 1, "DMD2 + regression on the teacher latents, weight "
                      "0.25 (DMD's λ_reg)"),
    "dmd_2step_x3": ("dmd", 2, {}, 3, "DMD2, 3x the budget"),
}


@dataclass
class ObjectivesConfig:
    name: str = "full"
    size: int = 32
    teacher_steps: int = 50  # the teacher's sampling (the datasets and the reference)
    teacher_cfg: float = 4.0
    train_prompts: int = 512  # teacher-dataset rows, one seed each (the demo's count)
    record_trajectory: int = 25  # trajectory points per row (every other teacher step)
    eval_prompts: int = 32  # held-out prompts ...
    eval_seeds: int = 4  # ... x seeds each: diversity needs >= 2
    student_steps: tuple = (1, 2, 4)
    losses: tuple = ("direct_distill", "dmd", "trajectory")
    budget_cpu_s: float = 100.0  # training CPU seconds per run (one thread)
    probe_steps: int = 6  # timed steps of the probe run (after one untimed step); their mean
    min_steps: int = 10
    max_steps: int = 5000
    batch: int = 8
    lora_rank: int = 16
    lr: float = 5e-3  # the demo's LoRA settings: cosine to 0.1x after a warm-up
    # DMD2 without GAN: the DMD Loss node's defaults (real score CFG 4, 5 fake updates at the job's lr, rank 16)
    dmd: dict = field(default_factory=lambda: {"teacher_cfg": 4.0, "fake_updates": 5, "fake_rank": 16,
                                               "regression_weight": 0.0})
    grid_rows: int = 8
    eval_batch: int = 16  # Evaluate Student's batch (also how many pairs time the teacher's speed)
    seed: int = 0


PRESETS = {
    "full": ObjectivesConfig(),
    # seconds-long: proves the pipeline and the report (tests/test_objectives_smoke.py); numbers are meaningless
    "smoke": ObjectivesConfig(name="smoke", teacher_steps=4, train_prompts=4, record_trajectory=3, eval_prompts=2,
                              eval_seeds=2, student_steps=(1, 2), budget_cpu_s=0.0, probe_steps=1, min_steps=2,
                              max_steps=2, batch=2, lora_rank=2, dmd={"teacher_cfg": 4.0, "fake_updates": 1,
                                                                     "fake_rank": 2, "regression_weight": 0.0},
                              grid_rows=2, eval_batch=4),
}


def _log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run_name(loss: str, steps: int) -> str:
    return f"{loss}_{steps}step"


def loss_spec(cfg: ObjectivesConfig, loss: str, steps: int) -> dict:
    """The job's loss: every one trains the student for `steps` steps at CFG 1 on its sampling schedule."""
    if loss == "direct_distill":
        return {"kind": "direct_distill", "steps": steps, "cfg": 1.0, "mu": "resolution", "target": "latents"}
    if loss == "trajectory":
        return {"kind": "trajectory", "steps": steps, "cfg": 1.0, "mu": "resolution"}
    if loss == "dmd":
        return {"kind": "dmd", "steps": steps, "mu": "resolution", **cfg.dmd}
    raise DistilleryError("losses", loss, "unknown loss.", f"use some of {sorted(LABELS)}.")


class Bench:
    """One output folder: its config (guarded), the teacher, the datasets, the runs and their evaluations."""

    def __init__(self, out: Path, cfg: ObjectivesConfig, demo_dir: Path | None = None, log=_log):
        self.out, self.cfg, self.log = Path(out), cfg, log
        self.demo_dir = Path(demo_dir) if demo_dir else (DEMO_DIR if cfg.name == "full" else self.out / "demo")
        self._teacher = None

    @property
    def teacher_file(self) -> Path:
        return self.demo_dir / "teacher" / "teacher.safetensors"

    def check_config(self) -> None:
        path, now = self.out / "config.json", json.loads(json.dumps(asdict(self.cfg)))
        if path.is_file() and json.loads(path.read_text()) != now:
            raise DistilleryError("out", str(self.out), "holds runs made with other settings (config.json).",
                                  "use another --out folder, or delete this one to start over.")
        atomic_write_json(path, now)

    def teacher(self):
        if self._teacher is None:
            from dit_distillery.pipelines.loading import load_pipeline

            if not self.teacher_file.is_file():
                raise DistilleryError("--demo-dir", str(self.demo_dir), "holds no teacher/teacher.safetensors.",
                                      "run the `teacher` stage (it runs the demo there) or point --demo-dir at a "
                                      "finished demo.")
            self._teacher = load_pipeline("default", dit=self.teacher_file)
        return self._teacher

    def runs(self) -> list[tuple[str, int]]:
        return [(loss, steps) for steps in self.cfg.student_steps for loss in self.cfg.losses]


# ----------------------------------------------------------------------------------------------------------
# Stages

def stage_teacher(b: Bench) -> None:
    """The demo's teacher: reused from --demo-dir, else the demo is run there. A smoke preset saves the default
    pipeline's random initial DiT instead (the pipeline is what is checked, not the numbers)."""
    if b.teacher_file.is_file():
        b.log(f"[teacher] reusing {b.teacher_file}")
        return
    if b.cfg.name != "full":
        from dit_distillery.models.registry import save_dit
        from dit_distillery.pipelines.loading import load_pipeline

        save_dit(load_pipeline("default").dit, b.teacher_file, provenance={"source": "random init (smoke)"})
        return
    b.log(f"[teacher] no teacher in {b.demo_dir}: running the demo there")
    run_demo(b.demo_dir, DemoConfig(), log=b.log)


def stage_data(b: Bench) -> None:
    """The teacher dataset (with trajectories) and the held-out one (several seeds per prompt)."""
    from dit_distillery.gen_dataset import generate_distill_dataset, synthetic_prompts

    c = b.cfg
    common_args = dict(teacher_steps=c.teacher_steps, teacher_cfg=c.teacher_cfg, height=c.size, width=c.size,
                       student_steps=max(c.student_steps), student_cfg=1.0, batch_size=32)
    t = time.perf_counter()
    report = generate_distill_dataset(b.teacher(), synthetic_prompts(c.train_prompts, seed=c.seed + 1),
                                      b.out / "teacher_data", start_seed=c.seed,
                                      record_trajectory=c.record_trajectory, **common_args)
    held = generate_distill_dataset(b.teacher(), synthetic_prompts(c.eval_prompts, seed=HELD_OUT_PROMPT_SEED),
                                    b.out / "held_out", seeds_per_prompt=c.eval_seeds,
                                    start_seed=HELD_OUT_START_SEED, **common_args)
    _add_seconds(b, "data", time.perf_counter() - t)
    b.log(f"[data] teacher dataset {report['rows_written']} written / {report['rows_skipped']} reused; held-out "
          f"{held['rows_written']} written / {held['rows_skipped']} reused")


class _StepTimes(LogCallbacks):
    """The demo's log, plus the wall and CPU time at the end of every step (a step = the end of the previous one to
    the end of this one: DMD's fake-score updates, the data and the optimiser step are inside)."""

    def __init__(self, stage, log, every):
        super().__init__(stage, log, every=every)
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_step(self, info):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        super().on_step(info)


def _job(b: Bench, folder: Path, loss: str, spec: dict, train_steps: int, resume):
    c = b.cfg
    model = {"pipeline": "default", "dit": str(b.teacher_file)}
    if loss == "dmd":  # the student replaces the pipeline's DiT: DMD's real score must be named
        model["teacher"] = str(b.teacher_file)
    return job_for(folder, model=model, mode="lora", steps=train_steps, lora={"rank": c.lora_rank},
                   data={"path": str(b.out / "teacher_data"), "height": c.size, "width": c.size,
                         "cache_dir": str(b.out / "cache")},
                   loss=spec, batch_size=c.batch, gradient_checkpointing=False, seed=c.seed,
                   optim={"lr": c.lr, "warmup_steps": min(20, train_steps // 10), "schedule": "cosine",
                          "min_lr_ratio": 0.1, "weight_decay": 0.0},
                   output={"name": "student", "save_dtype": "fp32", "save_every": 100, "keep_last": 1},
                   resume=resume)


def probe(b: Bench, name: str, loss: str, spec: dict) -> dict:
    """CPU (and wall) seconds per training step of this loss at these student steps: a fresh run of
    probe_steps + 1 steps, the first untimed; the mean of the rest (DMD's steps vary with the backward-simulation
    depth drawn). Cached in runs/<name>/probe.json."""
    from dit_distillery.trainer import train

    folder = b.out / "runs" / name
    path = folder / "probe.json"
    if path.is_file():
        return json.loads(path.read_text())
    cb = _StepTimes(f"probe {name}", b.log, every=10 ** 9)
    train(_job(b, folder / "probe", loss, spec, b.cfg.probe_steps + 1, None), callbacks=cb)
    gaps = [y - x for x, y in zip(cb.times, cb.times[1:])]
    cpu = [y - x for x, y in zip(cb.cpu, cb.cpu[1:])]
    info = {"cpu_seconds_per_step": statistics.mean(cpu) if cpu else None,
            "wall_seconds_per_step": statistics.mean(gaps) if gaps else None, "step_cpu_seconds": cpu,
            "step_wall_seconds": gaps}
    atomic_write_json(path, info)
    return info


def train_run(b: Bench, loss: str, steps: int, name: str | None = None, options: dict | None = None,
              budget: float = 1.0) -> dict:
    """Train (resuming) unless runs/<name>/run.json exists; the step count fills `budget` x the CPU-time budget.
    `options` go over the matrix's loss settings (a variant)."""
    from dit_distillery.trainer import train

    c = b.cfg
    name = name or run_name(loss, steps)
    spec = {**loss_spec(c, loss, steps), **(options or {})}
    folder = b.out / "runs" / name
    record = folder / "run.json"
    if record.is_file():
        return json.loads(record.read_text())
    p = probe(b, name, loss, spec)
    per = p["cpu_seconds_per_step"]
    n = c.max_steps if not per else round(budget * c.budget_cpu_s / per)
    n = max(c.min_steps, min(c.max_steps, n))
    b.log(f"[runs] {name}: {per or 0:.3f} CPU s/step in the probe -> {n} steps")
    cb = _StepTimes(name, b.log, every=max(1, n // 5))
    cpu = time.process_time()
    result = train(_job(b, folder, loss, spec, n, "auto"), callbacks=cb)
    cpu = time.process_time() - cpu
    losses = [h["loss"] for h in result.history]
    info = {"loss": loss, "student_steps": steps, "spec": spec, "train_steps": result.steps,
            "budget_cpu_s": budget * c.budget_cpu_s,
            "probe_cpu_seconds_per_step": per, "train_cpu_seconds": round(cpu, 1),
            "train_seconds": round(result.seconds, 1),
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "nonfinite_losses": sum(not math.isfinite(x) for x in losses), "weights": str(result.weights),
            "note": None if len(losses) == result.steps else "resumed: seconds cover the last segment"}
    atomic_write_json(record, info)
    return info


def evaluate_run(b: Bench, name: str, student, steps: int) -> dict:
    """Evaluate Student against the held-out teacher dataset, the undistilled teacher as baseline; cached in
    eval/<name>.json, with the student's and the baseline's latents (the report's grid)."""
    from dit_distillery.evaluate import evaluate_student

    path = b.out / "eval" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    ev = evaluate_student(student, teacher_dataset=b.out / "held_out", baseline=b.teacher(), steps=steps, cfg=1.0,
                          batch_size=b.cfg.eval_batch, grid_rows=b.cfg.grid_rows)
    save_safetensors({k: s.latents for k, s in ev.samples.items() if k != "teacher"},
                     b.out / "eval" / f"{name}.safetensors")
    atomic_write_json(path, ev.metrics)
    s, r = ev.metrics["student"], ev.metrics["ratios"]
    b.log(f"[eval] {name}: accuracy {s['accuracy']['all']:.1%} (teacher {ev.metrics['teacher']['accuracy']['all']:.1%}),"
          f" MSE ÷ baseline {r['mse_vs_baseline']:.3f}, diversity ÷ teacher {r['diversity_vs_teacher']:.3f}")
    return ev.metrics


def stage_runs(b: Bench) -> None:
    from dit_distillery.student import load_student

    for loss, steps in b.runs():
        name = run_name(loss, steps)
        t = time.perf_counter()
        info = train_run(b, loss, steps)
        evaluate_run(b, name, load_student(b.teacher(), lora=info["weights"]), steps)
        _add_seconds(b, name, time.perf_counter() - t)


def stage_variants(b: Bench) -> None:
    from dit_distillery.student import load_student

    for name, (loss, steps, options, budget, _) in VARIANTS.items():
        if steps not in b.cfg.student_steps or loss not in b.cfg.losses:
            continue
        t = time.perf_counter()
        info = train_run(b, loss, steps, name, options, budget)
        evaluate_run(b, name, load_student(b.teacher(), lora=info["weights"]), steps)
        _add_seconds(b, name, time.perf_counter() - t)


def _add_seconds(b: Bench, key: str, seconds: float) -> None:
    path = b.out / "stage_seconds.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    done[key] = round(done.get(key, 0.0) + seconds, 1)
    atomic_write_json(path, done)


# ----------------------------------------------------------------------------------------------------------
# Report

def collect(b: Bench) -> dict:
    def load(path: Path):
        return json.loads(path.read_text()) if path.is_file() else None

    runs = {}
    for loss, steps in b.runs():
        name = run_name(loss, steps)
        runs[name] = {"loss": loss, "student_steps": steps, "train": load(b.out / "runs" / name / "run.json"),
                      "probe": load(b.out / "runs" / name / "probe.json"), "eval": load(b.out / "eval" / f"{name}.json")}
    variants = {}
    for name, (loss, steps, options, budget, label) in VARIANTS.items():
        ev = load(b.out / "eval" / f"{name}.json")
        if ev:
            variants[name] = {"loss": loss, "student_steps": steps, "options": options, "budget": budget,
                              "label": label, "train": load(b.out / "runs" / name / "run.json"),
                              "probe": load(b.out / "runs" / name / "probe.json"), "eval": ev}
    return {"config": asdict(b.cfg), "runs": runs, "variants": variants, "seconds": load(b.out / "stage_seconds.json") or {},
            "teacher_file": str(b.teacher_file.relative_to(ROOT)) if b.teacher_file.is_relative_to(ROOT) else
            b.teacher_file.name}


def goal_verdicts(runs: dict, cfg: ObjectivesConfig) -> list[dict]:
    """For each goal (steps -> max points below the teacher, min diversity ratio) and loss: met or not, and why."""
    out = []
    for steps, (points, div) in GOALS.items():
        if steps not in cfg.student_steps:
            continue
        for loss in cfg.losses:
            ev = (runs.get(run_name(loss, steps)) or {}).get("eval")
            if ev is None:
                continue
            gap = 100 * (ev["teacher"]["accuracy"]["all"] - ev["student"]["accuracy"]["all"])
            ratio = ev["ratios"]["diversity_vs_teacher"]
            misses = []
            if gap > points:
                misses.append(f"accuracy {gap:.1f} points below the teacher (goal ≤ {points:g})")
            if div is not None and (ratio is None or ratio < div):
                misses.append(f"diversity {common.fmt(ratio, '.2f')}x the teacher's (goal ≥ {div:g})")
            out.append({"steps": steps, "loss": loss, "accuracy_gap_points": gap, "diversity_ratio": ratio,
                        "met": not misses, "misses": misses})
    return out


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _se_points(p: float, n: int) -> float:
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def write_report(b: Bench, results: Path, command: str) -> list[Path]:
    data = collect(b)
    c = b.cfg
    rec = {"benchmark": NAME, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "machine": {**common.machine("cpu"), **machine_info()}, "versions": common.versions(),
           "git": common.git_commit(), **data}
    rec = json.loads(json.dumps(rec, default=str).replace(str(ROOT) + "/", ""))  # no path of this machine
    done = {n: r for n, r in data["runs"].items() if r["eval"]}
    rec["goals"] = goal_verdicts(data["runs"], c)
    m, v, g = rec["machine"], rec["versions"], rec["git"]
    lines = [f"# Distillation objectives on the embedded task (issue 13 §4, CPU)", "",
             "Generated by `bench/objectives.py` from its cached runs (`--only report` re-renders without training).",
             "", f"`{command}`", "",
             f"Machine: {m['cpu']} ({m['cores']} cores shared with other jobs, {m['ram_gib']} GiB RAM), torch "
             f"{m['torch']} with {m['torch_threads']} thread(s), {m['platform']}.  ",
             f"Python {v['python']}, peft {v['peft']}. Commit {(g['commit'] or '?')[:12]}"
             + (f" (+{g['dirty_files']} uncommitted tracked files)" if g["dirty_files"] else "") + f"; {rec['date']}.",
             ""]
    if c.name != "full":
        lines += [f"**Preset `{c.name}`: a smoke run whose numbers mean nothing.**", ""]
    secs = data["seconds"]
    if secs:
        matrix = {k: v for k, v in secs.items() if k not in VARIANTS}
        extra = {k: v for k, v in secs.items() if k in VARIANTS}
        lines += [f"Wall time of the matrix (data + {len(matrix) - 1} runs): {sum(matrix.values()) / 60:.1f} "
                  "minutes (" + ", ".join(f"{k} {v:.0f} s" for k, v in matrix.items()) + "); each run's figure "
                  "is its probe, training and evaluation." + (f" The DMD2 variants took another "
                  f"{sum(extra.values()) / 60:.1f} minutes." if extra else ""), ""]
    if not done:
        return common.write_results(results, NAME, rec, "\n".join(lines + ["No run finished yet.", ""]))
    first = next(iter(done.values()))["eval"]
    teacher = first["teacher"]
    n = first["pairs"]
    lines += ["## Set-up", "",
              f"* **Teacher**: the demo's AAADiT (`{data['teacher_file']}`), sampled at {c.teacher_steps} steps CFG "
              f"{c.teacher_cfg:g}.",
              f"* **Training data**: {c.train_prompts} prompts x 1 seed sampled by the teacher, trajectories recorded "
              f"at {c.record_trajectory} of its steps (Generate Distill Dataset, `record_trajectory`). Direct Distill "
              "trains on the final latents, Trajectory on the trajectories, DMD2 on the prompts only (regression "
              f"weight {c.dmd['regression_weight']:g}; no GAN term).",
              f"* **Students**: a rank-{c.lora_rank} LoRA on the teacher, batch {c.batch}, lr {c.lr:g} (warm-up, "
              "cosine to 0.1x), sampled at CFG 1 on the pipeline's schedule at their steps. DMD2: real score = the "
              f"teacher at CFG {c.dmd['teacher_cfg']:g}, fake score = a rank-{c.dmd['fake_rank']} LoRA on the "
              f"teacher updated {c.dmd['fake_updates']}x per student step at the job's lr, backward simulation.",
              f"* **Budget: equal compute, {c.budget_cpu_s:g} CPU seconds of training per run** (the process's CPU "
              "time on one torch thread: the wall-clock on an idle core). A "
              f"{c.probe_steps}-step probe (after one untimed step) measures the loss's mean CPU seconds per step "
              "at those student steps, DMD's fake-score updates included, and the run gets budget ÷ that many "
              "steps. Wall-clock was not used: on this shared machine the same wall budget gave runs from 111 to "
              "285 s (a first attempt). `train CPU s` is the whole `train()` call (data set-up and checkpoints "
              "included), so it sits a little above the budget; `train wall s` shows the load.",
              f"* **Evaluation** (Evaluate Student, `evaluate.evaluate_student`): {n} held-out pairs = "
              f"{first['prompts']} prompts never trained on x {c.eval_seeds} seeds (from {HELD_OUT_START_SEED}), "
              "the teacher's side read from a held-out teacher dataset. *Accuracy*: colour, shape and background "
              "all read back right by `classify_image`; ± is its binomial standard error "
              f"(about {_se_points(teacher['accuracy']['all'], n):.1f} points at the teacher's accuracy); one image "
              f"is {100 / n:.2f} points, so the 3-point goal is {math.floor(3 * n / 100)} images of {n}. *MSE ÷ "
              "undistilled*: the student's paired latent MSE to the teacher over that of the undistilled teacher at "
              "the same steps, CFG 1 (below 1: distillation helped). *Diversity ÷ teacher*: mean pairwise RMS pixel "
              "distance between the seeds of a prompt, student over teacher.", "",
              f"Teacher ({c.teacher_steps} steps CFG {c.teacher_cfg:g}): accuracy {_pct(teacher['accuracy']['all'])}% "
              f"(colour {_pct(teacher['accuracy']['colour'])}, shape {_pct(teacher['accuracy']['shape'])}, "
              f"background {_pct(teacher['accuracy']['background'])}), diversity {teacher['diversity']:.4f}.", "",
              "## Results", ""]
    head = ["steps", "model", "accuracy %", "Δ vs teacher (pts)", "colour / shape / bg %", "latent MSE",
            "MSE ÷ undistilled", "diversity ÷ teacher", "train steps", "train CPU s", "train wall s",
            "CPU s/step (probe)"]
    rows = []
    for steps in c.student_steps:
        base = next((r["eval"]["baseline"] for r in done.values() if r["student_steps"] == steps), None)
        if base:
            rows.append(_row(steps, "undistilled teacher", base, teacher, None, None, n))
        for loss in c.losses:
            r = done.get(run_name(loss, steps))
            if r:
                rows.append(_row(steps, LABELS[loss], r["eval"]["student"], teacher, r["eval"]["ratios"], r["train"],
                                 n))
    lines += common.md_table(head, rows) + [""] + _notes(data, done, c)
    if data["variants"]:
        lines += ["## DMD2's settings, checked at 2 steps", "",
                  "The matrix's DMD2 run and variants of it, each changing one thing (stage `variants`); the same "
                  "evaluation. Each variant's budget multiplier applies to the CPU budget above.", "",
                  *common.md_table(head, _variant_rows(data, done, teacher, n, c)), ""]
    lines += ["## Goals", ""]
    for verdict in rec["goals"]:
        goal = GOALS[verdict["steps"]]
        want = f"within {goal[0]:g} points" + (f" and ≥ {goal[1]:g}x diversity" if goal[1] else "")
        lines.append(f"* {verdict['steps']} step(s), {LABELS[verdict['loss']]} ({want}): "
                     + ("**met**" if verdict["met"] else "**missed**: " + "; ".join(verdict["misses"])) + ".")
    lines += ["", "![accuracy](objectives_accuracy.png) ![diversity](objectives_diversity.png)", "",
              "Teacher, undistilled and students (first held-out pairs): ![grid](objectives_grid.png)", ""]
    labels = ["undistilled"] + [LABELS[x] for x in c.losses]

    def series(metric):
        out = {}
        for steps in c.student_steps:
            base = next((r["eval"] for r in done.values() if r["student_steps"] == steps), None)
            vals = [metric(base, "baseline") if base else None]
            vals += [metric(done[run_name(x, steps)]["eval"], "student") if run_name(x, steps) in done else None
                     for x in c.losses]
            out[f"{steps} step{'s' * (steps > 1)}"] = vals
        return out

    charts = [("_accuracy", lambda p: common.bar_chart(
                  p, f"Accuracy (all three right), teacher {_pct(teacher['accuracy']['all'])}%", labels,
                  series(lambda ev, k: 100 * ev[k]["accuracy"]["all"]), "accuracy (%)")),
              ("_diversity", lambda p: common.bar_chart(
                  p, "Diversity ÷ the teacher's (same prompt, different seeds)", labels,
                  series(lambda ev, k: common.ratio(ev[k]["diversity"], ev["teacher"]["diversity"])), "ratio"))]
    written = common.write_results(results, NAME, rec, "\n".join(lines) + "\n", charts)
    grid = _grid(b, done)
    if grid is not None:
        path = Path(results) / f"{NAME}_grid.png"
        with atomic_output(path) as tmp:
            grid.save(tmp, format="PNG")
        written.append(path)
    return written


def _notes(data: dict, done: dict, c: ObjectivesConfig) -> list[str]:
    """Facts the table implies, computed from the runs: the diversity scale, and the 1-step identity of two losses."""
    out = []
    base = sorted({r["student_steps"]: common.ratio(
        r["eval"]["baseline"]["diversity"], r["eval"]["teacher"]["diversity"]) for r in done.values()}.items())
    students = [r["eval"]["ratios"]["diversity_vs_teacher"] for r in done.values()]
    if base and students:
        below = sum(x < 1 for x in students)
        out.append(f"* Diversity: the undistilled teacher at CFG 1 is {min(v for _, v in base):.2f}-"
                   f"{max(v for _, v in base):.2f}x as diverse as the CFG-4 teacher; the students lie at "
                   f"{min(students):.2f}-{max(students):.2f}x. "
                   + ("No student falls below the teacher's diversity, so no mode collapse shows here; a ratio above "
                      "1 is not better, it is CFG-1 variation the student kept." if not below else
                      f"{below} student(s) fall below the teacher's diversity."))
    dd, tr = (done.get(run_name(k, 1)) for k in ("direct_distill", "trajectory"))
    if dd and tr and dd["train"] and tr["train"]:
        out.append(f"* At 1 step Trajectory's target (the chord from the noise to the final latents) is Direct "
                   f"Distill's: the same loss (first training loss {tr['train']['first_loss']:.5f} vs "
                   f"{dd['train']['first_loss']:.5f}); the two rows differ only by the steps their probes bought "
                   f"({tr['train']['train_steps']} vs {dd['train']['train_steps']}) and show the run-to-run spread.")
    return out + [""] if out else []


def _variant_rows(data: dict, done: dict, teacher: dict, n: int, c: ObjectivesConfig) -> list[list]:
    """The matrix's 2-step DMD2 row (when run), then each variant's."""
    rows = []
    main = done.get(run_name("dmd", 2))
    if main:
        rows.append(_row(2, f"{LABELS['dmd']} (the matrix: {c.dmd['fake_updates']} fake updates, regression "
                            f"{c.dmd['regression_weight']:g}, 1x budget)", main["eval"]["student"], teacher,
                         main["eval"]["ratios"], main["train"], n))
    for v in data["variants"].values():
        rows.append(_row(v["student_steps"], v["label"], v["eval"]["student"], teacher, v["eval"]["ratios"],
                         v["train"], n))
    return rows


def _row(steps, label, m, teacher, ratios, train, n: int) -> list:
    acc = m["accuracy"]
    se = _se_points(acc["all"], n)
    gap = 100 * (teacher["accuracy"]["all"] - acc["all"])
    div = ratios["diversity_vs_teacher"] if ratios else common.ratio(m["diversity"], teacher["diversity"])
    mse_ratio = ratios["mse_vs_baseline"] if ratios else 1.0
    train = train or {}
    return [steps, label, f"{_pct(acc['all'])} ± {se:.1f}", f"{-gap:+.1f}",
            " / ".join(_pct(acc[k]) for k in ("colour", "shape", "background")),
            f"{m['latent_mse']:.4f} ± {m['latent_mse_se']:.4f}", common.fmt(mse_ratio, ".3f"),
            common.fmt(div, ".3f"), common.fmt(train.get("train_steps"), "d"),
            common.fmt(train.get("train_cpu_seconds"), ".0f"), common.fmt(train.get("train_seconds"), ".0f"),
            common.fmt(train.get("probe_cpu_seconds_per_step"), ".3f")]


def _grid(b: Bench, done: dict):
    """Teacher | per student steps: undistilled, then each loss; from the cached latents."""
    from safetensors.torch import load_file

    from dit_distillery.evaluate import Samples, comparison_grid, read_teacher_dataset
    from dit_distillery.pipelines.base import to_pil

    if not done:
        return None
    pipe = b.teacher()
    teacher, _, _ = read_teacher_dataset(b.out / "held_out", pipe)

    def samples(latents, steps):
        pixels = torch.cat([pipe.decode(x) for x in latents.split(32)])
        return Samples(latents, pixels, to_pil(pixels), teacher.prompts, teacher.seeds, steps, 1.0)

    columns = [(f"teacher {teacher.steps}st", teacher)]
    for steps in b.cfg.student_steps:
        for loss in b.cfg.losses:
            name = run_name(loss, steps)
            path = b.out / "eval" / f"{name}.safetensors"
            if name not in done or not path.is_file():
                continue
            saved = load_file(str(path))
            if not any(label == f"undistilled {steps}st" for label, _ in columns):
                columns.append((f"undistilled {steps}st", samples(saved["baseline"], steps)))
            columns.append((f"{LABELS[loss]} {steps}st", samples(saved["student"], steps)))
    return comparison_grid(columns, b.cfg.grid_rows)


# ----------------------------------------------------------------------------------------------------------
# Command line

STAGE_FUNCS = {"teacher": stage_teacher, "data": stage_data, "runs": stage_runs, "variants": stage_variants}


def run_all(out: Path = OUT, cfg: ObjectivesConfig | None = None, *, results: Path = common.RESULTS,
            demo_dir: Path | None = None, only: list[str] | None = None,
            command: str = "python bench/objectives.py", log=_log) -> list[Path]:
    """Run the asked stages in order (all by default), then the report; returns the report's files."""
    b = Bench(out, cfg or PRESETS["full"], demo_dir, log)
    stages = list(only or STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise DistilleryError("--only", bad, "unknown stage(s).", f"use a comma list of {list(STAGES)}.")
    b.check_config()
    for stage in STAGES[:-1]:
        if stage in stages:
            log(f"[{stage}] start")
            STAGE_FUNCS[stage](b)
    if "report" not in stages:
        return []
    written = write_report(b, Path(results), command)
    log(f"[report] wrote {', '.join(str(p) for p in written)}")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(OUT), help="cached runs (git-ignored); rerunning reuses finished runs")
    ap.add_argument("--demo-dir", default=None, help="a demo run holding teacher/teacher.safetensors (default "
                    "bench/out/demo_out; the smoke preset uses <out>/demo)")
    ap.add_argument("--results", default=str(common.RESULTS), help="where objectives.md/.json/.png go")
    ap.add_argument("--only", default=None, help=f"comma list of stages among {','.join(STAGES)}")
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--budget-cpu-s", type=float, default=None,
                    help="training CPU seconds per run (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    if args.budget_cpu_s is not None:
        cfg = replace(cfg, budget_cpu_s=args.budget_cpu_s)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    return run_all(Path(args.out), cfg, results=Path(args.results), only=only,
                   demo_dir=Path(args.demo_dir) if args.demo_dir else None,
                   command="python " + shlex.join(["bench/objectives.py", *argv]))


if __name__ == "__main__":
    main()
