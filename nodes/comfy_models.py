"""Pipeline from ComfyUI Models: ComfyUI's own MODEL, CLIP and VAE as a `DD_PIPELINE`.

The core's interfaces for a front end's parts (`dit_distillery.external`) implemented with ComfyUI objects:

* prompts: `clip.tokenize` + `clip.encode_from_tokens_scheduled`, exactly what CLIPTextEncode does (Qwen-Image's
  chat template and its dropped prefix are the CLIP's own), one prompt at a time, used as is;
* images: the VAE's `encode` / `decode` (what VAEEncode / VAEDecode call; `[B, H, W, C]` in [0, 1]), one image
  per call (a video VAE such as Qwen-Image's takes a batch as the frames of one video), and the MODEL's
  `latent_format`: our latents are `latent_format.process_in(LATENT)` with the time axis of 1 dropped, i.e. what
  the DiT itself sees. For Qwen-Image (ComfyUI's Wan21 format) that is `(z - mean) / std` with the same 16 means
  and deviations diffusers' AutoencoderKLQwenImage config holds, so these latents are our Qwen-Image codec's;
* the teacher's sampling: `comfy.sample.sample_custom` with the MODEL (ComfyUI's model management: low-VRAM
  offloading, fp8 or GGUF weights, its LoRA patches), ComfyUI's `euler` sampler over our schedule's sigmas and
  our DiffSynth noise (`dit_distillery.noise`) as its initial noise; ComfyUI's CFG on the denoised estimate is
  DiffSynth's `v_neg + cfg * (v_pos - v_neg)`. Rows whose prompts differ are sampled one prompt at a time (ComfyUI
  does not mask padded prompts of Qwen-Image). Cancel stops it through our progress bar;
* our DiT (training, Load Student, validation): the family's diffusers model built on the meta device holding the
  MODEL's own tensors (`external.assign_weights`: no copy; inference tensors are re-wrapped with DLPack, still
  no copy), frozen, so a LoRA wraps our module and never changes the MODEL. LoRA patches on the MODEL
  (LoraLoaderModelOnly) are included: a patched weight is what ComfyUI's ModelPatcher computes for it
  (`comfy.lora.calculate_weight` in float32, then ComfyUI's stochastic rounding), a new tensor for each patched
  weight only. fp8 weights (UNETLoader's weight_dtype fp8) stay fp8, shared too, and compute in the model's
  compute dtype as ComfyUI's cast does (`dit_distillery.fp8`); GGUF-quantized weights are refused for our DiT
  (sampling with them works). ComfyUI first unloads its models, so the tensors read are the MODEL's
  own, unpatched, on its offload device. The MODEL's other patches (object patches, sampler/attention options)
  take part in ComfyUI's sampling of the teacher only.

Nothing here imports ComfyUI at import time: its modules are taken from `sys.modules` (`common.comfy_module`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch

from dit_distillery.errors import DistilleryError, StopRequested

from .common import MODELS_CATEGORY, PIPELINE, comfy_module
from .refs import PipelineRef

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
NOT_EXPORTABLE = ("is made of ComfyUI's MODEL, CLIP and VAE in this ComfyUI: a training job file for another "
                  "machine cannot name them.")


def _need(name: str):
    module = comfy_module(name)
    if module is None:
        raise DistilleryError("model", "MODEL", "only ComfyUI can give its models to this node.",
                              "run it inside ComfyUI.")
    return module


def _once(method):
    """A method computed once per object (kept on the object: a class-level cache would keep ComfyUI's models
    alive)."""
    @functools.wraps(method)
    def wrapper(self):
        cache = self.__dict__.setdefault("_once", {})
        if method.__name__ not in cache:
            cache[method.__name__] = method(self)
        return cache[method.__name__]
    return wrapper


def _hash(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _fingerprint(module: torch.nn.Module) -> str:
    from dit_distillery.codecs import module_fingerprint

    try:
        return module_fingerprint(module)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # quantized tensor subclasses: names/shapes
        return _hash(*(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(module.state_dict().items())))


def _patches_fingerprint(patches: dict) -> str:
    """Keys, strengths and (sampled) tensors of a ModelPatcher's weight patches (LoRAs)."""
    h = hashlib.sha1()

    def walk(value):
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1)
            flat = flat[:: max(1, flat.numel() // 1024)].float().cpu()
            h.update(f"{tuple(value.shape)}{value.dtype}".encode() + flat.numpy().tobytes())
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            h.update(repr(value).encode())
        elif hasattr(value, "weights"):  # comfy.weight_adapter adapters
            h.update(type(value).__name__.encode())
            walk(value.weights)
        else:
            h.update(type(value).__name__.encode())

    for key in sorted(patches):
        h.update(key.encode())
        walk(patches[key])
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# ComfyUI's objects behind the core's interfaces

class ComfyParts:
    """The MODEL, CLIP and VAE a node was given, and the core pipeline over them (`pipeline()`)."""

    def __init__(self, model, clip, vae):
        from dit_distillery import families
        from dit_distillery.external import detect_state

        for name, value, kind in (("model", model, "MODEL"), ("clip", clip, "CLIP"), ("vae", vae, "VAE")):
            if value is None:
                raise DistilleryError(name, None, f"no {kind} is connected (a checkpoint without one gives None).",
                                      f"connect a {kind} loader.")
        self.model, self.clip, self.vae = model, clip, vae
        diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
        if diffusion is None or not hasattr(model, "get_model_object"):
            raise DistilleryError("model", type(model).__name__, "is not a ComfyUI MODEL.", "connect a MODEL output "
                                  "(UNETLoader, a checkpoint loader, LoraLoaderModelOnly...).")
        # a GGUF tensor's `shape` may be its packed storage's; `tensor_shape` is the weight's
        shapes = {k: tuple(getattr(v, "tensor_shape", None) or v.shape) for k, v in diffusion.state_dict().items()}
        self.family, self.config = detect_state(shapes, shapes.__getitem__, "model")
        self.spec = families.get(self.family)
        self.latent_format = model.get_model_object("latent_format")
        channels = self.spec.latent_channels(self.config)
        if int(self.latent_format.latent_channels) != channels or int(vae.latent_channels) != channels:
            raise DistilleryError("vae", f"{vae.latent_channels} latent channels", f"the {self.spec.title} MODEL "
                                  f"takes {channels}.", f"connect the VAE of {self.spec.title} (VAELoader).")
        self.spatial = int(vae.spacial_compression_encode())
        self.note = self._patch_note()

    # -- description
    def _patch_note(self) -> str:
        patches = [k for k in self.model.patches if k.startswith("diffusion_model.")]
        notes = []
        if patches:
            notes.append(f"{len(patches)} weights patched (LoRA on the MODEL): trained and sampled with them")
        others = sorted(self.model.object_patches) + sorted(
            k for k, v in self.model.model_options.items() if k != "transformer_options" and v)
        if others or self.model.model_options.get("transformer_options"):
            notes.append("the MODEL's other patches (" + ", ".join(others or ["transformer options"]) + ") apply to "
                         "the teacher's ComfyUI sampling only, not to training")
        return "; ".join(notes)

    def describe(self) -> str:
        d = self.spec.dims(self.config)
        return f"ComfyUI MODEL ({self.spec.title}, {d.blocks} blocks, width {d.width}) + CLIP + VAE"

    # -- identities (what a dataset and the cache key on); computed when first asked
    def _unload(self) -> None:
        """ComfyUI's loaded copies unpatched and back on their offload device: the tensors read are the MODEL's."""
        mm = _need("comfy.model_management")
        mm.unload_all_models()

    @_once
    def dit_identity(self) -> str:
        self._unload()
        return "comfy:" + _hash(self.family, _fingerprint(self.model.model.diffusion_model),
                                _patches_fingerprint({k: v for k, v in self.model.patches.items()}))

    @_once
    def clip_identity(self) -> str:
        return "comfy_clip:" + _hash(type(self.clip.tokenizer).__name__, _fingerprint(self.clip.cond_stage_model),
                                     _patches_fingerprint(self.clip.patcher.patches), self.clip.layer_idx)

    @_once
    def vae_identity(self) -> str:
        fmt = self.latent_format
        stats = [getattr(fmt, n, None) for n in ("latents_mean", "latents_std", "scale_factor", "shift_factor")]
        return "comfy_vae:" + _hash(_fingerprint(self.vae.first_stage_model), type(fmt).__name__,
                                    *(s.tolist() if isinstance(s, torch.Tensor) else s for s in stats))

    # -- the text encoder: exactly CLIPTextEncode
    def encode_prompt(self, prompt: str):
        with torch.no_grad():
            tokens = self.clip.tokenize(prompt)
            conditioning = self.clip.encode_from_tokens_scheduled(tokens)
        if len(conditioning) != 1:
            raise DistilleryError("clip", f"{len(conditioning)} scheduled conditionings", "the CLIP has scheduled "
                                  "hooks, which give one encoding per step range.", "connect a CLIP without hooks.")
        cond, extra = conditioning[0]
        mask = extra.get("attention_mask")
        if cond.is_inference():  # encoded inside ComfyUI's inference mode: a normal tensor for training
            with torch.inference_mode(False):
                cond, mask = cond.clone(), None if mask is None else mask.clone()
        return cond, mask

    # -- the VAE: exactly VAEEncode / VAEDecode, with the MODEL's latent normalisation
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        fmt, out = self.latent_format, []
        with torch.no_grad():
            for image in images:  # [3, H, W] in [-1, 1] -> ComfyUI IMAGE [1, H, W, 3] in [0, 1]
                pixels = ((image.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0)[None]
                out.append(fmt.process_in(self.vae.encode(pixels)).float())
        latents = torch.cat(out)
        return latents[:, :, 0] if latents.ndim == 5 and latents.shape[2] == 1 else latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        fmt = self.latent_format
        z = latents.unsqueeze(2) if int(getattr(fmt, "latent_dimensions", 2)) == 3 else latents
        with torch.no_grad():
            images = self.vae.decode(fmt.process_out(z))
        if images.ndim == 5:  # as VAEDecode: frames -> images
            images = images.reshape(-1, *images.shape[-3:])
        return images[..., :3].permute(0, 3, 1, 2).float() * 2 - 1

    # -- the teacher's sampling: ComfyUI's sampler over the MODEL, from our noise
    def sample(self, noise, sigmas, text, *, cfg_scale, negative_text, callback, stop, states=None):
        comfy_sample, samplers = _need("comfy.sample"), _need("comfy.samplers")
        fmt = self.latent_format
        video = int(getattr(fmt, "latent_dimensions", 2)) == 3
        sigma_list = [float(s) for s in sigmas]
        schedule = torch.tensor(sigma_list + [0.0], dtype=torch.float32)
        rows = [_cond_row(text, i) for i in range(len(text))]
        groups: list[list[int]] = []
        for i, row in enumerate(rows):
            for g in groups:
                if _same_cond(rows[g[0]], row):
                    g.append(i)
                    break
            else:
                groups.append([i])
        negative = [_cond_row(negative_text, 0)] if cfg_scale != 1.0 else None
        n_steps, out = len(sigma_list), torch.empty_like(noise)
        kept: dict[int, torch.Tensor] = {}
        for g, index in enumerate(groups):
            if stop is not None and stop():
                raise StopRequested(f"stopped before step 1 of {n_steps}")
            x = noise[index].float().cpu()
            x = x.unsqueeze(2) if video else x
            # ComfyUI starts from sigma0 * noise + (1 - sigma0) * latent (an all-zero latent is not shifted): at
            # sigma0 = 1 zeros give our noise exactly; below 1 a latent equal to the noise does (up to rounding)
            latent = torch.zeros_like(x) if sigma_list[0] == 1.0 else fmt.process_out(x)

            def step(i, x0, xi, total, _g=g, _index=index):
                if states is not None:
                    kept.setdefault(i, torch.empty((len(noise), *noise.shape[1:])))[_index] = _flat(xi, video)
                if callback is not None:
                    callback((_g * n_steps + i + 1) // len(groups), n_steps, _flat(x0, video))
                if stop is not None and stop():
                    raise StopRequested(f"stopped after step {i + 1} of {n_steps}")

            raw = comfy_sample.sample_custom(self.model, x, cfg_scale, samplers.sampler_object("euler"), schedule,
                                             [rows[index[0]]], negative or [rows[index[0]]], latent, callback=step,
                                             disable_pbar=True, seed=0)
            out[index] = _flat(fmt.process_in(raw.float()), video).to(out)
        if states is not None:
            for i in sorted(kept):
                states(i, kept[i].to(noise))
        return out

    # -- our DiT over the MODEL's tensors
    def materialise(self) -> torch.nn.Module:
        from dit_distillery.external import assign_weights, skeleton

        mp, lora, mfloat = _need("comfy.model_patcher"), _need("comfy.lora"), _need("comfy.float")
        with torch.inference_mode(False), torch.no_grad():
            self._unload()
            model = self.model.model
            compute = getattr(model, "manual_cast_dtype", None) or self.model.model_dtype()
            compute = compute if compute not in FP8 and compute is not None else torch.bfloat16
            state = {}
            for key, tensor in model.diffusion_model.state_dict(keep_vars=True).items():
                full = "diffusion_model." + key
                if full in self.model.patches:  # == ModelPatcher.patch_weight_to_device, into a new tensor
                    weight, set_func, convert_func = mp.get_key_weight(model, full)
                    if set_func is not None or convert_func is not None:
                        raise DistilleryError("model", key, "its LoRA patch goes through a quantized layer's own "
                                              "weight function, which our DiT cannot reproduce.",
                                              "load the model unquantized (UNETLoader) to train on it.")
                    patched = lora.calculate_weight(self.model.patches[full], weight.to(torch.float32, copy=True),
                                                    full)
                    tensor = mfloat.stochastic_rounding(patched, weight.dtype, seed=mp.string_to_seed(full))
                state[key] = _plain(key, tensor)
            state = self.spec.from_comfy(state)
            return assign_weights(skeleton(self.family, self.config), state, field="model", compute_dtype=compute)

    def pipeline(self):
        from dit_distillery.external import ExternalCodec, ExternalPipeline, ExternalPromptEncoder, skeleton

        encoder = ExternalPromptEncoder(self.encode_prompt, self.spec.text_width(self.config), self.clip_identity,
                                        trims_padding=True, what="clip",
                                        fix=f"connect the text encoder of {self.spec.title} (CLIPLoader with its "
                                            "type).")
        codec = ExternalCodec(self.encode_images, self.decode_latents, self.spec.latent_channels(self.config),
                              self.spatial, self.vae_identity)
        return ExternalPipeline(skeleton(self.family, self.config), self.materialise, encoder, codec,
                                dit_identity=self.dit_identity, sampler=self.sample)


def _plain(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor our module can hold without copying it where possible (see the module docstring)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise DistilleryError("model", key, f"holds {type(tensor).__name__} weights (quantized, e.g. GGUF), which "
                              "our DiT cannot compute with. Sampling with this MODEL (Generate Distill Dataset, "
                              "Sample) works.", "load the same model with UNETLoader (bf16 or fp8) to train on it, "
                              "or use Load Pipeline with its file.")
    tensor = tensor.detach()
    if tensor.is_inference():  # ComfyUI loads models inside inference mode: the same memory, a normal tensor
        tensor = torch.from_dlpack(tensor)
    return tensor


def _cond_row(text, i: int):
    """Row i of our TextEmbeds as one ComfyUI conditioning entry: the real tokens (trailing padding dropped)."""
    embeds, mask = text.embeds[i:i + 1], None if text.mask is None else text.mask[i:i + 1].bool()
    if mask is not None:
        used = mask[0].nonzero()
        n = int(used.max()) + 1 if used.numel() else 1
        embeds, mask = embeds[:, :n], mask[:, :n]
    extra = {} if mask is None or bool(mask.all()) else {"attention_mask": mask}
    return [embeds, extra]


def _same_cond(a, b) -> bool:
    return a[0].shape == b[0].shape and torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys()


def _flat(x: torch.Tensor, video: bool) -> torch.Tensor:
    return (x[:, :, 0] if video else x).float().cpu()


# ----------------------------------------------------------------------------------------------------------
# What travels: a PipelineRef over ComfyUI's objects

@dataclass(eq=False)
class ComfyPipelineRef(PipelineRef):
    """A `PipelineRef` whose base is ComfyUI's MODEL, CLIP and VAE (`comfy`). Derived refs (a trained LoRA,
    student weights: `with_lora`, `with_dit`) load as for any pipeline, on top of this one."""

    comfy: ComfyParts | None = field(default=None, repr=False)
    not_exportable: str = NOT_EXPORTABLE

    def load(self):
        pipe = super().load()
        if self.parent is None:  # our DiT is rebuilt from the MODEL's current tensors when next needed
            pipe.forget_dit()
        return pipe

    def _load(self):
        if self.parent is None:
            return self.comfy.pipeline()
        return super()._load()

    def same_components(self, other) -> bool:
        return super().same_components(other) and getattr(other, "comfy", None) is self.comfy

    def job_model(self) -> tuple[dict, dict]:
        """The TrainJob `model` section names the MODEL by its identity (resuming a run checks it); the trainer
        is handed the loaded pipeline itself."""
        if len(self.loras) > 1:
            return PipelineRef.job_model(self)  # the same refusal as for any pipeline
        model = {"pipeline": f"comfyui:{self.comfy.family}:{self.comfy.dit_identity()}", "dit": self.dit,
                 "text_encoder": None, "vae": None, "dtype": self.dtype}
        lora = {"preset": self.loras[0][0], "preset_strength": self.loras[0][1]} if self.loras else {}
        return model, lora

    def describe(self) -> str:
        parts = [self.comfy.describe()]
        if self.dit:
            parts.append(f"dit {self.dit.rsplit('/', 1)[-1]}")
        parts += [f"LoRA {p.rsplit('/', 1)[-1]}" + (f" x{s:g}" if s != 1 else "") for p, s in self.loras]
        return ", ".join(parts)


class PipelineFromComfyModels:
    DESCRIPTION = ("Makes a pipeline from ComfyUI's own MODEL, CLIP and VAE (UNETLoader, CLIPLoader, VAELoader, "
                   "checkpoint or GGUF loaders, LoRA loaders): prompts are encoded by the CLIP as CLIPTextEncode "
                   "does, images by the VAE, a teacher dataset is sampled by ComfyUI's own sampler and memory "
                   "management from DiT Distillery's noise, and training uses the MODEL's weights without copying "
                   "them (the MODEL itself is never changed). Qwen-Image.")
    CATEGORY = MODELS_CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (PIPELINE, "STRING")
    RETURN_NAMES = ("pipeline", "summary")
    OUTPUT_TOOLTIPS = ("The pipeline (Generate Distill Dataset's teacher, Train, Sample, Load Student).",
                       "What it is made of.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (e.g. UNETLoader with qwen_image_bf16; fp8 and GGUF "
                                "load too, and LoRAs applied to it are part of the teacher)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (CLIPLoader, type qwen_image)."}),
            "vae": ("VAE", {"tooltip": "Its VAE (VAELoader, qwen_image_vae)."}),
        }}

    def build(self, model, clip, vae):
        parts = ComfyParts(model, clip, vae)
        ref = ComfyPipelineRef(source=None, comfy=parts)
        summary = ref.describe() + (f"\n{parts.note}" if parts.note else "")
        return (ref, summary)


NODE_CLASS_MAPPINGS = {"DD_PipelineFromComfyModels": PipelineFromComfyModels}
NODE_DISPLAY_NAME_MAPPINGS = {"DD_PipelineFromComfyModels": "Pipeline from ComfyUI Models"}
