"""Block swap (dit_distillery/block_swap.py) on tiny Qwen-Image and FLUX.2 DiTs, on the CPU.

The compute device and the offload device are both the CPU here, but the swap still runs every step it runs on a
GPU except the stream: the block's frozen tensors live in one flat host buffer, each call copies it into a new
buffer and the block computes with those copies (checked below: the weights a layer sees during its forward are
not the masters), then drops them. Outputs and gradients (LoRA through peft, gradient checkpointing on, so the
recomputation fetches again) must be bit-identical to the unswapped model's. CUDA-only properties (pinned
buffers, copies overlapping compute, the peak-memory drop) are the `gpu` tests at the end.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dit_distillery import families
from dit_distillery.block_swap import (block_list, block_swap_of, chosen_blocks, disable_block_swap,
                                       enable_block_swap, swap_order)
from dit_distillery.errors import DistilleryError

LORA_TARGETS = {"qwen_image": ["to_q", "to_k", "to_v", "add_q_proj", "img_mlp.net.2"],
                "flux2": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_qkv_mlp_proj", "ff.linear_out"]}
CONFIGS = {"qwen_image": dict(num_layers=5), "flux2": dict(num_layers=2, num_single_layers=3)}


def _model(family: str, lora: bool = True, seed: int = 0):
    from peft import LoraConfig, inject_adapter_in_model

    spec = families.get(family)
    config = spec.tiny_config(**CONFIGS[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class()(**config)
        model.requires_grad_(False)
        if lora:  # B random too (init_lora_weights=False), so every adapter gets a non-zero gradient
            inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS[family],
                                               init_lora_weights=False), model)
    return model, config


def _inputs(family: str, config: dict, seed: int = 1) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inputs = families.get(family).example_inputs(config, batch=2, h=8, w=8, text_tokens=5, device="cpu",
                                                     dtype=torch.float32)
    inputs["hidden_states"].requires_grad_(True)
    return inputs


def _step(model, inputs: dict, passes: int = 1):
    """`passes` forwards with grad (as Direct Distill's unrolled steps), one backward."""
    x = {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
         for k, v in inputs.items()}
    loss, out = 0.0, None
    for p in range(passes):
        out = model(**x)[0]
        loss = loss + (out.float() * (p + 1)).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    gx = x["hidden_states"].grad
    return out.detach(), None if gx is None else gx.clone(), grads


@pytest.mark.parametrize("family,n", [("qwen_image", 3), ("flux2", 4)])
def test_swap_is_exact_with_lora_and_checkpointing(family, n):
    ref, config = _model(family)
    swp = copy.deepcopy(ref)
    for m in (ref, swp):
        m.enable_gradient_checkpointing()
        m.train()
    swap = enable_block_swap(swp, n, "cpu")
    assert swap.count == n and block_swap_of(swp) is swap
    masters = {name: p.detach().clone() for name, p in swp.named_parameters() if not p.requires_grad}
    # trainable parameters are never swapped; the swapped ones are frozen
    swapped = set(swap.swapped_parameter_names())
    assert swapped and not any("lora_" in name for name in swapped)
    assert all(not dict(swp.named_parameters())[name].requires_grad for name in swapped)

    # During a swapped block's forward its layers compute with copies, not with the masters
    seen = []
    name, block = next((nm, b) for nm, b in block_list(swp) if nm in swap.names)
    layer = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
    master = layer.weight
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight))
    inputs = _inputs(family, config)
    for step in range(2):  # the first pass learns the execution order; the second prefetches
        before = dict(swap.stats)
        out_ref, gx_ref, g_ref = _step(ref, inputs)
        out_swp, gx_swp, g_swp = _step(swp, inputs)
        assert torch.equal(out_ref, out_swp)
        assert torch.equal(gx_ref, gx_swp)
        assert g_ref.keys() == g_swp.keys() and len(g_ref) > 0
        for k in g_ref:
            assert torch.equal(g_ref[k], g_swp[k]), k
        # every adapter learns, except those of Qwen-Image's last text branch (its output is dropped)
        zero = [k for k in g_ref if not g_ref[k].abs().sum() > 0]
        assert all(".add_" in k for k in zero), zero
        fetched = {k: swap.stats[k] - before[k] for k in swap.stats}
        # each swapped block is fetched for the forward and for the checkpointed recomputation, except the last,
        # kept for its recomputation; once the order is known every fetch is a prefetch
        if step == 0:
            assert fetched["fetches"] == 2 * n, fetched
        else:
            assert fetched["fetches"] == 2 * n - 1 and fetched["prefetch_hits"] == 2 * n, fetched
        for m in (ref, swp):
            m.zero_grad(set_to_none=True)
    handle.remove()
    assert len(seen) == 4  # forward and recomputation, twice
    assert all(w is not master and not isinstance(w, torch.nn.Parameter) for w in seen)
    assert all(w.untyped_storage().data_ptr() != master.untyped_storage().data_ptr() for w in seen)
    assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight is master  # restored after the call
    # the masters were never written (swap copies host -> device only)
    for name, p in swp.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, masters[name]), name


def test_multi_pass_backward_and_optimizer_step_match():
    """Two forwards then one backward (Direct Distill's unrolled sampler), then an optimiser step on the LoRA
    parameters: the same updates with and without swap, the masters untouched."""
    ref, config = _model("qwen_image")
    swp = copy.deepcopy(ref)
    for m in (ref, swp):
        m.enable_gradient_checkpointing()
    swap = enable_block_swap(swp, 5, "cpu")
    inputs = _inputs("qwen_image", config)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ref, swp)]
    for step in range(2):
        before = swap.stats["prefetch_hits"]
        r, s = _step(ref, inputs, passes=2), _step(swp, inputs, passes=2)
        assert torch.equal(r[0], s[0]) and torch.equal(r[1], s[1])
        assert all(torch.equal(r[2][k], s[2][k]) for k in r[2])
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step == 1:  # every fetch of the second step was prefetched, across the two passes' recomputations
            assert swap.stats["prefetch_hits"] - before == 4 * 5
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), swp.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_fp8_base_swaps_exactly():
    """An fp8 base (`fp8.store_in_fp8`: fp8 weights with a float32 scale buffer, computed through its own autograd
    function) travels as its fp8 bytes and gives the same outputs and LoRA gradients."""
    from dit_distillery.fp8 import store_in_fp8

    ref, config = _model("qwen_image")
    assert store_in_fp8(ref, torch.float32)["layers"] > 0
    ref.enable_gradient_checkpointing()
    swp = copy.deepcopy(ref)
    swap = enable_block_swap(swp, 3, "cpu")
    assert any(e.dtype == torch.float8_e4m3fn for s in swap._stores for e in s.entries)
    inputs = _inputs("qwen_image", config)
    for _ in range(2):
        r, s = _step(ref, inputs, passes=2), _step(swp, inputs, passes=2)
        assert torch.equal(r[0], s[0]) and torch.equal(r[1], s[1])
        assert all(torch.equal(r[2][k], s[2][k]) for k in r[2])
        ref.zero_grad(set_to_none=True)
        swp.zero_grad(set_to_none=True)


def test_no_checkpointing_and_no_grad_are_exact():
    ref, config = _model("flux2")
    swp = copy.deepcopy(ref)
    enable_block_swap(swp, 5, "cpu")
    inputs = _inputs("flux2", config)
    r, s = _step(ref, inputs), _step(swp, inputs)  # autograd keeps the copies until their backward
    assert torch.equal(r[0], s[0]) and all(torch.equal(r[2][k], s[2][k]) for k in r[2])
    with torch.no_grad():
        x = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        for _ in range(3):
            assert torch.equal(ref(**x)[0], swp(**x)[0])


def test_sampling_with_swap_is_exact_and_disable_restores():
    pipe = families.get("qwen_image").tiny_pipeline(seed=0)
    base = pipe.sample("a red circle", seeds=[1, 2], steps=3, cfg_scale=2.0, output="latent").latents
    pipe.dit.requires_grad_(False)  # only frozen weights are swapped
    swap = enable_block_swap(pipe.dit, 2, "cpu")
    swapped = pipe.sample("a red circle", seeds=[1, 2], steps=3, cfg_scale=2.0, output="latent").latents
    assert torch.equal(base, swapped)
    assert swap.stats["prefetch_hits"] > 0  # after the first step, the next step's first block was prefetched
    disable_block_swap(pipe.dit)
    assert block_swap_of(pipe.dit) is None
    assert all(isinstance(p, torch.nn.Parameter) for p in pipe.dit.parameters())
    assert not pipe.dit._forward_hooks and not pipe.dit._forward_pre_hooks
    again = pipe.sample("a red circle", seeds=[1, 2], steps=3, cfg_scale=2.0, output="latent").latents
    assert torch.equal(base, again)


def test_order_is_nested_largest_first_and_spread():
    sizes = [10] * 8
    assert swap_order(sizes) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert chosen_blocks(sizes, 2) == [0, 4]
    mixed = [5, 5, 5, 9, 9, 0]  # FLUX.2-like: two sizes, and a block with nothing frozen
    assert swap_order(mixed) == [3, 4, 0, 2, 1]
    for n in range(6):
        assert set(chosen_blocks(mixed, n)) <= set(chosen_blocks(mixed, n + 1))


def test_refusals():
    model, config = _model("qwen_image", lora=False)
    with pytest.raises(DistilleryError, match="blocks_to_swap"):
        enable_block_swap(model, 6, "cpu")  # 5 blocks
    with pytest.raises(DistilleryError, match="blocks_to_swap"):
        enable_block_swap(model, True, "cpu")
    with pytest.raises(DistilleryError, match="memory plan"):
        enable_block_swap(model, "auto", "cpu")
    full = copy.deepcopy(model).requires_grad_(True)  # full training: nothing frozen, nothing to swap
    with pytest.raises(DistilleryError, match="every block trains"):
        enable_block_swap(full, 1, "cpu")
    enable_block_swap(model, 2, "cpu")
    next(p for n, p in model.named_parameters() if n.startswith(block_swap_of(model).names[0])).requires_grad_(True)
    with pytest.raises(DistilleryError, match="made trainable after"):
        with torch.no_grad():
            model(**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in _inputs("qwen_image", config).items()})


# ----------------------------------------------------------------------------------------------------------
# CUDA only

CUDA = torch.cuda.is_available()


def _wide_qwen(num_layers: int = 8):
    """A Qwen-Image DiT wide enough (1024) that a block's copy and compute take measurable time."""
    return _model_cfg(dict(num_layers=num_layers, num_attention_heads=8, attention_head_dim=128,
                           joint_attention_dim=64))


def _model_cfg(overrides):
    spec = families.get("qwen_image")
    config = spec.tiny_config(**overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.model_class()(**config).to(torch.bfloat16).requires_grad_(False)
    return model, config


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_pinned_exact_and_peak_memory_drops():
    model, config = _wide_qwen()
    inputs = families.get("qwen_image").example_inputs(config, batch=1, h=64, w=64, text_tokens=32, device="cuda",
                                                       dtype=torch.bfloat16)
    model.to("cuda")
    with torch.no_grad():
        ref = model(**inputs)[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model(**inputs)
    peak_resident = torch.cuda.max_memory_allocated()
    block = max(s for s in [sum(t.nbytes for t in b.parameters()) for _, b in block_list(model)])
    swap = enable_block_swap(model, 6, "cuda")
    assert all(s.host.is_pinned() for s in swap._stores)
    with torch.no_grad():
        model(**inputs)  # learns the order
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = model(**inputs)[0]
    torch.cuda.synchronize()
    peak_swap = torch.cuda.max_memory_allocated()
    assert torch.equal(ref, out)
    # 6 blocks leave the GPU and at most 2 come back at a time: at least 4 blocks' worth less (minus 5% slack)
    assert peak_resident - peak_swap > 4 * block * 0.95, (peak_resident, peak_swap, block)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_copies_overlap_compute():
    """With the side stream the copies hide behind compute: swapped forward time is closer to resident time
    than to the time of the same forward with synchronous fetches (prefetch off)."""
    import time

    model, config = _wide_qwen(12)
    inputs = families.get("qwen_image").example_inputs(config, batch=1, h=128, w=128, text_tokens=64,
                                                       device="cuda", dtype=torch.bfloat16)

    def timed():
        with torch.no_grad():
            for _ in range(2):
                model(**inputs)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                model(**inputs)
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / 5

    model.to("cuda")
    resident = timed()
    enable_block_swap(model, 4, "cuda", prefetch=False)
    serial = timed()
    enable_block_swap(model, 4, "cuda")
    overlapped = timed()
    assert overlapped < serial, (resident, serial, overlapped)
    assert overlapped - resident < 0.5 * (serial - resident), (resident, serial, overlapped)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_training_with_lora_and_checkpointing_is_exact():
    from peft import LoraConfig, inject_adapter_in_model

    model, config = _wide_qwen()
    inject_adapter_in_model(LoraConfig(r=4, target_modules=LORA_TARGETS["qwen_image"], init_lora_weights=False),
                            model)
    model.enable_gradient_checkpointing()
    other = copy.deepcopy(model).to("cuda")
    enable_block_swap(model, 6, "cuda")
    assert all(p.device.type == "cuda" for n, p in model.named_parameters() if p.requires_grad)
    inputs = families.get("qwen_image").example_inputs(config, batch=1, h=32, w=32, text_tokens=16, device="cuda",
                                                       dtype=torch.bfloat16)
    torch.backends.cudnn.deterministic = True
    for _ in range(2):
        r, s = _step(other, inputs, passes=2), _step(model, inputs, passes=2)
        assert torch.equal(r[0], s[0]) and all(torch.equal(r[2][k], s[2][k]) for k in r[2])
        other.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
