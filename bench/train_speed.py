"""AAADiT from scratch (SFT): images/s, MFU and peak memory by batch size, with and without the latent/text
cache, against DiffSynth-Studio's own tutorial loop on the same device, the same model and the same data.

    python bench/train_speed.py --device cuda                      # the issue's sizes (GPU)
    python bench/train_speed.py --device cpu                       # tiny sizes: correctness only

Real sizes: the tutorial's AAADiT (0.13B: 10 blocks, 1024 wide, 32 heads), 256² images (latents 128x16x16 = 256
tokens), 128 text tokens from a Qwen3-0.6B-shaped encoder, the FLUX.2 VAE, batch sizes 1..256.

Ours: `dit_distillery.trainer.train` itself (full training, fp32 master weights + bf16 autocast, AdamW, grad
clipping, SDPA attention), on a synthetic shapes dataset written once: "cached" trains from the latent/text
cache (built once, before timing), "uncached" encodes every item with the VAE and text encoder as it is read.
Steps are timed through the trainer's `on_step` callback. `--compile` compiles each AAABlock
(`nn.Module.compile`, done here: the trainer has no switch for it). `--gradient-checkpointing` turns on the
trainer's default per-block checkpointing (off here: the 0.13B model fits without it, and it costs a forward).

DiffSynth: its tutorial's `AAATrainingModule` in its `launch_training_task` (batch 1, text encoder + VAE every
step, bf16 weights), see `diffsynth_baselines.aaadit_sft`.

MFU = images/s x model FLOPs per sample (3x the analytic forward, see `flops.py`) / the device's peak dense bf16
FLOP/s. Writes bench/results/train_speed[_cpu_tiny].{json,md} and images/s and memory charts.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import StepClock, fmt, free, gib, md_table, ratio, setup_torch  # noqa: E402

BENCH = "train_speed"
SIDES = ("ours", "diffsynth")


def defaults(tiny: bool) -> dict:
    if tiny:
        return {"image_size": 64, "text_tokens": 128, "batch_sizes": [1, 2, 4], "warmup": 4, "steps": 4}
    return {"image_size": 256, "text_tokens": 128, "batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256],
            "warmup": 5, "steps": 20}


def write_data(folder: Path, n: int, size: int) -> Path:
    from dit_distillery.data.synthetic import write_dataset

    if not (folder / "metadata.csv").is_file():
        write_dataset(folder, n, size=size, seed=0)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Our side: the real trainer

def ours(settings: dict) -> dict:
    device = setup_torch(settings)
    from dit_distillery.trainer import Callbacks, TrainJob, train
    from dit_distillery.trainer.job import DataSpec, OptimSpec, OutputSpec, ValidationSpec

    from bench import workloads

    pipe = workloads.aaadit_pipeline(settings["tiny"], settings["text_tokens"])
    if device.type == "cuda":  # the trainer's "auto": bf16 base on a GPU, fp32 on a CPU
        pipe.to(device=device, dtype=torch.bfloat16)
    if settings["compile"]:
        for block in pipe.dit.blocks:
            block.compile()
    work, size = Path(settings["work"]), settings["image_size"]
    about = {"path": "dit_distillery.trainer.train (full training, cache on/off)",
             "dtype": "fp32 master weights, bf16 autocast; text encoder and VAE bf16" if device.type == "cuda"
             else "fp32 (the trainer's CPU default)",
             "compile": settings["compile"], "gradient_checkpointing": settings["gradient_checkpointing"],
             "attention": "torch SDPA"}
    runs = []
    for cached in settings["modes"]:
        warmup, steps = (settings["warmup"], settings["steps"]) if cached else settings["uncached_timing"]
        for batch in settings["batch_sizes"]:
            total = warmup + steps
            repeat = max(1, math.ceil((total + 1) * batch / settings["images"]))
            job = TrainJob(
                data=DataSpec(path=settings["dataset"], height=size, width=size, cache=cached,
                              cache_dir=str(work / "cache"), repeat=repeat),
                loss={"kind": "flow_matching"}, mode="full", steps=total, batch_size=batch,
                gradient_checkpointing=settings["gradient_checkpointing"], optim=OptimSpec(lr=2e-4),
                output=OutputSpec(dir=str(work / f"run-{batch}-{cached}"), save_every=0, keep_last=1),
                validation=ValidationSpec(), resume=None, seed=settings["seed"])
            clock = StepClock(device, warmup)
            losses = []

            class Timing(Callbacks):
                def on_message(self, text):
                    if text.startswith("training "):
                        clock.start()

                def on_step(self, info):
                    clock.tick()
                    losses.append(info.loss)

            try:
                train(job, pipeline=pipe, callbacks=Timing())
                run = clock.summary(images_per_step=batch)
                run["losses_finite"] = all(math.isfinite(x) for x in losses)
            except Exception as exc:  # an out-of-memory batch size is a result, not a crash
                if "out of memory" not in str(exc).lower():
                    raise
                run = {"error": f"out of memory at batch {batch}"}
            run.update(batch=batch, cached=cached)
            runs.append(run)
            common.report_partial(dict(about, runs=runs))
            shutil.rmtree(work / f"run-{batch}-{cached}", ignore_errors=True)
            free(device)
    overheads = [] if settings.get("no_overheads") else \
        [dict(batch=b, **host_overheads(pipe, settings, b, device)) for b in settings["batch_sizes"]]
    return dict(about, runs=runs, overheads=overheads)


def host_overheads(pipe, settings: dict, batch: int, device, repeats: int = 5) -> dict:
    """Where a step's time goes outside the DiT, per batch size (medians, ms):
    * `loss_without_dit_ms`: `FlowMatchingLoss` with the DiT call replaced by zeros (its per-sample sigma and noise
      draws on the CPU generators, the host-to-device copy, the weighting);
    * `cached_batch_ms`: reading one batch from the latent/text cache through the trainer's own `prepare_data`,
      DataLoader and `collate`, and moving it to the device."""
    import statistics
    import time

    from dit_distillery import losses
    from dit_distillery.trainer import Callbacks, TrainJob
    from dit_distillery.trainer.job import DataSpec, OutputSpec
    from dit_distillery.trainer.setup import make_accelerator, move_batch, prepare_data
    from dit_distillery.data import collate

    size = settings["image_size"]
    job = TrainJob(data=DataSpec(path=settings["dataset"], height=size, width=size, cache=True,
                                 cache_dir=str(Path(settings["work"]) / "cache"), repeat=repeats + 2),
                   batch_size=batch, resume=None,
                   output=OutputSpec(dir=str(Path(settings["work"]) / "overheads")))
    dataset, sampler, _, _ = prepare_data(job, pipe, make_accelerator(job), Callbacks(), lambda: False)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    data_times, loss_times = [], []
    loss = losses.FlowMatchingLoss()
    real = losses.predict_velocity
    losses.predict_velocity = lambda dit, x, sigma, text: torch.zeros_like(x)
    try:
        for i in range(repeats + 1):
            common.sync(device)
            t0 = time.perf_counter()
            item = move_batch(next(loader), device)
            common.sync(device)
            t1 = time.perf_counter()
            loss(pipe.dit, item, losses.SampleRNG(0, i, [f"0:{r}" for r in item["row"]]))
            common.sync(device)
            t2 = time.perf_counter()
            if i:  # the first batch opens the cache shards
                data_times.append(t1 - t0)
                loss_times.append(t2 - t1)
    finally:
        losses.predict_velocity = real
    shutil.rmtree(Path(settings["work"]) / "overheads", ignore_errors=True)
    return {"cached_batch_ms": 1e3 * statistics.median(data_times), "loss_without_dit_ms": 1e3 * statistics.median(loss_times)}


def diffsynth(settings: dict) -> dict:
    from bench.diffsynth_baselines import aaadit_sft

    return aaadit_sft(settings)


FNS = {"ours": ours, "diffsynth": diffsynth}


# ----------------------------------------------------------------------------------------------------------
# Report

def report(rec: dict) -> str:
    res, flops = rec["sides"], rec["flops"]
    lines = common.md_header("AAADiT from scratch (SFT): training speed and memory", rec)
    s = rec["settings"]
    lines += [f"Model: AAADiT {s['model']}; {s['image_size']}² images (latents {s['latent_shape']}), "
              f"{s['text_tokens']} text tokens; {s['warmup']} warm-up steps dropped, median of {s['steps']} steps "
              f"(uncached: {s['uncached_timing'][0]} and {s['uncached_timing'][1]}). MFU counts the DiT's FLOPs only "
              "(uncached steps also run the text encoder and VAE).",
              f"FLOPs per sample (analytic, matmuls only): forward {flops['forward'] / 1e9:.2f} GFLOP, training step "
              f"(3x) {flops['train'] / 1e9:.2f} GFLOP; cross-check on a small AAADiT with torch's FlopCounterMode: "
              f"forward {'equal' if flops['crosscheck']['forward_match'] else 'DIFFERENT'} "
              f"({flops['crosscheck']['counted_forward']:,} vs {flops['crosscheck']['analytic_forward']:,}), training "
              f"counted/analytic {flops['crosscheck']['train_counted_over_analytic']:.3f}.",
              f"Peak: {fmt(rec['peak_flops'] and rec['peak_flops'] / 1e12, '.0f')} TFLOP/s ({rec['peak_source']}).", ""]
    ds = res.get("diffsynth", {"skipped": "not run in this invocation"})
    ds_ips = ds.get("images_per_s")
    ours_side = res.get("ours", {})
    status = common.side_status(ds)
    if common.side_status(ours_side):
        lines += [f"Ours: {common.side_status(ours_side)}", ""]
    rows = []
    by = {(r["batch"], r["cached"]): r for r in ours_side.get("runs", [])}
    for b in s["batch_sizes"]:
        row = [b]
        for cached in (True, False):
            r = by.get((b, cached), {})
            ips = r.get("images_per_s")
            row += [fmt(ips), fmt(r.get("mfu") and 100 * r["mfu"], ".1f"), gib(r.get("peak_memory_bytes")),
                    fmt(ratio(ips, ds_ips), ".1f") + ("x" if ratio(ips, ds_ips) else "")] if r and not r.get("error") \
                else [r.get("error", "—"), "—", "—", "—"]
        rows.append(row)
    lines += md_table(["batch", "ours cached img/s", "MFU %", "peak GiB", "vs DiffSynth",
                       "ours uncached img/s", "MFU %", "peak GiB", "vs DiffSynth"], rows)
    over = {o["batch"]: o for o in ours_side.get("overheads", [])}
    if over:
        lines += ["", "Time outside the DiT in our cached step (medians): reading a batch from the cache through the "
                  "trainer's DataLoader + collate + move to the device, and the flow-matching loss with the DiT call "
                  "replaced by zeros (per-sample sigma/noise draws on CPU generators, copy to the device, weights):", ""]
        lines += md_table(["batch", "cached batch read (ms)", "loss without DiT (ms)", "our cached step (ms)"],
                          [[b, fmt(over[b]["cached_batch_ms"], ".3g"), fmt(over[b]["loss_without_dit_ms"], ".3g"),
                            fmt(by.get((b, True), {}).get("step_s_median") and 1e3 * by[(b, True)]["step_s_median"], ".3g")]
                           for b in s["batch_sizes"] if b in over])
    lines += ["", "DiffSynth-Studio (its tutorial loop: batch 1, text encoder + VAE every step, bf16 weights): "
              + (status or f"{fmt(ds_ips)} img/s ({fmt(ds.get('step_s_median'), '.4f')} s/step), MFU "
                 f"{fmt(ds.get('mfu') and 100 * ds['mfu'], '.2f')} %, peak {gib(ds.get('peak_memory_bytes'))} GiB; "
                 f"DiffSynth {((ds.get('diffsynth') or {}).get('commit') or '?')[:12]}, attention "
                 f"{(ds.get('diffsynth') or {}).get('attention_implementation')}, data: {ds.get('data')}, "
                 f"placeholder imports: {(ds.get('diffsynth') or {}).get('placeholder_imports')}."), ""]
    lines += [f"Ours: {ours_side.get('path')}; {ours_side.get('dtype')}; attention {ours_side.get('attention')}; "
              f"torch.compile of the blocks: {ours_side.get('compile')}; gradient checkpointing: "
              f"{ours_side.get('gradient_checkpointing')}. \"vs DiffSynth\" = our images/s / DiffSynth's.",
              f"Memory: {(ours_side.get('runs') or [{}])[0].get('peak_memory_kind', '')} during the measured steps "
              "(text encoder and VAE included where they are loaded).", ""]
    return "\n".join(lines) + "\n"


def charts(rec: dict):
    runs = rec["sides"].get("ours", {}).get("runs", [])
    ds = rec["sides"].get("diffsynth", {})

    def series(key, scale=1.0):
        out = {}
        for cached in (True, False):
            pts = sorted((r["batch"], r[key] * scale) for r in runs if r.get("cached") == cached and r.get(key))
            if pts:
                out[f"ours ({'cached' if cached else 'uncached'})"] = ([p[0] for p in pts], [p[1] for p in pts])
        if ds.get(key):
            out["DiffSynth (batch 1)"] = ([1], [ds[key] * scale])
        return out

    title = f"AAADiT SFT on {rec['machine']['device']}" + (" (tiny, CPU)" if rec["settings"]["tiny"] else "")
    return [("", lambda p: common.line_chart(p, title, series("images_per_s"), "batch size", "images / s")),
            ("_memory", lambda p: common.line_chart(p, title, series("peak_memory_bytes", 1 / 2**30), "batch size",
                                                     "peak memory (GiB)"))]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, sides=SIDES)
    ap.add_argument("--batch-sizes", default=None, help="comma list (default: 1..256 on GPU, 1,2,4 tiny)")
    ap.add_argument("--no-uncached", action="store_true", help="skip the runs without the cache")
    ap.add_argument("--uncached-steps", type=int, default=None,
                    help="timed steps without the cache (default: --steps, at most 5; encoding dominates them)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each AAABlock (our side)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-overheads", action="store_true", help="skip the per-batch host-overhead measurements")
    ap.add_argument("--num-workers", type=int, default=None, help="DiffSynth's DataLoader workers (tutorial: 4)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    tiny = common.is_tiny(args)
    d = defaults(tiny)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else d["batch_sizes"]
    from bench import workloads
    from bench.flops import aaadit_forward_flops, crosscheck_aaadit, training_flops

    config = workloads.aaadit_config(tiny)
    side = d["image_size"] // 16
    fwd = aaadit_forward_flops(config, side * side, d["text_tokens"])
    flops = {"forward": fwd["forward"], "train": training_flops(fwd["forward"]), "parts": fwd["parts"],
             "method": "analytic (flops.py), 3x forward for a training step", "crosscheck": crosscheck_aaadit()}
    rec = common.record(BENCH, args, argv)
    peak, source = (args.peak_tflops * 1e12, "given with --peak-tflops") if args.peak_tflops else \
        common.peak_bf16_flops(rec["machine"]["device"])
    if rec["machine"]["device_type"] == "cpu" and not args.peak_tflops:
        peak, source = None, "CPU: no bf16 tensor-core peak; MFU not reported"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_speed."))
    n_images = max(batch_sizes)
    dataset = write_data(work / "data", n_images, d["image_size"])
    settings = {"device": args.device, "tiny": tiny, "image_size": d["image_size"], "text_tokens": d["text_tokens"],
                "batch_sizes": batch_sizes, "modes": [True] if args.no_uncached else [True, False],
                "warmup": args.warmup if args.warmup is not None else d["warmup"],
                "steps": args.steps if args.steps is not None else d["steps"], "seed": args.seed,
                "uncached_timing": [args.warmup if args.warmup is not None else min(2, d["warmup"]),
                                    args.uncached_steps or (args.steps if args.steps is not None else min(5, d["steps"]))],
                "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing,
                "no_overheads": args.no_overheads,
                "num_workers": args.num_workers if args.num_workers is not None else (0 if tiny else 4),
                "dataset": str(dataset), "images": n_images, "work": str(work),
                "model": {k: config[k] for k in ("width", "num_blocks", "num_heads", "latent_channels", "text_width")},
                "latent_shape": f"{config['latent_channels']}x{side}x{side}"}
    sides = {}
    for name in [s for s in args.sides.split(",") if s]:
        sides[name] = common.run_side(__file__, name, settings, FNS[name], inline=args.inline,
                                      timeout=common.side_timeout(args, name))
    for r in sides.get("ours", {}).get("runs", []) + ([sides["diffsynth"]] if "diffsynth" in sides else []):
        if r.get("images_per_s") and peak:
            r["mfu"] = r["images_per_s"] * flops["train"] / peak
    rec.update(settings=settings, flops=flops, peak_flops=peak, peak_source=source, sides=sides)
    md = report(rec)
    rec["files"] = [str(p) for p in common.write_results(args.out, common.run_name(BENCH, args), rec, md, charts(rec))]
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(md)
    return rec


if __name__ == "__main__":
    if not common.child_main(FNS):
        main()
