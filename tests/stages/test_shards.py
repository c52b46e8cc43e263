"""shards: the join a trainer reads, against pycocotools and the raw REFER files."""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.api import open_pipeline
from pipeline.io import schema_version_of, table_files
from pipeline.training.schema import SHARDS_SCHEMA_VERSION as SCHEMA_VERSION
from stages.refer.manifests import load_data_manifest
from stages.text.normalise import normalise_sentence as norm


def pipe_for(demo, work, dataset, *sets):
    return open_pipeline(dataset, work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=["embed.model=tiny", "embed.pretrained=null", *sets],
                         progress=False)


def raw_refs(demo, dataset):
    m = load_data_manifest(dataset)
    path = demo.refer_root / m.dir / m.refs_file
    return json.loads(path.read_text()) if path.suffix == ".json" else pickle.loads(
        path.read_bytes())


@pytest.mark.parametrize("dataset", ["refcoco", "grefcoco"])
def test_shards_join_equals_independent_reading(demo, work, dataset):
    pipe = pipe_for(demo, work, dataset)
    pipe.run("shards")
    d = pipe.artifact_dir("shards")
    m = load_data_manifest(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(demo.refer_root / m.dir / m.instances_file))
    refs = raw_refs(demo, dataset)
    mosaic = {r["sent_id"]: r for r in pq.read_table(
        pipe.artifact_dir("mosaic_tables") / "mosaic").to_pylist()}

    seen = set()
    for split in m.splits:
        parts = table_files(d / split)
        assert parts and all(schema_version_of(p) == SCHEMA_VERSION for p in parts)
        rows = pq.read_table(d / split).to_pylist()
        want = {s["sent_id"]: (r, s) for r in refs if r["split"] == split for s in r["sentences"]}
        assert [r["sent_id"] for r in rows] == sorted(want)
        for row in rows:
            ref, sent = want[row["sent_id"]]
            seen.add(row["sent_id"])
            assert (row["ref_id"], row["image_id"], row["sent"], row["split"]) == (
                ref["ref_id"], ref["image_id"], sent["sent"], split)
            assert row["raw"] == sent.get("raw", sent["sent"])  # as written, for BERT trainers
            targets = [a for a in (ref["ann_id"] if isinstance(ref["ann_id"], list)
                                   else [ref["ann_id"]]) if a != -1]
            assert row["ann_ids"] == targets and row["no_target"] == (not targets)
            img = coco.imgs[ref["image_id"]]
            expected = np.zeros((img["height"], img["width"]), np.uint8)
            for a in targets:
                expected |= coco.annToMask(coco.anns[a])
            got = mask_utils.decode({"size": row["mask_rle"]["size"],
                                     "counts": row["mask_rle"]["counts"]})
            np.testing.assert_array_equal(got, expected)
            if split == m.train_split:
                assert row["neg_image_ids"] == mosaic[row["sent_id"]]["neg_image_ids"]
                assert row["allowed_quadrants"] == mosaic[row["sent_id"]]["allowed_quadrants"]
            else:
                assert row["neg_image_ids"] == [] and row["allowed_quadrants"] == [0, 1, 2, 3]
    assert len(seen) == sum(len(r["sentences"]) for r in refs)
    images = pq.read_table(d / "images").to_pylist()
    assert {i["image_id"] for i in images} == {r["image_id"] for r in refs}


def test_same_image_negatives_oracle(demo, work):
    pipe = pipe_for(demo, work, "refcoco")
    pipe.run("shards")
    refs = raw_refs(demo, "refcoco")
    rows = pq.read_table(pipe.artifact_dir("shards") / "train").to_pylist()
    for row in rows:
        # other training referents of the image, by ref id then sent id, minus any text equal
        # (normalised) to a sentence of the row's referent, each normalised text once
        positives = {norm(s["sent"]) for r in refs if r["ann_id"] in row["ann_ids"]
                     for s in r["sentences"]}
        want, seen = [], set(positives)
        for r in sorted(refs, key=lambda r: r["ref_id"]):
            if (r["image_id"] != row["image_id"] or r["ref_id"] == row["ref_id"]
                    or r["ann_id"] in row["ann_ids"] or r["split"] != "train"):
                continue
            for s in sorted(r["sentences"], key=lambda s: s["sent_id"]):
                if norm(s["sent"]) not in seen:
                    seen.add(norm(s["sent"]))
                    want.append(s["sent"])
        assert row["hn_texts"] == want
        assert row["hn_kinds"] == ["same_image"] * len(want)
        assert all(np.isnan(row["hn_scores"]))
    assert any(row["hn_texts"] for row in rows)
    for split in ("val", "testA", "testB"):  # evaluation rows pass through unaugmented
        for row in pq.read_table(pipe.artifact_dir("shards") / split).to_pylist():
            assert row["hn_texts"] == [] and row["neg_image_ids"] == []


def test_manifest_names_every_upstream_artifact(demo, work):
    pipe = pipe_for(demo, work, "refcocog-umd", "mosaic_tables.k=5")
    pipe.run("shards")
    m = json.loads((pipe.artifact_dir("shards") / "_manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION
    up = m["upstream_artifacts"]
    assert set(up) == {"ingest", "embed_images", "embed_texts", "negatives", "mosaic_tables",
                       "thumbnails"}
    assert up["mosaic_tables"]["params"]["k"] == 5
    assert up["mosaic_tables"]["params"]["tau_ti"] == 0.75  # G-Ref paper default
    assert up["embed_images"]["model"]["model"] == "nemo-tiny"
    assert up["negatives"]["key"] == pipe.resolve("negatives").key


def test_tau_sweep_reruns_mosaic_and_shards_only(demo, work):
    pipe_for(demo, work, "refcoco").run("shards")
    plan = {i.name: i.state
            for i in pipe_for(demo, work, "refcoco", "mosaic_tables.tau_ti=0.5").plan("shards")}
    assert plan == {"ingest": "cached", "embed_images": "cached", "embed_texts": "cached",
                    "negatives": "cached", "mosaic_tables": "stale", "thumbnails": "cached",
                    "shards": "stale"}


def test_k_all_rows_and_the_pool_reach_the_reader(demo, work):
    """mosaic_tables.k=all rows keep their layout in the shards, the pool is carried over, and
    the reader draws from the brute-force set (pool - exclusions - own image) of each row."""
    layouts = set()
    for tau in ("0.85", "0.3"):  # most rows stored as exclusions, then most as survivors
        layouts |= _check_k_all(demo, work, tau)
    assert layouts == {True, False}


def _check_k_all(demo, work, tau: str) -> set[bool]:
    from pipeline.training.dataset import NemoDataset
    from pipeline.training.mosaic_candidates import POOL_FILE

    pipe = pipe_for(demo, work, "refcoco", "mosaic_tables.k=all", f"mosaic_tables.tau_ti={tau}")
    pipe.run("shards")
    d = pipe.artifact_dir("shards")
    pool = pq.read_table(pipe.artifact_dir("mosaic_tables") / POOL_FILE).column(
        "image_id").to_pylist()
    assert pq.read_table(d / "pool").column("image_id").to_pylist() == pool
    refs = raw_refs(demo, "refcoco")
    train_images = {r["image_id"] for r in refs if r["split"] == "train"}
    assert set(pool) == train_images  # every training image has an embedding here
    assert {r["image_id"] for r in refs} - train_images  # evaluation-only images exist
    mosaic = {r["sent_id"]: r for r in pq.read_table(
        pipe.artifact_dir("mosaic_tables") / "mosaic").to_pylist()}
    rows = pq.read_table(d / "train").to_pylist()
    want = {}
    for r in rows:
        m = mosaic[r["sent_id"]]
        assert (r["neg_from_pool"], r["excluded_image_ids"], r["neg_image_ids"]) == (
            m["neg_from_pool"], m["excluded_image_ids"], m["neg_image_ids"])
        want[r["sent_id"]] = (set(pool) - set(r["excluded_image_ids"]) - {r["image_id"]}
                              if r["neg_from_pool"] else set(r["neg_image_ids"]))
    for split in ("val", "testA"):
        for r in pq.read_table(d / split).to_pylist():
            assert not r["neg_from_pool"] and r["excluded_image_ids"] is None
    ds = NemoDataset(d, "train", demo.images_dir, gamma=1.0)
    rand = NemoDataset(d, "train", demo.images_dir, gamma=1.0, mosaic="random", grid=3)
    for epoch in range(3):
        for i in range(0, len(ds), 5):
            meta = ds[(epoch, i)]["meta"]
            negs = set(meta["source_image_ids"]) - {meta["image_id"]}
            assert meta["is_mosaic"] == (len(want[meta["sent_id"]]) >= 3)
            assert negs <= want[meta["sent_id"]]
            meta = rand[(epoch, i)]["meta"]
            negs = [s for j, s in enumerate(meta["source_image_ids"]) if j != meta["quadrant"]]
            assert meta["image_id"] not in negs and set(negs) <= train_images
    return {r["neg_from_pool"] for r in rows}
