"""Pipelines whose parts live in another program (ComfyUI): the interfaces the core asks of them.

The core never imports ComfyUI. A front end that already holds a DiT, a text encoder and a VAE in its own objects
(ComfyUI's MODEL, CLIP and VAE) hands them to the core through four small things, all defined here:

* `ExternalPromptEncoder`: a `PromptEncoder` over `encode_one(prompt) -> (embeds [1, L, D], mask [1, L] | None)`.
  The front end's own encoding is used as is (Qwen-Image's template and dropped prefix live in ComfyUI's CLIP);
  prompts are encoded one at a time and right-padded with a mask, as every other encoder returns them.
* `ExternalCodec`: a `Codec` over `encode(images) -> latents` / `decode(latents) -> images` in our conventions
  (images `[B, 3, H, W]` in [-1, 1], latents unpacked and normalised as the DiT sees them). The front end does
  its own layout and normalisation (ComfyUI: `[B, H, W, C]` in [0, 1] and `latent_format.process_in/out`).
* a sampler: `sampler(noise, sigmas, text, *, cfg_scale, negative_text, callback, stop, states) -> final
  latents`, the contract of `sampling.euler_denoise` without the velocity function: it must start from exactly
  `noise` (our DiffSynth draw, at `sigmas[0]`), step through `sigmas` and then to 0 with Euler and `v_neg + cfg *
  (v_pos - v_neg)` guidance, call `states(i, x)` (when given) with the latents before step i and
  `callback(step, total, x0_preview)` after each step, and raise `StopRequested` when `stop()` turns true. `TextToImagePipeline.sample` hands its loop to it when the pipeline has one, so a teacher
  dataset is sampled by the front end's own sampler and memory management, from our noise.
* `ExternalPipeline`: a `TextToImagePipeline` whose DiT is built only when something needs our module
  (training, Load Student, our own sampler): `materialise()` gives the family's diffusers model holding the front
  end's tensors (`assign_weights`: built on the meta device, `load_state_dict(assign=True)`, nothing copied), so a
  LoRA wraps our module and never the front end's. Until then the pipeline holds the model's skeleton (meta).

`detect_state` finds the family and config of a DiT from its tensor names and shapes (any family, either naming).
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import torch

from . import families
from .codecs import Codec
from .conditioning import TextEmbeds
from .errors import DistilleryError
from .pipelines.base import TextToImagePipeline
from .text import PromptEncoder, _check_prompts


class Sampler(Protocol):
    """The sampling loop a front end runs for the pipeline (see the module docstring)."""

    def __call__(self, noise: torch.Tensor, sigmas: list[float], text: TextEmbeds, *, cfg_scale: float,
                 negative_text: TextEmbeds | None, callback, stop, states=None) -> torch.Tensor: ...


def _lazy_identity(value: str | Callable[[], str]) -> Callable[[], str]:
    return functools.cache(value) if callable(value) else (lambda: value)


# ----------------------------------------------------------------------------------------------------------
# Prompts

class ExternalPromptEncoder(PromptEncoder):
    """Prompts encoded by a front end's text encoder, one at a time, returned right-padded with a mask.

    `width` is the embedding width the DiT takes: every encoding is checked against it, so a text encoder of
    another model is refused by name at its first prompt. `identity` (a string or a callable computed once) names
    the weights and settings behind the encoding. `trims_padding`: whether the DiT masks padding out (then cached
    embeddings keep only the real tokens)."""

    kind = "external"

    def __init__(self, encode_one: Callable[[str], tuple], width: int, identity: str | Callable[[], str], *,
                 trims_padding: bool = True, what: str = "text encoder", fix: str = ""):
        self._encode_one = encode_one
        self._width = int(width)
        self._identity_fn = _lazy_identity(identity)
        self.trims_padding = trims_padding
        self.what, self.fix = what, fix or "use the text encoder that belongs to the model."
        self._dtype = None
        self.text_encoder = None
        self.tokenizer = None

    @property
    def identity(self) -> str:
        return self._identity_fn()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # encodings are returned on the CPU; the front end places its model itself

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype or torch.float32

    @property
    def width(self) -> int:
        return self._width

    def to(self, device=None, dtype=None) -> "ExternalPromptEncoder":
        return self  # the front end manages where its text encoder lives (offloading included)

    def encode(self, prompts: list[str]) -> TextEmbeds:
        prompts = _check_prompts(prompts)
        rows = []
        for prompt in prompts:
            embeds, mask = self._encode_one(prompt)
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[-1] != self._width:
                raise DistilleryError(self.what, tuple(embeds.shape), f"gives embeddings of shape "
                                      f"{tuple(embeds.shape)}; the DiT takes [1, L, {self._width}].", self.fix)
            mask = None if mask is None else mask.reshape(1, -1).bool().cpu()
            if mask is not None and mask.shape[1] != embeds.shape[1]:
                raise DistilleryError(self.what, tuple(mask.shape), "its attention mask does not match its "
                                      f"{embeds.shape[1]} tokens.", self.fix)
            rows.append(TextEmbeds(embeds.detach().cpu(), mask))
        self._dtype = rows[0].embeds.dtype
        out = TextEmbeds.cat(rows)
        return out if out.mask is not None else TextEmbeds(out.embeds, torch.ones(out.embeds.shape[:2], dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# Images

class ExternalCodec(Codec):
    """Images <-> latents by a front end's VAE, in our conventions (see the module docstring). No parameters of
    its own: the front end places its VAE; latents and images come back on the CPU in float32."""

    kind = "external_vae"

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                 latent_channels: int, spatial_factor: int, identity: str | Callable[[], str]):
        super().__init__()
        self._encode, self._decode = encode, decode
        self.latent_channels, self.spatial_factor = int(latent_channels), int(spatial_factor)
        self._identity_fn = _lazy_identity(identity)

    @property
    def identity(self) -> str:
        return self._identity_fn()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images, 3, "images")
        self.latent_shape(images.shape[2], images.shape[3])
        latents = self._encode(images.detach().float().cpu()).float().cpu()
        expected = (images.shape[0], *self.latent_shape(images.shape[2], images.shape[3]))
        if tuple(latents.shape) != expected:
            raise DistilleryError("vae", tuple(latents.shape), f"encoded {tuple(images.shape)} images to latents of "
                                  f"shape {tuple(latents.shape)}, not {expected}.", "use the VAE of the model.")
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check(latents, self.latent_channels, "latents")
        return self._decode(latents.detach().float().cpu()).float().cpu()


# ----------------------------------------------------------------------------------------------------------
# The DiT

def detect_state(keys, shape_of: Callable[[str], tuple], field: str = "model") -> tuple[str, dict]:
    """(family, config) of a DiT from its tensor names and shapes, in our names or the ones ComfyUI uses."""
    keys = list(keys)
    for family in families.all():
        if family.is_family(keys):
            return family.name, family.config_from_shapes(shape_of, keys)
    raise DistilleryError(field, f"{len(keys)} tensors", "not a DiT this pack knows (no "
                          f"{' nor '.join(f.title for f in families.all())} weights).",
                          f"use a {', '.join(f.title for f in families.all())} diffusion model.")


def skeleton(family: str, config: dict) -> torch.nn.Module:
    """The family's model with its parameters on the meta device (no memory), frozen and in eval mode.

    accelerate's `init_empty_weights` keeps plain tensor attributes real (Qwen-Image's RoPE tables)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = families.get(family).model_class()(**config)
    return model.eval().requires_grad_(False)


def assign_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], field: str = "model",
                   compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model` (a skeleton) holding `state`'s tensors themselves (`load_state_dict(assign=True)`): no copy, and
    the tensors are wrapped in new Parameters, so moving or casting our module never touches the caller's.

    Every name must match (a missing, extra or differently shaped tensor is refused by name), so weights the
    model cannot use as they are (quantized, scaled fp8) never load silently. fp8 weights (a front end's fp8
    model) are held as they are by `fp8.load_weights` (Linear weights stay fp8 and compute in `compute_dtype`,
    bf16 when None; the few other fp8 tensors are dequantised)."""
    _check_state(model, state, field)
    state = {k: v.detach() for k, v in state.items()}
    if any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in state.values()):
        from . import fp8

        fp8.load_weights(model, state, {}, dtype=compute_dtype, mode="keep", field=field)
    else:
        model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def _check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], field: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or extra or wrong:
        detail = "; ".join(f"{what}: {names[:3]}{' ...' if len(names) > 3 else ''}"
                           for what, names in (("missing", missing), ("unexpected", extra), ("other shape", wrong))
                           if names)
        raise DistilleryError(field, f"{len(state)} tensors", f"do not fit the {type(model).__name__} they were "
                              f"detected as ({detail}).", "use a plain (bf16/fp16/fp32/fp8) model of a family this "
                              "pack knows.")


class ExternalPipeline(TextToImagePipeline):
    """A `TextToImagePipeline` over a front end's model (see the module docstring).

    `skeleton_dit`: the family's model on the meta device (what the pipeline checks and reports); `materialise()`:
    returns the model with real weights (called when `dit` is first read, again after `forget_dit`);
    `sampler`: the front end's sampling loop (used by `sample`); `dit_identity`: names the DiT's weights (the
    dataset settings record it) without materialising them."""

    def __init__(self, skeleton_dit: torch.nn.Module, materialise: Callable[[], torch.nn.Module],
                 prompt_encoder: PromptEncoder, codec: Codec, *, dit_identity: str | Callable[[], str],
                 sampler: Sampler | None = None, template: str | None = None, defaults: dict | None = None):
        self._skeleton = skeleton_dit
        self._materialise = materialise
        self._dit = None
        self._dit_identity = _lazy_identity(dit_identity)
        super().__init__(skeleton_dit, prompt_encoder, codec, template=template, defaults=defaults)
        self.sampler = sampler

    # `TextToImagePipeline.__init__` assigns `self.dit`: that is the skeleton
    @property
    def dit(self) -> torch.nn.Module:
        if self._dit is None:
            dit = self._materialise()
            if families.of_model(dit) is not self.family_spec or families.detect(dit)[1] != families.detect(
                    self._skeleton)[1]:
                raise DistilleryError("model", type(dit).__name__, "the model's weights changed since the pipeline "
                                      "was made.", "queue the graph again.")
            self._dit = dit
        return self._dit

    @dit.setter
    def dit(self, value: torch.nn.Module) -> None:
        self._skeleton = value

    @property
    def dit_identity(self) -> str:
        return self._dit_identity()

    def materialised(self) -> bool:
        return self._dit is not None

    def forget_dit(self) -> None:
        """Drop our module (the front end's tensors stay theirs); the next `dit` builds it again from the front
        end's current tensors."""
        self._dit = None

    encoder_field = "clip"  # the front end's names for the encoder and codec inputs

    def _check_compatible(self) -> None:
        super()._check_compatible(self._skeleton)  # the skeleton: checking must not build our DiT

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device if self._dit is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        from .velocity import model_dtype

        return model_dtype(self._dit if self._dit is not None else self._skeleton)

    def to(self, device=None, dtype=None) -> "ExternalPipeline":
        if self._dit is not None:  # the front end places its own text encoder, VAE and model
            kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
            if kwargs:
                self._dit.to(**kwargs)
        return self

    def memory_needed(self, count: int, batch_size: int, height: int, width: int, guided: bool,
                      output: str = "image") -> dict[str, int]:
        """With the front end's sampler, only our results (CPU): the front end manages its own memory."""
        if self.sampler is None:
            return super().memory_needed(count, batch_size, height, width, guided, output)
        channels, h, w = self.latent_shape(height, width)
        need = count * channels * h * w * 4 + (count * 3 * height * width * 9 if output != "latent" else 0)
        return {"cpu": need}
