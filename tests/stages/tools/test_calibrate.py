"""calibrate: a hand-counted grid on tiny tables, and the demo data against mosaic_tables."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.api import open_pipeline
from pipeline.errors import InputError, NemoError
from stages.tools.calibrate import (
    COLUMNS,
    calibrate,
    calibrate_command,
    calibrate_tables,
    parse_ks,
    parse_taus,
    render_heatmaps,
)

# -- hand-counted case ---------------------------------------------------------------------------
#
# Pool images 10, 11, 13: 100 x 80; image 12: 200 x 80 (its width matters below).
# Non-crowd instances (category: box centre -> sides):
#   10: cat 1 centre (20, 60) -> left, bottom;  cat 1 centre (70, 15) -> right, top
#       cat 2 crowd (ignored)
#   11: cat 1 centre (20, 15) -> left, top;     cat 2 centre (5, 5)
#   12: cat 1 centre (90, 20) -> left (90 < 200/2), top
#   13: cat 2 centre (50, 5) -> on the vertical midline: neither left nor right
#       cat 1 crowd (ignored)
#
# Queries (ti scores chosen dyadic, so the min-max scaling is exact):
#   A sent 100 / ref 1000, cat 1, "man upper left": words {left, top}, quadrant [0] -> positional
#     cands [10, 11, 12, 13], rho_ti [.9375, .75, .625, .25], pool min 0, max 1
#     -> scaled = raw; tau 0.7 drops 10 and 11
#     distractor (holds a non-crowd cat 1): 10 y, 11 y, 12 y, 13 n (crowd only)
#     risky (ONE cat-1 instance both left AND top): 10 n (left one is bottom, top one is right),
#     11 y, 12 y (thanks to W = 200), 13 n
#   B sent 101 / ref 1001, cat 2, "car between left and right": conflict -> all four quadrants,
#     not positional
#     cands [11, 12, 13, 10], rho_ti [.75, .625, .5, .375], pool min .25, max .75
#     -> scaled [1, .75, .5, .25]; tau 0.7 drops 11 and 12
#     distractor (cat 2): 11 y, 12 n, 13 y, 10 n (crowd only)
#   C sent 102 / ref 1002, no target (cat -1), "nobody on the right": positional, but skipped by
#     both rates; cands [12, 13], pool min = max = .5 -> scaled 0 (never dropped)
#
#   D sent 103 / ref 1003, a val sentence (negatives.query_splits may add such rows): no mosaic
#     is ever made of it, so it counts nowhere (its candidates would change every figure)
#
# Kept lists (K >= 3, mosaic_tables.k's range):
#                    A                  B                  C
#   tau off, K=3     [10, 11, 12]       [11, 12, 13]       [12, 13] (short)
#   tau off, K=4     [10, 11, 12, 13]   [11, 12, 13, 10]   [12, 13] (short)
#   tau 0.7, K=3, 4  [12, 13] short     [13, 10] short     [12, 13] short
#
# distractor share (mean over A, B):
#   off/3: A 3/3, B 2/3 -> 5/6;  off/4: A 3/4, B 2/4 -> 5/8;  0.7/*: A 1/2, B 1/2 -> 1/2
# false-positive risk (A only):
#   off/3: 2/3 (11, 12);  off/4: 2/4 (11, 12);  0.7/*: 1/2 (12)
# kept_mean (over A, B, C): off/3 8/3;  off/4 10/3;  0.7/* 6/3
# short_share: off/3 1/3 (C);  off/4 1/3 (C);  0.7/* 3/3
# positional_queries: A and C of 3 -> 2/3 (B's words conflict)
KS = [3, 4]
EXPECTED = {
    # (tau, K): (distractor_share, false_positive_risk, kept_mean, short_share)
    (None, 3): (5 / 6, 2 / 3, 8 / 3, 1 / 3),
    (None, 4): (5 / 8, 1 / 2, 10 / 3, 1 / 3),
    (0.7, 3): (1 / 2, 1 / 2, 2.0, 1.0),
    (0.7, 4): (1 / 2, 1 / 2, 2.0, 1.0),
}


def hand_tables() -> dict[str, pa.Table]:
    f32 = pa.list_(pa.float32())
    negatives = pa.table({
        "sent_id": pa.array([100, 103, 101, 102], pa.int64()),
        "ref_id": pa.array([1000, 1003, 1001, 1002], pa.int64()),
        "image_id": pa.array([1, 1, 2, 3], pa.int64()),
        "cand_image_ids": pa.array([[10, 11, 12, 13], [13, 13, 13], [11, 12, 13, 10], [12, 13]],
                                   pa.list_(pa.int32())),
        "rho_ti": pa.array([[0.9375, 0.75, 0.625, 0.25], [0.0] * 3, [0.75, 0.625, 0.5, 0.375],
                            [0.5, 0.5]], f32),
        "rho_ii": pa.array([[0.0] * 4, [0.0] * 3, [0.0] * 4, [0.0] * 2], f32),
        "ti_min": pa.array([0.0, 0.0, 0.25, 0.5], pa.float32()),
        "ti_max": pa.array([1.0, 1.0, 0.75, 0.5], pa.float32()),
        "ii_min": pa.array([0.0, 0.0, 0.0, 0.0], pa.float32()),
        "ii_max": pa.array([1.0, 1.0, 1.0, 1.0], pa.float32()),
    })
    refs = pa.table({
        "ref_id": pa.array([1000, 1001, 1002, 1003], pa.int64()),
        "image_id": pa.array([1, 2, 3, 1], pa.int64()),
        "ann_ids": pa.array([[1], [2], [], [1]], pa.list_(pa.int64())),
        "split": ["train", "train", "train", "val"],
        "category_id": pa.array([1, 2, -1, 1], pa.int32()),
    })
    objects = pa.table({
        "ann_id": pa.array(range(1, 12), pa.int64()),
        "image_id": pa.array([1, 2, 10, 10, 10, 11, 11, 12, 13, 13, 3], pa.int64()),
        "category_id": pa.array([1, 2, 1, 1, 2, 1, 2, 1, 2, 1, 3], pa.int32()),
        "bbox": pa.array([
            [0, 0, 10, 10], [0, 0, 10, 10],  # the queries' own targets
            [10, 50, 20, 20], [60, 5, 20, 20], [0, 0, 10, 10],  # image 10
            [10, 5, 20, 20], [0, 0, 10, 10],  # image 11
            [80, 10, 20, 20],  # image 12 (200 wide)
            [45, 0, 10, 10], [0, 0, 10, 10],  # image 13
            [0, 0, 10, 10],  # image 3
        ], pa.list_(pa.float64())),
        "iscrowd": [False, False, False, False, True, False, False, False, False, True, False],
    })
    sentences = pa.table({
        "sent_id": pa.array([100, 101, 102, 103], pa.int64()),
        "ref_id": pa.array([1000, 1001, 1002, 1003], pa.int64()),
        "tokens": [["man", "upper", "left"], ["car", "between", "left", "and", "right"],
                   ["nobody", "on", "the", "right"], ["man", "on", "the", "left"]],
    })
    images = pa.table({
        "image_id": pa.array([1, 2, 3, 10, 11, 12, 13], pa.int64()),
        "width": pa.array([100, 100, 100, 100, 100, 200, 100], pa.int32()),
        "height": pa.array([80] * 7, pa.int32()),
    })
    return {"negatives": negatives, "refs": refs, "objects": objects, "sentences": sentences,
            "images": images}


def test_hand_counted_grid():
    res = calibrate_tables(hand_tables(), taus=[None, 0.7], ks=KS, relevance="ti",
                           scale="minmax")
    assert [(r["tau"], r["k"]) for r in res.rows] == [(None, 3), (None, 4), (0.7, 3), (0.7, 4)]
    assert res.meta == {"train_split": "train", "queries": 3, "non_training_queries_skipped": 1}
    for r in res.rows:
        share, risk, kept_mean, short = EXPECTED[(r["tau"], r["k"])]
        assert set(r) == set(COLUMNS)
        assert (r["relevance"], r["scale"], r["queries"]) == ("ti", "minmax", 3)
        assert r["distractor_share"] == pytest.approx(share, abs=1e-12)
        assert r["expected_distractors_per_mosaic"] == pytest.approx(3 * share, abs=1e-12)
        assert r["false_positive_risk"] == pytest.approx(risk, abs=1e-12)
        assert r["kept_mean"] == pytest.approx(kept_mean, abs=1e-12)
        assert r["short_share"] == pytest.approx(short, abs=1e-12)
        assert r["positional_queries"] == pytest.approx(2 / 3, abs=1e-12)
    np.testing.assert_allclose(res.grid("false_positive_risk"), [[2 / 3, 0.5], [0.5, 0.5]])
    # the val row is what changes nothing: the same grid without it
    tables = hand_tables()
    tables["negatives"] = tables["negatives"].filter(pa.array([True, False, True, True]))
    alone = calibrate_tables(tables, taus=[None, 0.7], ks=KS)
    assert alone.rows == res.rows and alone.meta["non_training_queries_skipped"] == 0
    # with "val" as the training split only D counts (its 3 candidates: image 13 holds only a
    # crowd cat-1 instance, no distractor)
    val = calibrate_tables(hand_tables(), taus=[None], ks=[3], train_split="val").rows[0]
    assert (val["queries"], val["distractor_share"], val["kept_mean"]) == (1, 0.0, 3.0)


def test_hand_counted_other_relevance_and_parts():
    tables = hand_tables()
    # rho_ii is 0 everywhere (scaled 0): tau 0.7 on ii drops nothing -> same as tau off on ti
    ii = calibrate_tables(tables, [0.7], KS, relevance="ii")
    for r in ii.rows:
        share, risk, kept_mean, short = EXPECTED[(None, r["k"])]
        assert r["distractor_share"] == pytest.approx(share, abs=1e-12)
        assert r["false_positive_risk"] == pytest.approx(risk, abs=1e-12)
    # cosine scale on the raw scores, K = 3: A drops .9375, .75 -> [12, 13] (12 distractor and
    # risky); B drops .75 -> [12, 13, 10] (only 13 holds a cat-2 instance)
    cos = calibrate_tables(tables, [0.7], [3], relevance="ti", scale="cosine").rows[0]
    assert cos["distractor_share"] == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-12)
    assert cos["false_positive_risk"] == pytest.approx(1 / 2, abs=1e-12)
    # the negatives table read part by part (and sliced) gives the same answer
    neg = tables["negatives"]
    parts = {**tables, "negatives": [neg.slice(0, 1), neg.slice(1, 3), neg.slice(4, 0)]}
    whole = calibrate_tables(tables, [None, 0.7], KS)
    split = calibrate_tables(parts, [None, 0.7], KS)
    for a, b in zip(whole.rows, split.rows, strict=True):
        assert a == pytest.approx(b, abs=1e-12)


def test_sparse_id_lookup_gives_the_same(monkeypatch):
    """Large image ids fall back from the direct-address table to a sorted-key search."""
    import stages.tools.calibrate as cal

    dense = calibrate_tables(hand_tables(), [None, 0.7], KS)
    monkeypatch.setattr(cal, "_DENSE_MAX_ID", 0)
    sparse = calibrate_tables(hand_tables(), [None, 0.7], KS)
    assert dense.rows == sparse.rows


@pytest.mark.parametrize("relevance,scale", [("ti", "minmax"), ("ii", "cosine"),
                                             ("both", "minmax")])
def test_grid_selection_equals_direct_select_negatives(relevance, scale):
    """The two-step selection per tau is select_negatives(MosaicParams(tau, K)) per point."""
    from stages.mosaic_tables import select_negatives
    from stages.tools.calibrate import _grid_params, _select_grid

    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 40, size=60)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rho_ti = (rng.integers(-8, 9, size=offsets[-1]) / 8).astype(np.float32)  # ties, unsorted
    rho_ii = (rng.integers(-8, 9, size=offsets[-1]) / 8).astype(np.float16)
    extremes = {"ti_min": np.full(60, -1.0), "ti_max": np.full(60, 1.0),
                "ii_min": rng.uniform(-1, 0, 60), "ii_max": rng.uniform(0, 1, 60)}
    grid = _grid_params([0.3, None, 0.6], [1, 7, 3, 20], relevance, scale)
    seen = set()
    for i, chosen, kept, k in _select_grid(grid, offsets, rho_ti, rho_ii, extremes):
        want_chosen, want_kept = select_negatives(offsets, rho_ti, rho_ii, extremes, grid[i][2])
        assert k == grid[i][1]
        np.testing.assert_array_equal(chosen, want_chosen)
        np.testing.assert_array_equal(kept, want_kept)
        seen.add(i)
    assert seen == set(range(len(grid)))


def test_no_positional_queries_give_nan_and_render(tmp_path):
    tables = hand_tables()
    tables["sentences"] = tables["sentences"].set_column(
        2, "tokens", pa.array([["man"], ["car"], ["nothing"], ["man"]], pa.list_(pa.string())))
    res = calibrate_tables(tables, [None, 0.7], KS)
    assert all(math.isnan(r["false_positive_risk"]) for r in res.rows)
    assert all(r["positional_queries"] == 0.0 for r in res.rows)
    png = render_heatmaps(res, tmp_path / "x" / "c.png")
    assert png.stat().st_size > 0
    res.write(tmp_path / "out")
    back = pq.read_table(tmp_path / "out" / "calibration.parquet")
    assert back.column_names == list(COLUMNS)
    assert back.column("tau").to_pylist() == [None, None, 0.7, 0.7]
    # an OUT that is a file, or a PNG path under one: errors naming it, nothing left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file: cannot write the calibration there"):
        res.write(tmp_path / "file")
    with pytest.raises(InputError, match="cannot write the calibration heatmaps"):
        render_heatmaps(res, tmp_path / "file" / "c.png")
    assert (tmp_path / "file").read_text() == "x"


def test_arguments():
    assert parse_taus("0.6, 0.7,null,off") == [0.6, 0.7, None]
    assert parse_ks("50,100,100") == [50, 100]
    with pytest.raises(NemoError):
        parse_taus("0.6,high")
    with pytest.raises(NemoError):
        parse_ks("50,0")
    with pytest.raises(NemoError, match="relevance 'xy'"):
        calibrate_tables(hand_tables(), [0.7], [3], relevance="xy")
    with pytest.raises(NemoError, match="scale 'log'"):
        calibrate_tables(hand_tables(), [0.7], [3], scale="log")
    # mosaic_tables.k's range, [3, 2^31 - 1]: a mosaic shows 3 negatives; a K past int64 ended
    # in a traceback after the whole grid was computed
    assert parse_ks("3,2147483647") == [3, 2147483647]
    for bad in ("2", "50,99999999999999999999", "2147483648", "-5"):
        with pytest.raises(NemoError, match=r"must be an integer in \[3, 2147483647\]"):
            parse_ks(bad)
    for ks in ([2], [2**63], [3.5], [True]):
        with pytest.raises(NemoError, match="calibrate: K"):
            calibrate_tables(hand_tables(), [0.7], ks)


def test_every_target_category_of_a_multi_target_referent_counts():
    """gRefCOCO: B (cat 2) gets a second target, of category 1 (an instance in its own image
    2): a candidate holding a cat-1 or a cat-2 instance is then a distractor. By hand, tau off,
    K = 3: A [10, 11, 12] 3/3; B [11 (cat 1 and 2), 12 (cat 1), 13 (cat 2)] 3/3 -> 1.
    K = 4: A 3/4 (13 holds only a crowd cat 1); B [.., 10 (cat 1)] 4/4 -> 7/8."""
    tables = hand_tables()
    objects = tables["objects"]
    extra = pa.table({"ann_id": pa.array([12], pa.int64()), "image_id": pa.array([2], pa.int64()),
                      "category_id": pa.array([1], pa.int32()),
                      "bbox": pa.array([[0, 0, 10, 10]], pa.list_(pa.float64())),
                      "iscrowd": [False]}).select(objects.column_names).cast(objects.schema)
    tables["objects"] = pa.concat_tables([objects, extra])
    refs = tables["refs"]
    tables["refs"] = refs.set_column(refs.column_names.index("ann_ids"), "ann_ids",
                                     pa.array([[1], [2, 12], [], [1]], pa.list_(pa.int64())))
    res = calibrate_tables(tables, [None], KS)
    assert res.row(None, 3)["distractor_share"] == pytest.approx(1.0, abs=1e-12)
    assert res.row(None, 4)["distractor_share"] == pytest.approx(7 / 8, abs=1e-12)
    # B is not positional: the risk (A alone) is what it was
    assert res.row(None, 3)["false_positive_risk"] == pytest.approx(2 / 3, abs=1e-12)


# -- demo data against mosaic_tables -------------------------------------------------------------
SETS = ["embed.model=tiny", "embed.pretrained=null"]


def pipe_for(demo, work, *sets):
    return open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=[*SETS, *sets], progress=False)


def direct_rates(pipe):
    """Distractor share and FP risk computed row by row from the published mosaic table."""
    def load(stage, table):
        return pq.read_table(pipe.artifact_dir(stage) / table).to_pylist()

    cat_of_ref = {r["ref_id"]: r["category_id"] for r in load("ingest", "refs")}
    size = {i["image_id"]: (i["width"], i["height"]) for i in load("ingest", "images")}
    centres = defaultdict(list)
    for o in load("ingest", "objects"):
        if not o["iscrowd"]:
            x, y, w, h = o["bbox"]
            centres[(o["image_id"], o["category_id"])].append((x + w / 2, y + h / 2))

    def risky(image_id, cat, words):
        W, H = size[image_id]
        side = {"left": lambda cx, cy: cx < W / 2, "right": lambda cx, cy: cx > W / 2,
                "top": lambda cx, cy: cy < H / 2, "bottom": lambda cx, cy: cy > H / 2}
        return any(all(side[w](cx, cy) for w in words) for cx, cy in centres[(image_id, cat)])

    shares, risks, kept, short = [], [], [], []
    rows = load("mosaic_tables", "mosaic")
    for row in rows:
        negs, cat = row["neg_image_ids"], cat_of_ref[row["ref_id"]]
        kept.append(len(negs))
        short.append(row["k_shortfall"] > 0)
        if cat < 0 or not negs:
            continue
        shares.append(np.mean([bool(centres[(n, cat)]) for n in negs]))
        if len(row["allowed_quadrants"]) < 4:
            risks.append(np.mean([risky(n, cat, row["positional_words"]) for n in negs]))
    positional = np.mean([len(r["allowed_quadrants"]) < 4 for r in rows])
    return (float(np.mean(shares)), float(np.mean(risks)), float(np.mean(kept)),
            float(np.mean(short)), float(positional), len(rows))


def test_demo_matches_mosaic_tables(demo, work, tmp_path):
    pipe = pipe_for(demo, work)
    pipe.run("negatives")
    taus, ks = [0.8, None], [3, 8]
    out = tmp_path / "calib"
    res = calibrate(pipe, taus, ks, relevance="ti", scale="minmax", out_dir=out)
    assert len(res.rows) == len(taus) * len(ks)
    assert {(r["tau"], r["k"]) for r in res.rows} == {(t, k) for t in taus for k in ks}
    for r in res.rows:
        for col in ("distractor_share", "false_positive_risk", "positional_queries",
                    "short_share"):
            assert 0.0 <= r[col] <= 1.0, (col, r)
        assert 0.0 <= r["expected_distractors_per_mosaic"] <= 3.0
        assert 0.0 < r["kept_mean"] <= r["k"]
        assert r["positional_queries"] > 0

    for tau in taus:
        for k in ks:
            mt = pipe_for(demo, work, f"mosaic_tables.tau_ti={'null' if tau is None else tau}",
                          f"mosaic_tables.k={k}", "mosaic_tables.scale=minmax",
                          "mosaic_tables.relevance=ti")
            mt.run("mosaic_tables")
            share, risk, kept_mean, short, positional, n = direct_rates(mt)
            got = res.row(tau, k)
            assert got["queries"] == n
            assert got["distractor_share"] == pytest.approx(share, abs=1e-12), (tau, k)
            assert got["expected_distractors_per_mosaic"] == pytest.approx(3 * share, abs=1e-12)
            assert got["false_positive_risk"] == pytest.approx(risk, abs=1e-12), (tau, k)
            assert got["kept_mean"] == pytest.approx(kept_mean, abs=1e-12)
            assert got["short_share"] == pytest.approx(short, abs=1e-12)
            assert got["positional_queries"] == pytest.approx(positional, abs=1e-12)

    table = pq.read_table(out / "calibration.parquet")
    assert table.num_rows == 4 and table.column_names == list(COLUMNS)
    assert (out / "calibration.csv").read_text().count("\n") == 5
    assert (out / "calibration.png").stat().st_size > 0

    # the CLI entry reuses the cached negatives and writes the same numbers
    out2 = calibrate_command("refcoco", tmp_path / "cmd", taus, ks, "ti", "minmax",
                             work_dir=work, sets=SETS, data_root=demo.refer_root,
                             images=demo.images_dir)
    assert out2 == tmp_path / "cmd"
    assert pq.read_table(out2 / "calibration.parquet").equals(table)
    assert (out2 / "calibration.png").stat().st_size > 0


def test_evaluation_queries_of_the_negatives_table_do_not_count(demo, work, tmp_path):
    """negatives.query_splits wider than train adds rows no mosaic is ever made of: the grid
    is that of the training rows alone (the train-only table's), counted from ingest here."""
    base = pipe_for(demo, work)
    base.run("negatives")
    wide = pipe_for(demo, work, "negatives.query_splits=[train,val,testA,testB]")
    wide.run("negatives")
    taus, ks = [0.8, None], [3, 8]
    a = calibrate(base, taus, ks, out_dir=None)
    b = calibrate(wide, taus, ks, out_dir=None)
    refs = pq.read_table(base.artifact_dir("ingest") / "refs").to_pylist()
    train_refs = {r["ref_id"] for r in refs if r["split"] == "train"}
    sents = pq.read_table(base.artifact_dir("ingest") / "sentences").to_pylist()
    n_train = sum(s["ref_id"] in train_refs for s in sents)
    wide_rows = pq.read_table(wide.artifact_dir("negatives") / "negatives").num_rows
    assert wide_rows > n_train  # the wide table does hold evaluation queries
    assert b.rows == a.rows and b.rows[0]["queries"] == n_train
    assert b.meta["non_training_queries_skipped"] == wide_rows - n_train
    assert b.meta["train_split"] == "train" and a.meta["non_training_queries_skipped"] == 0


def test_a_k_above_negatives_m_is_refused_before_any_work(demo, work, tmp_path):
    sets = [*SETS, "negatives.m=40"]
    with pytest.raises(NemoError, match=r"K 41 is above negatives.m=40.*negatives.m=41"):
        calibrate_command("refcoco", tmp_path / "out", [None], [3, 41], work_dir=work,
                          sets=sets, data_root=demo.refer_root, images=demo.images_dir)
    assert not (tmp_path / "out").exists()
    pipe = pipe_for(demo, work, "negatives.m=40")
    assert not pipe.store.is_published("refcoco", "negatives", pipe.resolve("negatives").key)
    with pytest.raises(NemoError, match="K 41 is above negatives.m=40"):
        calibrate(pipe, [None], [41])
