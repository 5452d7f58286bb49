"""Keep my LoRA few-step (issue 12, section 3), shown with the embedded tiny models.

A LoRA trained on the undistilled base and applied to its step-distilled ("turbo") version often breaks
few-step sampling: the distillation and the LoRA both move the same weights and were never trained together.
The recipe: teacher = base + the user's LoRA sampled the slow way (50 steps, CFG 4); student = turbo + that LoRA
merged, with a *new* LoRA trained on top by Direct Distill to match the teacher at 4 steps, CFG 1.

    python bench/keep_lora_few_step.py --out bench/out/keep_lora [--demo-dir demo_out]

Ingredients from a finished demo run (`python -m dit_distillery demo`; run here when `--demo-dir` has none):
the undistilled base (`teacher/teacher.safetensors`) and its Direct-Distill LoRA (`student_lora/*.safetensors`).
Stages (each resumes: rerun the same command and finished work is reused):

1. turbo = base with the distill LoRA merged;
2. a "style" LoRA: flow-matching SFT on the base over a restyled dataset (the same shapes and captions, every
   colour replaced by the next one in the palette, `STYLE`), so the classifier can tell styled from unstyled;
3. the style teacher (base + style, 50 steps, CFG 4): held-out reference latents, and a teacher dataset;
4. before: turbo + style at 4 steps CFG 1 (and baselines) against the reference;
5. repair: a new LoRA, Direct Distill at 4 steps CFG 1, on turbo with the style LoRA merged as `lora.preset`.

Writes `<results>/keep_lora_few_step.{md,json,png}` (`--results`, default bench/results).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from dit_distillery.charts import image_grid  # noqa: E402
from dit_distillery.data.synthetic import COLOURS, caption, classify_image, generate_samples, render  # noqa: E402
from dit_distillery.demo import QUICK, DemoConfig, LogCallbacks, eval_pairs, job_for, run_demo  # noqa: E402
from dit_distillery.errors import DistilleryError  # noqa: E402
from dit_distillery.formats import atomic_output, atomic_write_json, atomic_write_text  # noqa: E402
from dit_distillery.gen_dataset import generate_distill_dataset, synthetic_prompts  # noqa: E402
from dit_distillery.models.registry import save_dit  # noqa: E402
from dit_distillery.pipelines.loading import load_pipeline  # noqa: E402
from dit_distillery.student import load_student  # noqa: E402
from dit_distillery.trainer import train  # noqa: E402

NAME = "keep_lora_few_step"
_ORDER = list(COLOURS)
# The style: every colour drawn as the next one in the palette (red -> green -> blue -> ... -> black -> red). A
# bijection, so shape and background never collide, and `classify_image` reads back whether an image is styled.
STYLE = {c: _ORDER[(i + 1) % len(_ORDER)] for i, c in enumerate(_ORDER)}


@dataclass
class KeepLoraConfig:
    size: int = 32
    style_samples: int = 560  # restyled images (2 per shape/colour/background combination)
    style_steps: int = 300  # SFT steps of the style LoRA on the undistilled base
    style_batch: int = 16
    style_lr: float = 5e-3
    style_rank: int = 16
    teacher_steps: int = 50
    teacher_cfg: float = 4.0
    teacher_prompts: int = 256  # teacher-dataset rows (one seed per prompt)
    student_steps: int = 4
    student_cfg: float = 1.0
    repair_steps: int = 400  # Direct-Distill steps of the repair LoRA
    repair_batch: int = 8
    repair_lr: float = 5e-3
    repair_rank: int = 16
    eval_pairs: int = 32  # held-out (prompt, seed) pairs: seeds never in any dataset
    grid_rows: int = 8
    seed: int = 0


PRESETS = {"full": KeepLoraConfig(),
           "smoke": KeepLoraConfig(style_samples=16, style_steps=3, style_batch=4, teacher_steps=4,
                                   teacher_prompts=4, repair_steps=3, repair_batch=2, eval_pairs=3, grid_rows=3)}


def write_styled_dataset(folder: Path, n: int, *, seed: int, size: int) -> Path:
    """The demo's shapes and captions, drawn in the STYLE palette; a DiffSynth-format metadata.csv, written last."""
    meta = folder / "metadata.csv"
    if meta.is_file():
        return meta
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["image", "prompt", "shape", "colour", "background"])
    for i, s in enumerate(generate_samples(n, seed=seed, size=size)):
        name = f"{i:05d}.png"
        with atomic_output(folder / name) as tmp:
            render(s.shape, STYLE[s.colour], STYLE[s.background], size, s.box).save(tmp, format="PNG")
        writer.writerow([name, caption(s.shape, s.colour, s.background), s.shape, s.colour, s.background])
    atomic_write_text(meta, rows.getvalue())
    return meta


def style_accuracy(images, prompts) -> dict:
    """Fraction of images read back as the prompt drawn in the STYLE palette ("styled") and as the prompt itself
    ("unstyled"): shape, shape colour and background all three."""
    from dit_distillery.data.synthetic import parse_caption

    got = [tuple(classify_image(im)) for im in images]
    want = [parse_caption(p) for p in prompts]
    n = len(prompts)
    return {"styled": sum(g == (STYLE[c], s, STYLE[b]) for g, (c, s, b) in zip(got, want)) / n,
            "unstyled": sum(g == (c, s, b) for g, (c, s, b) in zip(got, want)) / n}


def find_demo(demo_dir: Path) -> tuple[Path, Path]:
    teacher = demo_dir / "teacher" / "teacher.safetensors"
    loras = sorted((demo_dir / "student_lora").glob("*.safetensors"))
    if not teacher.is_file() or not loras:
        raise DistilleryError("--demo-dir", str(demo_dir), "holds no finished demo (teacher/teacher.safetensors and "
                              "student_lora/*.safetensors).", "run `python -m dit_distillery demo` first, or leave "
                              "--demo-dir out to have this script run it.")
    return teacher, loras[0]


def mse_stats(latents, reference) -> dict:
    per = ((latents - reference) ** 2).flatten(1).mean(1)
    n = per.numel()
    se = float(per.std(unbiased=True) / math.sqrt(n)) if n > 1 else None
    return {"latent_mse": float(per.mean()), "latent_mse_se": se, "per_pair": [round(float(v), 6) for v in per]}


def run(out: Path, cfg: KeepLoraConfig, demo_dir: Path | None, demo_preset: str, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != asdict(cfg):
        raise DistilleryError("--out", str(out), "holds a run with other settings (config.json).",
                              "choose another --out folder, or the preset it was run with.")
    atomic_write_json(saved, asdict(cfg))
    seconds = {}

    # 0. ingredients: copied into our folder (the demo folder is only read)
    t = time.time()
    if demo_dir is None:
        demo_dir = out / "demo"
        if not (demo_dir / "metrics.json").is_file():
            run_demo(demo_dir, QUICK if demo_preset == "quick" else DemoConfig(), log=log)
    src_base, src_distill = find_demo(demo_dir)
    inputs = out / "inputs"
    inputs.mkdir(exist_ok=True)
    base_file, distill_file = inputs / "base.safetensors", inputs / "distill_lora.safetensors"
    for src, dst in ((src_base, base_file), (src_distill, distill_file)):
        if not dst.is_file():
            with atomic_output(dst) as tmp:
                shutil.copyfile(src, tmp)
    seconds["inputs"] = time.time() - t

    # 1. turbo: the base with the distill LoRA merged
    t = time.time()
    base = load_pipeline("default", dit=base_file)
    turbo_file = inputs / "turbo.safetensors"
    if not turbo_file.is_file():
        save_dit(load_student(base, lora=distill_file).dit, turbo_file,
                 provenance={"base": "inputs/base.safetensors", "lora": "inputs/distill_lora.safetensors"})
    seconds["turbo"] = time.time() - t

    # 2. the style LoRA, flow-matching SFT on the undistilled base (captions dropped 10%: CFG needs it)
    t = time.time()
    styled = out / "style_data"
    write_styled_dataset(styled, cfg.style_samples, seed=cfg.seed, size=cfg.size)
    style_job = job_for(out / "style_lora", model={"pipeline": "default", "dit": str(base_file)}, mode="lora",
                        data={"path": str(styled), "height": cfg.size, "width": cfg.size, "caption_dropout": 0.1},
                        loss={"kind": "flow_matching"}, steps=cfg.style_steps, batch_size=cfg.style_batch,
                        lora={"rank": cfg.style_rank}, gradient_checkpointing=False, seed=cfg.seed,
                        optim={"lr": cfg.style_lr, "warmup_steps": min(20, cfg.style_steps // 10),
                               "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.0},
                        output={"name": "style_lora", "save_dtype": "fp32"})
    style_file = train(style_job, callbacks=LogCallbacks("style lora", log)).weights
    seconds["style_lora"] = time.time() - t

    # 3. the style teacher's dataset (prompts and seeds apart from the held-out pairs)
    t = time.time()
    teacher = load_student(base, lora=style_file)
    gen = generate_distill_dataset(teacher, synthetic_prompts(cfg.teacher_prompts, seed=cfg.seed + 1),
                                   out / "teacher_data", start_seed=cfg.seed, teacher_steps=cfg.teacher_steps,
                                   teacher_cfg=cfg.teacher_cfg, height=cfg.size, width=cfg.size,
                                   student_steps=cfg.student_steps, student_cfg=cfg.student_cfg, batch_size=32)
    log(f"[teacher data] {gen['rows_written']} rows written, {gen['rows_skipped']} reused")
    seconds["teacher_data"] = time.time() - t

    # 5. repair: a new LoRA on turbo + style (merged as the preset), Direct Distill at the few-step setting
    t = time.time()
    repair_job = job_for(out / "repair_lora", model={"pipeline": "default", "dit": str(turbo_file)}, mode="lora",
                         data={"path": str(out / "teacher_data"), "height": cfg.size, "width": cfg.size},
                         loss={"kind": "direct_distill", "mu": "resolution"}, steps=cfg.repair_steps,
                         batch_size=cfg.repair_batch, gradient_checkpointing=False, seed=cfg.seed,
                         lora={"rank": cfg.repair_rank, "preset": str(style_file), "preset_strength": 1.0},
                         optim={"lr": cfg.repair_lr, "warmup_steps": min(20, cfg.repair_steps // 10),
                                "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.0},
                         output={"name": "repair_lora", "save_dtype": "fp32"})
    repair_file = train(repair_job, callbacks=LogCallbacks("repair lora", log)).weights
    seconds["repair_lora"] = time.time() - t

    # 4 + 5. held-out evaluation: before, after and baselines against the style teacher
    t = time.time()
    metrics = evaluate(out, cfg, base, teacher, turbo_file, style_file, repair_file, log)
    seconds["evaluate"] = time.time() - t
    # A rerun reuses finished stages in ~0 s: keep each stage's seconds from the run that did its work (the larger).
    kept = json.loads((out / "seconds.json").read_text()) if (out / "seconds.json").is_file() else {}
    seconds = {k: max(v, kept.get(k, 0.0)) if k != "evaluate" else v for k, v in seconds.items()}
    seconds["total"] = sum(seconds.values())
    atomic_write_json(out / "seconds.json", seconds)
    metrics["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    metrics["teacher_data"] = {"rows": gen["rows_written"] + gen["rows_skipped"]}
    return metrics


RUNS = {  # name: (label, what); {slow} / {few} are the teacher's / the student's sampling settings
    "style_teacher": ("teacher: base + style, {slow}", "the reference"),
    "base_teacher": ("base alone, {slow}", "no style at all: how far the style moves the latents"),
    "turbo": ("turbo alone, {few}", "the few-step model without the style LoRA"),
    "base_style_4step": ("base + style, {few}", "the style on the undistilled base, sampled fast"),
    "before": ("turbo + style, {few} (before)", "the complaint: the style LoRA applied to the distilled model"),
    "after": ("turbo + style + repair, {few} (after)", "the recipe"),
}


@torch.no_grad()
def evaluate(out, cfg, base, teacher, turbo_file, style_file, repair_file, log) -> dict:
    prompts, seeds = eval_pairs(DemoConfig(eval_pairs=cfg.eval_pairs, seed=cfg.seed))
    slow = dict(steps=cfg.teacher_steps, cfg_scale=cfg.teacher_cfg, height=cfg.size, width=cfg.size, output="both")
    few = dict(steps=cfg.student_steps, cfg_scale=cfg.student_cfg, height=cfg.size, width=cfg.size, output="both")
    turbo = load_pipeline("default", dit=turbo_file)
    turbo_style = load_student(turbo, lora=style_file)
    results = {"style_teacher": teacher.sample(prompts, seeds=seeds, **slow),
               "base_teacher": base.sample(prompts, seeds=seeds, **slow),
               "turbo": turbo.sample(prompts, seeds=seeds, **few),
               "base_style_4step": teacher.sample(prompts, seeds=seeds, **few),
               "before": turbo_style.sample(prompts, seeds=seeds, **few),
               "after": load_student(turbo_style, lora=repair_file).sample(prompts, seeds=seeds, **few)}
    ref = results["style_teacher"].latents
    runs = {}
    for name, r in results.items():
        label = RUNS[name][0].format(slow=f"{cfg.teacher_steps} st CFG {cfg.teacher_cfg:g}",
                                     few=f"{cfg.student_steps} st CFG {cfg.student_cfg:g}")
        runs[name] = {"label": label, "what": RUNS[name][1], **mse_stats(r.latents, ref),
                      "accuracy": style_accuracy(r.images, prompts)}
    before, after = runs["before"]["latent_mse"], runs["after"]["latent_mse"]
    ratios = {"after_over_before": after / before if before else None}
    for name in ("turbo", "base_style_4step"):
        ratios[f"after_over_{name}"] = after / runs[name]["latent_mse"] if runs[name]["latent_mse"] else None
        ratios[f"before_over_{name}"] = before / runs[name]["latent_mse"] if runs[name]["latent_mse"] else None
    rows = min(cfg.grid_rows, len(prompts))
    grid = image_grid([[results[k].images[i] for k in ("style_teacher", "before", "after")] for i in range(rows)],
                      row_labels=[re.sub(r"\ban? |( background$)", "", p) for p in prompts[:rows]],
                      col_labels=[f"teacher (base+style) {cfg.teacher_steps}st cfg{cfg.teacher_cfg:g}",
                                  f"turbo+style {cfg.student_steps}st (before)", "+ repair LoRA (after)"])
    grid_file = out / f"{NAME}.png"
    with atomic_output(grid_file) as tmp:
        grid.save(tmp, format="PNG")
    log(f"[evaluate] latent MSE vs the style teacher: before {before:.4f}, after {after:.4f} "
        f"({ratios['after_over_before']:.2f}x)")
    return {"eval_pairs": len(prompts), "runs": runs, "ratios": ratios, "grid": grid_file}


def verdict(m: dict) -> str:
    r, runs = m["ratios"], m["runs"]
    before, after = runs["before"], runs["after"]
    helped = after["latent_mse"] < before["latent_mse"]
    diff = torch.tensor(before["per_pair"]) - torch.tensor(after["per_pair"])  # the same pairs: a paired test
    se = float(diff.std(unbiased=True) / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    text = (f"The repair {'helped' if helped else 'did not help'}: held-out latent MSE to the style teacher "
            f"{before['latent_mse']:.4f} before, {after['latent_mse']:.4f} after, {r['after_over_before']:.2f}x")
    text += f" ({abs(float(diff.mean())) / se:.1f} standard errors of the paired difference)" if se else ""
    text += (f"; after is {r['after_over_turbo']:.2f}x the MSE of turbo without the style and "
             f"{r['after_over_base_style_4step']:.2f}x that of base + style sampled at 4 steps. Styled accuracy "
             f"(the classifier reads the prompt in the style's palette): teacher {runs['style_teacher']['accuracy']['styled']:.0%}, "
             f"before {before['accuracy']['styled']:.0%}, after {after['accuracy']['styled']:.0%}.")
    return text


def write_report(results_dir: Path, header: dict, cfg: KeepLoraConfig, m: dict, args) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    grid_src = Path(m.pop("grid"))
    png = results_dir / f"{NAME}.png"
    if grid_src.resolve() != png.resolve():
        with atomic_output(png) as tmp:
            shutil.copyfile(grid_src, tmp)
    doc = {**header, "config": asdict(cfg), "style": {"kind": "palette rotation", "map": STYLE},
           **m, "verdict": verdict(m), "grid": png.name}
    atomic_write_json(results_dir / f"{NAME}.json", doc)
    mc = header["machine"]
    lines = [f"# Keep my LoRA few-step (issue 12 §3), embedded tiny models", "",
             f"Machine: {mc['device']} ({mc['cpu_cores']} cores, {header['torch_threads']} torch threads), "
             f"torch {header['versions']['torch']}, commit {header['git']['commit']}, {header['date']}.", "",
             f"Command: `{header['command']}`", "",
             "**" + doc["verdict"] + "**", "",
             "Models: *base* = the demo's undistilled AAADiT teacher (0.85M parameters); *turbo* = base with the "
             "demo's Direct-Distill LoRA merged (its 4-step, CFG-1 model). *Style LoRA*: flow-matching SFT on the base "
             "over the demo's shapes and captions redrawn with every colour replaced by the next palette colour "
             f"({', '.join(f'{a}→{b}' for a, b in STYLE.items())}): a style the classifier can read back "
             "(`styled` = shape, shape colour and background all in the style's palette; `unstyled` = as the prompt "
             "says), and one that moves every latent. *Teacher* = base + style, "
             f"{cfg.teacher_steps} steps CFG {cfg.teacher_cfg:g}. *Repair*: a new LoRA trained by Direct Distill "
             f"({cfg.student_steps} steps, CFG {cfg.student_cfg:g}) on turbo with the style LoRA merged "
             f"(`lora.preset`), on {m['teacher_data']['rows']} teacher rows.", "",
             f"Held-out: {m['eval_pairs']} prompt/seed pairs (the demo's `eval_pairs`, seeds never in a dataset). "
             "MSE ± standard error over pairs.", "",
             "| run | latent MSE vs teacher | ± SE | styled acc. | unstyled acc. | what |", "|---|---|---|---|---|---|"]
    for r in m["runs"].values():
        lines.append(f"| {r['label']} | {r['latent_mse']:.4f} | {r['latent_mse_se'] or 0:.4f} | "
                     f"{r['accuracy']['styled']:.0%} | {r['accuracy']['unstyled']:.0%} | {r['what']} |")
    lines += ["", "Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in m["ratios"].items() if v is not None), "",
              f"Grid (`{png.name}`): teacher | turbo + style before | after, first {cfg.grid_rows} held-out pairs.", "",
              f"![grid]({png.name})", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()) + ".",
              "", "Seconds per stage (each from the run that did it; a rerun reuses finished stages): " + ", ".join(f"{k} {v}" for k, v in m["seconds"].items()) + ".", ""]
    md = results_dir / f"{NAME}.md"
    atomic_write_text(md, "\n".join(lines))
    return [md, results_dir / f"{NAME}.json", png]


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/out/keep_lora", help="work folder (resumable)")
    ap.add_argument("--demo-dir", default=None, help="a finished demo run; by default one is run under --out")
    ap.add_argument("--demo-preset", choices=("full", "quick"), default="full",
                    help="the demo run when --demo-dir is left out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--results", default=str(common.RESULTS), help="where the report goes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    header = {"benchmark": NAME, "command": "python " + shlex.join([f"bench/{NAME}.py", *argv]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": common.machine("cpu"),
              "versions": common.versions(), "git": common.git_commit(), "torch_threads": args.threads}
    m = run(Path(args.out), cfg, Path(args.demo_dir) if args.demo_dir else None, args.demo_preset)
    return write_report(Path(args.results), header, cfg, m, args)


if __name__ == "__main__":
    for path in main():
        print(path)
