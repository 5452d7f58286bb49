"""Memory plan (dit_distillery/memory_plan.py): its parts against tensors counted on real tiny models, its
monotonicity, `blocks_needed`, the CLI; and on CUDA (`gpu`), its total against the measured peak."""

from __future__ import annotations

import json

import pytest
import torch

from dit_distillery import families
from dit_distillery.block_swap import block_swap_of, enable_block_swap, frozen_bytes
from dit_distillery.cli import main
from dit_distillery.errors import DistilleryError
from dit_distillery.memory_plan import (GIB, RESERVE_BYTES, fp8_linears, memory_plan, parse_bytes, parse_loss,
                                         weight_bytes)
from dit_distillery.report import build_meta, example_inputs

SMALL = dict(height=64, width=64, text_tokens=8, lora_rank=4)
CONFIGS = {"qwen_image": dict(num_layers=4), "flux2": dict(num_layers=2, num_single_layers=3)}


def _config(family):
    return families.get(family).tiny_config(**CONFIGS[family])


def _real_lora_model(family, config, base_dtype, rank=4):
    """The tiny model as a LoRA run holds it: frozen base in bf16 (fp8: `fp8.store_in_fp8`), adapters of the
    family's preset."""
    from peft import LoraConfig, inject_adapter_in_model

    from dit_distillery.fp8 import store_in_fp8
    from dit_distillery.lora_presets import resolve_targets

    spec = families.get(family)
    model = spec.model_class()(**config).to(torch.bfloat16).requires_grad_(False)
    if base_dtype == "fp8":
        store_in_fp8(model, torch.bfloat16)
    names = resolve_targets(model, spec.default_lora_preset)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), model)
    return model


@pytest.mark.parametrize("family", ["qwen_image", "flux2"])
@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_weight_parts_equal_real_tensor_bytes_and_swap_the_same_blocks(family, base_dtype):
    config = _config(family)
    plan = memory_plan((family, config), mode="lora", base_dtype=base_dtype, **SMALL)
    model = _real_lora_model(family, config, base_dtype)
    frozen = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if not t.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.outside_frozen_bytes + sum(plan.block_bytes) == frozen
    assert plan.trainable_params == trainable
    assert plan.parts(0)["weights_resident"] == frozen + 6 * trainable  # fp32 adapters + their bf16 copies
    from dit_distillery.block_swap import block_list

    assert [frozen_bytes(b) for _, b in block_list(model)] == plan.block_bytes
    for n in (1, 3):  # the runtime swaps exactly the blocks the plan counts
        swap = enable_block_swap(model, n, "cpu")
        assert swap.names == [plan.block_names[i] for i in plan.swapped(n)]
        moved = sum(e.nbytes for s in swap._stores for e in s.entries)
        assert plan.parts(0)["weights_resident"] - plan.parts(n)["weights_resident"] == moved


def test_fp8_base_halves_the_weight_bytes_of_qwen_image():
    family, config, _ = families.detect("qwen-image")
    model = build_meta(family, config)
    _, bf16, bf16_out = weight_bytes(model, family, "bf16")
    _, fp8, fp8_out = weight_bytes(model, family, "fp8")
    layers = fp8_linears(model)
    assert sum(bf16) + bf16_out == 2 * 20_430_401_088
    # every converted Linear weight loses one of its two bytes and gains a float32 scale
    assert (sum(bf16) + bf16_out) - (sum(fp8) + fp8_out) == sum(layers.values()) - 4 * len(layers)
    assert 0.5 < (sum(fp8) + fp8_out) / (sum(bf16) + bf16_out) < 0.502  # biases, norms, proj_out stay bf16


def test_activations_scale_with_unrolled_steps_as_a_real_graph_does():
    """Direct Distill's N student steps keep N forwards for one backward: the plan's activations (no
    checkpointing, 2 steps) match the bytes a real 2-step graph saved on a CPU (walked node by node), where the
    RoPE table both steps save is one storage (256 KiB here: a naive 2x would be 30% over). Within 0.5%: CPU bf16
    kernels save a few hundred bytes other than the meta pass's flash-attention stand-in (574,704 vs 575,040 B for
    one step), and the second step also keeps its latent input, which the Euler step made differentiable (2 KiB
    here; [1, 4096, 64] bf16 = 0.5 MiB at 1024x1024)."""
    from tests.test_report import graph_saved_bytes

    family, config = "qwen_image", _config("qwen_image")
    shape = dict(height=64, width=64, text_tokens=8)
    plan = memory_plan((family, config), mode="lora", loss="direct:2", gradient_checkpointing=False, **SMALL)
    one = memory_plan((family, config), mode="lora", loss="sft", gradient_checkpointing=False, **SMALL)
    assert 1.5 * one.activations_bytes < plan.activations_bytes < 2 * one.activations_bytes
    torch.manual_seed(0)
    model = torch.nn.Module.to(_real_lora_model(family, config, "bf16"), torch.bfloat16)  # adapters too, as measured
    inputs = example_inputs(family, config, batch=1, device="cpu", dtype=torch.bfloat16, **shape)
    out = model(**inputs)[0]
    x = inputs["hidden_states"] - 0.5 * out  # an Euler step (saves nothing) feeds the next forward
    out = model(**dict(inputs, hidden_states=x))[0]
    assert graph_saved_bytes(out, model) == pytest.approx(plan.activations_bytes, rel=5e-3)


def test_monotonic_in_swap_checkpointing_and_steps():
    for family in ("qwen_image", "flux2"):
        plan = memory_plan((family, _config(family)), mode="lora", **SMALL)
        totals = [plan.total(n) for n in range(plan.max_swappable + 1)]
        assert all(a >= b for a, b in zip(totals, totals[1:])), totals
        assert totals[-1] < totals[0]
        # two block buffers in flight: from the third block on every swapped block is saved
        assert all(a > b for a, b in zip(totals[2:], totals[3:])), totals
    config = _config("qwen_image")
    ckpt = memory_plan(("qwen_image", config), mode="lora", **SMALL)
    plain = memory_plan(("qwen_image", config), mode="lora", gradient_checkpointing=False, **SMALL)
    assert ckpt.activations_bytes < plain.activations_bytes
    # without checkpointing autograd keeps every swapped copy: swap saves nothing in training
    assert plain.total(4) == plain.total(0) and plain.notes
    direct = memory_plan(("qwen_image", config), mode="lora", loss="direct:4", **SMALL)
    assert ckpt.activations_bytes < direct.activations_bytes < 4 * ckpt.activations_bytes
    fp8 = memory_plan(("qwen_image", config), mode="lora", base_dtype="fp8", **SMALL)
    assert fp8.parts()["weights_resident"] < ckpt.parts()["weights_resident"]
    sample = memory_plan(("qwen_image", config), mode="sample", **SMALL)
    assert sample.parts()["gradients"] == sample.parts()["optimizer"] == 0
    assert sample.total(4) < sample.total(0)


def test_blocks_needed_is_the_smallest_that_fits():
    plan = memory_plan(("qwen_image", _config("qwen_image")), mode="lora", **SMALL)
    for n in range(plan.max_swappable + 1):
        budget = plan.total(n) + RESERVE_BYTES
        need = plan.blocks_needed(budget)
        assert plan.total(need) + RESERVE_BYTES <= budget
        assert need == 0 or plan.total(need - 1) + RESERVE_BYTES > budget
        assert need <= n
    assert plan.blocks_needed(plan.total(plan.max_swappable) + RESERVE_BYTES - 1) is None
    assert plan.with_swap(2).to_dict(plan.total(0) + RESERVE_BYTES)["fits"]


def test_parsing_and_refusals():
    assert parse_loss("sft") == ("sft", 1) and parse_loss("direct:8") == ("direct", 8)
    assert parse_loss("direct") == ("direct", 4)
    assert parse_bytes("24GB") == parse_bytes("24 GiB") == 24 * GIB and parse_bytes("512MB") == 512 * 2 ** 20
    for bad in ("sft:2", "direct:0", "dmd"):
        with pytest.raises(DistilleryError, match="loss"):
            parse_loss(bad)
    with pytest.raises(DistilleryError, match="budget"):
        parse_bytes("lots")
    config = _config("qwen_image")
    with pytest.raises(DistilleryError, match="base_dtype"):
        memory_plan(("qwen_image", config), mode="full", base_dtype="fp8", **SMALL)
    with pytest.raises(DistilleryError, match="mode"):
        memory_plan(("qwen_image", config), mode="dpo", **SMALL)
    with pytest.raises(DistilleryError, match="blocks_to_swap"):
        memory_plan(("qwen_image", config), mode="full", blocks_to_swap=1, **SMALL)  # nothing frozen


def test_report_cli_plan(capsys):
    argv = ["report", "qwen-image", "--layers", "4", "--plan", "--resolution", "256", "--mode", "lora", "--loss",
            "direct:2", "--base-dtype", "fp8", "--lora-rank", "8"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["setting"]["height"] == plan["setting"]["width"] == 256 and plan["setting"]["steps"] == 2
    # 1.5 blocks short: two blocks in flight, so four must be swapped
    budget = plan["total_bytes"] + plan["reserve_bytes"] - 3 * plan["block_bytes"] // 2
    argv += ["--budget", f"{budget / GIB:.6f}GiB", "--blocks-to-swap", "auto"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["blocks_swapped"] == plan["blocks_needed"] == 4 and plan["fits"]
    assert len(plan["swapped_blocks"]) == 4
    assert main(argv) == 0
    assert "blocks to swap" in capsys.readouterr().out
    assert main(["report", "qwen-image", "--plan", "--blocks-to-swap", "auto"]) == 2  # auto needs a budget


# ----------------------------------------------------------------------------------------------------------
# CUDA: the plan against the allocator's measured peak

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("blocks", [0, 6])
def test_gpu_plan_within_15_percent_of_measured_peak(blocks):
    """A LoRA SFT step (bf16 base, fp32 adapters, autocast, AdamW, gradient checkpointing) of a 12-block
    Qwen-Image 1536 wide at 512x512, without and with block swap: the plan's total within 15% of
    `max_memory_allocated` over the second step."""
    from peft import LoraConfig, inject_adapter_in_model

    from dit_distillery.lora_presets import resolve_targets

    family = "qwen_image"
    config = families.get(family).tiny_config(num_layers=12, num_attention_heads=12, attention_head_dim=128,
                                               joint_attention_dim=512)
    plan = memory_plan((family, config), height=512, width=512, mode="lora", lora_rank=32, text_tokens=64,
                       blocks_to_swap=blocks)
    spec = families.get(family)
    torch.manual_seed(0)
    model = spec.model_class()(**config).to(torch.bfloat16).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=32, lora_alpha=32, target_modules=resolve_targets(model, spec.default_lora_preset)),
                            model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    if blocks:
        enable_block_swap(model, blocks, "cuda")
    else:
        model.to("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = example_inputs(family, config, batch=1, height=512, width=512, text_tokens=64, device="cuda",
                            dtype=torch.bfloat16)
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs)[0].float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    assert abs(plan.total() - measured) <= 0.15 * measured, (plan.parts(), measured)


def test_auto_blocks_to_swap_uses_the_plan_and_free_memory(monkeypatch):
    """enable_block_swap(..., "auto", plan=...): the fewest blocks that fit the device's available memory (what the
    DiT already holds there counts as available), refused by name when nothing fits."""
    import dit_distillery.weights_check as weights_check

    family, config = "qwen_image", _config("qwen_image")
    plan = memory_plan((family, config), mode="sample", **SMALL)
    model = families.get(family).model_class()(**config).to(torch.bfloat16).requires_grad_(False)
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])  # on the CPU, the "device" here
    budget = plan.total(3) + plan.reserve_bytes
    monkeypatch.setattr(weights_check, "available_memory", lambda device: budget - held)
    swap = enable_block_swap(model, "auto", "cpu", plan=plan)
    assert swap.count == plan.blocks_needed(budget) == 3
    monkeypatch.setattr(weights_check, "available_memory", lambda device: 0)
    with pytest.raises(DistilleryError, match="even with all 4 blocks swapped"):
        enable_block_swap(model, "auto", "cpu", plan=plan)
    assert block_swap_of(model) is swap and swap.count == 3  # the refusal changed nothing
