"""Latent/text cache (reuse, invalidation, resume, batching) and the datasets + collate built on it.

The codec and prompt encoder are small local fakes with the `codecs.Codec` / `text.PromptEncoder` surface: a
space-to-depth "VAE" and a hashing word embedder, both counting how much they encoded.
"""

import os
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dit_distillery.conditioning import TextEmbeds
from dit_distillery.data import (BucketBatchSampler, CachedDataset, EncodingDataset, LatentCache, Resolution,
                                 build_cache, collate, prepare_image, read_metadata, write_dataset)
from dit_distillery.errors import DistilleryError, StopRequested
from dit_distillery.formats import save_safetensors


class SpaceToDepthCodec:
    latent_channels, spatial_factor = 12, 2

    def __init__(self, identity="s2d:v1", dtype=torch.bfloat16):
        self.identity, self.dtype = identity, dtype
        self.calls = self.items = 0

    def encode(self, images):
        assert images.dim() == 4 and images.min() >= -1 and images.max() <= 1
        self.calls += 1
        self.items += images.shape[0]
        return F.pixel_unshuffle(images, self.spatial_factor).to(self.dtype)

    def decode(self, latents):
        return F.pixel_shuffle(latents.float(), self.spatial_factor)


class HashingPromptEncoder:
    identity, dim = "hash-words:8", 8
    trims_padding = True  # its "DiT" masks padding, so the cache may drop it (as for Qwen-Image)

    def __init__(self):
        self.calls = self.prompts = 0

    def word(self, w):
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))

    def encode(self, prompts):
        self.calls += 1
        self.prompts += len(prompts)
        words = [p.split() for p in prompts]
        length = max(len(w) for w in words) + 2  # padded a little beyond the longest, as tokenizers do
        embeds, mask = torch.zeros(len(prompts), length, self.dim), torch.zeros(len(prompts), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                embeds[i, j], mask[i, j] = self.word(w), True
        return TextEmbeds(embeds, mask)


@pytest.fixture
def dataset(tmp_path):
    """6 synthetic 32x32 images, 2 larger ones (so dynamic resolution gives two buckets)."""
    base = tmp_path / "data"
    write_dataset(base, 6, seed=1)
    with open(base / "metadata.csv", "a", encoding="utf-8") as f:
        for i in range(2):
            Image.new("RGB", (64, 40), (20 * i, 200, 30)).save(base / f"wide{i}.png")
            f.write(f"wide{i}.png,a wide green field number {i},,,\n")
    return base


def models(identity="s2d:v1", dtype=torch.bfloat16):
    return SpaceToDepthCodec(identity, dtype), HashingPromptEncoder()


RES = Resolution(max_pixels=4096, factor=16)


def build(base, cache_dir, res=RES, identity="s2d:v1", dtype=torch.bfloat16, **options):
    codec, text = models(identity, dtype)
    cache, report = build_cache(read_metadata(base).rows, cache_dir, codec, text, res, **options)
    return cache, report, codec, text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_build_batches_then_reuses(dataset, tmp_path, dtype):
    seen = []
    cache, report, codec, text = build(dataset, tmp_path / "cache", dtype=dtype, batch_size=4, shard_size=3,
                                       progress=lambda done, total: seen.append((done, total)))
    assert (report.total, report.reused, report.encoded) == (8, 0, 8)
    assert codec.items == 8 and codec.calls == 3      # batched per size: 32x32 x (4 + 2), 64x32 (wide, cropped) x 2
    assert text.calls == 3 and report.rescaled == 2   # the 64x40 images were cropped to 32x64
    assert report.shards_written == len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 3
    assert seen[0] == (0, 8) and seen[-1] == (8, 8)
    assert not list((tmp_path / "cache").glob("*.tmp"))

    again, report2, codec2, text2 = build(dataset, tmp_path / "cache", dtype=dtype)
    assert (report2.reused, report2.encoded, codec2.calls, text2.calls) == (8, 0, 0, 0)  # nothing encoded
    key = cache.key(read_metadata(dataset)[7])
    assert cache.info(key)["size"] == [32, 64] and again.load(key)["latents"].dtype == torch.float32


def test_invalidation_per_key_part(dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    build(dataset, cache_dir)
    # changed prompt: that row only
    meta = dataset / "metadata.csv"
    meta.write_text(meta.read_text().replace("a wide green field number 0", "a wide green meadow"))
    assert build(dataset, cache_dir)[2].items == 1
    # changed image (same name, new pixels and mtime): that row only
    Image.new("RGB", (64, 40), (250, 250, 0)).save(dataset / "wide1.png")
    stat = os.stat(dataset / "wide1.png")
    os.utime(dataset / "wide1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert build(dataset, cache_dir)[2].items == 1
    assert build(dataset, cache_dir)[2].items == 0
    # changed resolution settings or codec identity: everything
    assert build(dataset, cache_dir, res=Resolution(max_pixels=1024, factor=16))[2].items == 8
    assert build(dataset, cache_dir, identity="s2d:v2")[2].items == 8
    assert build(dataset, cache_dir)[2].items == 0  # the earlier entries are still there


def test_resume_after_interruption(dataset, tmp_path):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 5  # stop while preparing the 6th row

    with pytest.raises(StopRequested):
        build(dataset, tmp_path / "cache", batch_size=2, shard_size=2, stop=stop)
    cache = LatentCache(tmp_path / "cache", codec_identity="s2d:v1", encoder_identity=HashingPromptEncoder.identity,
                        resolution=RES)
    kept = len(cache)
    assert 0 < kept < 8 and not list((tmp_path / "cache").glob("*.tmp"))
    _, report, codec, _ = build(dataset, tmp_path / "cache", batch_size=2, shard_size=2)
    assert report.reused == kept and codec.items == report.encoded == 8 - kept  # only the rest is computed


def test_error_keeps_finished_items_and_skip_mode(dataset, tmp_path):
    (dataset / "wide1.png").write_bytes(b"not a png")
    with pytest.raises(DistilleryError, match=r"metadata\.csv line 9, image.*not a readable image"):
        build(dataset, tmp_path / "cache", batch_size=1)
    _, report, codec, _ = build(dataset, tmp_path / "cache", on_error="skip")
    assert report.skipped == 1 and "line 9" in report.reasons[0] and codec.items == 0  # the 7 were kept


def test_cached_items_and_collate(dataset, tmp_path):
    cache, _, _, text = build(dataset, tmp_path / "cache")
    rows = read_metadata(dataset).rows
    ds = CachedDataset(rows, cache, repeat=2)
    assert len(ds) == 16 and ds.sizes[:8] == ds.sizes[8:] and ds.sizes.count((32, 64)) == 4
    item = ds[9]
    pixels, _ = prepare_image(rows[1].image, RES)
    assert item["latents"].dtype == torch.float32 and item["latents"].shape == (12, 16, 16)
    assert torch.equal(item["latents"], F.pixel_unshuffle(pixels[None], 2)[0].to(torch.bfloat16).float())
    embeds, mask = item["text"]
    words = rows[1].prompt.split()
    assert embeds.shape == (len(words), 8) and mask.all() and torch.equal(embeds[0], text.word(words[0]))
    assert item["prompt"] == rows[1].prompt and item["size"] == (32, 32) and item["target_latents"] is None
    assert item["rand_device"] == "cpu" and item["seed"] is None and item["where"] == "metadata.csv line 3"

    sampler = BucketBatchSampler(ds.sizes, batch_size=3, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["prompt"]) for b in batches) == 16
    for batch in batches:
        lengths = [len(p.split()) for p in batch["prompt"]]
        assert isinstance(batch["text"], TextEmbeds) and batch["text"].embeds.shape[1] == max(lengths)
        assert batch["text"].mask.sum(1).tolist() == lengths  # padding masked out
        assert batch["latents"].shape[0] == len(lengths) and batch["target_latents"] is None
    with pytest.raises(DistilleryError, match="different sizes"):
        collate([ds[0], ds[6]])


def test_teacher_latents_are_cached_and_checked(dataset, tmp_path):
    target = torch.randn(12, 16, 16)
    save_safetensors({"latents": target[None]}, dataset / "t0.safetensors")   # a batch dim is accepted
    save_safetensors({"latents": torch.randn(12, 8, 8)}, dataset / "bad.safetensors")
    rows = "image,prompt,seed,rand_device,num_inference_steps,cfg_scale,teacher_steps,teacher_cfg,latents\n"
    (dataset / "distill.csv").write_text(rows + "00000.png,a,0,cpu,4,1,40,4,t0.safetensors\n"
                                                "00001.png,b,1,cpu,4,1,40,4,bad.safetensors\n")
    meta = read_metadata(dataset, dataset / "distill.csv")
    codec, text = models()
    with pytest.raises(DistilleryError, match=r"distill\.csv line 3, latents.*shape \(12, 8, 8\).*\(12, 16, 16\)"):
        build_cache(meta.rows, tmp_path / "cache", codec, text, RES)
    cache, report = build_cache(meta.rows[:1], tmp_path / "cache", codec, text, RES)
    item = CachedDataset(meta.rows[:1], cache)[0]
    assert torch.equal(item["target_latents"], target)
    assert (item["seed"], item["num_inference_steps"], item["cfg_scale"], item["teacher_steps"]) == (0, 4, 1.0, 40)
    batch = collate([item, item])
    assert batch["target_latents"].shape == (2, 12, 16, 16) and batch["seed"] == [0, 0]
    save_safetensors({"latents": target}, dataset / "t0.safetensors")  # rewritten: the key changes
    with pytest.raises(DistilleryError, match="1 of 1 rows are not cached"):
        CachedDataset(meta.rows[:1], cache)


def test_encoding_dataset_matches_cache(dataset, tmp_path):
    rows = read_metadata(dataset).rows
    cache, _, _, _ = build(dataset, tmp_path / "cache")
    cached = CachedDataset(rows, cache)
    codec, text = models()
    live = EncodingDataset(rows, codec, text, RES)
    assert live.sizes == cached.sizes
    for i in (0, 7):
        a, b = cached[i], live[i]
        assert torch.equal(a["latents"], b["latents"]) and a["size"] == b["size"]
        assert torch.equal(a["text"][0], b["text"][0]) and torch.equal(a["text"][1], b["text"][1])
    assert codec.items == 2


def test_bad_cache_arguments(dataset, tmp_path):
    rows = read_metadata(dataset).rows
    codec, text = models("")
    with pytest.raises(DistilleryError, match="empty identity"):
        build_cache(rows, tmp_path / "c", codec, text, RES)
    codec = SpaceToDepthCodec()
    codec.spatial_factor = 32
    with pytest.raises(DistilleryError, match="spatial factor 32"):
        build_cache(rows, tmp_path / "c", codec, text, RES)
    cache, _, _, _ = build(dataset, tmp_path / "c")
    with pytest.raises(DistilleryError, match="not the models"):
        cache.build(rows, SpaceToDepthCodec("other"), text)


def test_prune_removes_only_stale_shards(dataset, tmp_path):
    cache_dir = tmp_path / "cache"
    build(dataset, cache_dir, shard_size=100)
    build(dataset, cache_dir, identity="s2d:v2", shard_size=100)
    assert len(list(Path(cache_dir).glob("shard-*"))) == 2
    _, report, codec, _ = build(dataset, cache_dir, prune=True)
    assert report.pruned == 1 and codec.items == 0 and len(list(Path(cache_dir).glob("shard-*"))) == 1


def test_padding_is_kept_for_encoders_whose_dit_reads_it(dataset, tmp_path):
    """AAADiT attends to Qwen3's padding states: the cache must hand back exactly what the encoder produced."""
    codec, encoder = models()
    encoder.trims_padding = False
    rows = read_metadata(dataset)
    cache, _ = build_cache(list(rows), tmp_path / "cache", codec, encoder, Resolution(32, 32))
    item = CachedDataset(list(rows), cache)[0]
    full = encoder.encode([rows[0].prompt])
    assert item["text"][0].shape == full.embeds[0].shape and torch.equal(item["text"][0], full.embeds[0])
