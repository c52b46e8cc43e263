"""`pipeline.dataset` is where users import the reader from: it lives in pipeline.training now.

Re-exports only; the objects are the same (``pipeline.dataset.NemoDataset is
pipeline.training.dataset.NemoDataset``).
"""

from pipeline.training.dataset import SCHEMA_VERSIONS, NemoDataset, collate_fn, decode_rle
from pipeline.training.mosaic import CELL_FITS, cell_boxes, fit_box
from pipeline.training.sampling import MOSAIC_NEGATIVES
from pipeline.training.schema import TRAIN_SPLIT

__all__ = ["CELL_FITS", "MOSAIC_NEGATIVES", "SCHEMA_VERSIONS", "TRAIN_SPLIT", "NemoDataset",
           "cell_boxes", "collate_fn", "decode_rle", "fit_box"]
