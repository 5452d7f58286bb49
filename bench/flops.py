"""FLOPs per sample of a DiT training step, counted analytically, and cross-checked with torch's FLOP counter.

Convention (the usual one for MFU, e.g. PaLM's appendix B): only matrix multiplications count. A Linear costs
2·in·out per token; attention costs 4·S²·d per layer forward (QKᵀ and AV over S tokens, d = heads × head dim);
norms, activations, softmax and the optimiser are ignored. A training step is 3× the forward (the backward
computes gradients for inputs and for weights, 2× the forward). That is the *model* FLOP count: recomputation
under gradient checkpointing is not counted, so MFU stays comparable between runs with and without it.

`count_with_torch` runs a model under `torch.utils.flop_counter.FlopCounterMode`, with SDPA forced onto its
math path so attention decomposes into counted matmuls (the CPU flash kernel is not registered with the counter).
"""

from __future__ import annotations

import torch


def aaadit_forward_flops(config: dict, image_tokens: int, text_tokens: int) -> dict:
    """Forward FLOPs of one AAADiT sample (config keys as `models.aaadit.AAADiT`)."""
    d, n = config["width"], config["num_blocks"]
    f = int(d * config.get("ffn_ratio", 3))
    c, t, tc = config["latent_channels"], config["text_width"], config.get("timestep_channels", 256)
    s = image_tokens + text_tokens
    per_block_linear = s * 2 * (4 * d * d + 2 * d * f)  # to_q/k/v/out + ff up/down, every token
    per_block_gate = 2 * d * 2 * d  # to_gate on the one timestep embedding
    per_block_attention = 4 * s * s * d
    parts = {
        "blocks_linear": n * per_block_linear,
        "blocks_gate": n * per_block_gate,
        "attention": n * per_block_attention,
        "image_embedder": 2 * c * d * image_tokens,
        "text_embedder": 2 * t * d * text_tokens,
        "timestep_embedder": 2 * (tc * d + d * d),
        "proj_out": 2 * d * c * image_tokens,  # image tokens only: the text outputs are sliced off first
    }
    return {"forward": sum(parts.values()), "parts": parts, "tokens": {"image": image_tokens, "text": text_tokens}}


def qwen_image_forward_flops(config: dict, image_tokens: int, text_tokens: int) -> dict:
    """Forward FLOPs of one Qwen-Image DiT sample (diffusers `QwenImageTransformer2DModel` config)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, joint, cin = config["num_layers"], config["joint_attention_dim"], config["in_channels"]
    out = config.get("out_channels") or cin // 4
    p = config.get("patch_size", 2)
    s = image_tokens + text_tokens
    # per stream: q, k, v, out projections (4 d²) and a GELU MLP d -> 4d -> d (8 d²), on every token of it
    per_block_linear = s * 2 * (4 * d * d + 8 * d * d)
    per_block_mod = 2 * 2 * (d * 6 * d)  # img_mod and txt_mod on the timestep embedding
    parts = {
        "blocks_linear": n * per_block_linear,
        "blocks_modulation": n * per_block_mod,
        "attention": n * 4 * s * s * d,
        "img_in": 2 * cin * d * image_tokens,
        "txt_in": 2 * joint * d * text_tokens,
        "timestep": 2 * (256 * d + d * d),
        "norm_out": 2 * d * 2 * d,
        "proj_out": 2 * d * p * p * out * image_tokens,
    }
    return {"forward": sum(parts.values()), "parts": parts, "tokens": {"image": image_tokens, "text": text_tokens}}


def training_flops(forward: int) -> int:
    """Model FLOPs of one training step of one sample: forward + backward (2x)."""
    return 3 * forward


def count_with_torch(fn, backward: bool = False) -> int:
    """FLOPs torch counts while `fn()` runs (and `fn().float().square().mean().backward()` when `backward`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = fn()
        if backward:
            out.float().square().mean().backward()
    return int(counter.get_total_flops())


def crosscheck_aaadit(config: dict | None = None, batch: int = 2, image_side: int = 4, text_tokens: int = 8) -> dict:
    """Analytic vs torch-counted FLOPs on a small AAADiT (CPU, fp32): forward exactly, training approximately.

    The backward of the very first matmuls (image/text embedders, timestep MLP) needs no input gradient, so the
    counted training FLOPs are a little below the analytic 3x; the forward must match to the FLOP.
    """
    from dit_distillery.models.aaadit import AAADiT, tiny_config

    config = config or dict(tiny_config(width=64, num_blocks=2, num_heads=4, latent_channels=16, text_width=32))
    torch.manual_seed(0)
    model = AAADiT(**config)
    latents = torch.randn(batch, config["latent_channels"], image_side, image_side)
    text = torch.randn(batch, text_tokens, config["text_width"])
    t = torch.rand(batch) * 1000
    counted_fwd = count_with_torch(lambda: model(latents, text, t))
    counted_train = count_with_torch(lambda: model(latents, text, t), backward=True)
    analytic = aaadit_forward_flops(config, image_side * image_side, text_tokens)["forward"] * batch
    return {"config": config, "batch": batch, "image_tokens": image_side * image_side, "text_tokens": text_tokens,
            "analytic_forward": analytic, "counted_forward": counted_fwd,
            "forward_match": counted_fwd == analytic,
            "analytic_train": training_flops(analytic), "counted_train": counted_train,
            "train_counted_over_analytic": counted_train / training_flops(analytic)}


def crosscheck_qwen_image(num_layers: int = 2, image_side: int = 4, text_tokens: int = 8) -> dict:
    """Analytic vs torch-counted forward FLOPs of a small diffusers Qwen-Image DiT (CPU, fp32)."""
    from dit_distillery.models.qwen_image import tiny_config
    from dit_distillery.tiny import tiny_qwen_image_dit

    config = tiny_config(num_layers=num_layers, joint_attention_dim=32)
    model = tiny_qwen_image_dit(32, num_layers=num_layers)
    tokens = torch.randn(1, image_side * image_side, config["in_channels"])
    text = torch.randn(1, text_tokens, 32)
    counted = count_with_torch(lambda: model(hidden_states=tokens, encoder_hidden_states=text,
                                             timestep=torch.tensor([0.5]), img_shapes=[[(1, image_side, image_side)]],
                                             return_dict=False)[0])
    analytic = qwen_image_forward_flops(config, image_side * image_side, text_tokens)["forward"]
    return {"config": config, "analytic_forward": analytic, "counted_forward": counted, "forward_match": counted == analytic}
