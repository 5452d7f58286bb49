"""The training engine on tiny models and the synthetic shapes (CPU, seconds per test)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.errors import StopRequested
from dit_distillery.losses import FlowMatchingLoss
from dit_distillery.lora import read_lora
from dit_distillery.trainer import Callbacks, TrainingDiverged, TrainJob, train
from dit_distillery.trainer.state import latest_checkpoint, list_checkpoints
from tests.trainer_helpers import make_job

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode,lr,factor", [("full", 2e-3, 0.8), ("lora", 1e-2, 0.92)])
def test_training_reduces_the_loss(tmp_path, mode, lr, factor):
    job = make_job(tmp_path, mode=mode, steps=30, batch_size=4, optim={"lr": lr, "warmup_steps": 2},
                   lora={"rank": 8}, loss={"kind": "flow_matching", "weighting": "none"},
                   validation={"eval_samples": 8})
    result = train(job)
    start, end = result.eval_history[0], result.eval_history[-1]
    assert (start["step"], end["step"]) == (0, 30)
    # the held-out loss uses fixed noise and sigmas, so any drop is real (not a luckier draw)
    assert end["eval_loss"] < factor * start["eval_loss"], result.eval_history
    assert result.weights.is_file() and (tmp_path / "loss.png").is_file()
    if mode == "lora":
        assert read_lora(result.weights).modules  # a LoRA file in our ComfyUI format
        meta = read_lora(result.weights).metadata
        assert json.loads(meta["dit_distillery.training"])["mode"] == "lora"


class _StopAt(Callbacks):
    def __init__(self, at):
        self.at, self.step = at, 0

    def on_step(self, info):
        self.step = info.step

    def stop(self):
        return self.step >= self.at


def test_resume_continues_bit_for_bit(tmp_path):
    unbroken = train(make_job(tmp_path / "a", steps=6, output={"save_every": 2}))
    stopper = _StopAt(3)
    with pytest.raises(StopRequested):
        train(make_job(tmp_path / "b", steps=6, output={"save_every": 2}), callbacks=stopper, stop=stopper.stop)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "checkpoint-0000003"
    resumed = train(make_job(tmp_path / "b", steps=6, output={"save_every": 2}, resume="auto"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in unbroken.history]
    a, b = load_file(str(unbroken.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_job(tmp_path):
    train(make_job(tmp_path, steps=2, output={"save_every": 1}))
    from dit_distillery.errors import DistilleryError
    with pytest.raises(DistilleryError, match="different job"):
        train(make_job(tmp_path, steps=4, optim={"lr": 5e-4}, resume="auto"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = FlowMatchingLoss.__call__

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss, logs = original(self, *args, **kwargs)
        return (loss * float("nan") if calls["n"] >= 5 else loss), logs

    monkeypatch.setattr(FlowMatchingLoss, "__call__", poisoned)
    with pytest.raises(TrainingDiverged, match="lr"):
        train(make_job(tmp_path, steps=8, output={"save_every": 2}))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-0000002", "checkpoint-0000004"]


def test_killed_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    job = make_job(tmp_path / "run", steps=400, output={"save_every": 1, "keep_last": 2})
    job_path = job.save(tmp_path / "job.json")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dit_distillery", "train", str(job_path), "--quiet"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(ckpts)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = latest_checkpoint(ckpts)
    assert last is not None
    step = int(last.name.split("-")[1])
    for p in list_checkpoints(ckpts):  # every checkpoint that looks complete is complete and loadable
        assert {f.name for f in p.iterdir()} >= {"state.json", "trainable.safetensors", "optimizer.safetensors"}
        load_file(str(p / "trainable.safetensors"))
    job.steps, job.resume = step + 2, "auto"
    job.output.save_every = 0
    result = train(job)
    assert result.steps == step + 2 and len(result.history) == step + 2


def test_two_processes_equal_one_with_the_doubled_batch(tmp_path):
    """DDP over gloo (2 CPU processes, batch 2 each) ends with identical weights on both ranks, equal to one
    process with batch 4. The 4-sample dataset makes every step one epoch, so both runs see the same samples."""
    common = dict(steps=3, data={"synthetic": {"count": 4, "size": 32}}, optim={"lr": 1e-3, "grad_clip": None},
                  output={"save_dtype": "fp32"})
    single = train(make_job(tmp_path / "one", batch_size=4, **common))
    job = make_job(tmp_path / "two", batch_size=2, **common)
    job_path = job.save(tmp_path / "job2.json")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "dit_distillery", "train", str(job_path), "--json", "--quiet"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # one report per job
    assert reports[0]["data"]["ranks_identical"] is True
    a, b = load_file(str(single.weights)), load_file(reports[0]["weights"])
    # Gradients summed in another order differ by float rounding; Adam's m/sqrt(v) turns that into up to a few
    # percent of one lr-sized step for near-zero gradients. So: within a tenth of the learning rate.
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=0), k
    assert reports[0]["final_loss"] == pytest.approx(single.history[-1]["loss"], rel=1e-5)
