"""Validation's teacher column shows the job's teacher: `model.teacher` when given, at the teacher steps/CFG
training sees (the rows' from Generate Distill Dataset, DMD's teacher_cfg); the student column samples on the
loss's own schedule template (e.g. Lightning's) so validation shows what training targets."""

import pytest
import torch

from dit_distillery import tiny
from dit_distillery.losses import loss_from_dict
from dit_distillery.pipelines.base import TextToImagePipeline
from dit_distillery.schedule import sigmas as template_sigmas
from dit_distillery.trainer import train
from dit_distillery.trainer.validation import student_sigmas, teacher_settings
from tests.trainer_helpers import make_job

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory):
    from dit_distillery.gen_dataset import generate_distill_dataset

    folder = tmp_path_factory.mktemp("ds")
    generate_distill_dataset(tiny.tiny_pipeline("aaadit", seed=0), PROMPTS, folder, teacher_steps=6, teacher_cfg=2.0,
                             student_steps=2, height=32, width=32)
    return folder


def _recorded_samples(monkeypatch):
    calls = []
    original = TextToImagePipeline.sample

    def sample(self, prompts, **kw):
        calls.append({"dit": self.dit, **kw})
        return original(self, prompts, **kw)

    monkeypatch.setattr(TextToImagePipeline, "sample", sample)
    return calls


def test_teacher_column_is_model_teacher_at_the_rows_settings_and_student_on_the_loss_template(
        tmp_path, distill_data, monkeypatch):
    from dit_distillery.models.registry import save_dit

    other = save_dit(tiny.tiny_pipeline("aaadit", seed=5).dit, tmp_path / "teacher.safetensors")
    loss = {"kind": "direct_distill", "template": "Qwen-Image-Lightning"}
    job = make_job(tmp_path / "run", mode="lora", steps=1, lora={"rank": 4}, model={"pipeline": "tiny:aaadit",
                   "teacher": str(other)}, data={"synthetic": None, "path": str(distill_data)}, loss=loss,
                   validation={"prompts": PROMPTS[:1], "seeds": [7]})
    calls = _recorded_samples(monkeypatch)
    result = train(job)
    teacher_call, student_call = calls[0], calls[-1]
    assert (teacher_call["steps"], teacher_call["cfg_scale"]) == (6, 2.0)  # the rows' teacher settings
    assert "sigmas" not in teacher_call  # the teacher samples on its family's schedule
    # it is model.teacher's DiT (seed 5), not the student's base (seed 0)
    used = teacher_call["dit"].state_dict()
    for seed, same in ((5, True), (0, False)):
        ref = tiny.tiny_pipeline("aaadit", seed=seed).dit.state_dict()
        assert all(torch.equal(used[k].float(), ref[k].float()) for k in ref) is same
    # the student: 2 steps (the rows'), on Lightning's schedule, as Direct Distill trained it
    shape = tiny.tiny_pipeline("aaadit", seed=0).latent_shape(32, 32)
    want = loss_from_dict(loss).student_sigmas("aaadit", 2, torch.empty(1, *shape))
    assert student_call["sigmas"] == want and want != template_sigmas("FLUX.2", 2, image_seq_len=4)
    assert result.validation and (tmp_path / "run" / "validation" / "teacher" / "000.png").is_file()


def test_teacher_settings_order():
    pipe = tiny.tiny_pipeline("aaadit", seed=0)
    dmd = loss_from_dict({"kind": "dmd", "teacher_cfg": 3.0})
    job = make_job("unused")
    assert (teacher_settings(job, pipe, dmd)["steps"], teacher_settings(job, pipe, dmd)["cfg_scale"]) == (50, 3.0)
    job = make_job("unused", validation={"teacher_steps": 9, "teacher_cfg": 1.5})
    assert (teacher_settings(job, pipe, dmd)["steps"], teacher_settings(job, pipe, dmd)["cfg_scale"]) == (9, 1.5)
    plain = loss_from_dict({"kind": "direct_distill"})
    assert student_sigmas(plain, pipe, {"height": 32, "width": 32, "steps": 2}) is None
    assert student_sigmas(loss_from_dict({"kind": "flow_matching"}), pipe, {"height": 32, "width": 32,
                                                                             "steps": 2}) is None
