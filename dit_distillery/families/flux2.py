"""FLUX.2 [klein] (4B and 9B), as diffusers' `Flux2Transformer2DModel` with its `Flux2KleinPipeline` around it.

The DiT takes the VAE's latents already patchified 2x2 and batch-norm normalised (`codecs.Flux2VAECodec`: 128
channels at 1/16, ComfyUI's LATENT for FLUX.2 too), so one latent pixel is one token (`patch` 1). Prompts are
Qwen3's hidden states 9, 18 and 27 concatenated, always 512 tokens with the padding kept (the DiT sees no mask);
the schedule is FLUX.2's empirical mu (`schedule` template "FLUX.2").

Base and step-distilled klein share one architecture (no guidance embedder): the presets name the architecture,
and the sampling defaults come from where the model came from. A diffusers folder's model_index.json says
`is_distilled` (4 steps, CFG off); otherwise the base's 50 steps at CFG 4, and a user of a distilled single file
sets steps 4 and cfg 1 (`Family.folder_defaults`).

ComfyUI (the mapping follows ComfyUI v0.38.1, `comfy/model_detection.py` "flux2" and `comfy/utils.flux_to_diffusers`)
reads only the original BFL names (`double_blocks`, `single_blocks`, `*_modulation.lin`, `img_in`, fused qkv,
the final layer's modulation as (shift, scale)): `to_comfy` writes them, LoRAs are saved as
`diffusion_model.<BFL module>` with q/k/v fused into one exact rank-3r adapter.
"""

from __future__ import annotations

from ..errors import DistilleryError
from .base import BlockGroup, Dims, Family, WidthLayout


def _config(num_layers, num_single_layers, heads, joint_attention_dim) -> dict:
    return {"patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": num_layers,
            "num_single_layers": num_single_layers, "attention_head_dim": 128, "num_attention_heads": heads,
            "joint_attention_dim": joint_attention_dim, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
            "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False}


# black-forest-labs/FLUX.2-klein-4B and -9B (base and distilled alike): Qwen3-4B / Qwen3-8B text (3 layers x 2560 /
# 4096), 5 + 20 / 8 + 24 blocks, 24 / 32 heads of 128.
KLEIN_4B_CONFIG = _config(5, 20, 24, 7680)
KLEIN_9B_CONFIG = _config(8, 24, 32, 12288)
KLEIN_4B_PARAMS = 3_875_544_576
KLEIN_9B_PARAMS = 9_078_581_248

# Their text encoders, Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json (ComfyUI's qwen_3_4b / qwen_3_8b files): a single
# text-encoder file is read with the one of its width (`Flux2Family.text_encoder_from_shapes`).
_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "num_hidden_layers": 36,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
          "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "attention_bias": False,
          "bos_token_id": 151643, "eos_token_id": 151645}
QWEN3_4B_CONFIG = dict(_QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True)
QWEN3_8B_CONFIG = dict(_QWEN3, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)

TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers (hidden states, not decoder layers)
TEXT_TOKENS = 512
BASE_DEFAULTS = dict(steps=50, cfg_scale=4.0, height=1024, width=1024)  # Flux2KleinPipeline's defaults
DISTILLED_DEFAULTS = dict(steps=4, cfg_scale=1.0, height=1024, width=1024)  # klein (distilled): 4 steps, no CFG

# ComfyUI's flux2 detection fixes these (everything else is read from the tensors' shapes).
COMFY_FIXED = {"attention_head_dim": 128, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
               "patch_size": 1, "timestep_guidance_channels": 256}

# -- names: ours (diffusers) <-> BFL / ComfyUI, per module (a module's parameter is `.weight`, BFL norms `.scale`)
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (scale, shift) here, (shift, scale) there
}
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
        "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
        "attn.add_v_proj": ("txt_attn.qkv", 2)}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}
SWAPPED = "norm_out.linear"
DOUBLE, SINGLE = "transformer_blocks.", "single_transformer_blocks."
BFL_DOUBLE, BFL_SINGLE = "double_blocks.", "single_blocks."
COMFY_LORA_PREFIX = "diffusion_model."


def _to_bfl_module(name: str) -> tuple[str, int | None]:
    """(BFL module name, index inside a fused qkv or None) of one of our module names."""
    if name in _GLOBAL:
        return _GLOBAL[name], None
    for ours, theirs, table in ((DOUBLE, BFL_DOUBLE, _DOUBLE), (SINGLE, BFL_SINGLE, _SINGLE)):
        if name.startswith(ours):
            index, rest = name[len(ours):].split(".", 1)
            if table is _DOUBLE and rest in _QKV:
                fused, part = _QKV[rest]
                return f"{theirs}{index}.{fused}", part
            if rest in table:
                return f"{theirs}{index}.{table[rest]}", None
    raise KeyError(name)


_FROM_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_FROM_DOUBLE = {v: k for k, v in _DOUBLE.items()}
_FROM_SINGLE = {v: k for k, v in _SINGLE.items()}
_FROM_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def _from_bfl_module(name: str) -> tuple[str, ...] | None:
    """Our module name(s) of a BFL module (three for a fused qkv), or None when it is not a BFL name."""
    if name in _FROM_GLOBAL:
        return (_FROM_GLOBAL[name],)
    for theirs, ours, table in ((BFL_DOUBLE, DOUBLE, _FROM_DOUBLE), (BFL_SINGLE, SINGLE, _FROM_SINGLE)):
        if name.startswith(theirs):
            index, rest = name[len(theirs):].split(".", 1)
            if table is _FROM_DOUBLE and rest in _FROM_QKV:
                return tuple(f"{ours}{index}.{m}" for m in _FROM_QKV[rest])
            if rest in table:
                return (f"{ours}{index}.{table[rest]}",)
    return None


def _swap_halves(t):
    import torch

    first, second = t.chunk(2, 0)
    return torch.cat([second, first], 0)


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def to_bfl(state: dict) -> dict:
    """Our (diffusers) tensor names -> BFL's (ComfyUI's UNETLoader and the official klein files)."""
    import torch

    out, fused = {}, {}
    for key, value in state.items():
        module, param = _split_param(key)
        name, part = _to_bfl_module(module)
        if name.endswith("_norm"):
            param = "scale"
        if part is not None:
            fused.setdefault(f"{name}.{param}", [None] * 3)[part] = value
        else:
            out[f"{name}.{param}"] = _swap_halves(value) if module == SWAPPED else value
    for key, parts in fused.items():
        if any(p is None for p in parts):
            raise DistilleryError("state", key, "has only part of its q, k and v.", "save the whole model.")
        out[key] = torch.cat(parts, 0)
    return out


def from_bfl(state: dict) -> dict:
    """BFL / ComfyUI names (norms as `.scale` or `.weight`) -> ours; names already ours pass unchanged."""
    out = {}
    for key, value in state.items():
        module, param = _split_param(key)
        ours = _from_bfl_module(module)
        if ours is None:
            out[key] = value
            continue
        param = "weight"
        if len(ours) == 3:
            for name, chunk in zip(ours, value.chunk(3, 0)):
                out[f"{name}.{param}"] = chunk
        else:
            out[f"{ours[0]}.{param}"] = _swap_halves(value) if ours[0] == SWAPPED else value
    return out


def is_bfl(keys) -> bool:
    return any(k.startswith((BFL_DOUBLE, BFL_SINGLE)) or k == "single_stream_modulation.lin.weight" for k in keys)


def tiny_config(num_layers: int = 2, num_single_layers: int = 2, num_attention_heads: int = 2,
                attention_head_dim: int = 16, joint_attention_dim: int = 48, in_channels: int = 128) -> dict:
    """A small config of klein's structure (4-axis RoPE scaled to the head, no guidance embedder)."""
    if attention_head_dim % 8:
        raise DistilleryError("attention_head_dim", attention_head_dim, "must be a multiple of 8 (4 RoPE axes).",
                              "use 16, 32 or 128.")
    return {"patch_size": 1, "in_channels": in_channels, "out_channels": None, "num_layers": num_layers,
            "num_single_layers": num_single_layers, "attention_head_dim": attention_head_dim,
            "num_attention_heads": num_attention_heads, "joint_attention_dim": joint_attention_dim,
            "timestep_guidance_channels": 32, "mlp_ratio": 3.0, "axes_dims_rope": [attention_head_dim // 4] * 4,
            "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False}


def _count(keys, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def config_from_shapes(shape_of, keys) -> dict:
    """The config of a bare checkpoint (diffusers or BFL names) from its tensors' shapes."""
    import torch

    keys = list(keys)
    if is_bfl(keys):  # the shapes under our names: the key map on meta tensors (no data)
        shapes = {k: tuple(v.shape) for k, v in from_bfl({k: torch.empty(shape_of(k), device="meta")
                                                           for k in keys}).items()}
    else:
        shapes = {k: tuple(shape_of(k)) for k in keys}
    if not FAMILY.is_family(shapes):
        raise DistilleryError("source", f"{len(keys)} tensors", "not a FLUX.2 DiT (no single_stream_modulation).",
                              "give a FLUX.2 [klein] diffusion model (e.g. flux-2-klein-4b.safetensors).")
    double, single = _count(shapes, DOUBLE), _count(shapes, SINGLE)
    for name, found in (("double-stream", double), ("single-stream", single)):
        if found != list(range(len(found))):
            raise DistilleryError("source", f"{name} blocks {found[:5]}...", "block indices are not contiguous from 0.",
                                  "renumber the blocks 0..N-1 (files written by Shrink DiT already are).")
    width, in_channels = shapes["x_embedder.weight"]
    norm = f"{DOUBLE}0.attn.norm_q.weight" if double else f"{SINGLE}0.attn.norm_q.weight"
    head_dim = shapes[norm][0] if norm in shapes else 128
    if width % head_dim:
        raise DistilleryError("source", f"width {width}", f"width is not a multiple of the head dim {head_dim}.",
                              "the file is not a FLUX.2 DiT we can read.")
    if double:
        mlp = shapes[f"{DOUBLE}0.ff.linear_in.weight"][0] / 2
    elif single:
        mlp = (shapes[f"{SINGLE}0.attn.to_qkv_mlp_proj.weight"][0] - 3 * width) / 2
    else:
        mlp = 3.0 * width
    out_channels = shapes["proj_out.weight"][0]
    return {"patch_size": 1, "in_channels": in_channels,
            "out_channels": None if out_channels == in_channels else out_channels,
            "num_layers": len(double), "num_single_layers": len(single), "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim, "joint_attention_dim": shapes["context_embedder.weight"][1],
            "timestep_guidance_channels": shapes["time_guidance_embed.timestep_embedder.linear_1.weight"][1],
            "mlp_ratio": mlp / width, "axes_dims_rope": [head_dim // 4] * 4, "rope_theta": 2000, "eps": 1e-6,
            "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in shapes}


def _position_ids(h: int, w: int, text_tokens: int, device):
    """Flux2KleinPipeline's `_prepare_latent_ids` (t=0, row, column, l=0) and `_prepare_text_ids` (0, 0, 0, l)."""
    import torch

    zero = torch.arange(1)
    img = torch.cartesian_prod(zero, torch.arange(h), torch.arange(w), zero)
    txt = torch.cartesian_prod(zero, zero, zero, torch.arange(text_tokens))
    return img.to(device), txt.to(device)


def _double_image_io(args, kwargs, output, image_tokens):
    """A double-stream block takes the image stream as `hidden_states` and returns (text, image)."""
    x_in = kwargs.get("hidden_states", args[0] if args else None)
    return x_in, output[1]


def _single_image_io(args, kwargs, output, image_tokens):
    """A single-stream block takes and returns [text; image]: the image tokens are the last ones."""
    x_in = kwargs.get("hidden_states", args[0] if args else None)
    x_out = output[1] if isinstance(output, tuple) else output
    return x_in[:, -image_tokens:], x_out[:, -image_tokens:]


# ----------------------------------------------------------------------------------------------------------
# Shrink DiT by width: the index spaces of every tensor (under our names; a BFL file is converted block by block,
# so its fused qkv is sliced as q, k and v) and the calibration runner

def _calibrate(source, cal, device=None, progress=None, stop=None):
    """Run a streamed klein source (`shrink.depth.DepthSource`) on a checked calibration, one block in memory, as
    `Flux2Transformer2DModel.forward` does (time x 1000, the three shared modulations, RoPE of [text; image]), and
    measure `shrink.importance.StackCalibrationStats`: each stack's block influence over image tokens, mean |x| per
    residual channel at every block's input and after the last block (image tokens), mean L2 norm of each head's
    attention output, mean |SwiGLU output| per FFN unit (a single-stream block's MLP half of its `to_out` input),
    mean |SiLU(.)| of the time embedding (what the modulations and norm_out read) and of its MLP's hidden layer.
    Prompt padding (the mask, when given) does not vote; the DiT still attends to it, as klein does."""
    import torch
    import torch.nn.functional as F
    from accelerate import init_empty_weights
    from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock
    from einops import rearrange

    from ..errors import StopRequested
    from ..shrink.importance import StackCalibrationStats, _token_mean
    from ..shrink.stream import empty_model

    with torch.no_grad():
        device = torch.device(device or "cpu")
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # fp32 on CPU, as Qwen-Image's runner
        config = source.config
        heads, head_dim = source.heads, source.head_dim
        inner = heads * head_dim
        sizes = dict(dim=inner, num_attention_heads=heads, attention_head_dim=head_dim,
                     mlp_ratio=config["mlp_ratio"], eps=config["eps"])

        def load(attr, index, cls):
            with init_empty_weights():
                block = cls(**sizes)
            state = {k: v.to(device=device, dtype=dtype) for k, v in source.block_state(attr, index).items()}
            block.load_state_dict(state, assign=True, strict=True)
            return block.eval()

        stem = empty_model(dict(config, num_layers=0, num_single_layers=0), FAMILY)
        stem.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in source.global_state().items()},
                             assign=True, strict=True)
        stem.eval()
        latents = cal.latents.to(device=device, dtype=dtype)
        b, _, h, w = latents.shape
        hidden = stem.x_embedder(rearrange(latents, "b c h w -> b (h w) c"))
        text = stem.context_embedder(cal.text.embeds.to(device=device, dtype=dtype))
        mask = None if cal.text.mask is None else cal.text.mask.to(device)
        seen = {}
        hook = stem.time_guidance_embed.timestep_embedder.linear_2.register_forward_pre_hook(
            lambda m, args: seen.__setitem__("temb_hidden", args[0].abs().double().mean(0)))
        temb = stem.time_guidance_embed(cal.resolved_sigmas().to(device=device, dtype=dtype) * 1000, None)
        hook.remove()
        mod_img, mod_txt = stem.double_stream_modulation_img(temb), stem.double_stream_modulation_txt(temb)
        mod_single = stem.single_stream_modulation(temb)
        img_ids, txt_ids = _position_ids(h, w, text.shape[1], device)
        (img_cos, img_sin), (txt_cos, txt_sin) = stem.pos_embed(img_ids), stem.pos_embed(txt_ids)
        rope = (torch.cat([txt_cos, img_cos], 0), torch.cat([txt_sin, img_sin], 0))
        stats = StackCalibrationStats({}, {}, None, {}, {}, F.silu(temb).abs().double().mean(0).cpu(),
                                      seen["temb_hidden"].cpu())
        del stem
        double, single = config["num_layers"], config["num_single_layers"]
        total, done = double + single, 0

        def step(attr, s):
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, stage="calibrate", block=f"{attr}.{s}")

        def head_norms(x, weight):
            return _token_mean(x.unflatten(-1, (heads, head_dim)).norm(dim=-1), weight)

        stats.block_scores[DOUBLE[:-1]] = []
        for s in range(double):
            if stop is not None and stop():
                raise StopRequested("calibration stopped")
            block, got = load(DOUBLE[:-1], s, Flux2TransformerBlock), {}
            hooks = [
                block.attn.to_out[0].register_forward_pre_hook(
                    lambda m, a: got.__setitem__("img_heads", head_norms(a[0], None))),
                block.attn.to_add_out.register_forward_pre_hook(
                    lambda m, a: got.__setitem__("txt_heads", head_norms(a[0], mask))),
                block.ff.linear_out.register_forward_pre_hook(
                    lambda m, a: got.__setitem__("img_ffn", _token_mean(a[0].abs(), None))),
                block.ff_context.linear_out.register_forward_pre_hook(
                    lambda m, a: got.__setitem__("txt_ffn", _token_mean(a[0].abs(), mask))),
            ]
            new_text, new_hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb_mod_img=mod_img,
                                         temb_mod_txt=mod_txt, image_rotary_emb=rope)
            for hk in hooks:
                hk.remove()
            key = (DOUBLE[:-1], s)
            cos = F.cosine_similarity(hidden.double(), new_hidden.double(), dim=-1)
            stats.block_scores[DOUBLE[:-1]].append(float(1 - cos.mean()))
            stats.residual_in[key] = (_token_mean(hidden.abs(), None) + _token_mean(text.abs(), mask)).cpu()
            stats.heads[key] = (got["img_heads"] + got["txt_heads"]).cpu()
            stats.units[key] = {"img_ffn": got["img_ffn"].cpu(), "txt_ffn": got["txt_ffn"].cpu()}
            hidden, text = new_hidden, new_text
            del block
            step(DOUBLE[:-1], s)

        image_tokens = hidden.shape[1]
        x = torch.cat([text, hidden], 1)  # [text; image], as the model concatenates them
        weight = None if mask is None else torch.cat([mask, mask.new_ones(b, image_tokens)], 1)
        stats.block_scores[SINGLE[:-1]] = []
        for s in range(single):
            if stop is not None and stop():
                raise StopRequested("calibration stopped")
            block, got = load(SINGLE[:-1], s, Flux2SingleTransformerBlock), {}

            def parallel_out(m, a):  # to_out reads [attention output | SwiGLU output]
                got["heads"] = head_norms(a[0][..., :inner], weight)
                got["mlp"] = _token_mean(a[0][..., inner:].abs(), weight)

            hook = block.attn.to_out.register_forward_pre_hook(parallel_out)
            new_x = block(hidden_states=x, encoder_hidden_states=None, temb_mod=mod_single, image_rotary_emb=rope)
            hook.remove()
            key = (SINGLE[:-1], s)
            cos = F.cosine_similarity(x[:, -image_tokens:].double(), new_x[:, -image_tokens:].double(), dim=-1)
            stats.block_scores[SINGLE[:-1]].append(float(1 - cos.mean()))
            stats.residual_in[key] = _token_mean(x.abs(), weight).cpu()
            stats.heads[key] = got["heads"].cpu()
            stats.units[key] = {"mlp": got["mlp"].cpu()}
            x = new_x
            del block
            step(SINGLE[:-1], s)
        stats.residual_out = _token_mean(x[:, -image_tokens:].abs(), None).cpu()
    return stats


# "res" = the residual-stream channels (one subset for the whole model; "res*k": inside each of k stacked chunks:
# the shared modulations' shift, scale, gate sets, norm_out's scale, shift); "temb" / "temb_hidden" = the time
# embedding's channels / its MLP's hidden units (as wide as the residual stream); "heads" = the kept heads'
# head-dim rows; "img_ffn" / "txt_ffn" / "mlp" = the kept SwiGLU units of the double blocks' image / text FFN and of
# a single block's MLP ("*2": the gate | up halves of their input rows, both cut by the same units); "a+b": parts
# end to end (the single block's fused q | k | v | gate | up rows and [attention | MLP] columns). No biases; the
# RMSNorms over one head and the time input (256 sinusoid channels) are kept whole.
_GLOBAL_SPACES = {
    "x_embedder": ("res", None),
    "context_embedder": ("res", None),
    "time_guidance_embed.timestep_embedder.linear_1": ("temb_hidden", None),
    "time_guidance_embed.timestep_embedder.linear_2": ("temb", "temb_hidden"),
    "double_stream_modulation_img.linear": ("res*6", "temb"),
    "double_stream_modulation_txt.linear": ("res*6", "temb"),
    "single_stream_modulation.linear": ("res*3", "temb"),
    "norm_out.linear": ("res*2", "temb"),
    "proj_out": (None, "res"),
}
_DOUBLE_SPACES = {
    **{f"attn.{m}": ("heads", "res") for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")},
    "attn.to_out.0": ("res", "heads"), "attn.to_add_out": ("res", "heads"),
    **{f"attn.{m}": (None, None) for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")},
    "ff.linear_in": ("img_ffn*2", "res"), "ff.linear_out": ("res", "img_ffn"),
    "ff_context.linear_in": ("txt_ffn*2", "res"), "ff_context.linear_out": ("res", "txt_ffn"),
}
_SINGLE_SPACES = {
    "attn.to_qkv_mlp_proj": ("heads*3+mlp*2", "res"), "attn.to_out": ("res", "heads+mlp"),
    "attn.norm_q": (None, None), "attn.norm_k": (None, None),
}
# Width = whole heads of the source's head size (ComfyUI derives the heads as width / 128); the FFNs keep the
# source's `mlp_ratio` (ComfyUI assumes 3), so a width-shrunk klein student still loads in stock UNETLoader. Every
# block of both stacks has its own heads and units; the last blocks were trained like the others (the last
# double block's text output feeds the single blocks, the single blocks' weights serve text and image alike).
WIDTH_LAYOUT = WidthLayout(
    group=SINGLE[:-1], global_spaces=_GLOBAL_SPACES, block_spaces=_SINGLE_SPACES,
    sliced_groups={DOUBLE[:-1]: _DOUBLE_SPACES}, ffn_spaces=("img_ffn", "txt_ffn", "mlp"),
    ffn_ratio_key="mlp_ratio", per_stack=True, calibrate=_calibrate,
    unsupported=("guidance_embeds",),  # FLUX.2 [dev]'s guidance embedder is not sliced (klein has none)
)


class Flux2Family(Family):
    name = "flux2"
    title = "FLUX.2 [klein]"
    signature_keys = ("single_stream_modulation.linear.weight", "x_embedder.weight", "context_embedder.weight")
    heads_key = "num_attention_heads"
    head_prefixes = ("norm_out.", "proj_out.")
    patch = 1  # the codec already packs 2x2 VAE pixels into 128 channels: one latent pixel, one token
    vae_factor = 16
    schedule_template = "FLUX.2"
    sampling_defaults = dict(BASE_DEFAULTS)
    text_encoder_class = "Qwen3Model"  # the checkpoints' Qwen3ForCausalLM without its LM head
    bundled_tokenizer = "qwen3"
    default_text_max_length = TEXT_TOKENS
    report_text_tokens = TEXT_TOKENS  # always padded to 512, and the DiT attends to every one
    vae_class = "AutoencoderKLFlux2"
    pipeline_class = "Flux2KleinPipeline"
    transformer_library = "diffusers"
    lora_presets = {
        # Every Linear inside the blocks: attention and MLP of both streams of the double-stream blocks, and the
        # single-stream blocks' fused (qkv + MLP) input and output projections (ai-toolkit's and musubi's choice).
        "flux2_klein": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out",
                        "ff_context.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out"],
        # Attention of the double-stream blocks only (the single-stream projections hold the MLP too).
        "flux2_klein_attn": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                             "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    }
    default_lora_preset = "flux2_klein"
    # The meta measurement gives about 63 bytes (two-stream and parallel single blocks, 3x SwiGLU FFN), rounded
    # down to stay a lower bound.
    saved_per_token_width = 56
    ddp_find_unused_parameters = False
    width_layout = WIDTH_LAYOUT

    # -- the model
    def model_class(self):
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel

    def presets(self) -> dict[str, dict]:
        return {"flux2-klein-4b": dict(KLEIN_4B_CONFIG, axes_dims_rope=[32] * 4),
                "flux2-klein-9b": dict(KLEIN_9B_CONFIG, axes_dims_rope=[32] * 4),
                "flux2-klein-tiny": tiny_config()}

    def tiny_config(self, **overrides) -> dict:
        return tiny_config(**overrides)

    def is_family(self, keys) -> bool:
        keys = set(keys)
        return all(k in keys for k in self.signature_keys) or {
            "single_stream_modulation.lin.weight", "img_in.weight", "txt_in.weight"} <= keys

    def config_from_shapes(self, shape_of, keys) -> dict:
        return config_from_shapes(shape_of, keys)

    def dims(self, config: dict) -> Dims:
        width = config["num_attention_heads"] * config["attention_head_dim"]
        return Dims(width, config["num_layers"] + config["num_single_layers"], int(width * config["mlp_ratio"]))

    # -- calling the DiT
    def latent_channels(self, config: dict) -> int:
        return config["in_channels"]

    def text_width(self, config: dict) -> int:
        return config["joint_attention_dim"]

    def velocity(self, dit, latents, sigma, text):
        """As Flux2KleinPipeline's denoising step: tokens = `_pack_latents` (row-major), 4-axis position ids,
        `timestep = sigma` (the model multiplies by 1000), no guidance input; the output is the velocity. Every
        prompt position goes in (klein attends to the padding too; the pipeline passes no mask)."""
        from einops import rearrange

        from ..velocity import base_model, model_dtype

        if base_model(dit).config.guidance_embeds:
            raise DistilleryError("dit", "guidance_embeds", "is a guidance-distilled FLUX.2 (dev), not klein.",
                                  "use a FLUX.2 [klein] model.")
        b, c, h, w = latents.shape
        dtype = model_dtype(dit)
        tokens = rearrange(latents, "b c h w -> b (h w) c").to(dtype)
        embeds = text.embeds.to(latents.device, dtype)
        img_ids, txt_ids = _position_ids(h, w, embeds.shape[1], latents.device)
        out = dit(hidden_states=tokens, encoder_hidden_states=embeds, timestep=sigma.to(dtype), img_ids=img_ids,
                  txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        return rearrange(out, "b (h w) c -> b c h w", h=h).to(latents.dtype)

    def example_inputs(self, config, *, batch, h, w, text_tokens, device, dtype) -> dict:
        import torch

        kw = {"device": device, "dtype": dtype}
        img_ids, txt_ids = _position_ids(h, w, text_tokens, device)
        return {"hidden_states": torch.randn(batch, h * w, config["in_channels"], **kw),
                "encoder_hidden_states": torch.randn(batch, text_tokens, config["joint_attention_dim"], **kw),
                "timestep": torch.full((batch,), 0.5, **kw), "img_ids": img_ids, "txt_ids": txt_ids,
                "return_dict": False}

    # -- blocks: both stacks may lose blocks (ComfyUI counts each from the keys)
    def block_groups(self):
        return (BlockGroup("single_transformer_blocks", "num_single_layers", image_io=_single_image_io),
                BlockGroup("transformer_blocks", "num_layers", image_io=_double_image_io))

    # -- pipeline components
    def text_encoder_key(self, key: str) -> str | None:
        from ._qwen_text import qwen3_key

        return qwen3_key(key)

    def text_encoder_from_shapes(self, shape_of, keys):
        """klein 4B's Qwen3-4B or 9B's Qwen3-8B, by the file's width."""
        from ._qwen_text import qwen3_config

        return qwen3_config(shape_of, keys, {2560: QWEN3_4B_CONFIG, 4096: QWEN3_8B_CONFIG},
                            "FLUX.2 [klein]'s Qwen3 text encoder", "give klein's text encoder (ComfyUI: "
                            "models/text_encoders/qwen_3_4b.safetensors for klein 4B, qwen_3_8b for klein 9B).")

    def prompt_encoder(self, text_encoder, tokenizer, settings: dict):
        from ..text import Qwen3PromptEncoder

        return Qwen3PromptEncoder(text_encoder, tokenizer,
                                  max_length=int(settings.get("max_length", self.default_text_max_length)),
                                  hidden_layers=tuple(settings.get("hidden_layers", TEXT_LAYERS)))

    def codec(self, vae):
        from ..codecs import Flux2VAECodec

        return Flux2VAECodec(vae)

    def convert_vae_state(self, state: dict, config: dict) -> dict:
        """BFL's FLUX.2 VAE file: an LDM VAE whose quant convs sit inside the encoder / decoder, plus BatchNorm
        statistics: moved to the top level, then diffusers' LDM converter, `bn.*` kept."""
        from diffusers.loaders import single_file_utils as sfu

        moved = {}
        for key, value in state.items():
            for nested, top in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
                if key.startswith(nested):
                    key = top + key[len(nested):]
            moved[key] = value
        converted = sfu.convert_ldm_vae_checkpoint(moved, config)
        converted.update({k: v for k, v in moved.items() if k.startswith("bn.")})
        return converted

    def folder_defaults(self, index: dict, folder=None) -> dict | None:
        """A klein folder's model_index.json says whether it is step-distilled (4 steps, CFG off)."""
        if index.get("_class_name") != self.pipeline_class:
            return None
        return dict(DISTILLED_DEFAULTS if index.get("is_distilled") else BASE_DEFAULTS)

    def tiny_pipeline(self, seed: int = 0):
        from .. import tiny
        from ..codecs import Flux2VAECodec
        from ..pipelines import TextToImagePipeline
        from ..text import Qwen3PromptEncoder

        tokenizer = tiny.tiny_tokenizer()
        # 4 layers, hidden states 1..3 (never the last, which transformers returns normed): klein's 9, 18, 27 of 36
        encoder = Qwen3PromptEncoder(tiny.tiny_qwen3_encoder(tokenizer, hidden_size=16, num_layers=4, seed=seed + 1),
                                     tokenizer, max_length=32, hidden_layers=(1, 2, 3))
        codec = Flux2VAECodec(tiny.tiny_flux2_vae(seed=seed + 2))
        with tiny.seeded(seed):
            dit = self.model_class()(**tiny_config(joint_attention_dim=encoder.width,
                                                   in_channels=codec.latent_channels)).eval()
        return TextToImagePipeline(dit, encoder, codec, defaults=tiny.TINY_DEFAULTS)

    # -- ComfyUI
    def to_comfy(self, state: dict) -> dict:
        return to_bfl(state)

    def from_comfy(self, state: dict) -> dict:
        return from_bfl(state)

    def lora_to_comfy(self, modules: dict) -> dict:
        """`diffusion_model.<BFL module>` (ComfyUI maps every module of the model under that name); q, k and v
        LoRAs fused into one adapter of the fused qkv: A stacked, B block-diagonal (exact; ranks add up), and the
        final layer's modulation halves swapped as its weight's are."""
        import torch

        from ..lora import LoraModule

        out, fused = {}, {}
        for name, m in modules.items():
            target, part = _to_bfl_module(name)
            if part is None:
                up = _swap_halves(m.up) if name == SWAPPED else m.up
                out[COMFY_LORA_PREFIX + target] = LoraModule(m.down, up, m.alpha)
            else:
                fused.setdefault(target, {})[part] = m
        for target, parts in fused.items():
            width = next(iter(parts.values())).up.shape[0]
            scales = {m.scale for m in parts.values()}
            scale = scales.pop() if len(scales) == 1 else 1.0  # one common scale stays in alpha, else in B
            downs, ups, rank = [], [], sum(m.rank for m in parts.values())
            up = torch.zeros(3 * width, rank)
            col = 0
            for i in range(3):
                if i in parts:
                    m = parts[i]
                    downs.append(m.down.float())
                    up[i * width:(i + 1) * width, col:col + m.rank] = m.up.float() * (m.scale / scale)
                    col += m.rank
            out[COMFY_LORA_PREFIX + target] = LoraModule(torch.cat(downs, 0), up, scale * rank)
        return out

    def lora_from_comfy(self, modules: dict) -> dict:
        """BFL-named modules (with or without `diffusion_model.`) -> ours: a fused qkv adapter becomes one per
        q, k, v with the shared A and its rows of B (exact); names already ours pass unchanged."""
        from ..lora import LoraModule

        out = {}
        for name, m in modules.items():
            bare = name[len(COMFY_LORA_PREFIX):] if name.startswith(COMFY_LORA_PREFIX) else name
            ours = _from_bfl_module(bare)
            if ours is None:
                out[bare if name.startswith(COMFY_LORA_PREFIX) else name] = m
            elif len(ours) == 3:
                for target, up in zip(ours, m.up.chunk(3, 0)):
                    out[target] = LoraModule(m.down, up.contiguous(), m.alpha)
            else:
                out[ours[0]] = LoraModule(m.down, _swap_halves(m.up) if ours[0] == SWAPPED else m.up, m.alpha)
        return out

    def comfy_loadable(self, config: dict) -> tuple[bool, str]:
        """ComfyUI's flux2 detection reads the width, text width, input channels and both block counts from the
        file and fixes the rest: heads of 128 (so only whole heads may go), MLP exactly 3x the width, 128 output
        channels, RoPE (32, 32, 32, 32) at theta 2000, a 256-channel time input."""
        for key, want in COMFY_FIXED.items():
            have = config.get(key)
            if (list(have) if isinstance(have, (list, tuple)) else have) != want:
                return False, (f"{key}={have} differs from FLUX.2's {want}, which ComfyUI's UNETLoader assumes. Load "
                               "it with the pack's Load Student node.")
        if (config.get("out_channels") or config["in_channels"]) != 128:
            return False, "ComfyUI's UNETLoader assumes 128 output channels. Load it with the pack's Load Student node."
        return True, "loads in stock UNETLoader (models/diffusion_models)"

    def comfy_model_config(self, config: dict) -> tuple[str, dict] | None:
        """ComfyUI's `supported_models.Flux2` with the unet_config its flux2 detection builds, the head count, MLP
        ratio and RoPE taken from our config instead of assumed (so a width-shrunk student builds too). None when
        the time input is not 256 wide (ComfyUI's Flux fixes it)."""
        if config.get("timestep_guidance_channels") != 256 or config.get("patch_size") != 1:
            return None
        width = config["num_attention_heads"] * config["attention_head_dim"]
        return "Flux2", {
            "image_model": "flux2", "axes_dim": list(config["axes_dims_rope"]),
            "num_heads": config["num_attention_heads"], "mlp_ratio": float(config["mlp_ratio"]),
            "theta": config["rope_theta"], "out_channels": config.get("out_channels") or config["in_channels"],
            "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
            "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3],
            "in_channels": config["in_channels"], "hidden_size": width, "context_in_dim": config["joint_attention_dim"],
            "patch_size": 1, "vec_in_dim": None, "depth": config["num_layers"],
            "depth_single_blocks": config["num_single_layers"], "guidance_embed": bool(config["guidance_embeds"]),
            "yak_mlp": False, "txt_norm": False}


FAMILY = Flux2Family()
