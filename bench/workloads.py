"""The models and sizes the benchmarks run, built identically for every side.

Real sizes are the issue's: the AAADiT tutorial model (0.13B) at 256² with a Qwen3-0.6B-shaped text encoder and
the FLUX.2 VAE; Qwen-Image's DiT at full width (3072, 24 heads x 128, text 3584) with 60 or 12 blocks, its
Qwen2.5-VL-7B-shaped text encoder and its VAE. Tiny sizes keep every architecture and every width that a
competitor hard-codes (DiffSynth's QwenImageDiT is always 3072 wide and its AAADiT always has 10 blocks and
1024-wide text), shrinking only what can shrink: block counts, resolutions, encoder depths, VAE channels.

All weights are random (nothing is downloaded). A builder called with the same seed gives bit-identical weights,
so each side builds its own copy in its own process and the copies agree. The tokenizer is
`dit_distillery.tiny.tiny_tokenizer()` (Qwen's tokenizer class, a small vocabulary trained locally); the real-size
text encoders keep their real vocabulary size (the token ids it produces are a subset), so their memory is real.
"""

from __future__ import annotations

import torch

# Qwen/Qwen3-0.6B config.json (the AAADiT tutorial's text encoder; DiffSynth's ZImageTextEncoder("0.6B")).
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000,
                 max_position_embeddings=40960, tie_word_embeddings=True, vocab_size=151936)
QWEN3_TINY = dict(QWEN3_06B, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
                  max_position_embeddings=1024)
# FLUX.2's VAE is diffusers' AutoencoderKLFlux2 with its defaults (DiffSynth's Flux2VAE has the same defaults).
FLUX2_VAE: dict = {}
FLUX2_VAE_TINY = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=32)
# Qwen-Image's VAE (diffusers AutoencoderKLQwenImage defaults = DiffSynth's QwenImageVAE defaults), and a tiny one.
QWEN_VAE: dict = {}
QWEN_VAE_TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
# Qwen/Qwen-Image text_encoder (Qwen2.5-VL-7B) text part; DiffSynth's QwenImageTextEncoder hard-codes the same.
QWEN25VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1_000_000, vocab_size=152064,
                        max_position_embeddings=128000, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN25VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31])
QWEN25VL_TINY_TEXT = dict(QWEN25VL_7B_TEXT, intermediate_size=3584, num_hidden_layers=1, max_position_embeddings=2048)
QWEN25VL_TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=3584,
                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                            fullatt_block_indexes=[0])


def tokenizer():
    from dit_distillery.tiny import tiny_tokenizer

    return tiny_tokenizer()


def _seeded(seed: int):
    from dit_distillery.tiny import seeded

    return seeded(seed)


# ----------------------------------------------------------------------------------------------------------
# AAADiT from scratch

def aaadit_config(tiny: bool) -> dict:
    from dit_distillery.models.aaadit import TUTORIAL_CONFIG

    # DiffSynth's tutorial class fixes 10 blocks, 32 heads, 128 latent channels and 1024-wide text; only the
    # width is an argument, so the tiny model is the tutorial's at width 64 (heads of 2).
    return dict(TUTORIAL_CONFIG, width=64) if tiny else dict(TUTORIAL_CONFIG)


def qwen3_encoder(tiny: bool, tok, seed: int = 1):
    from transformers import Qwen3Config, Qwen3Model

    values = dict(QWEN3_TINY if tiny else QWEN3_06B)
    if tiny:
        values["vocab_size"] = len(tok)
    ids = tok.convert_tokens_to_ids
    config = Qwen3Config(**values, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"))
    with _seeded(seed):
        return Qwen3Model(config).eval()


def flux2_vae(tiny: bool, seed: int = 2):
    from diffusers import AutoencoderKLFlux2

    with _seeded(seed):
        vae = AutoencoderKLFlux2(**(FLUX2_VAE_TINY if tiny else FLUX2_VAE)).eval()
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def aaadit(tiny: bool, seed: int = 0):
    from dit_distillery.models.aaadit import AAADiT

    with _seeded(seed):
        return AAADiT(**aaadit_config(tiny))


def aaadit_pipeline(tiny: bool, text_tokens: int = 128):
    """Our AAADiT text-to-image pipeline: the tutorial DiT, a Qwen3 encoder (fixed length, padding kept) and
    the FLUX.2 VAE codec (128 channels at 1/16)."""
    from dit_distillery.codecs import Flux2VAECodec
    from dit_distillery.pipelines import TextToImagePipeline
    from dit_distillery.text import Qwen3PromptEncoder

    tok = tokenizer()
    encoder = Qwen3PromptEncoder(qwen3_encoder(tiny, tok), tok, max_length=text_tokens)
    return TextToImagePipeline(aaadit(tiny), encoder, Flux2VAECodec(flux2_vae(tiny)), "aaadit")


# ----------------------------------------------------------------------------------------------------------
# Qwen-Image

def qwen_dit_config(num_layers: int) -> dict:
    from dit_distillery.models.qwen_image import QWEN_IMAGE_CONFIG

    return dict(QWEN_IMAGE_CONFIG, num_layers=num_layers)


def qwen_dit(num_layers: int, device, dtype, seed: int = 0):
    """diffusers' QwenImageTransformer2DModel at full width, parameters drawn on `device` in `dtype`."""
    from dit_distillery.models.qwen_image import model_class

    from bench.common import build_on

    return build_on(device, dtype, lambda: model_class()(**qwen_dit_config(num_layers)), seed=seed)


def qwen_text_encoder(tiny: bool, tok, device="cpu", dtype=torch.bfloat16, seed: int = 1):
    """transformers' Qwen2_5_VLForConditionalGeneration (the class diffusers' QwenImagePipeline uses); the real
    size (8B with the vision tower) is drawn directly on the device (`common.build_on`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from bench.common import build_on

    text = dict(QWEN25VL_TINY_TEXT if tiny else QWEN25VL_7B_TEXT)
    if tiny:
        text["vocab_size"] = len(tok)
    ids = tok.convert_tokens_to_ids
    special = dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    config = Qwen2_5_VLConfig(text_config=dict(text, **special),
                              vision_config=QWEN25VL_TINY_VISION if tiny else QWEN25VL_7B_VISION, **special)
    if tiny:
        with _seeded(seed):
            return Qwen2_5_VLForConditionalGeneration(config).eval().to(device, dtype)
    return build_on(device, dtype, lambda: Qwen2_5_VLForConditionalGeneration(config), seed=seed).eval()


def qwen_vae(tiny: bool, seed: int = 2):
    from diffusers import AutoencoderKLQwenImage

    with _seeded(seed):
        return AutoencoderKLQwenImage(**(QWEN_VAE_TINY if tiny else QWEN_VAE)).eval()


def qwen_text_embeds(batch: int, tokens: int, device, dtype, seed: int = 3) -> torch.Tensor:
    """Cached prompt embeddings [B, L, 3584] (what a text cache hands the DiT)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, 3584, generator=g).to(device, dtype)


def qwen_latents(batch: int, height: int, width: int, device, dtype=torch.float32, seed: int = 4) -> torch.Tensor:
    """Cached VAE latents [B, 16, H/8, W/8]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, height // 8, width // 8, generator=g).to(device, dtype)


def prompts(n: int, seed: int = 0) -> list[str]:
    from dit_distillery.gen_dataset import synthetic_prompts

    return synthetic_prompts(n, seed=seed)
