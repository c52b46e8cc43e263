"""`pipeline.adapters` is where users import the trainer adapters from: they live in
pipeline.training.adapters now (one module per trainer). Re-exports only; the objects are the
same (``pipeline.adapters.get_adapter is pipeline.training.adapters.get_adapter``), and the
names are exactly those of ``pipeline.training.adapters.__all__``, so the two never drift.
"""

from pipeline.training import adapters as _adapters
from pipeline.training.adapters import *  # noqa: F403  (the list is _adapters.__all__)

__all__ = list(_adapters.__all__)
