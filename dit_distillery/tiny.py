"""Tiny random components of every family, and a tokenizer built locally: tests and the demo never download.

Every builder is deterministic given its seed (it draws from a forked RNG, leaving the caller's untouched).
The classes are the real ones (transformers' Qwen2.5-VL / Qwen3, diffusers' VAEs and Qwen-Image DiT, our
AAADiT), only the sizes are small, so everything that runs on a tiny model runs unchanged on the real one.

The tokenizer is transformers' own `Qwen2Tokenizer` (Qwen's pre-tokenizer and byte-level BPE) over a small
vocabulary trained here with the `tokenizers` library on an embedded corpus, plus Qwen's special tokens and a
chat template that renders like Qwen3's (including `enable_thinking=False`).
"""

from __future__ import annotations

import contextlib
import functools
import json

import torch

# Words of the synthetic-shapes captions, the prompt templates and a little general English.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "rectangle", "ellipse")
_CORPUS_LINES = (
    "{a} {c} {s} on {ab} {b} background",
    "a small {c} {s} on {ab} {b} background",
    "a large {c} {s} on {ab} {b} background",
    "two {c} {s}s on {ab} {b} background",
)
_TEMPLATE_TEXT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:",
    "system user assistant",
    "a photo of a cat, a dog, a house, a tree, a car, a person, a flower, sharp claws, smiling expression",
    "the quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Renders like Qwen3's template for plain user/assistant turns (no tools).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def corpus() -> list[str]:
    lines = list(_TEMPLATE_TEXT)
    for c in COLOURS:
        for s in SHAPES:
            for b in COLOURS:
                if b != c:
                    lines.extend(t.format(c=c, s=s, b=b, a=_article(c), ab=_article(b)) for t in _CORPUS_LINES)
    return lines


@functools.lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int) -> tuple[dict, tuple]:
    """(vocab, merges) of a byte-level BPE trained on `corpus()`; cached, since training takes most of a second."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    # The same normalizer and pre-tokenizer as Qwen2Tokenizer, so the trained merges fit it.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], tuple(tuple(m) for m in model["merges"])


def tiny_tokenizer(vocab_size: int = 512):
    """A Qwen2Tokenizer with a small byte-level BPE vocabulary trained (deterministically) on `corpus()`."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _trained_bpe(vocab_size)
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _special_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(vocab_size=len(tokenizer), bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))


def tiny_qwen3_encoder(tokenizer=None, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A Qwen3Model (the AAADiT tutorial's text encoder class) with a tiny config."""
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tokenizer or tiny_tokenizer()
    heads = max(2, hidden_size // 16)
    config = Qwen3Config(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         head_dim=hidden_size // heads, max_position_embeddings=1024, **_special_ids(tokenizer))
    with seeded(seed):
        return Qwen3Model(config).eval()


def tiny_qwen25vl_encoder(tokenizer=None, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A Qwen2_5_VLForConditionalGeneration (the class diffusers' QwenImagePipeline uses), tiny text + vision."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer or tiny_tokenizer()
    heads = max(2, hidden_size // 8)
    head_dim = hidden_size // heads
    quarter = head_dim // 4  # mrope sections must sum to head_dim / 2
    special = _special_ids(tokenizer)
    text = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [quarter, quarter, head_dim // 2 - 2 * quarter]},
                **special)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=56)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    with seeded(seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_vae(seed: int = 0):
    """diffusers' AutoencoderKLQwenImage, tiny (16 latent channels at 1/8, Qwen-Image's latents mean/std)."""
    from diffusers import AutoencoderKLQwenImage

    with seeded(seed):
        return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True, True]).eval()


def tiny_flux2_vae(seed: int = 0):
    """diffusers' AutoencoderKLFlux2, tiny (32 channels at 1/8), with non-trivial BatchNorm running stats."""
    from diffusers import AutoencoderKLFlux2

    with seeded(seed):
        vae = AutoencoderKLFlux2(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                                 latent_channels=32).eval()
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def tiny_qwen_image_dit(joint_attention_dim: int = 32, num_layers: int = 2, seed: int = 0, **kwargs):
    """diffusers' QwenImageTransformer2DModel with `families.qwen_image.tiny_config`."""
    from .families import qwen_image

    config = qwen_image.tiny_config(num_layers=num_layers, joint_attention_dim=joint_attention_dim, **kwargs)
    with seeded(seed):
        return qwen_image.model_class()(**config).eval()


def tiny_aaadit(text_width: int = 32, latent_channels: int = 128, seed: int = 0, **overrides):
    """Our AAADiT with `families.aaadit.tiny_config` (overrides: any AAADiT argument, e.g. width, num_blocks)."""
    from .models import aaadit

    config = aaadit.tiny_config(latent_channels=latent_channels, text_width=text_width)
    config.update(overrides)
    with seeded(seed):
        return aaadit.AAADiT(**config).eval()


TINY_DEFAULTS = dict(steps=8, cfg_scale=1.0, height=32, width=32)


def tiny_pipeline(family: str = "aaadit", seed: int = 0):
    """A complete tiny text-to-image pipeline of a family, with its real codec and prompt-encoder classes (each
    family composes its own from the builders above: `Family.tiny_pipeline`)."""
    from . import families

    return families.get(family).tiny_pipeline(seed)


# The demo's default, sized for CPUs: with batch 32, lr 1e-3 and DiffSynth's loss weights, 5 minutes of training
# on one thread (about 1,500 steps on 32x32 synthetic shapes) got background and shape colour right in 48 of 48
# and 47 of 48 samples (20 steps, cfg 3); the shapes themselves need longer. Width 192 x 5 blocks with 48 text
# tokens ran three times slower per step and had learnt neither after the same 5 minutes.
DEFAULT_PIXEL_PATCH = 4
DEFAULT_TEXT_WIDTH = 64
DEFAULT_TEXT_TOKENS = 32  # the chat template and a shapes caption take about 20
DEFAULT_SAMPLING = dict(steps=20, cfg_scale=3.0, height=32, width=32)
DEFAULT_DIT = dict(width=128, num_blocks=4, num_heads=4, ffn_ratio=3, pos_grid=[8, 8], timestep_channels=128)


def embedded_default_pipeline(seed: int = 0):
    """The demo's default pipeline: a small AAADiT over `PixelCodec(4)` with a tiny Qwen3 encoder (random)."""
    from .codecs import PixelCodec
    from .pipelines import TextToImagePipeline
    from .text import Qwen3PromptEncoder

    tokenizer = tiny_tokenizer()
    encoder = Qwen3PromptEncoder(tiny_qwen3_encoder(tokenizer, hidden_size=DEFAULT_TEXT_WIDTH, seed=seed + 1),
                                 tokenizer, max_length=DEFAULT_TEXT_TOKENS)
    codec = PixelCodec(DEFAULT_PIXEL_PATCH)
    dit = tiny_aaadit(encoder.width, codec.latent_channels, seed=seed, **DEFAULT_DIT)
    return TextToImagePipeline(dit, encoder, codec, defaults=DEFAULT_SAMPLING)
