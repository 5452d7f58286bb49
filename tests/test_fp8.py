"""fp8 weight storage (dit_distillery/fp8.py): ComfyUI's plain and scaled fp8 DiT files in both of its layouts,
kept in fp8 or dequantised, the refusals, and `store_in_fp8` for a frozen training base (LoRA on top)."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from dit_distillery import fp8
from dit_distillery.errors import DistilleryError
from dit_distillery.families import flux2, qwen_image, z_image
from dit_distillery.formats import TensorSource
from dit_distillery.models import registry
from dit_distillery.tiny import seeded, tiny_qwen_image_dit

F8 = torch.float8_e4m3fn


def _quantise(w):
    """ComfyUI's scaled fp8 of one weight: (fp8 values, float32 scale max|w| / 448)."""
    scale = w.float().abs().max() / 448
    return (w.float() / scale).to(F8), scale.reshape(())


def _scaled(state, layout="scale_weight"):
    """A state dict in one of ComfyUI's scaled fp8 layouts: every 2-D weight quantised with its scale."""
    out = {"scaled_fp8": torch.empty(0, dtype=F8)} if layout == "scale_weight" else {}
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim == 2:
            q, s = _quantise(v)
            layer = k[: -len(".weight")]
            out[k] = q
            if layout == "scale_weight":
                out[f"{layer}.scale_weight"] = s
                out[f"{layer}.scale_input"] = torch.ones(())  # ComfyUI writes it; only fp8 matmuls use it
            else:
                out[f"{layer}.weight_scale"] = s
                out[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            out[k] = v.contiguous()
    return out


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_image_dit(seed=3)


def _velocity(dit, seed=0):
    from dit_distillery.conditioning import TextEmbeds
    from dit_distillery.velocity import predict_velocity

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    text = TextEmbeds(torch.randn(1, 5, 32, generator=g), None)
    return predict_velocity(dit, latents, torch.tensor([0.6]), text)


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


# ----------------------------------------------------------------------------------------------------------
# DiT files

@pytest.mark.parametrize("layout", ["scale_weight", "comfy_quant"])
def test_scaled_fp8_dit_kept_in_fp8_computes_weight_times_scale(qwen, tmp_path, layout):
    path = tmp_path / "qwen_image_fp8_scaled.safetensors"
    save_file(_scaled(qwen.state_dict(), layout), str(path))
    kept = registry.load_dit(path, dtype=torch.float32)
    plain = registry.load_dit(path, dtype=torch.float32, fp8="dequantise")
    block = kept.transformer_blocks[0].attn.to_q
    assert block.weight.dtype == F8 and block.bias.dtype == torch.float32 and fp8.is_fp8_linear(block)
    assert not any(fp8.is_fp8_linear(m) for m in plain.modules())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    # diffusers' skip patterns (Qwen-Image: norms, pos_embed) stay in the compute dtype
    assert kept.norm_out.linear.weight.dtype == torch.float32
    # the same weights either way (w.to(dtype) * scale), and close to the unquantised model
    torch.testing.assert_close(_velocity(kept), _velocity(plain), rtol=1e-5, atol=1e-5)
    assert _rel(_velocity(kept), _velocity(qwen)) < 0.1
    q, s = _quantise(qwen.state_dict()["transformer_blocks.0.attn.to_q.weight"])
    torch.testing.assert_close(plain.transformer_blocks[0].attn.to_q.weight, q.float() * s)
    from dit_distillery.velocity import model_dtype

    assert model_dtype(kept) == torch.float32 and kept.dtype == torch.float32  # ours and diffusers' ModelMixin.dtype


def test_plain_fp8_file_keeps_fp8_and_default_compute_is_bf16(qwen, tmp_path):
    path = tmp_path / "qwen_image_fp8_e4m3fn.safetensors"
    save_file({k: (v.to(F8) if v.ndim == 2 else v) for k, v in qwen.state_dict().items()}, str(path))
    model = registry.load_dit(path)
    assert model.transformer_blocks[0].img_mlp.net[2].weight.dtype == F8
    assert model.transformer_blocks[0].img_mlp.net[2].bias.dtype == torch.bfloat16
    assert not hasattr(model.transformer_blocks[0].img_mlp.net[2], "weight_scale")
    out = _velocity(model)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # latents keep their dtype
    assert _rel(_velocity(registry.load_dit(path, dtype=torch.float32)), _velocity(qwen)) < 0.1


@pytest.mark.parametrize("family", [z_image, flux2])
def test_scaled_comfyui_names_reach_our_fused_and_renamed_weights(family, tmp_path):
    """Z-Image's fused qkv and FLUX.2's BFL names: each scale follows its weight through `from_comfy`."""
    if family is z_image:
        dit = z_image.tiny_dit(seed=1)
    else:
        with seeded(1):
            dit = flux2.FAMILY.model_class()(**flux2.tiny_config()).eval()
    comfy = family.FAMILY.to_comfy(dit.state_dict())
    path = tmp_path / "scaled.safetensors"
    save_file(_scaled(comfy), str(path))
    kept = registry.load_dit(path, dtype=torch.float32)
    assert sum(fp8.is_fp8_linear(m) for m in kept.modules()) > 4
    state = fp8.dequantised_state(kept)
    assert not any(k.endswith("weight_scale") for k in state)
    for k, v in dit.state_dict().items():
        if v.ndim == 2 and v.abs().max() > 0:
            assert _rel(state[k], v) < 0.06, k
    if family is z_image:  # diffusers' precision-sensitive list: the timestep embedder is not computed in fp8
        assert kept.t_embedder.mlp[0].weight.dtype == torch.float32


def test_missing_scale_truncated_file_and_unread_formats_are_refused(qwen, tmp_path):
    state = _scaled(qwen.state_dict())
    missing = dict(state)
    del missing["transformer_blocks.1.img_mlp.net.2.scale_weight"]
    path = tmp_path / "missing.safetensors"
    save_file(missing, str(path))
    with pytest.raises(DistilleryError, match="no scale.*transformer_blocks.1.img_mlp.net.2.weight") as err:
        registry.load_dit(path)
    assert str(path) in str(err.value) and "download it again" in str(err.value)

    truncated = tmp_path / "truncated.safetensors"
    save_file(state, str(truncated))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 1000])  # the header still promises every tensor
    with pytest.raises(DistilleryError, match="not a readable safetensors file.*download or export it again") as err:
        registry.load_dit(truncated)
    assert str(truncated) in str(err.value)

    nvfp4 = dict(_scaled(qwen.state_dict(), "comfy_quant"))
    nvfp4["img_in.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    path = tmp_path / "nvfp4.safetensors"
    save_file(nvfp4, str(path))
    with pytest.raises(DistilleryError, match="'nvfp4', a ComfyUI format this pack does not read"):
        registry.load_dit(path)

    orphan = dict(state, **{"nothing_here.scale_weight": torch.ones(())})
    save_file(orphan, str(path))
    with pytest.raises(DistilleryError, match="scale 'nothing_here.scale_weight' but not its weight"):
        registry.load_dit(path)

    blockwise = dict(state, **{"img_in.scale_weight": torch.ones(7)})
    save_file(blockwise, str(path))
    with pytest.raises(DistilleryError, match="block-wise scales"):
        registry.load_dit(path)

    with pytest.raises(DistilleryError, match="unknown fp8 weight handling"):
        registry.load_dit(tmp_path / "missing.safetensors", fp8="bf16")


def test_layout_from_the_quantization_metadata_header(qwen, tmp_path):
    """The comfy_quant layout may list its layers in the header instead of `.comfy_quant` tensors."""
    state = {k: v for k, v in _scaled(qwen.state_dict(), "comfy_quant").items() if not k.endswith(".comfy_quant")}
    layers = {k[: -len(".weight_scale")]: {"format": "float8_e4m3fn"} for k in state if k.endswith(".weight_scale")}
    path = tmp_path / "meta.safetensors"
    save_file(state, str(path), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    with TensorSource(path) as src:
        layout = fp8.read_layout(src)
    assert layout.scaled and set(layout.scales) == {f"{layer}.weight" for layer in layers}
    assert not any(fp8.is_quant_key(k) for k in layout.keys)
    torch.testing.assert_close(_velocity(registry.load_dit(path, dtype=torch.float32)),
                               _velocity(registry.load_dit(path, dtype=torch.float32, fp8="dequantise")))


def test_save_dit_of_a_scaled_model_writes_plain_weights(qwen, tmp_path):
    path = tmp_path / "scaled.safetensors"
    save_file(_scaled(qwen.state_dict()), str(path))
    kept = registry.load_dit(path, dtype=torch.float32)
    out = registry.save_dit(kept, tmp_path / "saved.safetensors")
    with TensorSource(out) as src:
        assert not any(fp8.is_quant_key(k) for k in src.keys()) and src.dtype("img_in.weight") == torch.float32
    torch.testing.assert_close(_velocity(registry.load_dit(out)), _velocity(kept))


# ----------------------------------------------------------------------------------------------------------
# store_in_fp8: a frozen base for training

def test_store_in_fp8_keeps_biases_norms_and_lora_and_saves_fp8_for_backward():
    from peft import LoraConfig, inject_adapter_in_model

    with seeded(0):
        base = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.LayerNorm(48), torch.nn.GELU(),
                                   torch.nn.Linear(48, 8, bias=False))
    base.requires_grad_(False)
    ref = copy.deepcopy(base)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"]), base)
    report = fp8.store_in_fp8(model, torch.float32)
    lin = model[0].base_layer
    assert report["layers"] == 2 and report["bytes_after"] < report["bytes_before"] / 3.5
    assert lin.weight.dtype == F8 and not lin.weight.requires_grad and lin.bias.dtype == torch.float32
    assert model[1].weight.dtype == torch.float32  # the norm
    assert model[0].lora_A["default"].weight.dtype == torch.float32 and model[0].lora_A["default"].weight.requires_grad
    assert set(model.state_dict()) >= {"0.base_layer.weight_scale", "3.weight_scale"}

    x = torch.randn(5, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    # the backward pass keeps the fp8 weight, never a float32 copy of it
    assert ((48, 64), F8) in saved and ((48, 64), torch.float32) not in saved
    y.square().sum().backward()
    assert model[0].lora_B["default"].weight.grad is not None and lin.weight.grad is None

    # gradients equal those through the dequantised weights
    plain = copy.deepcopy(ref)
    with torch.no_grad():
        for i, m in ((0, lin), (3, model[3])):
            plain[i].weight.copy_(m.weight.float() * m.weight_scale)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        model[0].lora_B["default"].weight.zero_()  # LoRA off: the base alone
    x.grad = None
    model(x).square().sum().backward()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert _rel(model(x), ref(x)) < 0.05
    torch.testing.assert_close(copy.deepcopy(model)(x), model(x))  # hooks survive a deep copy (student export)
    model.requires_grad_(True)  # full training of an fp8 base: refused, not silently frozen
    with pytest.raises(DistilleryError, match="fp8 storage is for frozen weights"):
        model(x)


def test_store_in_fp8_skips_trained_weights_and_named_modules():
    with seeded(0):
        model = torch.nn.ModuleDict({"proj_in": torch.nn.Linear(8, 8), "ff": torch.nn.Linear(8, 8),
                                     "head": torch.nn.Linear(8, 8)})
    model.requires_grad_(False)
    model["head"].requires_grad_(True)
    report = fp8.store_in_fp8(model, torch.bfloat16, skip=("ff",))
    assert report["layers"] == 0  # proj_in: diffusers' default skip list; ff: asked; head: being trained
    assert all(m.weight.dtype == torch.float32 for m in model.values())
