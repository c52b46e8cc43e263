"""The official NeMo sampler's options in NemoDataset, against independent oracles.

Oracles: mosaics built by hand with numpy from solid-colour PNG images (exact under any resize)
and block masks whose nearest-neighbour sampling points are worked out below; the official
loader's placement rule (snuviplab/NeMo `dataloader.py`, `fp_restrict`) re-implemented here as
written; brute-force Python sets for the k=all candidates and the random pool; binomial bounds
for the mode probabilities (seeded draws: deterministic, never flaky).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from test_dataset import (
    IMAGES_SCHEMA,
    SPLIT_SCHEMA,
    _loader_samples,
    make_row,
    object_mask,
    sample_key,
    seal,
    write_table,
)

from pipeline.training.dataset import NemoDataset
from pipeline.training.sampling import allowed_cells
from stages.text.positional import quadrants_for_tokens, tokenize

V4_SCHEMA = pa.schema([*SPLIT_SCHEMA, ("hn_source_ids", pa.list_(pa.int64())),
                       ("view_names", pa.list_(pa.string())),
                       ("view_texts", pa.list_(pa.string())), ("neg_from_pool", pa.bool_()),
                       ("excluded_image_ids", pa.list_(pa.int64()))])
POOL = list(range(1, 21))  # training images
EVAL_ONLY = [90, 91, 92]  # images of evaluation rows only


def colour(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 50) % 256, (151 * i + 100) % 256)


def sizes_of() -> dict[int, tuple[int, int]]:
    sizes = {i: (5 + i, 3 + i % 4) for i in POOL + EVAL_ONLY}
    sizes[1] = (12, 9)  # the positive of the hand-computed 3x3 mosaic
    sizes[2] = (6, 4)  # the positive of the hand-computed square mosaics
    return sizes


# The block mask of image 1 (12 x 9): rows 0..4, columns 0..5.
MASK_1 = np.zeros((9, 12), np.uint8)
MASK_1[:5, :6] = 1
# The mask of image 2 (6 x 4): a pattern with no symmetry.
MASK_2 = np.array([[1, 1, 0, 0, 0, 1],
                   [1, 0, 0, 1, 0, 0],
                   [0, 0, 1, 1, 0, 0],
                   [0, 0, 0, 0, 1, 1]], np.uint8)

PLACEMENT_SENTENCES = [
    # agree with the official rule
    "man on the left", "right guy", "top right corner", "bottom left cat", "lower right",
    "highest shelf item", "person in the middle", "top left dog", "leftmost zebra",
    # differ (see test_placement_differs_where_documented)
    "girl in bright shirt", "yellow car", "laptop on desk", "left and right", "cat under table",
    "upper left sheep",
]


@dataclass
class Fixture:
    root: Path
    images: Path
    rows: dict[str, list[dict]] = field(default_factory=dict)

    def ds(self, split: str = "train", **kw) -> NemoDataset:
        return NemoDataset(self.root, split, self.images, **kw)

    def index(self, sent_id: int) -> int:
        return [r["sent_id"] for r in self.rows["train"]].index(sent_id)


def v4_row(sent_id: int, image_id: int, split: str, mask: np.ndarray, *, from_pool=False,
           excluded=None, sent=None, **kw) -> dict:
    row = make_row(sent_id, image_id, split, mask, **kw)
    row.update(neg_from_pool=from_pool, excluded_image_ids=excluded)
    if from_pool:
        row["neg_image_ids"] = None
    if sent is not None:
        row["sent"] = sent
    return row


def write(root: Path, images: Path, rows: dict[str, list[dict]], version: str,
          pool: list[int] | None) -> None:
    """A shards dir of schema `version`: v4 with the two k=all columns and the pool table,
    older ones without either."""
    sizes = sizes_of()
    ids = sorted(sizes)
    write_table(pa.table({"image_id": ids, "file_name": [f"img_{i:04d}.png" for i in ids],
                          "width": [sizes[i][0] for i in ids],
                          "height": [sizes[i][1] for i in ids]}, schema=IMAGES_SCHEMA),
                root / "images" / "part-00000.parquet", version, 256)
    if pool is not None:
        write_table(pa.table({"image_id": pa.array(pool, pa.int64())}),
                    root / "pool" / "part-00000.parquet", version, 256)
    schema = V4_SCHEMA if version == "4" else SPLIT_SCHEMA
    for split, split_rows in rows.items():
        table = pa.Table.from_pylist(sorted(split_rows, key=lambda r: r["sent_id"]),
                                     schema=schema)
        write_table(table, root / split / "part-00000.parquet", version, 16)
    seal(root, version)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixture:
    base = tmp_path_factory.mktemp("sampler")
    images = base / "images"
    images.mkdir()
    sizes = sizes_of()
    assert len({colour(i) for i in sizes}) == len(sizes)
    for i, (w, h) in sizes.items():
        Image.new("RGB", (w, h), colour(i)).save(images / f"img_{i:04d}.png")
    rng = np.random.default_rng(5)

    def others(img: int, n: int) -> list[int]:
        return [int(v) for v in rng.choice([p for p in POOL if p != img], n, replace=False)]

    def mask(img: int, k: int) -> np.ndarray:
        # a blob plus the image's middle row and column: on these few-pixel images a cell of
        # 1-2 px must still sample some of the target, or the sample is shown single
        m = object_mask(*sizes[img], k)
        m[sizes[img][1] // 2, :] = m[:, sizes[img][0] // 2] = 1
        return m

    train = [
        v4_row(100, 1, "train", MASK_1, neg=[2, 3, 4, 5, 6, 7, 8, 9], quads=[0],
               sent="top left thing"),
        v4_row(101, 2, "train", MASK_2, neg=[3, 4, 5, 6, 7, 8, 9, 10], quads=[3]),
        v4_row(300, 11, "train", mask(11, 1), neg=[12, 13]),  # 2 survivors
        v4_row(301, 12, "train", mask(12, 2), neg=[]),  # none
        v4_row(302, 13, "train", mask(13, 3), neg=[14, 15, 16]),  # exactly 3
        v4_row(400, 13, "train", mask(13, 4), from_pool=True, excluded=[1, 2, 3, 4, 5]),
        v4_row(401, 14, "train", mask(14, 5), neg=[15, 16, 17, 18]),  # a listed k=all row
    ]
    for k, sent in enumerate(PLACEMENT_SENTENCES):
        img = 3 + k % 15
        train.append(v4_row(500 + k, img, "train", mask(img, k), neg=others(img, 9), sent=sent,
                            quads=quadrants_for_tokens(tokenize(sent))[1]))
    for k in range(40):
        img = 3 + k % 18
        train.append(v4_row(600 + k, img, "train", mask(img, k), neg=others(img, 10),
                            hn=[f"hard {k}.{j}" for j in range(3)]))
    val = [v4_row(900 + k, img, "val", mask(img, k), neg=[1, 2, 3])
           for k, img in enumerate(EVAL_ONLY)]
    rows = {"train": train, "val": val}
    write(base / "shards", images, rows, "4", POOL)
    return Fixture(base / "shards", images, rows)


# ----------------------------------------------------------------------- hand-computed mosaics
def paint(canvas: np.ndarray, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    x0, y0, w, h = box
    canvas[y0:y0 + h, x0:x0 + w] = rgb


def test_hand_computed_3x3_mosaic(fx):
    """Positive 12 x 9 (image 1), 3x3 at its own size: cuts x 0 4 8 12, y 0 3 6 9, cells 4 x 3.
    "top left" -> cell 0. Nearest sampling of the mask into 4 x 3 reads source columns 1 4 7 10
    and rows 1 4 7: the block (rows 0-4, cols 0-5) gives ones at cell columns 0-1, rows 0-1."""
    ds = fx.ds(gamma=1.0, grid=3, positional_constraint=True)
    i = fx.index(100)
    boxes = [(x, y, 4, 3) for y in (0, 3, 6) for x in (0, 4, 8)]
    seen = set()
    for epoch in range(6):
        s = ds[(epoch, i)]
        meta = s["meta"]
        assert meta["grid"] == 3 and meta["quadrant"] == 0 and meta["mosaic_kind"] == "retrieval"
        assert meta["cells"] == [list(b) for b in boxes]
        src = meta["source_image_ids"]
        assert src[0] == 1 and sorted(src[1:]) == [2, 3, 4, 5, 6, 7, 8, 9]
        seen.add(tuple(src))
        want = np.zeros((9, 12, 3), np.uint8)
        for j, box in enumerate(boxes):
            paint(want, box, colour(src[j]))
        np.testing.assert_array_equal(np.asarray(s["image"]), want)
        want_mask = np.zeros((9, 12), np.uint8)
        want_mask[0:2, 0:2] = 1
        np.testing.assert_array_equal(s["mask"], want_mask)
    assert len(seen) > 1  # the negatives' placement changes with the epoch


@pytest.mark.parametrize("grid,size,cuts", [(2, 24, [0, 12, 24]), (3, 24, [0, 8, 16, 24]),
                                            (3, 25, [0, 8, 16, 25])])
def test_hand_computed_square_mosaic(fx, grid, size, cuts):
    """cell_geometry="square": an input_size square cut at (i * size) // grid; the positive
    (6 x 4, image 2, "bottom right") stretched into the last cell. On 2x2 at 24 its cell is
    12 x 12: nearest sampling reads source column x // 2 and row y // 3, i.e. the mask repeated
    3 x 2 (np.kron)."""
    ds = fx.ds(gamma=1.0, grid=grid, cell_geometry="square", input_size=size,
               positional_constraint=True)
    s = ds[(0, fx.index(101))]
    meta = s["meta"]
    boxes = [(cuts[c], cuts[r], cuts[c + 1] - cuts[c], cuts[r + 1] - cuts[r])
             for r in range(grid) for c in range(grid)]
    last = grid * grid - 1
    assert meta["cells"] == [list(b) for b in boxes] and meta["quadrant"] == last
    assert s["image"].size == (size, size) and s["mask"].shape == (size, size)
    want = np.zeros((size, size, 3), np.uint8)
    for j, box in enumerate(boxes):
        paint(want, box, colour(meta["source_image_ids"][j]))
    np.testing.assert_array_equal(np.asarray(s["image"]), want)
    if grid == 2:
        want_mask = np.zeros((size, size), np.uint8)
        want_mask[12:, 12:] = np.kron(MASK_2, np.ones((3, 2), np.uint8))
        np.testing.assert_array_equal(s["mask"], want_mask)
    else:  # the mask stays inside the positive's cell and is not empty
        x0, y0, w, h = boxes[last]
        assert s["mask"][y0:y0 + h, x0:x0 + w].any()
        assert s["mask"].sum() == s["mask"][y0:y0 + h, x0:x0 + w].sum()


@pytest.mark.parametrize("grid,ranges", [
    (2, [(104, 312)]),  # 416 / 4 = 104 .. 3 * 416 / 4 = 312 (exclusive)
    (3, [(70, 208), (208, 347)]),  # ceil(416 / 6) = 70 .. 208, 208 .. ceil(5 * 416 / 6) = 347
])
def test_shifted_cross_point_ranges_by_hand(fx, grid, ranges):
    ds = fx.ds(gamma=1.0, grid=grid, cell_geometry="square", cross_point="shifted")
    got: list[set[int]] = [set() for _ in ranges]
    for epoch in range(8):
        for i in range(0, len(ds), 2):
            meta = ds[(epoch, i)]["meta"]
            if not meta["is_mosaic"]:
                continue
            cells = meta["cells"]
            xs = sorted({c[0] for c in cells} - {0})
            ys = sorted({c[1] for c in cells} - {0})
            assert len(xs) == len(ys) == grid - 1
            for k, (lo, hi) in enumerate(ranges):
                assert lo <= xs[k] < hi and lo <= ys[k] < hi
                got[k].update((xs[k], ys[k]))
            _assert_tiles(cells, 416, 416)
    for k, (lo, hi) in enumerate(ranges):  # the draws reach both ends of the range's half
        assert min(got[k]) < lo + (hi - lo) // 4 and max(got[k]) > hi - (hi - lo) // 4


def test_random_cross_point_tiles_with_unequal_cells_and_paints_them(fx):
    ds = fx.ds(gamma=1.0, grid=3, cross_point="random", cell_geometry="square", input_size=40)
    widths = set()
    for epoch in range(4):
        for i in range(0, len(ds), 3):
            s = ds[(epoch, i)]
            meta = s["meta"]
            if not meta["is_mosaic"]:
                continue
            _assert_tiles(meta["cells"], 40, 40)
            widths.update(c[2] for c in meta["cells"])
            want = np.zeros((40, 40, 3), np.uint8)
            for j, box in enumerate(meta["cells"]):
                paint(want, box, colour(meta["source_image_ids"][j]))
            np.testing.assert_array_equal(np.asarray(s["image"]), want)
    assert len(widths) > 6


def _assert_tiles(cells: list[list[int]], w: int, h: int) -> None:
    cover = np.zeros((h, w), int)
    for x0, y0, cw, ch in cells:
        assert cw >= 1 and ch >= 1
        cover[y0:y0 + ch, x0:x0 + cw] += 1
    assert (cover == 1).all()


# ------------------------------------------------------------------ the official placement rule
OFFICIAL_LR = {"left": [0, 2], "right": [1, 3]}
OFFICIAL_OTHER = {"top": [0, 1], "high": [0, 1], "above": [0, 1], "bottom": [2, 3],
                  "low": [2, 3], "below": [2, 3], "under": [2, 3], "beneath": [2, 3]}


def official_insert_choices(sent: str) -> set[int]:
    """Where snuviplab/NeMo dataloader.py (fp_restrict, 2x2) may insert the positive: the first
    key of each dict found as a *substring* of the sentence, in dict order; both -> the first
    element of the intersection; one -> np.random.choice of its list; none -> any of 4."""
    lr = next((OFFICIAL_LR[k] for k in OFFICIAL_LR if k in sent), None)
    other = next((OFFICIAL_OTHER[k] for k in OFFICIAL_OTHER if k in sent), None)
    if lr is not None and other is not None:
        return {list(set(lr) & set(other))[0]}
    if lr is not None:
        return set(lr)
    if other is not None:
        return set(other)
    return {0, 1, 2, 3}


def ours(sent: str, grid: int = 2) -> set[int]:
    return set(allowed_cells(quadrants_for_tokens(tokenize(sent))[1], grid, True))


AGREE = PLACEMENT_SENTENCES[:9]
DIFFER = {  # sentence: (official, ours)
    "girl in bright shirt": ({1, 3}, {0, 1, 2, 3}),  # substring "right" in "bright"
    "yellow car": ({2, 3}, {0, 1, 2, 3}),  # "low" in "yellow"
    "laptop on desk": ({0, 1}, {0, 1, 2, 3}),  # "top" in "laptop"
    "left and right": ({0, 2}, {0, 1, 2, 3}),  # first key wins; a conflict allows all here
    "cat under table": ({2, 3}, {0, 1, 2, 3}),  # relations are not positions here
    "upper left sheep": ({0, 2}, {0}),  # "upper" is not an official key
}


def test_placement_agrees_with_the_official_rule(fx):
    ds = fx.ds(gamma=1.0, positional_constraint=True)
    for sent in AGREE:
        want = official_insert_choices(sent)
        assert ours(sent) == want, sent
        i = fx.index(500 + PLACEMENT_SENTENCES.index(sent))
        assert ds.row(i)["sent"] == sent
        got = {ds[(epoch, i)]["meta"]["quadrant"] for epoch in range(24)}
        assert got == want, sent  # never outside, and every allowed quadrant is used


def test_placement_differs_where_documented(fx):
    ds = fx.ds(gamma=1.0, positional_constraint=True)
    assert set(DIFFER) == set(PLACEMENT_SENTENCES[9:])
    for sent, (official, mine) in DIFFER.items():
        assert official_insert_choices(sent) == official, sent
        assert ours(sent) == mine, sent
        i = fx.index(500 + PLACEMENT_SENTENCES.index(sent))
        assert {ds[(epoch, i)]["meta"]["quadrant"] for epoch in range(32)} == mine, sent


def test_3x3_placement_by_column_and_row():
    """left -> column 0, right -> column 2, top -> row 0, bottom -> row 2, intersected; the
    official loader reuses its 2x2 indices on 3x3 (left -> cells 0 or 2, the top corners)."""
    assert ours("man on the left", 3) == {0, 3, 6}
    assert ours("right guy", 3) == {2, 5, 8}
    assert ours("top right corner", 3) == {2}
    assert ours("bottom left cat", 3) == {6}
    assert ours("highest shelf item", 3) == {0, 1, 2}
    assert ours("lower right", 3) == {8}
    assert ours("person in the middle", 3) == set(range(9))
    assert official_insert_choices("man on the left") == {0, 2}
    assert allowed_cells([0, 3], 3, True) == list(range(9))  # not a rectangle
    assert allowed_cells([2], 3, False) == list(range(9))


# ---------------------------------------------------------------------------------- the pool
def test_random_mosaics_never_own_or_eval_only_images_and_cover_the_pool(fx):
    ds = fx.ds(mosaic="random", gamma=1.0, grid=3)
    assert ds.pool.tolist() == POOL
    counts: dict[int, int] = {}
    trials: dict[int, int] = {}
    n = shown_single = 0
    for epoch in range(6):
        for i, row in enumerate(fx.rows["train"]):
            meta = ds[(epoch, i)]["meta"]
            if meta["fallback"] == "target_too_small":  # a few-pixel image's target missed
                assert not meta["is_mosaic"]  # by a 1-2 px cell: shown single, not counted
                shown_single += 1
                continue
            for v in POOL:
                if v != row["image_id"]:
                    trials[v] = trials.get(v, 0) + 1
            assert meta["is_mosaic"] and meta["mosaic_kind"] == "random", (row["sent_id"], meta)
            negs = [s for j, s in enumerate(meta["source_image_ids"]) if j != meta["quadrant"]]
            assert len(set(negs)) == 8 and row["image_id"] not in negs
            assert set(negs) <= set(POOL) - {row["image_id"]}
            for v in negs:
                counts[v] = counts.get(v, 0) + 1
            n += 1
    assert set(counts) == set(POOL) and shown_single < n // 10
    # uniform: image v is drawn by a mosaic with probability 8/19 unless v is its own image
    p = 8 / 19
    for v, c in counts.items():
        assert abs(c - trials[v] * p) < 5 * math.sqrt(trials[v] * p * (1 - p)), (v, c, trials)


def test_pool_of_an_older_schema_is_the_training_rows_images(fx, tmp_path):
    rows = {"train": [{k: v for k, v in r.items() if k not in ("neg_from_pool",
                                                               "excluded_image_ids")}
                      | {"neg_image_ids": r["neg_image_ids"] or []}
                      for r in fx.rows["train"] if not r["neg_from_pool"]],
            "val": [{k: v for k, v in r.items() if k not in ("neg_from_pool",
                                                             "excluded_image_ids")}
                    for r in fx.rows["val"]]}
    write(tmp_path / "shards", fx.images, rows, "3", None)
    ds = NemoDataset(tmp_path / "shards", "train", fx.images, mosaic="random", gamma=1.0)
    want = sorted({r["image_id"] for r in rows["train"]})
    assert ds.pool.tolist() == want and not set(want) & set(EVAL_ONLY)
    for i in range(len(ds)):
        meta = ds[i]["meta"]
        negs = set(meta["source_image_ids"]) - {meta["image_id"]}
        assert negs <= set(want)
    assert NemoDataset(tmp_path / "shards", "val", fx.images).pool is None


def test_k_all_rows_draw_from_the_brute_force_set(fx):
    ds = fx.ds(gamma=1.0)
    for sid, want in ((400, set(POOL) - {1, 2, 3, 4, 5} - {13}), (401, {15, 16, 17, 18})):
        i = fx.index(sid)
        seen = set()
        for epoch in range(80):
            meta = ds[(epoch, i)]["meta"]
            negs = [s for j, s in enumerate(meta["source_image_ids"]) if j != meta["quadrant"]]
            assert len(set(negs)) == 3 and set(negs) <= want, (sid, negs)
            seen.update(negs)
        assert seen == want, sid


# ------------------------------------------------------------------------------ the fallback
def _negatives(meta: dict) -> list[int]:
    return [s for j, s in enumerate(meta["source_image_ids"]) if j != meta["quadrant"]]


def test_fallback_single_replace_pool(fx):
    two, none, three = fx.index(300), fx.index(301), fx.index(302)
    single = fx.ds(gamma=1.0)
    for epoch in range(3):
        for i in (two, none):
            meta = single[(epoch, i)]["meta"]
            assert not meta["is_mosaic"] and meta["fallback"] == "single"
        meta = single[(epoch, three)]["meta"]
        assert meta["is_mosaic"] and meta["fallback"] is None and meta["fallback_cells"] == 0
    rep = fx.ds(gamma=1.0, fallback="replace")
    repeated = set()
    for epoch in range(10):
        meta = rep[(epoch, two)]["meta"]
        negs = _negatives(meta)
        assert meta["is_mosaic"] and meta["fallback"] == "replace" and meta["fallback_cells"] == 1
        assert sorted(set(negs)) == [12, 13] and len(negs) == 3
        repeated.add(max(negs, key=negs.count))
        assert not rep[(epoch, none)]["meta"]["is_mosaic"]
        assert rep[(epoch, none)]["meta"]["fallback"] == "single"
    assert repeated == {12, 13}  # the repeated survivor is drawn too
    pool = fx.ds(gamma=1.0, fallback="pool", grid=3)
    for epoch in range(10):
        for i, have in ((two, {12, 13}), (none, set())):
            meta = pool[(epoch, i)]["meta"]
            negs = _negatives(meta)
            own = fx.rows["train"][i]["image_id"]
            assert meta["fallback"] == "pool" and meta["fallback_cells"] == 8 - len(have)
            assert len(set(negs)) == 8 and have <= set(negs) <= set(POOL) - {own}


def test_replacement_draws_may_repeat(fx):
    ds = fx.ds(gamma=1.0, replace=True)
    i = fx.index(302)  # 3 candidates: distinct only 6 times in 27
    repeats = 0
    for epoch in range(40):
        negs = _negatives(ds[(epoch, i)]["meta"])
        assert set(negs) <= {14, 15, 16}
        repeats += len(set(negs)) < 3
    assert repeats > 20
    distinct = fx.ds(gamma=1.0)
    assert all(len(set(_negatives(distinct[(e, i)]["meta"]))) == 3 for e in range(10))


# ----------------------------------------------------------------------- modes and curricula
def _binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


def test_mixed_mode_probabilities(fx):
    ds = fx.ds(mosaic="mixed", random_prob=0.25, retrieval_prob=0.35, grid="mixed")
    kinds = {"one": 0, "random": 0, "retrieval": 0}
    grids = {2: 0, 3: 0}
    rows = [i for i, r in enumerate(fx.rows["train"]) if r["sent_id"] >= 600]
    n = 0
    for epoch in range(12):
        for i in rows:
            meta = ds[(epoch, i)]["meta"]
            kinds[meta["mosaic_kind"]] += 1
            if meta["is_mosaic"]:
                grids[meta["grid"]] += 1
            n += 1
    assert _binomial_ok(kinds["retrieval"], n, 0.35), kinds
    assert _binomial_ok(kinds["random"], n, 0.25), kinds
    assert _binomial_ok(kinds["one"], n, 0.40), kinds
    assert _binomial_ok(grids[3], grids[2] + grids[3], 0.5), grids


@pytest.mark.parametrize("mode", ["retrieval", "random"])
def test_gamma_is_the_mosaic_probability_of_one_kind(fx, mode):
    ds = fx.ds(mosaic=mode, gamma=0.3)
    rows = [i for i, r in enumerate(fx.rows["train"]) if r["sent_id"] >= 600]
    metas = [ds[(e, i)]["meta"] for e in range(12) for i in rows]
    assert {m["mosaic_kind"] for m in metas} == {"one", mode}
    assert _binomial_ok(sum(m["is_mosaic"] for m in metas), len(metas), 0.3)


def test_two_curricula_and_random_before_start(fx):
    ds = fx.ds(gamma=1.0, n_hard_negatives=2, mosaic_start_epoch=2,
               hard_negatives_start_epoch=4)
    i = fx.index(600)
    for epoch, mosaic, hard in ((0, False, False), (1, False, False), (2, True, False),
                                (3, True, False), (4, True, True), (7, True, True)):
        s = ds[(epoch, i)]
        assert s["meta"]["is_mosaic"] == mosaic and bool(s["hard_negatives"]) == hard, epoch
    before = fx.ds(gamma=0.5, mosaic_start_epoch=3, random_before_start=True)
    rows = [i for i, r in enumerate(fx.rows["train"]) if r["sent_id"] >= 600]
    early = [before[(e, i)]["meta"] for e in range(3) for i in rows]
    late = [before[(e, i)]["meta"] for e in range(3, 6) for i in rows]
    assert {m["mosaic_kind"] for m in early} == {"one", "random"}
    assert _binomial_ok(sum(m["is_mosaic"] for m in early), len(early), 0.5)
    assert {m["mosaic_kind"] for m in late} == {"one", "retrieval"}
    assert not any(fx.ds(gamma=1.0, mosaic_start_epoch=3)[(e, i)]["meta"]["is_mosaic"]
                   for e in range(3) for i in rows[:8])


def test_curriculum_shorthand_and_conflicts(fx):
    both = fx.ds(curriculum_start_epoch=3)
    assert (both.mosaic_start_epoch, both.hard_negatives_start_epoch) == (3, 3)
    same = fx.ds(curriculum_start_epoch=3, mosaic_start_epoch=3)
    assert (same.mosaic_start_epoch, same.hard_negatives_start_epoch) == (3, 3)
    split = fx.ds(mosaic_start_epoch=1, hard_negatives_start_epoch=5)
    assert (split.mosaic_start_epoch, split.hard_negatives_start_epoch) == (1, 5)
    with pytest.raises(ValueError, match="curriculum_start_epoch=3 sets both"):
        fx.ds(curriculum_start_epoch=3, hard_negatives_start_epoch=4)


@pytest.mark.parametrize("kw", [
    {"mosaic": "grid"}, {"grid": 4}, {"grid": True}, {"grid": 2.0}, {"random_prob": 0.2},
    {"mosaic": "mixed"}, {"mosaic": "mixed", "random_prob": 0.6, "retrieval_prob": 0.6},
    {"mosaic": "mixed", "random_prob": -0.1, "retrieval_prob": 0.2},
    {"cell_geometry": "circle"}, {"input_size": 4}, {"input_size": 416.0},
    {"cross_point": "left"}, {"fallback": "retry"}, {"mosaic_start_epoch": -1},
    {"curriculum_start_epoch": -1},
])
def test_bad_sampler_arguments(fx, kw):
    with pytest.raises(ValueError):
        fx.ds(**kw)


def test_eval_split_is_never_a_mosaic(fx):
    ds = fx.ds("val", mosaic="random", gamma=1.0, random_before_start=True,
               mosaic_start_epoch=2)
    for epoch in range(4):
        for i in range(len(ds)):
            meta = ds[(epoch, i)]["meta"]
            assert not meta["is_mosaic"] and meta["mosaic_kind"] == "one" and meta["grid"] == 1


# ------------------------------------------------------------------------------- determinism
OPTIONS = dict(mosaic="mixed", random_prob=0.3, retrieval_prob=0.5, grid="mixed",
               cross_point="shifted", cell_geometry="square", input_size=48,
               fallback="pool", positional_constraint=True, n_hard_negatives=2, seed=11)


def test_draws_differ_across_epochs_and_agree_across_worker_counts(fx):
    ds = fx.ds(**OPTIONS)
    ds.set_epoch(1)
    direct = [sample_key(ds[i]) for i in range(len(ds))]
    assert _loader_samples(ds, 0) == direct
    other = fx.ds(**OPTIONS)
    other.set_epoch(1)
    assert _loader_samples(other, 2) == direct
    ds.set_epoch(2)
    later = [json.loads(k[-1]) for k in (sample_key(ds[i]) for i in range(len(ds)))]
    before = [json.loads(k[-1]) for k in direct]
    differ = sum(a["source_image_ids"] != b["source_image_ids"] or a["cells"] != b["cells"]
                 for a, b in zip(before, later, strict=True))
    assert differ > len(ds) // 2


def test_random_mosaics_stay_distinct_with_replace(fx):
    ds = fx.ds(mosaic="random", gamma=1.0, grid=3, replace=True)
    for epoch in range(3):
        for i in range(0, len(ds), 4):
            negs = _negatives(ds[(epoch, i)]["meta"])
            assert len(set(negs)) == 8
