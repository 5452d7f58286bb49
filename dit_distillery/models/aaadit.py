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
# The configs and how checkpoints are recognised live with the family (families/aaadit.py); tests and the
# benchmarks import the configs from here too.
from ..families.aaadit import DEFAULT_HEAD_DIM, TUTORIAL_CONFIG, TUTORIAL_PARAMS, tiny_config  # noqa: F401


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

