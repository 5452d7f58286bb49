"""Which blocks to drop, where it matters (issue 13 §5): uniform / interval / importance / learnable on a 12-block
embedded teacher, shrunk to 6 and to 4 blocks, each student recovered with the same budget, over several seeds.

    python bench/block_selection.py                  # every stage (resumes: finished work under --out is reused)
    python bench/block_selection.py --preset smoke   # seconds; proves the stages and the report run

The 4-block demo teacher is too shallow to tell strategies apart (bench/results/quality.md §3: two of its blocks
scored the same to four digits). Here:

1. **Teacher**: an AAADiT like the demo's, 12 blocks, trained from scratch on the synthetic shapes task with the
   demo's SFT job (`demo.job_for`, flow matching, captions dropped 10%).
2. **Teacher data**: the teacher samples prompts (`gen_dataset`); its final latents, noised at sigmas drawn
   uniformly in (0, 1) with fixed noise, and the teacher's velocity there form the *pool*: the calibration inputs
   of importance and learnable, and the recovery data of every student.
3. **Selection** per depth and seed: uniform and interval (`plan.select_blocks`: the same every seed), importance
   (ShortGPT block influence, `shrink.blocks.block_influence`, on a seeded draw of 4 x 8 pool rows) and learnable
   (`shrink.learnable.learn_blocks` on the pool, seeded; its search time is reported apart from the recovery).
4. **Recovery**: each student (`drop_blocks`, exact copies of the kept blocks) is trained with full weights to
   match the teacher's velocity on the pool: the same steps, batch, learning rate and seed for every strategy.
   A student that two strategies both choose is trained once per seed.
5. **Evaluation**: held-out (prompt, seed) pairs (seeds from `demo.EVAL_SEED_OFFSET`, never in the teacher data)
   sampled by each student and by the teacher with the teacher's own settings; latent MSE to the teacher (mean
   over pairs), before and after recovery, and prompt accuracy (`evaluate.colour_shape_accuracy`). Per strategy:
   mean ± standard error over the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from dit_distillery.demo import EVAL_SEED_OFFSET, colour_shape_accuracy, job_for  # noqa: E402
from dit_distillery.formats import atomic_write_json, save_safetensors  # noqa: E402

OUT = ROOT / "bench" / "out" / "block_selection"
STRATEGIES = ("uniform", "interval", "importance", "learnable", "learnable_groups_of_4", "learnable_one_group")
# learnable: the pack's default settings (`LearnSettings()`: groups of 4, or one group when those would keep one
# block each, `learnable.auto_group_size`); the two fixed layouts it chooses between: groups of 4 consecutive
# candidates (TinyFusion's local groups), and ONE group of every candidate (any set can be kept)
GROUP_SIZES = {"learnable": None, "learnable_groups_of_4": 4, "learnable_one_group": -1}  # -1: blocks - 1


@dataclass
class Config:
    name: str = "full"
    samples: int = 560  # synthetic training images (the demo's)
    size: int = 32
    # the teacher: the demo's AAADiT shape (tiny.DEFAULT_DIT: width 128 x 4 blocks) made 12 blocks deep and half as
    # wide, so that SFT, the learnable search and 24 recoveries fit ~15 minutes of one shared CPU thread
    width: int = 64
    blocks: int = 12
    heads: int = 4
    teacher_steps: int = 400
    teacher_batch: int = 16
    teacher_lr: float = 2e-3
    data_prompts: int = 128  # teacher-data rows (one seed each)
    sample_steps: int = 20  # the teacher's sampling settings (also the evaluation's)
    cfg: float = 4.0
    noise_draws: int = 4  # pool rows per teacher latent (each its own noise and sigma)
    depths: tuple = (6, 4)
    seeds: tuple = (0, 1, 2, 3, 4)  # every (depth, seed) cell is cached on its own: adding seeds reuses the rest
    calibration_batches: int = 4  # importance: batches of pool rows
    calibration_batch: int = 8
    learn_steps: int = 100  # learnable: LearnSettings defaults otherwise (200 steps)
    learn_batch: int = 8
    recover_steps: int = 80
    recover_batch: int = 16
    recover_lr: float = 1e-3
    eval_pairs: int = 32


PRESETS = {
    "full": Config(),
    "smoke": Config(name="smoke", samples=64, blocks=5, teacher_steps=10, data_prompts=8, sample_steps=4,
                    noise_draws=2, depths=(3,), seeds=(0, 1), calibration_batches=1, calibration_batch=4,
                    learn_steps=4, recover_steps=3, eval_pairs=4),
}


def _log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


class Bench:
    """One experiment folder (`--out`) of one configuration: cached stages, the teacher, the pool, evaluations."""

    def __init__(self, out: Path, cfg: Config, log=_log):
        self.out, self.cfg, self.log = Path(out), cfg, log
        self.out.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self._check_config()
        from dit_distillery.gen_dataset import synthetic_prompts

        self.prompts = synthetic_prompts(cfg.eval_pairs, seed=7)
        self.seeds = [EVAL_SEED_OFFSET + i for i in range(cfg.eval_pairs)]

    def _check_config(self) -> None:
        """One folder, one configuration (the seeds aside: each seed's cells are cached on their own)."""
        path, now = self.out / "config.json", json.loads(json.dumps(asdict(self.cfg)))
        if path.is_file() and {**json.loads(path.read_text()), "seeds": None} != {**now, "seeds": None}:
            raise SystemExit(f"{self.out} holds runs made with other settings: use another --out or delete it.")
        atomic_write_json(path, now)

    def timed(self, stage: str, fn):
        start = time.perf_counter()
        result = fn()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return result

    # -- 1. the teacher
    @property
    def teacher_file(self) -> Path:
        return self.out / "teacher" / "teacher.safetensors"

    def teacher(self) -> None:
        from dit_distillery.data.synthetic import write_dataset
        from dit_distillery.demo import LogCallbacks
        from dit_distillery.models.registry import save_dit
        from dit_distillery.tiny import DEFAULT_DIT, tiny_aaadit
        from dit_distillery.trainer import train

        c = self.cfg
        if self.teacher_file.is_file():
            return
        data = self.out / "data"
        if not (data / "metadata.csv").is_file():
            write_dataset(data, c.samples, seed=0, size=c.size)
        init = self.out / "teacher_init.safetensors"
        if not init.is_file():
            dit = tiny_aaadit(64, 48, seed=0, **dict(DEFAULT_DIT, width=c.width, num_blocks=c.blocks,
                                                     num_heads=c.heads, timestep_channels=c.width))
            save_dit(dit, init)
        job = job_for(self.out / "teacher", model={"pipeline": "default", "dit": str(init)},
                      data={"path": str(data), "height": c.size, "width": c.size, "caption_dropout": 0.1},
                      loss={"kind": "flow_matching"}, mode="full", steps=c.teacher_steps, batch_size=c.teacher_batch,
                      gradient_checkpointing=False, seed=0,
                      optim={"lr": c.teacher_lr, "warmup_steps": min(50, c.teacher_steps // 10),
                             "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.0},
                      output={"name": "teacher", "save_dtype": "fp32", "save_every": 100},
                      validation={"eval_samples": 0})
        train(job, callbacks=LogCallbacks("teacher", self.log, every=100))

    def pipe(self, dit=None):
        from dit_distillery.pipelines.loading import load_dit, load_pipeline

        if not hasattr(self, "_base"):
            self._base = load_pipeline("default")
        return self._base.with_dit(dit if dit is not None else load_dit(self.teacher_file))

    # -- 2. teacher data and the pool
    def teacher_data(self) -> Path:
        from dit_distillery.gen_dataset import generate_distill_dataset, synthetic_prompts

        c = self.cfg
        folder = self.out / "teacher_data"
        generate_distill_dataset(self.pipe(), synthetic_prompts(c.data_prompts, seed=1), folder, seeds_per_prompt=1,
                                 start_seed=0, teacher_steps=c.sample_steps, teacher_cfg=c.cfg, height=c.size,
                                 width=c.size, batch_size=32)
        return folder

    def pool(self, teacher_pipe):
        """(Calibration of the noised teacher latents, the teacher's velocity there): fixed noise and sigmas."""
        from safetensors.torch import load_file

        from dit_distillery.data.metadata import read_metadata
        from dit_distillery.shrink import Calibration
        from dit_distillery.velocity import predict_velocity

        rows = read_metadata(self.out / "teacher_data").rows
        x0 = torch.stack([load_file(str(r.latents))["latents"] for r in rows]).float()
        text = teacher_pipe.encode_prompts([r.prompt for r in rows])
        g = torch.Generator().manual_seed(1234)
        k = self.cfg.noise_draws
        x0, text = x0.repeat(k, 1, 1, 1), text.select(torch.arange(len(rows)).repeat(k))
        sigma = torch.rand(len(x0), generator=g)
        s4 = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s4) * x0 + s4 * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            v = torch.cat([predict_velocity(teacher_pipe.dit, x_t[i:i + 64], sigma[i:i + 64],
                                            text.select(slice(i, i + 64))).float() for i in range(0, len(x_t), 64)])
        return Calibration(x_t, text, sigma), v

    # -- evaluation
    def sample(self, pipe):
        c = self.cfg
        return pipe.sample(self.prompts, seeds=self.seeds, steps=c.sample_steps, cfg_scale=c.cfg, height=c.size,
                           width=c.size, output="both")

    def reference(self, teacher_pipe) -> dict:
        path = self.out / "reference.safetensors"
        if not path.is_file():
            result = self.sample(teacher_pipe)
            save_safetensors({"latents": result.latents}, path)
            atomic_write_json(self.out / "reference.json",
                              {"accuracy": colour_shape_accuracy(result.images, self.prompts)})
        from safetensors.torch import load_file

        return {"latents": load_file(str(path))["latents"],
                **json.loads((self.out / "reference.json").read_text())}

    def evaluate(self, dit, ref: dict) -> dict:
        result = self.sample(self.pipe(dit))
        mse = ((result.latents.float() - ref["latents"].float()) ** 2).flatten(1).mean(1)
        return {"latent_mse": float(mse.mean()), "latent_mse_se_pairs": float(mse.std() / math.sqrt(len(mse))),
                "accuracy": colour_shape_accuracy(result.images, self.prompts)}

    # -- 3. selection
    def select(self, teacher_pipe, cal, depth: int, seed: int) -> dict:
        """{strategy: {"kept": [...], "seconds": s, ...}} for one depth and seed (cached)."""
        from dit_distillery.shrink.blocks import block_influence
        from dit_distillery.shrink.learnable import learn_blocks
        from dit_distillery.shrink.plan import select_blocks

        path = self.out / "selections" / f"d{depth}_s{seed}.json"
        chosen = json.loads(path.read_text()) if path.is_file() else {}
        if all(s in chosen for s in STRATEGIES):
            return chosen
        c, n = self.cfg, self.cfg.blocks
        for s in ("uniform", "interval"):
            chosen.setdefault(s, {"kept": select_blocks(s, n, depth), "seconds": 0.0})
        if "importance" not in chosen:
            start = time.perf_counter()
            g = torch.Generator().manual_seed(seed)
            total = [0.0] * n
            for _ in range(c.calibration_batches):
                idx = torch.randperm(len(cal.latents), generator=g)[:c.calibration_batch]
                scores = block_influence(teacher_pipe.dit, cal.latents[idx], cal.sigmas[idx], cal.text.select(idx))
                total = [a + b / c.calibration_batches for a, b in zip(total, scores)]
            chosen["importance"] = {"kept": select_blocks("importance", n, depth, scores=total), "scores": total,
                                    "seconds": time.perf_counter() - start}
        for name, size in GROUP_SIZES.items():  # each computed once (a strategy added later joins the cache)
            if name not in chosen:
                settings = {"steps": c.learn_steps, "batch": c.learn_batch, "seed": seed}
                if size is not None:
                    settings["group_size"] = n - 1 if size == -1 else size
                chosen[name] = self._learnt(learn_blocks(teacher_pipe.dit, depth, cal, settings))
        atomic_write_json(path, chosen)
        self.log(f"[select] {depth} blocks, seed {seed}: " + ", ".join(f"{s} {v['kept']}" for s, v in chosen.items()))
        return chosen

    @staticmethod
    def _learnt(learned) -> dict:
        return {"kept": learned.kept["blocks"], "keep_probability": learned.keep_probability["blocks"],
                "groups": learned.groups, "loss_first": learned.losses[0],
                "loss_last": sum(learned.losses[-10:]) / len(learned.losses[-10:]), "seconds": learned.seconds}

    # -- 4. recovery (+ 5. evaluation)
    def recover(self, teacher_pipe, cal, targets, kept: list[int], seed: int, ref: dict) -> dict:
        """Before/after metrics of the student keeping `kept`, recovered with seed `seed` (cached)."""
        from dit_distillery.shrink.blocks import drop_blocks
        from dit_distillery.velocity import predict_velocity

        c = self.cfg
        name = "keep_" + "_".join(map(str, kept))
        path = self.out / "runs" / f"{name}_s{seed}.json"
        if path.is_file():
            return json.loads(path.read_text())
        student, _ = drop_blocks(teacher_pipe.dit, strategy="list", keep_blocks=kept)
        before_path = self.out / "runs" / f"{name}_before.json"
        if not before_path.is_file():
            student.eval()
            atomic_write_json(before_path, self.timed("evaluate", lambda: self.evaluate(student, ref)))
        before = json.loads(before_path.read_text())
        start = time.perf_counter()
        student.train()
        for p in student.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(student.parameters(), lr=c.recover_lr, weight_decay=0.0)
        warm = max(1, c.recover_steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, c.recover_steps))))))
        g = torch.Generator().manual_seed(seed)
        queue: list[int] = []
        losses = []
        for _ in range(c.recover_steps):
            if len(queue) < c.recover_batch:
                queue += torch.randperm(len(cal.latents), generator=g).tolist()
            idx, queue = torch.tensor(queue[:c.recover_batch]), queue[c.recover_batch:]
            pred = predict_velocity(student, cal.latents[idx], cal.sigmas[idx], cal.text.select(idx))
            loss = torch.nn.functional.mse_loss(pred.float(), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - start
        self.seconds["recover"] = self.seconds.get("recover", 0.0) + seconds
        student.eval()
        after = self.timed("evaluate", lambda: self.evaluate(student, ref))
        info = {"kept": kept, "seed": seed, "before": before, "after": after, "train_seconds": round(seconds, 1),
                "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:])}
        atomic_write_json(path, info)
        self.log(f"[recover] {kept} seed {seed}: latent MSE {before['latent_mse']:.4f} -> {after['latent_mse']:.4f}")
        return info


def run(out: Path, cfg: Config, results: Path | None, argv: list[str]) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    b = Bench(out, cfg)
    b.timed("teacher", b.teacher)
    teacher_pipe = b.pipe()
    b.timed("teacher_data", b.teacher_data)
    cal, targets = b.timed("pool", lambda: b.pool(teacher_pipe))
    ref = b.timed("reference", lambda: b.reference(teacher_pipe))
    cells = []
    for depth in cfg.depths:
        for seed in cfg.seeds:
            chosen = b.timed("select", lambda: b.select(teacher_pipe, cal, depth, seed))
            for strategy in STRATEGIES:
                info = b.recover(teacher_pipe, cal, targets, chosen[strategy]["kept"], seed, ref)
                cells.append({"depth": depth, "seed": seed, "strategy": strategy, **info,
                              "select_seconds": round(chosen[strategy]["seconds"], 2),
                              "selection": {k: v for k, v in chosen[strategy].items() if k not in ("kept", "seconds")}})
    teacher_eval = json.loads((out / "reference.json").read_text())
    total = time.perf_counter() - started
    spent = out / "seconds.json"  # compute over every invocation that filled this folder (cached work is not redone)
    cum = json.loads(spent.read_text()) if spent.is_file() else {"stages": {}, "total": 0.0, "invocations": 0}
    cum["stages"] = {k: round(cum["stages"].get(k, 0.0) + b.seconds.get(k, 0.0), 1)
                     for k in {*cum["stages"], *b.seconds}}
    cum.update(total=round(cum["total"] + total, 1), invocations=cum["invocations"] + 1)
    atomic_write_json(spent, cum)
    rec = common.record("block_selection", argparse.Namespace(device="cpu", tiny=True), argv)
    rec.update(label="CPU, embedded 12-block teacher", config=asdict(cfg), cells=cells,
               summary=summarise(cells, cfg), teacher_accuracy=teacher_eval["accuracy"],
               seconds={k: round(v, 1) for k, v in b.seconds.items()}, total_seconds=round(total, 1),
               cumulative_seconds=cum, torch_threads=torch.get_num_threads())
    if results is not None:
        common.write_results(results, "block_selection", rec, markdown(rec))
    return rec


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarise(cells: list[dict], cfg: Config) -> dict:
    """Per depth: each strategy's after-recovery MSE (mean ± SE over seeds), before, accuracy, its choices; the
    best, and which strategies are within one standard error of the difference from it."""
    out = {}
    for depth in cfg.depths:
        rows = {}
        for s in STRATEGIES:
            mine = [c for c in cells if c["depth"] == depth and c["strategy"] == s]
            after, se = _mean_se([c["after"]["latent_mse"] for c in mine])
            before, before_se = _mean_se([c["before"]["latent_mse"] for c in mine])
            rows[s] = {"after": after, "after_se": se, "before": before, "before_se": before_se,
                       "accuracy": _mean_se([c["after"]["accuracy"]["all"] for c in mine])[0],
                       "kept": sorted({tuple(c["kept"]) for c in mine}),
                       "select_seconds": _mean_se([c["select_seconds"] for c in mine])[0]}
        best = min(rows, key=lambda s: rows[s]["after"])
        for s, r in rows.items():
            diff_se = math.sqrt(r["after_se"] ** 2 + rows[best]["after_se"] ** 2)
            r["vs_best"] = r["after"] - rows[best]["after"]
            r["within_one_se"] = r["vs_best"] <= diff_se
        out[str(depth)] = {"best": best, "strategies": rows}
    return out


def markdown(rec: dict) -> str:
    c, summary = rec["config"], rec["summary"]
    m, v, g = rec["machine"], rec["versions"], rec["git"]
    lines = ["# Which blocks to drop: strategies on a 12-block teacher (issue 13 §5)", "",
             f"`{rec['command']}`", "",
             f"{m['device']} ({m['cpu_cores']} cores shared with other jobs, {rec['torch_threads']} torch thread), "
             f"{m['os']}; Python {v['python']}, torch {v['torch']}, peft {v['peft']}. Commit "
             f"{(g['commit'] or '?')[:12]}; {rec['date']}; load average {rec['load_average_before'][0]:.1f} before. "
             f"Compute: {rec['cumulative_seconds']['total'] / 60:.1f} min of wall time over "
             f"{rec['cumulative_seconds']['invocations']} invocation(s) that filled the folder ("
             + ", ".join(f"{k} {s:.0f} s" for k, s in sorted(rec["cumulative_seconds"]["stages"].items()))
             + f"); this one {rec['total_seconds'] / 60:.1f} min (cached work is reused).", "",
             "## Set-up", "",
             f"* **Teacher**: AAADiT, width {c['width']} x {c['blocks']} blocks ({c['heads']} heads), the demo's "
             f"pixel codec and tiny text encoder, trained from scratch on {c['samples']} synthetic 32x32 shape images "
             f"(flow matching, {c['teacher_steps']} steps, batch {c['teacher_batch']}, lr {c['teacher_lr']}). The "
             "demo's teacher is 128 wide x 4 blocks: this one is half as wide so that 12 blocks, the searches and "
             "every recovery fit about 15 minutes of one shared CPU thread. Its accuracy at "
             f"{c['sample_steps']} steps CFG {c['cfg']:g} on the held-out pairs: "
             f"{rec['teacher_accuracy']['all']:.0%} all-correct (colour {rec['teacher_accuracy']['colour']:.0%}, "
             f"shape {rec['teacher_accuracy']['shape']:.0%}).",
             f"* **Pool**: {c['data_prompts']} teacher samples ({c['sample_steps']} steps, CFG {c['cfg']:g}) x "
             f"{c['noise_draws']} noise draws at sigma ~ U(0, 1), with the teacher's velocity: importance's and "
             "learnable's calibration inputs and every student's recovery data.",
             f"* **Selection**: uniform and interval (`select_blocks`, the same for every seed); importance "
             f"(ShortGPT influence on {c['calibration_batches']} x {c['calibration_batch']} pool rows drawn with the "
             f"seed); learnable (`shrink.learnable`, TinyFusion, the pack's default settings: {c['learn_steps']} "
             f"steps of {c['learn_batch']}, LoRA rank 8, Gumbel temperature 4 -> 0.1, seeded; groups of 4 "
             "candidate blocks, or one group when those would keep one block each: `auto_group_size`, which picks "
             "groups of 4 at 6 blocks and one group at 4) and its two fixed layouts: learnable_groups_of_4, and "
             f"learnable_one_group (all {c['blocks'] - 1} candidates in one group: any set can be kept). The last "
             "block is always kept last.",
             f"* **Recovery (equal budget)**: full weights, {c['recover_steps']} steps of batch {c['recover_batch']}, "
             f"AdamW lr {c['recover_lr']} (warm-up, cosine to 0.1x), loss = MSE to the teacher's velocity on the "
             "pool; the recovery seed is the selection seed.",
             f"* **Metric**: latent MSE to the teacher on {c['eval_pairs']} held-out (prompt, seed) pairs (seeds "
             f"never in the pool), both sampled at {c['sample_steps']} steps CFG {c['cfg']:g} from the same noise; "
             f"mean ± standard error over {len(c['seeds'])} seeds (each seed: its own selection draw, search and "
             "recovery). \"Within 1 SE\": the gap to the best is at most the standard error of the difference "
             "(the two SEs in quadrature).", ""]
    for depth, d in summary.items():
        lines += [f"## {c['blocks']} → {depth} blocks", "",
                  "| strategy | kept blocks (per seed) | MSE before recovery | MSE after recovery | gap to best | "
                  "within 1 SE of best | all-correct after | selection s |",
                  "|---|---|---|---|---|---|---|---|"]
        for s, r in sorted(d["strategies"].items(), key=lambda kv: kv[1]["after"]):
            kept = "; ".join(",".join(map(str, k)) for k in r["kept"])
            lines.append(f"| {s}{' (best)' if s == d['best'] else ''} | {kept} | {r['before']:.4f} ± "
                         f"{r['before_se']:.4f} | {r['after']:.4f} ± {r['after_se']:.4f} | {r['vs_best']:+.4f} | "
                         f"{'yes' if r['within_one_se'] else 'no'} | {r['accuracy']:.0%} | {r['select_seconds']:.1f} |")
        lines.append("")
    lines += ["## Per seed", "", "| blocks | seed | strategy | kept | MSE before | MSE after | all-correct after |",
              "|---|---|---|---|---|---|---|"]
    for cell in rec["cells"]:
        lines.append(f"| {cell['depth']} | {cell['seed']} | {cell['strategy']} | {','.join(map(str, cell['kept']))} | "
                     f"{cell['before']['latent_mse']:.4f} | {cell['after']['latent_mse']:.4f} | "
                     f"{cell['after']['accuracy']['all']:.0%} |")
    lines += ["", "## Verdict", ""] + verdict(summary) + same_as(rec["cells"]) + [""] + caveats(rec)
    return "\n".join(lines)


def same_as(cells: list[dict]) -> list[str]:
    """Which fixed layout the default learnable settings reproduced, per depth (same kept blocks every seed)."""
    out = []
    for depth in sorted({c["depth"] for c in cells}, reverse=True):
        kept = {s: [c["kept"] for c in cells if c["depth"] == depth and c["strategy"] == s]
                for s in ("learnable", "learnable_groups_of_4", "learnable_one_group")}
        same = [s for s in ("learnable_groups_of_4", "learnable_one_group") if kept[s] == kept["learnable"]]
        out.append(f"* {depth} blocks: the default learnable settings kept the same blocks as "
                   f"{' and '.join(same) or 'neither fixed layout'} at every seed.")
    return out


def caveats(rec: dict) -> list[str]:
    c, acc = rec["config"], rec["teacher_accuracy"]
    return ["## Caveats", "",
            "* **The default learnable grouping was chosen on this measurement.** The first runs used groups of 4 "
            "(TinyFusion's local groups) and one group; `auto_group_size` (one group when groups of 4 would keep one "
            "block each) was then made the default because it reproduces the better of the two at each depth. The "
            "`learnable` row meeting the goal at both depths is therefore not an independent test of that rule; "
            "another teacher or depth would be.",
            f"* **The teacher is trained briefly** ({c['teacher_steps']} steps of {c['teacher_batch']}; the demo's "
            "teacher needs about 900 steps of 32 before it follows prompts): its samples are "
            f"{acc['all']:.0%} all-correct, so the accuracy columns say nothing and the MSE measures how faithfully "
            "a student reproduces this teacher, not prompt following.",
            "* **Compute**: more than the ~15 minutes aimed at, on a 2-core CPU shared with other jobs (load average "
            "3 to 9 during the runs); the teacher is half the demo's width to make 12 blocks affordable. The "
            "'selection s' column is wall time under that varying load (learnable's includes computing the "
            "teacher's targets on the pool), so compare it only in order of magnitude: importance scores in under "
            "a second, learnable trains for tens of seconds here and, on a real model, loads the whole DiT for "
            "training where importance streams one block at a time.",
            "* Recovery here is velocity distillation on the pool, the same objective learnable's search optimises "
            "(TinyFusion's recoverability premise); a different recovery (Direct Distill to few steps) was not run.",
            ""]


def verdict(summary: dict) -> list[str]:
    out = []
    for depth, d in summary.items():
        near = [s for s, r in d["strategies"].items() if r["within_one_se"]]
        out.append(f"* {depth} blocks: best {d['best']}; within one SE of it: {', '.join(near)}.")
    everywhere = [s for s in STRATEGIES if all(d["strategies"][s]["within_one_se"] for d in summary.values())]
    out.append(f"* Best or within one SE at every depth: {', '.join(everywhere) or 'none'}.")
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="full")
    ap.add_argument("--out", default=None, help="experiment folder (default bench/out/block_selection[_PRESET])")
    ap.add_argument("--results", default=None, help="where block_selection.{json,md} go (default bench/results for "
                    "the full preset, the experiment folder otherwise)")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    out = Path(args.out) if args.out else OUT.with_name(OUT.name + ("" if args.preset == "full" else f"_{args.preset}"))
    results = Path(args.results) if args.results else (common.RESULTS if args.preset == "full" else out)
    rec = run(out, cfg, results, argv)
    print(markdown(rec))
    return rec


if __name__ == "__main__":
    main()
