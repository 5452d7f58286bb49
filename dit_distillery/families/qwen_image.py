"""Qwen-Image, as diffusers' `QwenImageTransformer2DModel` (whose keys ComfyUI shares, unconverted).

We do not re-implement the model: this module holds its real configuration, a tiny one for tests, how to read a
configuration back from a checkpoint's keys (ComfyUI's UNETLoader does the same from `img_in` and the block
count; we also read the width, heads and text width so shrunk students load too), how the DiT is called, the
tensor layout Shrink DiT slices, and the rest of what `families.base.Family` asks.
"""

from __future__ import annotations

from ..errors import DistilleryError
from .base import BlockGroup, Dims, Family, WidthLayout

# Qwen/Qwen-Image transformer/config.json (60 blocks, 24 heads x 128 = 3072 wide, 20,430,401,088 parameters).
QWEN_IMAGE_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
QWEN_IMAGE_PARAMS = 20_430_401_088

# Qwen/Qwen-Image text_encoder/config.json (= Qwen/Qwen2.5-VL-7B-Instruct), as transformers' Qwen2_5_VLConfig takes
# it: 8,292,166,656 parameters, of which a single text-encoder file loads the 7,070,619,136 of the text model
# (ComfyUI's qwen_2.5_vl_7b.safetensors and its fp8_scaled variant).
QWEN25_VL_7B_CONFIG = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "sliding_window": 32768, "max_window_layers": 28, "use_sliding_window": False, "tie_word_embeddings": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "bos_token_id": 151643, "eos_token_id": 151645,
    "tie_word_embeddings": False,
}
QWEN25_VL_7B_PARAMS = 8_292_166_656
QWEN25_VL_7B_TEXT_PARAMS = 7_070_619_136

# Keys that only a Qwen-Image DiT has (ComfyUI's detector uses txt_norm.weight).
SIGNATURE_KEYS = ("txt_norm.weight", "img_in.weight", "txt_in.weight", "proj_out.weight")
BLOCK_PREFIX = "transformer_blocks."

# What ComfyUI's UNETLoader does not read from a file but takes from its own defaults (comfyui-facts.md A5): a
# student that changes any of these loads only through the pack's Load Student node.
COMFY_FIXED = ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "axes_dims_rope", "patch_size")


def tiny_config(num_layers: int = 4, num_attention_heads: int = 4, attention_head_dim: int = 16,
                joint_attention_dim: int = 32, latent_channels: int = 16) -> dict:
    """A small config with Qwen-Image's structure (RoPE axes scaled to the head dim) for tests and demos."""
    quarter = attention_head_dim // 4
    if attention_head_dim % 8:
        raise DistilleryError("attention_head_dim", attention_head_dim, "must be a multiple of 8 (RoPE axes).",
                              "use 16, 32, 64 or 128.")
    axes = [quarter, (attention_head_dim - quarter) // 2, (attention_head_dim - quarter) // 2]
    if sum(axes) != attention_head_dim or any(a % 2 for a in axes):
        axes = [attention_head_dim // 4, attention_head_dim * 3 // 8, attention_head_dim * 3 // 8]
    return {
        "patch_size": 2,
        "in_channels": latent_channels * 4,
        "out_channels": latent_channels,
        "num_layers": num_layers,
        "attention_head_dim": attention_head_dim,
        "num_attention_heads": num_attention_heads,
        "joint_attention_dim": joint_attention_dim,
        "guidance_embeds": False,
        "axes_dims_rope": axes,
    }


def is_family(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in SIGNATURE_KEYS)


def block_indices(keys) -> list[int]:
    """Sorted indices of the transformer blocks present in a key set."""
    found = set()
    for k in keys:
        if k.startswith(BLOCK_PREFIX):
            found.add(int(k[len(BLOCK_PREFIX):].split(".", 1)[0]))
    return sorted(found)


def config_from_shapes(shape_of, keys) -> dict:
    """Rebuild a diffusers config from tensor shapes (`shape_of(key) -> tuple`) and the key set."""
    keys = list(keys)
    if not is_family(keys):
        missing = [k for k in SIGNATURE_KEYS if k not in set(keys)]
        raise DistilleryError("source", f"{len(keys)} tensors", f"not a Qwen-Image DiT (missing {missing}).",
                              "give a Qwen-Image diffusion model (e.g. models/diffusion_models/qwen_image_bf16.safetensors "
                              "or a Qwen/Qwen-Image transformer folder).")
    blocks = block_indices(keys)
    if blocks != list(range(len(blocks))):
        raise DistilleryError("source", f"blocks {blocks[:5]}...", "block indices are not contiguous from 0.",
                              "renumber the blocks 0..N-1 (files written by Shrink DiT already are).")
    inner_dim, in_channels = shape_of("img_in.weight")
    joint_dim = shape_of("txt_in.weight")[1]
    out_channels = shape_of("proj_out.weight")[0] // 4
    head_dim = shape_of("transformer_blocks.0.attn.norm_q.weight")[0] if blocks else 128
    if inner_dim % head_dim:
        raise DistilleryError("source", f"width {inner_dim}", f"width is not a multiple of the head dim {head_dim}.",
                              "the file is not a Qwen-Image DiT we can read.")
    config = dict(QWEN_IMAGE_CONFIG)
    config.update(
        in_channels=in_channels, out_channels=out_channels, num_layers=len(blocks),
        attention_head_dim=head_dim, num_attention_heads=inner_dim // head_dim, joint_attention_dim=joint_dim,
    )
    if head_dim != 128:
        config["axes_dims_rope"] = tiny_config(attention_head_dim=head_dim)["axes_dims_rope"]
    return config


def model_class():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel


# ----------------------------------------------------------------------------------------------------------
# Shrink DiT's calibration runner (`WidthLayout.calibrate`): the source run block by block, one block in memory


def _load_block(source, index: int, dtype, device):
    """Source block `index` as ONE diffusers QwenImageTransformerBlock (the same class the full model uses)."""
    from accelerate import init_empty_weights
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    with init_empty_weights():
        block = QwenImageTransformerBlock(dim=source.heads * source.head_dim, num_attention_heads=source.heads,
                                          attention_head_dim=source.head_dim)
    prefix = f"{BLOCK_PREFIX}{index}."
    state = {k: source.read_value(prefix + k).to(device=device, dtype=dtype) for k in block.state_dict()}
    block.load_state_dict(state, assign=True, strict=True)
    return block.eval()


def _calibrate(source, cal, device=None, progress=None, stop=None):
    """Run a streamed source on a (checked) calibration and measure `shrink.importance.CalibrationStats`: block
    influence over image tokens, and the activation magnitudes width scoring reads (see shrink/importance.py)."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
    from einops import rearrange

    from ..errors import StopRequested
    from ..shrink.importance import CalibrationStats, _token_mean
    from ..shrink.stream import empty_model

    with torch.no_grad():
        device = torch.device(device or "cpu")
        # fp32 on CPU (bf16 matmuls are slow or unsupported on many CPUs); the source's bf16 on accelerators
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        config = source.config
        heads, head_dim = source.heads, source.head_dim

        stem = empty_model(dict(config, num_layers=0), FAMILY)
        stem.load_state_dict({k: source.read_value(k).to(device=device, dtype=dtype) for k in stem.state_dict()},
                             assign=True, strict=True)
        stem.eval()
        latents = cal.latents.to(device=device, dtype=dtype)
        b, _, h, w = latents.shape
        p = config["patch_size"]
        # == QwenImagePipeline._pack_latents (2x2 patches, channel-major)
        hidden = stem.img_in(rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p))
        text = stem.txt_in(stem.txt_norm(cal.text.embeds.to(device=device, dtype=dtype)))
        mask = None if cal.text.mask is None else cal.text.mask.to(device)
        text_len, _, mask = compute_text_seq_len_from_mask(text, mask)
        seen = {}
        hook = stem.time_text_embed.timestep_embedder.linear_2.register_forward_pre_hook(
            lambda m, args: seen.__setitem__("temb_hidden", args[0].abs().double().mean(0)))
        temb = stem.time_text_embed(cal.resolved_sigmas().to(device=device, dtype=dtype), hidden)
        hook.remove()
        rope = stem.pos_embed([(1, h // p, w // p)] * b, max_txt_seq_len=text_len, device=device)
        temb_score = F.silu(temb).abs().double().mean(0)
        del stem

        n = source.num_blocks
        stats = CalibrationStats([], [], None, [], [], [], temb_score.cpu(), seen["temb_hidden"].cpu())
        for s in range(n):
            if stop is not None and stop():
                raise StopRequested("calibration stopped")
            block = _load_block(source, s, dtype, device)
            last = s == n - 1
            got = {}

            def head_norms(name, weight):
                def hook(module, args):
                    per_head = args[0].unflatten(-1, (heads, head_dim)).norm(dim=-1)
                    got[name] = _token_mean(per_head, weight)
                return hook

            def unit_magnitude(name, weight):
                return lambda module, args: got.__setitem__(name, _token_mean(args[0].abs(), weight))

            hooks = [
                block.attn.to_out[0].register_forward_pre_hook(head_norms("img_heads", None)),
                block.attn.to_add_out.register_forward_pre_hook(head_norms("txt_heads", mask)),
                block.img_mlp.net[2].register_forward_pre_hook(unit_magnitude("img_units", None)),
                block.txt_mlp.net[2].register_forward_pre_hook(unit_magnitude("txt_units", mask)),
            ]
            new_text, new_hidden = block(hidden_states=hidden, encoder_hidden_states=text,
                                         encoder_hidden_states_mask=mask, temb=temb, image_rotary_emb=rope)
            for hk in hooks:
                hk.remove()
            cos = F.cosine_similarity(hidden.double(), new_hidden.double(), dim=-1)
            stats.block_scores.append(float(1 - cos.mean()))
            stats.residual_in.append((_token_mean(hidden.abs(), None) + _token_mean(text.abs(), mask)).cpu())
            stats.heads.append((got["img_heads"] + (0 if last else got["txt_heads"])).cpu())
            stats.img_units.append(got["img_units"].cpu())
            stats.txt_units.append(got["txt_units"].cpu())
            hidden, text = new_hidden, new_text
            del block
            if progress is not None:
                progress(s + 1, n, stage="calibrate", block=s)
        stats.residual_out = _token_mean(hidden.abs(), None).cpu()
    return stats


# Index spaces of every Qwen-Image tensor for a width shrink (see `shrink.plan`): "res" = the residual-stream
# channels (ONE subset for the whole model); "res*2"/"res*6" = that subset inside each of the 2 (norm_out: scale,
# shift) or 6 (img_mod/txt_mod: shift, scale, gate x2) stacked chunks; "temb" = the timestep-embedding channels;
# "temb_hidden" = the timestep MLP's hidden units; "heads" = the kept heads' whole head_dim-row groups;
# "img_ffn"/"txt_ffn" = the kept FFN units; None = kept whole. A weight [out, in] uses (row space, column space);
# its bias uses the row space; RMSNorm weights (txt_norm over the text encoder's width, norm_q/k over one head)
# are kept whole.
WIDTH_LAYOUT = WidthLayout(
    group="transformer_blocks",
    global_spaces={
        "time_text_embed.timestep_embedder.linear_1": ("temb_hidden", None),
        "time_text_embed.timestep_embedder.linear_2": ("temb", "temb_hidden"),
        "txt_norm": (None, None),
        "img_in": ("res", None),
        "txt_in": ("res", None),
        "norm_out.linear": ("res*2", "temb"),
        "proj_out": (None, "res"),
    },
    block_spaces={
        "img_mod.1": ("res*6", "temb"),
        "txt_mod.1": ("res*6", "temb"),
        **{f"attn.{m}": ("heads", "res") for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")},
        "attn.to_out.0": ("res", "heads"),
        "attn.to_add_out": ("res", "heads"),
        **{f"attn.{m}": (None, None) for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")},
        "img_mlp.net.0.proj": ("img_ffn", "res"),
        "img_mlp.net.2": ("res", "img_ffn"),
        "txt_mlp.net.0.proj": ("txt_ffn", "res"),
        "txt_mlp.net.2": ("res", "txt_ffn"),
    },
    # What only the text stream's output uses: in the source's last block these never received a gradient.
    last_block_untrained=("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
    # Edit / layered variants condition differently: Shrink DiT slices the text-to-image model only.
    unsupported=("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"),
    calibrate=_calibrate,
)


def _block_image_io(args, kwargs, output, image_tokens):
    """A QwenImageTransformerBlock takes the image stream as `hidden_states` and returns (text, image)."""
    x_in = kwargs.get("hidden_states", args[0] if args else None)
    return x_in, (output[1] if isinstance(output, tuple) else output)


class QwenImageFamily(Family):
    name = "qwen_image"
    title = "Qwen-Image"
    signature_keys = SIGNATURE_KEYS
    heads_key = "num_attention_heads"
    head_prefixes = ("norm_out.", "proj_out.")
    patch = 2  # 2x2 latent patches packed into one token
    vae_factor = 8
    # DiffSynth's documented settings (Direct Distill's Qwen-Image teacher: 50 steps, cfg 4, 1328x1328).
    schedule_template = "Qwen-Image"
    sampling_defaults = dict(steps=50, cfg_scale=4.0, height=1328, width=1328)
    text_encoder_class = "Qwen2_5_VLForConditionalGeneration"
    # A single text-encoder file loads only the text model: for text prompts diffusers' QwenImagePipeline runs
    # nothing else (no image input reaches the vision tower; it reads hidden states, not the LM head's logits), and
    # the hidden states are the same (tests/test_single_files.py); 1.2B fewer parameters in memory.
    text_only_encoder_class = "Qwen2_5_VLTextModel"
    bundled_tokenizer = "qwen2_5"
    default_text_max_length = 1024
    # prompts are not padded; 256 tokens covers long captions (DiffSynth trains up to 512)
    report_text_tokens = 256
    vae_class = "AutoencoderKLQwenImage"
    pipeline_class = "QwenImagePipeline"
    transformer_library = "diffusers"
    lora_presets = {
        # DiffSynth-Studio's Qwen-Image LoRA recipes (examples/qwen_image/model_training/lora/*.sh, Distill-LoRA).
        "qwen_image": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                       "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"],
        # Attention projections only: about a third of the adapter size, for small datasets.
        "qwen_image_attn": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                            "to_add_out"],
        # Every Linear inside the blocks (DiffSynth's list plus the MLP input projections).
        "qwen_image_all": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                           "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.0.proj",
                           "txt_mlp.net.2", "txt_mod.1"],
    }
    default_lora_preset = "qwen_image"
    # The meta measurement gives 56 bytes (4x FFN and dual-stream modulation), rounded down to stay a lower bound.
    saved_per_token_width = 48
    # The last block's text branch never reaches the output: DDP must tolerate its unused parameters
    # (DiffSynth's --find_unused_parameters).
    ddp_find_unused_parameters = True
    width_layout = WIDTH_LAYOUT

    # -- the model
    def model_class(self):
        return model_class()

    def presets(self) -> dict[str, dict]:
        return {"qwen-image": dict(QWEN_IMAGE_CONFIG), "qwen-image-tiny": tiny_config()}

    def tiny_config(self, **overrides) -> dict:
        return tiny_config(**overrides)

    def is_family(self, keys) -> bool:
        return is_family(keys)

    def config_from_shapes(self, shape_of, keys) -> dict:
        return config_from_shapes(shape_of, keys)

    def dims(self, config: dict) -> Dims:
        width = config["num_attention_heads"] * config["attention_head_dim"]
        return Dims(width, config["num_layers"], 4 * width)

    # -- calling the DiT
    def latent_channels(self, config: dict) -> int:
        return config["in_channels"] // config["patch_size"] ** 2

    def text_width(self, config: dict) -> int:
        return config["joint_attention_dim"]

    def velocity(self, dit, latents, sigma, text):
        """2x2 patches packed into tokens in the order of diffusers' `QwenImagePipeline._pack_latents`,
        `img_shapes = [[(1, h/2, w/2)]] * B` for RoPE, and `timestep = sigma` (diffusers' pipeline passes t / 1000
        and the model's time projection multiplies by 1000 again); the prompt mask goes in as
        `encoder_hidden_states_mask`."""
        from einops import rearrange

        from ..velocity import model_dtype

        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise DistilleryError("latents", tuple(latents.shape), "Qwen-Image packs 2x2 patches: h and w must be "
                                  "even.", "use an image size that is a multiple of 16.")
        dtype = model_dtype(dit)
        # == QwenImagePipeline._pack_latents: view(b, c, h/2, 2, w/2, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2).to(dtype)
        text = text.trimmed()
        mask = None if text.mask is None or bool(text.mask.all()) else text.mask.to(latents.device)
        out = dit(hidden_states=tokens, encoder_hidden_states=text.embeds.to(latents.device, dtype),
                  encoder_hidden_states_mask=mask, timestep=sigma.to(dtype), img_shapes=[[(1, h // 2, w // 2)]] * b,
                  return_dict=False)[0]
        return rearrange(out, "b (h w) (c p q) -> b c (h p) (w q)", h=h // 2, p=2, q=2).to(latents.dtype)

    def example_inputs(self, config, *, batch, h, w, text_tokens, device, dtype) -> dict:
        import torch

        kw = {"device": device, "dtype": dtype}
        h, w = h // self.patch, w // self.patch
        return {"hidden_states": torch.randn(batch, h * w, config["in_channels"], **kw),
                "encoder_hidden_states": torch.randn(batch, text_tokens, config["joint_attention_dim"], **kw),
                "timestep": torch.full((batch,), 500.0, device=device), "img_shapes": [(1, h, w)] * batch,
                "return_dict": False}

    # -- blocks
    def block_groups(self):
        return (BlockGroup("transformer_blocks", "num_layers", image_io=_block_image_io),)

    # -- pipeline components
    def prompt_encoder(self, text_encoder, tokenizer, settings: dict):
        from ..text import QwenImagePromptEncoder

        return QwenImagePromptEncoder(text_encoder, tokenizer,
                                      max_length=int(settings.get("max_length", self.default_text_max_length)))

    def text_encoder_key(self, key: str) -> str | None:
        from ._qwen_text import qwen25_vl_key

        return qwen25_vl_key(key)

    def text_encoder_from_shapes(self, shape_of, keys):
        from ._qwen_text import qwen25_vl_config

        return qwen25_vl_config(shape_of, keys, QWEN25_VL_7B_CONFIG, "Qwen-Image's Qwen2.5-VL text encoder",
                                "give Qwen-Image's text encoder (ComfyUI: models/text_encoders/"
                                "qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors).")

    def codec(self, vae):
        from ..codecs import QwenImageVAECodec

        return QwenImageVAECodec(vae)

    def convert_vae_state(self, state: dict, config: dict) -> dict:
        """ComfyUI's qwen_image_vae.safetensors keeps Wan 2.1's layout (the same modules): diffusers' converter."""
        from diffusers.loaders import single_file_utils as sfu

        return sfu.convert_wan_vae_to_diffusers(state)

    def tiny_pipeline(self, seed: int = 0):
        from .. import tiny
        from ..codecs import QwenImageVAECodec
        from ..pipelines import TextToImagePipeline
        from ..text import QwenImagePromptEncoder

        tokenizer = tiny.tiny_tokenizer()
        encoder = QwenImagePromptEncoder(tiny.tiny_qwen25vl_encoder(tokenizer, seed=seed + 1), tokenizer)
        return TextToImagePipeline(tiny.tiny_qwen_image_dit(encoder.width, seed=seed), encoder,
                                   QwenImageVAECodec(tiny.tiny_qwen_image_vae(seed=seed + 2)),
                                   defaults=tiny.TINY_DEFAULTS)

    # -- ComfyUI: our keys are ComfyUI's (identity mappings, the defaults)
    def comfy_loadable(self, config: dict) -> tuple[bool, str]:
        """Stock UNETLoader reads only the block count and input channels from a file and takes the rest from its
        defaults, so a student keeping Qwen-Image's width (24 heads x 128, text width 3584) loads there."""
        for key in COMFY_FIXED:
            have, want = config.get(key), QWEN_IMAGE_CONFIG[key]
            if (list(have) if isinstance(have, (list, tuple)) else have) != want:
                return False, (f"{key}={have} differs from Qwen-Image's {want}; ComfyUI's UNETLoader assumes the "
                               "latter. Load it with the pack's Load Student node.")
        return True, "loads in stock UNETLoader (models/diffusion_models)"

    def comfy_model_config(self, config: dict) -> tuple[str, dict]:
        keys = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim")
        return "QwenImage", {"image_model": "qwen_image", **{k: config[k] for k in keys},
                             "axes_dims_rope": tuple(config["axes_dims_rope"])}


FAMILY = QwenImageFamily()
