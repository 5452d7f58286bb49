"""Generate Distill Dataset: teacher images/s, ours against DiffSynth-Studio's pipeline loop, same model, steps
and CFG, same device, one run.

    python bench/gen_speed.py --device cuda     # the issue's sizes (GPU)
    python bench/gen_speed.py --device cpu      # tiny sizes: correctness only

Real sizes: Qwen-Image (60-block DiT, Qwen2.5-VL-7B-shaped text encoder, its VAE; random bf16 weights), 1024²,
40 teacher steps with CFG 4 (DiffSynth's Direct Distill example), empty negative prompt.

Ours: `dit_distillery.gen_dataset.generate_distill_dataset` itself (batched prompts, positive and negative in one
DiT call, PNG + exact latents + metadata.csv written atomically per batch), at batch sizes 1 and 2; a step is one
committed batch (timed through its `progress` callback). DiffSynth: `QwenImagePipeline.__call__` per image, then
`image.save(...jpg)`, as its docs build the dataset (`diffsynth_baselines.qwen_generate`).
Writes bench/results/gen_speed[_cpu_tiny].{json,md} and a chart.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.common import StepClock, fmt, free, gib, md_table, ratio, setup_torch  # noqa: E402

BENCH = "gen_speed"
SIDES = ("ours", "diffsynth")


def defaults(tiny: bool) -> dict:
    if tiny:
        return {"num_layers": 1, "image_size": 64, "teacher_steps": 4, "teacher_cfg": 4.0, "batch_sizes": [1, 2],
                "warmup": 2, "steps": 3}
    return {"num_layers": 60, "image_size": 1024, "teacher_steps": 40, "teacher_cfg": 4.0, "batch_sizes": [1, 2],
            "warmup": 1, "steps": 2}


def ours(settings: dict) -> dict:
    from dit_distillery.codecs import QwenImageVAECodec
    from dit_distillery.gen_dataset import generate_distill_dataset
    from dit_distillery.pipelines import TextToImagePipeline
    from dit_distillery.text import QwenImagePromptEncoder

    from bench import workloads

    device = setup_torch(settings)
    tiny, dtype = settings["tiny"], torch.bfloat16
    tok = workloads.tokenizer()
    encoder = QwenImagePromptEncoder(workloads.qwen_text_encoder(tiny, tok, device, dtype), tok)
    pipe = TextToImagePipeline(workloads.qwen_dit(settings["num_layers"], device, dtype), encoder,
                               QwenImageVAECodec(workloads.qwen_vae(tiny)), "qwen_image")
    pipe.to(device=device, dtype=dtype)
    runs = []
    for batch in settings["batch_sizes"]:
        n = (settings["warmup"] + settings["steps"]) * batch
        out = Path(settings["work"]) / f"ours-{batch}"
        clock = StepClock(device, settings["warmup"])

        def progress(done, total, _batch=batch, _clock=clock):
            if done == 0:
                _clock.start()
            elif done % _batch == 0 or done == total:
                _clock.tick()

        report = generate_distill_dataset(pipe, workloads.prompts(n), out, teacher_steps=settings["teacher_steps"],
                                          teacher_cfg=settings["teacher_cfg"], height=settings["image_size"],
                                          width=settings["image_size"], batch_size=batch, progress=progress)
        run = clock.summary(images_per_step=batch)
        run.update(batch=batch, rows_written=report["rows_written"])
        runs.append(run)
        common.report_partial({"runs": runs})
        shutil.rmtree(out, ignore_errors=True)
        free(device)
    return {"runs": runs, "path": "dit_distillery.gen_dataset.generate_distill_dataset",
            "dtype": "bf16 (DiT, text encoder, VAE)", "note": "positive and negative prompt in one batched DiT call "
            "per step; PNG + float32 latents + metadata.csv per batch"}


def diffsynth(settings: dict) -> dict:
    from bench.diffsynth_baselines import qwen_generate

    return qwen_generate(settings)


FNS = {"ours": ours, "diffsynth": diffsynth}


def report(rec: dict) -> str:
    sides, s = rec["sides"], rec["settings"]
    lines = common.md_header("Generate Distill Dataset: teacher images/s", rec)
    lines += [f"Teacher: Qwen-Image, {s['num_layers']}-block full-width DiT, Qwen2.5-VL text encoder "
              f"({'1 layer, tiny' if s['tiny'] else '7B-shaped'}), Qwen-Image VAE ({'tiny' if s['tiny'] else 'real'} "
              f"config), random bf16 weights; {s['image_size']}², {s['teacher_steps']} steps, CFG {s['teacher_cfg']:g}, "
              f"empty negative prompt. {s['warmup']} warm-up step(s) dropped (a step = one batch), median of {s['steps']}.", ""]
    ds = sides.get("diffsynth", {})
    ds_ips = None if common.side_status(ds) else ds.get("images_per_s")
    rows = []
    for r in sides.get("ours", {}).get("runs", []) or [{"batch": 1, "error": "not run"}]:
        ips = r.get("images_per_s")
        rows.append([r["batch"], fmt(ips, ".4g"), gib(r.get("peak_memory_bytes")),
                     common.side_status(ds) or (fmt(ds_ips, ".4g") if "diffsynth" in sides else "not run"),
                     gib(ds.get("peak_memory_bytes")),
                     (fmt(ratio(ips, ds_ips), ".2f") + "x") if ratio(ips, ds_ips) else "—"])
    lines += md_table(["batch", "ours images/s", "ours peak GiB", "DiffSynth images/s (batch 1)", "DiffSynth peak GiB",
                       "speed-up"], rows)
    extra = ds.get("diffsynth") or {}
    lines += ["", "speed-up = our images/s / DiffSynth's.",
              f"Ours: {sides.get('ours', {}).get('path')}; {sides.get('ours', {}).get('dtype')}; "
              f"{sides.get('ours', {}).get('note')}.",
              f"DiffSynth: {ds.get('note') or common.side_status(ds) or 'not run'}"
              + (f"; commit {(extra.get('commit') or '?')[:12]}, attention {extra.get('attention_implementation')}, "
                 f"placeholder imports {extra.get('placeholder_imports')}; {ds.get('vae')}." if extra else "."), ""]
    return "\n".join(lines) + "\n"


def charts(rec: dict):
    sides = rec["sides"]
    runs = [r for r in sides.get("ours", {}).get("runs", []) if r.get("images_per_s")]
    ds = sides.get("diffsynth", {})
    series = {"ours": [r["images_per_s"] for r in runs]}
    if ds.get("images_per_s"):
        series["DiffSynth (batch 1)"] = [ds["images_per_s"]] * len(runs)
    title = f"Teacher images/s on {rec['machine']['device']}" + (" (tiny, CPU)" if rec["settings"]["tiny"] else "")
    return [("", lambda p: common.bar_chart(p, title, [f"batch {r['batch']}" for r in runs], series,
                                             "images / s (higher is better)"))]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(ap, sides=SIDES)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--teacher-cfg", type=float, default=None)
    ap.add_argument("--batch-sizes", default=None, help="comma list for our side")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    tiny = common.is_tiny(args)
    d = defaults(tiny)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gen_speed."))
    settings = {"device": args.device, "tiny": tiny, "num_layers": args.num_layers or d["num_layers"],
                "image_size": args.image_size or d["image_size"],
                "teacher_steps": args.teacher_steps or d["teacher_steps"],
                "teacher_cfg": args.teacher_cfg if args.teacher_cfg is not None else d["teacher_cfg"],
                "batch_sizes": [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else d["batch_sizes"],
                "warmup": args.warmup if args.warmup is not None else d["warmup"],
                "steps": args.steps if args.steps is not None else d["steps"], "seed": args.seed, "work": str(work)}
    settings["images"] = settings["steps"]  # DiffSynth: one image per step
    rec = common.record(BENCH, args, argv)
    sides = {name: common.run_side(__file__, name, settings, FNS[name], inline=args.inline,
                                   timeout=common.side_timeout(args, name))
             for name in [s for s in args.sides.split(",") if s]}
    rec.update(settings=settings, sides=sides)
    md = report(rec)
    rec["files"] = [str(p) for p in common.write_results(args.out, common.run_name(BENCH, args), rec, md, charts(rec))]
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(md)
    return rec


if __name__ == "__main__":
    if not common.child_main(FNS):
        main()
