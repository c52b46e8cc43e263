"""The candidate negative images of a `mosaic_tables` row, as a trainer draws from them.

Declared once here, for the writer (the `mosaic_tables` stage) and the readers (shards, the
training dataset), without importing any stage: what a row stores and what the mosaic pool is.

A row of the `mosaic` table stores its candidates in one of two ways, told by `neg_from_pool`:

- `neg_from_pool` false: `neg_image_ids` lists them. With an integer K these are the first K
  survivors of tau in rank order (the paper's top-K); with `mosaic_tables.k=all` every survivor of
  the whole pool, ascending by image_id, when that list is no longer than the exclusions.
- `neg_from_pool` true (only with `k=all`): `neg_image_ids` is null and `excluded_image_ids`
  lists the pool images with rho >= tau (ascending). The candidates are the pool
  (`pool.parquet` in the artifact, column image_id, ascending: the training-split images with an
  image embedding, the pool `negatives` searched) minus those, minus the row's own image.

Either way the candidate set is exact: an image with rho >= tau on the declared scale is never a
candidate, and neither the own image nor an evaluation-only image (not in the pool) ever is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

POOL_FILE = "pool.parquet"
"""The mosaic pool, at the root of a mosaic_tables artifact: one column `image_id`, ascending."""
FROM_POOL = "neg_from_pool"
EXCLUDED = "excluded_image_ids"


def uniform_candidates(row: Mapping[str, Any], pool_ids: np.ndarray) -> np.ndarray:
    """The images a mosaic of this row may show, to be drawn from uniformly (int64).

    `row` holds `image_id`, `neg_image_ids` and, from mosaic_tables version 2 on, `neg_from_pool`
    and `excluded_image_ids` (a row without them is a listed row). `pool_ids`: the artifact's
    `pool.parquet` image ids; read only for rows stored as exclusions. A listed row keeps its
    order (rank order for an integer K); a row from the pool comes out in pool order. Computing
    the set costs a pass over the pool: a reader drawing often from one row may cache it.
    """
    import numpy as np

    def ids(key: str) -> np.ndarray:
        value = row.get(key)
        return np.asarray([] if value is None else value, dtype=np.int64)

    if not row.get(FROM_POOL):
        return ids("neg_image_ids")
    pool = np.asarray(pool_ids, dtype=np.int64)
    excluded = ids(EXCLUDED)
    keep = ~np.isin(pool, excluded) & (pool != int(row["image_id"]))
    return pool[keep]
