"""Prompt encoders (Qwen-Image's and the AAADiT tutorial's) and the locally built Qwen tokenizer."""

import pytest
import torch

from dit_distillery import tiny
from dit_distillery.errors import DistilleryError
from dit_distillery.text import Qwen3PromptEncoder, QwenImagePromptEncoder

PROMPTS = ["a red circle", "a large green triangle on a white background"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def qwen25vl(tokenizer):
    return tiny.tiny_qwen25vl_encoder(tokenizer)


@pytest.fixture(scope="module")
def qwen3(tokenizer):
    return tiny.tiny_qwen3_encoder(tokenizer)


def test_tokenizer_is_deterministic_and_saves(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    again = tiny.tiny_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    for word in tiny.COLOURS[:8] + ("circle", "square", "triangle", "on", "background"):
        assert len(tokenizer(" " + word).input_ids) == 1, word  # caption words are whole tokens
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        ids = tokenizer(special).input_ids  # one id each, as in Qwen's vocabulary
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [special]
    assert tokenizer.pad_token == "<|endoftext|>"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert loaded(PROMPTS[1]).input_ids == tokenizer(PROMPTS[1]).input_ids
    assert loaded.chat_template == tokenizer.chat_template


def test_chat_template_mimics_qwen3(tokenizer):
    messages = [{"role": "user", "content": "a red circle"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"


def test_qwen_image_encoder_drops_template_and_masks_padding(tokenizer, qwen25vl):
    encoder = QwenImagePromptEncoder(qwen25vl, tokenizer)
    out = encoder.encode(PROMPTS)
    template = encoder.template
    lengths = [len(tokenizer(template.format(p)).input_ids) - 34 for p in PROMPTS]
    assert encoder.drop_idx == 34 and template.startswith("<|im_start|>system\nDescribe the image")
    assert out.embeds.shape == (2, max(lengths), encoder.width) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == lengths
    assert float(out.embeds[0, lengths[0]:].abs().sum()) == 0.0  # padding is zeros, masked out
    # each row is the last hidden state of that prompt alone, without the 34 system-prompt tokens
    for i, p in enumerate(PROMPTS):
        ids = tokenizer([template.format(p)], return_tensors="pt")
        with torch.no_grad():
            hidden = qwen25vl(**ids, output_hidden_states=True).hidden_states[-1][0, 34:]
        assert torch.allclose(out.embeds[i, :lengths[i]], hidden, atol=1e-5)


def test_qwen_image_encoder_truncates_to_max_length(tokenizer, qwen25vl):
    encoder = QwenImagePromptEncoder(qwen25vl, tokenizer, max_length=5)
    assert encoder.encode(PROMPTS).embeds.shape[1] == 5
    with pytest.raises(DistilleryError):
        QwenImagePromptEncoder(qwen25vl, tokenizer, max_length=2000)


def test_qwen3_encoder_pads_to_max_length(tokenizer, qwen3):
    encoder = Qwen3PromptEncoder(qwen3, tokenizer, max_length=40)
    out = encoder.encode(PROMPTS)
    assert out.embeds.shape == (2, 40, 32) and encoder.width == 32
    texts = [encoder.chat_text(p) for p in PROMPTS]
    assert out.mask.sum(1).tolist() == [len(tokenizer(t).input_ids) for t in texts]
    assert bool(out.mask[:, 0].all()) and not bool(out.mask[:, -1].any())  # right padding
    tokens = tokenizer(texts, padding="max_length", max_length=40, return_tensors="pt")
    with torch.no_grad():
        hidden = qwen3(**tokens, output_hidden_states=True, use_cache=False).hidden_states[-1]
    assert torch.equal(out.embeds, hidden)
    two = Qwen3PromptEncoder(qwen3, tokenizer, max_length=40, hidden_layers=(-1, -2)).encode(PROMPTS[:1])
    assert two.embeds.shape == (1, 40, 64) and torch.equal(two.embeds[..., :32], out.embeds[:1])
    with pytest.raises(DistilleryError):
        Qwen3PromptEncoder(qwen3, tokenizer, hidden_layers=(7,))


def test_identity_names_weights_and_settings(tokenizer, qwen3):
    a = Qwen3PromptEncoder(qwen3, tokenizer, max_length=40)
    b = Qwen3PromptEncoder(tiny.tiny_qwen3_encoder(tokenizer), tiny.tiny_tokenizer(), max_length=40)
    assert a.identity == b.identity
    a.encode(PROMPTS)  # the tokenizer's padding state must not leak into the identity
    assert a.identity == b.identity
    assert Qwen3PromptEncoder(qwen3, tokenizer, max_length=41).identity != a.identity
    assert Qwen3PromptEncoder(tiny.tiny_qwen3_encoder(tokenizer, seed=5), tokenizer, max_length=40).identity != a.identity


def test_bad_prompts(tokenizer, qwen3):
    encoder = Qwen3PromptEncoder(qwen3, tokenizer)
    for bad in ([], [1, 2], None):
        with pytest.raises((DistilleryError, TypeError)):
            encoder.encode(bad)
