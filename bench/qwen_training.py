"""Shared by the two Qwen-Image training benchmarks (Direct Distill, LoRA SFT): our side and the report.

Both compare s/step and peak memory of one LoRA training step (rank 32, DiffSynth's target modules, per-block
gradient checkpointing, cached latents + prompt embeddings) on a full-width Qwen-Image DiT with random bf16
weights, between our step function (`ours_step.run_steps`), DiffSynth-Studio's `launch_training_task` and, for
LoRA SFT, ComfyUI's Train LoRA node.
"""

from __future__ import annotations

import torch

from bench import common
from bench.common import fmt, free, gib, md_table, ratio, setup_torch


def ours(settings: dict) -> dict:
    from dit_distillery.trainer.job import DataSpec, LoraSpec, OptimSpec, TrainJob

    from bench import workloads
    from bench.ours_step import qwen_batch, run_steps

    device = setup_torch(settings)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the trainer's "auto"
    distill = settings["task"] == "direct_distill"
    size = settings["image_size"]
    runs = []
    for batch_size in settings["batch_sizes"]:
        dit = workloads.qwen_dit(settings["num_layers"], device, dtype)
        job = TrainJob(data=DataSpec(synthetic={}), loss={"kind": settings["task"]} if distill else {"kind": "flow_matching"},
                       mode="lora", lora=LoraSpec(rank=settings["rank"], targets="preset"), optim=OptimSpec(lr=1e-4),
                       batch_size=batch_size, gradient_checkpointing=settings["gradient_checkpointing"],
                       steps=settings["warmup"] + settings["steps"], seed=settings["seed"])
        batch = qwen_batch(workloads.qwen_latents(batch_size, size, size, device),
                           workloads.qwen_text_embeds(batch_size, settings["text_tokens"], device, dtype),
                           distill=distill, student_steps=settings.get("student_steps", 4))
        try:
            run = run_steps(dit, job, lambda step, b=batch: b, device, warmup=settings["warmup"], steps=settings["steps"])
        except Exception as exc:  # an out-of-memory batch size is a result, not a crash
            if "out of memory" not in str(exc).lower():
                raise
            run = {"error": f"out of memory at batch {batch_size}"}
        run["batch"] = batch_size
        runs.append(run)
        common.report_partial({"runs": runs})
        del dit, batch
        free(device)
    return {"runs": runs, "dtype": "bf16 base, fp32 LoRA, bf16 autocast" if device.type == "cuda" else
            "fp32 base, fp32 LoRA (the trainer's CPU default)", "lora_targets": "preset qwen_image "
            "(DiffSynth's list)", "attention": "diffusers QwenDoubleStreamAttnProcessor2_0 (torch SDPA)"}


def per_image(run: dict) -> float | None:
    if not run or run.get("error") or not run.get("step_s_median"):
        return None
    return run["step_s_median"] / run.get("batch", 1)


def report(rec: dict, title: str, intro: list[str]) -> str:
    sides = rec["sides"]
    lines = common.md_header(title, rec) + intro + [""]
    ours_side = sides.get("ours", {"skipped": "not run in this invocation"})
    if common.side_status(ours_side):
        lines += [f"Ours: {common.side_status(ours_side)}", ""]
    others = [(name, label, sides[name]) for name, label in (("diffsynth", "DiffSynth"), ("comfyui", "ComfyUI"))
              if name in sides]
    headers = ["batch", "ours s/step", "ours s/image", "ours peak GiB"]
    for _, label, _ in others:
        headers += [f"{label} s/step (batch 1)", f"{label} peak GiB", f"speed-up vs {label}", f"memory vs {label}"]
    rows = []
    for run in ours_side.get("runs") or [{"batch": 1, "error": "not run"}]:
        row = [run["batch"]] + ([run["error"], "—", "—"] if run.get("error") else
                                [fmt(run["step_s_median"], ".4g"), fmt(per_image(run), ".4g"), gib(run["peak_memory_bytes"])])
        for _, _, other in others:
            if common.side_status(other):
                row += [common.side_status(other), "—", "—", "—"]
                continue
            speed = ratio(per_image(other), per_image(run))
            mem = ratio(run.get("peak_memory_bytes"), other.get("peak_memory_bytes"))
            row += [fmt(other["step_s_median"], ".4g"), gib(other["peak_memory_bytes"]),
                    fmt(speed, ".2f") + "x" if speed else "—", fmt(mem, ".2f") + "x" if mem else "—"]
        rows.append(row)
    lines += md_table(headers, rows)
    lines += ["", "speed-up = their seconds per image / ours (>1: ours faster); memory = our peak / theirs (<=1: ours "
              "uses no more). DiffSynth and ComfyUI train batch 1 only (DiffSynth's DataLoader and model_fn are "
              "batch-1; ComfyUI's node is run at batch 1), so batch > 1 rows compare per image.", ""]
    lines += [f"Ours: {(ours_side.get('runs') or [{}])[0].get('path', '')}; {ours_side.get('dtype')}; LoRA targets "
              f"{ours_side.get('lora_targets')}; trainable parameters "
              f"{fmt((ours_side.get('runs') or [{}])[0].get('trainable_parameters'), ',')}; attention {ours_side.get('attention')}."]
    for name, label, other in others:
        if common.side_status(other):
            lines.append(f"{label}: {common.side_status(other)}.")
            continue
        extra = other.get("diffsynth") or {}
        lines.append(f"{label}: {other.get('path') or other.get('task')}; {other.get('dtype')}; trainable parameters "
                     f"{fmt(other.get('trainable_parameters'), ',')}; "
                     + (f"targets {other.get('targets')}; ComfyUI {other.get('comfyui_version')}." if name == "comfyui" else
                        f"commit {(extra.get('commit') or '?')[:12]}, attention {extra.get('attention_implementation')}, "
                        f"placeholder imports {extra.get('placeholder_imports')}; data: {other.get('data')}."))
    lines += [f"Memory: {(ours_side.get('runs') or [{}])[0].get('peak_memory_kind', '')}, after the warm-up steps.", ""]
    return "\n".join(lines) + "\n"


def charts(rec: dict, title: str):
    sides = rec["sides"]
    runs = [r for r in sides.get("ours", {}).get("runs", []) if not r.get("error")]
    labels = [f"batch {r['batch']}" for r in runs]
    names = [(n, l) for n, l in (("diffsynth", "DiffSynth (batch 1)"), ("comfyui", "ComfyUI (batch 1)"))
             if n in sides and not common.side_status(sides[n])]

    def series(value):
        out = {"ours": [value(r) for r in runs]}
        for name, label in names:
            out[label] = [value(sides[name])] * len(runs)
        return out

    return [("", lambda p: common.bar_chart(p, title, labels, series(per_image), "seconds per image (lower is better)")),
            ("_memory", lambda p: common.bar_chart(p, title, labels,
                                                    series(lambda r: r.get("peak_memory_bytes", 0) / 2**30),
                                                    "peak memory (GiB)"))]
