"""The pipeline's stages, in DAG order. The engine finds them through `STAGES`."""

from stages.embed import EmbedImages, EmbedTexts
from stages.index import Index
from stages.ingest import Ingest

STAGES = [Ingest, EmbedImages, EmbedTexts, Index]

__all__ = ["STAGES"]
