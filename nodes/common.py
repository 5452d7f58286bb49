"""What every node module shares: our socket types, ComfyUI's folders and runtime, safe output names, images.

ComfyUI is never imported here. Its modules are taken from `sys.modules` only, i.e. only once ComfyUI itself has
loaded them (it loads `folder_paths`, `server`, `comfy.utils` and `comfy.model_management` before any custom node).
Importing them ourselves outside a running ComfyUI would be wrong twice over: `comfy.model_management` crashes on a
CPU-only torch before ComfyUI has parsed its arguments, and `folder_paths` would point at some checkout's folders.
Without ComfyUI every helper degrades: no progress bar, `stop()` never true, no websocket events, and files go to
`$DIT_DISTILLERY_COMFY_HOME` (default: `<tmp>/dit_distillery_comfy`) with ComfyUI's layout (models/<kind>, output,
temp, input), so the nodes can be called directly (tests, scripts) and still never write outside those folders.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import torch

from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.progress import format_seconds  # noqa: F401 (used by the nodes through this module)

# ----------------------------------------------------------------------------------------------------------
# Socket types between our nodes (see nodes/README.md for what each carries).

PIPELINE = "DD_PIPELINE"  # nodes.refs.PipelineRef: where a text-to-image pipeline's weights are (+ a LoRA)
DIT = "DD_DIT"  # nodes.refs.DitRef: a DiT file (family + config)
DATASET = "DD_DATASET"  # nodes.refs.DatasetRef: a TrainJob `data` section
LOSS = "DD_LOSS"  # dict: a loss description, {"kind": "flow_matching" | "direct_distill" | "dmd" | "trajectory", ...}
LOSS_HISTORY = "DD_LOSS_HISTORY"  # dict: {"title", "history": [{"step","loss","lr"}], "eval": [{"step","eval_loss"}]}

CATEGORY = "DiT Distillery"
MODELS_CATEGORY = f"{CATEGORY}/models"
DATA_CATEGORY = f"{CATEGORY}/data"
TRAIN_CATEGORY = f"{CATEGORY}/training"
STUDENT_CATEGORY = f"{CATEGORY}/student"

NONE = "[none]"  # first entry of optional file pickers

# Websocket events (payloads documented in nodes/README.md)
TRAIN_EVENT = "dit_distillery.train"
VALIDATION_EVENT = "dit_distillery.validation"

HOME_ENV = "DIT_DISTILLERY_COMFY_HOME"


def comfy_module(name: str):
    """A ComfyUI module if ComfyUI has loaded it, else None (see the module docstring for why not import)."""
    return sys.modules.get(name)


def in_comfyui() -> bool:
    return comfy_module("folder_paths") is not None


# ----------------------------------------------------------------------------------------------------------
# Folders

def _home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path(tempfile.gettempdir()) / "dit_distillery_comfy")


def output_dir() -> Path:
    fp = comfy_module("folder_paths")
    return Path(fp.get_output_directory()) if fp else _home() / "output"


def temp_dir() -> Path:
    fp = comfy_module("folder_paths")
    return Path(fp.get_temp_directory()) if fp else _home() / "temp"


def input_dir() -> Path:
    fp = comfy_module("folder_paths")
    return Path(fp.get_input_directory()) if fp else _home() / "input"


def model_dirs(kind: str) -> list[Path]:
    """ComfyUI's folders for a model kind ("diffusion_models", "loras", "vae", "text_encoders", "diffusers")."""
    fp = comfy_module("folder_paths")
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(kind)]
        except KeyError:
            return []
    return [_home() / "models" / kind]


def model_write_dir(kind: str) -> Path:
    """Where we save a model of this kind: the folder named like the kind (ComfyUI lists models/unet first for
    diffusion_models; we write to models/diffusion_models, as the issue asks), else the first."""
    dirs = model_dirs(kind)
    if not dirs:
        raise DistilleryError("models", kind, "ComfyUI has no model folder of this kind.", "update ComfyUI.")
    return next((d for d in dirs if d.name == kind), dirs[0])


def list_models(kind: str, suffixes: tuple[str, ...] = (".safetensors",)) -> list[str]:
    """File names (relative to the kind's folders, '/'-separated) ComfyUI lists for a kind, safetensors only:
    we never read pickled weights."""
    fp = comfy_module("folder_paths")
    if fp is not None:
        try:
            names = fp.get_filename_list(kind)
        except KeyError:
            names = []
    else:
        names = [f if rel == "." else f"{rel}/{f}" for root in model_dirs(kind) for rel, files in _walk(root)
                 for f in files]
    return sorted({n for n in names if n.lower().endswith(suffixes)})


def _walk(root: Path):
    """(relative folder, file names) under `root`, following symlinked folders as ComfyUI's listings do
    (os.walk(followlinks=True)), each real folder once (a symlink loop ends)."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield Path(os.path.relpath(folder, root)).as_posix(), files


def list_diffusers_folders() -> list[str]:
    """Folders under ComfyUI's `diffusers` model folders that hold a model_index.json (as DiffusersLoader lists:
    symlinked folders followed)."""
    return sorted({rel for root in model_dirs("diffusers") for rel, files in _walk(root)
                   if "model_index.json" in files and rel != "."})


def find_model(kind: str, name: str, field: str) -> Path:
    """The full path of a model file's name (as ComfyUI's dropdowns give it) in the kind's folders (see
    `resolve_name` for what is accepted)."""
    check_relative(name, field)
    return resolve_name(name, field, model_dirs(kind), listed=lambda: list_models(kind),
                        missing=(f"not found in ComfyUI's {kind} folders ({', '.join(map(str, model_dirs(kind)))}).",
                                 f"put the file in models/{kind} and refresh the page (press R), or pick another."))


def resolve_name(name: str, field: str, roots, *, within=None, listed=None, allow_absolute: bool = False,
                 allow_parent: bool = False, kind: str | None = None, missing: tuple[str, str] | None = None) -> Path:
    """THE rule for every node field that names a file or folder to read (models, diffusers folders, prompts
    files, dataset folders and metadata): only what lies inside ComfyUI's folders for it may be read by name.

    * `..` is not accepted, nor a NUL; an absolute path only where `allow_absolute` (free-text fields whose
      tooltip has always offered it), and then only when it lies inside `within` like any other name. The one
      field relative to another folder (Dataset (Folder)'s `metadata`: DiffSynth keeps metadata_merged.csv
      beside its images folder) takes `..` (`allow_parent`), again only to a place inside `within`.
    * A relative name is looked up under each of `roots` (first match wins).
    * The match must still lie inside `within` (default: `roots`) after `os.path.realpath`, i.e. after following
      symlinks; so a symlink inside the input folder cannot lead a typed name to ~/.ssh.
    * Except a name that ComfyUI itself lists (`listed()`: the model dropdowns, DiffusersLoader's folders): those
      are followed through symlinks exactly as ComfyUI follows them, because a symlink that the machine's owner
      put in models/ (a model drive shared between installs) is how ComfyUI users keep large models. Such a
      symlink can only be made by someone who can already write to the folder; a workflow or API prompt cannot.

    `kind`: "file" or "dir" (None: either). `missing`: (problem, fix) when nothing of that name exists.
    Returns the path as found (under its root, symlinks not resolved), so ComfyUI-style identities stay stable.
    """
    text = name if isinstance(name, str) else None
    if not text or "\x00" in text or not text.strip():
        raise DistilleryError(field, name, "is not a file or folder name.", "pick or type a name.")
    parts = re.split(r"[\\/]", text)
    absolute = text.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", text)) or os.path.isabs(text)
    roots = [Path(r) for r in roots]
    within = [Path(r) for r in (within if within is not None else roots)]
    where = " or ".join(str(r) for r in within) or "ComfyUI's folders"
    if ".." in parts and not allow_parent:
        raise DistilleryError(field, name, "'..' is not accepted: only files inside ComfyUI's folders may be read "
                              f"({where}).", "put the file inside that folder and give its name there.")
    if absolute and not allow_absolute:
        raise DistilleryError(field, name, f"an absolute path is not accepted here: only names inside {where}.",
                              "put the file inside that folder and give its name relative to it.")
    candidates = [Path(text)] if absolute else [r / text for r in roots]
    real_within = [os.path.realpath(r) for r in within]
    escaped = False
    for path in candidates:
        real = os.path.realpath(path)  # checked before existence: a refusal must not tell what exists outside
        if not any(_contains(r, real) for r in real_within) and not (
                listed is not None and not absolute and _posix(text) in {_posix(n) for n in listed()}):
            escaped = True
            continue
        if path.is_file() if kind == "file" else path.is_dir() if kind == "dir" else path.exists():
            return path
    if escaped:
        how = "is outside" if absolute else "leads (through a symlink) outside"
        raise DistilleryError(field, name, f"{how} {where}; only files inside ComfyUI's folders may be read by "
                              "name.", "copy the file into that folder (a symlink that leads out is refused for "
                              "typed names).")
    problem, fix = missing or (f"not found in {where}.", "check the name, or put the file in that folder.")
    raise DistilleryError(field, name, problem, fix)


def _posix(name: str) -> str:
    return name.replace("\\", "/")


def _contains(real_root: str, real_path: str) -> bool:
    try:
        return os.path.commonpath([real_root, real_path]) == real_root
    except ValueError:  # another drive (Windows)
        return False


def inside_folders(path, roots) -> bool:
    """Whether `path` lies inside one of `roots` after following symlinks (for paths read from a file's rows)."""
    real = os.path.realpath(path)
    return any(_contains(os.path.realpath(r), real) for r in roots)


def check_relative(name: str, field: str) -> str:
    """A relative path of plain names, as ComfyUI's file pickers give (sub/folder/file.safetensors)."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) \
            or any(part in ("", ".", "..") for part in re.split(r"[\\/]", name)):
        raise DistilleryError(field, name, "not a file name inside ComfyUI's folders.", "pick a file from the list.")
    return name


_BAD_NAME = re.compile(r"[\x00-\x1f<>:\"|?*\\/]")


def safe_name(name: str, field: str, suffix: str | None = None) -> str:
    """A user-typed output name as one plain file or folder name: no separators, no '..', no absolute path,
    no characters Windows forbids. `suffix` (e.g. '.safetensors') is appended when missing."""
    if not isinstance(name, str):
        raise DistilleryError(field, name, "must be text.", "type a name such as 'my_student'.")
    name = name.strip()
    if suffix and name.lower().endswith(suffix):
        stem = name[: -len(suffix)]
    else:
        stem = name
    if not stem or stem in (".", "..") or stem.startswith(".") or _BAD_NAME.search(name) or len(name) > 120:
        raise DistilleryError(field, name, "must be one plain name (no folders, '..', ':' or \\/<>|?*, not starting "
                              "with '.', at most 120 characters): files are written only inside ComfyUI's folders.",
                              "type a name such as 'my_student'.")
    return stem + suffix if suffix else name


def path_inside(root: Path, name: str, field: str, suffix: str | None = None) -> Path:
    """`root / safe_name(name)`, checked to resolve inside `root` (a symlinked name cannot lead out either)."""
    root = Path(root)
    path = root / safe_name(name, field, suffix)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise DistilleryError(field, name, f"leads outside {root}.", "choose another name.")
    return path


def run_dir(name: str, field: str = "output_name") -> Path:
    """`output/dit_distillery/<name>`: where a training run (or dataset) of this name lives."""
    return path_inside(output_dir() / "dit_distillery", name, field)


def view_url(path: Path) -> dict | None:
    """The /view reference of a file in ComfyUI's output or temp folder ({filename, subfolder, type, url})."""
    path = Path(path)
    for kind, root in (("output", output_dir()), ("temp", temp_dir())):
        try:
            rel = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            continue
        ref = {"filename": rel.name, "subfolder": rel.parent.as_posix() if rel.parent != Path(".") else "", "type": kind}
        return {**ref, "url": "/view?" + urlencode(ref)}
    return None


# ----------------------------------------------------------------------------------------------------------
# Devices and memory

def torch_device() -> torch.device:
    """ComfyUI's compute device when running inside it, else CUDA if available, else the CPU."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        return torch.device(mm.get_torch_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_comfy_memory() -> None:
    """Unload every model ComfyUI holds (training needs the memory; ComfyUI reloads them when next used)."""
    mm = comfy_module("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Progress, cancel, messages

class Progress:
    """Bridges the core's `progress(done, total, **info)` / `stop()` to ComfyUI's ProgressBar and Cancel.

    Updating a ComfyUI ProgressBar raises `InterruptProcessingException` when the user pressed Cancel (and clears
    the flag). The core must instead see `stop()` turn true, so that it saves what must not be lost (a resumable
    checkpoint, the rows written so far) and raises `StopRequested`; so the exception is caught here, remembered,
    and re-raised by `interrupted()` once the core has stopped. Updates are throttled to `min_interval` seconds
    (the last one always goes through).
    """

    MIN_INTERVAL = 0.1  # seconds between bar updates (websocket traffic); tests set it to 0

    def __init__(self, total: int, node_id: str | None = None, min_interval: float | None = None):
        utils = comfy_module("comfy.utils")
        self.bar = utils.ProgressBar(max(1, int(total)), node_id=node_id) if utils is not None else None
        self.node_id = node_id
        self.min_interval = self.MIN_INTERVAL if min_interval is None else min_interval
        self._last = 0.0
        self._cancelled = False

    def __call__(self, done: int, total: int, **info) -> None:
        if self.bar is None or self._cancelled:
            return
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval:
            return
        self._last = now
        try:
            self.bar.update_absolute(int(done), max(1, int(total)))
        except Exception as exc:
            if not self._is_interrupt(exc):
                raise
            self._cancelled = True

    def sampler_callback(self, step: int, total: int, _preview=None) -> None:
        """For `TextToImagePipeline.sample(callback=...)`."""
        self(step, total)

    @staticmethod
    def _is_interrupt(exc: BaseException) -> bool:
        mm = comfy_module("comfy.model_management")
        return mm is not None and isinstance(exc, mm.InterruptProcessingException)

    def stop(self) -> bool:
        if self._cancelled:
            return True
        mm = comfy_module("comfy.model_management")
        return bool(mm is not None and mm.processing_interrupted())

    def interrupted(self, exc: BaseException | None = None) -> BaseException:
        """The exception that tells ComfyUI the node was cancelled (its own, so the UI shows 'interrupted')."""
        mm = comfy_module("comfy.model_management")
        if mm is None:
            return exc or StopRequested("stopped")
        if not self._cancelled:
            with contextlib.suppress(mm.InterruptProcessingException):
                mm.throw_exception_if_processing_interrupted()  # clears ComfyUI's flag, as its own nodes do
        return mm.InterruptProcessingException()


@contextlib.contextmanager
def user_errors(progress: Progress | None = None):
    """Turn what the core raises into what ComfyUI shows well: a Cancel becomes ComfyUI's interruption, running out
    of GPU memory becomes a DistilleryError that says what to change. DistilleryErrors pass unchanged."""
    try:
        yield
    except StopRequested as exc:
        if progress is None:
            raise
        raise progress.interrupted(exc) from exc
    except torch.OutOfMemoryError as exc:
        free_comfy_memory()
        raise DistilleryError("memory", "out of GPU memory", str(exc).splitlines()[0],
                              "use a smaller resolution or batch size, enable gradient checkpointing, use LoRA "
                              "instead of full training, or close other GPU work.") from exc


def send_event(event: str, data: dict) -> None:
    """A custom websocket message to the client that queued the prompt (nothing outside ComfyUI)."""
    srv = comfy_module("server")
    instance = getattr(getattr(srv, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.send_sync(event, data, instance.client_id)


def send_text(node_id: str | None, text: str) -> None:
    """Text shown on the node (`PromptServer.send_progress_text`, ComfyUI >= 0.3.4x), if available."""
    srv = comfy_module("server")
    instance = getattr(getattr(srv, "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id, instance.client_id)


def prompt_id() -> str | None:
    srv = comfy_module("server")
    instance = getattr(getattr(srv, "PromptServer", None), "instance", None)
    return getattr(instance, "last_prompt_id", None)


def downsample(points: list, limit: int = 256) -> list:
    """At most `limit` evenly spaced points, the last one always included (for websocket payloads)."""
    if len(points) <= limit:
        return list(points)
    stride = len(points) / (limit - 1)
    return [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]


def output_connected(prompt: dict | None, node_id: str | None, slot: int) -> bool:
    """Whether any node of the queued prompt reads output `slot` of `node_id` (True when unknown)."""
    if not isinstance(prompt, dict) or node_id is None:
        return True
    for other in prompt.values():
        for value in (other.get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(node_id) and value[1] == slot:
                return True
    return False


# ----------------------------------------------------------------------------------------------------------
# Images: ComfyUI's IMAGE is [B, H, W, 3] float in [0, 1]

def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Our [B, 3, H, W] in [-1, 1] -> ComfyUI IMAGE."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def pil_to_image(images) -> torch.Tensor:
    """PIL images -> one ComfyUI IMAGE batch (smaller images are padded white to the largest)."""
    import numpy as np

    images = [im.convert("RGB") for im in images]
    h = max(im.height for im in images)
    w = max(im.width for im in images)
    out = torch.ones(len(images), h, w, 3)
    for i, im in enumerate(images):
        out[i, : im.height, : im.width] = torch.from_numpy(np.asarray(im).astype("float32") / 255.0)
    return out


def image_to_pil(image: torch.Tensor) -> list:
    """ComfyUI IMAGE -> PIL images."""
    from PIL import Image

    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a[..., :3]) for a in arr]


def text_image(text: str, width: int = 256, height: int = 64) -> torch.Tensor:
    """A small IMAGE that says something (e.g. why there is no validation image)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (235, 235, 235))
    ImageDraw.Draw(im).multiline_text((8, 8), text, fill=(60, 60, 60))
    return pil_to_image([im])


def stat_key(*paths) -> str:
    """Size and mtime of files (for IS_CHANGED: a changed file on disk re-runs the node, an unchanged one never)."""
    parts = []
    for p in paths:
        if p is None:
            continue
        try:
            st = Path(p).stat()
            parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{p}:missing")
    return "|".join(parts)


def lines(text: str) -> list[str]:
    """Non-empty stripped lines of a multiline widget."""
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def int_list(text: str, field: str) -> list[int]:
    """'0, 1, 2' -> [0, 1, 2]."""
    try:
        return [int(v) for v in re.split(r"[,\s]+", str(text).strip()) if v]
    except ValueError:
        raise DistilleryError(field, text, "not a list of whole numbers.", "write e.g. '0, 1, 2'.") from None
