"""Trainer options beyond the basics: LR schedules, EMA, preset/initial LoRAs, offload, Adafactor, distillation
validation with the teacher beside the student."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dit_distillery.gen_dataset import generate_distill_dataset
from dit_distillery.lora import add_lora, read_lora, save_lora
from dit_distillery.tiny import tiny_pipeline
from dit_distillery.trainer import TrainJob, train
from dit_distillery.trainer.loop import lr_factor
from dit_distillery.trainer.state import load_checkpoint

from tests.trainer_helpers import make_job


def test_lr_schedules():
    job = TrainJob.from_dict({"data": {"synthetic": {}}, "steps": 100,
                              "optim": {"warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1}})
    assert lr_factor(job, 0) == pytest.approx(0.1) and lr_factor(job, 9) == pytest.approx(1.0)
    assert lr_factor(job, 10) == pytest.approx(1.0) and lr_factor(job, 100) == pytest.approx(0.1)
    assert lr_factor(job, 55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    job.optim.schedule = "constant"
    assert lr_factor(job, 50) == 1.0


def test_ema_offload_adafactor_run_and_ema_is_saved(tmp_path):
    result = train(make_job(tmp_path, steps=3, ema_decay=0.9, checkpoint_offload=True,
                            optim={"name": "adafactor", "lr": 1e-3}, output={"save_every": 3}))
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["ema"] is not None and ckpt["ema"].keys() == ckpt["trainable"].keys()
    k = next(iter(ckpt["ema"]))
    assert not torch.equal(ckpt["ema"][k], ckpt["trainable"][k])  # the shadow lags the weights


def test_preset_lora_is_merged_and_init_lora_continues(tmp_path):
    pipe = tiny_pipeline("aaadit")
    add_lora(pipe.dit, "aaadit_attn", rank=2)
    with torch.no_grad():
        for n, p in pipe.dit.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    save_lora(pipe.dit, tmp_path / "preset.safetensors")

    # init_from: the run starts from the file's adapters (same modules, same rank)
    result = train(make_job(tmp_path / "init", mode="lora", steps=1, optim={"lr": 1e-12, "grad_clip": None},
                            lora={"init_from": str(tmp_path / "preset.safetensors")}, output={"save_dtype": "fp32"}))
    start, end = read_lora(tmp_path / "preset.safetensors"), read_lora(result.weights)
    assert start.modules.keys() == end.modules.keys()
    for name, m in start.modules.items():
        assert torch.allclose(m.down, end.modules[name].down, atol=1e-6)

    # preset: merged into the base before a fresh LoRA is trained; the job records it
    result = train(make_job(tmp_path / "preset", mode="lora", steps=1, lora={"rank": 2, "targets": "aaadit_attn",
                                                                             "preset": str(tmp_path / "preset.safetensors")}))
    meta = json.loads(read_lora(result.weights).metadata["dit_distillery.training"])
    assert meta["mode"] == "lora"
    job = json.loads((tmp_path / "preset" / "job.json").read_text())
    assert job["lora"]["preset"].endswith("preset.safetensors")


def test_distillation_validation_shows_teacher_and_student(tmp_path):
    teacher = tiny_pipeline("aaadit")
    generate_distill_dataset(teacher, ["a red circle on a blue background", "a green square on a white background"],
                             tmp_path / "data", teacher_steps=4, teacher_cfg=2.0, height=32, width=32, student_steps=2)
    job = make_job(tmp_path / "run", mode="lora", steps=2, lora={"rank": 2},
                   data={"path": str(tmp_path / "data"), "synthetic": None},
                   loss={"kind": "direct_distill"},
                   validation={"prompts": ["a red circle on a blue background"], "seeds": [0, 1], "teacher_steps": 4,
                               "teacher_cfg": 2.0, "eval_samples": 2})
    result = train(job)
    assert len(result.validation) == 1 and result.validation[0].is_file()
    from PIL import Image
    grid = Image.open(result.validation[0])
    assert grid.width > 2 * 128  # two image columns: teacher | student
    assert (tmp_path / "run" / "validation" / "teacher" / "teacher.json").is_file()
    assert [e["step"] for e in result.eval_history] == [0, 2]


def test_lora_init_follows_the_job_seed_not_the_global_rng(tmp_path):
    """The same job gives the same adapters whatever state torch's global RNG is in (ComfyUI's process)."""
    torch.manual_seed(123)
    a = train(make_job(tmp_path / "a", mode="lora", steps=1, lora={"rank": 2}, output={"save_dtype": "fp32"}))
    torch.manual_seed(456)
    state = torch.get_rng_state()
    b = train(make_job(tmp_path / "b", mode="lora", steps=1, lora={"rank": 2}, output={"save_dtype": "fp32"}))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is given back untouched
    wa, wb = read_lora(a.weights), read_lora(b.weights)
    assert all(torch.equal(wa.modules[n].down, wb.modules[n].down) for n in wa.modules)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    eager = train(make_job(tmp_path / "eager", steps=2, output={"save_dtype": "fp32"}))
    compiled = train(make_job(tmp_path / "compiled", steps=2, compile=True, output={"save_dtype": "fp32"}))
    assert compiled.history[0]["loss"] == pytest.approx(eager.history[0]["loss"], rel=1e-4)
    a, b = load_file(str(eager.weights)), load_file(str(compiled.weights))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
