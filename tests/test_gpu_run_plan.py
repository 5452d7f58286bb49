"""bench/gpu_run.sh keeps to the GPU run's 8-minute budget: its plan (the same table it runs from) names every
step the issue asks for, each with a timeout, and the timeouts add up to at most 480 s. Runs nothing heavy:
`--plan` only parses the arguments and prints the table."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480
REQUIRED = ["setup", "env", "pytest_gpu", "train", "distill", "lora", "compile", "gen", "summary"]
BENCHMARKS = ("train", "distill", "lora", "compile", "gen")


def _plan(*args: str) -> tuple[list[dict], tuple[int, int]]:
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--plan", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    steps, total = [], None
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == "step":
            steps.append({"name": fields[1], "timeout": int(fields[2]), "what": fields[3], "command": fields[4]})
        elif fields[0] == "total":
            total = (int(fields[1]), int(fields[2]))
    assert total is not None, out
    return steps, total


@pytest.mark.parametrize("mode", [(), ("--dry-run",)], ids=["gpu", "dry-run"])
def test_plan_fits_the_eight_minute_budget(mode):
    steps, (total, budget) = _plan(*mode)
    assert [s["name"] for s in steps] == REQUIRED
    assert all(s["timeout"] > 0 and s["command"] for s in steps)
    assert total == sum(s["timeout"] for s in steps)
    assert budget == BUDGET_S and total <= BUDGET_S, f"{total} s planned for a {BUDGET_S} s run"


def test_gpu_plan_runs_the_real_sizes_and_dry_run_shrinks_them():
    gpu = {s["name"]: s["command"] for s in _plan()[0]}
    dry = {s["name"]: s["command"] for s in _plan("--dry-run")[0]}
    assert "-m gpu" in gpu["pytest_gpu"] and "DIT_GPU_TESTS_DEVICE" not in gpu["pytest_gpu"]
    for name in ("train", "distill", "lora", "compile", "gen"):
        assert "--device cuda" in gpu[name] and "--device cpu" in dry[name], name
        assert "--deadline $STEP_DEADLINE" in gpu[name], name  # a side past its time keeps what it measured
    assert "--compile" in gpu["compile"] and "--batch-sizes 256,128,64,32,16,8,4,2,1" in gpu["compile"]
    assert "--num-layers $LORA_LAYERS" in gpu["lora"]
    assert "/tmp/site" in gpu["setup"] and ".whl/" in gpu["setup"]


def test_side_caps_leave_room_inside_each_step():
    """A benchmark's sides run one after another inside its step, all before the step's deadline: the caps on the
    first sides must leave the last (uncapped) side 20 s, and the parent 10 s to start and write the results."""
    for mode in ((), ("--dry-run",)):
        for step in _plan(*mode)[0]:
            assert ("--deadline $STEP_DEADLINE" in step["command"]) == (step["name"] in BENCHMARKS), step["name"]
            if "--side-timeout" not in step["command"]:
                continue
            spec = step["command"].split("--side-timeout ")[1].split()[0]
            caps = [float(item.split("=")[1]) for item in spec.split(",")]
            assert "=" in spec and sum(caps) + 20 + 10 <= step["timeout"], (mode, step["name"], spec, step["timeout"])


def test_bad_argument_is_refused():
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--frobnicate"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "unknown argument" in out.stderr


def test_a_side_stopped_at_its_timeout_keeps_what_it_measured(tmp_path, monkeypatch):
    """`--side-timeout`/`--deadline` stop a side's child process; the numbers it reported so far are recorded."""
    import argparse
    import time

    from bench import common

    child = tmp_path / "child.py"
    child.write_text("import json, time\n"
                     f"print({common.PARTIAL_PREFIX!r} + json.dumps({{'runs': [{{'batch': 256, 'images_per_s': 9.0}}]}}), flush=True)\n"
                     "time.sleep(60)\n")
    monkeypatch.setattr(common, "MIN_SIDE_S", 1.0)
    out = common.run_side(child, "ours", {}, None, inline=False, timeout=1.5)
    assert out["runs"] == [{"batch": 256, "images_per_s": 9.0}] and out["partial"] is True
    assert "ran past 1.5 s" in out["error"] and out["wall_s"] < 10

    args = argparse.Namespace(side_timeout="ours=30", deadline=time.time() + 100)
    assert common.side_timeout(args, "ours") == 30
    left = common.side_timeout(args, "diffsynth")  # uncapped: what the deadline leaves after writing the results
    assert 100 - common.WRITE_RESERVE_S - 2 < left <= 100 - common.WRITE_RESERVE_S
    args.deadline = time.time() + common.WRITE_RESERVE_S + 0.5
    late = common.run_side(child, "diffsynth", {}, None, inline=False, timeout=common.side_timeout(args, "diffsynth"))
    assert "not started" in late["error"] and "runs" not in late
