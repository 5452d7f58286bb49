"""The protocol every DiT family meets: everything the rest of the package may know about one kind of DiT.

Shared code (sampling, losses, the trainer, shrinking, the report, loading and saving, the nodes) asks the family
object and never tests which family it holds, so adding a family is one module in this package plus its tests
(tests/test_families.py checks that no family name is compared outside `families/`). A family module subclasses
`Family`, fills in the class attributes and methods below, and ends with `FAMILY = TheFamily()`; the registry
(`families/__init__.py`) finds it by itself.

Family modules import torch, diffusers, transformers and einops only inside methods: the registry is imported by
the command line's `--help` (which lists the families' presets) and must stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from ..errors import DistilleryError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..codecs import Codec
    from ..conditioning import TextEmbeds
    from ..pipelines import TextToImagePipeline
    from ..text import PromptEncoder


class Dims(NamedTuple):
    """The sizes a memory estimate and a user need: residual width, transformer blocks (all groups), FFN width."""

    width: int
    blocks: int
    ffn: int


def first_image_tokens(args: tuple, kwargs: dict, output, image_tokens: int):
    """`BlockGroup.image_io` of a block whose hidden states (first argument) and output are one sequence that
    starts with the image tokens (AAADiT; FLUX.2's single-stream blocks with the order reversed need their own)."""
    x_in = args[0] if args else next(iter(kwargs.values()))
    x_out = output[0] if isinstance(output, tuple) else output
    return x_in[:, :image_tokens], x_out[:, :image_tokens]


@dataclass(frozen=True)
class BlockGroup:
    """One stack of transformer blocks (an `nn.ModuleList` on the model).

    Depth shrinking drops and renumbers blocks of a group; families with several stacks (FLUX.2's double- and
    single-stream blocks, Z-Image's refiners beside its main layers) list each, and mark with `keep` the ones that
    must never change (Z-Image's refiners: ComfyUI builds exactly two of each whatever the file holds).
    `image_io(args, kwargs, output, image_tokens) -> (image states in, image states out)` tells block influence
    (ShortGPT's 1 - cos) where the image tokens are in a block's input and output.
    """

    attr: str
    count_key: str
    keep: bool = False
    image_io: Callable[..., tuple] = first_image_tokens

    @property
    def prefix(self) -> str:
        return self.attr + "."


def four_times(width: int) -> int:
    """diffusers' FeedForward default (mult=4): Qwen-Image's FFN units per unit of width."""
    return 4 * width


@dataclass(frozen=True)
class WidthLayout:
    """What Shrink DiT's streamed writer slices: which rows and columns of every tensor, as index spaces (see
    `shrink.plan`), of a family whose files it shrinks (a family without a layout is shrunk in memory only,
    `shrink.blocks`).

    `group`: the block group it changes; `global_spaces` / `block_spaces` map a module name (outside / inside those
    blocks) to its (row space, column space); `last_block_untrained`: modules of the source's last block whose
    weights never got a gradient (they do not vote when scoring); `head_count_key` / `head_dim_key`: the config
    keys of the heads per block and their size (`head_dim_key` None: the head size is `width_key` / heads, as for
    Z-Image's `dim` and `n_heads`); `width_key`: the config key of the residual width when the config stores it
    (it is then set to heads x head dim); `also_heads_keys`: other config keys that follow the head count
    (`n_kv_heads`); `ffn_spaces`: the per-block FFN unit index spaces its tables use, each `ffn_units(width)` units
    wide (Qwen-Image: an image and a text FFN, 4x the width); `unsupported`: config flags of variants it cannot
    slice; `calibrate(source, calibration, device, progress, stop) -> shrink.importance.CalibrationStats`: the
    source run block by block on calibration inputs (importance scoring), None when the family has no such runner;
    `slices_width`: False for a family streamed by depth only (its `why_not_width` says why); `sliced_groups`: other
    block groups the width also narrows (never dropped), group name -> its blocks' spaces, each block with its own
    head and FFN choice (Z-Image's refiners); `min_width`: the narrowest student it can slice; `ffn_ratio_key`: the
    config key of a FFN width stored as a ratio of the residual width (FLUX.2's `mlp_ratio`): the units are then
    `int(width x ratio)`, the model's own rounding, and `ffn_units` is not used; `per_stack`: the family's
    droppable block stacks each keep their own count (FLUX.2's double- and single-stream blocks), so
    `shrink.depth.DepthSource` streams it one block at a time under the model's own names (a ComfyUI-named file
    is converted per block): `group`'s blocks use `block_spaces`, the other stacks' theirs in `sliced_groups` (then
    dropped too), and `calibrate` returns a `shrink.importance.StackCalibrationStats`.
    """

    group: str
    global_spaces: dict[str, tuple]
    block_spaces: dict[str, tuple]
    last_block_untrained: tuple[str, ...] = ()
    head_count_key: str = "num_attention_heads"
    head_dim_key: str | None = "attention_head_dim"
    width_key: str | None = None
    also_heads_keys: tuple[str, ...] = ()
    ffn_spaces: tuple[str, ...] = ("img_ffn", "txt_ffn")
    ffn_units: Callable[[int], int] = four_times
    unsupported: tuple[str, ...] = ()
    calibrate: Callable[..., Any] | None = None
    slices_width: bool = True
    why_not_width: str = ""
    sliced_groups: dict[str, dict[str, tuple]] = field(default_factory=dict)
    min_width: int = 0
    ffn_ratio_key: str | None = None
    per_stack: bool = False

    def units(self, config: dict, width: int) -> int:
        """FFN units per unit space of a block `width` wide of the model `config` describes."""
        if self.ffn_ratio_key is not None:
            return int(width * config[self.ffn_ratio_key])
        return self.ffn_units(width)

    def stack_spaces(self, attr: str) -> dict[str, tuple]:
        """The index spaces of the blocks of one block stack (`group`'s, or one of `sliced_groups`)."""
        return self.block_spaces if attr == self.group else self.sliced_groups[attr]

    def heads(self, config: dict) -> int:
        return int(config[self.head_count_key])

    def head_dim(self, config: dict) -> int:
        if self.head_dim_key is not None:
            return int(config[self.head_dim_key])
        return int(config[self.width_key]) // self.heads(config)

    def width(self, config: dict) -> int:
        return self.heads(config) * self.head_dim(config)

    def with_heads(self, config: dict, heads: int) -> dict:
        """The config of the same model with `heads` heads per block (head size kept)."""
        out = dict(config, **{self.head_count_key: heads}, **{k: heads for k in self.also_heads_keys})
        if self.width_key is not None:
            out[self.width_key] = heads * self.head_dim(config)
        return out


class Family:
    """Base class of the family objects (one instance per family module, `FAMILY`). See the module docstring.

    Class attributes are plain facts (never mutated); methods are what needs code. Defaults are those of a family
    ComfyUI does not know and whose keys need no conversion.
    """

    # -- identity
    name: str = ""  # the registry key, stored in our files' metadata and in jobs: never rename it
    title: str = ""  # what users call it (messages, docs)

    # -- the model: its class, named configs, how a checkpoint is recognised and read back
    signature_keys: tuple[str, ...] = ()  # tensors only this family has (detection from a bare file)
    heads_key: str = ""  # config key of the attention heads (the report's --heads)
    head_prefixes: tuple[str, ...] = ()  # parameter-name prefixes of the output head (the report's parts)

    # -- calling the DiT
    patch: int = 1  # latent pixels per token side (Qwen-Image packs 2x2 latent pixels into one token)
    vae_factor: int = 8  # image pixels per latent pixel of the family's own VAE (the report's image -> latent)

    # -- schedule and sampling
    schedule_template: str = ""  # the sigma schedule it was trained with (`schedule.TEMPLATES` or its own)
    schedule_templates: dict[str, dict] = {}  # templates this family adds to `schedule`'s table
    sampling_defaults: dict[str, Any] = {}  # steps, cfg_scale, height, width

    # -- text encoder, VAE, diffusers folders
    text_encoder_class: str = ""  # transformers class of its text encoder
    default_text_max_length: int = 0  # prompt tokens when a pipeline folder does not say
    report_text_tokens: int = 0  # prompt tokens the size report assumes
    vae_class: str = ""  # diffusers class of its VAE
    pipeline_class: str = ""  # model_index.json `_class_name` of its diffusers pipeline folders
    transformer_library: str = "diffusers"  # model_index.json library of its DiT class
    # the tokenizer shipped with the pack (dit_distillery/tokenizers, `text.bundled_tokenizer`) used when a pipeline is
    # given as single files without a tokenizer folder ("": a tokenizer folder is needed)
    bundled_tokenizer: str = ""
    # the transformers class a single text-encoder file loads into when it is not `text_encoder_class` (Qwen-Image:
    # the Qwen2.5-VL text model without its vision tower); pipeline folders saved from it name it
    text_only_encoder_class: str = ""

    # -- LoRA
    lora_presets: dict[str, list[str]] = {}  # preset name -> module-name suffixes
    default_lora_preset: str = ""

    # -- shrinking: what the streamed writer slices (None: the family is shrunk in memory only, by depth)
    width_layout: WidthLayout | None = None

    # -- training
    saved_per_token_width: int = 0  # bytes autograd keeps per block, token and unit of width (bf16; see report)
    ddp_find_unused_parameters: bool = False  # a trained parameter never reaches the loss (DDP must be told)

    REQUIRED = ("name", "title", "signature_keys", "heads_key", "schedule_template", "sampling_defaults",
                "text_encoder_class", "default_text_max_length", "report_text_tokens", "vae_class", "pipeline_class",
                "lora_presets", "default_lora_preset", "saved_per_token_width")

    # ------------------------------------------------------------------------------------------------------
    # The model

    def model_class(self) -> type:
        """The model class (diffusers `ModelMixin` + `ConfigMixin`), imported on first use."""
        raise NotImplementedError

    def presets(self) -> dict[str, dict]:
        """Named configs the report, the CLI and the nodes accept instead of a file (fresh dicts)."""
        return {}

    def tiny_config(self, **overrides) -> dict:
        """A small config of the same structure, for tests and demos."""
        raise NotImplementedError

    def is_family(self, keys) -> bool:
        """Whether a bare checkpoint (its tensor names) is of this family."""
        keys = set(keys)
        return bool(self.signature_keys) and all(k in keys for k in self.signature_keys)

    def config_from_shapes(self, shape_of: Callable[[str], tuple], keys) -> dict:
        """The model config of a bare checkpoint, from its tensor names and shapes (`shape_of(key)`)."""
        raise NotImplementedError

    def dims(self, config: dict) -> Dims:
        raise NotImplementedError

    def describe(self, config: dict) -> str:
        """The sizes a user recognises, for messages."""
        d = self.dims(config)
        return f"width {d.width}, {d.blocks} blocks"

    # ------------------------------------------------------------------------------------------------------
    # Calling the DiT

    def image_tokens(self, h: int, w: int) -> int:
        """Image tokens the DiT sees for unpacked latents of h x w (the schedule's resolution input)."""
        return (h // self.patch) * (w // self.patch)

    def latent_channels(self, config: dict) -> int:
        """Channels of the unpacked latents the DiT takes (must equal the codec's)."""
        raise NotImplementedError

    def text_width(self, config: dict) -> int:
        """Width of the prompt embeddings the DiT takes (must equal the prompt encoder's)."""
        raise NotImplementedError

    def velocity(self, dit, latents: "torch.Tensor", sigma: "torch.Tensor", text: "TextEmbeds") -> "torch.Tensor":
        """The velocity (noise - x0) at unpacked latents [B, C, h, w] and sigma [B] (checked by the caller).

        `dit` may be wrapped (peft, DDP, torch.compile): call the wrapper, so its hooks run. The latents keep their
        dtype; the DiT runs in its own (`velocity.model_dtype`)."""
        raise NotImplementedError

    def example_inputs(self, config: dict, *, batch: int, h: int, w: int, text_tokens: int, device,
                       dtype) -> dict:
        """Forward keyword arguments of the right shapes for unpacked latents of h x w (the report measures
        activations with them on the meta device)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------
    # Blocks

    def block_groups(self) -> tuple[BlockGroup, ...]:
        """The model's block stacks, the main (first droppable) one first."""
        raise NotImplementedError

    def main_group(self) -> BlockGroup:
        """The stack a depth shrink changes when none is named."""
        return next(g for g in self.block_groups() if not g.keep)

    def group(self, attr: str | None) -> BlockGroup:
        if attr is None:
            return self.main_group()
        for g in self.block_groups():
            if g.attr == attr:
                return g
        raise DistilleryError("group", attr, f"{self.title} has no block group of this name.",
                              f"use one of {[g.attr for g in self.block_groups()]}.")

    # ------------------------------------------------------------------------------------------------------
    # Pipeline components

    def prompt_encoder(self, text_encoder, tokenizer, settings: dict) -> "PromptEncoder":
        """Its prompt encoding (template, layers, length) around a loaded text encoder and tokenizer; `settings`
        are what a saved pipeline recorded (`max_length`, `hidden_layers`)."""
        raise NotImplementedError

    def text_encoder_config(self) -> dict | None:
        """The released text encoder's transformers config.json content, when the family has one encoder (None:
        several, or none known)."""
        return None

    def text_encoder_key(self, key: str) -> str | None:
        """A single text-encoder file's tensor name (ComfyUI's `models/text_encoders` names, the original
        checkpoint's or transformers') -> its name in the class `text_encoder_from_shapes` builds; None for the
        file's tensors that class leaves out (a vision tower, an LM head: prompts need hidden states only)."""
        return key

    def text_encoder_from_shapes(self, shape_of: Callable[[str], tuple], keys) -> tuple[str, Any] | None:
        """(transformers class name, its config object) for a single text-encoder file given without a config
        folder, from its tensors (`text_encoder_key` names) and their shapes: the released encoder's config when the
        file's width is a released one (the loader then checks every shape against it), else one read from the
        shapes. Raises a DistilleryError when the file is not this family's encoder; None: the family cannot build
        its encoder from a file alone (give the config folder)."""
        return None

    def codec(self, vae) -> "Codec":
        """Its latent normalisation around a loaded VAE."""
        raise NotImplementedError

    def vae_config(self) -> dict | None:
        """The VAE's config for a single VAE file given without its config folder (None: the class defaults are
        the family's VAE, as for Qwen-Image's and FLUX.2's)."""
        return None

    def convert_vae_state(self, state: dict, config: dict) -> dict:
        """A single-file VAE in its original layout (ComfyUI's files) -> diffusers keys."""
        return state

    def folder_defaults(self, index: dict, folder=None) -> dict | None:
        """Sampling defaults a diffusers folder of this family implies through its model_index.json (e.g. a
        step-distilled variant's `is_distilled`) or its other files (`folder`, the folder's path, or None; Z-Image's
        scheduler config); None: the family's `sampling_defaults`."""
        return None

    def tiny_pipeline(self, seed: int = 0) -> "TextToImagePipeline":
        """A complete tiny random pipeline with the real classes (tests and `--pipeline tiny:<name>`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------
    # ComfyUI: key names and what stock ComfyUI loads

    def to_comfy(self, state: dict) -> dict:
        """Our (diffusers) tensor names -> the names stock ComfyUI's UNETLoader reads for this family."""
        return state

    def from_comfy(self, state: dict) -> dict:
        """ComfyUI's / the original checkpoints' names -> ours; names already ours pass unchanged."""
        return state

    def lora_to_comfy(self, modules: dict) -> dict:
        """LoRA modules (ours: module name -> `lora.LoraModule`) -> those stock ComfyUI's LoRA loader maps."""
        return modules

    def lora_from_comfy(self, modules: dict) -> dict:
        """LoRA modules named as ComfyUI / the original model names them -> ours; ours pass unchanged."""
        return modules

    def comfy_loadable(self, config: dict) -> tuple[bool, str]:
        """Whether stock ComfyUI loads a DiT of this config (a shrunk student), and why not."""
        return False, f"ComfyUI has no {self.name} architecture; load it with the pack's Load Student node."

    def comfy_model_config(self, config: dict) -> tuple[str, dict] | None:
        """(`comfy.supported_models` class name, its unet_config) that builds this DiT inside ComfyUI (the Load
        Student node's MODEL output), or None when ComfyUI has no model class for the family."""
        return None

    # ------------------------------------------------------------------------------------------------------

    def check(self) -> "Family":
        """Every required fact is given and consistent (the registry calls it; a failure is a developer error)."""
        missing = [k for k in self.REQUIRED if getattr(self, k) in ("", (), {}, None, 0)]
        if missing:
            raise TypeError(f"family {self.name or type(self).__name__} does not set {missing}")
        if self.default_lora_preset not in self.lora_presets:
            raise TypeError(f"family {self.name}: default LoRA preset {self.default_lora_preset!r} is not its own")
        return self

    def __repr__(self) -> str:
        return f"<family {self.name}>"
