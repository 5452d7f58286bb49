"""`TextToImagePipeline`: prompt encoder + DiT + codec, one interface for every family.

It strings together the core pieces (`text` -> `noise` -> `schedule` -> `sampling.euler_denoise` over
`velocity.predict_velocity` -> `codecs`) and adds what a front end needs: batches of prompts and seeds,
progress callbacks with latent previews, a stop flag, PIL output. Devices and dtypes are the caller's choice
(move the pipeline with `.to(device, dtype)`: bf16 on a GPU, fp32 on a CPU); the Euler state itself is
always float32, and the initial noise is always DiffSynth's bf16 draw (see `noise`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .. import families
from .. import noise as noise_mod
from .. import schedule
from ..codecs import Codec
from ..conditioning import TextEmbeds
from ..errors import DistilleryError
from ..sampling import euler_denoise
from ..text import PromptEncoder
from ..velocity import base_model, model_dtype, predict_velocity

OUTPUTS = ("image", "latent", "both")


def to_pil(pixels: torch.Tensor) -> list:
    """[B, 3, H, W] in [-1, 1] -> PIL images, rounded like diffusers' VaeImageProcessor (DiffSynth truncates)."""
    from PIL import Image

    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def from_pil(images, device=None, dtype=torch.float32) -> torch.Tensor:
    """PIL images (same size) -> [B, 3, H, W] in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2).to(device=device, dtype=dtype) / 127.5 - 1)


@dataclass
class SampleResult:
    """What `TextToImagePipeline.sample` made: final latents, and decoded pixels / PIL images when asked."""

    latents: torch.Tensor  # [B, C, h, w] float32 on CPU
    prompts: list[str]
    seeds: list[int]
    sigmas: list[float]
    pixels: torch.Tensor | None = None  # [B, 3, H, W] in [-1, 1] float32 on CPU
    images: list = field(default_factory=list)  # PIL
    trajectory: torch.Tensor | None = None  # [B, K, C, h, w] float32 on CPU: the latents at sigmas[record[k]]


class TextToImagePipeline:
    """Text-to-image sampling with any DiT family (see the module docstring)."""

    # The sampling loop `sample` uses instead of ours when set: a front end's own (ComfyUI's sampler over its
    # MODEL, `dit_distillery.external`), with `euler_denoise`'s contract minus the velocity function. It belongs
    # to this pipeline's DiT: `with_dit` (a student, a training copy) does not carry it over.
    sampler = None

    def __init__(self, dit: torch.nn.Module, prompt_encoder: PromptEncoder, codec: Codec, family: str | None = None,
                 template: str | None = None, defaults: dict | None = None):
        spec = families.of_model(dit)
        if family is not None and family != spec.name:
            raise DistilleryError("family", family, f"the DiT is a {spec.name} model.",
                                  f"use family '{spec.name}' or omit it.")
        self.dit, self.prompt_encoder, self.codec, self.family = dit, prompt_encoder, codec, spec.name
        self.family_spec = spec  # what the family is (dit_distillery.families); `family` is its name
        self.template = template or spec.schedule_template
        self.patch = spec.patch  # latent pixels per token side
        # When the caller does not say: the family's documented settings.
        self.defaults = dict(spec.sampling_defaults, **(defaults or {}))
        self._check_compatible()

    def with_dit(self, dit: torch.nn.Module) -> "TextToImagePipeline":
        """This pipeline with another DiT (a student, a copy to train, weights from a file): the prompt encoder
        and codec, never modified, are shared; the schedule template (when the family is the same) and the
        sampling defaults are kept. The DiT must fit the encoder and codec (checked)."""
        same = families.of_model(dit) is self.family_spec
        return TextToImagePipeline(dit, self.prompt_encoder, self.codec, template=self.template if same else None,
                                   defaults=dict(self.defaults))

    # the input names a mismatch between the DiT and its encoder/codec is reported under (subclasses rename them)
    encoder_field, codec_field = "text_encoder", "vae"

    def _check_compatible(self, model: torch.nn.Module | None = None) -> None:
        """The DiT (or `model`, a skeleton of it) must take the codec's latents and the encoder's embeddings."""
        config = families.detect(self.dit if model is None else model)[1]
        channels, text_width = self.family_spec.latent_channels(config), self.family_spec.text_width(config)
        if channels != self.codec.latent_channels:
            raise DistilleryError(self.codec_field, self.codec.identity, f"gives {self.codec.latent_channels} latent "
                                  f"channels; the DiT takes {channels}.", "use the VAE/codec the DiT was trained with.")
        if text_width != self.prompt_encoder.width:
            raise DistilleryError(self.encoder_field, self.prompt_encoder.identity, f"gives {self.prompt_encoder.width}"
                                  f"-wide embeddings; the DiT takes {text_width}.",
                                  "use the text encoder the DiT was trained with.")

    # -- placement
    @property
    def device(self) -> torch.device:
        return next(base_model(self.dit).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.dit)

    def to(self, device=None, dtype=None) -> "TextToImagePipeline":
        """Move every component to a device and/or dtype (None keeps each component's own)."""
        # Cast only what changes: diffusers warns on every `.to(dtype=...)` of a model, even a no-op one.
        for part, current in ((self.dit, self.dtype), (self.prompt_encoder, self.prompt_encoder.dtype),
                              (self.codec, self.codec.dtype)):
            kwargs = {} if dtype is None or dtype == current else {"dtype": dtype}
            if device is not None:
                kwargs["device"] = device
            if kwargs:
                part.to(**kwargs)
        return self

    # -- the pieces
    @property
    def size_multiple(self) -> int:
        return self.codec.spatial_factor * self.patch

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        m = self.size_multiple
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= m and v % m == 0 for v in (height, width)):
            raise DistilleryError("size", f"{width}x{height}", f"width and height must be positive multiples of {m} "
                                  f"for this {self.family} pipeline.",
                                  f"use e.g. {max(m, int(width) // m * m)}x{max(m, int(height) // m * m)}.")
        return self.codec.latent_shape(height, width)

    def image_seq_len(self, height: int, width: int) -> int:
        """Image tokens the DiT sees (DiffSynth's `dynamic_shift_len`, e.g. (H/16) * (W/16))."""
        _, h, w = self.latent_shape(height, width)
        return self.family_spec.image_tokens(h, w)

    def memory_needed(self, count: int, batch_size: int, height: int, width: int, guided: bool,
                      output: str = "image") -> dict[str, int]:
        """Bytes `sample` needs at least, per device: a closed-form lower bound (no tracing, so it is checked at
        every call). On the DiT's device: one forward of a batch (`report.inference_bytes`, doubled batch with
        CFG) and the fp32 Euler state; on the CPU: every result latent and image (fp32 pixels, their temporary
        copy while rounding, and the 8-bit PIL image). The VAE decoder's own activations are not counted."""
        from ..report import inference_bytes

        channels, h, w = self.latent_shape(height, width)
        chunk = min(batch_size, count)
        text_tokens = 0 if self.prompt_encoder.trims_padding else int(getattr(self.prompt_encoder, "max_length", 0))
        dit = base_model(self.dit)
        family_config = {k: v for k, v in dict(dit.config).items() if not k.startswith("_")}
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        need: dict[str, int] = {}

        def add(device, nbytes: int) -> None:
            key = str(torch.device(device))
            need[key] = need.get(key, 0) + int(nbytes)

        forward = inference_bytes(self.family, family_config, batch=chunk * (2 if guided else 1),
                                  tokens=self.image_seq_len(height, width) + text_tokens, dtype_bytes=itemsize)
        add(self.device, forward + 4 * chunk * channels * h * w * 4)
        add("cpu", count * channels * h * w * 4)
        if output != "latent":
            add("cpu", count * 3 * height * width * (4 + 4 + 1))
        return need

    def check_memory(self, count: int, batch_size: int, height: int, width: int, guided: bool,
                     output: str = "image") -> None:
        """Refuse a sample that cannot fit (`memory_needed` against `weights_check.available_memory`) before
        anything is allocated, instead of a MemoryError or allocator traceback halfway through."""
        from ..weights_check import check_fits

        smaller = f"{max(self.size_multiple, width // 2 // self.size_multiple * self.size_multiple)}x" \
                  f"{max(self.size_multiple, height // 2 // self.size_multiple * self.size_multiple)}"
        for device, nbytes in self.memory_needed(count, batch_size, height, width, guided, output).items():
            check_fits(nbytes, device, field="size", value=f"{width}x{height}",
                       what=f"sampling {count} image(s) of {width}x{height} in batches of {min(batch_size, count)}",
                       fix=f"use a smaller size (e.g. {smaller}), a smaller batch_size, or fewer prompts/seeds per "
                           "call.")

    def encode_prompts(self, prompts: list[str]) -> TextEmbeds:
        return self.prompt_encoder.encode(prompts).to(device=self.device)

    def initial_noise(self, seeds, height: int, width: int, rand_device: str = "cpu") -> torch.Tensor:
        """DiffSynth's noise for these seeds, as float32 on the pipeline's device."""
        return noise_mod.initial_noise(seeds, self.latent_shape(height, width), rand_device=rand_device,
                                       device=self.device, out_dtype=torch.float32)

    def sigmas(self, steps: int, height: int, width: int, mu: float | None = None) -> list[float]:
        """The family's schedule; mu defaults to the resolution's own (what DiffSynth uses at inference)."""
        return schedule.sigmas(self.template, steps, image_seq_len=self.image_seq_len(height, width), mu=mu)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeds) -> torch.Tensor:
        return predict_velocity(self.dit, latents, sigma, text)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels [B, 3, H, W] in [-1, 1] (float32, CPU)."""
        return self.codec.decode(latents.to(self.codec.device)).float().cpu().clamp(-1, 1)

    # -- the whole thing
    @torch.no_grad()
    def sample(self, prompts: str | list[str], *, seeds: int | list[int] = 0, steps: int | None = None,
               cfg_scale: float | None = None, negative_prompt: str = "", height: int | None = None,
               width: int | None = None, rand_device: str = "cpu", output: str = "image", callback=None, stop=None,
               batch_size: int | None = None, mu: float | None = None, sigmas: list[float] | None = None,
               record: list[int] | None = None) -> SampleResult:
        """Generate one image per (prompt, seed) pair; a single prompt or seed is paired with all of the others.

        callback(step, total, latents_preview) counts steps over all batches; stop() raises `StopRequested`.
        `sigmas` overrides the schedule (then `steps` and `mu` are ignored). `record` (step indices) keeps the
        latents at those sigmas (before each listed step) in `result.trajectory`.
        """
        d = self.defaults
        steps = d["steps"] if steps is None else steps
        cfg_scale = float(d["cfg_scale"] if cfg_scale is None else cfg_scale)
        height, width = (d["height"] if height is None else height), (d["width"] if width is None else width)
        if output not in OUTPUTS:
            raise DistilleryError("output", output, "unknown output kind.", f"use one of {list(OUTPUTS)}.")
        prompts, seeds = _pair(prompts, seeds)
        batch_size = len(prompts) if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DistilleryError("batch_size", batch_size, "must be a whole number >= 1.", "use 1 on small GPUs.")
        self.latent_shape(height, width)
        self.check_memory(len(prompts), batch_size, height, width, cfg_scale != 1.0, output)
        sigmas = list(sigmas) if sigmas is not None else self.sigmas(steps, height, width, mu)
        record = sorted(set(record or []))
        if record and not 0 <= record[0] <= record[-1] < len(sigmas):
            raise DistilleryError("record", record, f"step indices must lie in 0 .. {len(sigmas) - 1}.",
                                  "record fewer steps than the sampler takes.")
        negative = self.encode_prompts([negative_prompt]) if cfg_scale != 1.0 else None
        velocity = functools.partial(predict_velocity, self.dit) if self.sampler is None else None
        total = len(sigmas) * -(-len(prompts) // batch_size)
        latents, pixels, trajectory = [], [], []
        for start in range(0, len(prompts), batch_size):
            chunk_prompts, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
            unique = list(dict.fromkeys(chunk_prompts))
            text = self.encode_prompts(unique).select([unique.index(p) for p in chunk_prompts])
            x = self.initial_noise(chunk_seeds, height, width, rand_device)
            done = start // batch_size * len(sigmas)
            step_cb = None if callback is None else (lambda i, n, preview, _done=done: callback(_done + i, total, preview))
            kept: list[torch.Tensor] = []
            keep = None if not record else (lambda i, xi, _kept=kept: _kept.append(xi.float().cpu()) if i in record
                                            else None)
            if self.sampler is not None:
                x = self.sampler(x, sigmas, text, cfg_scale=cfg_scale, negative_text=negative, callback=step_cb,
                                 stop=stop, states=keep)
            else:
                x = euler_denoise(velocity, x, sigmas, text, cfg_scale=cfg_scale, negative_text=negative,
                                  callback=step_cb, stop=stop, states=keep)
            latents.append(x.float().cpu())
            if record:
                trajectory.append(torch.stack(kept, dim=1))
            if output != "latent":
                pixels.append(self.decode(x))
        result = SampleResult(torch.cat(latents), prompts, seeds, sigmas)
        if record:
            result.trajectory = torch.cat(trajectory)
        if output != "latent":
            result.pixels = torch.cat(pixels)
            result.images = to_pil(result.pixels)
        return result


def _pair(prompts, seeds) -> tuple[list[str], list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = noise_mod.check_seeds(seeds)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DistilleryError("prompt", prompts, "expected a prompt or a non-empty list of prompts.", "give some text.")
    if len(prompts) == 1:
        prompts = prompts * len(seeds)
    elif len(seeds) == 1:
        seeds = seeds * len(prompts)
    elif len(prompts) != len(seeds):
        raise DistilleryError("seed", seeds, f"{len(seeds)} seeds for {len(prompts)} prompts.",
                              "give one seed per prompt, a single seed, or a single prompt.")
    return prompts, seeds
