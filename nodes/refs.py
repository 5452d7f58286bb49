"""What travels between our nodes: descriptions of files and settings, loaded lazily and never mutated.

A `PipelineRef`, `DitRef` or `DatasetRef` says *where* the weights or images are, not what they are in memory, so
Export Training Job can write any graph's training as a `TrainJob` JSON, and a ComfyUI cache hit costs nothing.
Every node that makes a model in-graph (Build AAADiT, Shrink DiT, training) saves it first and passes its file.

A loaded pipeline is kept on its ref (ComfyUI keeps the ref as long as it caches the node's output). Refs derived
from another one (a trained LoRA, student weights) share the parent's text encoder and VAE. Nothing downstream may
change a loaded pipeline in place: training works on a deep copy of the DiT (`training_pipeline`).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dit_distillery import families
from dit_distillery.errors import DistilleryError

from .common import torch_device

BUILTIN_PIPELINES = ("default", *(f"tiny:{name}" for name in families.names()))
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_load_lock = threading.RLock()  # ComfyUI runs one prompt at a time, but a direct caller might not


def placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for 'auto' settings: ComfyUI's device; bf16 on a GPU, fp32 on the CPU."""
    dev = torch_device() if device in (None, "", "auto") else torch.device(device)
    if dtype not in DTYPES:
        raise DistilleryError("dtype", dtype, "unknown dtype.", f"use one of {list(DTYPES)}.")
    dt = DTYPES[dtype] or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    return dev, dt


@dataclass(eq=False)
class DitRef:
    """A DiT file (ours, ComfyUI's, DiffSynth's) or diffusers transformer folder, with its family and config."""

    path: str
    family: str
    config: dict
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_path(cls, path, field_name: str = "dit") -> "DitRef":
        """Read the family and config from the file's header (no weights are loaded)."""
        family, config, _ = families.detect(str(path), field_name)
        provenance = {}
        p = Path(path)
        if p.is_file():
            from dit_distillery.formats import TensorSource
            from dit_distillery.models.registry import META_PROVENANCE

            with TensorSource(p, field_name) as src:
                provenance = src.metadata_value(META_PROVENANCE) or {}
        return cls(str(path), family, dict(config), provenance if isinstance(provenance, dict) else {})

    def describe(self) -> str:
        from dit_distillery.report import build_meta

        params = sum(p.numel() for p in build_meta(self.family, self.config).parameters())  # meta: no memory
        return f"{self.family} DiT, {params:,} parameters: {Path(self.path).name}"


@dataclass(eq=False)
class PipelineRef:
    """A text-to-image pipeline: a built-in name or diffusers folder (`source`), component files replacing its
    parts, and LoRAs merged on top in order (`loras`: (file, strength) pairs). See the module docstring."""

    source: str | None = "default"
    dit: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    text_max_length: int | None = None
    loras: tuple = ()
    device: str = "auto"
    dtype: str = "auto"
    base_dtype: str = "bf16"  # "fp8": the DiT's frozen Linear weights stored in fp8, computed in `dtype`
    blocks_to_swap: object = 0  # DiT blocks kept on the CPU and streamed in as they run; "auto": fewest that fit
    parent: "PipelineRef | None" = None
    _pipe: object = field(default=None, repr=False)
    _base: "PipelineRef | None" = field(default=None, repr=False)

    # -- derived refs
    def with_lora(self, path: str, strength: float = 1.0) -> "PipelineRef":
        """This pipeline with one more LoRA merged on top; shares this one's loaded pipeline."""
        return dataclasses.replace(self, loras=self.loras + ((str(path), float(strength)),), parent=self, _pipe=None,
                                   _base=None)

    def with_dit(self, path: str) -> "PipelineRef":
        """This pipeline with its DiT replaced by a file (which already holds any LoRA trained into it);
        shares this one's text encoder and VAE."""
        return dataclasses.replace(self, dit=str(path), loras=(), parent=self, _pipe=None, _base=None)

    def saved_as(self, path: str, pipe=None) -> "PipelineRef":
        """This pipeline with its DiT replaced by `path`, a file just written (every LoRA merged into it):
        downstream nodes see one DiT file (a training job can then add one LoRA of its own). `pipe`, the pipeline
        the file was written from, is reused instead of loading the file again; give it only when it holds exactly
        the file's values (the same dtype)."""
        ref = self.with_dit(path)
        ref._pipe = pipe
        return ref

    def without_loras(self) -> "PipelineRef":
        """The same pipeline before its LoRAs (what a training job starts from: the job merges its LoRA itself).
        An ancestor that is exactly that is reused, with its loaded pipeline."""
        if not self.loras:
            return self
        if self._base is None:
            node = self.parent
            while node is not None and not (not node.loras and node.dit == self.dit and node.same_components(self)):
                node = node.parent
            self._base = node or dataclasses.replace(self, loras=(), parent=None, _pipe=None, _base=None)
        return self._base

    # -- loading
    def load(self):
        """The `TextToImagePipeline` (loaded once, then shared: do not modify it).

        Loaded outside ComfyUI's inference mode, so its tensors are normal ones: LoRA training can then use the
        frozen weights in place instead of copying them (inference tensors cannot be saved for backward).
        """
        with _load_lock:
            if self._pipe is None:
                with torch.inference_mode(False):
                    self._pipe = self._load()
            return self._pipe

    def _load(self):
        from dit_distillery.pipelines.loading import load_pipeline
        from dit_distillery.student import load_student

        parent = self.parent
        placed = False  # whether the DiT is this ref's own, stored and placed as `base_dtype`/`blocks_to_swap` say
        if parent is not None and self.same_components(parent):
            if self.loras[:len(parent.loras)] == parent.loras and self.dit == parent.dit:
                pipe, todo = parent.load(), self.loras[len(parent.loras):]
                placed = True  # (the parent's, with the same settings)
            else:  # a new DiT file: LoRAs of the parent are inside it (or dropped on purpose)
                pipe, todo = load_student(parent.load(), weights=self.dit), self.loras
        else:
            device, dtype = placement(self.device, self.dtype)
            # a DiT to store in fp8 or block-swap is loaded on the CPU: as loaded it may not fit the device
            pipe = load_pipeline(self.source, dit=self.dit, text_encoder=self.text_encoder, vae=self.vae,
                                 text_max_length=self.text_max_length, device="cpu" if self.offloaded() else device,
                                 dtype=dtype)
            if self.offloaded():
                pipe.prompt_encoder.to(device=device)
                pipe.codec.to(device=device)
            todo = self.loras
            self._place(pipe)
            placed = True
        for path, strength in todo:
            pipe = load_student(pipe, lora=path, strength=strength)  # merges into a copy of the DiT
        if todo or not placed:  # (a copy has no swap of its own: its base's is lifted while copying)
            self._place(pipe)
        return pipe

    def offloaded(self) -> bool:
        return self.base_dtype == "fp8" or self.blocks_to_swap not in (0, None)

    def _place(self, pipe) -> None:
        """The DiT stored and placed as this ref says: its frozen Linears in fp8 (`base_dtype`, computed in the
        pipeline's dtype: `fp8.store_in_fp8`), `blocks_to_swap` of its blocks swapped (`block_swap`; "auto": the
        fewest for which sampling at the pipeline's default size fits the device's free memory, 0 on the CPU), the
        rest on the device."""
        if not self.offloaded():
            return
        from dit_distillery.block_swap import auto_blocks_to_swap, enable_block_swap

        device, _ = placement(self.device, self.dtype)
        dit = pipe.dit
        dit.requires_grad_(False)  # (sampling; a training copy chooses its own trainables)
        if self.base_dtype == "fp8":
            from dit_distillery.fp8 import store_in_fp8

            store_in_fp8(dit, pipe.dtype)
        n = self.blocks_to_swap
        if n == "auto":
            n = 0 if device.type != "cuda" else auto_blocks_to_swap(dit, device, sampling_plan(pipe, self.base_dtype))
        if n:
            enable_block_swap(dit, n, device)
        else:
            dit.to(device)

    def same_components(self, other: "PipelineRef") -> bool:
        keys = ("source", "text_encoder", "vae", "text_max_length", "device", "dtype", "base_dtype", "blocks_to_swap")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def loaded(self) -> bool:
        return self._pipe is not None

    # -- description
    def job_model(self) -> tuple[dict, dict]:
        """(TrainJob `model` section, `lora` preset fields) that rebuild this pipeline, or a DistilleryError saying
        why a job file cannot express it."""
        if self.text_max_length is not None:
            raise DistilleryError("pipeline", self.describe(), "sets text_max_length, which a training job cannot "
                                  "express.", "set text_max_length to 0 on Load Pipeline (the folder's setting).")
        if len(self.loras) > 1:
            raise DistilleryError("pipeline", self.describe(), "has several LoRAs on top; a training job merges one.",
                                  "merge all but the last into a DiT file first: Load Student with export_name "
                                  "(its pipeline output continues from that file), then the last LoRA.")
        model = {"pipeline": self.source or "default", "dit": self.dit, "text_encoder": self.text_encoder,
                 "vae": self.vae, "dtype": self.dtype}
        lora = {"preset": self.loras[0][0], "preset_strength": self.loras[0][1]} if self.loras else {}
        return model, lora

    def describe(self) -> str:
        parts = [f"pipeline {self.source}"]
        for name in ("dit", "text_encoder", "vae"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name} {Path(value).name}")
        parts += [f"LoRA {Path(p).name}" + (f" x{s:g}" if s != 1 else "") for p, s in self.loras]
        if self.base_dtype != "bf16":
            parts.append(f"{self.base_dtype} base")
        if self.blocks_to_swap not in (0, None):
            parts.append(f"{self.blocks_to_swap} blocks swapped")
        return ", ".join(parts)


def memory_inputs(use: str) -> dict:
    """The optional node inputs that store a DiT's frozen weights in fp8 and swap its blocks, for `use`."""
    return {
        "base_dtype": (["bf16", "fp8"], {"default": "bf16", "tooltip":
                       f"Weights of the DiT for {use}: bf16 as loaded, or fp8 (its Linear weights in one byte each, "
                       "float8_e4m3fn with a scale, computed in the pipeline's dtype: half the memory, close "
                       "results)."}),
        "blocks_to_swap": ("INT", {"default": 0, "min": -1, "max": 1000, "tooltip":
                           f"DiT blocks kept in CPU memory and streamed to the GPU as they run, for {use}: less "
                           "GPU memory, the same results, some speed lost to the copies. -1 = auto: the fewest "
                           "that fit the GPU's free memory (0 on a CPU)."}),
    }


def check_base_dtype(value: str) -> str:
    if value not in ("bf16", "fp8"):
        raise DistilleryError("base_dtype", value, "unknown base dtype.", "use bf16 or fp8.")
    return value


def swap_setting(value) -> int | str:
    """A blocks_to_swap widget (-1 = auto) as the core takes it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise DistilleryError("blocks_to_swap", value, "must be a whole number >= -1.",
                              "use 0 (no swap), a number of blocks, or -1 (auto).")
    return "auto" if value == -1 else value


def sampling_plan(pipe, base_dtype: str = "bf16"):
    """The memory plan of sampling one image at the pipeline's default size and CFG (`memory_plan`, mode
    "sample"): what block swap's "auto" fits to the device."""
    from dit_distillery.memory_plan import memory_plan
    from dit_distillery.velocity import base_model

    dit = base_model(pipe.dit)
    config = {k: v for k, v in dict(dit.config).items() if not k.startswith("_")}
    d = pipe.defaults
    tokens = None if pipe.prompt_encoder.trims_padding else int(getattr(pipe.prompt_encoder, "max_length", 0)) or None
    return memory_plan((pipe.family, config), height=d["height"], width=d["width"], mode="sample",
                       base_dtype=base_dtype, text_tokens=tokens, cfg_scale=d.get("cfg_scale"))


def training_pipeline(pipe, share_weights: bool = False):
    """A pipeline the trainer may change: a deep copy of the DiT's modules, with the shared, never-trained text
    encoder and codec.

    `share_weights` (plain LoRA training, which only adds adapter modules and freezes the rest): the copy reuses
    the original's parameters and buffers instead of duplicating them, so a 20B DiT is not held twice. Otherwise,
    or when they are inference tensors (autograd cannot save those for backward), every tensor is cloned.
    """
    with torch.inference_mode(False):
        tensors = [*pipe.dit.parameters(), *pipe.dit.buffers()]
        share = share_weights and not any(t.is_inference() for t in tensors)
        dit = copy.deepcopy(pipe.dit, {id(t): t for t in tensors} if share else {})
    return pipe.with_dit(dit)


@dataclass(eq=False)
class DatasetRef:
    """A TrainJob `data` section (DataSpec fields) plus what the node found when it checked the data."""

    spec: dict
    rows: int | None = None
    summary: str = ""

    def data_spec(self) -> dict:
        return copy.deepcopy(self.spec)
