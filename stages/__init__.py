"""The pipeline's stages, and the commands they add to `nemo-pipe`.

The engine finds three names here (see `pipeline.registry`):

- `STAGES`: the stage classes, in DAG order. Reading it imports every stage module, so it is
  built on first use: `nemo-pipe --help` and `demo-data` never pay for it.
- `COMMANDS`: the typer commands the CLI mounts (calibrate, report, audit, preview, demo-data).
- `dataset_spec(dataset)`: what a `--dataset` value names (a known dataset or a data-manifest
  file) and its dir name under the work dir.
"""

from __future__ import annotations

import functools
from typing import Any

from stages.tools.commands import COMMANDS

__all__ = ["COMMANDS", "STAGES", "dataset_spec"]


@functools.cache
def _stages() -> tuple[type, ...]:
    from stages.augment import Augment
    from stages.clusters import Clusters
    from stages.embed import EmbedImages, EmbedTexts
    from stages.hard_negatives import HardNegatives
    from stages.index import Index
    from stages.ingest import Ingest
    from stages.mosaic_tables import MosaicTables
    from stages.multiview import Multiview
    from stages.negatives import Negatives
    from stages.shards import Shards
    from stages.thumbnails import Thumbnails

    return (Ingest, EmbedImages, EmbedTexts, Index, Negatives, MosaicTables, Multiview,
            Clusters, Augment, HardNegatives, Thumbnails, Shards)


def __getattr__(name: str) -> Any:  # PEP 562: `STAGES` is computed when first read
    if name == "STAGES":
        return list(_stages())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dataset_spec(dataset: str) -> tuple[str, str]:
    """(spec, dir name) of a `--dataset` value; see `stages.refer.manifests.dataset_spec`."""
    from stages.refer.manifests import dataset_spec as spec

    return spec(dataset)
