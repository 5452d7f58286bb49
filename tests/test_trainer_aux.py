"""The loss protocol for trainables of the loss's own (trainer.setup): setup, before_step on the run's data stream,
state in the checkpoint (safetensors + JSON) and an exact resume; the history callbacks."""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.losses import FlowMatchingLoss
from dit_distillery.trainer import Callbacks, Trainer
from dit_distillery.trainer.checkpoints import flatten_state, unflatten_state
from tests.trainer_helpers import make_job


@dataclass
class AuxLoss(FlowMatchingLoss):
    """Flow matching for the student, plus a small vector of its own trained twice per student update."""

    def setup(self, ctx):
        self.w = torch.zeros(3, device=ctx.device, requires_grad=True)
        self.opt = torch.optim.AdamW([self.w], lr=0.1)
        self.updates, self.student_params = 0, len(ctx.model.params())

    def before_step(self, step, next_batch):
        for _ in range(2):
            batch, rng = next_batch()
            noise = torch.randn(3, generator=rng.generator(0, "aux"))
            ((self.w - batch["latents"].float().mean() - noise) ** 2).sum().backward()
            self.opt.step()
            self.opt.zero_grad()
            self.updates += 1

    def state_dict(self):
        return {"w": self.w.detach().clone(), "optimizer": self.opt.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


class _Record(Callbacks):
    def __init__(self, stop_at=None):
        self.stop_at, self.step, self.histories = stop_at, 0, []

    def on_history(self, history):
        self.histories.append([h["step"] for h in history])

    def on_step(self, info):
        self.step = info.step

    def stop(self):
        return self.stop_at is not None and self.step >= self.stop_at


def _run(out, loss=None, stop_at=None, **job):
    record = _Record(stop_at)
    trainer = Trainer(make_job(out, **{"steps": 4, "output": {"save_every": 2}, **job}), callbacks=record,
                      stop=record.stop)
    if loss is not None:
        trainer.loss = loss
    return trainer, record, trainer.run


def test_auxiliary_trainables_resume_exactly(tmp_path):
    unbroken, record, run = _run(tmp_path / "a", AuxLoss())
    full = run()
    assert unbroken.loss.updates == 8 and unbroken.state.epoch >= 2  # 3 batches a step: the draws move the data
    assert unbroken.loss.student_params > 0 and record.histories == [[]]
    stopped, _, run = _run(tmp_path / "b", AuxLoss(), stop_at=2)
    with pytest.raises(StopRequested):
        run()
    resumed, record, run = _run(tmp_path / "b", AuxLoss(), resume="auto")
    again = run()
    assert record.histories == [[1, 2]]  # the earlier steps, through the callbacks
    assert [h["loss"] for h in again.history] == [h["loss"] for h in full.history]
    assert resumed.loss.updates == 8 and torch.equal(resumed.loss.w, unbroken.loss.w)
    a, b = unbroken.loss.opt.state_dict()["state"][0], resumed.loss.opt.state_dict()["state"][0]
    assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    x, y = load_file(str(full.weights)), load_file(str(again.weights))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_refuses_a_checkpoint_without_the_loss_state(tmp_path):
    _, _, run = _run(tmp_path)
    run()
    _, _, run = _run(tmp_path, AuxLoss(), resume="auto")
    with pytest.raises(DistilleryError, match="state of the loss"):
        run()


def test_loss_state_round_trip_keeps_key_types():
    state = {"opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.99),
                                                                                  "params": [0], "fused": None}]},
             "w": [torch.arange(4), torch.ones(2, dtype=torch.bfloat16)], "n": 5, "name": "x"}
    tensors = {}
    back = unflatten_state(json.loads(json.dumps(flatten_state(state, tensors))), tensors)  # as in state.json
    assert back["opt"]["state"][0]["step"] == 3.0 and list(back["opt"]["state"]) == [0]
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99) and back["n"] == 5 and back["name"] == "x"
    assert torch.equal(back["w"][0], torch.arange(4)) and back["w"][1].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="set"):
        flatten_state({"bad": {1, 2}}, {})
