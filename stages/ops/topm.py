"""Exact top-M column selection per row, descending, ties by ascending column.

The negatives stage keeps the best M = 2048 of about 17k pool images for each of about 120k
queries. A general top-k (torch.topk: nth_element then a sort of pairs) costs more than the
matrix product that made the scores, and its order among equal values is arbitrary, which then
needs a second pass for ties. Here each row is cut by a threshold first: the value ranked
about 1.2 M in a strided sample of the row's columns. Only the columns at or above it (about
1.2 M) are kept, each packed with its row and column into one int64 key that orders by
(row, value descending, column ascending), and one vectorised sort of those keys gives the exact
answer, ties included. A row whose threshold kept fewer than M columns (a sampling miss, rare)
is redone with every column. Threads share a block's rows in small chunks: numpy releases
the GIL in each step.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SAMPLE_STRIDE = 8
# the sample keeps this many times M / stride (plus a constant): the expected number of columns
# at or above the threshold is then about 1.2 M, and a row falls short of M (and is redone with
# every column) with probability well under 1%
SAMPLE_MARGIN = 1.2
SAMPLE_EXTRA = 8
_SIGN = np.int32(0x7FFFFFFF)
# rows per sort: small enough that a chunk's masks, codes and keys stay in cache (4-5x faster
# per row at 128-256 rows of 17k columns than at 1024)
CHUNK_ROWS = 128


def sortable_descending(values: np.ndarray) -> np.ndarray:
    """uint32 codes whose ascending order is the descending order of float32 `values`.

    IEEE floats order like sign-magnitude integers: flipping the magnitude bits of negative
    numbers makes the int32 view monotonic; complementing it reverses the order, and the sign
    flip moves the range to unsigned. -0.0 sorts just after +0.0; NaN is not expected.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32)
    ordered = bits ^ ((bits >> 31) & _SIGN)
    return (~ordered).view(np.uint32) ^ np.uint32(0x80000000)


def sample_thresholds(scores: np.ndarray, m: int) -> np.ndarray:
    """Per row, a value that about SAMPLE_MARGIN * m columns reach (-inf when not worth it)."""
    n_rows, n_cols = scores.shape
    sample = scores[:, ::SAMPLE_STRIDE]
    keep = math.ceil(m / SAMPLE_STRIDE * SAMPLE_MARGIN) + SAMPLE_EXTRA
    if keep >= sample.shape[1] or n_rows == 0:
        return np.full(n_rows, -np.inf, np.float32)
    # the keep-th largest of each sampled row is its (n - keep)-th smallest
    nth = sample.shape[1] - keep
    return np.partition(sample, nth, axis=1)[:, nth]


def _select_rows(scores: np.ndarray, m: int, thresholds: np.ndarray) -> tuple[np.ndarray, bool]:
    """Top-m of each row among columns >= its threshold; ok is False if some row fell short."""
    n_rows, n_cols = scores.shape
    col_bits = max(1, (n_cols - 1).bit_length())
    flat = np.flatnonzero(scores >= thresholds[:, None])
    counts = np.diff(np.searchsorted(flat, np.arange(n_rows + 1) * n_cols))
    if n_rows and counts.min() < m:
        return np.empty((0, m), np.int64), False
    row = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    col = flat - row * n_cols
    code = sortable_descending(scores.reshape(-1)[flat]).astype(np.int64)
    keys = (row << (32 + col_bits)) | (code << col_bits) | col
    keys.sort()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first = keys[starts[:, None] + np.arange(m)]
    return first & ((1 << col_bits) - 1), True


def _max_rows_per_sort(n_cols: int) -> int:
    """Rows whose (row, value, column) keys fit in a signed int64."""
    col_bits = max(1, (n_cols - 1).bit_length())
    return 1 << max(0, 63 - 32 - col_bits)


def select_topm(scores: np.ndarray, m: int, threads: int = 2) -> np.ndarray:
    """Column indices (rows, min(m, cols)) of each row's m largest values, descending, ties
    by ascending column. `scores` is float32 without NaN (-inf marks columns never wanted:
    they come last and are returned only when fewer than m finite values exist)."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    n_rows, n_cols = scores.shape
    m = min(m, n_cols)
    if n_rows == 0 or m == 0:
        return np.zeros((n_rows, m), np.int64)
    if n_cols > 1 << 31:
        raise ValueError(f"{n_cols} columns do not fit a 64-bit sort key (at most 2**31)")
    step = min(_max_rows_per_sort(n_cols), CHUNK_ROWS)

    def chunk(start: int) -> np.ndarray:
        part = scores[start:start + step]
        thresholds = sample_thresholds(part, m)
        idx, ok = _select_rows(part, m, thresholds)
        if ok:
            return idx
        # some rows fell short: redo just those with every column
        counts = np.count_nonzero(part >= thresholds[:, None], axis=1)
        short = counts < m
        thresholds[short] = -np.inf
        idx, ok = _select_rows(part, m, thresholds)
        assert ok
        return idx

    starts = range(0, n_rows, step)
    if threads <= 1 or len(starts) == 1:
        return np.concatenate([chunk(s) for s in starts])
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(chunk, starts)))
