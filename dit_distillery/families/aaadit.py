"""AAADiT: the 0.1B text-to-image DiT of DiffSynth-Studio's "train from scratch" tutorial.

The model itself is written by hand in `models/aaadit.py` (no library ships it); this module holds its configs,
how a checkpoint is recognised and read back, how it is called, and the rest of what `families.base.Family`
asks. Its pipeline is the tutorial's: a Qwen3 text encoder padded to a fixed length and FLUX.2's VAE (or the
demo's pixel codec). ComfyUI has no AAADiT, so its files keep their own (DiffSynth's) key names.
"""

from __future__ import annotations

from ..errors import DistilleryError
from .base import BlockGroup, Dims, Family

# The tutorial's model (DiffSynth `AAADiT()`): 10 blocks, 1024 wide, 32 heads of 32, Flux2-VAE latents (128
# channels at 1/16), Qwen3-0.6B text (1024 wide), a 16x16 learned position grid.
TUTORIAL_CONFIG = {
    "width": 1024, "num_blocks": 10, "num_heads": 32, "ffn_ratio": 3, "latent_channels": 128,
    "text_width": 1024, "pos_grid": [16, 16], "timestep_channels": 256, "use_text_mask": False,
}
TUTORIAL_PARAMS = 128_824_448
# The tutorial's heads are 32 wide; the head count is not stored in the weights, so files without our
# metadata are read back with this head size.
DEFAULT_HEAD_DIM = 32

SIGNATURE_KEYS = ("pos_embedder.image_emb", "pos_embedder.text_emb", "timestep_embedder.timestep_embedder.0.weight",
                  "image_embedder.0.weight", "text_embedder.0.weight", "proj_out.weight")
BLOCK_PREFIX = "blocks."


def tiny_config(width: int = 64, num_blocks: int = 2, num_heads: int = 2, latent_channels: int = 16,
                text_width: int = 32, pos_grid=(4, 4), use_text_mask: bool = False) -> dict:
    """A small AAADiT config for tests and demos (same structure, a few hundred thousand parameters)."""
    return {"width": width, "num_blocks": num_blocks, "num_heads": num_heads, "ffn_ratio": 3,
            "latent_channels": latent_channels, "text_width": text_width, "pos_grid": list(pos_grid),
            "timestep_channels": 32, "use_text_mask": use_text_mask}


def is_family(keys) -> bool:
    keys = set(keys)
    return all(k in keys for k in SIGNATURE_KEYS)


def block_indices(keys) -> list[int]:
    """Sorted indices of the blocks present in a key set."""
    return sorted({int(k[len(BLOCK_PREFIX):].split(".", 1)[0]) for k in keys if k.startswith(BLOCK_PREFIX)})


def config_from_shapes(shape_of, keys) -> dict:
    """Rebuild the config from tensor shapes (`shape_of(key) -> tuple`) and the key set.

    Everything but the head count is in the shapes. Heads are not (the attention weights are [width, width]
    whatever the split), so files without our metadata are read with the tutorial's head size of 32
    (`width // 32` heads); DiT Distillery's own files carry the config in their metadata, which the registry
    reads first. `use_text_mask` is a behaviour, not a weight: such files get the tutorial's False.
    """
    keys = list(keys)
    if not is_family(keys):
        missing = [k for k in SIGNATURE_KEYS if k not in set(keys)]
        raise DistilleryError("source", f"{len(keys)} tensors", f"not an AAADiT (missing {missing}).",
                              "give an AAADiT file (DiffSynth's AAAMyModel checkpoints or one built by Build AAADiT).")
    blocks = block_indices(keys)
    if blocks != list(range(len(blocks))):
        raise DistilleryError("source", f"blocks {blocks[:5]}...", "block indices are not contiguous from 0.",
                              "renumber the blocks 0..N-1.")
    _, width, grid_h, grid_w = shape_of("pos_embedder.image_emb")
    if width % DEFAULT_HEAD_DIM:
        raise DistilleryError("source", f"width {width}",
                              f"the head count is not stored in the weights and the width is not a multiple of "
                              f"{DEFAULT_HEAD_DIM} (the tutorial's head size) to guess it from.",
                              "load the model through its diffusers folder (config.json) or re-save it with DiT "
                              "Distillery, which records the config.")
    ffn_ratio = shape_of("blocks.0.ff.0.weight")[0] / width if blocks else TUTORIAL_CONFIG["ffn_ratio"]
    return {
        "width": width,
        "num_blocks": len(blocks),
        "num_heads": width // DEFAULT_HEAD_DIM,
        "ffn_ratio": int(ffn_ratio) if float(ffn_ratio).is_integer() else ffn_ratio,
        "latent_channels": shape_of("image_embedder.0.weight")[1],
        "text_width": shape_of("text_embedder.0.weight")[1],
        "pos_grid": [grid_h, grid_w],
        "timestep_channels": shape_of("timestep_embedder.timestep_embedder.0.weight")[1],
        "use_text_mask": False,
    }


def _block_image_io(args, kwargs, output, image_tokens):
    """An AAABlock takes and returns one sequence, [image tokens; text tokens] (its first argument, `emb`)."""
    x_in = args[0] if args else kwargs["emb"]
    return x_in[:, :image_tokens], output[:, :image_tokens]


class AAADiTFamily(Family):
    name = "aaadit"
    title = "AAADiT"
    signature_keys = SIGNATURE_KEYS
    heads_key = "num_heads"
    head_prefixes = ("proj_out.",)
    patch = 1  # one token per latent pixel
    vae_factor = 16  # FLUX.2's VAE at 1/8, patchified 2x2 by the codec
    # The AAA tutorial's inference: 30 steps, cfg 10, 256x256.
    schedule_template = "FLUX.2"
    sampling_defaults = dict(steps=30, cfg_scale=10.0, height=256, width=256)
    text_encoder_class = "Qwen3Model"
    default_text_max_length = 128
    report_text_tokens = 128  # the tutorial pads every prompt to 128 Qwen3 tokens
    vae_class = "AutoencoderKLFlux2"
    pipeline_class = "AAAImagePipeline"
    transformer_library = "dit_distillery"
    lora_presets = {
        "aaadit": ["to_q", "to_k", "to_v", "to_out", "ff.0", "ff.2", "to_gate"],  # every Linear inside a block
        "aaadit_attn": ["to_q", "to_k", "to_v", "to_out"],
    }
    default_lora_preset = "aaadit"
    # The meta measurement gives 36 bytes (3x FFN), rounded down to stay a lower bound.
    saved_per_token_width = 32
    ddp_find_unused_parameters = False  # every parameter reaches the output (and the check costs a traversal)

    # -- the model
    def model_class(self):
        from ..models.aaadit import AAADiT

        return AAADiT

    def presets(self) -> dict[str, dict]:
        return {"aaadit": dict(TUTORIAL_CONFIG), "aaadit-tiny": tiny_config()}

    def tiny_config(self, **overrides) -> dict:
        return tiny_config(**overrides)

    def is_family(self, keys) -> bool:
        return is_family(keys)

    def config_from_shapes(self, shape_of, keys) -> dict:
        return config_from_shapes(shape_of, keys)

    def dims(self, config: dict) -> Dims:
        return Dims(config["width"], config["num_blocks"], config.get("ffn_ratio", 3) * config["width"])

    # -- calling the DiT
    def latent_channels(self, config: dict) -> int:
        return config["latent_channels"]

    def text_width(self, config: dict) -> int:
        return config["text_width"]

    def velocity(self, dit, latents, sigma, text):
        """`dit(latents, prompt_embeds, timestep=sigma * 1000, text_mask)`, as DiffSynth's tutorial."""
        from ..velocity import model_dtype

        dtype = model_dtype(dit)
        mask = None if text.mask is None else text.mask.to(latents.device)
        out = dit(latents.to(dtype), text.embeds.to(latents.device, dtype), (sigma * 1000).to(dtype), mask)
        return out.to(latents.dtype)

    def example_inputs(self, config, *, batch, h, w, text_tokens, device, dtype) -> dict:
        import torch

        kw = {"device": device, "dtype": dtype}
        return {"latents": torch.randn(batch, config["latent_channels"], h, w, **kw),
                "prompt_embeds": torch.randn(batch, text_tokens, config["text_width"], **kw),
                "timestep": torch.full((batch,), 500.0, device=device)}

    # -- blocks
    def block_groups(self):
        return (BlockGroup("blocks", "num_blocks", image_io=_block_image_io),)

    # -- pipeline components
    def prompt_encoder(self, text_encoder, tokenizer, settings: dict):
        from ..text import Qwen3PromptEncoder

        return Qwen3PromptEncoder(text_encoder, tokenizer,
                                  max_length=int(settings.get("max_length", self.default_text_max_length)),
                                  hidden_layers=tuple(settings.get("hidden_layers", (-1,))))

    def codec(self, vae):
        from ..codecs import Flux2VAECodec

        return Flux2VAECodec(vae)

    def convert_vae_state(self, state: dict, config: dict) -> dict:
        """FLUX.2's VAE is an LDM VAE plus BatchNorm statistics: diffusers' LDM converter, `bn.*` kept."""
        from diffusers.loaders import single_file_utils as sfu

        converted = sfu.convert_ldm_vae_checkpoint(state, config)
        converted.update({k: v for k, v in state.items() if k.startswith("bn.")})
        return converted

    def tiny_pipeline(self, seed: int = 0):
        from .. import tiny
        from ..codecs import Flux2VAECodec
        from ..pipelines import TextToImagePipeline
        from ..text import Qwen3PromptEncoder

        tokenizer = tiny.tiny_tokenizer()
        encoder = Qwen3PromptEncoder(tiny.tiny_qwen3_encoder(tokenizer, seed=seed + 1), tokenizer, max_length=32)
        codec = Flux2VAECodec(tiny.tiny_flux2_vae(seed=seed + 2))
        return TextToImagePipeline(tiny.tiny_aaadit(encoder.width, codec.latent_channels, seed=seed), encoder, codec,
                                   defaults=tiny.TINY_DEFAULTS)


FAMILY = AAADiTFamily()
