"""Depth shrinking of a DiT held in memory, for every family (AAADiT and small Qwen-Image models alike).

`shrink()` streams files too big for memory and slices width too; this is its in-memory sibling for models that
fit: the demo's AAADiT teacher, and experiments that compare strategies. It uses the same block choice
(`plan.select_blocks`: uniform / first / interval / list / importance, the last block always kept last) and the
same importance score (ShortGPT's block influence, 1 - cos(block input, block output) over image tokens),
measured here with forward hooks on calibration inputs instead of block-by-block streaming.

Which blocks there are comes from the family (`Family.block_groups`): a depth shrink changes one group (the
main one unless `group` names another) and never a group marked `keep`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import families
from ..conditioning import TextEmbeds
from ..errors import DistilleryError
from ..velocity import base_model, predict_velocity
from .plan import select_blocks


def block_list(model, group: str | None = None) -> tuple[torch.nn.ModuleList, str, str]:
    """(the transformer blocks, their attribute name, the config key of their count) of a block group of any
    family's DiT (default: its main group)."""
    g = families.of_model(model).group(group)
    return getattr(base_model(model), g.attr), g.attr, g.count_key


@torch.no_grad()
def block_influence(model, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeds,
                    group: str | None = None) -> list[float]:
    """1 - cos(input, output) of every block of a group over image tokens, averaged over tokens and samples."""
    family = families.of_model(model)
    g = family.group(group)
    blocks = getattr(base_model(model), g.attr)
    image_tokens = family.image_tokens(*latents.shape[-2:])
    scores = [0.0] * len(blocks)
    handles = []

    def hook(i, module, args, kwargs, output):
        x_in, x_out = g.image_io(args, kwargs, output, image_tokens)
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
                keep_first=None, scores=None, group: str | None = None) -> tuple[torch.nn.Module, list[int]]:
    """A new model keeping `layers` blocks of a group (renumbered 0..N-1, source order) as exact copies; the
    source is unchanged. `scores` (one per block, higher = keep) is needed for strategy 'importance'."""
    family = families.of_model(model)
    g = family.group(group)
    if g.keep:
        raise DistilleryError("group", g.attr, f"{family.title}'s {g.attr} are never dropped (stock ComfyUI and the "
                              "model expect all of them).", f"shrink {family.main_group().attr} instead.")
    source = base_model(model)
    blocks = getattr(source, g.attr)
    if strategy == "importance" and scores is None:
        raise DistilleryError("strategy", strategy, "needs block scores.",
                              "compute them with block_influence(model, latents, sigma, text).")
    if strategy == "learnable":
        raise DistilleryError("strategy", strategy, "needs the learnt blocks.",
                              "learn them with shrink.learnable.learn_blocks(model, layers, calibration), then pass "
                              "strategy='list', keep_blocks=result.kept[group].")
    kept = select_blocks(strategy, len(blocks), layers, keep_blocks=keep_blocks, keep_first=keep_first, scores=scores,
                         family=family)
    config = {k: v for k, v in dict(source.config).items() if not k.startswith("_")}
    config[g.count_key] = len(kept)
    # accelerate's init_empty_weights puts only parameters on meta: buffers and plain tensors built in __init__
    # (Qwen-Image's RoPE tables) are real, so the student runs once its parameters are assigned
    from accelerate import init_empty_weights

    with init_empty_weights():
        student = type(source)(**config)
    state = {}
    prefix = g.prefix
    for key, value in source.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in kept:
                state[f"{prefix}{kept.index(int(index))}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    student.load_state_dict(state, assign=True, strict=True)
    return student.to(next(source.parameters()).device).train(source.training), kept
