"""calibrate: what a (tau, K) grid does to NeMo's mosaics, measured before any training run.

The paper tunes tau and K by training sweeps: mosaics help only at the right difficulty, neither
too easy (unrelated negatives) nor too ambiguous (negatives holding valid referents). This tool
measures two proxies of that difficulty for every point of a grid, from the published
`negatives` table and ingest's annotations, without rebuilding anything:

* **distractor rate** -- a candidate image is a *distractor* for a query if it holds at least one
  non-crowd instance of a referent's category (``refs.category_id`` and the categories of every
  target in ``refs.ann_ids``: a gRefCOCO referent of several targets has each one's). Per query,
  the share of
  its kept candidates that are distractors; ``distractor_share`` is the mean over queries, and
  ``expected_distractors_per_mosaic`` = 3 x that share (a mosaic draws 3 of the K kept
  candidates uniformly without replacement, so each cell is a distractor with probability equal
  to the query's share; by linearity the expected count is 3 x share).
* **false-positive risk** -- only for queries whose tokens carry positional words that constrain
  the quadrant (``quadrants_for_tokens`` allows fewer than four quadrants; no words, conflicting
  words or ``corner``-only sentences do not count). The words name sides: left/right constrain the
  box centre's x, top/bottom its y. A kept candidate is *risky* if ONE non-crowd instance of the
  referent's categories satisfies ALL the named sides inside that candidate image, strictly:
  left ``cx < W/2``, right ``cx > W/2``, top ``cy < H/2``, bottom ``cy > H/2`` with
  ``(cx, cy)`` the COCO box centre and ``W, H`` the candidate image's size (a centre exactly on
  the midline is on neither side). Placed in a quadrant the words name, such a negative cell
  makes the sentence true of its instance too ("the man on the left" with a man in the left part
  of the top-left negative). Per query, the share of its kept candidates that are risky;
  ``false_positive_risk`` is the mean over positional queries, i.e. the probability that a
  negative cell in a named quadrant is such a false positive.
* ``kept_mean`` -- mean kept candidates per query (<= K); ``short_share`` -- share of queries
  with fewer than K kept (mosaic_tables' ``k_shortfall`` > 0); ``positional_queries`` -- share
  of queries with quadrant-constraining positional words; ``queries`` -- number of queries.

Which queries enter which mean: only training sentences (of the data manifest's training split,
by ingest's refs) become mosaics, so only the negatives rows of training sentences count; rows
of the other ``negatives.query_splits`` are left out (``meta["non_training_queries_skipped"]``).
``queries``, ``kept_mean``, ``short_share`` and ``positional_queries`` are over every training
query sentence of the negatives table. The two rates skip
gRefCOCO no-target queries (category -1: no referent, no distractor) and queries with no kept
candidate (they get no mosaic; they show in ``kept_mean`` / ``short_share``). A mean over no
query is NaN.

The filter is mosaic_tables' own :func:`stages.mosaic_tables.select_negatives` with
``MosaicParams(relevance, tau_ti / tau_ii = tau, scale, k=K)`` (``both``: the same tau for both
scores; ``None``: no filter), so a grid point is exactly what ``mosaic_tables`` would publish
with those settings. Per tau the filter runs once, with the largest K; smaller Ks take the first
K of those survivors through a second, unfiltered select_negatives call (same result, tested;
see :func:`_select_grid`). The negatives table is read part by part, so memory stays at one part.
Cost (2 shared CPU cores): about 19 s per 8192 queries x M=2048 for the default 5 x 5 grid, so
about 5 minutes for RefCOCO's 120k training sentences.

``calibrate(pipe, ...)`` reads the artifacts of a pipeline; :func:`calibrate_tables` is the
same computation on in-memory tables; :func:`render_heatmaps` draws tau x K heat-maps;
:func:`calibrate_command` is the CLI entry (``nemo-pipe calibrate``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import NemoError
from pipeline.io import output_dir, output_file
from pipeline.stage import INT_MAX
from stages.mosaic_tables import MIN_K, TAU_RANGE, MosaicParams, active_taus, select_negatives
from stages.text.positional import quadrants_for_tokens

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from pipeline.runner import Pipeline

__all__ = [
    "COLUMNS",
    "DEFAULT_KS",
    "DEFAULT_TAUS",
    "CalibrationResult",
    "calibrate",
    "calibrate_command",
    "calibrate_tables",
    "parse_ks",
    "parse_taus",
    "render_heatmaps",
    "training_sentence_ids",
]

DEFAULT_TAUS: tuple[float | None, ...] = (0.6, 0.7, 0.8, 0.85, 0.9, None)  # the CLI's too
DEFAULT_KS: tuple[int, ...] = (50, 100, 200, 400, 800)
MOSAIC_NEGATIVES = 3  # negative cells of a 2x2 mosaic

COLUMNS = ("tau", "k", "relevance", "scale", "queries", "distractor_share",
           "expected_distractors_per_mosaic", "false_positive_risk", "positional_queries",
           "kept_mean", "short_share")

# Side bits of a box centre / of the words of a sentence.
_SIDE_BIT = {"left": 1, "right": 2, "top": 4, "bottom": 8}
# _SUBSETS[b]: bit R set for every side set R contained in b (an instance with sides b
# satisfies every sentence whose required sides R are a subset of b).
_SUBSETS = tuple(sum(1 << r for r in range(16) if r & b == r) for b in range(16))
_CAT_BITS = 24  # (image_id, category_id) pairs are packed as image_id << 24 | category_id
_DENSE_MAX_ID = 1 << 26  # direct-address lookup of image ids below this (COCO: < 600k) ...
_DENSE_MAX_CELLS = 1 << 26  # ... when images x categories cells fit (int32: 256 MiB at most)

_NEG_COLUMNS = ["sent_id", "ref_id", "cand_image_ids", "rho_ti", "rho_ii",
                "ti_min", "ti_max", "ii_min", "ii_max"]
_INGEST_COLUMNS = {
    "refs": ["ref_id", "category_id", "ann_ids", "split"],
    "objects": ["ann_id", "image_id", "category_id", "bbox", "iscrowd"],
    "sentences": ["sent_id", "ref_id", "tokens"],
    "images": ["image_id", "width", "height"],
}


# -- result ----------------------------------------------------------------------------------
@dataclass
class CalibrationResult:
    """One row per (tau, K) grid point, taus outer, Ks inner, in the order given."""

    rows: list[dict[str, Any]]
    taus: list[float | None]
    ks: list[int]
    relevance: str
    scale: str
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, tau: float | None, k: int) -> dict[str, Any]:
        for r in self.rows:
            if r["tau"] == tau and r["k"] == k:
                return r
        raise KeyError((tau, k))

    def grid(self, metric: str) -> np.ndarray:
        """``metric`` as a len(taus) x len(ks) float array (rows: taus, columns: Ks)."""
        import numpy as np

        return np.array([[float(self.row(t, k)[metric]) for k in self.ks] for t in self.taus],
                        dtype=np.float64)

    def to_table(self) -> pa.Table:
        import pyarrow as pa

        schema = pa.schema([
            ("tau", pa.float64()), ("k", pa.int64()), ("relevance", pa.string()),
            ("scale", pa.string()), ("queries", pa.int64()),
            ("distractor_share", pa.float64()),
            ("expected_distractors_per_mosaic", pa.float64()),
            ("false_positive_risk", pa.float64()), ("positional_queries", pa.float64()),
            ("kept_mean", pa.float64()), ("short_share", pa.float64()),
        ], metadata={"nemo_calibration": json.dumps(self.meta, sort_keys=True, default=str)})
        return pa.Table.from_pylist(self.rows, schema=schema)

    def write(self, out_dir: Path | str) -> tuple[Path, Path]:
        """``calibration.parquet`` and ``calibration.csv`` in ``out_dir`` (created)."""
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        out = output_dir(Path(out_dir), "calibration", "OUT folder")
        table = self.to_table()
        with output_file(out / "calibration.parquet", "calibration table", "OUT folder") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        with output_file(out / "calibration.csv", "calibration CSV", "OUT folder") as tmp:
            pacsv.write_csv(table.replace_schema_metadata(None), tmp)
        return out / "calibration.parquet", out / "calibration.csv"


# -- argument helpers ------------------------------------------------------------------------
def parse_taus(text: str) -> list[float | None]:
    """``"0.6,0.7,null"`` -> ``[0.6, 0.7, None]`` (``null``, ``none``, ``off`` disable tau)."""
    out: list[float | None] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.lower() in ("null", "none", "off", "~"):
            out.append(None)
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise NemoError(f"--taus: {part!r} is not a number or null "
                            "(e.g. --taus 0.6,0.7,0.8,0.9,null)") from None
    return _check_taus(out)


def parse_ks(text: str) -> list[int]:
    """``"50,100,200"`` -> ``[50, 100, 200]``."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise NemoError(f"--ks: {part!r} is not an integer (e.g. --ks 50,100,200,400,800)"
                            ) from None
    return _check_ks(out)


def _check_taus(taus: Iterable[float | None]) -> list[float | None]:
    out: list[float | None] = []
    for t in taus:
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
                raise NemoError(f"calibrate: tau {t!r} must be a finite number or None")
            t = float(t)
        if t not in out:
            out.append(t)
    if not out:
        raise NemoError("calibrate: give at least one tau (None = no filter)")
    return out


def _check_ks(ks: Iterable[int]) -> list[int]:
    """mosaic_tables.k's domain (>= 3: a mosaic shows 3 negatives; <= 2^31 - 1), so every grid
    point is a K the stage could publish. K <= negatives.m is :func:`_check_ks_fit`'s."""
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k or not (
                MIN_K <= k <= INT_MAX):
            raise NemoError(f"calibrate: K {k!r} must be an integer in [{MIN_K}, {INT_MAX}] "
                            f"(mosaic_tables.k's range: a mosaic shows {MIN_K} negatives); e.g. "
                            "--ks 50,100,200,400,800")
        if int(k) not in out:
            out.append(int(k))
    if not out:
        raise NemoError("calibrate: give at least one K")
    return out


def _check_ks_fit(ks: Sequence[int], pipe: Pipeline) -> None:
    """No K above negatives.m, the candidates the table keeps per query: no query could keep
    that many (mosaic_tables.k refuses it too), so such a column would only repeat K = m."""
    m = getattr(pipe.resolve("negatives").params, "m", None)
    over = [k for k in ks if isinstance(m, int) and k > m]
    if over:
        raise NemoError(f"calibrate: K {over[0]} is above negatives.m={m}, the candidates kept "
                        f"per query (mosaic_tables.k must be <= negatives.m too); drop it from "
                        f"--ks or pass --set negatives.m={max(over)} (or more)")


def _grid_params(taus: list[float | None], ks: list[int], relevance: str,
                 scale: str) -> list[tuple[float | None, int, MosaicParams]]:
    if relevance not in ("ti", "ii", "both"):
        raise NemoError(f"calibrate: relevance {relevance!r} must be ti, ii or both")
    if scale not in ("minmax", "cosine"):
        raise NemoError(f"calibrate: scale {scale!r} must be minmax or cosine")
    lo, hi = TAU_RANGE[scale]
    outside = [t for t in taus if t is not None and not lo <= t <= hi]
    if outside:
        raise NemoError(f"calibrate: tau {outside[0]:g} is outside [{lo:g}, {hi:g}], the range of "
                        f"scale {scale} (e.g. --taus 0.6,0.7,0.8,0.9,null)")
    grid = []
    for tau in taus:
        for k in ks:
            # built unvalidated (model_construct: no per-point pydantic cost); tau and the
            # names were checked above, K by _check_ks
            p = MosaicParams.model_construct(
                relevance=relevance, **active_taus(relevance, tau, tau), scale=scale, k=k)
            grid.append((tau, k, p))
    return grid


# -- annotations -----------------------------------------------------------------------------
@dataclass
class _Annotations:
    """Lookups built once from ingest's refs, objects, sentences and images."""

    ref_ids: np.ndarray  # sorted
    # the referent's categories (refs.category_id and its targets'), per sorted ref: the
    # values ref_cat_values[ref_cat_start[i]:ref_cat_start[i + 1]]; -1 alone for no target
    ref_cat_start: np.ndarray
    ref_cat_values: np.ndarray
    train_sent_ids: np.ndarray  # sorted sentence ids of the training split
    pair_keys: np.ndarray  # sorted unique (image_id, category_id) keys of non-crowd instances
    pair_sat: np.ndarray  # int32 per pair: bit R set if one instance has all sides of R
    tokens: dict[int, list[str]]
    # direct-address form of the pairs when the ids are small (COCO): a table
    # [image index, category] of pair_sat (-1: no such instance) and image_id -> index
    dense: np.ndarray | None = None
    dense_image_index: np.ndarray | None = None

    def satisfied(self, image_ids: np.ndarray, categories: np.ndarray) -> np.ndarray:
        """pair_sat of each (image_id, category_id >= 0) pair; -1 where the image holds no
        non-crowd instance of that category."""
        import numpy as np

        image_ids = image_ids.astype(np.int64, copy=False)
        if self.dense is not None and self.dense_image_index is not None:
            ok = (image_ids >= 0) & (image_ids < len(self.dense_image_index))
            ok &= (categories >= 0) & (categories < self.dense.shape[1])
            rows = self.dense_image_index[np.where(ok, image_ids, 0)]
            ok &= rows >= 0
            out = self.dense[np.where(ok, rows, 0), np.where(ok, categories, 0)].astype(np.int64)
            return np.where(ok, out, -1)
        keys = image_ids << _CAT_BITS | np.maximum(categories, 0)
        return _lookup(self.pair_keys, self.pair_sat.astype(np.int64), keys, -1)

    @classmethod
    def from_tables(cls, refs: pa.Table, objects: pa.Table, sentences: pa.Table,
                    images: pa.Table, train_split: str = "train") -> _Annotations:
        import numpy as np

        ref_ids = np.asarray(refs.column("ref_id").to_numpy(), dtype=np.int64)
        order = np.argsort(ref_ids, kind="stable")
        cat_start, cat_values = _ref_categories(refs.take(order), objects)
        train_sent_ids = training_sentence_ids(refs, sentences, train_split)

        crowd = np.asarray(objects.column("iscrowd").fill_null(False).to_numpy(
            zero_copy_only=False), dtype=bool)
        img = np.asarray(objects.column("image_id").to_numpy(), dtype=np.int64)[~crowd]
        cat = np.asarray(objects.column("category_id").to_numpy(), dtype=np.int64)[~crowd]
        bbox = _bboxes(objects.column("bbox"))[~crowd]
        if len(cat) and (cat.min() < 0 or cat.max() >= 1 << _CAT_BITS):
            raise NemoError(f"calibrate: object category ids must be in [0, 2^{_CAT_BITS})")

        im_ids = np.asarray(images.column("image_id").to_numpy(), dtype=np.int64)
        im_order = np.argsort(im_ids, kind="stable")
        im_ids = im_ids[im_order]
        widths = np.asarray(images.column("width").to_numpy(), dtype=np.float64)[im_order]
        heights = np.asarray(images.column("height").to_numpy(), dtype=np.float64)[im_order]
        w = _lookup(im_ids, widths, img, np.nan)
        h = _lookup(im_ids, heights, img, np.nan)
        cx = bbox[:, 0] + bbox[:, 2] / 2
        cy = bbox[:, 1] + bbox[:, 3] / 2
        sides = ((cx < w / 2) * _SIDE_BIT["left"] + (cx > w / 2) * _SIDE_BIT["right"]
                 + (cy < h / 2) * _SIDE_BIT["top"] + (cy > h / 2) * _SIDE_BIT["bottom"])
        keys = img << _CAT_BITS | cat
        pair_keys, inverse = np.unique(keys, return_inverse=True)
        pair_sat = np.zeros(len(pair_keys), dtype=np.int32)
        np.bitwise_or.at(pair_sat, inverse.reshape(-1),
                         np.array(_SUBSETS, dtype=np.int32)[sides.astype(np.int64)])
        dense = dense_index = None
        pair_img, pair_cat = pair_keys >> _CAT_BITS, pair_keys & ((1 << _CAT_BITS) - 1)
        uniq_img = np.unique(pair_img)
        if len(pair_keys) and pair_img.min() >= 0 and pair_img.max() < _DENSE_MAX_ID and (
                len(uniq_img) * (int(pair_cat.max()) + 1) <= _DENSE_MAX_CELLS):
            dense_index = np.full(int(pair_img.max()) + 1, -1, dtype=np.int64)
            dense_index[uniq_img] = np.arange(len(uniq_img))
            dense = np.full((len(uniq_img), int(pair_cat.max()) + 1), -1, dtype=np.int32)
            dense[dense_index[pair_img], pair_cat] = pair_sat

        tokens = dict(zip(sentences.column("sent_id").to_pylist(),
                          sentences.column("tokens").to_pylist(), strict=True))
        return cls(ref_ids[order], cat_start, cat_values, train_sent_ids, pair_keys, pair_sat,
                   tokens, dense, dense_index)


def _ref_categories(refs: pa.Table, objects: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per ref (in table order): its distinct categories, refs.category_id and those of its
    targets (objects by ann_id), as (start offsets of length n + 1, values). A no-target ref
    (category -1, no ann_ids) has -1 alone; a single-target ref, its one category."""
    import numpy as np
    import pyarrow.compute as pc

    n = refs.num_rows
    own = np.asarray(refs.column("category_id").to_numpy(), dtype=np.int64)
    anns = refs.column("ann_ids").combine_chunks()
    lengths = np.asarray(pc.list_value_length(anns).fill_null(0).to_numpy(
        zero_copy_only=False), dtype=np.int64)
    flat = np.asarray(pc.list_flatten(anns).to_numpy(zero_copy_only=False), dtype=np.int64)
    obj_ids = np.asarray(objects.column("ann_id").to_numpy(), dtype=np.int64)
    obj_order = np.argsort(obj_ids, kind="stable")
    obj_cat = np.asarray(objects.column("category_id").to_numpy(), dtype=np.int64)[obj_order]
    target_cat = _lookup(obj_ids[obj_order], obj_cat, flat, -1)
    row = np.concatenate([np.arange(n), np.repeat(np.arange(n), lengths)])
    cat = np.concatenate([own, target_cat])
    keep = (cat >= 0) | (np.arange(len(cat)) < n)  # a target unknown to objects adds nothing
    pairs = np.unique(np.stack([row[keep], cat[keep]], axis=1), axis=0)
    # a ref with a real category drops its -1 (a ref whose own id is -1 but has targets)
    real = np.zeros(n, dtype=bool)
    real[pairs[pairs[:, 1] >= 0, 0]] = True
    pairs = pairs[(pairs[:, 1] >= 0) | ~real[pairs[:, 0]]]
    start = np.concatenate([[0], np.cumsum(np.bincount(pairs[:, 0], minlength=n))])
    return start.astype(np.int64), pairs[:, 1].astype(np.int64)


def training_sentence_ids(refs: pa.Table, sentences: pa.Table, train_split: str) -> np.ndarray:
    """Sorted ids of the sentences whose ref is in `train_split`: the only queries shards and
    NemoDataset turn into mosaics (negatives.query_splits may hold others)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    train = pc.equal(refs.column("split"), pa.scalar(train_split)).fill_null(False)
    train_refs = refs.column("ref_id").filter(train)
    mask = pc.is_in(sentences.column("ref_id"), value_set=train_refs.combine_chunks())
    return np.sort(np.asarray(sentences.column("sent_id").filter(mask).to_numpy(),
                              dtype=np.int64))


def _bboxes(column: pa.ChunkedArray) -> np.ndarray:
    import numpy as np

    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(arr) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    lengths = np.asarray(arr.value_lengths().fill_null(0).to_numpy(), dtype=np.int64)
    if (lengths != 4).any():
        raise NemoError("calibrate: every objects.bbox must have 4 numbers (COCO x, y, w, h)")
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False),
                      dtype=np.float64).reshape(-1, 4)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, query: np.ndarray,
            missing: Any) -> np.ndarray:
    """values[sorted_keys == q] for every q, ``missing`` where q is absent."""
    import numpy as np

    if len(sorted_keys) == 0:
        return np.full(len(query), missing, dtype=np.result_type(values, type(missing)))
    pos = np.searchsorted(sorted_keys, query)
    pos = np.minimum(pos, len(sorted_keys) - 1)
    found = sorted_keys[pos] == query
    return np.where(found, values[pos], missing)


def _required_sides(tokens: Sequence[str] | None) -> int:
    """Side bits the sentence's positional words name; 0 unless they constrain the quadrant."""
    words, quads = quadrants_for_tokens(tokens or [])
    if len(quads) == 4:
        return 0
    bits = 0
    for w in words:
        bits |= _SIDE_BIT[w]
    return bits


# -- the computation -------------------------------------------------------------------------
class _Accumulator:
    """Sums over queries per grid point, added part by part of the negatives table."""

    def __init__(self, grid: list[tuple[float | None, int, MosaicParams]], ann: _Annotations):
        self.grid = grid
        self.ann = ann
        self.queries = 0
        self.skipped = 0  # rows of sentences outside the training split
        self.positional = 0
        self.sums = [dict.fromkeys(("kept", "short", "d_sum", "d_n", "r_sum", "r_n"), 0.0)
                     for _ in grid]

    def add(self, neg: pa.Table) -> None:
        import numpy as np
        import pyarrow as pa

        sent_ids = np.asarray(neg.column("sent_id").to_numpy(), dtype=np.int64)
        train = np.isin(sent_ids, self.ann.train_sent_ids)
        self.skipped += int((~train).sum())
        if not train.all():
            neg = neg.filter(pa.array(train))
        n = neg.num_rows
        if n == 0:
            return
        offsets, cand = _list_column(neg, "cand_image_ids")
        _, rho_ti = _list_column(neg, "rho_ti")
        _, rho_ii = _list_column(neg, "rho_ii")
        if len(rho_ti) != len(cand) or len(rho_ii) != len(cand):
            raise NemoError("calibrate: negatives rho_ti/rho_ii do not match cand_image_ids")
        extremes = {k: np.asarray(neg.column(k).to_numpy(), dtype=np.float64)
                    for k in ("ti_min", "ti_max", "ii_min", "ii_max")}
        row = np.repeat(np.arange(n), np.diff(offsets))

        ann = self.ann
        ref_ids = np.asarray(neg.column("ref_id").to_numpy(), dtype=np.int64)
        ref_pos = _lookup(ann.ref_ids, np.arange(len(ann.ref_ids)), ref_ids, -1)
        if (ref_pos < 0).any():
            missing = ref_ids[ref_pos < 0][:5].tolist()
            raise NemoError(f"calibrate: negatives ref_ids {missing} are not in ingest refs")
        first = ann.ref_cat_start[ref_pos]
        n_cats = ann.ref_cat_start[ref_pos + 1] - first
        target = ann.ref_cat_values[first] >= 0  # a no-target ref has -1 alone
        need = np.array([_required_sides(ann.tokens.get(s))
                         for s in neg.column("sent_id").to_pylist()], dtype=np.int64)
        positional = need != 0

        # per (flattened candidate, referent category): does the candidate image hold a
        # non-crowd instance of it (distractor), and one on every named side (risky); a
        # candidate is either if any of its query's categories makes it so
        reps = n_cats[row]
        entry = np.repeat(np.arange(len(cand)), reps)
        within = np.arange(len(entry)) - np.repeat(np.cumsum(reps) - reps, reps)
        e_cat = ann.ref_cat_values[np.repeat(first[row], reps) + within]
        e_row = row[entry]
        sat = ann.satisfied(cand[entry], e_cat)
        e_distractor = (sat >= 0) & (e_cat >= 0)
        e_risky = e_distractor & positional[e_row] & (
            ((np.maximum(sat, 0) >> need[e_row]) & 1) == 1)
        distractor = np.bincount(entry[e_distractor], minlength=len(cand)) > 0
        risky = np.bincount(entry[e_risky], minlength=len(cand)) > 0

        self.queries += n
        self.positional += int(positional.sum())
        for i, chosen, kept, k in _select_grid(self.grid, offsets, rho_ti, rho_ii, extremes):
            acc = self.sums[i]
            d = np.bincount(row[chosen & distractor], minlength=n)
            r = np.bincount(row[chosen & risky], minlength=n)
            has = kept > 0
            dq = target & has
            rq = dq & positional
            acc["kept"] += int(kept.sum())
            acc["short"] += int((kept < k).sum())
            acc["d_sum"] += float((d[dq] / kept[dq]).sum())
            acc["d_n"] += int(dq.sum())
            acc["r_sum"] += float((r[rq] / kept[rq]).sum())
            acc["r_n"] += int(rq.sum())

    def rows(self, relevance: str, scale: str) -> list[dict[str, Any]]:
        def mean(total: float, count: float) -> float:
            return total / count if count else math.nan

        out = []
        for (tau, k, _), acc in zip(self.grid, self.sums, strict=True):
            share = mean(acc["d_sum"], acc["d_n"])
            out.append({
                "tau": tau, "k": k, "relevance": relevance, "scale": scale,
                "queries": self.queries,
                "distractor_share": share,
                "expected_distractors_per_mosaic": MOSAIC_NEGATIVES * share,
                "false_positive_risk": mean(acc["r_sum"], acc["r_n"]),
                "positional_queries": mean(self.positional, self.queries),
                "kept_mean": mean(acc["kept"], self.queries),
                "short_share": mean(acc["short"], self.queries),
            })
        return out


def _select_grid(
    grid: list[tuple[float | None, int, MosaicParams]],
    offsets: np.ndarray,
    rho_ti: np.ndarray,
    rho_ii: np.ndarray,
    extremes: dict[str, np.ndarray],
) -> Iterable[tuple[int, np.ndarray, np.ndarray, int]]:
    """(grid index, chosen mask over the flattened candidates, kept per query, K) per point.

    Exactly ``select_negatives(..., MosaicParams(relevance, tau, scale, k=K))`` for every point,
    computed in two select_negatives steps to spare the tau filter (the expensive part) for all
    but the largest K of each tau: the filter with the largest K keeps, per query, the first
    K_max survivors in rank order; the first K of those (K <= K_max) are the first K survivors,
    which ``select_negatives`` without a filter and ``k=K`` picks from the compacted lists.
    tests/stages/tools/test_calibrate.py checks the equality against direct calls.
    """
    import numpy as np

    by_tau: dict[float | None, list[int]] = {}
    for i, (tau, _, _) in enumerate(grid):
        by_tau.setdefault(tau, []).append(i)
    for members in by_tau.values():
        top = max(members, key=lambda i: grid[i][1])
        chosen_max, kept_max = select_negatives(offsets, rho_ti, rho_ii, extremes, grid[top][2])
        yield top, chosen_max, kept_max, grid[top][1]
        rest = [i for i in members if i != top]
        if not rest:
            continue
        idx = np.flatnonzero(chosen_max)
        sub_offsets = np.concatenate([[0], np.cumsum(kept_max)]).astype(offsets.dtype)
        sub_ti, sub_ii = rho_ti[idx], rho_ii[idx]
        for i in rest:
            k = grid[i][1]
            cut = grid[i][2].model_copy(update={"tau_ti": None, "tau_ii": None})
            sub_chosen, kept = select_negatives(sub_offsets, sub_ti, sub_ii, extremes, cut)
            chosen = np.zeros(len(chosen_max), dtype=bool)
            chosen[idx[sub_chosen]] = True
            yield i, chosen, kept, k


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets starting at 0, flattened values) of a list column, slices handled."""
    import numpy as np
    import pyarrow as pa

    col = table.column(name)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if len(arr) == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0)
    if arr.null_count:
        raise NemoError(f"calibrate: negatives.{name} has null lists")
    offsets = np.asarray(arr.offsets.to_numpy(), dtype=np.int64)
    offsets = offsets - offsets[0]
    values = arr.flatten()
    if pa.types.is_floating(values.type):
        return offsets, values.to_numpy(zero_copy_only=False)
    return offsets, np.asarray(values.to_numpy(zero_copy_only=False))


def calibrate_tables(
    tables: Mapping[str, pa.Table | Iterable[pa.Table]],
    taus: Sequence[float | None],
    ks: Sequence[int],
    relevance: str = "ti",
    scale: str = "minmax",
    train_split: str = "train",
) -> CalibrationResult:
    """The calibration grid from in-memory tables.

    ``tables`` has ``negatives`` (a table, or an iterable of tables read one at a time),
    ``refs``, ``objects``, ``sentences`` and ``images`` with the columns of the README. Only
    negatives rows of sentences of ``train_split`` (by ``refs.split``) count; the others are
    counted in ``meta["non_training_queries_skipped"]``.
    """
    taus_l, ks_l = _check_taus(taus), _check_ks(ks)
    grid = _grid_params(taus_l, ks_l, relevance, scale)
    missing = {"negatives", *_INGEST_COLUMNS} - set(tables)
    if missing:
        raise NemoError(f"calibrate: missing tables {sorted(missing)}")
    ann = _Annotations.from_tables(*(tables[name] for name in _INGEST_COLUMNS),  # type: ignore[arg-type]
                                   train_split=train_split)
    acc = _Accumulator(grid, ann)
    negatives = tables["negatives"]
    import pyarrow as pa

    for part in [negatives] if isinstance(negatives, pa.Table) else negatives:
        acc.add(part)
    return CalibrationResult(acc.rows(relevance, scale), taus_l, ks_l, relevance, scale, meta={
        "train_split": train_split, "queries": acc.queries,
        "non_training_queries_skipped": acc.skipped})


def _read_dir(pipe: Pipeline, stage: str, table: str, columns: list[str]) -> Iterable[pa.Table]:
    """The parts of a published table, each checked against its manifest's sha256."""
    from pipeline.api import published_table

    ref = published_table(pipe, stage, table)
    if not ref.parts:
        raise NemoError(f"calibrate: no part-*.parquet files in {ref.dir}")
    for part in ref.parts:
        yield part.read_table(columns)


def calibrate(
    pipe: Pipeline,
    taus: Sequence[float | None] = DEFAULT_TAUS,
    ks: Sequence[int] = DEFAULT_KS,
    relevance: str = "ti",
    scale: str = "minmax",
    out_dir: Path | str | None = None,
    render: bool = True,
) -> CalibrationResult:
    """The grid on the pipeline's published ``negatives`` (and ingest) artifacts.

    With ``out_dir``: writes ``calibration.parquet``, ``calibration.csv`` and (``render``)
    ``calibration.png`` there.
    """
    import pyarrow as pa

    from pipeline.errors import NotPublished
    from pipeline.io import read_json
    from stages.refer.manifests import load_data_manifest

    dataset = pipe.env.dataset
    ks_l = _check_ks(ks)
    _check_ks_fit(ks_l, pipe)
    for stage in ("ingest", "negatives"):
        key = pipe.resolve(stage).key
        if not pipe.store.is_published(dataset, stage, key):
            raise NotPublished(f"calibrate: {stage} ({key}) for {dataset} is not built under "
                               f"{pipe.env.work_dir}; run `nemo-pipe run --stage negatives "
                               f"--dataset {dataset}` first")
    negatives_dir = pipe.artifact_dir("negatives")
    tables: dict[str, Any] = {
        name: pa.concat_tables(list(_read_dir(pipe, "ingest", name, cols)))
        for name, cols in _INGEST_COLUMNS.items()
    }
    tables["negatives"] = _read_dir(pipe, "negatives", "negatives", _NEG_COLUMNS)
    result = calibrate_tables(tables, taus, ks_l, relevance, scale,
                              train_split=load_data_manifest(dataset).train_split)
    manifest = read_json(negatives_dir / "_manifest.json")
    result.meta = {
        **result.meta,
        "dataset": dataset,
        "negatives_key": pipe.resolve("negatives").key,
        "ingest_key": pipe.resolve("ingest").key,
        "negatives_params": manifest.get("params", {}),
        "clip_model": manifest.get("clip_model", {}),
    }
    if out_dir is not None:
        result.write(out_dir)
        if render:
            render_heatmaps(result, Path(out_dir) / "calibration.png")
    return result


# -- rendering -------------------------------------------------------------------------------
def _tau_label(tau: float | None) -> str:
    return "off" if tau is None else f"{tau:g}"


def render_heatmaps(result: CalibrationResult, path_png: Path | str) -> Path:
    """tau x K heat-maps of expected distractors per mosaic and false-positive risk (Agg)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        ("expected_distractors_per_mosaic", "expected distractors per mosaic (of 3 cells)",
         "viridis", (0.0, float(MOSAIC_NEGATIVES)), "{:.2f}"),
        ("false_positive_risk", "false-positive risk (positional queries)", "magma",
         (0.0, 1.0), "{:.3f}"),
    ]
    n_t, n_k = len(result.taus), len(result.ks)
    fig = Figure(figsize=(max(9.0, 2.0 + 2.4 * n_k), max(3.8, 1.6 + 0.55 * n_t)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    tau_name = {"ti": "tau_ti", "ii": "tau_ii", "both": "tau (ti and ii)"}[result.relevance]
    for ax, (metric, title, cmap, (vmin, vmax), fmt) in zip(axes, panels, strict=True):
        data = result.grid(metric)
        masked = np.ma.masked_invalid(data)
        im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        norm = im.norm
        for i in range(n_t):
            for j in range(n_k):
                v = data[i, j]
                if math.isnan(v):
                    ax.text(j, i, "n/a", ha="center", va="center", color="0.3", fontsize=9)
                    continue
                dark = norm(v) < 0.55
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
        ax.set_xticks(range(n_k), [str(k) for k in result.ks])
        ax.set_yticks(range(n_t), [_tau_label(t) for t in result.taus])
        ax.set_xlabel("K (candidates kept per query)")
        ax.set_ylabel(f"{tau_name} ({result.scale} scale)")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.9)
    dataset = result.meta.get("dataset")
    fig.suptitle(f"NeMo calibration{f' - {dataset}' if dataset else ''}: "
                 f"relevance {result.relevance}, scale {result.scale} (tau off = no filter)",
                 fontsize=11)
    path = Path(path_png)
    with output_file(path, "calibration heatmaps", "OUT folder") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


# -- CLI entry -------------------------------------------------------------------------------
def calibrate_command(
    dataset: str,
    out_dir: Path | str,
    taus: Sequence[float | None] = DEFAULT_TAUS,
    ks: Sequence[int] = DEFAULT_KS,
    relevance: str = "ti",
    scale: str = "minmax",
    work_dir: Path | str | None = None,
    config: Path | str | None = None,
    sets: Sequence[str] = (),
    data_root: Path | str | None = None,
    images: Path | str | None = None,
) -> Path:
    """``nemo-pipe calibrate``: open the pipeline, build ``negatives`` if it is not published
    (cached otherwise), write calibration.{parquet,csv,png} into ``out_dir`` and return it."""
    from pipeline.api import open_pipeline

    taus_l, ks_l = _check_taus(taus), _check_ks(ks)
    _grid_params(taus_l, ks_l, relevance, scale)  # bad arguments fail before any work
    pipe = open_pipeline(dataset, work_dir, config, sets, data_root, images)
    _check_ks_fit(ks_l, pipe)  # before negatives is built
    if not pipe.store.is_published(pipe.env.dataset, "negatives", pipe.resolve("negatives").key):
        pipe.run("negatives")
    out = Path(out_dir)
    calibrate(pipe, taus_l, ks_l, relevance, scale, out, render=True)
    return out
