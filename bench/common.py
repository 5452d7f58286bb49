"""What every speed/memory benchmark shares: the run's record, step timing, peak memory, sides in child
processes, and the JSON + markdown + PNG writers.

A benchmark compares *sides* (ours, DiffSynth-Studio, ComfyUI) on the same device in one run. Each side runs in
its own child process by default (`python bench/<x>.py --child SIDE SETTINGS_JSON`), so its peak memory is its
own, DiffSynth's `sys.path` import never touches our process, and ComfyUI's side can use ComfyUI's venv.
`--inline` runs the sides in-process instead (the smoke tests do, to stay fast).

Timing: a step is measured from the end of the previous step to the end of this one (after
`torch.cuda.synchronize()` on a GPU), so data loading and the optimiser are inside it; warm-up steps are dropped
and the median of the rest is reported. Peak memory: `torch.cuda.max_memory_allocated` on a GPU (reset after
warm-up); on a CPU the process's peak RSS (VmHWM, reset after warm-up by writing 5 to /proc/self/clear_refs),
the interpreter and the model included.

Imports torch and the standard library only, so ComfyUI's venv can run it too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RESULT_PREFIX = "BENCH_RESULT "
PARTIAL_PREFIX = "BENCH_PARTIAL "
TINY_LABEL = "CPU, tiny sizes, correctness only — GPU figures pending"

# Peak dense bf16 tensor-core throughput (no sparsity), from the vendors' datasheets: used for MFU.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet: 756 TFLOP/s bf16 dense"),
    ("H100 NVL", 835e12, "NVIDIA H100 NVL datasheet: 835 TFLOP/s bf16 dense"),
    ("H100", 989e12, "NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense"),
    ("H200", 989e12, "NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense"),
    ("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense"),
    ("L40S", 362e12, "NVIDIA L40S datasheet: 362 TFLOP/s bf16 dense"),
)


# ----------------------------------------------------------------------------------------------------------
# Arguments and the run's record

def add_common_args(ap: argparse.ArgumentParser, *, sides: tuple[str, ...]) -> None:
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda (real sizes, bf16) or cpu (tiny sizes: correctness only)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (automatic on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="steps dropped before timing")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (the median is reported)")
    ap.add_argument("--sides", default=",".join(sides), help=f"comma list among {','.join(sides)}")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--inline", action="store_true", help="run every side in this process (no child processes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side-timeout", default=None,
                    help="seconds each side's child process may run: one number, or side=seconds,... (past it the "
                         "side is stopped and recorded with what it had measured; bench/gpu_run.sh sets it)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time by which this run must have written its results: no side runs past it "
                         f"(less {WRITE_RESERVE_S:g} s to write them)")


WRITE_RESERVE_S = 8.0  # results, markdown and charts (matplotlib's import included) after the last side
MIN_SIDE_S = 3.0  # a side given less is recorded as not started (it could not even import torch)


def side_timeout(args, side: str) -> float | None:
    """Seconds `side` may run: its `--side-timeout` (`120` for every side, or `ours=90,diffsynth=30`), capped by
    what is left before `--deadline` once the results' writing is set aside."""
    spec, limit = getattr(args, "side_timeout", None), None
    if spec and "=" not in spec:
        limit = float(spec)
    elif spec:
        pairs = dict(item.split("=", 1) for item in spec.split(",") if item)
        limit = float(pairs[side]) if side in pairs else None
    deadline = getattr(args, "deadline", None)
    if deadline is not None:
        left = deadline - time.time() - WRITE_RESERVE_S
        limit = left if limit is None else min(limit, left)
    return limit


def is_tiny(args) -> bool:
    return bool(args.tiny or args.device == "cpu")


def run_name(bench: str, args) -> str:
    """Result file stem: `<bench>` for real sizes, `<bench>_cpu_tiny` for the tiny CPU run."""
    return f"{bench}_cpu_tiny" if is_tiny(args) else bench


def git_commit() -> dict:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty_files": len([l for l in git("status", "--porcelain", "--untracked-files=no").splitlines() if l])}


def device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    with open("/proc/cpuinfo") as f:
        return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())


def peak_bf16_flops(name: str) -> tuple[float | None, str]:
    for key, flops, source in PEAK_BF16_FLOPS:
        if key in name:
            return flops, source
    return None, f"unknown peak for {name!r}: MFU not reported (give --peak-tflops)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def machine(device: str) -> dict:
    with open("/proc/meminfo") as f:
        ram = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemTotal"))
    info = {"device": device_name(device), "device_type": "cuda" if str(device).startswith("cuda") else "cpu",
            "cpu_cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1), "os": platform.platform()}
    if info["device_type"] == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def record(bench: str, args, argv: list[str]) -> dict:
    """The header every result file starts with: what ran, where, with what, when."""
    return {"benchmark": bench, "label": TINY_LABEL if is_tiny(args) else "GPU, real sizes",
            "command": "python " + shlex.join([f"bench/{bench}.py", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(args.device), "versions": versions(),
            "git": git_commit(), "load_average_before": list(os.getloadavg())}


# ----------------------------------------------------------------------------------------------------------
# Timing and memory

def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))


class PeakMemory:
    """Peak GPU memory allocated by torch, or on a CPU the process's peak RSS, since the last `reset()`."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS of the process (VmHWM)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.kind = "peak RSS of the process since it started (VmHWM; no reset possible here)"

    def read(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _status("VmHWM")


class StepClock:
    """Call `tick()` at the end of every step (the start counts as step 0's beginning); after `warmup` ticks
    the peak-memory counter is reset, so memory and times cover the measured steps only."""

    def __init__(self, device, warmup: int, peak: PeakMemory | None = None):
        self.device, self.warmup, self.peak = device, warmup, peak or PeakMemory(device)
        self.times: list[float] = []
        self.last = time.perf_counter()
        if warmup == 0:
            self.peak.reset()

    def start(self) -> None:
        sync(self.device)
        self.last = time.perf_counter()

    def tick(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        if len(self.times) == self.warmup:
            self.peak.reset()
            self.last = time.perf_counter()

    @property
    def steps(self) -> int:
        return len(self.times)

    def summary(self, images_per_step: int | None = None) -> dict:
        measured = self.times[self.warmup:]
        if not measured:
            raise RuntimeError(f"no step was measured ({len(self.times)} steps, {self.warmup} warm-up)")
        med = statistics.median(measured)
        out = {"step_s_median": med, "step_s_mean": statistics.fmean(measured), "step_s_min": min(measured),
               "step_s_max": max(measured), "steps_measured": len(measured), "warmup_steps": self.warmup,
               "step_s_all": [round(t, 6) for t in self.times], "peak_memory_bytes": self.peak.read(),
               "peak_memory_kind": self.peak.kind}
        if images_per_step:
            out["images_per_step"] = images_per_step
            out["images_per_s"] = images_per_step / med
        return out


class Finished(Exception):
    """Raised by a timing hook inside someone else's training loop once enough steps were measured."""


# ----------------------------------------------------------------------------------------------------------
# Sides in child processes

def run_side(script: str | Path, side: str, settings: dict, fn: Callable[[dict], dict], *, inline: bool,
             python: str | None = None, cwd: str | Path | None = None, timeout: float | None = None) -> dict:
    """Run `fn(settings)` in a fresh `python script --child side JSON` (or inline). Never raises: a failure is
    recorded as {"error": ...} so one broken side does not lose the others' numbers."""
    started = time.perf_counter()
    if timeout is not None and timeout < MIN_SIDE_S:
        return {"error": f"side {side} not started: {max(timeout, 0):.0f} s left before the run's deadline", "wall_s": 0.0}
    if inline:
        try:
            _reset_accelerate()  # each side makes its own Accelerator; its state is a per-process singleton
            out = fn(settings)
        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
            out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    else:
        cmd = [python or sys.executable, str(Path(script).resolve()), "--child", side, json.dumps(settings)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout, check=False)
            stdout, stderr, problem = proc.stdout, proc.stderr, f"side {side} exited with {proc.returncode} and no result"
        except subprocess.TimeoutExpired as exc:  # POSIX: the output so far, as bytes
            stdout, stderr, problem = _text(exc.stdout), _text(exc.stderr), f"side {side} ran past {timeout:.1f} s"
        lines = [l for l in stdout.splitlines() if l.startswith(RESULT_PREFIX)]
        if lines:
            out = json.loads(lines[-1][len(RESULT_PREFIX):])
        else:  # stopped or crashed: keep what it had measured (see `report_partial`)
            partial = [l for l in stdout.splitlines() if l.startswith(PARTIAL_PREFIX)]
            out = json.loads(partial[-1][len(PARTIAL_PREFIX):]) if partial else {}
            out.update(error=problem, stderr_tail=(stderr or "")[-4000:], partial=bool(partial))
    out.setdefault("wall_s", round(time.perf_counter() - started, 2))
    return out


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


_IN_CHILD = False


def report_partial(out: dict) -> None:
    """In a side's child process, print what it has measured so far (e.g. after each batch size): if the side is
    then stopped by its `--side-timeout` or crashes, `run_side` records these numbers instead of none."""
    if _IN_CHILD:
        print(PARTIAL_PREFIX + json.dumps(out, default=str), flush=True)


def _reset_accelerate() -> None:
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)


def child_main(fns: dict[str, Callable[[dict], dict]]) -> bool:
    """If this process is a child (`--child SIDE JSON`), run that side, print its result line and return True."""
    if len(sys.argv) < 4 or sys.argv[1] != "--child":
        return False
    global _IN_CHILD
    _IN_CHILD = True
    side, settings = sys.argv[2], json.loads(sys.argv[3])
    try:
        out = fns[side](settings)
    except Exception as exc:  # noqa: BLE001
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return True


def setup_torch(settings: dict) -> torch.device:
    """Thread count and matmul precision for a side; returns its device."""
    device = torch.device(settings["device"])
    if device.type == "cpu":
        torch.set_num_threads(int(settings.get("threads") or min(2, os.cpu_count() or 1)))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def free(device) -> None:
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def build_on(device, dtype, make: Callable[[], torch.nn.Module], seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """`make()` with its parameters created directly on `device` in `dtype`, filled with N(0, std).

    accelerate's `init_empty_weights` builds the module with parameters on the meta device (buffers and RoPE
    tables are built normally), then each parameter is drawn where it will live: no fp32 CPU copy of a 20B model
    is ever made. Speed does not depend on the values; random ones only keep the losses finite.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights():
        model = make()
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        value = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------
# Writing results

def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x, spec: str = ".3g", none: str = "—") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    return format(x, spec)


def gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def md_header(title: str, rec: dict) -> list[str]:
    m, v, g = rec["machine"], rec["versions"], rec["git"]
    lines = [f"# {title}", ""]
    if rec["label"] != "GPU, real sizes":
        lines += [f"**{rec['label']}.** These timings come from a shared CPU, with each side in its own CPU dtype "
                  "(ours: the trainer's fp32 CPU default; DiffSynth and ComfyUI: bf16, which they hard-code): they show "
                  "that every side runs end to end and what it records, not which side is faster.", ""]
    lines += [f"`{rec['command']}`", "",
              f"Device: {m['device']} ({m['cpu_cores']} CPU cores, {m['ram_gib']} GiB RAM"
              + (f", {m['gpu_memory_gib']} GiB GPU" if "gpu_memory_gib" in m else "") + f"), {m['os']}.  ",
              f"Python {v['python']}, torch {v['torch']} (CUDA {v['cuda']}), diffusers {v['diffusers']}, "
              f"transformers {v['transformers']}, peft {v['peft']}, accelerate {v['accelerate']}.  ",
              f"Commit {(g['commit'] or '?')[:12]}" + (f" (+{g['dirty_files']} uncommitted tracked files)" if g['dirty_files'] else "")
              + f"; {rec['date']}; load average before {rec['load_average_before'][0]:.1f}.", ""]
    return lines


def side_status(result: dict) -> str | None:
    """'skipped: ...' or 'error: ...' for a side that produced no numbers, else None."""
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    if result.get("error"):
        return f"error: {result['error']}"
    return None


def write_results(out_dir: str | Path, stem: str, result: dict, markdown: str,
                  charts: list[tuple[str, Callable]] = ()) -> list[Path]:
    """Write `<stem>.json`, `<stem>.md` and each chart `<stem><suffix>.png` (drawn by `draw(path)`)."""
    from dit_distillery.formats import atomic_output, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result, load_average_after=list(os.getloadavg()))
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    atomic_write_text(written[0], json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(written[1], markdown)
    for suffix, draw in charts:
        path = out / f"{stem}{suffix}.png"
        with atomic_output(path) as tmp:
            draw(tmp)
        written.append(path)
    return written


def bar_chart(path, title: str, labels: list[str], series: dict[str, list[float | None]], ylabel: str,
              log: bool = False) -> None:
    """Grouped bars: one group per label, one bar per series (None = no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) * max(1, len(series)) / 2 + 2), 3.6), dpi=110)
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        pairs = [(x, v) for x, v in zip(xs, values) if v is not None]
        if pairs:
            bars = ax.bar([p[0] for p in pairs], [p[1] for p in pairs], width, label=name)
            ax.bar_label(bars, labels=[f"{p[1]:.3g}" for p in pairs], fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def line_chart(path, title: str, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
               logx: bool = True, logy: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
