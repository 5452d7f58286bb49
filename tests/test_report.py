"""Size report: exact parameter counts, the activation measurement checked against real autograd graphs,
the memory arithmetic, every kind of input it accepts, and the LoRA target presets."""

import json

import pytest
import torch

from dit_distillery.errors import DistilleryError
from dit_distillery.lora_presets import LORA_PRESETS, lora_parameter_count, resolve_targets
from dit_distillery.models import aaadit, qwen_image, registry
from dit_distillery.report import (
    build_meta, example_inputs, measure_saved_activations, parameter_counts, resolve_spec, size_report, with_overrides)

QWEN = qwen_image.QWEN_IMAGE_CONFIG


def params_of(family, config):
    return parameter_counts(build_meta(family, config), family)


@pytest.mark.parametrize("layers,heads,expected", [
    (None, None, 20_430_401_088),  # Qwen/Qwen-Image
    (12, None, 4_118_498_880),
    (12, 12, 1_032_960_576),  # 12 heads x 128 = 1536 wide
])
def test_qwen_image_parameter_counts(layers, heads, expected):
    counts = params_of("qwen_image", with_overrides("qwen_image", QWEN, layers=layers, heads=heads))
    assert counts["params"] == expected
    assert sum(counts["parts"].values()) == expected == counts["parts"]["embedders"] + sum(counts["per_block"]) + \
        counts["parts"]["head"]
    assert len(set(counts["per_block"])) == 1


def test_aaadit_parameter_counts():
    counts = params_of("aaadit", aaadit.TUTORIAL_CONFIG)
    assert counts["params"] == 128_824_448
    assert counts["per_block"] == [12 * 1024 ** 2 + 10 * 1024] * 10  # DiffSynth facts: 12 d^2 + 10 d per block
    assert counts["parts"]["head"] == 1024 * 128 + 128


# ----------------------------------------------------------------------------------------------------------
# The activation measurement

def graph_saved_bytes(output, model) -> int:
    """Independent reference: walk a real autograd graph and add up the storages its nodes saved."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes, seen, stack = {}, set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in weights:
                        sizes[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(sizes.values())


@pytest.mark.parametrize("family,config,blocks", [
    ("aaadit", aaadit.tiny_config(), "blocks"),
    ("qwen_image", qwen_image.tiny_config(num_layers=2), "transformer_blocks"),
])
def test_meta_measurement_equals_a_real_cpu_forward(family, config, blocks):
    shape = dict(batch=2, height=64, width=48, text_tokens=7)
    torch.manual_seed(0)
    real = registry.build_empty(family, config, "cpu")
    real_inputs = example_inputs(family, config, device="cpu", dtype=torch.float32, **shape)
    on_cpu = measure_saved_activations(real, getattr(real, blocks), real_inputs)
    meta = build_meta(family, config)
    on_meta = measure_saved_activations(meta, getattr(meta, blocks), example_inputs(family, config, dtype=torch.float32,
                                                                                     **shape))
    for checkpointing in (False, True):
        assert on_meta.total(checkpointing) == on_cpu.total(checkpointing) > 0
    # CPU SDPA runs a flash kernel: its real graph saves what our stand-in says flash attention saves
    output = real(**real_inputs)
    output = output[0] if isinstance(output, tuple) else output
    assert graph_saved_bytes(output, real) == on_cpu.total(False)


def test_checkpointing_batch_and_attention_path_behave():
    config = aaadit.tiny_config(num_blocks=3)
    model = build_meta("aaadit", config)
    one, two = (measure_saved_activations(model, model.blocks, example_inputs(
        "aaadit", config, batch=b, height=256, width=256, text_tokens=16)) for b in (1, 2))
    assert 1.8 < two.total(False) / one.total(False) <= 2.0  # only the shared position table is per-model
    assert one.total(True) < one.largest_block() * 2 < one.total(False)
    math = measure_saved_activations(model, model.blocks, example_inputs(
        "aaadit", config, batch=1, height=256, width=256, text_tokens=16), flash_attention=False)
    tokens = 16 * 16 + 16
    scores = config["num_heads"] * tokens * tokens * 2  # one bf16 softmax matrix per block
    assert math.total(False) - one.total(False) >= 3 * scores


def test_report_arithmetic_and_assumptions():
    config = with_overrides("qwen_image", qwen_image.tiny_config(), layers=2)
    r = size_report(("qwen_image", config), height=512, width=256, batch=2, lora_rank=8)
    p = r["params"]
    assert r["weights_bytes"] == {"fp32": 4 * p, "bf16": 2 * p, "fp8": p}
    assert r["setting"]["image_tokens"] == 32 * 16 and r["setting"]["text_tokens"] == 256
    full, lora = r["training"]["full"], r["training"]["lora"]
    assert full["trainable_params"] == p and full["weights_bytes"] == 4 * p and full["optimizer_bytes"] == 8 * p
    assert full["total_bytes"] == sum(v for k, v in full.items() if k.endswith("_bytes") and k != "total_bytes")
    assert full["activations_bytes"] == r["activations"]["full"]["checkpointing_bytes"]
    assert lora["modules"] == 2 * 12 and lora["targets"] == "qwen_image"
    assert lora["weights_bytes"] == 2 * p + 4 * lora["trainable_params"]
    assert lora["total_bytes"] < full["total_bytes"]
    assert r["activations"]["math_attention_extra_bytes"] > 0
    assert any("flash" in a for a in r["assumptions"])
    off = size_report(("qwen_image", config), height=512, width=256, batch=2, gradient_checkpointing=False)
    assert off["training"]["full"]["activations_bytes"] == r["activations"]["full"]["no_checkpointing_bytes"]
    json.dumps(r)  # plain data


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, inject_adapter_in_model

    model = registry.build_empty("qwen_image", qwen_image.tiny_config(num_layers=2), "cpu")
    names = resolve_targets(model, "qwen_image")
    expected = lora_parameter_count(model, names, 4)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=names), model)
    assert expected == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_report_reads_files_folders_and_json(tmp_path):
    torch.manual_seed(0)
    model = aaadit.AAADiT(**aaadit.tiny_config(num_heads=4))
    expected = sum(p.numel() for p in model.parameters())
    single = registry.save_dit(model, tmp_path / "m.safetensors")
    model.save_pretrained(tmp_path / "folder")
    (tmp_path / "ours.json").write_text(json.dumps({"family": "aaadit", "config": registry.model_config(model)}))
    qwen_json = tmp_path / "config.json"  # a diffusers config with a key of older diffusers versions
    qwen_json.write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel", **QWEN, "num_layers": 12,
                                     "pooled_projection_dim": 768}))
    for spec in (model, single, tmp_path / "folder", tmp_path / "ours.json"):
        family, config, _ = resolve_spec(spec)
        assert (family, config) == ("aaadit", registry.model_config(model))
    assert size_report(single, height=64, width=64)["params"] == expected
    assert resolve_spec(qwen_json)[:2] == ("qwen_image", {**QWEN, "num_layers": 12})
    assert resolve_spec("AAADiT-tiny")[0] == "aaadit"


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(DistilleryError, match="height"):
        size_report("aaadit-tiny", height=100)
    with pytest.raises(DistilleryError, match="preset"):
        resolve_spec("no-such-model")
    with pytest.raises(DistilleryError, match="heads"):
        with_overrides("aaadit", aaadit.TUTORIAL_CONFIG, heads=0)
    with pytest.raises(DistilleryError, match="num_heads"):
        build_meta("aaadit", with_overrides("aaadit", aaadit.TUTORIAL_CONFIG, heads=7))
    with pytest.raises(DistilleryError, match="not aaadit config keys"):
        build_meta("aaadit", {"num_layers": 3})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mystery": 1}))
    with pytest.raises(DistilleryError, match="family"):
        resolve_spec(bad)


# ----------------------------------------------------------------------------------------------------------
# LoRA target presets

def test_presets_resolve_to_full_linear_names():
    qwen = build_meta("qwen_image", qwen_image.tiny_config(num_layers=2))
    names = resolve_targets(qwen, "qwen_image")
    assert len(names) == 2 * len(LORA_PRESETS["qwen_image"])
    assert "transformer_blocks.1.attn.to_out.0" in names and "transformer_blocks.0.img_mod.1" in names
    assert all(isinstance(qwen.get_submodule(n), torch.nn.Linear) for n in names)
    assert len(resolve_targets(qwen, "qwen_image_all")) == 2 * 14
    model = build_meta("aaadit", aaadit.tiny_config())
    assert resolve_targets(model, "to_q, ff.2") == ["blocks.0.to_q", "blocks.0.ff.2", "blocks.1.to_q", "blocks.1.ff.2"]
    assert resolve_targets(model, ["to_gate"]) == ["blocks.0.to_gate", "blocks.1.to_gate"]
    assert len(resolve_targets(model, "aaadit")) == 2 * 7


def test_presets_refuse_what_matches_nothing():
    model = build_meta("aaadit", aaadit.tiny_config())
    with pytest.raises(DistilleryError, match="add_q_proj"):
        resolve_targets(model, "qwen_image")  # another family's preset
    with pytest.raises(DistilleryError, match="to_qq"):
        resolve_targets(model, "to_q,to_qq")
    with pytest.raises(DistilleryError, match="Linear"):
        resolve_targets(model, "ff")  # a Sequential, not a Linear
    with pytest.raises(DistilleryError):
        resolve_targets(model, " , ")
