"""Training data: image-caption folders, WebDataset tar shards, the latent cache, and the emoji dataset builder."""

from ldmkit.data.datasets import (
    ImageCaptionDataset,
    Transform,
    choose_holdout,
    encode_in_batches,
    flip_allowed,
    load_image,
    read_holdout,
    split_holdout,
)
from ldmkit.data.shards import ShardStream, list_shards, write_shards

__all__ = [
    "ImageCaptionDataset",
    "ShardStream",
    "Transform",
    "choose_holdout",
    "encode_in_batches",
    "flip_allowed",
    "list_shards",
    "load_image",
    "read_holdout",
    "split_holdout",
    "write_shards",
]
