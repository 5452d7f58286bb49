import copy

import pytest
import torch

from dit_distillery.errors import DistilleryError
from dit_distillery.lora import (add_lora, load_lora_into, lora_weights_of, merge_lora, read_lora, save_lora)
from dit_distillery.models.aaadit import AAADiT, tiny_config


def _model():
    torch.manual_seed(0)
    return AAADiT(**tiny_config()).eval()


def _inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 16, 4, 4, generator=g), torch.randn(b, 5, 32, generator=g), torch.tensor([900.0, 300.0][:b]))


def _randomise_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def test_saved_lora_applied_like_comfyui_equals_peft(tmp_path):
    base = _model()
    adapted = copy.deepcopy(base)
    names = add_lora(adapted, "aaadit", rank=4, alpha=8)
    assert names and all(p.dtype == torch.float32 for n, p in adapted.named_parameters() if "lora_" in n)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == \
        {n for n, _ in adapted.named_parameters() if "lora_" in n}
    _randomise_lora(adapted)
    path = save_lora(adapted, tmp_path / "l.safetensors", {"note": "x"})

    from safetensors.torch import load_file
    sd = load_file(str(path))
    mod = names[0]
    assert {f"{mod}.lora_A.weight", f"{mod}.lora_B.weight", f"{mod}.alpha"} <= set(sd)
    assert sd[f"{mod}.alpha"].item() == 8.0

    # ComfyUI applies W + alpha/rank * up @ down with the saved tensors, by hand:
    comfy = copy.deepcopy(base)
    modules = dict(comfy.named_modules())
    with torch.no_grad():
        for n in names:
            up, down, alpha = sd[f"{n}.lora_B.weight"], sd[f"{n}.lora_A.weight"], sd[f"{n}.alpha"].item()
            modules[n].weight += alpha / down.shape[0] * up @ down
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(comfy(*x), adapted(*x), atol=1e-5)
        merged = copy.deepcopy(base)
        assert merge_lora(merged, read_lora(path)) == len(names)
        assert torch.allclose(merged(*x), adapted(*x), atol=1e-5)
        half = copy.deepcopy(base)
        merge_lora(half, read_lora(path), strength=0.5)
        assert not torch.allclose(half(*x), merged(*x), atol=1e-4)


def test_load_lora_into_continues_training_from_file(tmp_path):
    adapted = _model()
    add_lora(adapted, "aaadit_attn", rank=2)
    _randomise_lora(adapted)
    path = save_lora(adapted, tmp_path / "l.safetensors")
    fresh = _model()
    load_lora_into(fresh, read_lora(path))
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(fresh(*x), adapted(*x), atol=1e-6)
    assert all(p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)


def test_reads_diffsynth_and_prefixed_files(tmp_path):
    from safetensors.torch import save_file
    down, up = torch.randn(2, 64), torch.randn(64, 2)
    save_file({"diffusion_model.blocks.0.to_q.lora_A.default.weight": down,
               "diffusion_model.blocks.0.to_q.lora_B.default.weight": up}, str(tmp_path / "ds.safetensors"))
    w = read_lora(tmp_path / "ds.safetensors")
    assert list(w.modules) == ["blocks.0.to_q"] and w.modules["blocks.0.to_q"].alpha == 2.0  # no alpha: scale 1


def test_lora_errors(tmp_path):
    with pytest.raises(DistilleryError, match="lora_targets"):
        add_lora(_model(), "to_nothing", rank=2)
    from safetensors.torch import save_file
    save_file({"blocks.0.nope.lora_A.weight": torch.randn(2, 64), "blocks.0.nope.lora_B.weight": torch.randn(64, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(DistilleryError, match="does not have"):
        merge_lora(_model(), read_lora(tmp_path / "other.safetensors"))
    save_file({"x.weight": torch.randn(2)}, str(tmp_path / "nolora.safetensors"))
    with pytest.raises(DistilleryError, match="no LoRA"):
        read_lora(tmp_path / "nolora.safetensors")
