"""The framework-free adapter: (image, mask, text)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pipeline.training.adapters.base import unpack_sample


class GenericSample(NamedTuple):
    image: Image.Image  # RGB, W x H
    mask: np.ndarray  # uint8 (H, W) in {0, 1}
    text: str  # the referring expression, untouched


class GenericAdapter:
    """Framework-free triple: ``GenericSample(image, mask, text)`` (a namedtuple, so it unpacks
    as ``image, mask, text = adapter(sample)``).

    ``as_dict=True`` returns ``{"image", "mask", "text", "meta"}`` instead (meta copied from the
    sample). Images and masks are passed through unchanged (RGB PIL, uint8 {0,1} H x W).
    """

    def __init__(self, as_dict: bool = False) -> None:
        self.as_dict = bool(as_dict)

    def __call__(self, sample: dict) -> GenericSample | dict[str, Any]:
        image, mask, text, meta = unpack_sample(sample)
        if self.as_dict:
            return {"image": image, "mask": mask, "text": text, "meta": meta}
        return GenericSample(image, mask, text)

    def __repr__(self) -> str:
        return f"GenericAdapter(as_dict={self.as_dict})"
