"""NemoDataset's sentence draw (`expressions`) and fresh hard-negative draw, on hand-built shards.

The shards are written here with pyarrow from the schema declaration (`row_schema`), the images
with PIL; every expectation is taken from the rows as written (the views and pools put in), never
from the reader's helpers.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.training.dataset import NemoDataset, collate_fn
from pipeline.training.schema import row_schema

VERSION_KEY = b"nemo_pipe.schema_version"
W, H = 24, 16
IMAGES = (1, 2, 3, 4, 5)
VIEW_NAMES = ("appearance", "action", "spatial", "appearance_alt")
KINDS = ("same_image", "neighbour", "neighbour_same_class", "swap_color")


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def train_row(i: int) -> dict:
    """Row i: pool of i % 17 negatives (0 .. 16), views 0 .. 4 (none for every fifth row)."""
    mask = np.zeros((H, W), np.uint8)
    mask[2:9, 3:3 + 1 + i % 10] = 1
    pool = i % 17
    n_views = i % 5
    return {
        "sent_id": 100 + i, "ref_id": 50 + i // 2, "image_id": IMAGES[i % 2], "split": "train",
        "sent": f"original {i}", "category_id": 1, "ann_ids": [7000 + i], "no_target": False,
        "mask_rle": rle(mask), "neg_image_ids": [3, 4, 5] if i % 3 == 0 else [],
        "k_shortfall": 0, "positional_words": [], "allowed_quadrants": [0, 1, 2, 3],
        "hn_texts": [f"neg {i}.{j}" for j in range(pool)],
        "hn_kinds": [KINDS[j % 4] for j in range(pool)],
        "hn_scores": [0.9 - 0.01 * j for j in range(pool)],
        "hn_source_ids": [10_000 + 100 * i + j for j in range(pool)],
        "view_names": list(VIEW_NAMES[:n_views]),
        "view_texts": [f"view {i} {VIEW_NAMES[k]}" for k in range(n_views)],
    }


def write_split(root: Path, split: str, rows: list[dict], version: str,
                drop: tuple[str, ...] = ()) -> None:
    schema = row_schema()
    table = pa.Table.from_pylist(rows, schema=schema)
    table = table.select([c for c in schema.names if c not in drop])
    path = root / split / "part-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: version.encode()}), path,
                   row_group_size=8)


def build(root: Path, rows: dict[str, list[dict]], version: str = "4",
          with_views: bool | None = True, drop: tuple[str, ...] = ()) -> Path:
    """A sealed shards dir (manifest listing every file's size and sha256, then _SUCCESS)."""
    root.mkdir(parents=True)
    images = pa.table({"image_id": list(IMAGES),
                       "file_name": [f"img_{i}.jpg" for i in IMAGES],
                       "width": [W] * len(IMAGES), "height": [H] * len(IMAGES)})
    path = root / "images" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(images.replace_schema_metadata({VERSION_KEY: version.encode()}), path)
    for split, split_rows in rows.items():
        write_split(root, split, split_rows, version, drop)
    files = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size,
                                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {"stage": "shards", "schema_version": version, "key": "test", "files": files}
    if with_views is not None:
        manifest["with_views"] = with_views
    (root / "_manifest.json").write_text(json.dumps(manifest))
    (root / "_SUCCESS").write_text("")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("draws")
    images = base / "images"
    images.mkdir()
    for i in IMAGES:
        Image.new("RGB", (W, H), (40 * i, 20, 200 - 30 * i)).save(images / f"img_{i}.jpg")
    train = [train_row(i) for i in range(40)]
    val = [{**train_row(i), "sent_id": 900 + i, "split": "val", "hn_texts": [], "hn_kinds": [],
            "hn_scores": [], "hn_source_ids": [], "neg_image_ids": []} for i in range(4)]
    root = build(base / "shards", {"train": train, "val": val})
    return {"root": root, "images": images, "train": train, "val": val, "base": base}


def ds(data: dict, split: str = "train", **kw) -> NemoDataset:
    kw.setdefault("gamma", 0.0)
    return NemoDataset(data.get("shards", data["root"]), split, data["images"], **kw)


# ------------------------------------------------------------------------------- expressions
def test_original_is_the_default_and_reads_no_views(data):
    d = ds(data, n_hard_negatives=0)
    assert d.rows_without_views is None
    for i, row in enumerate(data["train"]):
        s = d[i]
        assert s["sentence"] == row["sent"]
        assert (s["meta"]["expression"], s["meta"]["expression_fallback"]) == ("original", False)


def test_views_draw_a_view_named_in_meta_and_fall_back_without_one(data):
    d = ds(data, expressions="views")
    rows = data["train"]
    assert d.rows_without_views == sum(1 for r in rows if not r["view_texts"])
    seen: dict[int, set[str]] = {i: set() for i in range(len(rows))}
    for epoch in range(24):
        d.set_epoch(epoch)
        for i, row in enumerate(rows):
            s = d[i]
            meta = s["meta"]
            if not row["view_texts"]:
                assert s["sentence"] == row["sent"]
                assert (meta["expression"], meta["expression_fallback"]) == ("original", True)
                continue
            pairs = dict(zip(row["view_names"], row["view_texts"], strict=True))
            assert meta["expression_fallback"] is False
            assert pairs[meta["expression"]] == s["sentence"]  # the name says which view
            seen[i].add(meta["expression"])
    # 24 uniform draws among at most 4 views miss one with probability < 4 * (3/4)^24 = 0.004
    for i, row in enumerate(rows):
        assert seen[i] == set(row["view_names"]), i


def test_both_shows_the_original_one_time_in_v_plus_one(data):
    d = ds(data, expressions="both")
    rows = data["train"]
    n = hits = 0
    expected = 0.0
    var = 0.0
    for epoch in range(30):
        d.set_epoch(epoch)
        for i, row in enumerate(rows):
            s = d[i]
            texts = {"original": row["sent"],
                     **dict(zip(row["view_names"], row["view_texts"], strict=True))}
            assert texts[s["meta"]["expression"]] == s["sentence"]
            assert s["meta"]["expression_fallback"] == (not row["view_texts"])
            if row["view_texts"]:
                p = 1 / (len(row["view_texts"]) + 1)
                n += 1
                hits += s["meta"]["expression"] == "original"
                expected += p
                var += p * (1 - p)
    assert n and abs(hits - expected) < 4 * math.sqrt(var), (hits, expected)


def test_evaluation_splits_always_show_the_original(data):
    d = ds(data, "val", expressions="views")
    for i, row in enumerate(data["val"]):
        s = d[i]
        assert s["sentence"] == row["sent"] and s["meta"]["expression"] == "original"
        assert s["meta"]["expression_fallback"] is False


def test_views_need_shards_built_with_views(data):
    root = build(data["base"] / "no_views", {"train": data["train"][:4]}, with_views=False)
    with pytest.raises(ValueError, match=r"shards.with_views=true"):
        ds({**data, "shards": root}, expressions="views")
    old = build(data["base"] / "v3_views", {"train": data["train"][:4]}, version="3",
                with_views=None, drop=("hn_source_ids", "view_names", "view_texts"))
    with pytest.raises(ValueError, match=r"predate schema 4"):
        ds({**data, "shards": old}, expressions="both")
    with pytest.raises(ValueError, match="expressions must be one of"):
        ds(data, expressions="generated")


def test_expressions_leave_the_mosaic_draws_alone(data):
    """The sentence has a stream of its own: the mosaic of a sample is the same whatever
    `expressions` is (and the negatives too)."""
    a = ds(data, gamma=0.7, n_hard_negatives=3, thumbnails=False)
    b = ds(data, gamma=0.7, n_hard_negatives=3, thumbnails=False, expressions="both")
    mosaics = 0
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(len(a)):
            x, y = a[i], b[i]
            keys = ("is_mosaic", "quadrant", "source_image_ids")
            assert [x["meta"][k] for k in keys] == [y["meta"][k] for k in keys]
            assert x["hard_negatives"] == y["hard_negatives"]
            np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
            mosaics += x["meta"]["is_mosaic"]
    assert mosaics


def _positional_rows() -> list[dict]:
    """The original names the left; the views name the right, nothing, and the top."""
    rows = []
    for i in range(12):
        row = train_row(i)
        row.update(sent=f"man on the left {i}", neg_image_ids=[3, 4, 5],
                   positional_words=["left"], allowed_quadrants=[0, 2],
                   view_names=["spatial", "appearance", "action"],
                   view_texts=["man on the right", "a man in red", "man at the top"],
                   view_allowed_quadrants=[[1, 3], [], [0, 1]])
        rows.append(row)
    return rows


# the cells each text may put the positive in (hand-made; 2x2, row-major)
ALLOWED_BY_TEXT = {"man on the right": {1, 3}, "a man in red": {0, 1, 2, 3},
                   "man at the top": {0, 1}}


@pytest.mark.parametrize("expressions", ["views", "both"])
def test_positional_constraint_follows_the_text_shown(data, expressions):
    """A view naming the right must not be shown in a left cell because the row's original
    sentence says left: the positive's cell follows the words of the text the sample shows."""
    root = build(data["base"] / f"positional_{expressions}", {"train": _positional_rows()},
                 version="5")
    d = ds({**data, "shards": root}, gamma=1.0, positional_constraint=True,
           expressions=expressions, thumbnails=False)
    seen: dict[str, set[int]] = {}
    for epoch in range(6):
        d.set_epoch(epoch)
        for i in range(len(d)):
            s = d[i]
            assert s["meta"]["is_mosaic"] and s["meta"]["grid"] == 2
            text = s["sentence"]
            allowed = ({0, 2} if text.startswith("man on the left") else ALLOWED_BY_TEXT[text])
            assert s["meta"]["quadrant"] in allowed, (text, s["meta"]["quadrant"])
            assert set(s["meta"]["allowed_quadrants"]) == allowed
            seen.setdefault(text.rstrip("0123456789 "), set()).add(s["meta"]["quadrant"])
    assert seen["a man in red"] & {1, 3}  # not held to the original's left cells
    assert seen["man on the right"] and seen["man at the top"]
    if expressions == "both":
        assert seen["man on the left"]


def test_views_of_schema_4_shards_go_in_any_cell(data):
    """Schema 4 stored no quadrants for views: their words are unknown to the reader, so a view
    is not held to the original sentence's cells."""
    rows = _positional_rows()
    for r in rows:
        del r["view_allowed_quadrants"]
    root = build(data["base"] / "positional_v4", {"train": rows}, version="4",
                 drop=("view_allowed_quadrants",))
    d = ds({**data, "shards": root}, gamma=1.0, positional_constraint=True, expressions="views",
           thumbnails=False)
    cells = set()
    for epoch in range(4):
        d.set_epoch(epoch)
        for i in range(len(d)):
            s = d[i]
            assert s["meta"]["allowed_quadrants"] == [0, 1, 2, 3]
            cells.add(s["meta"]["quadrant"])
    assert cells == {0, 1, 2, 3}


# --------------------------------------------------------------------------- hard negatives
def test_negatives_are_drawn_from_the_pool_without_repeats_with_kinds_and_sources(data):
    n = 4
    d = ds(data, n_hard_negatives=n)
    rows = data["train"]
    hits = {i: np.zeros(len(r["hn_texts"]), int) for i, r in enumerate(rows)}
    epochs = 40
    for epoch in range(epochs):
        d.set_epoch(epoch)
        for i, row in enumerate(rows):
            s = d[i]
            pool = list(zip(row["hn_texts"], row["hn_kinds"], row["hn_source_ids"], strict=True))
            drawn = list(zip(s["hard_negatives"], s["hard_negative_kinds"],
                             s["hard_negative_sources"], strict=True))
            assert len(drawn) == min(n, len(pool))
            assert len(set(drawn)) == len(drawn)  # no repeat within a sample
            positions = [pool.index(t) for t in drawn]  # a subset of the pool, triples intact
            assert positions == sorted(positions)  # in rank order
            hits[i][positions] += 1
    # each entry of a pool of m > n is drawn with probability n / m per epoch
    for i, counts in hits.items():
        m = len(counts)
        if m > n:
            p = n / m
            sd = math.sqrt(epochs * p * (1 - p))
            assert np.all(np.abs(counts - epochs * p) < 4.5 * sd), (i, counts)
        else:
            assert np.all(counts == epochs)


def test_negatives_differ_across_epochs_and_repeat_for_the_same_epoch(data):
    d = ds(data, n_hard_negatives=3, seed=5)
    rows = data["train"]
    big = [i for i, r in enumerate(rows) if len(r["hn_texts"]) > 3]
    by_epoch = []
    for epoch in range(3):
        d.set_epoch(epoch)
        by_epoch.append([d[i]["hard_negatives"] for i in big])
    d.set_epoch(1)
    assert [d[i]["hard_negatives"] for i in big] == by_epoch[1]
    assert [d[(1, i)]["hard_negatives"] for i in big] == by_epoch[1]  # sampler-driven epoch
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert sum(x != y for x, y in zip(by_epoch[a], by_epoch[b], strict=True)) > len(big) // 2
    other = ds(data, n_hard_negatives=3, seed=6)
    assert [other[i]["hard_negatives"] for i in big] != by_epoch[0]


def _epoch_samples(d: NemoDataset, workers: int) -> list[tuple]:
    loader = torch.utils.data.DataLoader(d, batch_size=5, num_workers=workers,
                                         collate_fn=collate_fn, shuffle=False)
    out = []
    for batch in loader:
        for j in range(len(batch["sentence"])):
            out.append((batch["sentence"][j], tuple(batch["hard_negatives"][j]),
                        tuple(batch["hard_negative_kinds"][j]),
                        tuple(batch["hard_negative_sources"][j]),
                        tuple(batch["hard_negative_mask"][j].tolist()),
                        batch["meta"][j]["expression"]))
    return out


@pytest.mark.parametrize("items", ["sentence", "ref"])
def test_draws_agree_across_worker_counts(data, items):
    d = ds(data, n_hard_negatives=3, expressions="both", seed=11, items=items)
    for epoch in (0, 3):
        d.set_epoch(epoch)
        assert _epoch_samples(d, 0) == _epoch_samples(d, 2)


def test_collate_pads_sources_with_minus_one(data):
    d = ds(data, n_hard_negatives=5)
    batch = collate_fn([d[1], d[5]])  # pools of 1 and 5
    assert batch["hard_negative_mask"].tolist() == [[True] + [False] * 4, [True] * 5]
    assert batch["hard_negative_sources"][0] == [data["train"][1]["hn_source_ids"][0]] + [-1] * 4
    assert batch["hard_negatives"][0][1:] == [""] * 4


def test_older_shards_read_with_empty_new_columns(data):
    root = build(data["base"] / "v3", {"train": data["train"][:6]}, version="3",
                 with_views=None, drop=("hn_source_ids", "view_names", "view_texts"))
    d = ds({**data, "shards": root}, n_hard_negatives=2)
    s = d[4]  # a pool of 4
    assert len(s["hard_negatives"]) == 2 and s["hard_negative_sources"] == [-1, -1]
    assert set(s["hard_negatives"]) <= set(data["train"][4]["hn_texts"])
    assert s["sentence"] == data["train"][4]["sent"]


def test_a_schema_4_file_without_the_new_columns_is_damaged(data):
    root = build(data["base"] / "v4_cut", {"train": data["train"][:4]},
                 drop=("view_names", "view_texts"))
    with pytest.raises(ValueError, match=r"lacks column\(s\).*view_names"):
        ds({**data, "shards": root}, expressions="views")


def test_a_target_that_falls_through_its_cell_is_shown_single(data):
    """Random cuts can make the positive's cell a few pixels wide; a one-pixel target resized
    into it can vanish, and a mosaic would then say "here is the referent" with an empty mask
    (ReLA: empty=False, zero mask). Such a sample is shown single, and says why."""
    rows = []
    for i in range(10):
        row = train_row(i)
        mask = np.zeros((H, W), np.uint8)
        mask[7, 11] = 1  # one pixel
        row.update(mask_rle=rle(mask), neg_image_ids=[2, 3, 4, 5] * 2)
        rows.append(row)
    root = build(data["base"] / "tiny_target", {"train": rows}, version="5")
    d = ds({**data, "shards": root}, gamma=1.0, grid=3, cross_point="random",
           thumbnails=False, replace=True)
    vanished = mosaics = 0
    for epoch in range(8):
        d.set_epoch(epoch)
        for i in range(len(d)):
            s = d[i]
            mask = np.asarray(s["mask"])
            assert mask.any(), (epoch, i, s["meta"])  # never a positive without its target
            if s["meta"]["fallback"] == "target_too_small":
                vanished += 1
                assert not s["meta"]["is_mosaic"] and s["meta"]["cells"] is None
                assert np.asarray(s["image"]).shape[:2] == (H, W)
                assert mask.shape == (H, W) and mask[7, 11] == 1 and mask.sum() == 1
            mosaics += s["meta"]["is_mosaic"]
    assert vanished and mosaics  # both happen on these cuts


def test_raw_sentence_is_the_rows_raw_or_the_view_shown(data):
    rows = []
    for i in range(6):
        row = train_row(i)
        row.update(raw=f"Original {i}, as written.", view_names=["spatial"],
                   view_texts=[f"view {i} on the left"], view_allowed_quadrants=[[0, 2]])
        rows.append(row)
    root = build(data["base"] / "raw_text", {"train": rows}, version="5")
    for expressions in ("original", "both"):
        d = ds({**data, "shards": root}, expressions=expressions)
        for i, row in enumerate(rows):
            s = d[i]
            want = row["raw"] if s["meta"]["expression"] == "original" else row["view_texts"][0]
            assert s["raw_sentence"] == want
            assert s["sentence"] == (row["sent"] if s["meta"]["expression"] == "original"
                                     else row["view_texts"][0])
    old = ds(data)  # schema-4 rows without raw: the cleaned sentence
    assert old[0]["raw_sentence"] == data["train"][0]["sent"]
    assert collate_fn([old[0], old[1]])["raw_sentence"] == [r["sent"] for r in data["train"][:2]]


def test_items_per_ref_as_the_official_and_cris_loaders(data):
    """items="ref": one item per referent (the official NeMo loader's and CRIS's datasets);
    a training item draws one of its referent's sentences each epoch, an evaluation item shows
    the first (CRIS validates on `sents[0]`)."""
    sents_of: dict[int, list[dict]] = {}
    for r in data["train"]:
        sents_of.setdefault(r["ref_id"], []).append(r)
    d = ds(data, items="ref", gamma=0.7, thumbnails=False)
    assert len(d) == len(sents_of) == 20  # two sentences per ref in this fixture
    shown: dict[int, set[str]] = {}
    for epoch in range(12):
        d.set_epoch(epoch)
        for i in range(len(d)):
            s = d[i]
            rid = s["meta"]["ref_id"]
            mine = {r["sent_id"]: r for r in sents_of[rid]}
            assert s["meta"]["sent_id"] in mine
            assert s["sentence"] == mine[s["meta"]["sent_id"]]["sent"]
            assert s["meta"]["image_id"] == mine[s["meta"]["sent_id"]]["image_id"]
            shown.setdefault(rid, set()).add(s["sentence"])
            again = d[(epoch, i)]
            assert again["meta"]["sent_id"] == s["meta"]["sent_id"]  # a draw, not a state
    assert all(len(v) == 2 for v in shown.values())  # every sentence of every ref is used
    assert [d.item_rows(i) for i in range(2)] == [[0, 1], [2, 3]]
    assert d.row(1)["sent_id"] == sents_of[51][0]["sent_id"]

    val = ds(data, "val", items="ref")
    val_refs: dict[int, list[dict]] = {}
    for r in data["val"]:
        val_refs.setdefault(r["ref_id"], []).append(r)
    assert len(val) == len(val_refs)
    for epoch in range(3):
        val.set_epoch(epoch)
        got = {val[i]["meta"]["ref_id"]: val[i]["meta"]["sent_id"] for i in range(len(val))}
        assert got == {rid: min(r["sent_id"] for r in rows) for rid, rows in val_refs.items()}
    with pytest.raises(ValueError, match="items must be one of"):
        ds(data, items="referent")
