"""What a trainer imports: the reader of the `shards` artifact and what goes with it.

    schema      the shards (and thumbnails) layout, shared with the stages that write it
    artifact    the checks a shards directory passes before it is read; where its parts are
    dataset     NemoDataset (one split as a PyTorch map-style dataset) and collate_fn
    sampling    the seeded per-sample draws (mosaic kind, grid, negatives, cell, cuts)
    mosaic      mosaic geometry and composition
    preview     a contact sheet of samples (`nemo-pipe preview`)
    adapters    a sample in the format of a given trainer's own dataset (CRIS, LAVT, ReLA, ...)

Importing this package imports nothing heavy: `NemoDataset`, `collate_fn` and `get_adapter` are
loaded on first access, so the stages can import `pipeline.training.schema` without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"NemoDataset": "pipeline.training.dataset", "collate_fn": "pipeline.training.dataset",
         "get_adapter": "pipeline.training.adapters"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
