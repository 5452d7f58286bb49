"""Z-Image (Turbo and Base, 6B), as diffusers' `ZImageTransformer2DModel` with `ZImagePipeline`'s conventions.

We do not re-implement the model: this module holds its release configuration, a tiny one for tests, detection
and config from a checkpoint's keys (diffusers' names or ComfyUI's, which are the original Tongyi names with a
fused `qkv`), how the DiT is called (a list of latents `[C, 1, h, w]`, time input `1 - sigma`, a list of unpadded
prompt embeddings, velocity = the negated output), its three block stacks (only the main `layers` may be dropped:
ComfyUI always builds two `noise_refiner` and two `context_refiner` blocks), the schedule (static shift 3), its
Qwen3-4B text encoder (hidden state -2, padding dropped) and FLUX.1's VAE, and ComfyUI's key names for DiT files
and LoRAs (following ComfyUI v0.38.1: `comfy/utils.py` `z_image_to_diffusers`, `comfy/lora.py`'s Lumina2 map).

CFG: our sampler's `cfg_scale` is ComfyUI's (`neg + cfg * (pos - neg)`, 1 = off), as for every family; diffusers'
ZImagePipeline uses `pos + g * (pos - neg)`, so its `guidance_scale` g is our cfg_scale - 1 (Turbo: g 0 = cfg 1).
"""

from __future__ import annotations

from ..errors import DistilleryError
from .base import BlockGroup, Dims, Family, WidthLayout

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (= diffusers' defaults with the hub's axes_lens, which only
# sizes the RoPE tables): 30 layers + 2 + 2 refiners, 3840 wide, 30 heads of 128; 6,154,908,736 parameters.
Z_IMAGE_CONFIG = {
    "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "siglip_feat_dim": None, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
Z_IMAGE_PARAMS = 6_154_908_736

# Qwen/Qwen3-4B config.json (the text encoder ComfyUI's qwen_3_4b.safetensors holds): used for a single text
# encoder file given without its config folder.
QWEN3_4B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
    "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "torch_dtype": "bfloat16",
}

# black-forest-labs/FLUX.1-dev vae/config.json (Z-Image's VAE; ComfyUI's ae.safetensors).
FLUX1_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
    "force_upcast": True,
}

# Sampling defaults of the two released checkpoints (one architecture). Turbo: 8 steps, CFG off. Base (the
# undistilled Tongyi-MAI/Z-Image): DiffSynth's example (examples/z_image/model_inference/Z-Image.py), 50 steps at
# cfg_scale 4 in DiffSynth's (= our, ComfyUI's) convention.
TURBO_DEFAULTS = dict(steps=8, cfg_scale=1.0, height=1024, width=1024)
BASE_DEFAULTS = dict(steps=50, cfg_scale=4.0, height=1024, width=1024)
# What tells the released diffusers folders apart: their model_index.json files are alike, but
# scheduler/scheduler_config.json has shift 3.0 in Z-Image-Turbo and 6.0 in Z-Image (Base). (The sigma schedule
# itself stays DiffSynth's shift 3 for both, as DiffSynth samples Base.)
SCHEDULER_SHIFT_DEFAULTS = {3.0: TURBO_DEFAULTS, 6.0: BASE_DEFAULTS}

BLOCK_GROUPS = ("layers", "noise_refiner", "context_refiner")
# What ComfyUI's detection does not read from a file but fixes when the width is 3840 (Z-Image's branch): a student
# that changes any of these does not load in stock ComfyUI.
COMFY_FIXED = ("dim", "n_heads", "n_kv_heads", "in_channels", "cap_feat_dim", "n_refiner_layers", "axes_dims",
               "rope_theta", "all_patch_size", "all_f_patch_size", "qk_norm", "siglip_feat_dim")

# diffusers name -> ComfyUI / original name, outside the blocks (prefix renames)
_GLOBAL_RENAMES = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."))
# inside a block
_BLOCK_RENAMES = (("attention.to_out.0.", "attention.out."), ("attention.norm_q.", "attention.q_norm."),
                  ("attention.norm_k.", "attention.k_norm."))
_QKV = ("to_q", "to_k", "to_v")


def axes_for(head_dim: int) -> list[int]:
    """RoPE axes (caption index, h, w) for a head size: the release's 32/48/48 split of 128, scaled."""
    quarter = head_dim // 4
    axes = [quarter, (head_dim - quarter) // 2, (head_dim - quarter) // 2]
    if head_dim % 8 or sum(axes) != head_dim or any(a % 2 for a in axes):
        raise DistilleryError("head_dim", head_dim, "Z-Image's RoPE needs a head size that is a multiple of 8.",
                              "use 32, 64 or 128.")
    return axes


def tiny_config(n_layers: int = 2, dim: int = 64, n_heads: int = 2, cap_feat_dim: int = 32,
                in_channels: int = 16, n_refiner_layers: int = 2) -> dict:
    """A small config with Z-Image's structure (two refiners of each kind, RoPE axes scaled to the head size)."""
    return dict(Z_IMAGE_CONFIG, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_heads,
                cap_feat_dim=cap_feat_dim, in_channels=in_channels, n_refiner_layers=n_refiner_layers,
                axes_dims=axes_for(dim // n_heads))


def model_class():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel


# ----------------------------------------------------------------------------------------------------------
# Key names: ours (diffusers) <-> ComfyUI's (the original checkpoints')

def _split_block(key: str):
    """('layers.3.attention.to_q.weight') -> ('layers.3.', 'attention.to_q.weight'); (None, key) outside blocks."""
    for group in BLOCK_GROUPS:
        if key.startswith(group + "."):
            index, rest = key[len(group) + 1:].split(".", 1)
            if index.isdigit():
                return f"{group}.{index}.", rest
    return None, key


def _rename(name: str, renames) -> str:
    for ours, theirs in renames:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def comfy_name(key: str) -> str:
    """Our name of a tensor or module -> ComfyUI's (q/k/v keep their names: they are fused, see `to_comfy`)."""
    block, rest = _split_block(key)
    if block is None:
        return _rename(rest, _GLOBAL_RENAMES)
    return block + _rename(rest, _BLOCK_RENAMES)


def our_name(key: str) -> str:
    """ComfyUI's name -> ours (names already ours are unchanged)."""
    block, rest = _split_block(key)
    if block is None:
        return _rename(rest, [(b, a) for a, b in _GLOBAL_RENAMES])
    return block + _rename(rest, [(b, a) for a, b in _BLOCK_RENAMES])


def to_comfy(state: dict) -> dict:
    """diffusers keys -> ComfyUI's: q, k, v fused into `attention.qkv` (rows q | k | v), the renames above; the
    inverse of diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` and of ComfyUI's
    `z_image_to_diffusers`."""
    import torch

    out = {}
    for key, value in state.items():
        block, rest = _split_block(key)
        if block is not None and rest.startswith("attention.to_") and rest.split(".")[1] in _QKV:
            param = rest.split(".", 2)[2]
            if rest.split(".")[1] == "to_q":
                parts = [state.get(f"{block}attention.{m}.{param}") for m in _QKV]
                if any(p is None for p in parts):
                    raise DistilleryError("state", key, "q, k and v of one attention must be saved together.",
                                          "save the whole model.")
                out[f"{block}attention.qkv.{param}"] = torch.cat(parts, 0)
            continue
        out[comfy_name(key)] = value
    return out


def from_comfy(state: dict) -> dict:
    """ComfyUI's / the original checkpoints' keys -> ours: `qkv` split in three (multi-head attention), renames,
    the unused `norm_final.weight` of original files dropped (diffusers and ComfyUI drop it too)."""
    out = {}
    for key, value in state.items():
        if key == "norm_final.weight":
            continue
        block, rest = _split_block(key)
        if block is not None and rest.startswith("attention.qkv."):
            param = rest[len("attention.qkv."):]
            for m, part in zip(_QKV, value.chunk(3, 0)):
                out[f"{block}attention.{m}.{param}"] = part
            continue
        out[our_name(key)] = value
    return out


LORA_PREFIX = "diffusion_model."


def lora_to_comfy(modules: dict) -> dict:
    """`diffusion_model.<diffusers module>`: ComfyUI's Lumina2 LoRA map accepts exactly these for every module
    `z_image_to_diffusers` lists (block linears of layers and both refiners, embedders, final layer), and
    diffusers' ZImageLoraLoaderMixin reads them too."""
    return {LORA_PREFIX + name: m for name, m in modules.items()}


def lora_from_comfy(modules: dict) -> dict:
    """LoRA modules under ComfyUI's names (a fused `qkv` adapter is split exactly: the same A, B's rows per
    projection), with or without `diffusion_model.` / `transformer.` -> ours."""
    from ..lora import LoraModule

    out = {}
    for name, m in modules.items():
        for prefix in (LORA_PREFIX, "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.endswith(".attention.qkv"):
            base = name[: -len("qkv")]
            for proj, up in zip(_QKV, m.up.chunk(3, 0)):
                out[base + proj] = LoraModule(m.down, up, m.alpha)
            continue
        out[our_name(name + ".weight")[: -len(".weight")]] = m
    return out


# ----------------------------------------------------------------------------------------------------------
# Detection

_GLOBAL_SIGNATURE = ("cap_embedder.1.weight", "x_pad_token", "cap_pad_token",
                     "noise_refiner.0.adaLN_modulation.0.weight", "context_refiner.0.attention_norm1.weight")


def is_family(keys) -> bool:
    """Z-Image under either naming. Lumina 2 (same ComfyUI module, no pad tokens, adaLN_modulation.1) is not."""
    keys = set(keys)
    embedder = "all_x_embedder.2-1.weight" in keys or "x_embedder.weight" in keys
    return embedder and all(k in keys for k in _GLOBAL_SIGNATURE)


def _count(keys, group: str) -> int:
    found = {int(k.split(".")[1]) for k in keys if k.startswith(group + ".") and k.split(".")[1].isdigit()}
    if found != set(range(len(found))):
        raise DistilleryError("source", f"{group} {sorted(found)[:5]}...", f"{group} indices are not contiguous "
                              "from 0.", "renumber the blocks 0..N-1 (files written by Shrink DiT already are).")
    return len(found)


def config_from_shapes(shape_of, keys) -> dict:
    """The diffusers config of a bare checkpoint in either naming (ComfyUI reads the width, the caption width and
    the layer count the same way; we also read the head size, so narrower students load)."""
    keys = list(keys)
    if not is_family(keys):
        missing = [k for k in _GLOBAL_SIGNATURE if k not in set(keys)]
        raise DistilleryError("source", f"{len(keys)} tensors", f"not a Z-Image DiT (missing {missing}).",
                              "give a Z-Image diffusion model (e.g. models/diffusion_models/z_image_turbo_bf16."
                              "safetensors or a Tongyi-MAI/Z-Image-Turbo transformer folder).")
    dim, cap_feat_dim = shape_of("cap_embedder.1.weight")
    embedder = "all_x_embedder.2-1.weight" if "all_x_embedder.2-1.weight" in set(keys) else "x_embedder.weight"
    in_channels = shape_of(embedder)[1] // 4  # 2x2 patches, one frame
    norm = next((k for k in ("noise_refiner.0.attention.norm_q.weight", "noise_refiner.0.attention.q_norm.weight")
                 if k in set(keys)), None)
    head_dim = shape_of(norm)[0] if norm else 128
    refiners = _count(keys, "noise_refiner")
    if _count(keys, "context_refiner") != refiners:
        raise DistilleryError("source", "refiners", "noise_refiner and context_refiner differ in depth.",
                              "the file is not a Z-Image DiT we can read.")
    if dim % head_dim:
        raise DistilleryError("source", f"width {dim}", f"width is not a multiple of the head dim {head_dim}.",
                              "the file is not a Z-Image DiT we can read.")
    siglip = "siglip_embedder.1.weight"
    return dict(Z_IMAGE_CONFIG, in_channels=in_channels, dim=dim, n_layers=_count(keys, "layers"),
                n_refiner_layers=refiners, n_heads=dim // head_dim, n_kv_heads=dim // head_dim,
                qk_norm=norm is not None,
                cap_feat_dim=cap_feat_dim, siglip_feat_dim=shape_of(siglip)[1] if siglip in set(keys) else None,
                axes_dims=list(Z_IMAGE_CONFIG["axes_dims"]) if head_dim == 128 else axes_for(head_dim))


# ----------------------------------------------------------------------------------------------------------
# Tiny components (tests, `tiny:z_image`)

def tiny_vae(seed: int = 0):
    """diffusers' AutoencoderKL with FLUX.1's structure and latent normalisation (16 channels at 1/8), tiny."""
    from diffusers import AutoencoderKL

    from ..tiny import seeded

    config = dict(FLUX1_VAE_CONFIG, block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
                  sample_size=32)
    with seeded(seed):
        return AutoencoderKL(**config).eval()


def tiny_dit(cap_feat_dim: int = 32, seed: int = 0, **overrides):
    """ZImageTransformer2DModel with `tiny_config`; the pad tokens (zeros at init) get random values like trained
    ones, so a test notices when they are mishandled."""
    import torch

    from ..tiny import seeded

    with seeded(seed):
        model = model_class()(**tiny_config(cap_feat_dim=cap_feat_dim, **overrides))
        with torch.no_grad():
            model.x_pad_token.normal_()
            model.cap_pad_token.normal_()
    return model.eval()


def ffn_units(width: int) -> int:
    """Z-Image's SwiGLU hidden width (diffusers' `int(dim / 3 * 8)`: 10240 at 3840)."""
    return int(width / 3 * 8)


# Index spaces of every Z-Image tensor for Shrink DiT (see `shrink.plan`), under both namings (a file may use
# either): "res" = the residual channels; "res*4" = that subset in each of adaLN's 4 chunks (scale, gate x 2);
# "heads" / "heads*3" = the kept heads' rows (of q, k, v, or inside each third of the fused qkv); "ffn" = the kept
# SwiGLU units. The timestep embedding (256 wide whenever the width is at least 256) and the caption norm are kept
# whole. Depth drops main layers only; width narrows the refiners too (each block its own heads and units).
_BLOCK_SPACES = {
    "attention.qkv": ("heads*3", "res"),
    **{f"attention.{m}": ("heads", "res") for m in _QKV},
    "attention.out": ("res", "heads"), "attention.to_out.0": ("res", "heads"),
    **{f"attention.{m}": (None, None) for m in ("q_norm", "k_norm", "norm_q", "norm_k")},
    "feed_forward.w1": ("ffn", "res"), "feed_forward.w3": ("ffn", "res"), "feed_forward.w2": ("res", "ffn"),
    **{m: ("res", None) for m in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")},
    "adaLN_modulation.0": ("res*4", None),
}
_GLOBAL_SPACES = {
    **{f"{p}": ("res", None) for p in ("x_embedder", "all_x_embedder.2-1", "cap_embedder.1")},
    **{f"{p}.linear": (None, "res") for p in ("final_layer", "all_final_layer.2-1")},
    **{f"{p}.adaLN_modulation.1": ("res", None) for p in ("final_layer", "all_final_layer.2-1")},
    "cap_embedder.0": (None, None), "t_embedder.mlp.0": (None, None), "t_embedder.mlp.2": (None, None),
    "x_pad_token": (None, "res"), "cap_pad_token": (None, "res"),
}
WIDTH_LAYOUT = WidthLayout(
    group="layers", global_spaces=_GLOBAL_SPACES, block_spaces=_BLOCK_SPACES, head_count_key="n_heads",
    head_dim_key=None, width_key="dim", also_heads_keys=("n_kv_heads",), ffn_spaces=("ffn",), ffn_units=ffn_units,
    sliced_groups={"noise_refiner": _BLOCK_SPACES, "context_refiner": _BLOCK_SPACES},
    min_width=256,  # the adaLN input is min(width, 256): narrower students would need it sliced as well
    unsupported=("siglip_feat_dim",),  # Omni's SigLIP branch is not sliced
)


class ZImageFamily(Family):
    name = "z_image"
    title = "Z-Image"
    signature_keys = _GLOBAL_SIGNATURE
    heads_key = "n_heads"
    head_prefixes = ("all_final_layer.",)
    patch = 2  # 2x2 latent patches per token, inside the DiT
    vae_factor = 8
    schedule_template = "Z-Image"
    # Tongyi-MAI/Z-Image-Turbo's scheduler_config.json: FlowMatchEulerDiscreteScheduler, static shift 3 (=
    # ComfyUI's ModelSamplingAuraFlow shift 3). The exponential shift with mu = ln 3 is the same curve; we keep the
    # static form so a saved pipeline's scheduler config equals the release's.
    schedule_templates = {"Z-Image": dict(shift=3.0, use_dynamic_shifting=False, shift_terminal=None)}
    # Turbo (what people run): 8 steps, CFG off (ComfyUI cfg 1 = diffusers guidance_scale 0), 1024x1024. A Base
    # folder gets BASE_DEFAULTS (`folder_defaults`).
    sampling_defaults = dict(TURBO_DEFAULTS)
    text_encoder_class = "Qwen3Model"
    bundled_tokenizer = "qwen3"
    default_text_max_length = 512
    report_text_tokens = 128  # padding is dropped: a long caption
    vae_class = "AutoencoderKL"
    pipeline_class = "ZImagePipeline"
    transformer_library = "diffusers"
    lora_presets = {
        # DiffSynth-Studio's Z-Image LoRA recipe (attention and SwiGLU projections of every block).
        "z_image": ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"],
        "z_image_attn": ["to_q", "to_k", "to_v", "to_out.0"],
        # ... plus the per-block modulation (ai-toolkit's "all linear" choice)
        "z_image_all": ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0"],
    }
    default_lora_preset = "z_image"
    saved_per_token_width = 56
    width_layout = WIDTH_LAYOUT
    ddp_find_unused_parameters = False  # every parameter reaches the output

    # -- the model
    def model_class(self):
        return model_class()

    def presets(self) -> dict[str, dict]:
        return {"z-image": dict(Z_IMAGE_CONFIG), "z-image-tiny": tiny_config()}

    def tiny_config(self, **overrides) -> dict:
        return tiny_config(**overrides)

    def is_family(self, keys) -> bool:
        return is_family(keys)

    def config_from_shapes(self, shape_of, keys) -> dict:
        return config_from_shapes(shape_of, keys)

    def dims(self, config: dict) -> Dims:
        dim = config["dim"]
        return Dims(dim, config["n_layers"] + 2 * config["n_refiner_layers"], int(dim / 3 * 8))

    # -- calling the DiT
    def latent_channels(self, config: dict) -> int:
        return config["in_channels"]

    def text_width(self, config: dict) -> int:
        return config["cap_feat_dim"]

    def velocity(self, dit, latents, sigma, text):
        """As ZImagePipeline's denoising step: one `[C, 1, h, w]` latent per sample, time `(1000 - 1000 sigma) /
        1000` (the model scales it by 1000 again), each prompt's real tokens only, velocity = -output."""
        import torch

        from ..velocity import model_dtype

        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise DistilleryError("latents", tuple(latents.shape), "Z-Image packs 2x2 patches: h and w must be "
                                  "even.", "use an image size that is a multiple of 16.")
        dtype = model_dtype(dit)
        x = list(latents.to(dtype).unsqueeze(2).unbind(0))
        embeds = text.embeds.to(latents.device, dtype)
        if text.mask is None:
            caps = list(embeds.unbind(0))
        else:
            mask = text.mask.to(latents.device)
            caps = [embeds[i][mask[i]] for i in range(b)]
        t = (1000 - sigma.float() * 1000) / 1000
        out = dit(x, t, caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2).to(latents.dtype)

    def example_inputs(self, config, *, batch, h, w, text_tokens, device, dtype) -> dict:
        import torch

        kw = {"device": device, "dtype": dtype}
        return {"x": [torch.randn(config["in_channels"], 1, h, w, **kw) for _ in range(batch)],
                "t": torch.full((batch,), 0.5, device=device),
                "cap_feats": [torch.randn(text_tokens, config["cap_feat_dim"], **kw) for _ in range(batch)],
                "return_dict": False}

    # -- blocks: the main layers run on [image; caption] (image first, `first_image_tokens`); the refiners run
    # on one modality each and are never dropped
    def block_groups(self):
        return (BlockGroup("layers", "n_layers"), BlockGroup("noise_refiner", "n_refiner_layers", keep=True),
                BlockGroup("context_refiner", "n_refiner_layers", keep=True))

    # -- pipeline components
    def prompt_encoder(self, text_encoder, tokenizer, settings: dict):
        from ..text import ZImagePromptEncoder

        return ZImagePromptEncoder(text_encoder, tokenizer,
                                   max_length=int(settings.get("max_length", self.default_text_max_length)))

    def text_encoder_config(self) -> dict:
        return dict(QWEN3_4B_CONFIG)

    def text_encoder_key(self, key: str) -> str | None:
        from ._qwen_text import qwen3_key

        return qwen3_key(key)

    def text_encoder_from_shapes(self, shape_of, keys):
        from ._qwen_text import qwen3_config

        release = self.text_encoder_config()
        return qwen3_config(shape_of, keys, {release["hidden_size"]: release}, "Z-Image's Qwen3 text encoder",
                            "give Z-Image's text encoder (ComfyUI: models/text_encoders/qwen_3_4b.safetensors).")

    def codec(self, vae):
        from ..codecs import ShiftScaleVAECodec

        return ShiftScaleVAECodec(vae)

    def vae_config(self) -> dict:
        return dict(FLUX1_VAE_CONFIG)

    def convert_vae_state(self, state: dict, config: dict) -> dict:
        """ComfyUI's ae.safetensors is FLUX.1's VAE in the original LDM layout: diffusers' LDM converter."""
        from diffusers.loaders import single_file_utils as sfu

        return sfu.convert_ldm_vae_checkpoint(state, config)

    def folder_defaults(self, index: dict, folder=None) -> dict | None:
        """Base or Turbo, from the folder's scheduler config (`SCHEDULER_SHIFT_DEFAULTS`); None (Turbo's, the
        family's) when the folder has none or another shift: a sampler's explicit steps/cfg always win."""
        import json
        from pathlib import Path

        if index.get("_class_name") != self.pipeline_class or folder is None:
            return None
        try:
            config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
            shift = float(config.get("shift"))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        found = SCHEDULER_SHIFT_DEFAULTS.get(shift)
        return dict(found) if found is not None else None

    def tiny_pipeline(self, seed: int = 0):
        from .. import tiny
        from ..codecs import ShiftScaleVAECodec
        from ..pipelines import TextToImagePipeline
        from ..text import ZImagePromptEncoder

        tokenizer = tiny.tiny_tokenizer()
        encoder = ZImagePromptEncoder(tiny.tiny_qwen3_encoder(tokenizer, seed=seed + 1), tokenizer)
        return TextToImagePipeline(tiny_dit(encoder.width, seed=seed), encoder,
                                   ShiftScaleVAECodec(tiny_vae(seed=seed + 2)), defaults=tiny.TINY_DEFAULTS)

    # -- ComfyUI
    def to_comfy(self, state: dict) -> dict:
        return to_comfy(state)

    def from_comfy(self, state: dict) -> dict:
        return from_comfy(state)

    def lora_to_comfy(self, modules: dict) -> dict:
        return lora_to_comfy(modules)

    def lora_from_comfy(self, modules: dict) -> dict:
        return lora_from_comfy(modules)

    def comfy_loadable(self, config: dict) -> tuple[bool, str]:
        """ComfyUI recognises Z-Image by width 3840 and then fixes heads, FFN width, RoPE and two refiners of each
        kind; it reads only the layer count from the file. So depth-shrunk students load in stock UNETLoader and
        width-shrunk ones do not."""
        for key in COMFY_FIXED:
            have, want = config.get(key), Z_IMAGE_CONFIG[key]
            if (list(have) if isinstance(have, (list, tuple)) else have) != want:
                return False, (f"{key}={have} differs from Z-Image's {want}; ComfyUI builds Z-Image only at the "
                               "release width (3840, 30 heads, two refiners each). Load it with the pack's Load "
                               "Student node in diffusers form.")
        return True, "loads in stock UNETLoader (models/diffusion_models)"

    def comfy_model_config(self, config: dict):
        """ComfyUI's `ZImage` (Lumina2's NextDiT) with the unet_config its detection builds for Z-Image
        (comfy/model_detection.py, the dim == 3840 branch); None for a narrower student, which it cannot build."""
        if not self.comfy_loadable(config)[0]:
            return None
        return "ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": config["in_channels"],
                          "dim": config["dim"], "cap_feat_dim": config["cap_feat_dim"], "n_layers": config["n_layers"],
                          "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
                          "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                          "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}


FAMILY = ZImageFamily()
