"""The speed/memory benchmarks stay runnable: each script runs end to end at the smallest sizes on the CPU (our side,
in-process), writes its JSON + markdown + charts, and records what a result must record. No timing is asserted.

The competitors' sides run only where their checkouts are given (`DIFFSYNTH_DIR`; `COMFYUI_DIR` + `COMFYUI_PYTHON`)
and are slow (`-m slow`); without them a side is recorded as skipped, which is checked here too.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from bench import common, distill_speed, flops, gen_speed, lora_qwen_speed, train_speed

RECORDED = ("benchmark", "label", "command", "date", "machine", "versions", "git", "settings", "sides")


def _check_record(rec: dict, out, stem: str) -> dict:
    for key in RECORDED:
        assert key in rec, key
    assert rec["label"] == common.TINY_LABEL
    assert rec["machine"]["device"] and rec["versions"]["torch"] == torch.__version__
    assert rec["command"].startswith(f"python bench/{rec['benchmark']}.py")
    files = {p.name for p in out.iterdir()}
    assert {f"{stem}.json", f"{stem}.md", f"{stem}.png"} <= files
    on_disk = json.loads((out / f"{stem}.json").read_text())
    assert on_disk["sides"].keys() == rec["sides"].keys()
    assert common.TINY_LABEL in (out / f"{stem}.md").read_text()
    return on_disk


def _check_run(run: dict, batch: int) -> None:
    assert "error" not in run, run
    assert run["steps_measured"] >= 1 and run["step_s_median"] > 0
    assert run["images_per_s"] == pytest.approx(batch / run["step_s_median"])
    assert run["peak_memory_bytes"] > 0


@pytest.fixture
def no_competitors(monkeypatch):
    for name in ("DIFFSYNTH_DIR", "COMFYUI_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_flop_formulas_match_torch_counter():
    torch.manual_seed(0)
    aaadit = flops.crosscheck_aaadit()
    assert aaadit["forward_match"], aaadit
    assert 0.98 < aaadit["train_counted_over_analytic"] <= 1.0  # the first layers need no input gradient
    qwen = flops.crosscheck_qwen_image()
    assert qwen["forward_match"], qwen


def test_peak_flops_lookup():
    assert common.peak_bf16_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert common.peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert common.peak_bf16_flops("Intel(R) Xeon(R) Processor")[0] is None


def test_step_clock_drops_warmup_and_takes_the_median():
    clock = common.StepClock("cpu", warmup=2)
    clock.times = [5.0, 4.0, 1.0, 3.0, 2.0]
    summary = clock.summary(images_per_step=4)
    assert summary["step_s_median"] == 2.0 and summary["steps_measured"] == 3
    assert summary["images_per_s"] == 2.0
    with pytest.raises(RuntimeError):
        common.StepClock("cpu", warmup=3).summary()


def test_train_speed_smoke(tmp_path, no_competitors):
    out = tmp_path / "results"
    rec = train_speed.main(["--device", "cpu", "--inline", "--out", str(out), "--batch-sizes", "2", "--warmup", "1",
                            "--steps", "1", "--workdir", str(tmp_path / "work")])
    disk = _check_record(rec, out, "train_speed_cpu_tiny")
    assert (out / "train_speed_cpu_tiny_memory.png").is_file()
    runs = disk["sides"]["ours"]["runs"]
    assert sorted((r["batch"], r["cached"]) for r in runs) == [(2, False), (2, True)]
    for run in runs:
        _check_run(run, run["batch"])
        assert run["losses_finite"]
    assert [o["batch"] for o in disk["sides"]["ours"]["overheads"]] == [2]
    assert disk["sides"]["diffsynth"]["skipped"] == "no DIFFSYNTH_DIR"
    assert disk["flops"]["train"] == 3 * disk["flops"]["forward"] and disk["flops"]["crosscheck"]["forward_match"]
    assert "MFU" in (out / "train_speed_cpu_tiny.md").read_text()


def test_distill_speed_smoke(tmp_path, no_competitors):
    out = tmp_path / "results"
    rec = distill_speed.main(["--device", "cpu", "--inline", "--out", str(out), "--batch-sizes", "1", "--warmup", "1",
                              "--steps", "1", "--image-size", "32", "--student-steps", "2"])
    disk = _check_record(rec, out, "distill_speed_cpu_tiny")
    (run,) = disk["sides"]["ours"]["runs"]
    _check_run(run, 1)
    assert run["losses_finite"] and run["trainable_parameters"] > 0
    assert disk["sides"]["diffsynth"]["skipped"] == "no DIFFSYNTH_DIR"


def test_lora_qwen_speed_smoke(tmp_path, no_competitors):
    out = tmp_path / "results"
    rec = lora_qwen_speed.main(["--device", "cpu", "--inline", "--out", str(out), "--warmup", "1", "--steps", "1",
                                "--image-size", "32"])
    disk = _check_record(rec, out, "lora_qwen_speed_cpu_tiny")
    (run,) = disk["sides"]["ours"]["runs"]
    _check_run(run, 1)
    assert all(math.isfinite(x) for x in run["losses"])
    assert disk["sides"]["comfyui"]["skipped"] == "no COMFYUI_DIR"


def test_gen_speed_smoke(tmp_path, no_competitors):
    out = tmp_path / "results"
    rec = gen_speed.main(["--device", "cpu", "--inline", "--out", str(out), "--batch-sizes", "2", "--warmup", "1",
                          "--steps", "1", "--image-size", "32", "--teacher-steps", "2", "--sides", "ours"])
    disk = _check_record(rec, out, "gen_speed_cpu_tiny")
    (run,) = disk["sides"]["ours"]["runs"]
    _check_run(run, 2)
    assert run["rows_written"] == 4


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIFFSYNTH_DIR"), reason="set DIFFSYNTH_DIR to a DiffSynth-Studio checkout")
@pytest.mark.parametrize("module", [train_speed, distill_speed, lora_qwen_speed, gen_speed])
def test_competitor_sides_run(tmp_path, module):
    """Each script with every side, in child processes as a real run does (ComfyUI too where COMFYUI_DIR is set)."""
    out = tmp_path / "results"
    argv = ["--device", "cpu", "--out", str(out), "--warmup", "1", "--steps", "1"]
    if module is not train_speed:
        argv += ["--image-size", "32"]
    if module is gen_speed:
        argv += ["--teacher-steps", "2", "--batch-sizes", "1"]
    rec = module.main(argv)
    for name, side in rec["sides"].items():
        if name == "comfyui" and not os.environ.get("COMFYUI_DIR"):
            assert side["skipped"]
            continue
        assert common.side_status(side) is None, (name, side)
