"""Encode every training image (VAE latents) and prompt (text embeddings) once, and keep them on disk.

With the cache built, training runs only the DiT: the text encoder and VAE need not stay on the GPU (or be
loaded at all). Items live in safetensors shards (`shard-<hash>.safetensors`, up to `shard_size` items each);
each item is keyed by a hash of everything its tensors depend on:

    codec.identity, prompt_encoder.identity, the resolution settings, the image file (absolute path + size +
    mtime, or a hash of its bytes), the prompt, and the teacher-latents file when the row has one.

A prompts-only row (no image: `metadata.prompt_rows`, `read_metadata(prompts_only=True)`) stores its text alone
and, in its info, the latent shape of the resolution's fixed size.

Change any of these and the item's key changes, so it is encoded again; unchanged items are reused across runs
and across datasets sharing the cache folder. Shards are written atomically as soon as they fill, and whatever
was encoded is flushed before a stop or an error propagates, so an interrupted build resumes with only the
items not yet on disk. Seeds, steps and cfg are not in the key: they do not change the tensors and are read
from the metadata at training time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..conditioning import TextEmbeds
from ..errors import DistilleryError, StopRequested
from ..formats import decode_metadata_value, save_safetensors
from .images import Resolution, prepare_image
from .metadata import Row, check_latents_file, skip_hint

CACHE_FORMAT = "dit_distillery.cache/1"
META_KEY = "dit_distillery.cache"
SHARD_GLOB = "shard-*.safetensors"


@dataclass
class CacheReport:
    total: int                      # distinct items the rows need
    reused: int                     # already on disk
    encoded: int                    # encoded by this build
    shards_written: int = 0
    rescaled: int = 0               # items whose pixels were resized or cropped (see images.Resolution)
    skipped: int = 0                # items left out with on_error="skip" (unreadable image, bad teacher latents)
    reasons: list[str] = field(default_factory=list)
    pruned: int = 0                 # stale shards deleted with prune=True

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def file_fingerprint(path: Path, hash_contents: bool = False) -> dict:
    """How a source file enters a key: path + size + mtime (cheap), or a hash of its bytes (survives moves)."""
    if hash_contents:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"sha256": digest.hexdigest()}
    stat = path.stat()
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class LatentCache:
    """A folder of cache shards for one (codec, prompt encoder, resolution) combination.

    Opening it needs only the identity strings, not the models, so a trainer can read the cache without
    loading the VAE or the text encoder.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, codec_identity: str, encoder_identity: str,
                 resolution: Resolution, hash_contents: bool = False):
        for name, value in (("codec.identity", codec_identity), ("prompt_encoder.identity", encoder_identity)):
            if not isinstance(value, str) or not value:
                raise DistilleryError(name, value, "an empty identity cannot key the cache.",
                                      "give the codec/prompt encoder an identity naming its weights.")
        self.dir = Path(cache_dir)
        self.codec_identity, self.encoder_identity = codec_identity, encoder_identity
        self.resolution, self.hash_contents = resolution, hash_contents
        self._index: dict[str, tuple[Path, dict]] = {}
        self._handles: dict[Path, tuple] = {}  # shard -> (open safetensors handle, its tensor names)
        self.refresh()

    # -- keys and index
    def key(self, row: Row) -> str:
        try:
            parts = {
                "format": CACHE_FORMAT, "codec": self.codec_identity, "text": self.encoder_identity,
                "resolution": self.resolution.key(), "prompt": row.prompt,
                "image": None if row.image is None else file_fingerprint(row.image, self.hash_contents),
                "latents": None if row.latents is None else file_fingerprint(row.latents, self.hash_contents),
            }
        except OSError as exc:
            raise DistilleryError(f"{row.where}, image", str(row.image), f"cannot read the file ({exc.strerror}).",
                                  "check that the file exists and is readable.") from exc
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def refresh(self) -> None:
        """Re-read the shard headers (only headers: tensors are read when an item is loaded)."""
        from safetensors import safe_open

        self._index.clear()
        self._handles.clear()
        for shard in sorted(self.dir.glob(SHARD_GLOB)):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    meta = decode_metadata_value((f.metadata() or {}).get(META_KEY))
            except Exception:  # noqa: BLE001 - a foreign or damaged file is ignored; its items get re-encoded
                continue
            if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT:
                for key, info in meta.get("items", {}).items():
                    self._index[key] = (shard, info)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def info(self, key: str) -> dict:
        """Stored facts of an item: `size` [h, w] in pixels, `rescaled`, `image`; `latent_shape` [C, h, w] for a
        prompts-only item (no image: its text alone is stored)."""
        return self._index[key][1]

    def load(self, key: str) -> dict:
        """`latents` [C,h,w] float32 (None for a prompts-only item), `embeds` [L,D], `mask` [L] bool, `target_latents` [C,h,w] float32 or None,
        `trajectory` [K,C,h,w] and `trajectory_sigmas` [K] float32 or None (see `load_teacher_trajectory`)."""
        from safetensors import safe_open

        try:
            shard, _ = self._index[key]
        except KeyError:
            raise DistilleryError("cache", key, "this item is not in the cache.",
                                  "build the cache for these rows (build_cache) before training.") from None
        handle, names = self._handles.get(shard) or (None, None)
        if handle is None:  # the name set once per shard: `keys()` builds a list of every tensor name each call
            handle = safe_open(str(shard), framework="pt")
            names = set(handle.keys())
            self._handles[shard] = (handle, names)
        target, path, latents = f"{key}.target_latents", f"{key}.trajectory", f"{key}.latents"
        return {
            "latents": handle.get_tensor(latents).float() if latents in names else None,
            "embeds": handle.get_tensor(f"{key}.embeds"),
            "mask": handle.get_tensor(f"{key}.mask").bool(),
            "target_latents": handle.get_tensor(target).float() if target in names else None,
            "trajectory": handle.get_tensor(path).float() if path in names else None,
            "trajectory_sigmas": handle.get_tensor(f"{path}_sigmas").float() if path in names else None,
        }

    def cached_rows(self, rows: Iterable[Row]) -> list[Row]:
        """The rows whose item is in the cache: after a build with on_error="skip", the ones to train on."""
        kept = []
        for row in rows:
            try:
                key = self.key(row)
            except DistilleryError:  # its image is gone: it cannot be in the cache
                continue
            if key in self._index:
                kept.append(row)
        return kept

    def __getstate__(self):
        # open safetensors handles do not pickle (DataLoader workers with spawn); they reopen lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # -- building
    def build(self, rows: Iterable[Row], codec, prompt_encoder, *, batch_size: int = 8, shard_size: int = 256,
              device: str | torch.device | None = None, progress: Callable[..., None] | None = None,
              stop: Callable[[], bool] | None = None, on_error: str = "raise", prune: bool = False) -> CacheReport:
        """Encode the rows not yet cached, `batch_size` same-size images (and their prompts) per call."""
        if codec.identity != self.codec_identity or prompt_encoder.identity != self.encoder_identity:
            raise DistilleryError("codec/prompt_encoder", (codec.identity, prompt_encoder.identity),
                                  "not the models this cache was opened for.",
                                  "open the cache with these models' identities (build_cache does).")
        if self.resolution.factor % codec.spatial_factor:
            raise DistilleryError("factor", self.resolution.factor,
                                  f"not a multiple of the codec's spatial factor {codec.spatial_factor}.",
                                  f"use a multiple of {codec.spatial_factor} (times the DiT's patch size).")
        for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
            if not isinstance(value, int) or value < 1:
                raise DistilleryError(name, value, "must be an integer >= 1.", f"set {name} to 1 or more.")
        if on_error not in ("raise", "skip"):
            raise DistilleryError("on_error", on_error, "unknown mode.", "use 'raise' or 'skip'.")
        rows = list(rows)
        if not self.resolution.fixed and any(r.image is None for r in rows):
            raise DistilleryError("data.height/width", (self.resolution.height, self.resolution.width),
                                  "a prompts-only dataset has no image to size its samples by.",
                                  "give the samples' height and width (data.height/width).")

        report = CacheReport(total=0, reused=0, encoded=0)

        def bad(exc: DistilleryError) -> None:
            if on_error == "raise":
                raise skip_hint(exc) from exc.__cause__
            report.skipped += 1
            report.reasons.append(str(exc))

        todo: dict[str, Row] = {}
        live: set[str] = set()
        for row in rows:
            try:
                key = self.key(row)
            except DistilleryError as exc:
                bad(exc)
                continue
            if key in live:
                continue  # the same image and prompt twice: encoded once
            live.add(key)
            if key in self._index:
                report.reused += 1
                report.rescaled += bool(self.info(key).get("rescaled"))
            else:
                todo[key] = row
        report.total = len(live)

        done = report.reused
        finished: dict[str, dict] = {}
        pending: dict[tuple[int, int], list] = defaultdict(list)

        def tick():
            if progress is not None:
                progress(done, report.total)

        def encode(group: list) -> None:
            nonlocal done
            keys, batch_rows, pixels, flags = zip(*group)
            latents, text = encode_batch(list(pixels), [r.prompt for r in batch_rows], codec, prompt_encoder, device)
            for i, (key, row) in enumerate(zip(keys, batch_rows)):
                done += 1
                try:
                    item = {"latents": latents[i].to(torch.float32, copy=True)}  # owns its memory
                    item["embeds"], item["mask"] = unpad_text(text, i, getattr(prompt_encoder, "trims_padding", False))
                    if row.latents is not None:
                        item["target_latents"] = load_teacher_latents(row, tuple(latents[i].shape))
                        path = load_teacher_trajectory(row, tuple(latents[i].shape))
                        if path is not None:
                            item["trajectory"], item["trajectory_sigmas"] = path
                except DistilleryError as exc:
                    bad(exc)
                    continue
                h, w = pixels[i].shape[-2:]
                item["_info"] = {"size": [int(h), int(w)], "rescaled": flags[i], "image": str(row.image)}
                finished[key] = item
                report.encoded += 1
                report.rescaled += flags[i]
            tick()

        def encode_text(group: list) -> None:
            """Prompts-only rows: their text alone, and the latent shape of the fixed size."""
            nonlocal done
            keys, batch_rows = zip(*group)
            with torch.no_grad():
                text = prompt_encoder.encode([r.prompt for r in batch_rows])
            text = TextEmbeds(text.embeds.cpu(), None if text.mask is None else text.mask.cpu())
            h, w = self.resolution.height, self.resolution.width
            for i, key in enumerate(keys):
                done += 1
                embeds, mask = unpad_text(text, i, getattr(prompt_encoder, "trims_padding", False))
                finished[key] = {"embeds": embeds, "mask": mask, "_info": {
                    "size": [h, w], "rescaled": False, "image": None, "latent_shape": list(codec.latent_shape(h, w))}}
                report.encoded += 1
            tick()

        def flush(final: bool = False) -> None:
            while len(finished) >= shard_size or (final and finished):
                keys = list(finished)[:shard_size]
                self._write_shard({k: finished.pop(k) for k in keys})
                report.shards_written += 1

        tick()
        prompts_only: list = []
        try:
            for key, row in todo.items():
                if stop is not None and stop():
                    raise StopRequested(f"cache build stopped after {done} of {report.total} items")
                if row.image is None:
                    prompts_only.append((key, row))
                    if len(prompts_only) == batch_size:
                        encode_text(prompts_only)
                        prompts_only = []
                        flush()
                    continue
                try:
                    pixels, rescaled = prepare_image(row.image, self.resolution, row.where)
                    if row.latents is not None:
                        check_latents_file(row.latents, row.where)
                except DistilleryError as exc:
                    bad(exc)
                    done += 1
                    continue
                group = pending[tuple(pixels.shape[-2:])]
                group.append((key, row, pixels, rescaled))
                if len(group) == batch_size:
                    encode(pending.pop(tuple(pixels.shape[-2:])))
                    flush()
            for size in list(pending):
                encode(pending.pop(size))
                flush()
            if prompts_only:
                encode_text(prompts_only)
                flush()
        finally:
            flush(final=True)  # keep everything already encoded, also when stopping or failing
            self.refresh()
        if prune:
            report.pruned = self.prune(live)
        return report

    def _write_shard(self, items: dict[str, dict]) -> Path:
        tensors, infos = {}, {}
        for key, item in items.items():
            infos[key] = item.pop("_info")
            for name, tensor in item.items():
                tensors[f"{key}.{name}"] = tensor
        name = hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:20]
        path = self.dir / f"shard-{name}.safetensors"
        save_safetensors(tensors, path, metadata={META_KEY: {"format": CACHE_FORMAT, "items": infos,
                                                             "codec": self.codec_identity,
                                                             "text": self.encoder_identity,
                                                             "resolution": self.resolution.key()}})
        return path

    def prune(self, live: set[str]) -> int:
        """Delete shards none of whose items are in `live` (stale after prompts/images/settings changed)."""
        by_shard: dict[Path, list[str]] = defaultdict(list)
        for key, (shard, _) in self._index.items():
            by_shard[shard].append(key)
        removed = 0
        for shard, keys in by_shard.items():
            if not live.intersection(keys):
                self._handles.pop(shard, None)
                shard.unlink(missing_ok=True)
                removed += 1
        self.refresh()
        return removed


def build_cache(rows: Sequence[Row], cache_dir: str | os.PathLike, codec, prompt_encoder, resolution: Resolution,
                *, hash_contents: bool = False, **options) -> tuple[LatentCache, CacheReport]:
    """Open the cache for these models and settings and encode what is missing (`LatentCache.build` options)."""
    cache = LatentCache(cache_dir, codec_identity=codec.identity, encoder_identity=prompt_encoder.identity,
                        resolution=resolution, hash_contents=hash_contents)
    return cache, cache.build(rows, codec, prompt_encoder, **options)


# ----------------------------------------------------------------------------------------------------------
# Shared with the no-cache dataset

def encode_batch(pixels: list[torch.Tensor], prompts: list[str], codec, prompt_encoder,
                 device: str | torch.device | None = None) -> tuple[torch.Tensor, TextEmbeds]:
    """Latents [B,C,h,w] and text embeddings of same-size images and their prompts, on the CPU."""
    images = torch.stack(pixels)
    if device is not None:
        images = images.to(device)
    with torch.no_grad():
        latents = codec.encode(images).cpu()
        text = prompt_encoder.encode(list(prompts))
    mask = None if text.mask is None else text.mask.cpu()
    return latents, TextEmbeds(text.embeds.cpu(), mask)


def unpad_text(text: TextEmbeds, i: int, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's embeddings [L,D] and mask [L], cut after its last real token when `trim` (padding is rebuilt by
    collate). Encoders whose DiT reads the padding positions (`trims_padding = False`) keep them all."""
    embeds = text.embeds[i]
    if text.mask is None or not trim:
        if text.mask is not None:
            return embeds.clone(), text.mask[i].bool().clone()
        return embeds.clone(), torch.ones(embeds.shape[0], dtype=torch.bool)
    mask = text.mask[i].bool()
    used = mask.nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return embeds[:length].clone(), mask[:length].clone()  # copies: the padded batch can be freed


def load_teacher_latents(row: Row, expected: tuple[int, ...]) -> torch.Tensor:
    """The teacher's final latents for a row, as unpacked [C, h, w], checked against the image's latent shape."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(row.latents))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DistilleryError(f"{row.where}, latents", str(row.latents), f"not a readable safetensors file ({exc}).",
                              "regenerate the teacher latents for this row or leave the column blank.") from exc
    if not tensors:
        raise DistilleryError(f"{row.where}, latents", str(row.latents), "the file holds no tensor.",
                              "store the teacher's final latents as one tensor named 'latents'.")
    tensor = tensors["latents"] if "latents" in tensors else next(iter(tensors.values()))
    while tensor.dim() > 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tuple(tensor.shape) != tuple(expected):
        raise DistilleryError(f"{row.where}, latents", str(row.latents),
                              f"teacher latents have shape {tuple(tensor.shape)}, but the image encodes to "
                              f"{tuple(expected)}.", "regenerate the teacher data at this resolution with this "
                              "family's codec (unpacked [C, h, w] latents), or drop the latents column.")
    return tensor.float()


def load_teacher_trajectory(row: Row, expected: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The teacher's recorded trajectory of a row (Generate Distill Dataset's `record_trajectory`): latents
    [K, C, h, w] at sigmas [K] (decreasing), or None when its latents file holds none."""
    from safetensors import safe_open

    try:
        with safe_open(str(row.latents), framework="pt") as f:
            if "trajectory" not in f.keys():
                return None
            path, sigmas = f.get_tensor("trajectory").float(), f.get_tensor("trajectory_sigmas").float()
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DistilleryError(f"{row.where}, latents", str(row.latents), f"unreadable teacher trajectory ({exc}).",
                              "regenerate the teacher data for this row.") from exc
    if (path.dim() != 4 or tuple(path.shape[1:]) != tuple(expected) or sigmas.shape != (path.shape[0],)
            or not bool((sigmas[1:] < sigmas[:-1]).all()) or not bool(((sigmas > 0) & (sigmas <= 1)).all())):
        raise DistilleryError(f"{row.where}, latents", str(row.latents),
                              f"its trajectory {tuple(path.shape)} at sigmas {sigmas.tolist()[:4]} is not K latents "
                              f"of shape {tuple(expected)} at decreasing sigmas in (0, 1].",
                              "regenerate the teacher data at this resolution with record_trajectory.")
    return path, sigmas
