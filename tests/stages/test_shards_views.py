"""shards with multi-view expressions and a hard-negative pool, against the upstream tables read
here with pyarrow and the raw REFER files."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.api import open_pipeline
from stages.refer.views import valid_views

BASE = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template"]
VIEW_ORDER = ("appearance", "action", "spatial", "appearance_alt")  # the multiview prompt's


def pipe_for(data_root, images, work, *sets):
    return open_pipeline("refcoco", work, data_root=data_root, images=images,
                         sets=[*BASE, *sets], progress=False)


def rows_of(pipe, stage, table):
    return pq.read_table(pipe.artifact_dir(stage) / table).to_pylist()


def test_training_rows_carry_their_referents_views(demo, work):
    pipe = pipe_for(demo.refer_root, demo.images_dir, work, "shards.with_views=true")
    assert "multiview" in [i.name for i in pipe.plan("shards")]
    pipe.run("shards")
    views: dict[int, list[tuple[str, str]]] = {}
    for v in sorted(rows_of(pipe, "multiview", "views"),
                    key=lambda v: (v["ref_id"], VIEW_ORDER.index(v["view"]))):
        views.setdefault(v["ref_id"], []).append((v["view"], v["text"]))
    assert views and not rows_of(pipe, "multiview", "failures")
    d = pipe.artifact_dir("shards")
    train = pq.read_table(d / "train").to_pylist()
    for row in train:
        want = views.get(row["ref_id"], [])
        assert list(zip(row["view_names"], row["view_texts"], strict=True)) == want
    assert sum(bool(r["view_texts"]) for r in train) == sum(r["ref_id"] in views for r in train)
    for split in ("val", "testA", "testB"):
        assert all(r["view_texts"] == [] == r["view_names"]
                   for r in pq.read_table(d / split).to_pylist())
    m = json.loads((d / "_manifest.json").read_text())
    assert m["with_views"] is True and m["schema_version"] == "6"
    # each view's own quadrants, aligned with its texts; hand rule on views naming exactly one
    # of the four sides (and no other position word): left {0, 2}, right {1, 3}, top {0, 1},
    # bottom {2, 3}; any other view is checked only for alignment and range
    sides = {"left": [0, 2], "right": [1, 3], "top": [0, 1], "bottom": [2, 3]}
    other_positions = {"leftmost", "rightmost", "upper", "lower", "high", "low", "higher",
                       "lowest", "highest", "topmost", "uppermost", "bottommost", "lowermost",
                       "lefthand", "righthand", "o'clock", "clock"}
    checked = 0
    for row in train:
        assert len(row["view_allowed_quadrants"]) == len(row["view_texts"])
        for text, quads in zip(row["view_texts"], row["view_allowed_quadrants"], strict=True):
            assert set(quads) <= {0, 1, 2, 3}
            words = set(re.findall(r"[a-z']+", text.lower().replace("-", " ")))
            named = words & set(sides)
            if len(named) == 1 and not words & other_positions:
                assert quads == sides[named.pop()], text
                checked += 1
    assert checked > 0  # the template's spatial views name a side
    assert m["stats"]["training_rows_with_views"] == sum(bool(r["view_texts"]) for r in train)
    plain = pipe_for(demo.refer_root, demo.images_dir, work)
    assert "multiview" not in [i.name for i in plain.plan("shards")]
    plain.run("shards")
    pm = json.loads((plain.artifact_dir("shards") / "_manifest.json").read_text())
    assert pm["with_views"] is False
    assert all(r["view_texts"] == [] for r in rows_of(plain, "shards", "train"))


def test_pool_is_the_ranked_prefix_with_source_ids(demo, work):
    full = pipe_for(demo.refer_root, demo.images_dir, work, "shards.with_hard_negatives=true")
    full.run("shards")
    hn = {r["sent_id"]: r for r in rows_of(full, "hard_negatives", "hard_negatives")}
    cut = pipe_for(demo.refer_root, demo.images_dir, work, "shards.with_hard_negatives=true",
                   "shards.hard_negative_pool=3")
    cut.run("shards")
    short = {r["sent_id"]: r for r in rows_of(cut, "shards", "train")}
    assert any(len(h["neg_texts"]) > 3 for h in hn.values())
    for row in rows_of(full, "shards", "train"):
        h = hn[row["sent_id"]]
        # hard_negatives.n = 8 <= the default pool of 16: the whole list
        assert (row["hn_texts"], row["hn_kinds"], row["hn_source_ids"]) == (
            h["neg_texts"], h["neg_kinds"], h["neg_source_ids"])
        s = short[row["sent_id"]]
        assert (s["hn_texts"], s["hn_kinds"], s["hn_source_ids"]) == (
            h["neg_texts"][:3], h["neg_kinds"][:3], h["neg_source_ids"][:3])
        assert s["hn_scores"] == pytest.approx(h["neg_scores"][:3])


def test_same_image_negatives_name_their_sentences(demo, work):
    pipe = pipe_for(demo.refer_root, demo.images_dir, work)
    pipe.run("shards")
    refs = pickle.loads((demo.refer_root / "refcoco" / "refs(unc).p").read_bytes())
    sent = {s["sent_id"]: (r, s["sent"]) for r in refs for s in r["sentences"]}
    rows = rows_of(pipe, "shards", "train")
    assert any(r["hn_texts"] for r in rows)
    for row in rows:
        assert len(row["hn_source_ids"]) == len(row["hn_texts"])
        for text, sid in zip(row["hn_texts"], row["hn_source_ids"], strict=True):
            ref, raw_text = sent[sid]
            assert raw_text == text and ref["image_id"] == row["image_id"]
            assert ref["ref_id"] != row["ref_id"] and ref["split"] == "train"


def test_a_view_is_never_a_negative_of_its_own_row(demo, work, tmp_path):
    """A copy of the demo's refcoco where another referent of the image says exactly what a
    referent's view says: that text is a same-image negative of the referent without views,
    and is dropped from its negatives with them."""
    first = pipe_for(demo.refer_root, demo.images_dir, work, "shards.with_views=true")
    first.run("shards")
    views = rows_of(first, "multiview", "views")
    refs = pickle.loads((demo.refer_root / "refcoco" / "refs(unc).p").read_bytes())
    by_id = {r["ref_id"]: r for r in refs}
    target = other = None
    for v in views:
        ref = by_id[v["ref_id"]]
        mates = [r for r in refs if r["image_id"] == ref["image_id"] and r["split"] == "train"
                 and r["ann_id"] != ref["ann_id"]]
        if ref["split"] == "train" and mates:
            target, other, text = ref, mates[0], v["text"]
            break
    assert target is not None
    other["sentences"][0].update(sent=text, raw=text, tokens=text.split())
    root = tmp_path / "data"
    (root / "refcoco").mkdir(parents=True)
    shutil.copy(demo.refer_root / "refcoco" / "instances.json", root / "refcoco")
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))

    without = pipe_for(root, demo.images_dir, tmp_path / "w1")
    without.run("shards")
    with_views = pipe_for(root, demo.images_dir, tmp_path / "w2", "shards.with_views=true")
    with_views.run("shards")
    before = [r for r in rows_of(without, "shards", "train") if r["ref_id"] == target["ref_id"]]
    after = {r["sent_id"]: r for r in rows_of(with_views, "shards", "train")}
    assert before and all(text in r["hn_texts"] for r in before)
    for row in before:
        got = after[row["sent_id"]]
        keep = [i for i, t in enumerate(row["hn_texts"]) if t != text]
        assert got["hn_texts"] == [row["hn_texts"][i] for i in keep]
        assert got["hn_source_ids"] == [row["hn_source_ids"][i] for i in keep]
    m = json.loads((with_views.artifact_dir("shards") / "_manifest.json").read_text())
    assert m["stats"]["negatives_equal_to_a_view"] >= len(before)


def test_valid_views_hand_case():
    views = [
        {"ref_id": 1, "image_id": 10, "ann_id": 100, "view": "spatial", "text": "the cat left"},
        {"ref_id": 1, "image_id": 10, "ann_id": 100, "view": "appearance", "text": " red cat "},
        {"ref_id": 1, "image_id": 10, "ann_id": 100, "view": "appearance_alt", "text": "Red cat."},
        {"ref_id": 1, "image_id": 10, "ann_id": 100, "view": "action", "text": "   "},
        {"ref_id": 2, "image_id": 10, "ann_id": 200, "view": "appearance", "text": "a dog"},
        {"ref_id": 3, "image_id": 11, "ann_id": 300, "view": "appearance", "text": "a bird"},
    ]
    failures = [{"image_id": 10, "ann_ids": [200]}, {"image_id": 12, "ann_ids": [300]}]
    got = valid_views(views, failures, VIEW_ORDER)
    # ref 1: view order, stripped, the blank one and the normalised repeat ("Red cat.") gone;
    # ref 2: its instance failed; ref 3: a failure of another image does not touch it
    assert got == {1: [("appearance", "red cat"), ("spatial", "the cat left")],
                   3: [("appearance", "a bird")]}
