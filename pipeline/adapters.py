"""`pipeline.adapters` is where users import the trainer adapters from: they live in
pipeline.training.adapters now (one module per trainer). Re-exports only; the objects are the
same (``pipeline.adapters.get_adapter is pipeline.training.adapters.get_adapter``).
"""

from pipeline.training.adapters import (
    ADAPTERS,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AdaptedDataset,
    Adapter,
    AdapterInputError,
    CrisAdapter,
    GenericAdapter,
    GenericSample,
    LavtAdapter,
    RelaAdapter,
    UnknownAdapterError,
    bert_encode_padded,
    binary_mask,
    clip_tokenize,
    cris_transform_mat,
    cv2_warp_affine,
    get_adapter,
)

__all__ = [
    "ADAPTERS",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Adapter",
    "AdaptedDataset",
    "AdapterInputError",
    "CrisAdapter",
    "GenericAdapter",
    "GenericSample",
    "LavtAdapter",
    "RelaAdapter",
    "UnknownAdapterError",
    "bert_encode_padded",
    "binary_mask",
    "clip_tokenize",
    "cris_transform_mat",
    "cv2_warp_affine",
    "get_adapter",
]
