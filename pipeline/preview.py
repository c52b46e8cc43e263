"""`pipeline.preview` moved to pipeline.training.preview; this path keeps working (re-export)."""

from pipeline.training.preview import render_preview

__all__ = ["render_preview"]
