"""Depth shrinking of a DiT held in memory, for every family (AAADiT and small Qwen-Image models alike).

`shrink()` streams files too big for memory and is Qwen-Image-specific; this is its in-memory sibling for models
that fit: the demo's AAADiT teacher, and experiments that compare strategies. It uses the same block choice
(`plan.select_blocks`: uniform / first / interval / list / importance, the last block always kept last) and the
same importance score (ShortGPT's block influence, 1 - cos(block input, block output) over image tokens),
measured here with forward hooks on calibration inputs instead of block-by-block streaming.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from ..conditioning import TextEmbeds
from ..errors import DistilleryError
from ..velocity import base_model, family_of, predict_velocity
from .plan import select_blocks

_BLOCKS = {"aaadit": ("blocks", "num_blocks"), "qwen_image": ("transformer_blocks", "num_layers")}


def block_list(model) -> tuple[torch.nn.ModuleList, str, str]:
    """(the transformer blocks, their attribute name, the config key of their count) of any family's DiT."""
    family = family_of(model)
    attr, config_key = _BLOCKS[family]
    return getattr(base_model(model), attr), attr, config_key


def _image_part(family: str, output, image_tokens: int) -> torch.Tensor:
    if family == "qwen_image":  # (encoder_hidden_states, hidden_states)
        return output[1] if isinstance(output, tuple) else output
    return output[:, :image_tokens]  # AAADiT: [image tokens; text tokens]


@torch.no_grad()
def block_influence(model, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeds) -> list[float]:
    """1 - cos(input, output) of every block over image tokens, averaged over tokens and samples."""
    family = family_of(model)
    blocks, _, _ = block_list(model)
    h, w = latents.shape[-2:]
    image_tokens = h * w // 4 if family == "qwen_image" else h * w
    scores = [0.0] * len(blocks)
    handles = []

    def hook(i, module, args, kwargs, output):
        x_in = kwargs.get("hidden_states", kwargs.get("emb"))
        if x_in is None:
            x_in = args[0]
        x_in = x_in[:, :image_tokens] if family != "qwen_image" else x_in
        x_out = _image_part(family, output, image_tokens)
        scores[i] += float((1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)).mean())

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(functools.partial(hook, i), with_kwargs=True))
    try:
        predict_velocity(model, latents, sigma, text)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def drop_blocks(model, *, layers: int | None = None, strategy: str = "interval", keep_blocks=None,
                keep_first=None, scores=None) -> tuple[torch.nn.Module, list[int]]:
    """A new model keeping `layers` blocks (renumbered 0..N-1, source order) as exact copies; the source is
    unchanged. `scores` (one per block, higher = keep) is needed for strategy 'importance'."""
    family = family_of(model)
    source = base_model(model)
    blocks, attr, config_key = block_list(model)
    if strategy == "importance" and scores is None:
        raise DistilleryError("strategy", strategy, "needs block scores.",
                              "compute them with block_influence(model, latents, sigma, text).")
    kept = select_blocks(strategy, len(blocks), layers, keep_blocks=keep_blocks, keep_first=keep_first, scores=scores)
    config = {k: v for k, v in dict(source.config).items() if not k.startswith("_")}
    config[config_key] = len(kept)
    with torch.device("meta"):
        student = type(source)(**config)
    state = {}
    prefix = attr + "."
    for key, value in source.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in kept:
                state[f"{prefix}{kept.index(int(index))}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    student.load_state_dict(state, assign=True, strict=True)
    # buffers that are not in the state dict (e.g. Qwen-Image's RoPE tables) are rebuilt off the meta device
    if family == "qwen_image":
        student.pos_embed = copy.deepcopy(source.pos_embed)
    return student.to(next(source.parameters()).device).train(source.training), kept
