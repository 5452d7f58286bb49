"""Memory bench (issue 11 §3): Qwen-Image at 1024x1024 (the full 60-block config), three workloads, each with a
bf16 base, an fp8 base (`fp8.store_in_fp8`) and an fp8 base with block swap (`block_swap`), against a budget.

    python bench/memory.py --device cuda [--budget 24GB]     # predicted and measured, side by side
    python bench/memory.py --device cpu                      # predicted; correctness on a tiny config

Workloads: LoRA SFT (flow matching, rank 32 on the family's preset), Direct Distill LoRA with 4 unrolled student
steps, and teacher sampling (CFG 4: positive and negative in one batch of 2). Training runs with gradient
checkpointing, a bf16 compute dtype (autocast), fp32 adapters and AdamW, on cached inputs (256 prompt tokens of
random embeddings, random latents); no text encoder or VAE is loaded, as in a cached training run.
"fp8 + swap N": N = the fewest blocks the memory plan says fit the budget (`MemoryPlan.blocks_needed`).

Predicted: `memory_plan.memory_plan` (peak `torch.cuda.max_memory_allocated`, by part; a budget also holds the
plan's reserve for the CUDA context), on any machine. Measured (CUDA only, every setting in this one process, the
model rebuilt for each): `torch.cuda.max_memory_allocated` over the timed steps and the median seconds per step
(a training step: forward, backward, optimiser; sampling: one guided Euler step). The model is drawn on the GPU
(`common.build_on`) and the swapped blocks then go to pinned host memory, so the GPU must hold the bf16 model once
(an 80 GB card); the step itself is what the figures measure.

On a CPU a tiny Qwen-Image checks correctness only: block swap gives bit-identical LoRA SFT and Direct Distill
updates (two optimiser steps) and sampled latents; an fp8 base stays within the stated tolerance of the bf16 one.
Writes `<results>/memory.{json,md}` naming the machine.

The step mirrors the trainer's (peft adapters in fp32, autocast, checkpointing, AdamW) rather than calling it:
the trainer does not take `blocks_to_swap` yet.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from dit_distillery import families  # noqa: E402
from dit_distillery.block_swap import enable_block_swap  # noqa: E402
from dit_distillery.conditioning import TextEmbeds  # noqa: E402
from dit_distillery.losses import DirectDistillLoss, FlowMatchingLoss, SampleRNG  # noqa: E402
from dit_distillery.memory_plan import GIB, memory_plan, parse_bytes  # noqa: E402
from dit_distillery.sampling import guided_velocity  # noqa: E402
from dit_distillery.velocity import predict_velocity  # noqa: E402

NAME = "memory"
FAMILY = "qwen_image"
WORKLOADS = {  # name -> (plan mode, loss, label)
    "lora_sft": ("lora", "sft", "LoRA SFT"),
    "direct4_lora": ("lora", "direct:4", "Direct Distill LoRA, 4 steps"),
    "teacher_sampling": ("sample", "sft", "teacher sampling, CFG 4"),
}
LORA_RANK = 32
TEXT_TOKENS = 256
SAMPLE_CFG = 4.0
# fp8 (e4m3: 3 mantissa bits, one scale per tensor) against bf16 weights on the tiny model: a forward's output
# moved by 3.3-3.6% (relative L2) over two seeds. 10% leaves room for other seeds and catches a lost scale (which
# is off by orders of magnitude) or an fp8 weight read as raw bytes.
FP8_TOLERANCE = 0.10


# ----------------------------------------------------------------------------------------------------------
# The model and the steps (shared by the CUDA measurement and the CPU checks)

def build(config: dict, base: str, swap: int, *, train: bool, device, compute_dtype, seed: int = 0):
    """The DiT as the run holds it: bf16 (or the compute dtype on a CPU) base, fp8 if asked, LoRA adapters in
    fp32 with gradient checkpointing when training, then `swap` blocks swapped."""
    from peft import LoraConfig, inject_adapter_in_model

    from dit_distillery.fp8 import store_in_fp8
    from dit_distillery.lora_presets import resolve_targets

    spec = families.get(FAMILY)
    if torch.device(device).type == "cuda":
        from bench.workloads import qwen_dit

        model = qwen_dit(config["num_layers"], device, torch.bfloat16, seed=seed)
        model = model.requires_grad_(False)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.model_class()(**config)
        # bf16 weights, computed in fp32 on the CPU: the fp8 check compares storage precision, not kernels
        model = torch.nn.Module.to(torch.nn.Module.to(model, torch.bfloat16), compute_dtype).requires_grad_(False)
    if base == "fp8":
        store_in_fp8(model, compute_dtype)
    if train:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            names = resolve_targets(model, spec.default_lora_preset)
            inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=names,
                                               init_lora_weights=False), model)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.enable_gradient_checkpointing()
        model.train()
    else:
        model.eval()
    if swap:
        enable_block_swap(model, swap, device)
    else:
        model.to(device)
    return model


def inputs(config: dict, size: int, device, text_tokens: int = TEXT_TOKENS, seed: int = 3) -> dict:
    """Cached inputs: latents [1, C, h, w], prompt and negative-prompt embeddings (random)."""
    g = torch.Generator().manual_seed(seed)
    spec = families.get(FAMILY)
    channels, f = spec.latent_channels(config), spec.vae_factor
    latents = torch.randn(1, channels, size // f, size // f, generator=g).to(device)
    embeds = torch.randn(2, text_tokens, spec.text_width(config), generator=g).to(device)
    return {"latents": latents, "text": TextEmbeds(embeds[:1]), "negative": TextEmbeds(embeds[1:])}


def train_steps(model, workload: str, data: dict, steps: int, device, autocast_dtype, clock=None) -> list[float]:
    """`steps` optimiser steps of a LoRA run; returns the losses."""
    loss_fn = FlowMatchingLoss() if workload == "lora_sft" else DirectDistillLoss(steps=4, cfg=1.0)
    params = [p for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents, text = data["latents"], data["text"]
    losses = []
    if clock is not None:
        clock.start()
    for step in range(steps):
        batch = {"latents": latents, "target_latents": latents, "text": text, "seed": [step], "rand_device": ["cpu"],
                 "num_inference_steps": [4], "cfg_scale": [1.0], "where": ["bench"], "row": [0]}
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = loss_fn(model, batch, SampleRNG(0, step, ["0"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if clock is not None:
            clock.tick()
    return losses


def sample_steps(model, data: dict, steps: int, clock=None) -> torch.Tensor:
    """`steps` guided Euler steps (CFG 4, positive and negative in one batch); returns the latents."""
    from dit_distillery.schedule import sigmas as schedule

    spec = families.get(FAMILY)
    x = data["latents"].float()
    sig = schedule(spec.schedule_template, steps, image_seq_len=spec.image_tokens(*x.shape[-2:]))
    velocity = functools.partial(predict_velocity, model)
    if clock is not None:
        clock.start()
    with torch.no_grad():
        for s, s_next in zip(sig, sig[1:] + [0.0]):
            sigma = torch.full((x.shape[0],), s, device=x.device)
            v = guided_velocity(velocity, x, sigma, data["text"], SAMPLE_CFG, data["negative"])
            x = x + v * (s_next - s)
            if clock is not None:
                clock.tick()
    return x


# ----------------------------------------------------------------------------------------------------------
# Predicted

def plans(config: dict, size: int, budget: int) -> list[dict]:
    """Every (workload, base) row with the plan's figures; fp8 + swap uses the fp8 plan's `blocks_needed`."""
    rows = []
    for workload, (mode, loss, label) in WORKLOADS.items():
        for base in ("bf16", "fp8"):
            t = time.perf_counter()
            plan = memory_plan((FAMILY, config), height=size, width=size, mode=mode, loss=loss, base_dtype=base,
                               lora_rank=LORA_RANK, text_tokens=TEXT_TOKENS, cfg_scale=SAMPLE_CFG)
            seconds = time.perf_counter() - t
            settings = [(base, 0)]
            if base == "fp8":
                need = plan.blocks_needed(budget)
                settings.append(("fp8+swap", plan.max_swappable if need is None else need))
            for name, n in settings:
                rows.append({"workload": workload, "label": label, "base": name, "blocks_swapped": n,
                             "predicted_bytes": plan.total(n), "predicted_parts": plan.parts(n),
                             "fits_budget": plan.total(n) + plan.reserve_bytes <= budget,
                             "reserve_bytes": plan.reserve_bytes, "plan_seconds": round(seconds, 2)})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Measured (CUDA)

def measure(row: dict, config: dict, size: int, args) -> dict:
    device = args.device
    base = "fp8" if row["base"].startswith("fp8") else "bf16"
    train = row["workload"] != "teacher_sampling"
    common.free(device)
    torch.cuda.reset_peak_memory_stats()
    model = build(config, base, row["blocks_swapped"], train=train, device=device, compute_dtype=torch.bfloat16)
    data = inputs(config, size, device)
    clock = common.StepClock(device, args.warmup)
    try:
        if train:
            losses = train_steps(model, row["workload"], data, args.warmup + args.steps, device, torch.bfloat16,
                                 clock)
            finite = all(torch.isfinite(torch.tensor(losses)))
        else:
            finite = bool(torch.isfinite(sample_steps(model, data, args.warmup + args.steps, clock)).all())
        out = clock.summary()
        out["finite"] = finite
    except torch.cuda.OutOfMemoryError as exc:
        out = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    del model, data
    common.free(device)
    return out


# ----------------------------------------------------------------------------------------------------------
# Correctness (CPU, tiny)

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def cpu_checks(swap: int = 3) -> dict:
    spec = families.get(FAMILY)
    config = spec.tiny_config(num_layers=6, num_attention_heads=4, attention_head_dim=32, joint_attention_dim=32)
    size, device, dtype = 64, "cpu", torch.float32
    data = inputs(config, size, device, text_tokens=8)
    checks = {"config": config, "size": size, "blocks_swapped": swap}
    for workload in ("lora_sft", "direct4_lora"):
        ref = build(config, "bf16", 0, train=True, device=device, compute_dtype=dtype)
        swp = build(config, "bf16", swap, train=True, device=device, compute_dtype=dtype)
        losses = [train_steps(m, workload, data, 2, device, None) for m in (ref, swp)]
        same = losses[0] == losses[1] and all(
            torch.equal(a, b) for (_, a), (_, b) in zip(ref.named_parameters(), swp.named_parameters()))
        checks[f"swap_exact_{workload}"] = {"passed": bool(same), "losses": losses[0]}
    ref = build(config, "bf16", 0, train=False, device=device, compute_dtype=dtype)
    swp = build(config, "bf16", swap, train=False, device=device, compute_dtype=dtype)
    a, b = sample_steps(ref, data, 4), sample_steps(swp, data, 4)
    checks["swap_exact_teacher_sampling"] = {"passed": bool(torch.equal(a, b))}
    # fp8 base against the bf16 one it was made from: one forward, 4 sampled steps, and a LoRA SFT step
    fp8 = copy.deepcopy(ref)
    from dit_distillery.fp8 import store_in_fp8

    store_in_fp8(fp8, dtype)
    with torch.no_grad():
        sigma = torch.full((1,), 0.7)
        v_ref = predict_velocity(ref, data["latents"], sigma, data["text"])
        v_fp8 = predict_velocity(fp8, data["latents"], sigma, data["text"])
    sampled = _rel(sample_steps(fp8, data, 4), a)
    fp8_train = build(config, "fp8", swap, train=True, device=device, compute_dtype=dtype)
    bf16_train = build(config, "bf16", 0, train=True, device=device, compute_dtype=dtype)
    l8, l16 = (train_steps(m, "lora_sft", data, 1, device, None)[0] for m in (fp8_train, bf16_train))
    errors = {"velocity_rel_l2": _rel(v_fp8, v_ref), "sampled_latents_rel_l2": sampled,
              "sft_loss_rel": abs(l8 - l16) / abs(l16)}
    checks["fp8_within_tolerance_of_bf16"] = {"passed": all(e <= FP8_TOLERANCE for e in errors.values()),
                                              "tolerance": FP8_TOLERANCE, **{k: round(v, 5) for k, v in errors.items()}}
    return checks


# ----------------------------------------------------------------------------------------------------------
# Report

def markdown(result: dict) -> str:
    rec, budget = result["record"], result["budget_bytes"]
    measured = rec["machine"]["device_type"] == "cuda"
    # md_header's note about CPU timings of competing sides does not apply here: this bench has no sides
    lines = common.md_header(f"Memory: bf16, fp8 and block swap (Qwen-Image, {result['size']}x{result['size']})",
                             dict(rec, label="GPU, real sizes"))
    if not measured:
        lines[2:2] = [f"**{rec['label']}.**", ""]
    lines += [f"Model: Qwen-Image, {result['layers']} blocks at full width; {result['size']}x{result['size']}, batch 1, "
              f"{TEXT_TOKENS} prompt tokens; LoRA rank {LORA_RANK}; gradient checkpointing on. Budget "
              f"{budget / GIB:.0f} GiB (plan reserve {result['rows'][0]['reserve_bytes'] / GIB:.1f} GiB for the "
              "CUDA context). Predicted = `memory_plan` (peak allocated); measured = "
              "`torch.cuda.max_memory_allocated` over the timed steps.", ""]
    if not measured:
        lines += ["**No GPU in this run: measured columns pending** (`python bench/memory.py --device cuda`).", ""]
    headers = ["workload", "base", "blocks swapped", "predicted GiB", "fits budget"]
    if measured:
        headers += ["measured GiB", "measured / predicted", "s/step"]
    rows = []
    for r in result["rows"]:
        row = [r["label"], r["base"], r["blocks_swapped"], f"{r['predicted_bytes'] / GIB:.2f}",
               "yes" if r["fits_budget"] else "no"]
        if measured:
            m = r.get("measured", {})
            peak = m.get("peak_memory_bytes")
            row += [m.get("error") or common.gib(peak), common.fmt(common.ratio(peak, r["predicted_bytes"]), ".2f"),
                    common.fmt(m.get("step_s_median"), ".3f")]
        rows.append(row)
    lines += common.md_table(headers, rows) + [""]
    lines += ["Predicted parts (GiB):", ""]
    parts = list(result["rows"][0]["predicted_parts"])
    lines += common.md_table(["workload", "base", *[p.replace("_", " ") for p in parts]],
                             [[r["label"], f"{r['base']} ({r['blocks_swapped']})",
                               *[f"{r['predicted_parts'][p] / GIB:.2f}" for p in parts]] for r in result["rows"]])
    checks = result.get("checks")
    if checks:
        lines += ["", f"Correctness on a tiny Qwen-Image ({checks['config']['num_layers']} blocks, width "
                      f"{checks['config']['num_attention_heads'] * checks['config']['attention_head_dim']}, "
                      f"{checks['size']}x{checks['size']}, fp32 compute of bf16 weights), {checks['blocks_swapped']} "
                      "blocks swapped:", ""]
        rows = []
        for key, value in checks.items():
            if isinstance(value, dict) and "passed" in value:
                detail = ", ".join(f"{k} {v}" for k, v in value.items() if k not in ("passed", "losses"))
                rows.append([key, "pass" if value["passed"] else "FAIL", detail or "bit-identical (torch.equal)"])
        lines += common.md_table(["check", "result", "detail"], rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", default="24GB", help="GPU memory the swap count is chosen for")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--layers", type=int, default=60, help="Qwen-Image blocks (60: the real model)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--results", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    args.tiny = False
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rec = common.record(NAME, args, argv)
    if args.device == "cpu":
        rec["label"] = "CPU: predicted figures for the real model; correctness on a tiny one; GPU figures pending"
    budget = parse_bytes(args.budget)
    config = dict(families.get(FAMILY).presets()["qwen-image"], num_layers=args.layers)
    rows = plans(config, args.size, budget)
    result = {"record": rec, "budget_bytes": budget, "size": args.size, "layers": args.layers, "rows": rows}
    if str(args.device).startswith("cuda"):
        for row in rows:
            print(f"measuring {row['workload']} {row['base']} ({row['blocks_swapped']} swapped)", flush=True)
            row["measured"] = measure(row, config, args.size, args)
    else:
        result["checks"] = cpu_checks()
    written = common.write_results(args.results, NAME, result, markdown(result))
    failed = [k for k, v in result.get("checks", {}).items() if isinstance(v, dict) and v.get("passed") is False]
    print("\n".join(str(p) for p in written) + (f"\nFAILED: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)
    return written


if __name__ == "__main__":
    main()
