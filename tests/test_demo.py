"""The README's main job, at its seconds-long preset: every stage runs and the report has what it promises."""

import json

import torch

from dit_distillery.cli import main
from dit_distillery.commands.demo import default_threads
from dit_distillery.demo import QUICK, run_demo


def test_quick_demo_writes_grid_charts_and_metrics(tmp_path, capsys):
    metrics = run_demo(tmp_path, QUICK, log=lambda text: None)
    for name in ("teacher_4step", "student_lora", "student_shrunk"):
        assert metrics[name]["latent_mse"] >= 0 and set(metrics[name]["accuracy"]) == {"colour", "shape",
                                                                                     "background", "all"}
    assert metrics["student_lora"]["mse_vs_baseline"] is not None
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "teacher" / "loss.png").is_file()
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["eval_pairs"] == QUICK.eval_pairs
    # the seconds name the machine they were measured on
    machine = written["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch"] == torch.__version__
    # rerunning resumes every stage instead of redoing it, through the CLI as the README runs it
    threads = torch.get_num_threads()
    assert main(["demo", "--preset", "quick", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the CLI ran on its default threads, recorded them, and gave the caller's back
    assert json.loads((tmp_path / "metrics.json").read_text())["machine"]["torch_threads"] == default_threads()
    assert torch.get_num_threads() == threads
    assert report["results"]["student_lora"]["latent_mse"] == metrics["student_lora"]["latent_mse"]
    assert report["seconds"]["teacher"] < metrics["seconds"]["teacher"]


def test_demo_threads_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "quick", "--threads", "0", "--out", str(out)]) != 0
    assert "--threads" in capsys.readouterr().err and not out.exists()


def test_demo_default_threads_leave_one_cpu_free(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_threads() == 1  # 2 cores: 1 thread
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_threads() == 1  # never 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_threads() == 8  # 8 cores, 16 hardware threads: torch's 8, one CPU is already free
