import pytest
import torch

from dit_distillery.errors import DistilleryError
from dit_distillery.lora import add_lora, save_lora
from dit_distillery.models.registry import load_dit
from dit_distillery.student import comfy_loadable, export_comfy, load_student
from dit_distillery.tiny import tiny_pipeline


def _trained_lora(pipe, path):
    import copy
    dit = copy.deepcopy(pipe.dit)
    add_lora(dit, "aaadit", rank=4, alpha=8)
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    save_lora(dit, path)
    return dit


def test_merged_and_unmerged_student_match_the_adapted_model(tmp_path):
    base = tiny_pipeline("aaadit")
    before = {k: v.clone() for k, v in base.dit.state_dict().items()}
    adapted = _trained_lora(base, tmp_path / "l.safetensors")
    merged = load_student(base, lora=tmp_path / "l.safetensors")
    unmerged = load_student(base, lora=tmp_path / "l.safetensors", merge=False)
    assert all(torch.equal(before[k], v) for k, v in base.dit.state_dict().items())  # the base is untouched
    x = (torch.randn(2, base.codec.latent_channels, 4, 4), torch.tensor([0.9, 0.3]), base.encode_prompts(["a", "b"]))
    from dit_distillery.velocity import predict_velocity
    with torch.no_grad():
        want = predict_velocity(adapted, *x)
        assert torch.allclose(predict_velocity(merged.dit, *x), want, atol=1e-5)
        assert torch.allclose(predict_velocity(unmerged.dit, *x), want, atol=1e-5)
        half = load_student(base, lora=tmp_path / "l.safetensors", strength=0.5, merge=False)
        half_merged = load_student(base, lora=tmp_path / "l.safetensors", strength=0.5)
        assert torch.allclose(predict_velocity(half.dit, *x), predict_velocity(half_merged.dit, *x), atol=1e-5)
        assert not torch.allclose(predict_velocity(half.dit, *x), want, atol=1e-4)
    # exporting the unmerged (strength 0.5) student folds the strength in
    info = export_comfy(half, tmp_path / "s.safetensors", dtype=torch.float32)
    assert info["family"] == "aaadit" and info["comfy_loadable"] is False
    with torch.no_grad():
        assert torch.allclose(predict_velocity(load_dit(tmp_path / "s.safetensors"), *x),
                              predict_velocity(half_merged.dit, *x), atol=1e-5)


def test_full_weights_student_and_comfy_rules(tmp_path):
    from dit_distillery.models.qwen_image import QWEN_IMAGE_CONFIG, tiny_config
    assert comfy_loadable("qwen_image", dict(QWEN_IMAGE_CONFIG, num_layers=20))[0]
    ok, why = comfy_loadable("qwen_image", dict(QWEN_IMAGE_CONFIG, num_attention_heads=12))
    assert not ok and "num_attention_heads" in why
    assert not comfy_loadable("qwen_image", tiny_config())[0]

    base = tiny_pipeline("qwen_image")
    from dit_distillery.models.registry import save_dit
    other = tiny_pipeline("qwen_image", seed=7).dit
    save_dit(other, tmp_path / "student.safetensors")
    student = load_student(base, weights=tmp_path / "student.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(student.dit.state_dict().values(), other.state_dict().values()))
    assert student.sample("a red circle", steps=2, height=32, width=32).images


def test_bad_inputs(tmp_path):
    with pytest.raises(DistilleryError, match="strength"):
        load_student("tiny", strength="strong")
    with pytest.raises(DistilleryError):
        load_student("tiny", lora=tmp_path / "missing.safetensors")


def test_cli_load_student(tmp_path):
    import json
    import subprocess
    import sys
    base = tiny_pipeline("aaadit")
    _trained_lora(base, tmp_path / "l.safetensors")
    from dit_distillery.cli import main
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["load-student", "--base", "tiny", "--lora", str(tmp_path / "l.safetensors"), "--prompt", "a red circle",
                   "--steps", "2", "--out", str(tmp_path / "s.png"), "--export-comfy", str(tmp_path / "s.safetensors"),
                   "--json"])
    assert rc == 0
    report = json.loads(buf.getvalue())
    assert report["export"]["comfy_loadable"] is False and (tmp_path / "s.png").is_file()
