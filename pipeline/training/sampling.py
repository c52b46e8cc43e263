"""The random draws of one sample: whether it is a mosaic, which negatives, which quadrant.

Every draw of sample ``index`` at epoch ``e`` comes from ``numpy.random.default_rng([seed, e,
index])`` and nothing else, so a sample does not depend on the number of DataLoader workers, on
the order of access, or on what was read before. The order of the draws is part of the output:
``u`` (mosaic or not) first, for every sample, then the mosaic's negatives, then its quadrant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.training.schema import ALL_QUADRANTS

MOSAIC_NEGATIVES = 3


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def draw_mosaic_u(rng: np.random.Generator) -> float:
    """The uniform draw compared with gamma. Drawn for every sample (not only eligible ones) so
    that, for a fixed (seed, epoch, index), raising gamma only ever turns single images into
    mosaics."""
    return float(rng.random())


def plan_mosaic(image_id: int, neg_image_ids: Sequence[Any] | None,
                allowed_quadrants: Sequence[Any] | None, rng: np.random.Generator,
                positional_constraint: bool) -> tuple[int, list[int]] | None:
    """``(quadrant, image ids in quadrant order)``, or None when the row cannot mosaic.

    Candidates keep their rank order; the positive's own image and repeats are dropped
    defensively so a malformed row can never show the positive twice or a negative twice. With
    `positional_constraint` the positive goes only into one of `allowed_quadrants` (empty:
    unconstrained, as stages.text.positional means it).
    """
    image_id = int(image_id)
    seen = {image_id}
    candidates = []
    for c in neg_image_ids or []:
        c = int(c)
        if c not in seen:
            seen.add(c)
            candidates.append(c)
    if len(candidates) < MOSAIC_NEGATIVES:
        return None
    quadrants = list(ALL_QUADRANTS)
    if positional_constraint:
        allowed = sorted({int(q) for q in allowed_quadrants or []} & set(quadrants))
        quadrants = allowed or quadrants
    # choice without replacement returns the picks in uniformly random order, which is the
    # random placement of the negatives into the remaining quadrants.
    picks = rng.choice(len(candidates), size=MOSAIC_NEGATIVES, replace=False)
    quadrant = quadrants[int(rng.integers(len(quadrants)))]
    negatives = iter(candidates[int(i)] for i in picks)
    sources = [image_id if q == quadrant else next(negatives) for q in ALL_QUADRANTS]
    return quadrant, sources


def first_hard_negatives(texts: Sequence[str] | None, kinds: Sequence[str] | None,
                         n: int) -> tuple[list[str], list[str]]:
    """The best `n` hard-negative texts of a row (its lists are ranked) and their kinds."""
    hard = list(texts or [])[:n]
    return hard, list(kinds or [])[: len(hard)]
