"""Torch datasets of training items, from the latent/text cache or encoded on the fly, and their collate.

An item is a dict: `latents` [C,h,w] float32 (None for a prompts-only row: no image), `latent_shape` (C, h, w),
`text` (embeds [L,D], mask [L] bool), `prompt`, `seed`,
`rand_device`, `num_inference_steps`, `cfg_scale`, `teacher_steps`, `teacher_cfg`, `target_latents`
([C,h,w] float32 or None), `trajectory` / `trajectory_sigmas` (the teacher's recorded trajectory, [K,C,h,w] /
[K], or None), `size` (h, w) in pixels, `row` and `where` (to name the sample in messages).
`collate` stacks a batch and pads the prompts to the longest one as a `conditioning.TextEmbeds`; a batch of
prompts-only rows has `latents` None and their `latent_shape` (what a loss needing prompts only samples at).

`repeat` behaves as DiffSynth's `--dataset_repeat`: item i is row `i % len(rows)`. `sizes` lists every item's
pixel size for `BucketBatchSampler`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..conditioning import TextEmbeds
from ..errors import DistilleryError
from .cache import LatentCache, encode_batch, load_teacher_latents, load_teacher_trajectory, unpad_text
from .images import Resolution, image_size, prepare_image
from .metadata import Row


def _check_repeat(repeat) -> int:
    if not isinstance(repeat, int) or repeat < 1:
        raise DistilleryError("repeat", repeat, "must be an integer >= 1.", "use 1 to see each sample once per epoch.")
    return repeat


def _item(row: Row, latents, embeds, mask, target, size, trajectory=None, latent_shape=None) -> dict:
    path, sigmas = trajectory if trajectory is not None else (None, None)
    shape = tuple(latents.shape) if latents is not None else tuple(latent_shape)
    return {"latents": latents, "latent_shape": shape, "text": (embeds, mask), "prompt": row.prompt, "seed": row.seed,
            "rand_device": row.rand_device, "num_inference_steps": row.num_inference_steps,
            "cfg_scale": row.cfg_scale, "teacher_steps": row.teacher_steps, "teacher_cfg": row.teacher_cfg,
            "target_latents": target, "trajectory": path, "trajectory_sigmas": sigmas, "size": tuple(size),
            "row": row.row, "where": row.where}


class CachedDataset(torch.utils.data.Dataset):
    """Items read from a `LatentCache`; every row must have been cached (build_cache) first."""

    def __init__(self, rows: Sequence[Row], cache: LatentCache, repeat: int = 1):
        self.rows = list(rows)
        self.repeat = _check_repeat(repeat)
        self.cache = cache
        self.keys = [cache.key(r) for r in self.rows]
        missing = [r for r, k in zip(self.rows, self.keys) if k not in cache]
        if missing:
            raise DistilleryError("cache", str(cache.dir), f"{len(missing)} of {len(self.rows)} rows are not cached "
                                  f"(first: {missing[0].where}); their image, prompt or the settings changed.",
                                  "build the cache for these rows (build_cache) before training.")
        self._sizes = [tuple(cache.info(k)["size"]) for k in self.keys]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return self._sizes * self.repeat

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, index: int) -> dict:
        i = index % len(self.rows)
        item = self.cache.load(self.keys[i])
        trajectory = None if item.get("trajectory") is None else (item["trajectory"], item["trajectory_sigmas"])
        return _item(self.rows[i], item["latents"], item["embeds"], item["mask"], item["target_latents"],
                     self._sizes[i], trajectory, self.cache.info(self.keys[i]).get("latent_shape"))


class EncodingDataset(torch.utils.data.Dataset):
    """No-cache mode: each item is encoded when it is read (simple, but the VAE and text encoder stay loaded
    and every epoch pays for encoding again). Use `num_workers=0`: the models live in the main process."""

    def __init__(self, rows: Sequence[Row], codec, prompt_encoder, resolution: Resolution, repeat: int = 1,
                 device: str | torch.device | None = None):
        if resolution.factor % codec.spatial_factor:
            raise DistilleryError("factor", resolution.factor,
                                  f"not a multiple of the codec's spatial factor {codec.spatial_factor}.",
                                  f"use a multiple of {codec.spatial_factor} (times the DiT's patch size).")
        self.rows = list(rows)
        self.repeat = _check_repeat(repeat)
        self.codec, self.prompt_encoder, self.resolution, self.device = codec, prompt_encoder, resolution, device
        # sizes from the file headers only, so buckets can be formed without decoding every image
        if not resolution.fixed and any(r.image is None for r in self.rows):
            raise DistilleryError("data.height/width", None, "a prompts-only dataset has no image to size its "
                                  "samples by.", "give the samples' height and width (data.height/width).")
        self._sizes = [(resolution.height, resolution.width) if r.image is None else
                       resolution.size_for(*image_size(r.image, r.where)) for r in self.rows]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return self._sizes * self.repeat

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index % len(self.rows)]
        if row.image is None:  # prompts only: the text, and the latent shape of the fixed size
            with torch.no_grad():
                text = self.prompt_encoder.encode([row.prompt])
            text = TextEmbeds(text.embeds.cpu(), None if text.mask is None else text.mask.cpu())
            embeds, mask = unpad_text(text, 0, getattr(self.prompt_encoder, "trims_padding", False))
            size = (self.resolution.height, self.resolution.width)
            return _item(row, None, embeds, mask, None, size, latent_shape=self.codec.latent_shape(*size))
        pixels, _ = prepare_image(row.image, self.resolution, row.where)
        latents, text = encode_batch([pixels], [row.prompt], self.codec, self.prompt_encoder, self.device)
        embeds, mask = unpad_text(text, 0, getattr(self.prompt_encoder, "trims_padding", False))
        target = None if row.latents is None else load_teacher_latents(row, tuple(latents[0].shape))
        trajectory = None if row.latents is None else load_teacher_trajectory(row, tuple(latents[0].shape))
        return _item(row, latents[0].float(), embeds, mask, target, pixels.shape[-2:], trajectory)


def collate(items: list[dict]) -> dict:
    """Stack same-size items; pad the prompts to the longest (mask False on padding) into a `TextEmbeds`."""
    sizes = {tuple(it["latent_shape"]) for it in items}
    if len(sizes) > 1:
        raise DistilleryError("batch", sorted(sizes), "samples of different sizes cannot share a batch.",
                              "use BucketBatchSampler (same-size batches), a fixed height/width, or batch size 1.")
    targets = [it["target_latents"] for it in items]
    if any(t is None for t in targets) and not all(t is None for t in targets):
        where = [it["where"] for it in items if it["target_latents"] is None]
        raise DistilleryError("latents", where, "some rows of this batch have teacher latents and others do not.",
                              "give every row a latents file, or none.")
    text = TextEmbeds.cat([TextEmbeds(it["text"][0][None], it["text"][1][None]) for it in items])
    images = [it["latents"] for it in items]
    if any(x is None for x in images) and not all(x is None for x in images):
        raise DistilleryError("batch", [it["where"] for it in items], "rows with images and prompts-only rows "
                              "cannot share a batch.", "use one kind of dataset.")
    batch = {"latents": None if images[0] is None else torch.stack(images), "latent_shape": next(iter(sizes)),
             "text": text,
             "target_latents": None if targets[0] is None else torch.stack(targets),
             "trajectory": None, "trajectory_sigmas": None}
    paths = [it.get("trajectory") for it in items]
    if any(p is not None for p in paths):  # the Trajectory loss refuses a batch without them, naming the rows
        if len({None if p is None else tuple(p.shape) for p in paths}) > 1:
            raise DistilleryError("latents", [it["where"] for it in items], "the rows of this batch recorded "
                                  "different teacher trajectories (or some none).",
                                  "use one Generate Distill Dataset folder made with one record_trajectory.")
        batch["trajectory"] = torch.stack(paths)
        batch["trajectory_sigmas"] = torch.stack([it["trajectory_sigmas"] for it in items])
    for name in ("prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale", "teacher_steps",
                 "teacher_cfg", "size", "row", "where"):
        batch[name] = [it[name] for it in items]
    return batch
