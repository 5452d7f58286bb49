"""The quality experiments run end to end (`bench/quality.py --preset smoke`: tiny budgets, seconds) and their
report says what the cached runs hold. The numbers of a smoke run mean nothing; what is checked is that every
stage produces what the report reads, that the metrics are computed as documented, and that the DiffSynth-recipe
dataset, the block sets and the resume/guard behaviour are right."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image

from bench import quality
from dit_distillery.errors import DistilleryError


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    out, results = root / "out", root / "results"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a shared CPU
    try:
        written = quality.run_all(out, quality.PRESETS["smoke"], results=results, log=lambda text: None)
    finally:
        torch.set_num_threads(threads)
    return out, results, written


def test_report_files_and_sections(smoke):
    out, results, written = smoke
    names = {p.name for p in written}
    assert {"quality.md", "quality.json"} <= names
    for suffix in ("curve_steps", "curve_time", "distill_mse", "shrink_mse", "grid_distill", "grid_shrink",
                   "grid_curve"):
        path = results / f"quality_{suffix}.png"
        assert path.name in names
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 100
    md = (results / "quality.md").read_text()
    for heading in ("## Set-up", "## 1. From scratch", "## 2. Direct Distill", "## 3. Which blocks to drop"):
        assert heading in md
    for _, _, _, label in quality.DISTILL_RUNS.values():
        assert f"| {label} |" in md
    assert "Preset `smoke`" in md and "not run" not in md.lower()


def test_metrics_are_what_they_claim(smoke):
    out, results, _ = smoke
    rec = json.loads((results / "quality.json").read_text())
    pairs = quality.PRESETS["smoke"].demo.eval_pairs
    expected = ["teacher_4step"] + [f"distill_{n}" for n in [*quality.DISTILL_RUNS, *quality.BUDGET_RUNS]]
    for s in rec["shrink"]["sets"]:
        name = "keep_" + "_".join(map(str, s["kept"]))
        expected += [f"{name}_before", f"{name}_before_teacher_settings", f"{name}_after"]
    assert sorted(rec["evals"]) == sorted(expected)
    for m in rec["evals"].values():
        assert len(m["latent_mse_per_pair"]) == pairs == m["pairs"]
        assert m["latent_mse"] == pytest.approx(sum(m["latent_mse_per_pair"]) / pairs)
        assert all(0 <= v <= 1 for v in m["accuracy"].values())
    trained = {f"distill_{n}" for n in [*quality.DISTILL_RUNS, *quality.BUDGET_RUNS]}
    assert set(rec["train_pairs_mse"]) == trained | {"teacher_4step"}
    assert all(v >= 0 and math.isfinite(v) for v in rec["train_pairs_mse"].values())
    # the baseline recomputed independently: the teacher at 4 steps CFG 1 against the cached reference
    run = quality.Run(out, quality.PRESETS["smoke"])
    teacher = run.pipe(run.teacher_file)
    d = run.d
    again = teacher.sample(run.prompts, seeds=run.seeds, steps=d.student_steps, cfg_scale=d.student_cfg,
                           height=d.size, width=d.size, output="latent")
    ref = run.reference()["latents"]
    assert float(((again.latents - ref) ** 2).mean()) == pytest.approx(rec["evals"]["teacher_4step"]["latent_mse"],
                                                                        rel=1e-5)
    # students differ from the baseline: the distillation runs really changed the model
    assert all(rec["evals"][f"distill_{n}"]["latent_mse"] != rec["evals"]["teacher_4step"]["latent_mse"]
               for n in [*quality.DISTILL_RUNS, *quality.BUDGET_RUNS])


def test_score_by_hand():
    ref = {"latents": torch.zeros(2, 3, 2, 2), "pixels": torch.zeros(2, 3, 4, 4)}
    latents = torch.stack([torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.5)])
    pixels = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.1)])
    image = Image.new("RGB", (4, 4))
    m = quality.score(latents, pixels, ref, [image, image], ["a red circle on a blue background"] * 2)
    assert m["latent_mse_per_pair"] == [0.0, 0.25] and m["latent_mse"] == pytest.approx(0.125)
    assert m["identical_images"] == 1  # the identical image has no finite PSNR and is left out of the mean
    assert m["psnr_db"] == pytest.approx(10 * math.log10(4 / 0.01))


def test_curve_and_wall_time(smoke):
    _, results, _ = smoke
    curve = json.loads((results / "quality.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [0, 10, 20]
    walls = [p["wall_s"] for p in curve]
    assert walls[0] == 0 and all(b > a for a, b in zip(walls, walls[1:]))


def test_diffsynth_dataset_is_the_same_rows_as_jpeg(smoke):
    out, _, _ = smoke
    ours = list(csv.DictReader((out / "distill_data" / "metadata.csv").open()))
    theirs = list(csv.DictReader((out / "distill_jpeg" / "metadata.csv").open()))
    assert list(theirs[0]) == ["image", "prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale"]
    key = ("prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale")
    assert [tuple(r[k] for k in key) for r in theirs] == [tuple(r[k] for k in key) for r in ours]
    with Image.open(out / "distill_jpeg" / theirs[0]["image"]) as jpeg, \
            Image.open(out / "distill_data" / ours[0]["image"]) as png:
        assert jpeg.format == "JPEG" and jpeg.size == png.size
        assert list(jpeg.convert("RGB").getdata()) != list(png.convert("RGB").getdata())


def test_block_sets_cover_every_choice_and_name_the_strategies():
    scores = [0.5, 0.1, 0.9, 0.2]
    sets = quality.block_sets(4, 2, scores, limit=6)
    assert list(sets) == [(0, 3), (1, 3), (2, 3)]
    assert sets[(0, 3)] == ["uniform", "first", "interval"] and sets[(2, 3)] == ["importance"]
    assert sets[(1, 3)] == []
    only = quality.block_sets(4, 2, scores, limit=2)  # too many sets: the strategies' only
    assert list(only) == [(0, 3), (2, 3)]


def test_report_only_reuses_runs_and_other_settings_are_refused(smoke):
    out, results, _ = smoke
    runs = sorted(out.glob("*/*/run.json"))
    before = {p: p.stat().st_mtime_ns for p in runs}
    assert len(runs) == len(quality.DISTILL_RUNS) + len(quality.BUDGET_RUNS) + 3
    threads = torch.get_num_threads()
    try:
        quality.main(["--preset", "smoke", "--out", str(out), "--results", str(results), "--only", "report"])
    finally:
        torch.set_num_threads(threads)  # main() sets the thread count for the process
    assert {p: p.stat().st_mtime_ns for p in runs} == before
    assert "--only report" in (results / "quality.md").read_text()
    other = quality.QualityConfig(name="smoke", demo=quality.PRESETS["smoke"].demo, checkpoint_every=5)
    with pytest.raises(DistilleryError, match="other settings"):
        quality.run_all(out, other, results=results, only=["report"], log=lambda text: None)
