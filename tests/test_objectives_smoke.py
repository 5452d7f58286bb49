"""bench/objectives.py (issue 13 §4) runs end to end at tiny budgets and its report says what the cached runs hold;
the goal verdicts and the loss specs are checked by hand. The figures come from the committed full run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from bench import objectives
from dit_distillery.errors import DistilleryError
from dit_distillery.losses import loss_from_dict


@pytest.mark.slow  # 10 s of CPU, 40 s wall on the loaded 2-core CPU: 3 probes, 3 trainings, 3 evaluations
def test_objectives_smoke(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    cfg = replace(objectives.PRESETS["smoke"], student_steps=(1,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        files = objectives.run_all(out, cfg, results=results, log=lambda text: None)
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in files) == ["objectives.json", "objectives.md", "objectives_accuracy.png",
                                             "objectives_diversity.png", "objectives_grid.png"]
    rec = json.loads((results / "objectives.json").read_text())
    assert rec["machine"]["cpu"] and rec["machine"]["torch_threads"] == 1 and rec["machine"]["torch"]
    assert sorted(rec["runs"]) == ["direct_distill_1step", "dmd_1step", "trajectory_1step"]
    for run in rec["runs"].values():
        ev, train = run["eval"], run["train"]
        assert ev["pairs"] == cfg.eval_prompts * cfg.eval_seeds and ev["student"]["steps"] == 1
        assert ev["ratios"]["mse_vs_baseline"] == pytest.approx(ev["student"]["latent_mse"]
                                                                / ev["baseline"]["latent_mse"])
        assert ev["ratios"]["diversity_vs_teacher"] == pytest.approx(ev["student"]["diversity"]
                                                                     / ev["teacher"]["diversity"])
        assert train["train_steps"] == cfg.min_steps and train["nonfinite_losses"] == 0  # budget 0: the floor
        assert run["probe"]["cpu_seconds_per_step"] > 0 and train["train_cpu_seconds"] > 0
        assert ev["student"]["latent_mse"] != ev["baseline"]["latent_mse"]  # training changed the student
    # at one step Trajectory's target (the chord noise -> final latents) is Direct Distill's: the same first loss
    first = {k: rec["runs"][f"{k}_1step"]["train"]["first_loss"] for k in ("direct_distill", "trajectory")}
    assert first["trajectory"] == pytest.approx(first["direct_distill"], rel=1e-5)
    md = (results / "objectives.md").read_text()
    assert "Preset `smoke`" in md and "equal compute" in md
    for label in objectives.LABELS.values():
        assert f"| 1 | {label} |" in md
    assert "| 1 | undistilled teacher |" in md and "1 step(s), DMD2 (within 5 points)" in md
    # the report alone reuses every run; other settings in the same folder are refused
    records = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/run.json")}
    objectives.run_all(out, cfg, results=results, only=["report"], log=lambda text: None)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/run.json")} == records and len(records) == 3
    with pytest.raises(DistilleryError, match="other settings"):
        objectives.run_all(out, replace(cfg, budget_cpu_s=1.0), results=results, only=["report"], log=lambda t: None)


def _eval(teacher_all, student_all, teacher_div, student_div):
    return {"teacher": {"accuracy": {"all": teacher_all}, "diversity": teacher_div},
            "student": {"accuracy": {"all": student_all}, "diversity": student_div},
            "ratios": {"diversity_vs_teacher": student_div / teacher_div}}


def test_goal_verdicts_by_hand():
    cfg = objectives.PRESETS["full"]
    runs = {"direct_distill_2step": {"eval": _eval(0.90, 0.88, 0.1, 0.09)},   # 2 points, 0.9x: met
            "dmd_2step": {"eval": _eval(0.90, 0.89, 0.1, 0.05)},              # diversity 0.5x: missed
            "trajectory_2step": {"eval": _eval(0.90, 0.85, 0.1, 0.1)},        # 5 points: missed
            "dmd_1step": {"eval": _eval(0.90, 0.86, 0.1, 0.01)},              # 4 points, no diversity goal: met
            "trajectory_1step": {"eval": _eval(0.90, 0.80, 0.1, 0.1)}}        # 10 points: missed
    got = {(v["steps"], v["loss"]): v for v in objectives.goal_verdicts(runs, cfg)}
    assert sorted(got) == [(1, "dmd"), (1, "trajectory"), (2, "direct_distill"), (2, "dmd"), (2, "trajectory")]
    assert got[(2, "direct_distill")]["met"] and got[(1, "dmd")]["met"]
    assert got[(2, "dmd")]["misses"] == ["diversity 0.50x the teacher's (goal ≥ 0.8)"]
    assert got[(2, "trajectory")]["misses"] == ["accuracy 5.0 points below the teacher (goal ≤ 3)"]
    assert not got[(1, "trajectory")]["met"] and got[(1, "trajectory")]["accuracy_gap_points"] == pytest.approx(10)


def test_loss_specs_are_valid_losses_at_each_step_count():
    cfg = objectives.PRESETS["full"]
    for loss in cfg.losses:
        for steps in cfg.student_steps:
            built = loss_from_dict(objectives.loss_spec(cfg, loss, steps))
            assert built.kind == loss and built.steps == steps
    with pytest.raises(DistilleryError, match="unknown loss"):
        objectives.loss_spec(cfg, "gan", 2)
