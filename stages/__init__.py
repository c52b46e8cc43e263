"""The pipeline's stages, in DAG order. The engine finds them through `STAGES`."""

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

STAGES = [Ingest, EmbedImages, EmbedTexts, Index, Negatives, MosaicTables, Multiview, Clusters,
          Augment, HardNegatives, Thumbnails, Shards]

__all__ = ["STAGES"]
