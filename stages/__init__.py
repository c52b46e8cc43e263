"""The pipeline's stages, in DAG order. The engine finds them through `STAGES`."""

from stages.embed import EmbedImages, EmbedTexts
from stages.index import Index
from stages.ingest import Ingest
from stages.mosaic_tables import MosaicTables
from stages.negatives import Negatives
from stages.shards import Shards

STAGES = [Ingest, EmbedImages, EmbedTexts, Index, Negatives, MosaicTables, Shards]

__all__ = ["STAGES"]
