"""Shrink DiT on ComfyUI's fp8 files (issue 10): plain fp8 and scaled fp8 in both of ComfyUI's layouts (marker +
`.scale_weight`; `.weight_scale` + `comfy_quant` tensors or the `_quantization_metadata` header) and per-row
scales, for every streamed family (Qwen-Image and Z-Image in stream.py, FLUX.2 per stack in depth.py).

The reference is the same source dequantised (weight x scale in fp32) and shrunk the same way: a student that
keeps fp8 must be its exact slices with the scales carried, a bf16 one its cast."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dit_distillery import families, fp8
from dit_distillery.conditioning import TextEmbeds
from dit_distillery.errors import DistilleryError
from dit_distillery.formats import TensorSource
from dit_distillery.models import registry
from dit_distillery.shrink import plan_shrink, shrink
from dit_distillery.shrink.blocks import drop_blocks
from dit_distillery.tiny import seeded
from dit_distillery.velocity import predict_velocity
from tests.test_fp8 import _scaled

F8 = torch.float8_e4m3fn
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
# family -> (layers, heads): a depth and width shrink every family's streamed path takes
SETTINGS = {"qwen_image": (3, 2), "z_image": (1, 8), "flux2": (f"{DOUBLE}=2,{SINGLE}=2", 1)}


def _model(name):
    family = families.get(name)
    with seeded(5):
        if name == "qwen_image":
            model = family.model_class()(**family.tiny_config(num_layers=4))
        elif name == "z_image":  # Z-Image students are at least 256 wide: 9 heads of 32 -> 8
            from dit_distillery.families import z_image

            return z_image.tiny_dit(seed=6, n_layers=2, n_refiner_layers=1, dim=288, n_heads=9).eval()
        else:
            model = family.model_class()(**family.tiny_config(num_layers=3, num_single_layers=4))
        for p in model.parameters():  # weights of several magnitudes: every tensor gets its own scale
            p.data.normal_(0, 0.05 + 0.2 * torch.rand(()).item())
    return model.eval()


def _per_row(state):
    """Scaled fp8 with one scale per output row (`[rows]`), which fp8.read_layout also reads."""
    out = {"scaled_fp8": torch.empty(0, dtype=F8)}
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.float().abs().amax(1).clamp_min(1e-8) / 448
            out[k] = (v.float() / scale[:, None]).to(F8)
            out[k[: -len(".weight")] + ".scale_weight"] = scale
        else:
            out[k] = v.contiguous()
    return out


def _write(name, layout, tmp_path):
    """(file in `layout`, the same weights dequantised in fp32, the model) under the names ComfyUI reads."""
    model = _model(name)
    state = families.get(name).to_comfy({k: v.detach() for k, v in model.state_dict().items()})
    if layout == "plain":
        file = {k: (v.to(F8) if v.ndim == 2 else v.contiguous()) for k, v in state.items()}
    elif layout == "per_row":
        file = _per_row(state)
    else:
        file = _scaled(state, "comfy_quant" if layout in ("comfy_quant", "header") else "scale_weight")
    metadata = None
    if layout == "header":  # the layers listed in the header instead of `.comfy_quant` tensors
        file = {k: v for k, v in file.items() if not k.endswith(".comfy_quant")}
        layers = {k[: -len(".weight_scale")]: {"format": "float8_e4m3fn"} for k in file if k.endswith(".weight_scale")}
        metadata = {"_quantization_metadata": json.dumps({"layers": layers})}
    path = tmp_path / f"{name}_{layout}.safetensors"
    save_file(file, str(path), metadata=metadata)
    ref = tmp_path / f"{name}_{layout}_dequantised.safetensors"
    save_file(_dequantised(file), str(ref))
    return path, ref, model


def _scale_of(state, weight):
    layer = weight[: -len(".weight")]
    return state.get(layer + ".scale_weight", state.get(layer + ".weight_scale"))


def _dequantised(state):
    """weight x scale in fp32 (per row: broadcast over the row), as fp8.py computes it; no quantisation tensors."""
    out = {}
    for k, v in state.items():
        if fp8.is_quant_key(k):
            continue
        s = _scale_of(state, k) if k.endswith(".weight") else None
        if s is not None:
            out[k] = v.float() * (s.float().reshape(-1, 1) if s.numel() > 1 else s.float())
        elif v.dtype == F8:
            out[k] = v.float()
        else:
            out[k] = v
    return out


def _velocity(dit, seed=0):
    family = families.of_model(dit)
    config = registry.model_config(dit)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, family.latent_channels(config), 8, 8, generator=g)
    text = TextEmbeds(torch.randn(1, 5, family.text_width(config), generator=g), None)
    with torch.no_grad():
        return predict_velocity(dit, latents, torch.tensor([0.6]), text)


# ----------------------------------------------------------------------------------------------------------
# The student: exact slices, scales carried, dequantised when written wide

@pytest.mark.parametrize("name,layout", [
    ("qwen_image", "scale_weight"), ("qwen_image", "comfy_quant"), ("qwen_image", "header"),
    ("qwen_image", "per_row"), ("qwen_image", "plain"), ("z_image", "scale_weight"), ("flux2", "scale_weight"),
    ("flux2", "header"), ("flux2", "per_row"), ("flux2", "plain")])
def test_scaled_student_is_exact_slices_with_scales_and_loads(name, layout, tmp_path):
    path, ref_path, _ = _write(name, layout, tmp_path)
    layers, heads = SETTINGS[name]
    kept, ref = tmp_path / "kept.safetensors", tmp_path / "ref.safetensors"
    report = shrink(path, kept, layers=layers, heads=heads)
    ref_report = shrink(ref_path, ref, layers=layers, heads=heads)
    # width chosen from the dequantised weights' magnitudes: the same plan as the dequantised source's
    assert report["kept_blocks"] == ref_report["kept_blocks"] and report["params_after"] < report["params_before"]
    assert shrink(path, kept, layers=layers, heads=heads, reuse=True, overwrite=False)["reused"]
    with TensorSource(path) as src:
        source_scales = {k: src.get(k) for k in src.keys() if k.endswith((".scale_weight", ".weight_scale"))}
        source_dtypes = {k: src.dtype(k) for k in src.keys()}
    got, want = load_file(str(kept)), load_file(str(ref))
    assert set(fp8.model_keys(got)) == set(want)
    scaled = [k for k in want if _scale_of(got, k) is not None]
    for k, w in want.items():
        s = _scale_of(got, k)
        if s is None:
            assert got[k].dtype == (F8 if layout == "plain" and w.ndim == 2 else w.dtype), k
            assert torch.equal(got[k].float(), w), k  # plain fp8: the same bytes, read as floats
            continue
        assert got[k].dtype == F8 and s.dtype == torch.float32, k
        # fp8 bytes sliced, scale kept: weight x scale is the dequantised source's slice, bit for bit
        assert torch.equal(got[k].float() * (s.reshape(-1, 1) if s.numel() > 1 else s), w), k
        if layout != "per_row":  # a per-tensor scale goes through unchanged, in its shape
            assert any(s.shape == v.shape and torch.equal(s, v) for v in source_scales.values()), k
    if layout == "plain":
        assert not scaled and not any(fp8.is_quant_key(k) for k in got)
    else:
        assert len(scaled) == len([k for k in want if k.endswith(".weight") and want[k].ndim == 2])
    assert ("scaled_fp8" in got) == ("scaled_fp8" in source_dtypes)
    if layout == "scale_weight":
        assert all(k[: -len(".weight")] + ".scale_input" in got for k in scaled)
    if layout == "comfy_quant":
        assert all(bytes(got[k[: -len(".weight")] + ".comfy_quant"].tolist()) == b'{"format": "float8_e4m3fn"}'
                   for k in scaled)
    with TensorSource(kept) as student:
        header = student.metadata.get("_quantization_metadata")
        layout_read = fp8.read_layout(student)
    if layout == "header":  # the header names the student's layers, renumbered with their blocks
        assert set(json.loads(header)["layers"]) == {k[: -len(".weight")] for k in scaled}
    else:
        assert header is None
    assert layout_read.scaled == (layout != "plain")

    # our loader: fp8 Linears with their scales, computing what the dequantised student computes
    student = registry.load_dit(kept, dtype=torch.float32)
    assert any(fp8.is_fp8_linear(m) for m in student.modules())
    assert (layout == "plain") != any(hasattr(m, "weight_scale") for m in student.modules())
    torch.testing.assert_close(_velocity(student), _velocity(registry.load_dit(ref, dtype=torch.float32)),
                               rtol=1e-5, atol=1e-6)

    # a wide student: dequantised in fp32, then cast; no scales, no marker, no header
    wide = tmp_path / "bf16.safetensors"
    shrink(path, wide, layers=layers, heads=heads, dtype="bf16")
    got = load_file(str(wide))
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], w.to(torch.bfloat16)), k
    with TensorSource(wide) as student:
        assert "_quantization_metadata" not in student.metadata
    fp32 = tmp_path / "fp32.safetensors"
    shrink(path, fp32, layers=layers, heads=heads, dtype="fp32")
    assert all(torch.equal(v, want[k]) for k, v in load_file(str(fp32)).items())


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_depth_shrunk_scaled_student_equals_blocks_dropped_in_memory(name, tmp_path):
    """Depth only, fp8 kept (dtype fp8 too): the kept blocks' bytes and scales are the source blocks', and the
    student computes what the dequantised source with those blocks dropped in memory computes."""
    path, _, _ = _write(name, "comfy_quant", tmp_path)
    out = tmp_path / "depth.safetensors"
    layers = 2 if name == "qwen_image" else f"{DOUBLE}=2,{SINGLE}=2"
    report = shrink(path, out, layers=layers, strategy="first", dtype="fp8")
    source, got = load_file(str(path)), load_file(str(out))
    assert set(got) < set(source)
    kept = report["kept_blocks"] if isinstance(report["kept_blocks"], dict) else {DOUBLE: report["kept_blocks"]}
    prefixes = {"qwen_image": {DOUBLE: "transformer_blocks."},
                "flux2": {DOUBLE: "double_blocks.", SINGLE: "single_blocks."}}[name]
    for k, v in got.items():
        source_key = k
        for attr, prefix in prefixes.items():
            if k.startswith(prefix):
                index, rest = k[len(prefix):].split(".", 1)
                source_key = f"{prefix}{kept[attr][int(index)]}.{rest}"
        assert v.dtype == source[source_key].dtype, k
        assert torch.equal(v.reshape(-1).view(torch.uint8), source[source_key].reshape(-1).view(torch.uint8)), k

    dequantised = registry.load_dit(path, dtype=torch.float32, fp8="dequantise")
    for attr, blocks in kept.items():
        dequantised, _ = drop_blocks(dequantised, strategy="list", keep_blocks=blocks, group=attr)
    student = registry.load_dit(out, dtype=torch.float32)
    torch.testing.assert_close(_velocity(student), _velocity(dequantised), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,layers", [("qwen_image", 2), ("flux2", f"{DOUBLE}=1,{SINGLE}=2")])
def test_importance_runs_the_scaled_source_dequantised(name, layers, tmp_path):
    """Block influence and activation importance run the source as fp8.py computes it: the same scores as on
    the dequantised file."""
    path, ref, _ = _write(name, "scale_weight", tmp_path)
    kw = dict(layers=layers, strategy="importance", heads=1, width_method="importance")
    got, want = plan_shrink(path, **kw), plan_shrink(ref, **kw)
    per_stack = [(got.block_scores, want.block_scores)] if isinstance(want.block_scores, list) else [
        (got.block_scores[stack], values) for stack, values in want.block_scores.items()]
    for scores, values in per_stack:
        assert scores == pytest.approx(values, rel=1e-6)
    assert got.kept_blocks == want.kept_blocks and got.width == want.width


# ----------------------------------------------------------------------------------------------------------
# Refusals, by name, before anything is written

def test_unsupported_scale_layouts_are_refused_by_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("qwen_image", "flux2"):
        path, _, model = _write(name, "scale_weight", tmp_path)
        state = load_file(str(path))
        layer = next(k for k in state if k.endswith(".scale_weight"))[: -len(".scale_weight")]
        cases = {
            "block-wise scales": {**state, layer + ".scale_weight": torch.ones(7)},
            "a ComfyUI format this pack does not read": {
                **state, layer + ".comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)},
            "have no scale": {k: v for k, v in state.items() if k != layer + ".scale_weight"},
        }
        for words, bad in cases.items():
            bad_path = tmp_path / "bad.safetensors"
            save_file(bad, str(bad_path))
            with pytest.raises(DistilleryError, match=words) as info:
                shrink(bad_path, out / "s.safetensors", layers=2 if name == "qwen_image" else f"{SINGLE}=2")
            assert info.value.field == "source" and str(bad_path) in str(info.value), (name, words)
    assert list(out.iterdir()) == []


def test_scaled_file_in_diffusers_names_renamed_to_comfyui_is_refused_unless_wide(tmp_path):
    """shrink_depth writes ComfyUI's names: from a scaled file in diffusers' names, q, k and v (each with its own
    scale) would become one fused tensor, so fp8 is refused and a wide student is dequantised."""
    from dit_distillery.shrink.depth import shrink_depth

    model = _model("flux2")
    path = tmp_path / "ours_scaled.safetensors"
    save_file(_scaled({k: v.detach() for k, v in model.state_dict().items()}), str(path))
    with pytest.raises(DistilleryError, match="cannot keep their per-tensor scales") as info:
        shrink_depth(path, tmp_path / "s.safetensors", layers={SINGLE: 2})
    assert "dtype bf16" in str(info.value) and not (tmp_path / "s.safetensors").exists()
    shrink_depth(path, tmp_path / "b.safetensors", layers={SINGLE: 2}, dtype=torch.bfloat16)
    got = load_file(str(tmp_path / "b.safetensors"))
    assert "double_blocks.0.img_attn.qkv.weight" in got and not any(fp8.is_quant_key(k) for k in got)
    want = registry.load_dit(path, dtype=torch.float32, fp8="dequantise")
    want, _ = drop_blocks(want, strategy="list", keep_blocks=[0, 3], group=SINGLE)
    ours = families.get("flux2").from_comfy(got)
    assert set(ours) == set(want.state_dict())
    for k, v in want.state_dict().items():
        assert torch.equal(ours[k], v.to(torch.bfloat16)), k
