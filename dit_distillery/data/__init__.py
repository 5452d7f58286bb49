"""Training data: DiffSynth-format metadata, image sizing, aspect buckets, the latent/text cache, synthetic shapes.

    metadata  -> rows (files resolved, numbers checked)      read_metadata
    images    -> DiffSynth's crop-and-resize, [-1, 1] tensors Resolution, prepare_image
    cache     -> latents + text embeddings on disk, once      build_cache, LatentCache
    dataset   -> torch datasets over the cache (or on the fly) CachedDataset, EncodingDataset, collate
    buckets   -> same-size, resumable, sharded batches        BucketBatchSampler
    synthetic -> the built-in shapes dataset + its classifier write_dataset, classify_image
"""

from .buckets import BucketBatchSampler
from .cache import CacheReport, LatentCache, build_cache
from .dataset import CachedDataset, EncodingDataset, collate
from .images import Resolution, crop_and_resize, load_image, prepare_image, to_tensor
from .metadata import Metadata, Row, read_metadata
from .synthetic import COLOURS, SHAPES, classify_image, generate_samples, write_dataset

__all__ = [
    "BucketBatchSampler", "CacheReport", "LatentCache", "build_cache", "CachedDataset", "EncodingDataset",
    "collate", "Resolution", "crop_and_resize", "load_image", "prepare_image", "to_tensor", "Metadata", "Row",
    "read_metadata", "COLOURS", "SHAPES", "classify_image", "generate_samples", "write_dataset",
]
