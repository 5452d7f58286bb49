"""The README's main job, at its seconds-long preset: every stage runs and the report has what it promises."""

import json

from dit_distillery.cli import main
from dit_distillery.demo import QUICK, run_demo


def test_quick_demo_writes_grid_charts_and_metrics(tmp_path, capsys):
    metrics = run_demo(tmp_path, QUICK, log=lambda text: None)
    for name in ("teacher_4step", "student_lora", "student_shrunk"):
        assert metrics[name]["latent_mse"] >= 0 and set(metrics[name]["accuracy"]) == {"colour", "shape",
                                                                                     "background", "all"}
    assert metrics["student_lora"]["mse_vs_baseline"] is not None
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "teacher" / "loss.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["eval_pairs"] == QUICK.eval_pairs
    # rerunning resumes every stage instead of redoing it, through the CLI as the README runs it
    assert main(["demo", "--preset", "quick", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["results"]["student_lora"]["latent_mse"] == metrics["student_lora"]["latent_mse"]
    assert report["seconds"]["teacher"] < metrics["seconds"]["teacher"]
