"""DMD and Trajectory losses through `train(job)`: the fake score's LoRA and AdamW state in checkpoints (a stopped
and resumed DMD run equals an unbroken one bit for bit), the exported student without the fake adapter, full
training with a copied teacher, and a Generate Distill Dataset folder with trajectories feeding the Trajectory loss."""

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.errors import StopRequested
from dit_distillery.losses_dmd import FAKE_ADAPTER
from dit_distillery.trainer import Callbacks, train
from dit_distillery.trainer.state import latest_checkpoint
from tests.trainer_helpers import make_job

DMD = {"kind": "dmd", "steps": 2, "fake_updates": 2, "fake_rank": 4, "teacher_cfg": 2.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _StopAt(Callbacks):
    def __init__(self, at):
        self.at, self.step = at, 0

    def on_step(self, info):
        self.step = info.step

    def stop(self):
        return self.step >= self.at


def _dmd_job(out, **overrides):
    spec = dict(mode="lora", steps=4, loss=DMD, lora={"rank": 4}, optim={"lr": 1e-3}, output={"save_every": 2})
    return make_job(out, **{**spec, **overrides})


def test_dmd_lora_run_resumes_exactly_with_its_fake_score(tmp_path):
    unbroken = train(_dmd_job(tmp_path / "a"))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in unbroken.history)
    stopper = _StopAt(2)
    with pytest.raises(StopRequested):
        train(_dmd_job(tmp_path / "b"), callbacks=stopper, stop=stopper.stop)
    checkpoint = latest_checkpoint(tmp_path / "b" / "checkpoints")
    saved = load_file(str(checkpoint / "loss.safetensors"))
    assert saved and not any(FAKE_ADAPTER in k for k in load_file(str(checkpoint / "trainable.safetensors")))
    resumed = train(_dmd_job(tmp_path / "b", resume="auto"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in unbroken.history]
    a, b = load_file(str(unbroken.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(FAKE_ADAPTER in k for k in a)  # the student's LoRA file: the fake score is not in it
    plain = train(make_job(tmp_path / "c", mode="lora", steps=1, lora={"rank": 4}))
    assert a.keys() == load_file(str(plain.weights)).keys()


def test_dmd_full_training_keeps_a_teacher_copy(tmp_path):
    result = train(make_job(tmp_path, mode="full", steps=2, loss=dict(DMD, regression_weight=0.5)))
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_trajectory_loss_trains_on_a_recorded_dataset(tmp_path):
    from dit_distillery import tiny
    from dit_distillery.gen_dataset import generate_distill_dataset

    pipe = tiny.tiny_pipeline("aaadit", seed=0)
    generate_distill_dataset(pipe, ["a red circle on a blue background", "a green square on a white background"],
                             tmp_path / "ds", teacher_steps=6, teacher_cfg=2.0, student_steps=2, height=32, width=32,
                             record_trajectory=4)
    job = make_job(tmp_path / "run", mode="lora", steps=3, lora={"rank": 4}, optim={"lr": 1e-2},
                   model={"pipeline": "tiny:aaadit"}, data={"synthetic": None, "path": str(tmp_path / "ds")},
                   loss={"kind": "trajectory"}, validation={"eval_samples": 2})
    result = train(job)
    assert result.eval_history[-1]["eval_loss"] < result.eval_history[0]["eval_loss"]


def test_validation_samples_the_student_at_its_own_steps():
    from dit_distillery import tiny
    from dit_distillery.losses import loss_from_dict
    from dit_distillery.trainer.validation import sample_settings

    pipe = tiny.tiny_pipeline("aaadit", seed=0)
    job = make_job("unused", validation={"cfg": None})
    assert (sample_settings(job, pipe, loss_from_dict(DMD))["steps"], sample_settings(job, pipe, loss_from_dict(DMD))
            ["cfg_scale"]) == (2, 1.0)
    trajectory = loss_from_dict({"kind": "trajectory", "steps": 3, "cfg": 1.5})
    assert (sample_settings(job, pipe, trajectory)["steps"], sample_settings(job, pipe, trajectory)["cfg_scale"]) \
        == (3, 1.5)
    assert loss_from_dict(DMD).unrolled_steps() == 1 and trajectory.unrolled_steps() == 3


def test_dmd_with_a_replaced_dit_needs_and_uses_model_teacher(tmp_path):
    """A student file in place of the pipeline's DiT (e.g. a shrunk one): the teacher must be named; it then
    carries the fake adapter itself (no shared base)."""
    from dit_distillery import tiny
    from dit_distillery.errors import DistilleryError
    from dit_distillery.models.registry import save_dit

    path = save_dit(tiny.tiny_pipeline("aaadit", seed=0).dit, tmp_path / "dit.safetensors")
    with pytest.raises(DistilleryError, match="model.teacher"):
        _dmd_job(tmp_path / "a", steps=1, model={"pipeline": "tiny", "dit": str(path)}).validate()
    assert not (tmp_path / "a").exists()  # refused with the job, before anything
    result = train(_dmd_job(tmp_path / "b", steps=2, model={"pipeline": "tiny", "dit": str(path),
                                                            "teacher": str(path)}))
    assert len(result.history) == 2 and not any(FAKE_ADAPTER in k for k in load_file(str(result.weights)))
