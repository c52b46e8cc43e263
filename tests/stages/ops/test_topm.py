"""Exact top-M selection (stages.ops.topm) and the negatives block search, against numpy.

The demo pool is too small for the sampled threshold to engage, so these tests use pools of
thousands of columns, dyadic values (many exact ties) and rows built to defeat the sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.negatives import search_block
from stages.ops.topm import (
    SAMPLE_STRIDE,
    select_topm,
    sortable_descending,
    topm_with_values,
    values_of_codes,
)


def oracle_topm(scores: np.ndarray, m: int) -> np.ndarray:
    """Stable argsort of -score per row: descending, ties by ascending column."""
    return np.argsort(-scores.astype(np.float64), axis=1, kind="stable")[:, :m]


def test_sortable_codes_order_like_descending_floats():
    values = np.array([1.0, -1.0, 0.5, -0.5, 0.0, np.inf, -np.inf, 1e-30, -1e-30, 3.0],
                      np.float32)
    codes = sortable_descending(values)
    assert codes.dtype == np.uint32
    order = np.argsort(codes, kind="stable")
    assert values[order].tolist() == sorted(values.tolist(), reverse=True)


def test_codes_give_back_the_values_bit_for_bit():
    rng = np.random.default_rng(3)
    values = np.concatenate([
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38], np.float32),
        rng.standard_normal(1000).astype(np.float32)])
    back = values_of_codes(sortable_descending(values))
    assert back.dtype == np.float32
    assert np.array_equal(back.view(np.uint32), values.view(np.uint32))


def test_values_are_the_selected_scores():
    rng = np.random.default_rng(4)
    scores = (rng.integers(-40, 41, size=(300, 3000)) / 64).astype(np.float32)
    scores[rng.random(scores.shape) < 0.01] = -np.inf
    idx, vals = topm_with_values(scores, 500)
    assert np.array_equal(idx, oracle_topm(scores, 500))
    assert np.array_equal(vals, np.take_along_axis(scores, idx, axis=1))


@pytest.mark.parametrize("n_rows,n_cols,m", [(300, 5000, 200), (130, 2000, 2000),
                                             (7, 3000, 1), (5, 17, 40), (260, 4096, 600)])
@pytest.mark.parametrize("threads", [1, 2])
def test_select_topm_equals_stable_argsort(n_rows, n_cols, m, threads):
    rng = np.random.default_rng(n_rows + n_cols + m)
    # dyadic values on a coarse grid: exact ties at every depth, also across the threshold
    scores = (rng.integers(-40, 41, size=(n_rows, n_cols)) / 64).astype(np.float32)
    scores[rng.random(scores.shape) < 0.01] = -np.inf
    got = select_topm(scores, m, threads=threads)
    assert got.shape == (n_rows, min(m, n_cols))
    assert np.array_equal(got, oracle_topm(scores, m))


def test_select_topm_continuous_scores():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((500, 9000)).astype(np.float32)
    assert np.array_equal(select_topm(scores, 1100), oracle_topm(scores, 1100))


@pytest.mark.parametrize("shift", [-1.0, -0.5, 0.0])
def test_thresholds_at_or_below_zero_rank_by_sign_aware_codes(shift):
    """Rows whose sampled cut is not above zero (all scores negative, or straddling zero, or
    a cut of exactly 0.0 on a grid) take the general codes; rows above zero the fast ones.
    Both kinds share each call here, ties included."""
    rng = np.random.default_rng(8)
    scores = (rng.integers(-64, 1, size=(64, 5000)) / 64 + shift).astype(np.float32)
    scores[::3] = (rng.integers(1, 64, size=scores[::3].shape) / 64).astype(np.float32)
    for m in (1, 300, 900):
        idx, vals = topm_with_values(scores, m)
        assert np.array_equal(idx, oracle_topm(scores, m))
        assert np.array_equal(vals.view(np.uint32),
                              np.take_along_axis(scores, idx, axis=1).view(np.uint32))


def test_rows_that_defeat_the_sample_are_redone_exactly():
    rng = np.random.default_rng(6)
    n_cols, m = 4000, 300
    scores = rng.random((40, n_cols)).astype(np.float32)
    # every sampled column outranks every other one: the sample's threshold then keeps only
    # about 1.2 m / stride columns of those rows, far fewer than m
    scores[::2, ::SAMPLE_STRIDE] += 10
    got = select_topm(scores, m)
    assert np.array_equal(got, oracle_topm(scores, m))


def test_minus_inf_columns_come_last_and_only_when_needed():
    scores = np.array([[0.5, -np.inf, 0.25, -np.inf]], np.float32)
    assert select_topm(scores, 2).tolist() == [[0, 2]]
    assert select_topm(scores, 4).tolist() == [[0, 2, 1, 3]]


def brute_block(t, v, inverse, own, pool, m, rank_by):
    """The block search by full matrices in float64: own column dropped before anything."""
    out = {k: [] for k in ("idx", "rho_ti", "rho_ii", "ti_min", "ti_max", "ii_min", "ii_max")}
    for row in range(len(t)):
        ti = pool.astype(np.float64) @ t[row].astype(np.float64)
        ii = pool.astype(np.float64) @ v[inverse[row]].astype(np.float64)
        cols = np.array([c for c in range(len(pool)) if c != own[inverse[row]]])
        rank = (ti if rank_by == "ti" else ii)[cols]
        order = cols[np.argsort(-rank, kind="stable")][:m]
        out["idx"].append(order)
        out["rho_ti"].append(ti[order])
        out["rho_ii"].append(ii[order])
        for name, s in (("ti", ti), ("ii", ii)):
            out[f"{name}_min"].append(s[cols].min())
            out[f"{name}_max"].append(s[cols].max())
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("rank_by", ["ti", "ii"])
@pytest.mark.parametrize("selection", ["sort", "topk"])
@pytest.mark.parametrize("text_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("reused_buffer", [False, True])
def test_search_block_equals_bruteforce(rank_by, selection, text_dtype, reused_buffer):
    """Text vectors as stored (float16) or float32; with `scratch`, the host path's product
    buffer is reused from a larger earlier block (made here by a first call)."""
    rng = np.random.default_rng(7)
    d, n_pool, n_img, n_q, m = 8, 3000, 40, 200, 150
    # dyadic vectors: every dot product is exact in float32, and ties are common
    pool = (rng.integers(-2, 3, size=(n_pool, d)) / 8).astype(np.float32)
    v = (rng.integers(-2, 3, size=(n_img, d)) / 8).astype(np.float32)
    t = (rng.integers(-2, 3, size=(n_q, d)) / 8).astype(np.float32)
    inverse = rng.integers(0, n_img, n_q)
    own = rng.choice(n_pool, n_img, replace=False)
    own[:5] = -1  # images outside the pool (none of their columns is excluded)
    own[5] = n_pool - 1  # the last column: its neighbour is on the left
    pool_ids = rng.permutation(10 * n_pool)[:n_pool].astype(np.int32)
    scratch = {} if reused_buffer else None
    if reused_buffer:  # a larger block first: its buffer (and its stale scores) stay
        big = (rng.integers(-2, 3, size=(n_q + 50, d)) / 8).astype(np.float32)
        search_block(big, v, rng.integers(0, n_img, n_q + 50), own, torch.from_numpy(pool),
                     m, rank_by, torch.device("cpu"), selection, scratch=scratch)
    got = search_block(t.astype(text_dtype), v, inverse, own, torch.from_numpy(pool), m,
                       rank_by, torch.device("cpu"), selection, pool_ids=pool_ids,
                       scratch=scratch)
    if reused_buffer and selection == "sort":
        assert scratch["scores"].shape[0] >= n_q + 50 + n_img  # the first call's buffer
    want = brute_block(t, v, inverse, np.where(own < 0, -1, own), pool, m, rank_by)
    assert np.array_equal(got["idx"], want["idx"])
    assert np.array_equal(got["ids"], pool_ids[want["idx"]])
    for key in ("rho_ti", "rho_ii", "ti_min", "ti_max", "ii_min", "ii_max"):
        assert np.array_equal(got[key].astype(np.float64), want[key]), key


def test_search_block_pool_smaller_than_m_marks_own_image():
    pool = np.eye(3, dtype=np.float32)
    t = np.array([[1.0, 0.5, 0.0]], np.float32)
    v = np.array([[0.0, 1.0, 0.0]], np.float32)
    for selection in ("sort", "topk"):
        got = search_block(t, v, np.array([0]), np.array([1]), torch.from_numpy(pool), 10,
                           "ti", torch.device("cpu"), selection,
                           pool_ids=np.array([7, 8, 9], np.int32))
        # ranked by ti: column 0 (1.0), column 2 (0.0), then the own image (column 1), -1
        assert got["idx"].tolist() == [[0, 2, -1]], selection
        assert got["ids"].tolist() == [[7, 9, -1]], selection
    assert (got["ti_min"][0], got["ti_max"][0]) == (0.0, 1.0)
    assert (got["ii_min"][0], got["ii_max"][0]) == (0.0, 0.0)
