"""The random draws of one sample: single image or mosaic (which kind, which grid), which
negative images, which cell the positive takes, where the cuts are; which expression, which
hard negatives.

Every draw of sample ``index`` at epoch ``e`` comes from ``numpy.random.default_rng([seed, e,
index])`` and nothing else, so a sample does not depend on the number of DataLoader workers, on
the order of access, or on what was read before. The sentence and the hard negatives come from
streams of their own, ``default_rng([seed, e, index, stream])`` (:data:`SENTENCE_STREAM`,
:data:`HARD_NEGATIVE_STREAM`, and with ``items="ref"`` :data:`REF_SENTENCE_STREAM`), so a change
to the mosaic draws (a new option, another order) never changes which expression or which
negatives a sample gets, and the reverse. The order of the mosaic stream's draws is part of the
output:

1. ``u`` (:func:`draw_mosaic_u`), for every sample: single or which mosaic kind;
2. with ``grid="mixed"`` and a mosaic: 2x2 or 3x3, one half each;
3. the negatives (``rng.choice`` over the candidates; the fallback's draws after it);
4. the positive's cell (uniform over the allowed cells);
5. with ``cross_point`` other than "center": the column cuts, then the row cuts (:func:`draw_cuts`).

With the defaults (retrieval mosaics, 2x2, centred cuts, no fallback needed) that is ``u``, the
three negatives, the quadrant: the draws of every earlier version of this reader.

Mosaic kinds (:func:`mosaic_kind`), on the training split only (evaluation rows are single):

- before ``mosaic_start_epoch``: single, or with ``random_before_start`` a random mosaic with
  probability ``gamma`` (the official loader before ``retrieval_epoch``, with ``aug_prob``);
- then ``mosaic="retrieval"``: a retrieval mosaic with probability ``gamma``; ``"random"``: a
  random mosaic with probability ``gamma``; ``"mixed"``: retrieval with ``retrieval_prob``,
  random with ``random_prob``, single with ``1 - (random_prob + retrieval_prob)`` (the official
  ``rand_prob``, ``retr_prob``).

Candidates. A *retrieval* mosaic draws from the row's candidates: ``neg_image_ids`` in rank order
(the first K survivors of tau), or for a ``mosaic_tables.k=all`` row stored as exclusions
``uniform_candidates(row, pool)`` (every survivor of the whole pool). A *random* mosaic draws
uniformly from the pool (training-split images) without the own image; an evaluation-only image
is never in the pool. The negatives of one mosaic are distinct (``rng.choice`` without
replacement) unless ``replace=True``, which draws a retrieval mosaic's negatives with
replacement as the official loader does whenever its ``top_k >= 20`` (it can show one image in
two cells; then one survivor is enough and the fallback acts only when none survives). Random
mosaics are always distinct images: the official random mosaic draws without replacement over
*referents* (LMDB keys), so it may show the own image, or one image twice through two of its
referents; here it draws images, never the own one.

Fallback when fewer distinct candidates survive tau than the grid needs (3 on 2x2, 8 on 3x3;
``fallback``, reported in ``meta["fallback"]`` and ``meta["fallback_cells"]``):

- ``"single"`` (default): the sample stays a single image: tau is never broken (the reader's
  behaviour before the option existed);
- ``"replace"``: every survivor once, the missing cells drawn from the survivors with replacement
  (single when none survives);
- ``"pool"``: every survivor once, the missing cells drawn without replacement from the pool minus
  the own image and the survivors: those cells ignore tau, like the official loader, which, when
  no candidate survives, draws from the last 300 (least similar) entries of its similarity list
  (and, when fewer than ``top_k`` but some survive, draws with replacement from them).

Positional constraint (:func:`allowed_cells`): the row's ``allowed_quadrants`` (2x2, from its
positional words, matched on whole tokens) directly on 2x2; on 3x3 left means column 0, right
column 2, top row 0, bottom row 2, and several words intersect ("top left": cell 0); no word or a
conflict allows all nine. The official loader matches substrings ("bright" counts as right,
"yellow" as low, "laptop" as top; the first of left/right wins on "left and right"), knows
"above", "below", "under", "beneath" as positions, and on 3x3 reuses the 2x2 indices (left ->
cells 0 or 2, i.e. the top row's corners).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.training.mosaic import CROSS_POINTS, Box, even_cuts, grid_boxes, shifted_range
from pipeline.training.mosaic_candidates import FROM_POOL, uniform_candidates
from pipeline.training.schema import ALL_QUADRANTS, NO_SOURCE_ID, ORIGINAL_EXPRESSION

MOSAIC_NEGATIVES = 3  # on the default 2x2 grid
MOSAIC_MODES = ("retrieval", "random", "mixed")
GRIDS = (2, 3, "mixed")
FALLBACKS = ("single", "replace", "pool")
ONE, RANDOM, RETRIEVAL = "one", "random", "retrieval"
SENTENCE_STREAM = 1
HARD_NEGATIVE_STREAM = 2
REF_SENTENCE_STREAM = 3  # items="ref": which of the referent's sentences a training item shows
ITEMS = ("sentence", "ref")
"""`NemoDataset(items=...)`: one item per sentence (default), or per referent as the official
NeMo and CRIS loaders (a random sentence in training, the first one in evaluation)."""
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


@dataclass(frozen=True)
class SamplerOptions:
    """The mosaic options of a :class:`~pipeline.training.dataset.NemoDataset` (its arguments of
    the same names; the module docstring says what each does). Checked on construction."""

    gamma: float = 0.6
    mosaic: str = "retrieval"
    random_prob: float | None = None
    retrieval_prob: float | None = None
    random_before_start: bool = False
    mosaic_start_epoch: int = 0
    grid: int | str = 2
    cross_point: str = "center"
    fallback: str = "single"
    replace: bool = False
    positional_constraint: bool = False

    def __post_init__(self) -> None:
        def prob(name: str, value: Any) -> None:
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")

        prob("gamma", self.gamma)
        if self.mosaic not in MOSAIC_MODES:
            raise ValueError(f"mosaic must be one of {MOSAIC_MODES}, got {self.mosaic!r}")
        given = [n for n in ("random_prob", "retrieval_prob") if getattr(self, n) is not None]
        if self.mosaic == "mixed":
            if len(given) != 2:
                raise ValueError("mosaic='mixed' needs random_prob and retrieval_prob (the "
                                 "official rand_prob, retr_prob); single images get the rest")
            prob("random_prob", self.random_prob)
            prob("retrieval_prob", self.retrieval_prob)
            if float(self.random_prob) + float(self.retrieval_prob) > 1.0 + 1e-9:
                raise ValueError(f"random_prob + retrieval_prob must be <= 1, got "
                                 f"{self.random_prob} + {self.retrieval_prob}")
        elif given:
            raise ValueError(f"{' and '.join(given)} only apply to mosaic='mixed' (got mosaic="
                             f"{self.mosaic!r}, where gamma is the mosaic probability)")
        if int(self.mosaic_start_epoch) < 0:
            raise ValueError(f"mosaic_start_epoch must be >= 0, got {self.mosaic_start_epoch!r}")
        if not (self.grid == "mixed" or (type(self.grid) is int and self.grid in GRIDS)):
            raise ValueError(f"grid must be 2, 3 or 'mixed', got {self.grid!r}")
        if self.cross_point not in CROSS_POINTS:
            raise ValueError(f"cross_point must be one of {CROSS_POINTS}, got "
                             f"{self.cross_point!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")


@dataclass(frozen=True)
class Plan:
    """What one sample shows: `kind` one/random/retrieval, the `grid` side (1 for a single
    image), the positive's `cell` (row-major; None when single), the image id of each cell
    (`sources`), and whether a fallback decided it (`fallback`, `fallback_cells`)."""

    kind: str
    grid: int
    cell: int | None
    sources: list[int] = field(default_factory=list)
    fallback: str | None = None
    fallback_cells: int = 0

    @property
    def is_mosaic(self) -> bool:
        return self.cell is not None


def single(image_id: int, fallback: str | None = None) -> Plan:
    return Plan(ONE, 1, None, [int(image_id)], fallback)


def mosaic_kind(u: float, opts: SamplerOptions, epoch: int, train: bool) -> str:
    """One, random or retrieval for draw `u` at `epoch` (see the module docstring)."""
    if not train:
        return ONE
    if epoch < opts.mosaic_start_epoch:
        return RANDOM if opts.random_before_start and u < opts.gamma else ONE
    if opts.mosaic == "mixed":
        if u < opts.retrieval_prob:
            return RETRIEVAL
        return RANDOM if u < opts.retrieval_prob + opts.random_prob else ONE
    if u < opts.gamma:
        return RETRIEVAL if opts.mosaic == "retrieval" else RANDOM
    return ONE


def retrieval_candidates(row: Mapping[str, Any], pool: np.ndarray | None) -> np.ndarray:
    """The distinct candidate images of a row, never its own image (int64).

    A listed row keeps its rank order; its own image and repeats are dropped defensively so a
    malformed row can never show the positive twice or a negative twice. A k=all row stored as
    exclusions comes from :func:`uniform_candidates` over the pool.
    """
    image_id = int(row["image_id"])
    if row.get(FROM_POOL):
        if pool is None:
            raise ValueError(f"sent_id {row.get('sent_id')}: a k=all row stored as exclusions "
                             "needs the mosaic pool, and this artifact has none")
        return uniform_candidates(row, pool)
    ids = np.asarray(row.get("neg_image_ids") or [], dtype=np.int64)
    _, first = np.unique(ids, return_index=True)
    ids = ids[np.sort(first)]
    return ids[ids != image_id]


def random_candidates(image_id: int, pool: np.ndarray | None) -> np.ndarray:
    """The pool without the own image: what a random mosaic draws from."""
    pool = np.asarray([] if pool is None else pool, dtype=np.int64)
    return pool[pool != int(image_id)]


def draw_negatives(rng: np.random.Generator, candidates: np.ndarray, need: int, replace: bool,
                   fallback: str, image_id: int, pool: np.ndarray | None,
                   ) -> tuple[list[int] | None, str | None, int]:
    """``(negatives in placement order, fallback used, cells it filled)``; negatives None when
    the sample stays single. The order of a draw without replacement is uniformly random, which
    is the random placement of the negatives into the cells left by the positive. With
    `replace` any survivor suffices (the official loader's draw when fewer than its top_k
    survive), so the fallback only acts when none does."""
    n = len(candidates)
    if n >= need or (replace and n):
        picks = rng.choice(n, size=need, replace=replace)
        return [int(candidates[i]) for i in picks], None, 0
    missing = need - n
    if fallback == "replace" and n:
        fill = candidates[rng.choice(n, size=missing, replace=True)]
    elif fallback == "pool":
        extra = random_candidates(image_id, pool)
        extra = extra[~np.isin(extra, candidates)]
        if len(extra) < missing:
            return None, "single", 0
        fill = extra[rng.choice(len(extra), size=missing, replace=False)]
    else:
        return None, "single", 0
    chosen = np.concatenate([candidates, fill])
    return [int(v) for v in chosen[rng.permutation(need)]], fallback, missing


def allowed_cells(allowed_quadrants: Sequence[Any] | None, grid: int,
                  positional_constraint: bool) -> list[int]:
    """The cells (row-major) the positive may take on a `grid` x `grid` mosaic.

    2x2: the row's `allowed_quadrants` (empty or unknown ids: all four). 3x3: the rows and
    columns those quadrants span, the first 2x2 row/column mapped to row/column 0, the second to
    row/column 2 and both to every row/column (left -> column 0, right -> column 2, top -> row
    0, bottom -> row 2, intersected); a set that is not a rectangle allows all nine.
    """
    every = list(range(grid * grid))
    if not positional_constraint:
        return every
    quads = sorted({int(q) for q in allowed_quadrants or []} & set(ALL_QUADRANTS))
    if not quads:
        return every
    if grid == 2:
        return quads
    rows, cols = {q // 2 for q in quads}, {q % 2 for q in quads}
    if len(quads) != len(rows) * len(cols):
        return every

    def span(half: set[int]) -> list[int]:
        return list(range(grid)) if len(half) == 2 else [0 if 0 in half else grid - 1]

    return [r * grid + c for r in span(rows) for c in span(cols)]


def plan_sample(rng: np.random.Generator, u: float, opts: SamplerOptions, epoch: int,
                train: bool, row: Mapping[str, Any], pool: np.ndarray | None,
                allowed_quadrants: Sequence[int]) -> Plan:
    """The plan of one sample from its row, after ``u`` was drawn (draws 2-4 of the module
    docstring). `allowed_quadrants` are those of the text the sample shows
    (:func:`expression_quadrants`), which the positive's cell follows."""
    image_id = int(row["image_id"])
    kind = mosaic_kind(u, opts, epoch, train)
    if kind == ONE:
        return single(image_id)
    grid = opts.grid if opts.grid != "mixed" else (2 if rng.random() < 0.5 else 3)
    need = grid * grid - 1
    if kind == RETRIEVAL:
        candidates, replace = retrieval_candidates(row, pool), opts.replace
    else:  # random mosaics are always distinct images, as the official ones are
        candidates, replace = random_candidates(image_id, pool), False
    negatives, fallback, filled = draw_negatives(rng, candidates, need, replace, opts.fallback,
                                                 image_id, pool)
    if negatives is None:
        return single(image_id, fallback)
    cells = allowed_cells(allowed_quadrants, grid, opts.positional_constraint)
    cell = cells[int(rng.integers(len(cells)))]
    it = iter(negatives)
    sources = [image_id if j == cell else next(it) for j in range(grid * grid)]
    return Plan(kind, grid, cell, sources, fallback, filled)


def draw_layout(rng: np.random.Generator, grid: int, canvas: tuple[int, int],
                cross_point: str) -> list[Box] | None:
    """The cells of a `grid` x `grid` mosaic on a ``canvas`` = (W, H): column cuts drawn first,
    then row cuts. None (and no draw) when a side is shorter than `grid`: some cell would be
    empty, so the sample stays single."""
    width, height = canvas
    if min(width, height) < grid:
        return None
    xs = draw_cuts(rng, width, grid, cross_point)
    return grid_boxes(xs, draw_cuts(rng, height, grid, cross_point))


def draw_cuts(rng: np.random.Generator, size: int, grid: int, cross_point: str) -> list[int]:
    """The cuts ``[0, x_1, ..., size]`` of one canvas side (:mod:`pipeline.training.mosaic`
    defines the three rules). Needs ``size >= grid``."""
    if cross_point == "center":
        return even_cuts(size, grid)
    if cross_point == "shifted":
        inner = [int(rng.integers(*shifted_range(size, grid, i))) for i in range(1, grid)]
    else:
        inner = sorted(int(v) + 1 for v in rng.choice(size - 1, size=grid - 1, replace=False))
    return [0, *inner, size]


def curriculum_starts(curriculum_start_epoch: int | None, mosaic_start_epoch: int | None,
                      hard_negatives_start_epoch: int | None) -> tuple[int, int]:
    """``(mosaic_start_epoch, hard_negatives_start_epoch)``: each given value, else the shorthand
    ``curriculum_start_epoch``, else 0. A start that contradicts the shorthand is an error."""
    if curriculum_start_epoch is not None and int(curriculum_start_epoch) < 0:
        raise ValueError(f"curriculum_start_epoch must be >= 0, got {curriculum_start_epoch!r}")
    starts = []
    for name, value in (("mosaic_start_epoch", mosaic_start_epoch),
                        ("hard_negatives_start_epoch", hard_negatives_start_epoch)):
        if value is None:
            value = 0 if curriculum_start_epoch is None else curriculum_start_epoch
        elif curriculum_start_epoch is not None and int(value) != int(curriculum_start_epoch):
            raise ValueError(
                f"curriculum_start_epoch={curriculum_start_epoch} sets both starts but "
                f"{name}={value}; pass either the shorthand or the two starts")
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        starts.append(int(value))
    return starts[0], starts[1]


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


def expression_quadrants(row: Mapping[str, Any], expression: str) -> list[int]:
    """The allowed quadrants of the text a sample shows: the row's for its own sentence, the
    view's own for a view (shards schema >= 5). A view of an older artifact, whose quadrants
    were not stored, allows every quadrant: its words are unknown here, and the original
    sentence's words do not describe it."""
    if expression == ORIGINAL_EXPRESSION:
        return [int(q) for q in row.get("allowed_quadrants") or ALL_QUADRANTS]
    names = list(row.get("view_names") or [])
    quads = list(row.get("view_allowed_quadrants") or [])
    if expression in names and len(quads) == len(names):
        return [int(q) for q in quads[names.index(expression)] or ALL_QUADRANTS]
    return list(ALL_QUADRANTS)


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
