"""The pipeline's stages, in DAG order. The engine finds them through `STAGES`."""

from stages.ingest import Ingest

STAGES = [Ingest]

__all__ = ["STAGES"]
