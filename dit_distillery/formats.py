"""Safetensors in and out.

* `TensorSource`: a lazy, read-only view of a model's tensors, whatever way they are stored: one file (bare
  diffusers keys, or ComfyUI's `model.diffusion_model.` prefix), a sharded diffusers folder (index JSON + shards),
  or a diffusers pipeline folder with a `transformer/` subfolder. Nothing is read until a tensor is asked for.
* `atomic_output`: every file that matters is written to a temporary name beside its target and renamed into
  place only when complete, so an interrupted or failed write (full disk included) never leaves a half file.
* `StreamingSafetensorsWriter`: writes a safetensors file one tensor at a time. safetensors' own `save_file`
  needs every tensor in memory at once; a 41 GB source shrunk to a 20 GB student must not, so we write the
  (simple, documented) format ourselves: 8-byte little-endian header size, JSON header, raw tensor bytes.

Weights are only ever loaded from safetensors: nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from .errors import DistilleryError

# Prefixes under which ComfyUI and diffusers pipelines store a DiT's keys. The first that applies is stripped.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}

DTYPES_BY_NAME = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


def dtype_from_name(name: str | torch.dtype | None, field: str = "dtype") -> torch.dtype | None:
    """'bf16' -> torch.bfloat16; None and 'keep'/'auto' stay None (keep the source's dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name in ("keep", "auto", ""):
        return None
    try:
        return DTYPES_BY_NAME[name.lower()]
    except KeyError:
        raise DistilleryError(field, name, "unknown dtype.", f"use one of {sorted(DTYPES_BY_NAME)} or 'keep'.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------
# Metadata: safetensors only stores str -> str, so structured values are JSON-encoded.

def encode_metadata(metadata: Mapping[str, object] | None) -> dict[str, str]:
    out = {}
    for key, value in (metadata or {}).items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def decode_metadata_value(value: str | None):
    """JSON-decode a metadata value written by `encode_metadata`; plain strings come back unchanged."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


# ----------------------------------------------------------------------------------------------------------
# Atomic writes

_KEPT = "nothing was written under this name, and what was saved before is intact."


def _disk_error(path: Path, exc: OSError) -> DistilleryError:
    """A failed write as the user must read it: which file, what the system said, and what to do."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return DistilleryError("out", str(path), f"cannot write the file: {reason}; {_KEPT}",
                               "free some space on that disk, or choose an output folder on another disk.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DistilleryError("out", str(path), f"cannot write the file: {exc.strerror or exc}; {_KEPT}",
                               "choose a folder you can write to, or change its permissions.")
    if code == errno.EIO:
        return DistilleryError("out", str(path), f"cannot write the file: input/output error (a failing disk or a "
                               f"lost network drive); {_KEPT}", "check the disk, or choose another output folder.")
    return DistilleryError("out", str(path), f"cannot write the file ({exc.strerror or exc}); {_KEPT}",
                           "check that the folder exists and is writable.")


_OS_ERROR_CODE = re.compile(r"os error (\d+)|code: (\d+)")


def safetensors_os_error(exc: Exception, path: str | os.PathLike) -> OSError | None:
    """The OSError behind a safetensors write failure, or None if it was not one.

    safetensors raises its own `SafetensorError` (not an OSError) for I/O failures, with the OS error only in the
    text: 'I/O error: No space left on device (os error 28)' (0.5 and later) or
    'IoError(Os { code: 28, kind: StorageFull, ... })' (earlier).
    """
    text = str(exc)
    match = _OS_ERROR_CODE.search(text)
    if match:
        code = int(match.group(1) or match.group(2))
    elif "No space left on device" in text:
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on any failure remove it.

    The temporary is `<name>.<pid>.<random>.tmp`, flocked while it is written (where flock exists): a killed
    write's leftover is then recognisable as ours and as abandoned (`runlock.remove_leftovers`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _disk_error(path, exc) from exc
    from .runlock import try_flock

    if os.name == "nt" or not try_flock(fd):  # Windows cannot rename a file that is still open
        os.close(fd)
        fd = None
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a normal write would (or the replaced file's)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else usual_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads); 022 if unreadable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def usual_mode(folder: bool = False) -> int:
    """The mode a plain `open(..., "w")` (0o666) or `mkdir` (0o777) gives under the current umask."""
    return (0o777 if folder else 0o666) & ~_umask()


def give_usual_permissions(path: str | os.PathLike) -> None:
    """Give a file, or a folder and everything under it, the permissions a plain write/mkdir would have.

    `mkstemp`/`mkdtemp` make private temporaries (0600/0700), and some writers do the same for their own files
    (safetensors' `save_file` inside `save_pretrained`); call this on a temporary before renaming it into place,
    so what appears under the final name looks like any other output. Symlinks are left alone.
    """
    path = Path(path)
    file_mode, folder_mode = usual_mode(), usual_mode(folder=True)
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    os.chmod(path, folder_mode)
    for root, folders, files in os.walk(path):
        for names, mode in ((folders, folder_mode), (files, file_mode)):
            for name in names:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, object] | None = None) -> Path:
    """Save a (small enough to hold in memory) state dict atomically, with JSON-encoded metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        try:
            save_file(clean, str(tmp), metadata=encode_metadata(metadata))
        except SafetensorError as exc:  # a full disk arrives as this, not as an OSError: make it one
            os_error = safetensors_os_error(exc, tmp)
            if os_error is None:
                raise
            raise os_error from exc  # atomic_output removes the temporary and names `path` (see _disk_error)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Streaming writer

class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor, holding at most one tensor in memory.

    The layout (names, dtypes, shapes, order) is declared up front so the header can be written first; then
    `write(name, tensor)` must be called for each declared tensor, in the declared order. The file appears
    under its final name only after `close()` has checked that every tensor arrived.
    """

    def __init__(self, path: str | os.PathLike, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, object] | None = None):
        self.path = Path(path)
        self._order: list[str] = []
        self._spec: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        header: dict[str, object] = {}
        offset = 0
        for name, dtype, shape in layout:
            if name in self._spec:
                raise ValueError(f"duplicate tensor name {name!r}")
            shape = tuple(int(s) for s in shape)
            nbytes = _numel(shape) * _element_size(dtype)
            header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._spec[name] = (dtype, shape, nbytes)
            self._order.append(name)
            offset += nbytes
        meta = encode_metadata(metadata)
        if meta:
            header["__metadata__"] = meta
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        self.total_bytes = 8 + len(blob) + offset
        self._next = 0
        self._ctx = atomic_output(self.path)
        self._tmp = self._ctx.__enter__()
        try:
            self._file = open(self._tmp, "wb")
            self._file.write(struct.pack("<Q", len(blob)))
            self._file.write(blob)
        except BaseException as exc:
            self._abort(exc)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            if self._next >= len(self._order) or self._order[self._next] != name:
                expected = self._order[self._next] if self._next < len(self._order) else "nothing more"
                raise ValueError(f"tensor {name!r} written out of order; expected {expected!r}")
            dtype, shape, nbytes = self._spec[name]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name!r} is {tensor.dtype}{tuple(tensor.shape)}, declared {dtype}{shape}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                self._file.write(memoryview(data.view(torch.uint8).numpy()))
        except BaseException as exc:
            self._abort(exc)
            raise
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._order):
            missing = self._order[self._next:]
            exc = ValueError(f"{len(missing)} declared tensors were never written, first {missing[0]!r}")
            self._abort(exc)
            raise exc
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException as exc:
            self._abort(exc)
            raise
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Discard the partial file (used when the caller fails between writes)."""
        self._abort(RuntimeError("aborted"))

    def _abort(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort(exc)
        return False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------------
# Reading

def resolve_weight_files(path: str | os.PathLike, field: str = "source",
                         subfolders: tuple[str, ...] = ("transformer",)) -> list[Path]:
    """The safetensors file(s) that hold a model: a file, an index-described shard set, or a folder."""
    p = Path(path)
    if not p.exists():
        raise DistilleryError(field, str(path), "no such file or folder.",
                              "give the path of a .safetensors file or of a diffusers model folder.")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _files_from_index(p, field)
        if p.suffix != ".safetensors":
            raise DistilleryError(field, str(path), "only .safetensors weights are read (pickled .bin/.pt/.ckpt "
                                  "files can run code when loaded).",
                                  "convert the file to safetensors first.")
        return [p]
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if indexes:
        return _files_from_index(indexes[0], field)
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if len(files) > 1:
        raise DistilleryError(field, str(path), f"the folder holds {len(files)} .safetensors files and no index JSON.",
                              "point at one file, or add the diffusers *.safetensors.index.json.")
    for sub in subfolders:
        if (p / sub).is_dir():
            return resolve_weight_files(p / sub, field, subfolders=())
    raise DistilleryError(field, str(path), "the folder holds no .safetensors weights.",
                          "point at a .safetensors file or a diffusers model folder.")


def _files_from_index(index: Path, field: str) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise DistilleryError(field, str(index), f"unreadable shard index ({exc}).",
                              "re-download the model's *.index.json.") from exc
    files = []
    for name in dict.fromkeys(weight_map.values()):
        f = index.parent / name
        if not f.is_file():
            raise DistilleryError(field, str(index), f"shard {name} listed in the index is missing.",
                                  "download every shard listed in the index.")
        files.append(f)
    return files


class TensorSource:
    """Lazy read-only access to a model's tensors (see the module docstring for the layouts it reads).

    Keys are exposed without their storage prefix (`model.diffusion_model.` etc.). When a file holds several
    models (a ComfyUI all-in-one checkpoint), only the keys under `model.diffusion_model.` are exposed.
    """

    def __init__(self, path: str | os.PathLike, field: str = "source", prefixes: tuple[str, ...] = DIT_PREFIXES):
        from safetensors import safe_open

        self.path = Path(path)
        self.field = field
        self.files = resolve_weight_files(path, field)
        self._handles = []
        self._where: dict[str, tuple[int, str]] = {}
        self.metadata: dict[str, str] = {}
        for i, f in enumerate(self.files):
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as exc:  # safetensors raises its own error types for corrupt headers/truncation
                self.close()
                raise DistilleryError(field, str(f), f"not a readable safetensors file ({exc}).",
                                      "the file is corrupt or incomplete: download or export it again.") from exc
            self._handles.append(h)
            if i == 0:
                self.metadata = dict(h.metadata() or {})
            for k in keys:
                self._where[k] = (i, k)
        self.prefix = _common_prefix(list(self._where), prefixes)
        if self.prefix:
            self._where = {k[len(self.prefix):]: v for k, v in self._where.items() if k.startswith(self.prefix)}

    # -- mapping-like API
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _slice(self, key: str):
        try:
            i, raw = self._where[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None
        return self._handles[i].get_slice(raw)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _ST_TO_DTYPE[self._slice(key).get_dtype()]

    def nbytes(self, key: str) -> int:
        return _numel(self.shape(key)) * _element_size(self.dtype(key))

    def get(self, key: str) -> torch.Tensor:
        i, raw = self._where[key]
        return self._handles[i].get_tensor(raw)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Read only rows [start, stop) of a tensor (no full read): used for contiguous slices."""
        return self._slice(key)[start:stop]

    def metadata_value(self, key: str):
        return decode_metadata_value(self.metadata.get(key))

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self._where)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _common_prefix(keys: list[str], prefixes: tuple[str, ...]) -> str:
    if not keys:
        return ""
    # An all-in-one ComfyUI checkpoint: the DiT lives under model.diffusion_model., other models beside it.
    if "model.diffusion_model." in prefixes and any(k.startswith("model.diffusion_model.") for k in keys):
        return "model.diffusion_model."
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def load_state_dict(path: str | os.PathLike, field: str = "weights", device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor (prefix stripped) and the metadata of a safetensors model. Small models only."""
    with TensorSource(path, field) as src:
        sd = {}
        for k in src.keys():
            t = src.get(k)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            sd[k] = t.to(device)
        return sd, dict(src.metadata)
