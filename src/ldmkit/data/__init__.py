"""Training data: image-caption folders, tar shards, latent caches, and the emoji dataset builder."""

from ldmkit.data.datasets import (
    ImageCaptionDataset,
    LatentCacheDataset,
    TarShardDataset,
    Transform,
    flip_allowed,
    read_holdout,
    split_holdout,
)

__all__ = [
    "ImageCaptionDataset",
    "LatentCacheDataset",
    "TarShardDataset",
    "Transform",
    "flip_allowed",
    "read_holdout",
    "split_holdout",
]
