"""Read the source one tensor at a time and write the student one tensor at a time.

Memory stays near one tensor whatever the model size: `RawReader` reads a tensor with positional reads into a
buffer it owns, the kept rows/columns are sliced out, and `StreamingSafetensorsWriter` writes it before the next
is read. The real 60-block bf16 Qwen-Image (41 GB) therefore shrinks on a 24 GB machine; its largest tensor
(img_mod.1.weight, 18432 x 3072) is 113 MB.

ComfyUI's fp8 files are read too (`Quantisation`): plain fp8 is sliced byte for byte, and a scaled fp8 student
keeps its source's scales (a per-tensor scale is valid for any slice of its weight) or, written in bf16/fp16/fp32,
gets the weights dequantised.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch

from .. import families
from ..errors import DistilleryError, StopRequested
from ..formats import StreamingSafetensorsWriter, TensorSource, atomic_output, atomic_write_text
from ..models import registry
from ..weights_check import check_finite
from .plan import ShrinkPlan, WidthPlan, space_parts, spaces_of, split_key

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn; larger values would become NaN when cast


class RawReader:
    """Tensors of a `TensorSource`, read with plain file reads into torch buffers we own.

    Why not safetensors' `get_tensor`: `safe_open` memory-maps each file, and every page a read touches stays in
    the process's resident set until the handle is closed, so streaming a 41 GB source through it shows (and, under
    pressure, competes for) tens of GB of RSS. Reading into our own buffer holds one tensor, freed or reused when
    done. The offsets come from the safetensors header (8-byte little-endian length, JSON with `data_offsets`).
    """

    def __init__(self, src: TensorSource):
        self.src = src
        self._files = []
        self._where: dict[str, tuple[int, int, int]] = {}
        for i, path in enumerate(src.files):
            f = open(path, "rb", buffering=0)
            self._files.append(f)
            _advise_sequential(f)
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
            for raw, info in header.items():
                if raw == "__metadata__" or not raw.startswith(src.prefix):
                    continue
                key = raw[len(src.prefix):]
                if key in src:
                    start, stop = info["data_offsets"]
                    self._where[key] = (i, 8 + length + start, stop - start)

    def span(self, key: str) -> tuple[int, int, int]:
        """(file index, byte offset, byte count) of a tensor's data."""
        return self._where[key]

    def nbytes(self, key: str) -> int:
        return self._where[key][2]

    def read(self, key: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`, in a new buffer or in `into` (a uint8 tensor of at least its size, reused)."""
        i, offset, nbytes = self._where[key]
        buf = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
        view = memoryview(buf.numpy())
        f = self._files[i]
        f.seek(offset)
        done = 0
        while done < nbytes:  # one read() returns at most ~2 GB on Linux
            n = f.readinto(view[done:])
            if not n:
                raise DistilleryError(self.src.field, str(self.src.files[i]), f"the file ends inside tensor {key!r}.",
                                      "the file is truncated: download or export it again.")
            done += n
        # NaN/inf in the source would be copied into the student silently: refuse by name (one pass over the
        # tensor just read, in the read-ahead thread while the previous one is written; see weights_check)
        return check_finite(key, buf.view(self.src.dtype(key)).reshape(self.src.shape(key)), field=self.src.field,
                            path=self.src.files[i])

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()


def read_ahead(reader: RawReader, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) in order while ONE background thread already reads the next tensor.

    File reads, file writes and torch kernels release the GIL, so the disk read of tensor i+1 overlaps the
    slicing/scoring/writing of tensor i. Tensors are read into two buffers (sized for the largest tensor) used in
    turn: fresh memory for every tensor costs a page fault per 4 KB, which measured slower than the disk here.
    So a yielded tensor is valid only until the next one is requested: use it or copy it.
    """
    keys = list(keys)
    if not keys:
        return
    size = max(reader.nbytes(k) for k in keys)
    buffers = [torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shrink-read") as pool:
        future = pool.submit(reader.read, keys[0], buffers[0])
        for i, key in enumerate(keys):
            tensor = future.result()
            if i + 1 < len(keys):  # the other buffer: the caller finished with it when it asked for this one
                future = pool.submit(reader.read, keys[i + 1], buffers[(i + 1) % 2])
            yield key, tensor
            del tensor


def _advise_sequential(f) -> None:
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass


def streamable() -> list:
    """The families Shrink DiT streams: with a single-stack `width_layout` (`SourceModel`) first, then those
    `depth.DepthSource` streams (a per-stack layout, then depth only)."""
    return sorted(families.all(), key=lambda f: (f.width_layout is None,  # stable within each kind
                                                 f.width_layout is not None and f.width_layout.per_stack))


class Quantisation:
    """A source's ComfyUI fp8 quantisation, as `fp8.read_layout` reads it (plain fp8, or scaled fp8 in either of
    ComfyUI's layouts; other formats and block-wise scales are refused there, by name).

    A student that keeps fp8 (`keeps`: dtype keep or fp8) is a scaled fp8 file like its source: each kept weight's
    bytes are an exact slice, its scale goes with it unchanged (a per-tensor scale is valid for any slice of its
    weight; a per-row one is sliced with the weight's rows), and so do its input scale, its `comfy_quant` entry,
    the `scaled_fp8` marker and the `_quantization_metadata` header (layers renamed with their blocks). A student
    in bf16/fp16/fp32 gets the weights dequantised (`value`: weight x scale in fp32) and then cast, and no scales.
    Scoring and calibration read `value` too."""

    def __init__(self, src: TensorSource, field: str):
        from .. import fp8

        layout = fp8.read_layout(src, field)
        self.src, self.keys, self.scales, self.scaled = src, layout.keys, layout.scales, layout.scaled
        self.marker = fp8.MARKER if fp8.MARKER in src else None
        self.suffixes = fp8._SCALE_SUFFIXES + fp8._INPUT_SUFFIXES + (fp8._CONF,)
        header = src.metadata.get(fp8._QUANT_META)
        self.header = fp8._conf(header, fp8._QUANT_META, field, src.path) if header else {}
        prefix = src.prefix  # the header's layers by the tensors' names (without the file's storage prefix)
        self.layers = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
                       for k, v in self.header.get("layers", {}).items()}
        if self.scaled:  # what fp8.load_weights refuses: the student would load nowhere, and a slice compute wrongly
            unscaled = [k for k in self.keys if fp8.is_fp8(torch.empty(0, dtype=src.dtype(k)))
                        and len(src.shape(k)) == 2 and k not in self.scales]
            if unscaled:
                raise DistilleryError(field, str(src.path), f"is a scaled fp8 file but {len(unscaled)} fp8 weights "
                                      f"have no scale (first {unscaled[0]!r}): they would compute wrongly.",
                                      "the file is incomplete or was edited: download it again, or use the bf16 file.")

    @staticmethod
    def keeps(dtype: torch.dtype | None) -> bool:
        """Whether a student in `dtype` keeps the source's fp8 weights (and scales) as they are."""
        return dtype is None or dtype == FP8

    def target(self, dtype: torch.dtype | None) -> torch.dtype | None:
        """The `output_dtype` target of a student in `dtype`: fp8 from a scaled source keeps every tensor as the
        source has it (what it quantised stays fp8 with its scale; what it left wide stays wide, as a cast
        without a scale would compute wrongly in a scaled file)."""
        return None if self.scaled and dtype == FP8 else dtype

    def value(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Tensor `key` as the model computes with it: a scaled weight times its scale, in fp32."""
        scale = self.scales.get(key)
        if scale is None:
            return t
        if t.is_meta:
            return torch.empty(t.shape, dtype=torch.float32, device="meta")
        from ..fp8 import _dequant

        return _dequant(t, scale, torch.float32)

    def companions(self, weight: str) -> list[str]:
        """The quantisation tensors of one weight (scale, input scale, comfy_quant), as the source has them."""
        if not weight.endswith(".weight"):
            return []
        layer = weight[: -len(".weight")]
        return [layer + s for s in self.suffixes if layer + s in self.src]

    def per_row(self, key: str) -> bool:
        """Whether the companion `key` is a per-row weight scale (sliced with its weight's rows)."""
        weight = key.rsplit(".", 1)[0] + ".weight"
        return key.endswith(self.suffixes[:2]) and weight in self.scales and self.scales[weight].numel() > 1

    @staticmethod
    def renamed(companion: str, weight: str, student_weight: str) -> str:
        """The student's name of a companion of `weight`, which the student calls `student_weight`."""
        return student_weight[: -len(".weight")] + companion[len(weight) - len(".weight"):]

    def metadata(self, pairs) -> dict:
        """The student's `_quantization_metadata` header entry (none when the source has none): the source's, with
        its layers renamed by `pairs` ((student weight, source weight) of every kept weight) and the others left
        out."""
        from .. import fp8

        if not self.header:
            return {}
        renamed = {}
        for student, source in pairs:
            layer = source[: -len(".weight")]
            if source.endswith(".weight") and layer in self.layers:
                renamed[student[: -len(".weight")]] = self.layers[layer]
        return {fp8._QUANT_META: json.dumps(dict(self.header, layers=renamed))}


class SourceModel:
    """An opened, checked DiT source of a family Shrink DiT streams: lazy tensors, a raw reader, its diffusers
    config, its family and the family's `WidthLayout`."""

    def __init__(self, path, field: str = "source"):
        self.path = Path(path)
        self.src = TensorSource(path, field)
        try:
            self._check(field)
            self.reader = RawReader(self.src)
        except BaseException:
            self.src.close()
            raise

    def _check(self, field: str) -> None:
        titles = ", ".join(f.title for f in streamable()[:-1]) + " or " + streamable()[-1].title
        self.quant = Quantisation(self.src, field)
        keys = self.quant.keys  # the model's tensors: a scaled fp8 file's scales and markers go with their weights
        try:
            name, config, _ = families.detect(self.src)
        except DistilleryError as exc:
            raise DistilleryError(field, str(self.path), f"not a {titles} DiT (" + exc.problem + ")",
                                  f"choose a {titles} diffusion model.") from None
        family = families.get(name)
        if family.width_layout is None or family.width_layout.per_stack:
            raise DistilleryError(field, str(self.path), f"a {family.title} model, whose block stacks are shrunk "
                                  "each by its own count.", f"shrink a {family.title} with shrink.shrink (it opens "
                                  "it as a depth.DepthSource).")
        self.family, self.layout = family, family.width_layout
        self.group = family.group(self.layout.group)
        unsupported = [k for k in self.layout.unsupported if config.get(k)]
        if unsupported:
            raise DistilleryError(field, str(self.path), f"a {family.title} variant with {unsupported}, which Shrink "
                                  "DiT does not handle.", f"use a text-to-image {family.title} DiT.")
        self.config = dict(config)
        have = {k: self.src.shape(k) for k in keys}
        # the file may name its tensors as ComfyUI does for the family (`Family.to_comfy`: Z-Image's fused qkv) or
        # as the model class does; the student is written in the same naming
        expected = file_shapes(self.config, family)
        self.comfy_names = set(expected) != set(expected_shapes(self.config, family))
        if self.comfy_names and set(have) != set(expected):
            ours = expected_shapes(self.config, family)
            if set(have) == set(ours):
                expected, self.comfy_names = ours, False
        missing = sorted(set(expected) - set(have))
        extra = sorted(set(have) - set(expected))
        wrong = [k for k in expected if k in have and have[k] != expected[k]]
        if missing or extra or wrong:
            raise DistilleryError(field, str(self.path), f"not a complete {family.title} DiT (missing {missing[:3]}, "
                                  f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}).",
                                  "the file is incomplete or from another model: download or export it again.")
        self.shapes = expected
        # the other block groups the width narrows, with their block counts
        self.sliced = [(family.group(g), self.config[family.group(g).count_key]) for g in self.layout.sliced_groups]

    def extra_slot(self, key: str, kept: int) -> int | None:
        """The width plan's per-block slot of a key in a block of `sliced_groups` (after the `kept` main blocks;
        these groups are never dropped, so their indices are the same in source and student); None elsewhere."""
        offset = kept
        for group, count in self.sliced:
            block, _, _ = split_key(key, group.prefix)
            if block is not None:
                return offset + block
            offset += count
        return None

    @property
    def extra_blocks(self) -> int:
        return sum(count for _, count in self.sliced)

    @property
    def num_blocks(self) -> int:
        return self.config[self.group.count_key]

    @property
    def heads(self) -> int:
        return self.layout.heads(self.config)

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim(self.config)

    def keys_of_block(self, index: int) -> list[str]:
        prefix = f"{self.group.prefix}{index}."
        return [k for k in self.shapes if k.startswith(prefix)]

    def global_keys(self) -> list[str]:
        return [k for k in self.shapes if not k.startswith(self.group.prefix)]

    def spaces_of(self, key: str, ndim: int) -> tuple[str | None, str | None]:
        return spaces_of(key, ndim, self.layout)

    def read_value(self, key: str) -> torch.Tensor:
        """Tensor `key` as the model computes with it (a scaled fp8 weight times its scale, in fp32), in a fresh
        buffer: what calibration runners load."""
        return self.quant.value(key, self.reader.read(key))

    def split_key(self, key: str) -> tuple[int | None, str, str]:
        return split_key(key, self.group.prefix)

    def close(self) -> None:
        self.reader.close()
        self.src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def empty_model(config: dict, family=None):
    """The family's model for `config` with parameters on the meta device (no memory); the family is the one
    whose model takes exactly these config keys when not given."""
    from accelerate import init_empty_weights

    family = families.get(family if family is not None else families.detect(dict(config), "config")[0])
    with init_empty_weights():
        return family.model_class()(**config)


def expected_shapes(config: dict, family=None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model for `config`, in its state_dict order, with its shape."""
    return {k: tuple(v.shape) for k, v in empty_model(config, family).state_dict().items()}


def file_shapes(config: dict, family=None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model for `config` under the names stock ComfyUI reads for its family
    (`Family.to_comfy`; the model's own names for Qwen-Image), with its shape."""
    model = empty_model(config, family)
    spec = families.of_model(model)
    return {k: tuple(v.shape) for k, v in spec.to_comfy(model.state_dict()).items()}


# ----------------------------------------------------------------------------------------------------------
# The student's tensors

def student_config(source: SourceModel, layers: int, heads: int | None) -> dict:
    config = dict(source.config, **{source.group.count_key: layers})
    if heads is not None:
        config = source.layout.with_heads(config, heads)
    return config


def _index(space: str | None, width: WidthPlan | None, block: int | None, dim: int,
           units: int = 0) -> torch.Tensor | None:
    """The kept indices of one dimension of a source tensor (None = keep it whole); `dim`: the source's width,
    `units`: its FFN units per unit space (needed by spaces with several parts or chunks of units)."""
    if space is None or width is None:
        return None
    if "+" in space:  # parts laid end to end, each as wide in the source as its space (x its chunks)
        out, offset = [], 0
        for part, (name, chunks) in zip(space.split("+"), space_parts(space)):
            out.append(_index(part, width, block, dim, units) + offset)
            offset += chunks * (units if name in width.units else dim)
        return torch.cat(out)
    if space == "res":
        return torch.tensor(width.channels)
    if space.startswith("res*"):
        chunks = int(space[4:])
        base = torch.tensor(width.channels)
        return torch.cat([base + c * dim for c in range(chunks)])
    if space == "temb":
        return torch.tensor(width.temb)
    if space == "temb_hidden":
        return torch.tensor(width.temb_hidden)
    if space == "heads" or space.startswith("heads*"):
        hd = width.head_dim
        base = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in width.block_heads[block]])
        chunks = int(space[6:]) if space != "heads" else 1
        return torch.cat([base + c * dim for c in range(chunks)])
    name, chunks = space_parts(space)[0]
    if name in width.units:
        base = torch.tensor(width.units[name][block])
        return torch.cat([base + c * units for c in range(chunks)]) if chunks > 1 else base
    raise KeyError(space)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of the same bytes: slicing it copies bits exactly, whatever the dtype (fp8 included)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def slice_tensor(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is None and cols is None:
        return t
    bits = _bits(t)
    if rows is not None:
        bits = bits.index_select(0, rows)
    if cols is not None:
        bits = bits.index_select(1, cols)
    return bits.view(t.dtype)


def output_dtype(key: str, ndim: int, source: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """`target=None` keeps every tensor's dtype. fp8 applies to 2-D weight matrices only (the Linear layers,
    as ComfyUI's fp8 files do): biases and RMSNorm scales are tiny and precision-sensitive, so they keep the
    source dtype. Other targets apply to every floating-point tensor."""
    if target is None or not source.is_floating_point:
        return source
    if target == FP8:
        return FP8 if (ndim == 2 and key.endswith(".weight")) else source
    return target


def convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == dtype:
        return t
    if dtype == FP8:  # saturate instead of overflowing to NaN (clamped in fp32 when the input is fp8 e5m2)
        t = (t.float() if t.element_size() == 1 else t).clamp(-FP8_MAX, FP8_MAX)
    return t.to(dtype)


class StudentTensor:
    """One output tensor: its name, where it comes from, which rows/columns are kept, and the scale its slice is
    multiplied by in fp32 before the cast (a scaled fp8 weight written wide; None: copied, or cast)."""

    __slots__ = ("name", "source_key", "block", "rows", "cols", "dtype", "shape", "scale")

    def __init__(self, name, source_key, block, rows, cols, dtype, shape, scale=None):
        self.name, self.source_key, self.block = name, source_key, block
        self.rows, self.cols, self.dtype, self.shape, self.scale = rows, cols, dtype, shape, scale

    def data(self, raw: torch.Tensor) -> torch.Tensor:
        """This tensor from its source tensor `raw`: the kept slice, dequantised when it has a scale, cast."""
        data = slice_tensor(raw, self.rows, self.cols)
        if self.scale is not None:
            scale = self.scale
            if scale.numel() > 1 and self.rows is not None:  # per row: the kept rows' scales
                scale = scale.index_select(0, self.rows)
            data = data.float() * scale
        return convert(data, self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def student_tensors(source: SourceModel, plan: ShrinkPlan, dtype: torch.dtype | None) -> list[StudentTensor]:
    """The student's tensors in diffusers' state_dict order (block i renamed from source block kept_blocks[i]);
    from a scaled fp8 source, each kept weight followed by its quantisation tensors (`Quantisation`) when the
    student keeps fp8, or dequantised when it does not."""
    dim = source.heads * source.head_dim
    quant, keep = source.quant, source.quant.keeps(dtype)
    dtype = quant.target(dtype)
    out = []
    if keep and quant.marker:
        out.append(StudentTensor(quant.marker, quant.marker, None, None, None, source.src.dtype(quant.marker),
                                 source.src.shape(quant.marker)))
    shapes = (file_shapes if source.comfy_names else expected_shapes)(plan.config, source.family)
    for name, shape in shapes.items():
        block, module, param = source.split_key(name)
        source_key = name if block is None else f"{source.group.prefix}{plan.kept_blocks[block]}.{module}.{param}"
        slot = block if block is not None else source.extra_slot(name, len(plan.kept_blocks))
        ndim = len(source.shapes[source_key])
        # a depth-only plan slices nothing: the layout need not name every module then
        row_space, col_space = source.spaces_of(source_key, ndim) if plan.width is not None else (None, None)
        rows = _index(row_space, plan.width, slot, dim)
        cols = _index(col_space, plan.width, slot, dim)
        src_shape = source.shapes[source_key]
        sliced = tuple(len(ix) if ix is not None else s for ix, s in zip((rows, cols), src_shape)) + src_shape[2:]
        if sliced != shape:  # the plan and the student config disagree: a bug, not bad input
            raise RuntimeError(f"{name}: slicing {source_key}{src_shape} gives {sliced}, the student needs {shape}")
        scale = None if keep else quant.scales.get(source_key)
        out.append(StudentTensor(name, source_key, block, rows, cols,
                                 output_dtype(name, ndim, source.src.dtype(source_key), dtype), shape, scale))
        for companion in quant.companions(source_key) if keep else ():
            per_row = quant.per_row(companion)
            shape = source.src.shape(companion)
            if per_row and rows is not None:
                shape = (len(rows),) + tuple(shape[1:])
            out.append(StudentTensor(quant.renamed(companion, source_key, name), companion, block,
                                     rows if per_row else None, None, source.src.dtype(companion), tuple(shape)))
    return out


def metadata_for(plan: ShrinkPlan) -> dict:
    return {
        "format": "pt",
        registry.META_FAMILY: plan.family,
        registry.META_CONFIG: json.dumps(plan.config, sort_keys=True),
        registry.META_PROVENANCE: json.dumps(plan.provenance(), sort_keys=True, default=str),
    }


def check_free_space(out: Path, nbytes: int) -> None:
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes:
        raise DistilleryError("out", str(out), f"the student needs {nbytes / 2**30:.2f} GiB but only "
                              f"{free / 2**30:.2f} GiB is free there; nothing was written.",
                              "free some space or choose another output folder.")


def write_student(source: SourceModel, plan: ShrinkPlan, out: Path, dtype: torch.dtype | None,
                  progress=None, stop=None) -> int:
    """Stream the student into `out` (atomically); returns the bytes written."""
    tensors = student_tensors(source, plan, dtype)
    metadata = metadata_for(plan)
    if source.quant.keeps(dtype):
        metadata.update(source.quant.metadata([(t.name, t.source_key) for t in tensors]))
    from ..runlock import remove_leftovers

    remove_leftovers(out.parent, recursive=False, target=out.name)  # a killed shrink's temp file (up to 20 GB)
    check_free_space(out, sum(t.nbytes for t in tensors) + len(json.dumps(metadata)) + (1 << 20))
    layout = [(t.name, t.dtype, t.shape) for t in tensors]
    try:
        writer = StreamingSafetensorsWriter(out, layout, metadata)
    except OSError as exc:
        raise _write_error(out, exc) from exc
    try:
        for i, (t, (_, raw)) in enumerate(zip(tensors, read_ahead(source.reader, [t.source_key for t in tensors]))):
            if stop is not None and stop():
                raise StopRequested("shrink stopped before the student was complete; nothing was written")
            data = t.data(raw)
            del raw
            writer.write(t.name, data)
            del data
            if progress is not None:
                progress(i + 1, len(tensors), stage="write", tensor=t.name)
        writer.close()
    except OSError as exc:
        writer.abort()
        raise _write_error(out, exc) from exc
    except BaseException:
        writer.abort()
        raise
    return writer.total_bytes


def _write_error(out: Path, exc: OSError, field: str = "out") -> DistilleryError:
    import errno

    if exc.errno == errno.ENOSPC:
        return DistilleryError(field, str(out), "the disk filled up while writing; the partial file was removed.",
                               "free some space or choose another output folder.")
    return DistilleryError(field, str(out), f"cannot write the student ({exc.strerror or exc}); nothing was kept.",
                           "check that the folder exists and is writable.")


def write_diffusers_folder(out: Path, folder: Path, config: dict, family=None) -> Path:
    """A folder the model class's `from_pretrained` loads: config.json + the same weights file (hard-linked when
    the filesystem allows, so it costs no space; copied otherwise; a student in ComfyUI's names for its family is
    renamed back tensor by tensor, `Family.from_comfy`)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        model = empty_model(config, family)
        atomic_write_text(folder / "config.json", model.to_json_string())
        with TensorSource(out, "out", prefixes=()) as src:
            renamed = set(src.keys()) != set(model.state_dict())
        if renamed:
            _write_model_names(out, folder / "diffusion_pytorch_model.safetensors", families.of_model(model))
            return folder
        with atomic_output(folder / "diffusion_pytorch_model.safetensors") as tmp:
            tmp.unlink()
            try:
                os.link(out, tmp)
            except OSError:
                shutil.copyfile(out, tmp)
    except OSError as exc:
        raise _write_error(folder, exc, "diffusers_folder") from exc
    return folder


def _write_model_names(out: Path, target: Path, family) -> None:
    """`out` under the model class's own tensor names (`family.from_comfy` of each tensor), streamed."""
    with TensorSource(out, "out", prefixes=()) as src:
        reader = RawReader(src)
        try:
            keys, layout = list(src.keys()), []
            for key in keys:
                meta = family.from_comfy({key: torch.empty(src.shape(key), dtype=src.dtype(key), device="meta")})
                layout += [(name, t.dtype, tuple(t.shape)) for name, t in meta.items()]
            writer = StreamingSafetensorsWriter(target, layout, {"format": "pt"})
            try:
                for key, tensor in read_ahead(reader, keys):
                    for name, t in family.from_comfy({key: tensor}).items():
                        writer.write(name, t.contiguous())
                writer.close()
            except BaseException:
                writer.abort()
                raise
        finally:
            reader.close()
