"""AAADiT: the 0.1B text-to-image DiT of DiffSynth-Studio's "train from scratch" tutorial, as a diffusers model.

The tutorial's model is a plain `torch.nn.Module`; here it is a diffusers `ModelMixin`/`ConfigMixin` so it saves
and loads with `save_pretrained`/`from_pretrained`, supports `enable_gradient_checkpointing()` and plugs into
peft like every other diffusers DiT. Module and parameter names are DiffSynth's, so the tutorial's released
checkpoints (`DiffSynth-Studio/AAAMyModel`, keys `pos_embedder.image_emb`, `blocks.N.to_q.weight`, ...) load with
no key conversion. With the defaults the model has exactly the tutorial's 128,824,448 parameters.

Written by hand because no library ships this architecture. Differences from the tutorial, none of which
change its outputs at batch 1 without a mask:
* a timestep per sample (the tutorial's `view(1, 1, -1)` only allows batch 1);
* attention through `torch.nn.functional.scaled_dot_product_attention` (DiffSynth routes to the same kernels);
* optional masking of padded text tokens (`use_text_mask=True`; off by default, as in the tutorial, which
  attends to the padding its prompt encoder adds);
* per-block gradient checkpointing the diffusers way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from ..errors import DistilleryError

FAMILY = "aaadit"

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


def _check_positive(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DistilleryError(field, value, "must be a positive integer.", f"give a whole number >= 1 for {field}.")


class AAAPositionalEmbedding(torch.nn.Module):
    """A learned image position grid, resized bilinearly to the latent size, and one vector shared by all text."""

    def __init__(self, height: int = 16, width: int = 16, dim: int = 1024):
        super().__init__()
        self.image_emb = torch.nn.Parameter(torch.randn((1, dim, height, width)))
        self.text_emb = torch.nn.Parameter(torch.randn((dim,)))

    def forward(self, latents: torch.Tensor, text_tokens: int) -> torch.Tensor:
        """[1, H*W + L, dim]: the same for every sample, so it broadcasts over the batch."""
        image_emb = self.image_emb.to(device=latents.device, dtype=latents.dtype)
        image_emb = F.interpolate(image_emb, size=tuple(latents.shape[-2:]), mode="bilinear")
        image_emb = rearrange(image_emb, "B C H W -> B (H W) C")
        text_emb = self.text_emb.to(device=latents.device, dtype=latents.dtype).expand(1, text_tokens, -1)
        return torch.cat([image_emb, text_emb], dim=1)


class AAATimestepEmbedder(torch.nn.Module):
    """DiffSynth's `TimestepEmbeddings(256, dim)` in its non-diffusers key layout (`timestep_embedder.0/2`).

    The sinusoid is diffusers' `get_timestep_embedding(t, C, flip_sin_to_cos=True, downscale_freq_shift=0)`,
    which is DiffSynth's formula: freq_i = exp(-ln(10000) i / (C/2)), [cos(t freq), sin(t freq)].
    """

    def __init__(self, channels: int = 256, dim: int = 1024):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = torch.nn.Sequential(
            torch.nn.Linear(channels, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = get_timestep_embedding(timestep, self.channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.timestep_embedder(emb.to(dtype))


class AAABlock(torch.nn.Module):
    """Self-attention over [image, text] tokens and an MLP, each scaled by (1 + a timestep gate).

    The position embedding is added to each norm's input only, never to the residual stream (DiffSynth's design).
    """

    def __init__(self, dim: int = 1024, num_heads: int = 32, ffn_dim: int = 3072):
        super().__init__()
        self.norm_attn = torch.nn.RMSNorm(dim, elementwise_affine=False)
        self.to_q = torch.nn.Linear(dim, dim)
        self.to_k = torch.nn.Linear(dim, dim)
        self.to_v = torch.nn.Linear(dim, dim)
        self.to_out = torch.nn.Linear(dim, dim)
        self.norm_mlp = torch.nn.RMSNorm(dim, elementwise_affine=False)
        self.ff = torch.nn.Sequential(torch.nn.Linear(dim, ffn_dim), torch.nn.SiLU(), torch.nn.Linear(ffn_dim, dim))
        self.to_gate = torch.nn.Linear(dim, dim * 2)
        self.num_heads = num_heads

    def attention(self, emb, pos_emb, attn_mask=None):
        emb = self.norm_attn(emb + pos_emb)
        q, k, v = (rearrange(f(emb), "b s (n d) -> b n s d", n=self.num_heads) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(rearrange(out, "b n s d -> b s (n d)"))

    def feed_forward(self, emb, pos_emb):
        return self.ff(self.norm_mlp(emb + pos_emb))

    def forward(self, emb, pos_emb, t_emb, attn_mask=None):
        gate_attn, gate_mlp = self.to_gate(t_emb).chunk(2, dim=-1)
        emb = emb + self.attention(emb, pos_emb, attn_mask) * (1 + gate_attn)
        emb = emb + self.feed_forward(emb, pos_emb) * (1 + gate_mlp)
        return emb


class AAADiT(ModelMixin, ConfigMixin):
    """DiffSynth's AAADiT (see the module docstring); predicts the flow-matching velocity `noise - x0`."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["AAABlock"]
    _skip_layerwise_casting_patterns = ["pos_embedder", "norm"]

    @register_to_config
    def __init__(self, width: int = 1024, num_blocks: int = 10, num_heads: int = 32, ffn_ratio: int = 3,
                 latent_channels: int = 128, text_width: int = 1024, pos_grid=(16, 16), timestep_channels: int = 256,
                 use_text_mask: bool = False):
        super().__init__()
        for field, value in (("width", width), ("num_blocks", num_blocks), ("num_heads", num_heads),
                             ("latent_channels", latent_channels), ("text_width", text_width),
                             ("timestep_channels", timestep_channels)):
            _check_positive(field, value)
        if width % num_heads:
            near = min((h for h in range(1, width + 1) if width % h == 0), key=lambda h: abs(width / h - DEFAULT_HEAD_DIM))
            raise DistilleryError("num_heads", num_heads, f"does not divide the width {width}.",
                                  f"choose heads so that width/heads is whole (e.g. {near}: heads of {width // near}).")
        if timestep_channels % 2:
            raise DistilleryError("timestep_channels", timestep_channels, "must be even (cos and sin halves).",
                                  "use 256 like the tutorial.")
        ffn_dim = width * ffn_ratio
        if isinstance(ffn_ratio, bool) or ffn_dim <= 0 or ffn_dim != int(ffn_dim):
            raise DistilleryError("ffn_ratio", ffn_ratio, f"width x ffn_ratio must be a positive whole number (width {width}).",
                                  "use 3 like the tutorial, or another ratio giving a whole MLP width.")
        if not (isinstance(pos_grid, (list, tuple)) and len(pos_grid) == 2):
            raise DistilleryError("pos_grid", pos_grid, "must be two sizes (height, width).", "use e.g. (16, 16).")
        for value in pos_grid:
            _check_positive("pos_grid", value)
        self.pos_embedder = AAAPositionalEmbedding(height=pos_grid[0], width=pos_grid[1], dim=width)
        self.timestep_embedder = AAATimestepEmbedder(timestep_channels, width)
        self.image_embedder = torch.nn.Sequential(torch.nn.Linear(latent_channels, width), torch.nn.LayerNorm(width))
        self.text_embedder = torch.nn.Sequential(torch.nn.Linear(text_width, width), torch.nn.LayerNorm(width))
        self.blocks = torch.nn.ModuleList([AAABlock(width, num_heads, int(ffn_dim)) for _ in range(num_blocks)])
        self.proj_out = torch.nn.Linear(width, latent_channels)
        self.gradient_checkpointing = False

    def forward(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, timestep, text_mask: torch.Tensor | None = None,
                return_dict: bool = False):
        """Velocity for noisy `latents`.

        Args:
            latents: `[B, latent_channels, H, W]` (H, W = image size / 16 for the tutorial's Flux2 VAE).
            prompt_embeds: `[B, L, text_width]` text encoder hidden states.
            timestep: `[B]`, `[1]` or a scalar, sigma * 1000 as DiffSynth passes it.
            text_mask: `[B, L]` bool (True = real token). Used only when the config has `use_text_mask=True`;
                otherwise padding is attended to, as in the tutorial.
            return_dict: return a `Transformer2DModelOutput` instead of the tensor.

        Returns the velocity `[B, latent_channels, H, W]` in the dtype of `latents`.
        """
        batch, channels, height, width = latents.shape
        if channels != self.config.latent_channels or prompt_embeds.shape[-1] != self.config.text_width:
            raise DistilleryError("latents", f"{tuple(latents.shape)} / text {tuple(prompt_embeds.shape)}",
                                  f"this AAADiT takes {self.config.latent_channels} latent channels and "
                                  f"{self.config.text_width}-wide text embeddings.",
                                  "use the VAE and text encoder the model was built for.")
        out_dtype = latents.dtype
        dtype = self.proj_out.weight.dtype
        if dtype.itemsize < 2:  # fp8 storage (diffusers layerwise casting): compute in the input dtype
            dtype = latents.dtype
        latents, prompt_embeds = latents.to(dtype), prompt_embeds.to(dtype)
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        elif timestep.numel() != batch:
            raise DistilleryError("timestep", tuple(timestep.shape), f"needs one value or one per sample ({batch}).",
                                  "pass a scalar or a [B] tensor.")

        pos_emb = self.pos_embedder(latents, prompt_embeds.shape[1])
        t_emb = self.timestep_embedder(timestep, dtype=dtype)[:, None]
        image = self.image_embedder(rearrange(latents, "B C H W -> B (H W) C"))
        text = self.text_embedder(prompt_embeds)
        emb = torch.cat([image, text], dim=1)
        attn_mask = None
        if self.config.use_text_mask and text_mask is not None:
            keep_image = torch.ones(batch, height * width, dtype=torch.bool, device=latents.device)
            attn_mask = torch.cat([keep_image, text_mask.to(device=latents.device, dtype=torch.bool)], dim=1)[:, None, None]

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                emb = self._gradient_checkpointing_func(block, emb, pos_emb, t_emb, attn_mask)
            else:
                emb = block(emb, pos_emb, t_emb, attn_mask)

        out = self.proj_out(emb[:, :height * width])
        out = rearrange(out, "B (H W) C -> B C H W", W=width).to(out_dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else out


# ----------------------------------------------------------------------------------------------------------
# Family interface (models/registry.py)

def model_class():
    return AAADiT


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
