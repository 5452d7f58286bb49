"""Memory bench (issue 11 §3): Qwen-Image at 1024x1024 (the full 60-block config), three workloads, each with a
bf16 base, an fp8 base (`fp8.store_in_fp8`) and an fp8 base with block swap (`block_swap`), against a budget.

    python bench/memory.py --device cuda [--budget 24GB] [--sampling-budget 16GB]   # predicted and measured
    python bench/memory.py --device cpu                      # predicted; correctness on a tiny config
    python bench/memory.py --device cpu --tiny               # the measurement path rehearsed on a tiny model

Workloads: LoRA SFT (flow matching, rank 32 on the family's preset), Direct Distill LoRA with 4 unrolled student
steps, and teacher sampling (CFG 4: positive and negative in one batch of 2). Training runs with gradient
checkpointing, a bf16 compute dtype (autocast), fp32 adapters and AdamW, on cached inputs (256 prompt tokens of
random embeddings, random latents); no text encoder or VAE is loaded, as in a cached training run.
"fp8 + swap N": N = the fewest blocks the memory plan says fit the budget (`MemoryPlan.blocks_needed`): 24 GB for
training (`--budget`), 16 GB for sampling (`--sampling-budget`).

Predicted: `memory_plan.memory_plan` (peak `torch.cuda.max_memory_allocated`, by part; a budget also holds the
plan's reserve for the CUDA context), on any machine. Measured (CUDA, or any device with `--tiny`):
`torch.cuda.max_memory_allocated` over the timed steps and the median seconds per step (a training step: forward,
backward, optimiser; sampling: one guided Euler step), plus the allocator's peak reserve and the device's used
memory. The model is drawn on the GPU (`common.build_on`) and the swapped blocks then go to pinned host memory, so
the GPU must hold the bf16 model once (an 80 GB card); the step itself is what the figures measure. An fp8 + swap
setting the plan says fits runs with the allocator held to its budget less the measured CUDA context
(`torch.cuda.set_per_process_memory_fraction`), as on a card of that size (out of memory there: recorded, then
measured again without the cap).

Time (bench/gpu_run.sh): the settings run one after another in one child process (`--child`), in `MEASURE_ORDER`
(the 24 GB claims first), while this process computes the plans the later ones need. Each setting has a limit
(`--setting-timeout`, and what `--deadline` leaves): past it the child stops after its current step, or is killed
if that step runs on; what it had measured is kept, and a fresh child takes the remaining settings. The results are
rewritten after every setting, so a run stopped from outside keeps the finished ones.

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
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

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
# The order settings are measured in (bench/gpu_run.sh's time may run out): the 24 GB claims first, then what
# they are compared with (fp8 unswapped: the swap slowdown), bf16, and sampling (the 16 GB claim) last.
MEASURE_ORDER = ["lora_sft/fp8+swap", "direct4_lora/fp8+swap", "lora_sft/fp8", "direct4_lora/fp8", "lora_sft/bf16",
                 "direct4_lora/bf16", "teacher_sampling/fp8+swap", "teacher_sampling/fp8", "teacher_sampling/bf16"]
LORA_RANK = 32
TEXT_TOKENS = 256
TINY = dict(num_layers=6, num_attention_heads=4, attention_head_dim=32, joint_attention_dim=32)  # --tiny, CPU checks
TINY_SIZE, TINY_TEXT_TOKENS = 64, 8
# The measuring child's protocol: one JSON line in per setting; these prefixes out.
READY, PARTIAL, DONE = "MEMORY_READY ", "MEMORY_PARTIAL ", "MEMORY_DONE "
GRACE_S = 6.0  # past its limit a setting may finish its step and free its memory before its child is killed
WRITE_RESERVE_S = 3.0  # JSON + markdown, before --deadline
MIN_SETTING_S = 5.0  # a setting given less is recorded as not started
START_TIMEOUT_S = 120.0  # the child's imports and CUDA context
SAMPLE_CFG = 4.0
# fp8 (e4m3: 3 mantissa bits, one scale per tensor) against bf16 weights on the tiny model: a forward's output
# moved by 3.3-3.6% (relative L2) over two seeds. 10% leaves room for other seeds and catches a lost scale (which
# is off by orders of magnitude) or an fp8 weight read as raw bytes.
FP8_TOLERANCE = 0.10


# ----------------------------------------------------------------------------------------------------------
# The model and the steps (shared by the CUDA measurement and the CPU checks)

def build(config: dict, base: str, swap: int, *, train: bool, device, compute_dtype, seed: int = 0,
          tiny: bool = False):
    """The DiT as the run holds it: bf16 (or the compute dtype on a CPU or `tiny`) base, fp8 if asked, LoRA
    adapters in fp32 with gradient checkpointing when training, then `swap` blocks swapped."""
    from peft import LoraConfig, inject_adapter_in_model

    from dit_distillery.fp8 import store_in_fp8
    from dit_distillery.lora_presets import resolve_targets

    spec = families.get(FAMILY)
    if torch.device(device).type == "cuda" and not tiny:
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


def train_steps(model, workload: str, data: dict, steps: int, device, autocast_dtype, clock=None,
                on_step=None) -> list[float]:
    """`steps` optimiser steps of a LoRA run (fewer if `on_step()`, called after each, says stop); returns the
    losses."""
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
        if on_step is not None and on_step():
            break
    return losses


def sample_steps(model, data: dict, steps: int, clock=None, on_step=None) -> torch.Tensor:
    """`steps` guided Euler steps (CFG 4, positive and negative in one batch; fewer if `on_step()` says stop);
    returns the latents."""
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
            if on_step is not None and on_step():
                break
    return x


# ----------------------------------------------------------------------------------------------------------
# Predicted

def plan_rows(config: dict, size: int, workload: str, base: str, budget: int,
              text_tokens: int = TEXT_TOKENS) -> list[dict]:
    """The rows of one plan: `base` ('bf16' or 'fp8'; fp8 adds 'fp8+swap' with the plan's `blocks_needed`)."""
    mode, loss, label = WORKLOADS[workload]
    t = time.perf_counter()
    plan = memory_plan((FAMILY, config), height=size, width=size, mode=mode, loss=loss, base_dtype=base,
                       lora_rank=LORA_RANK, text_tokens=text_tokens, cfg_scale=SAMPLE_CFG)
    seconds = time.perf_counter() - t
    settings = [(base, 0)]
    if base == "fp8":
        need = plan.blocks_needed(budget)
        settings.append(("fp8+swap", plan.max_swappable if need is None else need))
    return [{"key": f"{workload}/{name}", "workload": workload, "label": label, "base": name, "blocks_swapped": n,
             "budget_bytes": budget, "predicted_bytes": plan.total(n), "predicted_parts": plan.parts(n),
             "fits_budget": plan.total(n) + plan.reserve_bytes <= budget, "reserve_bytes": plan.reserve_bytes,
             "plan_seconds": round(seconds, 2)} for name, n in settings]


def plan_order() -> list[tuple[str, str]]:
    """(workload, base) plans in the order `MEASURE_ORDER` needs them (fp8 + swap comes from the fp8 plan)."""
    out = []
    for key in MEASURE_ORDER:
        workload, base = key.split("/")
        item = (workload, "fp8" if base.startswith("fp8") else base)
        if item not in out:
            out.append(item)
    return out


def row_order(rows) -> list[dict]:
    """Rows as the report lists them: by workload, then bf16, fp8, fp8 + swap."""
    keys = [f"{w}/{b}" for w in WORKLOADS for b in ("bf16", "fp8", "fp8+swap")]
    return sorted(rows, key=lambda r: keys.index(r["key"]))


def plans(config: dict, size: int, budgets: dict[str, int], text_tokens: int = TEXT_TOKENS) -> list[dict]:
    """Every (workload, base) row with the plan's figures; `budgets`: workload -> bytes the swap count is for."""
    return row_order([row for w, b in plan_order() for row in plan_rows(config, size, w, b, budgets[w], text_tokens)])


# ----------------------------------------------------------------------------------------------------------
# Measured (CUDA; any device with --tiny): in a child process, each setting held to its time by this one

def measure(setting: dict, config: dict, size: int, device, warmup: int, steps: int, *, tiny: bool = False,
            text_tokens: int = TEXT_TOKENS, context_bytes: int = 0, emit=None) -> dict:
    """One setting: build, `warmup` + `steps` steps, the figures. `setting["limit_s"]`: stop after the step that
    leaves too little time for another (once one step was measured); `setting["memory_cap_bytes"]` (CUDA): the
    allocator is held to it less the CUDA context, and an out-of-memory there is recorded and measured again
    without it. `emit(figures)` after every measured step (what is kept if the setting is stopped from outside)."""
    cuda = torch.device(device).type == "cuda"
    dtype, autocast = (torch.bfloat16, torch.bfloat16) if cuda and not tiny else (torch.float32, None)
    base = "fp8" if setting["base"].startswith("fp8") else "bf16"
    train = setting["workload"] != "teacher_sampling"
    started, limit = time.perf_counter(), setting.get("limit_s")
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None

    def attempt(cap: int | None) -> dict:
        common.free(device)
        t = time.perf_counter()
        model = build(config, base, setting["blocks_swapped"], train=train, device=device, compute_dtype=dtype,
                      tiny=tiny)
        data = inputs(config, size, device, text_tokens=text_tokens)
        common.free(device)  # the cache the bf16 model was drawn in goes back before anything is measured
        info = {"build_s": round(time.perf_counter() - t, 2)}
        if cap:
            torch.cuda.set_per_process_memory_fraction(max(0.0, (cap - context_bytes) / total), device)
            info["memory_cap_bytes"] = cap
        clock = common.StepClock(device, warmup)

        def figures() -> dict:
            out = dict(info, **clock.summary())
            if cuda:
                free, _ = torch.cuda.mem_get_info(device)
                out.update(peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
                           device_used_bytes=int(total - free), context_bytes=context_bytes)
            return out

        def on_step() -> bool:
            done = clock.steps - warmup
            if done < 1:
                return False
            if emit is not None:
                emit(figures())
            if limit is not None and done < steps and time.perf_counter() - started + clock.times[-1] > limit:
                info["stopped_early"] = (f"after {done} of {steps} timed steps: another would pass the {limit:.0f} s "
                                         "limit")
                return True
            return False

        try:
            if train:
                losses = train_steps(model, setting["workload"], data, warmup + steps, device, autocast, clock, on_step)
                finite = all(torch.isfinite(torch.tensor(losses)))
            else:
                finite = bool(torch.isfinite(sample_steps(model, data, warmup + steps, clock, on_step)).all())
            return dict(figures(), finite=bool(finite))
        except torch.cuda.OutOfMemoryError as exc:
            return dict(info, error=f"out of memory: {str(exc).splitlines()[0]}", out_of_memory=True)
        finally:
            if cap:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            del model, data
            common.free(device)

    cap = setting.get("memory_cap_bytes") if cuda else None
    out = attempt(cap)
    if cap and out.get("out_of_memory"):
        out = dict(attempt(None), capped_error=f"{out['error']} (allocator held to {cap / GIB:.1f} GiB less the "
                                               f"{context_bytes / GIB:.2f} GiB CUDA context)")
    return out


def child_main(spec: str) -> None:
    """`memory.py --child SPEC`: measure each setting read from stdin (one JSON line each) until stdin closes."""
    spec = json.loads(spec)
    device = spec["device"]
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    ready = {"machine": common.machine(device), "pid": os.getpid()}
    context = 0
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.zeros(1, device=device)  # the CUDA context, made before it is measured
        free, total = torch.cuda.mem_get_info(device)
        context = int(total - free - torch.cuda.memory_reserved(device))
        ready["context_bytes"] = context
    print(READY + json.dumps(ready), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        setting = json.loads(line)
        try:
            out = measure(setting, spec["config"], spec["size"], device, spec["warmup"], spec["steps"],
                          tiny=spec["tiny"], text_tokens=spec["text_tokens"], context_bytes=context,
                          emit=lambda figures: print(PARTIAL + json.dumps(figures), flush=True))
        except Exception as exc:  # noqa: BLE001 - recorded for this setting; the next one still runs
            out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(DONE + json.dumps(out, default=str), flush=True)


class Child:
    """The measuring process: settings in on its stdin; its stdout read by a thread, so waits can time out."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, obj: dict) -> bool:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def expect(self, prefixes: tuple[str, ...], until: float) -> tuple[str, dict] | None:
        """The next line with one of `prefixes` and its JSON; None at `until` or when the child's output ends.
        Other lines are passed on (the step's log)."""
        while True:
            wait = until - time.time()
            try:
                line = self.lines.get(timeout=None if wait == float("inf") else max(0.0, wait))
            except queue.Empty:
                return None
            if line is None:
                self.lines.put(None)  # stays ended for the next call
                return None
            prefix = next((p for p in prefixes if line.startswith(p)), None)
            if prefix is None:
                print(line, flush=True)
                continue
            return prefix, json.loads(line[len(prefix):])

    def stop(self) -> str:
        """Kill it (a step still running is abandoned); returns how it ended."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.kill()
        rc = self.proc.wait()
        return "killed" if alive else f"exited with {rc}"

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.stop()


def limits(spec: str | None) -> dict[str, float]:
    """`--setting-timeout`: '60' (every workload) or 'lora_sft=25,direct4_lora=45,...' -> workload -> seconds."""
    if not spec:
        return {}
    if "=" not in spec:
        return {w: float(spec) for w in WORKLOADS}
    pairs = dict(item.split("=", 1) for item in spec.split(",") if item)
    unknown = set(pairs) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"--setting-timeout: unknown workload(s) {sorted(unknown)}; use {list(WORKLOADS)}")
    return {w: float(v) for w, v in pairs.items()}


def supervise(keys: list[str], get_row, cmd: list[str], *, deadline: float, limit_s: dict[str, float],
              on_ready=None, on_done=None) -> None:
    """Measure each row of `keys` (in order; `get_row(key, until)` waits for its plan) in a child process `cmd`,
    each held to its limit (`limit_s` per workload, and what `deadline` leaves): a setting past it is stopped, its
    child killed and what it had measured kept (`partial`), and a fresh child takes the next setting.
    `row["measured"]` gets the figures or the reason there are none; `on_done()` after each setting."""
    child, ready, started = None, False, 0.0
    try:
        for key in keys:
            if child is None and deadline - time.time() - WRITE_RESERVE_S - GRACE_S >= MIN_SETTING_S:
                child, ready, started = Child(cmd), False, time.time()  # it imports while the plan is made
            row = get_row(key, deadline - WRITE_RESERVE_S)
            if row is None:
                continue
            left = deadline - time.time() - WRITE_RESERVE_S
            soft = min(limit_s.get(row["workload"], float("inf")), left - GRACE_S)
            if soft < MIN_SETTING_S or child is None:
                row["measured"] = {"error": f"not started: {max(left, 0):.0f} s left before the deadline"}
                continue
            if not ready:
                got = child.expect((READY,), until=min(started + START_TIMEOUT_S, deadline - WRITE_RESERVE_S))
                if got is None:
                    row["measured"] = {"error": f"the measuring process did not start ({child.stop()} after "
                                                f"{time.time() - started:.0f} s)"}
                    child = None
                    continue
                ready = True
                if on_ready is not None:
                    on_ready(got[1])
                left = deadline - time.time() - WRITE_RESERVE_S
                soft = min(soft, left - GRACE_S)
                if soft < MIN_SETTING_S:
                    row["measured"] = {"error": f"not started: {max(left, 0):.0f} s left before the deadline"}
                    continue
            print(f"measuring {key} ({row['blocks_swapped']} blocks swapped), limit {soft:.0f} s", flush=True)
            t0 = time.time()
            setting = {k: row[k] for k in ("key", "workload", "base", "blocks_swapped")}
            setting["limit_s"] = None if soft == float("inf") else soft
            if row.get("memory_cap_bytes"):
                setting["memory_cap_bytes"] = row["memory_cap_bytes"]
            partial, got = None, None
            if child.send(setting):
                while True:
                    got = child.expect((PARTIAL, DONE), until=t0 + soft + GRACE_S)
                    if got is None or got[0] == DONE:
                        break
                    partial = got[1]
            if got is None:
                how = child.stop()
                child = None
                why = (f"stopped at its {soft:.0f} s limit (+{GRACE_S:.0f} s grace)" if how == "killed"
                       else f"the measuring process {how}")
                row["measured"] = dict(partial or {}, error=why, partial=partial is not None)
            else:
                row["measured"] = got[1]
            row["measured"]["wall_s"] = round(time.time() - t0, 1)
            m = row["measured"]
            print(f"  {key}: " + (f"peak {common.gib(m.get('peak_memory_bytes'))} GiB, {m['step_s_median']:.3f} s/step"
                                  if m.get("step_s_median") else "") + (f" [{m['error']}]" if m.get("error") else ""),
                  flush=True)
            if on_done is not None:
                on_done()
    finally:
        if child is not None:  # past the deadline's reserve it is killed rather than waited for
            child.close(timeout=max(1.0, min(30.0, deadline - time.time() - WRITE_RESERVE_S)))


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
    from bench import gpu_summary

    rec, rows = result["record"], result["rows"]
    budgets = result.get("budgets") or {w: result["budget_bytes"] for w in WORKLOADS}
    measured = any("measured" in r for r in rows)
    # md_header's note about CPU timings of competing sides does not apply here: this bench has no sides
    lines = common.md_header(f"Memory: bf16, fp8 and block swap (Qwen-Image, {result['size']}x{result['size']})",
                             dict(rec, label="GPU, real sizes"))
    if rec["label"] != "GPU, real sizes":
        lines[2:2] = [f"**{rec['label']}.**", ""]
    train_b, sample_b = budgets["lora_sft"] / GIB, budgets["teacher_sampling"] / GIB
    lines += [f"Model: Qwen-Image, {result['layers']} blocks at {'tiny' if result.get('tiny') else 'full'} width; "
              f"{result['size']}x{result['size']}, batch 1, {result.get('text_tokens', TEXT_TOKENS)} prompt tokens; "
              f"LoRA rank {LORA_RANK}; gradient checkpointing on. Budgets (the swap count is chosen for them): "
              f"{train_b:.0f} GiB for training, {sample_b:.0f} GiB for sampling"
              + (f" (plan reserve {rows[0]['reserve_bytes'] / GIB:.1f} GiB for the CUDA context)" if rows else "")
              + ". Predicted = `memory_plan` (peak allocated); measured = `torch.cuda.max_memory_allocated` over the "
              "timed steps" + (f"; CUDA context {result['context_bytes'] / GIB:.2f} GiB" if result.get("context_bytes")
                               else "") + ".", ""]
    if not measured:
        lines += ["**No GPU in this run: measured columns pending** (`python bench/memory.py --device cuda`).", ""]
        lines += common.md_table(["workload", "base", "blocks swapped", "budget GiB", "predicted GiB", "fits budget"],
                                 [[r["label"], r["base"], r["blocks_swapped"], f"{budgets[r['workload']] / GIB:.0f}",
                                   f"{r['predicted_bytes'] / GIB:.2f}", "yes" if r["fits_budget"] else "no"]
                                  for r in rows]) + [""]
    else:
        lines += gpu_summary.memory_md(gpu_summary.memory_analysis(result)) + [""]
    if not rows:
        return "\n".join(lines) + "\n"
    lines += ["Predicted parts (GiB):", ""]
    parts = list(rows[0]["predicted_parts"])
    lines += common.md_table(["workload", "base", *[p.replace("_", " ") for p in parts]],
                             [[r["label"], f"{r['base']} ({r['blocks_swapped']})",
                               *[f"{r['predicted_parts'][p] / GIB:.2f}" for p in parts]] for r in rows])
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
    ap.add_argument("--budget", default="24GB", help="GPU memory the training settings' swap count is chosen for "
                                                      "(and an fp8 + swap setting that fits is held to)")
    ap.add_argument("--sampling-budget", default="16GB", help="the same for teacher sampling")
    ap.add_argument("--tiny", action="store_true",
                    help=f"a tiny Qwen-Image ({TINY['num_layers']} blocks, width 128, {TINY_SIZE}x{TINY_SIZE}) measured "
                         "on --device: the measurement path rehearsed (bench/gpu_run.sh --dry-run), not evidence")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --tiny 64)")
    ap.add_argument("--layers", type=int, default=None, help="Qwen-Image blocks (default 60, the real model)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--setting-timeout", default=None,
                    help="seconds one setting may take (build included): one number, or workload=seconds,... "
                         f"(workloads {','.join(WORKLOADS)}); past it the setting is stopped with what it measured")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time by which the results must be written: no setting runs past it")
    ap.add_argument("--results", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    cuda = str(args.device).startswith("cuda")
    budgets = {w: parse_bytes(args.sampling_budget if w == "teacher_sampling" else args.budget) for w in WORKLOADS}
    spec = families.get(FAMILY)
    if args.tiny:
        config = spec.tiny_config(**dict(TINY, num_layers=args.layers or TINY["num_layers"]))
    else:
        config = dict(spec.presets()["qwen-image"], num_layers=args.layers or 60)
    size = args.size or (TINY_SIZE if args.tiny else 1024)
    text_tokens = TINY_TEXT_TOKENS if args.tiny else TEXT_TOKENS
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    # This process never touches CUDA (the device-wide figures are the child's own); the child reports the machine.
    rec = common.record(NAME, SimpleNamespace(device="cpu", tiny=True), argv)
    if args.tiny:
        rec["label"] = (f"tiny Qwen-Image on {args.device}: the measurement path rehearsed; its figures are not "
                        "evidence (a CPU's peak is the whole process's RSS)")
    elif not cuda:
        rec["label"] = "CPU: predicted figures for the real model; correctness on a tiny one; GPU figures pending"
    else:
        rec["label"] = "GPU, real sizes"
    lock = threading.Condition()
    rows: dict[str, dict] = {}
    result = {"record": rec, "budget_bytes": budgets["lora_sft"], "budgets": budgets, "size": size,
              "layers": config["num_layers"], "text_tokens": text_tokens, "tiny": args.tiny,
              "measure_order": MEASURE_ORDER, "rows": []}
    stem = NAME + (f"_{'cuda' if cuda else 'cpu'}_tiny" if args.tiny else "")

    def write() -> list[Path]:
        with lock:
            result["rows"] = row_order(rows.values())
            result["not_planned"] = [k for k in MEASURE_ORDER if k not in rows]
        return common.write_results(args.results, stem, result, markdown(result))

    if cuda or args.tiny:
        planned = {"done": False}

        def planner() -> None:  # the plans, in the order the measurements need them, while the child measures
            try:
                for workload, base in plan_order():
                    new = plan_rows(config, size, workload, base, budgets[workload], text_tokens)
                    for r in new:
                        if cuda and not args.tiny and r["base"] == "fp8+swap" and r["fits_budget"]:
                            r["memory_cap_bytes"] = r["budget_bytes"]
                    with lock:
                        rows.update((r["key"], r) for r in new)
                        lock.notify_all()
            except Exception as exc:  # noqa: BLE001 - recorded; the rows planned so far are still measured
                result["plan_error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                with lock:
                    planned["done"] = True
                    lock.notify_all()

        def get_row(key: str, until: float) -> dict | None:
            with lock:
                wait = None if until == float("inf") else max(0.0, until - time.time())
                lock.wait_for(lambda: key in rows or planned["done"], timeout=wait)
                return rows.get(key)

        def on_ready(info: dict) -> None:
            rec["machine"] = info["machine"]
            result["context_bytes"] = info.get("context_bytes")

        threading.Thread(target=planner, daemon=True).start()
        child = {"device": args.device, "config": config, "size": size, "warmup": args.warmup, "steps": args.steps,
                 "tiny": args.tiny, "text_tokens": text_tokens}
        supervise(MEASURE_ORDER, get_row, [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(child)],
                  deadline=args.deadline or float("inf"), limit_s=limits(args.setting_timeout), on_ready=on_ready,
                  on_done=write)
    else:
        rows.update((r["key"], r) for r in plans(config, size, budgets, text_tokens))
        result["checks"] = cpu_checks()
    written = write()
    failed = [k for k, v in result.get("checks", {}).items() if isinstance(v, dict) and v.get("passed") is False]
    print("\n".join(str(p) for p in written) + (f"\nFAILED: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)
    return written


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        main()
