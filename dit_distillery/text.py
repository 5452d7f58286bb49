"""Prompt encoders: a text encoder + tokenizer behind `encode(list[str]) -> TextEmbeds`.

* `QwenImagePromptEncoder`: Qwen-Image's Qwen2.5-VL encoder. We call diffusers' own
  `QwenImagePipeline._get_qwen_prompt_embeds` on a pipeline that holds only the text encoder and tokenizer, so
  the system template, the 34 dropped prefix tokens and the per-prompt lengths are diffusers' (= DiffSynth's).
  Prompts of different lengths come back right-padded with a mask.
* `Qwen3PromptEncoder`: the AAADiT tutorial's Qwen3-0.6B: chat template with `enable_thinking=False`,
  padded to `max_length` (128), last hidden state (or several layers concatenated). DiffSynth gives the mask
  only to the encoder; we return it too, and the DiT decides whether to use it.

`identity` names the weights and settings the embeddings depend on (the dataset cache keys on it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .codecs import module_fingerprint
from .conditioning import TextEmbeds
from .errors import DistilleryError


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DistilleryError("prompt", prompts, "expected a non-empty list of strings.", "give one prompt per image.")
    return prompts


# ----------------------------------------------------------------------------------------------------------
# Tokenizers shipped with the pack (dit_distillery/tokenizers/README.md): single text-encoder files need no download

TOKENIZERS = Path(__file__).parent / "tokenizers"
# Qwen3's tokens after Qwen2.5's last (<|file_sep|>, 151664), in id order: 151665-151668, not special (as Qwen3's own)
QWEN3_ADDED_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
# Qwen3's chat template for what prompt encoding renders: system and user turns, the generation prompt, and the empty
# think block `enable_thinking=False` adds (no default system prompt, unlike Qwen2.5's). Tools and reasoning in
# assistant turns are left out: give the model's own tokenizer folder (--tokenizer) for chat use.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
BUNDLED = ("qwen2_5", "qwen3")


def bundled_tokenizer(name: str, field: str = "tokenizer"):
    """A tokenizer shipped with the pack: "qwen2_5" (Qwen-Image's Qwen2.5-VL) or "qwen3" (Qwen3's: the same
    vocabulary and merges plus its four added tokens and chat template). A fresh object on every call."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    if name not in BUNDLED:
        raise DistilleryError(field, name, "no tokenizer of this name ships with the pack.",
                              f"give the model's tokenizer folder, or one of {list(BUNDLED)}.")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2_5")
    if name == "qwen3":
        first = len(tokenizer)
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED_TOKENS])
        if tokenizer.convert_tokens_to_ids("</think>") != first + 3 or first != 151665:
            raise RuntimeError("the shipped Qwen2.5 tokenizer files changed: Qwen3's added tokens got other ids")
        tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what maps text to ids: vocabulary, merges, added tokens, chat template.

    Padding/truncation state is left out: a fast tokenizer stores the last call's settings in its backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        parts = {"vocab": sorted(tokenizer.get_vocab().items())}
    else:
        full = json.loads(backend.to_str())
        parts = {k: full.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    parts["chat_template"] = getattr(tokenizer, "chat_template", None)
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


class PromptEncoder:
    """Base class: `identity`, `encode(prompts) -> TextEmbeds` (on the encoder's device, in its dtype)."""

    kind = "prompt_encoder"
    # Whether the padding positions of an encoding may be dropped (and re-padded with zeros by `data.collate`)
    # without changing what the DiT computes: true only when the DiT masks padding out. The AAADiT tutorial's
    # DiT attends to the hidden states of Qwen3's padding tokens, so its encoder keeps them.
    trims_padding = False

    def __init__(self, text_encoder, tokenizer, identity: str | None = None):
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._identity = identity

    def settings(self) -> str:
        """The encoding settings that change the result (part of the identity)."""
        return ""

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = f"{self.kind}:{module_fingerprint(self.text_encoder)}:tok{tokenizer_fingerprint(self.tokenizer)}"
        return f"{self._identity}|{self.settings()}"

    @identity.setter
    def identity(self, value: str) -> None:
        self._identity = value

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def width(self) -> int:
        """The embedding width D of `[B, L, D]`."""
        raise NotImplementedError

    def to(self, device=None, dtype=None) -> "PromptEncoder":
        self.text_encoder.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return self

    def encode(self, prompts: list[str]) -> TextEmbeds:
        raise NotImplementedError


class QwenImagePromptEncoder(PromptEncoder):
    """Qwen-Image's prompt encoding, by diffusers' QwenImagePipeline itself (template, drop_idx 34)."""

    kind = "qwen25vl"
    trims_padding = True  # Qwen-Image passes the mask to the DiT (encoder_hidden_states_mask)

    def __init__(self, text_encoder, tokenizer, max_length: int = 1024, identity: str | None = None):
        super().__init__(text_encoder, tokenizer, identity)
        if not isinstance(max_length, int) or not 1 <= max_length <= 1024:
            raise DistilleryError("max_length", max_length, "must be between 1 and 1024 tokens (Qwen-Image's limit).",
                                  "use 1024 (the default) or less.")
        self.max_length = max_length
        from diffusers import QwenImagePipeline

        # A pipeline with only the prompt components: diffusers' encoding code runs unchanged on it.
        self._pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder,
                                       tokenizer=tokenizer, transformer=None)
        self._pipe.tokenizer_max_length = max_length
        self.template = self._pipe.prompt_template_encode
        self.drop_idx = self._pipe.prompt_template_encode_start_idx

    def settings(self) -> str:
        return f"max{self.max_length}:drop{self.drop_idx}"

    @property
    def width(self) -> int:
        config = self.text_encoder.config
        return int(getattr(config, "text_config", config).hidden_size)

    def encode(self, prompts: list[str]) -> TextEmbeds:
        prompts = _check_prompts(prompts)
        with torch.no_grad():
            embeds, mask = self._pipe._get_qwen_prompt_embeds(prompts, device=self.device, dtype=self.dtype)
        return TextEmbeds(embeds, mask.bool())


class Qwen3PromptEncoder(PromptEncoder):
    """The AAADiT tutorial's text encoding: Qwen3 chat template (no thinking), fixed length, chosen layers."""

    kind = "qwen3"

    def __init__(self, text_encoder, tokenizer, max_length: int = 128, hidden_layers: tuple[int, ...] = (-1,),
                 identity: str | None = None):
        super().__init__(text_encoder, tokenizer, identity)
        if not isinstance(max_length, int) or max_length < 1:
            raise DistilleryError("max_length", max_length, "must be a positive number of tokens.", "use 128 (the default).")
        layers = self.text_encoder.config.num_hidden_layers
        if not hidden_layers or any(not -layers - 1 <= k <= layers for k in hidden_layers):
            raise DistilleryError("hidden_layers", hidden_layers, f"the encoder has hidden states 0..{layers}.",
                                  "use (-1,) for the last layer, as the AAADiT tutorial.")
        self.max_length = max_length
        self.hidden_layers = tuple(int(k) for k in hidden_layers)

    def settings(self) -> str:
        return f"max{self.max_length}:layers{','.join(map(str, self.hidden_layers))}"

    @property
    def width(self) -> int:
        return int(self.text_encoder.config.hidden_size) * len(self.hidden_layers)

    def chat_text(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)

    def encode(self, prompts: list[str]) -> TextEmbeds:
        prompts = _check_prompts(prompts)
        texts = [self.chat_text(p) for p in prompts]
        tokens = self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                                max_length=self.max_length).to(self.device)
        with torch.no_grad():
            out = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                    output_hidden_states=True, use_cache=False)
        embeds = torch.cat([out.hidden_states[k] for k in self.hidden_layers], dim=-1)
        return TextEmbeds(embeds.to(self.dtype), tokens.attention_mask.bool())


class ZImagePromptEncoder(PromptEncoder):
    """Z-Image's prompt encoding, by diffusers' ZImagePipeline itself: Qwen3's chat template (thinking on, so no
    think block), at most `max_length` tokens (512), the second-to-last hidden state, padding dropped. Prompts of
    different lengths come back right-padded with a mask; the DiT takes only the real tokens (`Family.velocity`)."""

    kind = "z_image_qwen3"
    trims_padding = True  # the DiT receives each prompt's real tokens only

    def __init__(self, text_encoder, tokenizer, max_length: int = 512, identity: str | None = None):
        super().__init__(text_encoder, tokenizer, identity)
        if not isinstance(max_length, int) or not 1 <= max_length <= 512:
            raise DistilleryError("max_length", max_length, "must be between 1 and 512 tokens (Z-Image's limit).",
                                  "use 512 (the default) or less.")
        self.max_length = max_length
        from diffusers import ZImagePipeline

        # A pipeline with only the prompt components: diffusers' encoding code runs unchanged on it.
        self._pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=tokenizer,
                                    transformer=None)

    def settings(self) -> str:
        return f"max{self.max_length}:layer-2"

    @property
    def width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def encode(self, prompts: list[str]) -> TextEmbeds:
        prompts = _check_prompts(prompts)
        with torch.no_grad():  # (diffusers rewrites the list it is given in place: give it a copy)
            rows = self._pipe._encode_prompt(list(prompts), device=self.device, max_sequence_length=self.max_length)
        length = max(len(r) for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=embeds.device)
        for i, r in enumerate(rows):
            embeds[i, : len(r)] = r
            mask[i, : len(r)] = True
        return TextEmbeds(embeds.to(self.dtype), mask)
