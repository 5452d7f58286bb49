"""Shrink DiT benchmark: time and peak RSS of shrinking a synthetic full-width Qwen-Image against the I/O floor.

    python bench/shrink_bench.py [--blocks 12] [--keep 6] [--heads 12] [--workdir /tmp/shrink_bench]

The source has the real tensor names and shapes (3072 wide, 128-dim heads, 3584-dim text; 680 MB per bf16 block)
with fewer blocks, written tensor by tensor. Two cases: depth (keep N blocks, uniform) and depth + width (also
keep H heads, magnitude scores). For each, in the same run and the same cold page-cache state (the source's
pages are dropped with posix_fadvise before every measurement):
* floor: read every source tensor the student is sliced from (whole: a column slice touches every row) with plain
  reads, and write as many bytes as the student has, fsynced. Nothing else can be faster on this disk.
* shrink: `dit_distillery.shrink.shrink` in a fresh interpreter (imports excluded from its time); peak RSS is that
  process's VmHWM, the whole interpreter included.
Writes bench/results/shrink_bench.json and .md (machine, versions, command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def drop_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache (no root needed), so reads come from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(src: str, out: str, kwargs: str) -> None:
    """Run one shrink and print its time and memory (called in a fresh interpreter)."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from dit_distillery.shrink import shrink
    import diffusers.models.transformers.transformer_qwenimage  # noqa: F401  (import cost is not shrink's)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    start = time.perf_counter()
    report = shrink(src, out, **json.loads(kwargs))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": status("VmHWM"),
                      "bytes_written": report["bytes_written"], "params_after": report["params_after"],
                      "kept_blocks": report["kept_blocks"]}))


def run_shrink(src: Path, out: Path, **kwargs) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", str(src), str(out), json.dumps(kwargs)],
                         capture_output=True, text=True, check=False)
    if run.returncode:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def floor(src: Path, keys: list[str], out_bytes: int, scratch: Path) -> dict:
    """Read `keys` whole (plain reads into one reused buffer), then write `out_bytes` and fsync."""
    from dit_distillery.formats import TensorSource
    from dit_distillery.shrink.stream import RawReader

    with TensorSource(src) as ts:
        reader = RawReader(ts)
        spans = [reader.span(k) for k in keys]
        reader.close()
    biggest = max(n for _, _, n in spans)
    buf = bytearray(biggest)
    view = memoryview(buf)
    start = time.perf_counter()
    read = 0
    with open(src, "rb", buffering=0) as f:
        for _, offset, n in spans:
            f.seek(offset)
            done = 0
            while done < n:
                done += f.readinto(view[done:n])
            read += n
    t_read = time.perf_counter() - start
    with open(scratch, "wb") as f:
        left = out_bytes
        while left:
            k = min(left, biggest)
            f.write(view[:k])
            left -= k
        f.flush()
        os.fsync(f.fileno())
    total = time.perf_counter() - start
    scratch.unlink()
    return {"seconds": total, "read_seconds": t_read, "write_seconds": total - t_read, "bytes_read": read,
            "bytes_written": out_bytes}


def source_keys(config: dict, kept: list[int]) -> list[str]:
    from dit_distillery.shrink.stream import expected_shapes

    keep = {f"transformer_blocks.{i}." for i in kept}
    return [k for k in expected_shapes(config)
            if not k.startswith("transformer_blocks.") or any(k.startswith(p) for p in keep)]


def machine() -> dict:
    import diffusers
    import safetensors
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = status_meminfo("MemTotal")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "safetensors": safetensors.__version__}


def status_meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--workdir", default="/tmp/shrink_bench")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved floor/shrink pairs per case (best is reported)")
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args()

    from dit_distillery.shrink.plan import select_blocks
    from dit_distillery.shrink.synthetic import full_width_config, write_synthetic_source

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = full_width_config(args.blocks)
    src = work / "synthetic_qwen_image_bf16.safetensors"
    t = time.perf_counter()
    size = write_synthetic_source(src, config)
    print(f"source: {args.blocks} blocks, {size / 2**30:.2f} GiB written in {time.perf_counter() - t:.0f} s", flush=True)
    kept = select_blocks("uniform", args.blocks, args.keep)
    keys = source_keys(config, kept)

    cases = []
    load_before = os.getloadavg()
    for name, kwargs in (("depth", {"layers": args.keep}),
                         ("depth+width", {"layers": args.keep, "heads": args.heads})):
        out = work / f"student_{name.replace('+', '_')}.safetensors"
        shrinks, floors = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            drop_cache(src)
            shrinks.append(run_shrink(src, out, **kwargs))
            out.unlink()
            drop_cache(src)
            floors.append(floor(src, keys, shrinks[-1]["bytes_written"], work / "floor.bin"))
        shr = min(shrinks, key=lambda r: r["seconds"])
        flo = min(floors, key=lambda r: r["seconds"])
        case = {"case": name, "kwargs": kwargs, "shrink": shr, "floor": flo,
                "shrink_seconds_all": [round(r["seconds"], 2) for r in shrinks],
                "floor_seconds_all": [round(r["seconds"], 2) for r in floors],
                "peak_rss_max": max(r["peak_rss"] for r in shrinks),
                "ratio_to_floor": round(shr["seconds"] / flo["seconds"], 3),
                "ratio_of_medians": round(statistics.median(r["seconds"] for r in shrinks)
                                          / statistics.median(r["seconds"] for r in floors), 3)}
        cases.append(case)
        print(json.dumps(case), flush=True)
    if not args.keep_files:
        src.unlink()

    command = "python bench/shrink_bench.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "shrink", "command": command.strip(), "machine": machine(), "source_bytes": size,
              "source_blocks": args.blocks, "page_cache": "cold (posix_fadvise DONTNEED before each measurement)",
              "cases": cases, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shrink_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "shrink_bench.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [
        "# Shrink DiT benchmark",
        "",
        f"`{r['command']}` on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB RAM), {m['os']}; "
        f"Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, safetensors {m['safetensors']}; "
        f"{r['date']}.",
        "",
        f"Source: synthetic full-width Qwen-Image (3072 wide), {r['source_blocks']} blocks, bf16, "
        f"{gib(r['source_bytes'])} GiB. Page cache: {r['page_cache']}.",
        "",
        "| case | kept | read by floor (GiB) | written (GiB) | floor (s) | shrink (s) | shrink / floor "
        "(best; medians) | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cases"]:
        s, f = c["shrink"], c["floor"]
        kept = f"{len(s['kept_blocks'])} blocks" + (f", {c['kwargs']['heads']} heads" if "heads" in c["kwargs"] else "")
        lines.append(f"| {c['case']} | {kept} | {gib(f['bytes_read'])} | {gib(s['bytes_written'])} | "
                     f"{f['seconds']:.1f} | {s['seconds']:.1f} | {c['ratio_to_floor']:.2f}x; {c['ratio_of_medians']:.2f}x | "
                     f"{gib(c['peak_rss_max'])} |")
    lines += ["", "Floor = read the kept source tensors whole + write the student's byte count (fsync), same cold cache.",
              f"Best of {r['repeats']} interleaved floor/shrink pairs per case (all times in the JSON); load average "
              f"{r['load_average_before'][0]:.1f} before, {r['load_average_after'][0]:.1f} after (2 cores shared with "
              "other jobs, so times are noisy).",
              "Peak RSS = the shrinking process's VmHWM (Python, torch and diffusers included), highest of the repeats.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
