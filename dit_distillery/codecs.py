"""Image <-> latent codecs: the family's VAE wrapped behind one small interface.

A `Codec` maps images `[B, 3, H, W]` in [-1, 1] to the *normalised, unpacked* latents a DiT denoises
(`[B, latent_channels, H / spatial_factor, W / spatial_factor]`) and back. Encoding is deterministic (the
posterior mean, never a sample) so a cached dataset is reproducible. Both directions are batched and use no
in-place ops on their inputs, so they also work under autograd.

* `PixelCodec`: lossless space-to-depth; no weights. The embedded demo's codec and the tests' default.
* `QwenImageVAECodec`: diffusers' `AutoencoderKLQwenImage` (a video VAE: images travel as 1-frame videos),
  latents normalised with the VAE config's `latents_mean`/`latents_std` exactly as diffusers' QwenImagePipeline.
* `Flux2VAECodec`: diffusers' `AutoencoderKLFlux2`, 2x2-patchified to 128 channels at 1/16 and normalised with
  the VAE's BatchNorm running statistics, exactly as diffusers' Flux2 pipelines and DiffSynth's flux2_vae.

`identity` names the weights a latent depends on (the dataset cache keys on it).
"""

from __future__ import annotations

import hashlib
import json

import torch
from einops import rearrange

from .errors import DistilleryError

_NOT_ARCHITECTURE = {"transformers_version", "dtype", "torch_dtype", "architectures"}
_HASH_ALL_BELOW = 50_000_000  # modules smaller than this are hashed byte for byte; larger ones by shape + samples


def _architecture(config: dict) -> dict:
    """A config without where it was loaded from, which library version wrote it, or its dtype (at every level)."""
    return {k: _architecture(v) if isinstance(v, dict) else v for k, v in config.items()
            if not str(k).startswith("_") and k not in _NOT_ARCHITECTURE}


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's config and weights: the same however the module was built or loaded.

    Modules under 50M values are hashed byte for byte; larger ones by names, shapes and sampled values.
    """
    h = hashlib.sha1()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(_architecture(as_dict), sort_keys=True, default=str).encode())
    state = module.state_dict()
    small = sum(t.numel() for t in state.values()) < _HASH_ALL_BELOW
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        if not small:  # about 4096 evenly spread values per tensor: cheap even for a 7B encoder on a GPU
            flat = flat[:: max(1, flat.numel() // 4096)]
        flat = flat.contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


class Codec(torch.nn.Module):
    """Base class: `latent_channels`, `spatial_factor`, `identity`, `encode(images)`, `decode(latents)`."""

    kind = "codec"
    latent_channels: int
    spatial_factor: int

    def __init__(self, identity: str | None = None):
        super().__init__()
        self._identity = identity

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = f"{self.kind}:{module_fingerprint(getattr(self, 'vae', self))}"
        return self._identity

    @identity.setter
    def identity(self, value: str) -> None:
        self._identity = value

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            return t.dtype
        return torch.float32

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.spatial_factor
        if height % f or width % f or height < f or width < f:
            raise DistilleryError("size", f"{width}x{height}", f"width and height must be positive multiples of {f} "
                                  f"for this codec.", f"use e.g. {max(f, width // f * f)}x{max(f, height // f * f)}.")
        return self.latent_channels, height // f, width // f

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise DistilleryError(what, tuple(x.shape), f"expected [B, {channels}, H, W].",
                                  f"pass a batch of {what} with {channels} channels.")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCodec(Codec):
    """Lossless space-to-depth: each `patch x patch` RGB block becomes `3 * patch^2` latent channels."""

    kind = "pixel"

    def __init__(self, patch: int = 4):
        if not isinstance(patch, int) or patch < 1:
            raise DistilleryError("patch", patch, "must be a whole number >= 1.", "use 2, 4 or 8.")
        super().__init__(identity=f"pixel:p{patch}")
        self.patch = patch
        self.latent_channels = 3 * patch * patch
        self.spatial_factor = patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images, 3, "images")
        self.latent_shape(images.shape[2], images.shape[3])
        return rearrange(images, "b c (h p) (w q) -> b (c p q) h w", p=self.patch, q=self.patch)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self.latent_channels, "latents")
        return rearrange(latents, "b (c p q) h w -> b c (h p) (w q)", p=self.patch, q=self.patch)


class QwenImageVAECodec(Codec):
    """Qwen-Image's VAE: 16 channels at 1/8, normalised `(z - latents_mean) / latents_std` per channel."""

    kind = "qwen_image_vae"

    def __init__(self, vae, identity: str | None = None):
        super().__init__(identity)
        self.vae = vae
        self.latent_channels = int(vae.config.z_dim)
        self.spatial_factor = int(vae.spatial_compression_ratio)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Same expressions as diffusers' QwenImagePipeline (it multiplies by 1/std), so latents match bit for bit.
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images, 3, "images")
        self.latent_shape(images.shape[2], images.shape[3])
        frames = images.to(self.device, self.dtype).unsqueeze(2)  # [B, 3, 1, H, W]: a one-frame video
        z = self.vae.encode(frames).latent_dist.mode()
        mean, inv_std = self._stats(z)
        return ((z - mean) * inv_std)[:, :, 0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self.latent_channels, "latents")
        z = latents.to(self.device, self.dtype).unsqueeze(2)
        mean, inv_std = self._stats(z)
        return self.vae.decode(z / inv_std + mean).sample[:, :, 0]


class Flux2VAECodec(Codec):
    """FLUX.2's VAE as AAADiT uses it: 32 channels at 1/8, patchified 2x2 to 128 at 1/16, BatchNorm-normalised."""

    kind = "flux2_vae"

    def __init__(self, vae, identity: str | None = None):
        super().__init__(identity)
        self.vae = vae
        p, q = vae.config.patch_size
        self.patch = (int(p), int(q))
        self.latent_channels = int(vae.config.latent_channels) * p * q
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1) * p

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images, 3, "images")
        self.latent_shape(images.shape[2], images.shape[3])
        z = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mode()
        # Same channel order as diffusers' Flux2Pipeline._patchify_latents and DiffSynth's "B C (H 2) (W 2)".
        z = rearrange(z, "b c (h p) (w q) -> b (c p q) h w", p=self.patch[0], q=self.patch[1])
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self.latent_channels, "latents")
        z = latents.to(self.device, self.dtype)
        mean, std = self._stats(z)
        z = rearrange(z * std + mean, "b (c p q) h w -> b c (h p) (w q)", p=self.patch[0], q=self.patch[1])
        return self.vae.decode(z).sample


class ShiftScaleVAECodec(Codec):
    """An `AutoencoderKL` normalised with its config's `shift_factor` and `scaling_factor`, `(z - shift) * scale`,
    as diffusers' ZImagePipeline (FLUX.1's VAE: 16 channels at 1/8, shift 0.1159, scale 0.3611) and ComfyUI's
    `latent_formats.Flux`. The DiT patchifies these latents itself."""

    kind = "shift_scale_vae"

    def __init__(self, vae, identity: str | None = None):
        super().__init__(identity)
        self.vae = vae
        self.latent_channels = int(vae.config.latent_channels)
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.scale = float(vae.config.scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images, 3, "images")
        self.latent_shape(images.shape[2], images.shape[3])
        z = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mode()
        return (z - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self.latent_channels, "latents")
        # == ZImagePipeline: latents / scaling_factor + shift_factor
        return self.vae.decode(latents.to(self.device, self.dtype) / self.scale + self.shift).sample


def codec_for_vae(vae, identity: str | None = None) -> Codec:
    """Wrap a diffusers VAE in its codec, by class."""
    name = type(vae).__name__
    if name == "AutoencoderKLQwenImage":
        return QwenImageVAECodec(vae, identity)
    if name == "AutoencoderKLFlux2":
        return Flux2VAECodec(vae, identity)
    raise DistilleryError("vae", name, "not a VAE this pack knows.",
                          "use Qwen-Image's VAE (AutoencoderKLQwenImage) or FLUX.2's (AutoencoderKLFlux2).")
