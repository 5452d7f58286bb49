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
        if parent is not None and self.same_components(parent):
            if self.loras[:len(parent.loras)] == parent.loras and self.dit == parent.dit:
                pipe, todo = parent.load(), self.loras[len(parent.loras):]
            else:  # a new DiT file: LoRAs of the parent are inside it (or dropped on purpose)
                pipe, todo = load_student(parent.load(), weights=self.dit), self.loras
        else:
            device, dtype = placement(self.device, self.dtype)
            pipe = load_pipeline(self.source, dit=self.dit, text_encoder=self.text_encoder, vae=self.vae,
                                 text_max_length=self.text_max_length, device=device, dtype=dtype)
            todo = self.loras
        for path, strength in todo:
            pipe = load_student(pipe, lora=path, strength=strength)  # merges into a copy of the DiT
        return pipe

    def same_components(self, other: "PipelineRef") -> bool:
        keys = ("source", "text_encoder", "vae", "text_max_length", "device", "dtype")
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
        return ", ".join(parts)


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
