"""The random draws of one sample: whether it is a mosaic, which negatives, which quadrant, which
expression, which hard negatives.

Every draw of sample ``index`` at epoch ``e`` comes from ``numpy.random.default_rng([seed, e,
index])`` (the mosaic stream) or ``numpy.random.default_rng([seed, e, index, stream])`` (a stream
of its own per kind of draw: :data:`SENTENCE_STREAM`, :data:`HARD_NEGATIVE_STREAM`) and nothing
else, so a sample does not depend on the number of DataLoader workers, on the order of access, or
on what was read before. The order of the draws within a stream is part of the output: in the
mosaic stream ``u`` (mosaic or not) first, for every sample, then the mosaic's negatives, then
its quadrant. The sentence and the hard negatives have streams of their own, so a change to the
mosaic draws (a new option, another order) never changes which expression or which negatives a
sample gets, and the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.training.schema import ALL_QUADRANTS, NO_SOURCE_ID, ORIGINAL_EXPRESSION

MOSAIC_NEGATIVES = 3
SENTENCE_STREAM = 1
HARD_NEGATIVE_STREAM = 2
EXPRESSIONS = (ORIGINAL_EXPRESSION, "views", "both")
"""`NemoDataset(expressions=...)`: the row's sentence, one of its referent's views, or either."""


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def stream_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """The generator of one kind of draw (`stream` >= 1) of sample `index` at `epoch`: seeded by
    (seed, epoch, index, stream), independent of the mosaic stream and of the other streams."""
    return np.random.default_rng([seed, epoch, index, stream])


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


def draw_expression(sent: str, view_names: Sequence[str] | None,
                    view_texts: Sequence[str] | None, expressions: str,
                    rng: np.random.Generator) -> tuple[str, str, bool]:
    """``(sentence, expression, fell_back)`` of a sample: which text it shows and what that is.

    `expressions` "original": the row's own `sent` (no draw). "views": one of the referent's
    views, uniformly. "both": uniformly among the row's own sentence and the views (a referent
    with v views shows its original with probability 1 / (v + 1)). `expression` is the view's
    name or "original". A row without views (the referent's views failed, a multi-target or
    no-target referent, shards built without `with_views`) shows its own sentence under "views"
    and "both" alike, with `fell_back` True so a trainer can count such samples.
    """
    if expressions == ORIGINAL_EXPRESSION:
        return sent, ORIGINAL_EXPRESSION, False
    names, texts = list(view_names or []), list(view_texts or [])
    if not texts or len(names) != len(texts):
        return sent, ORIGINAL_EXPRESSION, True
    choices = list(zip(names, texts, strict=True))
    if expressions == "both":
        choices.insert(0, (ORIGINAL_EXPRESSION, sent))
    name, text = choices[int(rng.integers(len(choices)))]
    return text, name, False


def draw_hard_negatives(texts: Sequence[str] | None, kinds: Sequence[str] | None,
                        sources: Sequence[Any] | None, n: int, rng: np.random.Generator
                        ) -> tuple[list[str], list[str], list[int]]:
    """`n` hard negatives of a row's ranked pool, drawn without replacement: texts, kinds, source
    sentence ids, aligned, in pool (rank) order.

    A pool of at most `n` entries is returned whole (no draw). Kinds or source ids missing from
    an older row are filled with "" and `NO_SOURCE_ID`, so the three lists always align.
    """
    pool = list(texts or [])
    kind = list(kinds or [])
    source = list(sources or [])
    kind += [""] * (len(pool) - len(kind))
    source += [NO_SOURCE_ID] * (len(pool) - len(source))
    if n <= 0 or not pool:
        return [], [], []
    if n >= len(pool):
        picks = range(len(pool))
    else:
        picks = sorted(int(i) for i in rng.choice(len(pool), size=n, replace=False))
    return ([pool[i] for i in picks], [kind[i] for i in picks],
            [int(source[i]) for i in picks])
