"""Exact top-M column selection per row, descending, ties by ascending column.

The negatives stage keeps the best M = 2048 of about 17k pool images for each of about 120k
queries. A general top-k (torch.topk: nth_element then a sort of pairs) costs more than the
matrix product that made the scores, and its order among equal values is arbitrary, which then
needs a second pass for ties. Here each row is cut by a threshold first: the value ranked
about 1.2 M in a strided sample of the row's columns (one partition for a chunk of rows). Only
the columns at or above it (about 1.2 M) are kept, each packed with its column into one int64
key that orders by (value descending, column ascending), and sorted, row by row while the row
is in cache; that gives the exact answer, ties included. The sorted keys also hold the values,
bit for bit, so the caller needs no gather for the ranking score. A row whose threshold kept
fewer than M columns (a sampling miss, rare) is redone with every column. Threads share a
block's rows in small chunks: numpy releases the GIL in each step.
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
# rows per chunk: one partition finds a chunk's thresholds, and the negatives search reduces
# and gathers a chunk while its rows are in cache; threads share a block's rows by chunks
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


def values_of_codes(codes: np.ndarray) -> np.ndarray:
    """float32 values of `sortable_descending` codes, bit for bit (each step is its own
    inverse: the sign flip, the complement, and the magnitude flip of negative numbers)."""
    ordered = ~(np.ascontiguousarray(codes, dtype=np.uint32) ^ np.uint32(0x80000000)).view(
        np.int32)
    return (ordered ^ ((ordered >> 31) & _SIGN)).view(np.float32)


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


def topm_rows(part: np.ndarray, m: int, idx_out: np.ndarray | None = None,
              values_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`topm_with_values` of a few rows (up to CHUNK_ROWS), in this thread, one row at a time:
    the columns at or above the row's sampled threshold, packed into int64 keys (value code
    << column bits | column) and sorted. Row by row, the row (68 KiB at 17k columns) and its
    keys stay in cache, and the keys need no padded matrix nor the flat index arithmetic that
    lays a chunk's keys out in one: about a fifth less time than sorting a chunk's rows as
    one padded matrix, the sort included. A threshold above zero keeps only positive values,
    whose bits already order like the values (one subtraction gives descending codes); other
    rows take the general sign-aware codes. A row the cut left short of m (a sampling miss)
    is redone with every column. 1 <= m <= columns. `idx_out` (int64 or int32) and
    `values_out` (float32), (rows, m), receive the result when given: rows of arrays the
    caller keeps, instead of a chunk's worth of fresh pages (their faults cost as much as a
    fifth of the selection on a virtual machine)."""
    n_rows, n_cols = part.shape
    col_bits = max(1, (n_cols - 1).bit_length())
    low = np.int64((1 << col_bits) - 1)
    thresholds = sample_thresholds(part, m)
    idx = np.empty((n_rows, m), np.int64) if idx_out is None else idx_out
    values = np.empty((n_rows, m), np.float32) if values_out is None else values_out
    codes = np.empty(m, np.int64)
    every_column: np.ndarray | None = None
    for i in range(n_rows):
        row, threshold = part[i], thresholds[i]
        cols = np.flatnonzero(row >= threshold)
        positive = bool(threshold > 0)
        if len(cols) < m:
            if every_column is None:
                every_column = np.arange(n_cols, dtype=np.int64)
            cols, positive = every_column, False
        if positive:  # values > 0: larger float, larger int32 bits; never 0x7FFFFFFF (NaN)
            keys = np.subtract(_SIGN, row[cols].view(np.int32), dtype=np.int64)
        else:
            keys = sortable_descending(row[cols]).astype(np.int64)
        keys <<= col_bits
        keys |= cols
        keys.sort()
        top = keys[:m]
        np.bitwise_and(top, low, out=idx[i], casting="unsafe")  # columns < 2**31
        np.right_shift(top, col_bits, out=codes)
        if positive:
            np.subtract(_SIGN, codes, out=codes)
            values[i] = codes.astype(np.int32).view(np.float32)
        else:
            values[i] = values_of_codes(codes.astype(np.uint32))
    return idx, values


def topm_with_values(scores: np.ndarray, m: int,
                     threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Column indices (rows, min(m, cols)) of each row's m largest values, descending, ties
    by ascending column, and those values. `scores` is float32 without NaN (-inf marks
    columns never wanted: they come last and are returned only when fewer than m finite
    values exist)."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    n_rows, n_cols = scores.shape
    m = min(m, n_cols)
    if n_rows == 0 or m == 0:
        return np.zeros((n_rows, m), np.int64), np.zeros((n_rows, m), np.float32)
    if n_cols > 1 << 31:
        raise ValueError(f"{n_cols} columns do not fit a 64-bit sort key (at most 2**31)")
    starts = range(0, n_rows, CHUNK_ROWS)

    def chunk(start: int) -> tuple[np.ndarray, np.ndarray]:
        return topm_rows(scores[start:start + CHUNK_ROWS], m)

    if threads <= 1 or len(starts) == 1:
        parts = [chunk(s) for s in starts]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(chunk, starts))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def select_topm(scores: np.ndarray, m: int, threads: int = 2) -> np.ndarray:
    """The column indices of `topm_with_values`."""
    return topm_with_values(scores, m, threads)[0]
