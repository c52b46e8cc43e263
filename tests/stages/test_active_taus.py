"""Which tau applies under each relevance: one function, by hand, and the filter that uses it."""

from __future__ import annotations

import numpy as np
import pytest

from stages.mosaic_tables import MosaicParams, active_taus, select_negatives


@pytest.mark.parametrize("relevance,want", [
    ("ti", {"tau_ti": 0.7, "tau_ii": None}),
    ("ii", {"tau_ti": None, "tau_ii": 0.4}),
    ("both", {"tau_ti": 0.7, "tau_ii": 0.4}),
])
def test_active_taus_by_hand(relevance, want):
    assert active_taus(relevance, 0.7, 0.4) == want
    assert MosaicParams(relevance=relevance, tau_ti=0.7, tau_ii=0.4, k=3).taus() == want


def test_filter_follows_the_active_taus():
    # one query, 4 candidates, cosine scale (raw scores): ti excludes candidate 0 (0.9 >= 0.8),
    # ii excludes candidate 2 (0.6 >= 0.5); each relevance drops exactly its own
    offsets = np.array([0, 4])
    ti = np.array([0.9, 0.1, 0.2, 0.3], np.float32)
    ii = np.array([0.1, 0.2, 0.6, 0.3], np.float32)
    ext = {k: np.zeros(1, np.float32) for k in ("ti_min", "ti_max", "ii_min", "ii_max")}
    kept = {}
    for rel in ("ti", "ii", "both"):
        p = MosaicParams(relevance=rel, tau_ti=0.8, tau_ii=0.5, scale="cosine", k=4)
        chosen, _ = select_negatives(offsets, ti, ii, ext, p)
        kept[rel] = np.flatnonzero(chosen).tolist()
    assert kept == {"ti": [1, 2, 3], "ii": [0, 1, 3], "both": [1, 3]}
