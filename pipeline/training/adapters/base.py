"""What every trainer adapter shares: the protocol, the errors, and the sample checks.

An adapter turns one :class:`pipeline.training.dataset.NemoDataset` sample dict::

    image      PIL.Image (RGB, W x H)          mask      np.uint8 (H, W) in {0, 1}
    sentence   str                             meta      {sent_id, ref_id, image_id, split,
    hard_negatives / hard_negative_kinds              no_target, index, epoch, is_mosaic, ...}

into exactly what a given trainer's own dataset returns; :func:`unpack_sample` validates the
sample and normalises the mask the same way for all of them, and :func:`hard_negatives_of` pads
the hard negatives of the adapters that return them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from pipeline.errors import ConfigError, InputError


@runtime_checkable
class Adapter(Protocol):
    """Anything that maps one NemoDataset sample dict to a trainer's native sample."""

    def __call__(self, sample: dict) -> Any: ...


class UnknownAdapterError(ConfigError, ValueError):
    """``get_adapter`` was given a name that is not in :data:`ADAPTERS`."""


class AdapterInputError(InputError, ValueError):
    """A sample dict that does not look like a NemoDataset sample."""


def unpack_sample(sample: Mapping[str, Any]) -> tuple[Image.Image, np.ndarray, str, dict]:
    """Validate a NemoDataset sample; returns (RGB PIL image, uint8 {0,1} mask, text, meta)."""
    try:
        image, mask, text = sample["image"], sample["mask"], sample["sentence"]
    except (KeyError, TypeError) as exc:
        raise AdapterInputError(
            f"adapter input must be a NemoDataset sample dict with 'image', 'mask' and "
            f"'sentence' keys (got {type(sample).__name__} missing {exc}). Adapters need the "
            "dataset's PIL output: do not combine them with NemoDataset(transform=...)."
        ) from None
    if not isinstance(image, Image.Image):
        raise AdapterInputError(
            f"sample['image'] must be a PIL.Image, got {type(image).__name__} (adapters do "
            "their trainer's own resizing/normalisation: build NemoDataset without transform=)."
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    mask = np.asarray(mask)
    if mask.shape != (image.height, image.width):
        raise AdapterInputError(
            f"sample['mask'] has shape {mask.shape}, expected (H, W) = "
            f"{(image.height, image.width)} of sample['image']"
        )
    if not isinstance(text, str):
        raise AdapterInputError(f"sample['sentence'] must be a str, got {type(text).__name__}")
    return image, binary_mask(mask), text, dict(sample.get("meta") or {})


def raw_text(sample: Mapping[str, Any], sentence: str) -> str:
    """The sentence as written (``raw_sentence``: REFER's ``raw``, or a view as generated),
    which the BERT trainers tokenize; ``sentence`` when the sample has none (older shards)."""
    raw = sample.get("raw_sentence")
    return raw if isinstance(raw, str) and raw.strip() else sentence


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """A user's mask as uint8 {0, 1}, whatever form it comes in.

    Masks reach adapters as NemoDataset's {0, 1} uint8, but also as 0/255 PNG arrays, bool
    arrays or float probabilities; every trainer's own code expects a hard {0, 1} target (CRIS
    scales a 0/255 mask by 1/255 itself, so a {0, 1} mask left as 0/255 would peak at 0.0039).
    bool and integer masks: nonzero is foreground. Float masks must lie in [0, 1] (a soft mask):
    >= 0.5 is foreground; anything else (NaN, 0..255 floats) is refused rather than guessed.
    """
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all() or mask.min(initial=0.0) < 0 or mask.max(initial=0.0) > 1:
            raise AdapterInputError(
                "sample['mask'] is a float array outside [0, 1] (or not finite): pass a {0, 1} "
                "or 0/255 integer mask, a bool mask, or float probabilities in [0, 1]")
        return (mask >= 0.5).astype(np.uint8)
    if mask.dtype.kind not in "biu":
        raise AdapterInputError(f"sample['mask'] has dtype {mask.dtype}: pass a bool, integer or "
                                "float mask")
    return (mask != 0).astype(np.uint8)


def is_no_target(meta: Mapping[str, Any], mask01: np.ndarray) -> bool:
    """The sample's no-target flag, or an empty mask when it has none (a hand-made sample)."""
    flag = meta.get("no_target")
    return (not mask01.any()) if flag is None else bool(flag)



def hard_negatives_of(sample: Mapping[str, Any], n: int) -> tuple[list[str], list[bool]]:
    """The sample's hard-negative texts padded with "" to exactly `n`, and which are real.

    Padding with a text (rather than zeros) keeps every padded entry a well-formed encoding
    (a [CLS] [SEP] or sot/eot pair), so a text encoder never sees an empty attention row; the
    validity mask says what to ignore. More than `n` negatives is an error, not a silent cut:
    the adapter's `hard_negatives` must be at least the dataset's `n_hard_negatives`.
    """
    texts = sample.get("hard_negatives") or []
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise AdapterInputError("sample['hard_negatives'] must be a list of str")
    if len(texts) > n:
        raise AdapterInputError(
            f"the sample has {len(texts)} hard negatives but the adapter pads to {n}: build it "
            f"with hard_negatives >= NemoDataset's n_hard_negatives ({len(texts)} or more)")
    return [*texts, *[""] * (n - len(texts))], [True] * len(texts) + [False] * (n - len(texts))


def check_hard_negatives(n: int, training: bool, adapter: str) -> int:
    """The `hard_negatives` option of an adapter: a count >= 0, only in a training mode (the
    dataset gives negatives to training samples only)."""
    n = int(n)
    if n < 0:
        raise ValueError(f"hard_negatives must be >= 0, got {n}")
    if n and not training:
        raise ValueError(f"{adapter}: hard negatives are training material; use them with the "
                         "training mode, or pass hard_negatives=0")
    return n
