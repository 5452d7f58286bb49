"""Single text-encoder files of the Qwen encoders several families use (ComfyUI's `models/text_encoders`), read
without a config folder: tensor names -> transformers' text-only classes, and a transformers config from the
file's shapes. The released configs live in each family module; this module only reads a file against them.

Names: ComfyUI keeps the original checkpoints' names (`model.layers.N...`, `model.embed_tokens`, `model.norm`,
Qwen2.5-VL's `visual.*`, an `lm_head`); newer transformers checkpoints nest the text model under
`model.language_model.` and the vision tower under `model.visual.`. Only the text model is loaded: prompts are
text, so diffusers' pipelines never run the vision tower or the LM head (they read hidden states).
"""

from __future__ import annotations

from ..errors import DistilleryError

QWEN25_HEAD_DIM = 128  # every Qwen2.5 size; its M-RoPE sections (16, 24, 24) need exactly this


def _layers(keys) -> int:
    found = {int(k.split(".")[1]) for k in keys if k.startswith("layers.") and k.split(".")[1].isdigit()}
    if found != set(range(len(found))):
        raise DistilleryError("text_encoder", f"layers {sorted(found)[:5]}...", "layer indices are not contiguous "
                              "from 0.", "the file is incomplete: download it again.")
    return len(found)


def _need(keys, needed: dict[str, str], what: str, fix: str) -> None:
    keys = set(keys)
    for key, why in needed.items():
        if key not in keys:
            raise DistilleryError("text_encoder", f"{len(keys)} tensors", f"not {what} ({why}: no {key!r}).", fix)


def qwen3_key(key: str) -> str | None:
    """A Qwen3 checkpoint's tensor name -> `Qwen3Model`'s; None for the LM head (prompts use hidden states)."""
    if key.startswith("lm_head."):
        return None
    return key[len("model."):] if key.startswith("model.") else key


def qwen3_config(shape_of, keys, releases: dict[int, dict], what: str, fix: str):
    """("Qwen3Model", its Qwen3Config) for a file's tensors (`qwen3_key` names): the released config of the file's
    width when there is one (the caller then checks every shape against it), else one read from the shapes (the
    released config's other settings kept), so smaller Qwen3 files and tests' tiny ones load too."""
    from transformers import Qwen3Config

    keys = list(keys)
    _need(keys, {"embed_tokens.weight": "no token embedding", "layers.0.self_attn.q_norm.weight": "Qwen3 normalises "
                 "queries per head", "norm.weight": "no final norm"}, what, fix)
    vocab, hidden = shape_of("embed_tokens.weight")
    if hidden in releases:
        return "Qwen3Model", Qwen3Config(**releases[hidden])
    head_dim = shape_of("layers.0.self_attn.q_norm.weight")[0]
    config = dict(next(iter(releases.values())), vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
                  num_hidden_layers=_layers(keys), intermediate_size=shape_of("layers.0.mlp.gate_proj.weight")[0],
                  num_attention_heads=shape_of("layers.0.self_attn.q_proj.weight")[0] // head_dim,
                  num_key_value_heads=shape_of("layers.0.self_attn.k_proj.weight")[0] // head_dim)
    return "Qwen3Model", Qwen3Config(**config)


def qwen25_vl_key(key: str) -> str | None:
    """A Qwen2.5-VL checkpoint's tensor name -> `Qwen2_5_VLTextModel`'s; None for the vision tower and LM head."""
    if key.startswith(("visual.", "model.visual.", "lm_head.")):
        return None
    for prefix in ("model.language_model.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def qwen25_vl_config(shape_of, keys, release: dict, what: str, fix: str):
    """("Qwen2_5_VLTextModel", its text config) for a file's tensors (`qwen25_vl_key` names): the released
    Qwen2.5-VL config (transformers' `Qwen2_5_VLConfig`) when the width is the release's, else one read from the
    shapes with the release's other settings (heads of 128)."""
    from transformers import Qwen2_5_VLConfig

    keys = list(keys)
    if "layers.0.self_attn.q_norm.weight" in set(keys):
        raise DistilleryError("text_encoder", f"{len(keys)} tensors", f"not {what}: it normalises queries per head, "
                              "as Qwen3 does, not Qwen2.5.", fix)
    _need(keys, {"embed_tokens.weight": "no token embedding", "layers.0.self_attn.q_proj.bias": "Qwen2.5's "
                 "attention has biases", "norm.weight": "no final norm"}, what, fix)
    vocab, hidden = shape_of("embed_tokens.weight")
    text = dict(release["text_config"])
    if hidden != text["hidden_size"]:
        if hidden % QWEN25_HEAD_DIM:
            raise DistilleryError("text_encoder", f"width {hidden}", f"not {what}: Qwen2.5's width is a multiple "
                                  f"of its {QWEN25_HEAD_DIM}-wide heads.", fix)
        text.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_layers(keys),
                    intermediate_size=shape_of("layers.0.mlp.gate_proj.weight")[0],
                    num_attention_heads=hidden // QWEN25_HEAD_DIM,
                    num_key_value_heads=shape_of("layers.0.self_attn.k_proj.weight")[0] // QWEN25_HEAD_DIM)
    config = Qwen2_5_VLConfig(**dict(release, text_config=text))
    return "Qwen2_5_VLTextModel", config.text_config
