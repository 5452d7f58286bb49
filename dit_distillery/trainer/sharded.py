"""Sharded training (`distributed: "fsdp"`): FSDP2 splits the DiT's parameters, gradients and AdamW states over
the processes, so full training of a DiT that does not fit one GPU runs on several.

Sharding: every block of the family's block groups (`Family.block_groups()`) is one FSDP unit, the DiT itself the
root (not the `TrainingModule` around it: validation and the held-out loss call the DiT directly, and FSDP2 wants
its root's forward first). On CUDA this is accelerate's FSDP2 (`fsdp_plugin`, given to the `Accelerator` by
`setup.make_accelerator`; `accelerator.prepare(dit, optimizer)` wraps the block classes, then the root).
accelerate turns FSDP on only for GPU-like kinds (its state switches to FSDP in the multi-GPU branch; a gloo run
on CPUs stays MULTI_CPU and ignores the plugin), so on the CPU `shard` applies torch's `fully_shard` itself, to the
same units, under accelerate's process group: the tests train that way on 2 CPU processes.

Checkpoints stay safetensors + JSON. accelerate's `save_state` pickles (optimizer, RNG, sampler), and
torch.distributed.checkpoint's default FileSystemWriter pickles its `.metadata` file (and any non-tensor value),
so neither is used: `save` writes each process's shards through DCP's `HuggingFaceStorageWriter` (safetensors
files, the shards' offsets as JSON in their metadata) into `checkpoint-<step>/sharded/`: the model's state
(`model.` + its names), AdamW's states (`optim.` + torch's flattened optimizer names) and the EMA (`ema.`); the
optimiser's settings (its param groups: lr, betas, ...) are JSON in state.json. `load` reads them back in place
into the same sharding, so a resume continues bit for bit on the same number of processes (the data sampler needs
that number too). `consolidate` turns a checkpoint into one safetensors file in the family's ComfyUI names with
our metadata (`models.registry.save_dit_state`, as the unsharded export), without a process group; every sharded
checkpoint gets one (<output.name>.safetensors), and so does the run's output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .. import families
from ..errors import DistilleryError
from ..formats import atomic_output, give_usual_permissions
from ..velocity import base_model

SHARDS = "sharded"  # the checkpoint's subfolder of DCP safetensors shards
_CHUNK_BYTES = 1 << 30  # consolidation reads this much at a time (then casts it to the saved dtype)


def is_sharded(job, accelerator) -> bool:
    """Whether this run shards its DiT: distributed "fsdp" on more than one process (one process trains as usual)."""
    return job.distributed == "fsdp" and accelerator.num_processes > 1


def fsdp_plugin(precision: str):
    """accelerate's FSDP2 plugin for a CUDA run (see the module docstring); the block classes are set by `shard`,
    once the model is known. Compute in `precision` (bf16/fp16), gradients reduced in fp32 as under DDP."""
    from accelerate import FullyShardedDataParallelPlugin

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
        activation_checkpointing=False,  # the job's gradient_checkpointing is the model's own
        mixed_precision_policy=None if dtype is None else {"param_dtype": dtype, "reduce_dtype": torch.float32})


def block_classes(dit: torch.nn.Module) -> list[type]:
    """The classes of the DiT's blocks, from its family's block groups: the FSDP units."""
    model = base_model(dit)
    classes: list[type] = []
    for group in families.of_model(dit).block_groups():
        for block in getattr(model, group.attr, None) or []:
            if type(block) not in classes:
                classes.append(type(block))
    return classes


def shard(job, model, accelerator, make_optimizer) -> tuple[object, list[torch.nn.Parameter]]:
    """Shard `model.dit` in place (blocks, then the DiT) and make its optimiser over the sharded parameters;
    returns (the prepared optimiser, the trainable parameters in module order: what is clipped)."""
    dit = model.dit
    classes = block_classes(dit)
    if accelerator.is_fsdp2:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [c.__name__ for c in classes]
        # the optimiser is made over the unsharded parameters; accelerate swaps in the sharded ones
        prepared, optimizer = accelerator.prepare(dit, make_optimizer(job, model.params()))
        if prepared is not dit:
            raise RuntimeError("accelerate returned another module than the DiT it sharded")
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        policy = MixedPrecisionPolicy() if dtype is None else \
            MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for module in list(base_model(dit).modules()):
            if isinstance(module, tuple(classes)):
                fully_shard(module, mp_policy=policy, reshard_after_forward=True)
        fully_shard(dit, mp_policy=policy)
        optimizer = accelerator.prepare(make_optimizer(job, model.params()))
    return optimizer, [p for p in dit.parameters() if p.requires_grad]


def _optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _state(dit, optimizer, ema: dict) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(the tensors DCP writes, sharded where the model is, under their checkpoint names; the optimiser's flat
    state dict; its non-tensor values). A fresh AdamW gets zero states first (torch's own initialisation), so a
    resume has tensors to load into."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    flat = get_optimizer_state_dict(dit, _optimizer(optimizer),
                                    options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {f"model.{k}": v for k, v in dit.state_dict().items()}
    tensors.update({f"optim.{k}": v for k, v in flat.items() if torch.is_tensor(v)})
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    return tensors, flat, {k: v for k, v in flat.items() if not torch.is_tensor(v)}


def first_nonfinite(named, accelerator) -> str | None:
    """`weights_check.first_nonfinite` over sharded tensors: each process checks its shards, one collective."""
    from torch.distributed.tensor import DTensor

    from ..weights_check import is_finite

    names, flags = [], []
    for name, t in named:
        names.append(name)
        flags.append(0.0 if is_finite(t.to_local() if isinstance(t, DTensor) else t) else 1.0)
    everyone = accelerator.reduce(torch.tensor(flags or [0.0], device=accelerator.device), "sum")
    bad = [n for n, f in zip(names, everyone.tolist()) if f > 0]
    return bad[0] if bad else None


def save(folder: Path, step: int, dit, optimizer, ema: dict, state: dict | None, accelerator) -> Path | None:
    """Every process: write `folder/checkpoint-<step>/` (its `sharded/` shards and, from the main process, `state`
    as state.json with the optimiser's settings added, and the consolidated weights file). Atomic: a temporary
    folder, renamed by the main process once all of it is written. Returns the path on the main process, None on
    the others."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed import broadcast_object_list
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    main = accelerator.is_main_process
    tmp = [None]
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = [tempfile.mkdtemp(prefix=f".checkpoint-{step:07d}.", dir=folder)]  # runlock.TEMP_CHECKPOINT
    broadcast_object_list(tmp, src=0)  # (the folder's name, between our own processes)
    tmp, final = Path(tmp[0]), folder / f"checkpoint-{step:07d}"
    try:
        tensors, _, plain = _state(dit, optimizer, ema)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
        if main:  # dcp.save returns once every process's files are written
            with open(tmp / "state.json", "w", encoding="utf-8") as f:
                json.dump(dict(state, step=step, sharded=True, optimizer=plain), f, default=_jsonable)
                f.flush()
                os.fsync(f.fileno())
            consolidate(tmp)  # the weights file, inside: a checkpoint that exists is complete
            give_usual_permissions(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DistilleryError("output", str(folder), f"could not write the checkpoint ({exc.strerror or exc}).",
                              "free disk space or choose another output folder; the previous checkpoint is intact.")
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final if main else None


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.tolist()
    return str(value)


def check_resumable(path: Path, state: dict, sharded: bool, processes: int) -> None:
    """Refuse a checkpoint this run cannot continue: sharded vs not, or another number of processes."""
    written = state.get("world_size", 1)
    if state.get("sharded", False) and not sharded:
        raise DistilleryError("resume", str(path), f"this checkpoint was written by sharded training (distributed "
                              f"fsdp on {written} processes); this run is not sharded.",
                              f'resume with distributed "fsdp" on {written} processes, or start a new run from its '
                              "consolidated weights (the checkpoint's .safetensors file as model.dit, resume null).")
    if sharded and not state.get("sharded", False):
        raise DistilleryError("resume", str(path), "this checkpoint was written without sharding; this run is "
                              "sharded (distributed fsdp).",
                              'resume with distributed "ddp", or start the sharded run from its weights file (the '
                              "checkpoint's .safetensors file as model.dit, resume null).")
    if sharded and written != processes:
        raise DistilleryError("resume", str(path), f"this checkpoint was written by {written} processes; this run "
                              f"has {processes}.", f"launch {written} processes to continue it exactly.")


def load(path: Path, state: dict, dit, optimizer, ema: dict) -> None:
    """Every process: read a checkpoint that `save` wrote back into the sharded model, the optimiser and the EMA
    shadows, in place. Only folders this trainer wrote are read: safetensors shards with our names (no pickle)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    folder = path / SHARDS
    stray = [p.name for p in folder.iterdir() if not p.name.endswith(".safetensors")] if folder.is_dir() else []
    if not folder.is_dir() or stray:
        raise DistilleryError("resume", str(path), "not a sharded checkpoint written by this trainer "
                              f"({'no sharded/ folder' if not folder.is_dir() else 'unexpected file ' + stray[0]}).",
                              "resume from a checkpoint-<step> folder of a sharded run, or set resume to null.")
    tensors, flat, _ = _state(dit, optimizer, ema)
    reader = HuggingFaceStorageReader(str(folder))
    missing = sorted(set(tensors) - set(reader.read_metadata().state_dict_metadata))
    if missing:
        raise DistilleryError("resume", str(path), f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more).",
                              "resume with the same model, trainables and ema_decay, or set resume to null.")
    dcp.load(tensors, storage_reader=reader)
    flat.update({k: tensors[f"optim.{k}"] for k in flat if torch.is_tensor(flat[k])})
    flat.update(state.get("optimizer", {}))  # lr (as scheduled), betas, ...: the checkpoint's
    set_optimizer_state_dict(dit, _optimizer(optimizer), flat,
                             options=StateDictOptions(flatten_optimizer_state_dict=True))


def consolidate(checkpoint: str | os.PathLike, path: str | os.PathLike | None = None,
                dtype: torch.dtype | str | None = None) -> Path:
    """One safetensors file of a sharded checkpoint's DiT: the full tensors from every process's shards, in the
    family's ComfyUI names with our metadata (`save_dit_state`, as the unsharded export), in `dtype` (default the
    job's output.save_dtype). One process, no process group; the model is read a chunk at a time, each chunk cast
    to `dtype` before the next, so memory holds the saved model plus one chunk. Default path: the checkpoint's
    <output.name>.safetensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from ..formats import dtype_from_name
    from ..models.registry import save_dit_state
    from ..weights_check import check_finite

    checkpoint = Path(checkpoint)
    try:
        export = json.loads((checkpoint / "state.json").read_text())["export"]
    except (OSError, ValueError, KeyError):
        export = None
    if export is None or not (checkpoint / SHARDS).is_dir():
        raise DistilleryError("checkpoint", str(checkpoint), "not a sharded checkpoint of DiT Distillery "
                              "(state.json with its export settings, and a sharded/ folder).",
                              "give a checkpoint-<step> folder written by a run with distributed fsdp.")
    dtype = dtype_from_name(dtype if dtype is not None else export["save_dtype"], "dtype")
    reader = HuggingFaceStorageReader(str(checkpoint / SHARDS))
    stored = {k: m for k, m in reader.read_metadata().state_dict_metadata.items() if k.startswith("model.")}
    weights, chunk, size = {}, {}, 0
    for i, (key, meta) in enumerate(stored.items()):
        chunk[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        size += chunk[key].numel() * chunk[key].element_size()
        if size >= _CHUNK_BYTES or i == len(stored) - 1:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(chunk, storage_reader=HuggingFaceStorageReader(str(checkpoint / SHARDS)), no_dist=True)
            for k, t in chunk.items():
                check_finite(k, t, field="checkpoint", path=checkpoint)
                weights[k[len("model."):]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            chunk, size = {}, 0
    path = Path(path) if path is not None else checkpoint / f"{export['name']}.safetensors"
    return save_dit_state(weights, export["family"], export["config"], path, export["provenance"], dtype,
                          export["metadata"])


def export_settings(job, dit, step: int) -> dict:
    """What `consolidate` needs besides the tensors, kept in the checkpoint's state.json."""
    from ..models.registry import model_config
    from .checkpoints import training_metadata

    family = families.of_model(dit).name
    settings, metadata = training_metadata(job, family, step)
    return {"family": family, "config": model_config(base_model(dit)), "save_dtype": job.output.save_dtype,
            "name": job.output.name, "provenance": {"trained": settings}, "metadata": metadata}


def publish(checkpoint: Path, path: Path) -> Path:
    """The run's weights file: a copy of its last checkpoint's consolidated one (atomic)."""
    source = checkpoint / path.name
    with atomic_output(path) as tmp:
        shutil.copyfile(source, tmp)
    return path
