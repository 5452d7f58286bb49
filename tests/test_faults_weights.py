"""Fault suite: weights that do not fit, weights that are not finite, sizes that cannot fit in memory.

Each fault must end in a DistilleryError that names the field, the file, the tensor and the fix, before any work
or write, and a diverging training run must leave a checkpoint that resumes (issue 9, section 3).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_distillery import tiny, weights_check
from dit_distillery.errors import DistilleryError
from dit_distillery.formats import TensorSource
from dit_distillery.lora import add_lora, save_lora
from dit_distillery.models import qwen_image, registry
from dit_distillery.student import load_student
from dit_distillery.trainer import TrainingDiverged, train
from dit_distillery.trainer.state import (is_good, last_good_checkpoint, list_checkpoints, load_checkpoint,
                                          mark_not_good, prune_checkpoints, save_checkpoint)
from tests.trainer_helpers import make_job


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    """The tiny pipeline's own DiT saved in our format (width 64, 2 blocks), and its tensors."""
    path = tmp_path_factory.mktemp("dit") / "student.safetensors"
    registry.save_dit(tiny.tiny_pipeline("aaadit").dit, path)
    with TensorSource(path) as src:
        return path, {k: src.get(k) for k in src.keys()}, dict(src.metadata)


def _lora_file(path, **dit_overrides):
    model = tiny.tiny_aaadit(32, 128, **dit_overrides)
    add_lora(model, "aaadit", rank=4)
    return save_lora(model, path)


# ----------------------------------------------------------------------------------------------------------
# Shapes

def test_dit_whose_tensor_does_not_fit_names_tensor_shapes_and_file_before_reading_data(dit_file, tmp_path,
                                                                                     monkeypatch):
    _, state, meta = dit_file
    bad = tmp_path / "edited.safetensors"
    state = dict(state, **{"blocks.0.ff.0.weight": torch.zeros(193, 64)})
    save_file(state, str(bad), meta)

    def no_data(*_):
        raise AssertionError("tensor data was read before the shapes were checked")

    monkeypatch.setattr(TensorSource, "get", no_data)
    with pytest.raises(DistilleryError) as info:
        load_student("tiny", weights=bad)
    e = info.value
    assert e.field == "dit" and e.value == str(bad)
    assert "1 of 44 tensors" in e.problem and "'blocks.0.ff.0.weight': [193, 64] in the file, [192, 64]" in e.problem
    assert "metadata" in e.fix


def test_dit_with_missing_and_unexpected_tensors_counts_them(dit_file, tmp_path):
    _, state, meta = dit_file
    bad = tmp_path / "partial.safetensors"
    state = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(bad), meta)
    with pytest.raises(DistilleryError) as info:
        registry.load_dit(bad, field="weights")
    missing = sum(1 for k in dit_file[1] if k.startswith("blocks.1."))
    assert info.value.field == "weights"
    assert f"{missing} tensors the aaadit model" in info.value.problem and "'extra.weight'" in info.value.problem


def test_diffusers_folder_whose_config_disagrees_with_its_weights(tmp_path):
    from dit_distillery.pipelines.loading import load_dit

    folder = tmp_path / "transformer"
    tiny.tiny_qwen_image_dit().save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = 2  # width 32 instead of 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DistilleryError) as info:
        load_dit(folder)
    assert info.value.field == "dit" and "wrong shape" in info.value.problem and "config.json" in info.value.fix


def test_vae_file_of_another_size(tmp_path):
    from dit_distillery.pipelines.loading import load_vae

    vae = tiny.tiny_qwen_image_vae()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    key = next(k for k, v in state.items() if v.ndim == 5)
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(DistilleryError) as info:
        load_vae(tmp_path / "vae.safetensors", "qwen_image", config_dir=tmp_path / "vae")
    assert info.value.field == "vae" and repr(key) in info.value.problem


@pytest.mark.parametrize("merge", [True, False])
def test_lora_of_another_width_names_file_module_count_and_width(tmp_path, merge):
    path = _lora_file(tmp_path / "wide.safetensors", width=128)
    with pytest.raises(DistilleryError) as info:
        load_student("tiny", lora=path, merge=merge)
    e = info.value
    assert e.field == "lora" and e.value == str(path)
    assert "14 of 14 LoRA modules have the wrong shape, first 'blocks.0.ff.0': [384, 128] in the file, [192, 64]" \
        in e.problem
    assert "trained for a model with width 128 but the model has 64" in e.fix


def test_lora_for_more_blocks(tmp_path):
    path = _lora_file(tmp_path / "deep.safetensors", num_blocks=3)
    with pytest.raises(DistilleryError) as info:
        load_student("tiny", lora=path)
    assert "LoRA modules have no place in the model (e.g. 'blocks.2." in info.value.problem
    assert "layers this model does not have" in info.value.fix


# ----------------------------------------------------------------------------------------------------------
# Memory

def _little_memory(monkeypatch, nbytes=4096):
    monkeypatch.setattr(weights_check, "available_memory", lambda device: nbytes)


def test_sample_that_cannot_fit_is_refused_from_the_estimate(monkeypatch):
    pipe = tiny.tiny_pipeline("aaadit")
    assert pipe.sample("a red circle", height=32, width=32, steps=1, output="latent").latents.shape[0] == 1
    with pytest.raises(DistilleryError) as info:  # the real free memory: 2 TB of pixels fit nowhere
        tiny.embedded_default_pipeline().sample("a red circle", height=65536, width=65536, steps=1)
    assert info.value.field == "size" and "65536x65536" in str(info.value) and "refused before" in info.value.problem
    _little_memory(monkeypatch)
    with pytest.raises(DistilleryError) as info:
        pipe.sample("a red circle", height=32, width=32, steps=1, output="latent")
    e = info.value
    assert e.field == "size" and e.value == "32x32" and "4.0 KiB of available RAM" in e.problem
    assert "smaller size (e.g. 16x16)" in e.fix


def test_estimate_grows_with_size_batch_and_guidance():
    pipe = tiny.tiny_pipeline("qwen_image")
    small = pipe.memory_needed(1, 1, 64, 64, False)["cpu"]
    assert pipe.memory_needed(1, 1, 128, 128, False)["cpu"] > 3 * small
    assert pipe.memory_needed(2, 2, 64, 64, False)["cpu"] > small
    assert pipe.memory_needed(1, 1, 64, 64, True)["cpu"] > small
    assert pipe.memory_needed(1, 1, 64, 64, False, "latent")["cpu"] < small


@pytest.mark.parametrize("preset", ["qwen-image-tiny", "aaadit-tiny"])
def test_closed_form_training_activations_are_a_close_lower_bound_of_the_measured(preset):
    from dit_distillery import report

    family, config = report.PRESETS[preset]
    r = report.size_report(preset, height=256, width=256, batch=2)
    tokens = r["setting"]["image_tokens"] + r["setting"]["text_tokens"]
    for checkpointing, key in ((True, "checkpointing_bytes"), (False, "no_checkpointing_bytes")):
        estimate = report.training_activation_bytes(family, config, batch=2, tokens=tokens, checkpointing=checkpointing)
        assert 1.0 <= r["activations"]["full"][key] / estimate <= 1.6, (checkpointing, estimate)


def test_training_size_that_cannot_fit_is_refused_before_any_data_work(tmp_path, monkeypatch):
    _little_memory(monkeypatch)
    with pytest.raises(DistilleryError) as info:
        train(make_job(tmp_path, steps=2))
    assert info.value.field == "data.height/width" and info.value.value == "32x32"
    assert "batches of 2" in info.value.problem and "smaller batch_size" in info.value.fix
    assert not (tmp_path / "cache").exists() and not (tmp_path / "synthetic").exists()
    assert not (tmp_path / "job.json").exists()


# ----------------------------------------------------------------------------------------------------------
# Non-finite weights

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_is_finite_finds_nan_and_inf_in_every_dtype(dtype):
    t = torch.randn(64, 8).to(dtype)
    assert weights_check.is_finite(t)
    bad = t.view(torch.uint8).clone()
    bad.view(dtype)[3, 5] = float("nan")
    assert not weights_check.is_finite(bad.view(dtype)) and weights_check.count_nonfinite(bad.view(dtype)) == 1
    if dtype != torch.float8_e4m3fn:  # e4m3fn has no infinity
        for value in (float("inf"), float("-inf")):
            bad = t.clone()
            bad[0, 0] = value
            assert not weights_check.is_finite(bad)


def test_load_student_refuses_a_nan_dit_naming_the_tensor(dit_file, tmp_path):
    _, state, meta = dit_file
    bad = tmp_path / "nan.safetensors"
    poisoned = state["blocks.1.to_q.weight"].clone()
    poisoned[0, :3] = float("nan")
    save_file(dict(state, **{"blocks.1.to_q.weight": poisoned}), str(bad), meta)
    with pytest.raises(DistilleryError) as info:
        load_student("tiny", weights=bad)
    e = info.value
    assert e.field == "dit" and e.value == str(bad)
    assert "'blocks.1.to_q.weight' holds 3 NaN/inf values" in e.problem and "earlier checkpoint" in e.fix


def test_load_student_refuses_an_inf_lora(tmp_path):
    path = _lora_file(tmp_path / "lora.safetensors")
    sd = load_file(str(path))
    key = sorted(k for k in sd if k.endswith("lora_B.weight"))[0]
    sd[key][0, 0] = float("inf")
    save_file(sd, str(path))
    with pytest.raises(DistilleryError) as info:
        load_student("tiny", lora=path)
    assert info.value.field == "lora" and f"{key!r} holds 1 NaN/inf" in info.value.problem


def test_shrink_refuses_a_source_with_an_inf_tensor_and_writes_nothing(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    from dit_distillery.shrink import shrink

    torch.manual_seed(0)
    state = {k: v.detach().contiguous() for k, v in
             QwenImageTransformer2DModel(**qwen_image.tiny_config(num_layers=3)).state_dict().items()}
    key = "transformer_blocks.2.img_mlp.net.2.weight"
    state[key][1, 1] = float("-inf")
    source = tmp_path / "src.safetensors"
    save_file(state, str(source))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DistilleryError) as info:
        shrink(source, out / "student.safetensors", layers=2)
    assert info.value.field == "source" and info.value.value == str(source) and repr(key) in info.value.problem
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# Training: only good checkpoints are kept and resumed from

def _poison_weights_at(monkeypatch, step, how):
    """Make AdamW's `step`-th update leave the weights `how`(params) (NaN or a blow-up)."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                how([p for group in self.param_groups for p in group["params"]])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


def _all_finite(checkpoint):
    return all(weights_check.is_finite(t) for t in load_file(str(checkpoint / "trainable.safetensors")).values())


def test_nan_weights_are_never_checkpointed_and_the_run_resumes_from_the_last_good(tmp_path, monkeypatch):
    def nan(params):
        params[0][0].fill_(float("nan"))

    _poison_weights_at(monkeypatch, 4, nan)
    with pytest.raises(TrainingDiverged) as info:
        train(make_job(tmp_path, steps=6, output={"save_every": 2}))
    assert info.value.field == "weights" and "at step 4" in info.value.problem
    assert "checkpoint-0000002" in info.value.problem and "resume" in info.value.problem
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["checkpoint-0000002"] and _all_finite(kept[0])
    assert json.loads((kept[0] / "state.json").read_text())["finite"] is True
    monkeypatch.undo()
    result = train(make_job(tmp_path, steps=6, output={"save_every": 2}, resume="auto"))
    assert result.steps == 6 and len(result.history) == 6


def test_blown_up_weights_unmark_their_checkpoint_and_pruning_keeps_the_last_good(tmp_path, monkeypatch):
    """Finite but huge weights (~1e30) pass the save check; the loss they give next is not finite, so their
    checkpoint is marked not good, and keep_last=1 has not pruned the good one before it."""
    def blow_up(params):
        for p in params:
            p.mul_(1e30)

    _poison_weights_at(monkeypatch, 2, blow_up)
    job = dict(steps=4, output={"save_every": 1, "keep_last": 1})
    with pytest.raises(TrainingDiverged) as info:
        train(make_job(tmp_path, **job))
    assert info.value.field == "loss" and "at step 3" in info.value.problem
    assert "checkpoint-0000001" in info.value.problem
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint-0000001", "checkpoint-0000002"]
    state2 = json.loads((ckpts / "checkpoint-0000002" / "state.json").read_text())
    assert state2["finite"] is False and "step 3" in state2["not_good"]
    assert last_good_checkpoint(ckpts).name == "checkpoint-0000001" and _all_finite(ckpts / "checkpoint-0000001")
    monkeypatch.undo()
    messages = []

    from dit_distillery.trainer import Callbacks

    class Log(Callbacks):
        def on_message(self, text):
            messages.append(text)

    result = train(make_job(tmp_path, resume="auto", **job), callbacks=Log())
    assert result.steps == 4 and any("resuming from checkpoint-0000001" in m for m in messages)
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint-0000004"] and is_good(ckpts / "checkpoint-0000004")


def test_pruning_never_deletes_the_newest_good_checkpoint_and_loading_refuses_nan(tmp_path):
    params = {"w": torch.ones(2, 2)}
    opt = {"state": {}, "param_groups": [{"params": [0]}]}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, params, opt, {"finite": True})
    mark_not_good(tmp_path / "checkpoint-0000003", "test")
    mark_not_good(tmp_path / "checkpoint-0000002", "test")
    prune_checkpoints(tmp_path, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000001", "checkpoint-0000003"]
    bad = save_checkpoint(tmp_path, 4, {"w": torch.full((2, 2), float("nan"))}, opt, {})
    with pytest.raises(DistilleryError) as info:
        load_checkpoint(bad)
    assert info.value.field == "resume" and "'w' holds 4 NaN/inf" in info.value.problem
