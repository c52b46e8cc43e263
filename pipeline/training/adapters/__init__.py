"""Trainer adapters: turn a :class:`pipeline.training.dataset.NemoDataset` sample into exactly what
a given referring-segmentation trainer's own dataset returns, so NeMo data can be swapped in
without touching the model or training-loop code.

Adapters (``get_adapter(name, **options)``; ``ADAPTERS`` maps each name to its class), one module
per trainer::

    generic  (image, mask, text) namedtuple          -> :class:`GenericAdapter`   generic.py
    cris     CRIS   utils/dataset.py RefDataset       -> :class:`CrisAdapter`      cris.py
    lavt     LAVT   data/dataset_refer_bert.py         -> :class:`LavtAdapter`      lavt.py
    rela     ReLA   RefCOCOMapper (gRefCOCO, GRES)     -> :class:`RelaAdapter`      rela.py

and what they share: ``base.py`` (protocol, errors, sample checks), ``bert.py`` (LAVT and ReLA's
tokenizer and id padding), ``cv2_warp.py`` (the numpy port of OpenCV's warpAffine CRIS needs),
``detectron2_compat.py`` (an ``Instances`` stand-in for ReLA when detectron2 is absent).

Every adapter is a plain picklable callable (DataLoader workers), deterministic (the trainers'
own randomness is only *which* sentence of a ref to use; NeMo already picked it). None of these
trainers reads hard negatives, so by default their output is exactly the trainer's; with
``hard_negatives=N`` the ``cris``, ``lavt`` and ``rela`` adapters add the sample's hard negatives,
each encoded the way that trainer encodes its positive sentence, padded to N, with a validity mask
(``neg_valid``), for a C3*-style loss (one positive, N negatives, mask: see the README).
Tokenizers are loaded lazily on the first call, so building an adapter never touches the network.
Heavy imports (open_clip, transformers, torchvision) happen inside functions only. Each class
docstring names the upstream file and commit it reproduces and lists every known deviation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline.training.adapters.base import (
    Adapter,
    AdapterInputError,
    UnknownAdapterError,
    binary_mask,
)
from pipeline.training.adapters.bert import bert_encode_padded
from pipeline.training.adapters.cris import (
    CLIP_MEAN,
    CLIP_STD,
    CrisAdapter,
    clip_tokenize,
    cris_transform_mat,
)
from pipeline.training.adapters.cv2_warp import cv2_warp_affine
from pipeline.training.adapters.generic import GenericAdapter, GenericSample
from pipeline.training.adapters.lavt import IMAGENET_MEAN, IMAGENET_STD, LavtAdapter
from pipeline.training.adapters.rela import RelaAdapter

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


ADAPTERS: dict[str, Callable[..., Adapter]] = {
    "generic": GenericAdapter,
    "cris": CrisAdapter,
    "lavt": LavtAdapter,
    "rela": RelaAdapter,
}


def get_adapter(name: str, **options: Any) -> Adapter:
    """The adapter called ``name`` (case-insensitive), built with ``options``.

    Raises :class:`UnknownAdapterError` (a ``ValueError``) naming the available adapters.
    """
    key = str(name).strip().lower()
    if key not in ADAPTERS:
        raise UnknownAdapterError(
            f"unknown adapter {name!r}; available adapters: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[key](**options)


def _takes(name: str, option: str) -> bool:
    import inspect

    cls = ADAPTERS.get(str(name).strip().lower())
    return cls is not None and option in inspect.signature(cls).parameters


class AdaptedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` passed through ``adapter``: drop-in for a trainer's own Dataset.

    ``adapter`` is an :class:`Adapter` or a name for :func:`get_adapter` (then ``options``,
    which may include the adapter's own ``dataset=``; without it an adapter that takes one is
    given the shards' dataset name, ``dataset.dataset_name``).
    ``set_epoch`` is forwarded when the wrapped dataset has it (NemoDataset does).
    """

    def __init__(self, dataset: Any, adapter: Adapter | str, /, **options: Any) -> None:
        self.dataset = dataset
        if isinstance(adapter, str):
            # an adapter whose defaults depend on the dataset (CRIS: 22 tokens for G-Ref, 17
            # otherwise) learns it from the shards when the caller did not say
            name = getattr(dataset, "dataset_name", None)
            if name and "dataset" not in options and _takes(adapter, "dataset"):
                options = {**options, "dataset": name}
            self.adapter = get_adapter(adapter, **options)
        else:
            self.adapter = adapter

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.adapter(self.dataset[index])

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
