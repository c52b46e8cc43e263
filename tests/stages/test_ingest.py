"""ingest against an independent reading of the same files (raw pickle/JSON + pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DATASETS
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.api import open_pipeline
from pipeline.errors import InputError
from pipeline.io import sha256_file
from stages.refer.manifests import load_data_manifest

TABLES = ["images", "objects", "refs", "sentences", "categories", "errors"]


def ingest(demo, work, dataset, *sets, data_root=None, images=None):
    pipe = open_pipeline(dataset, work, sets=sets, data_root=data_root or demo.refer_root,
                         images=images or demo.images_dir, progress=False)
    pipe.run("ingest")
    return pipe


def tables(pipe) -> dict:
    d = pipe.artifact_dir("ingest")
    return {t: pq.read_table(d / t) for t in TABLES}


def raw_refs(demo, dataset):
    m = load_data_manifest(dataset)
    path = demo.refer_root / m.dir / m.refs_file
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with open(path, "rb") as f:
        return pickle.load(f)


def coco_of(demo, dataset) -> COCO:
    m = load_data_manifest(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(demo.refer_root / m.dir / m.instances_file))


def target_ids(ref) -> list[int]:
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    return [int(a) for a in ids if int(a) != -1]


@pytest.mark.parametrize("dataset", DATASETS)
def test_ingest_equals_independent_reading(demo, work, dataset):
    t = tables(ingest(demo, work, dataset))
    refs = raw_refs(demo, dataset)
    coco = coco_of(demo, dataset)

    # refs: ids, images, splits, targets, categories
    got = {r["ref_id"]: r for r in t["refs"].to_pylist()}
    assert set(got) == {r["ref_id"] for r in refs}
    for r in refs:
        g = got[r["ref_id"]]
        assert g["image_id"] == r["image_id"] and g["split"] == r["split"]
        assert g["ann_ids"] == target_ids(r)
        want_cat = coco.anns[target_ids(r)[0]]["category_id"] if target_ids(r) else -1
        assert g["category_id"] == want_cat
    assert t["refs"].column("ref_id").to_pylist() == sorted(got)

    # sentences
    want_sents = {s["sent_id"]: (r["ref_id"], s) for r in refs for s in r["sentences"]}
    got_sents = {s["sent_id"]: s for s in t["sentences"].to_pylist()}
    assert set(got_sents) == set(want_sents)
    for sid, (ref_id, s) in want_sents.items():
        g = got_sents[sid]
        assert (g["ref_id"], g["sent"], g["raw"], g["tokens"]) == (
            ref_id, s["sent"], s["raw"], s["tokens"])

    # images: exactly the referenced ones, with instances.json sizes and the file's bytes
    image_ids = sorted({r["image_id"] for r in refs})
    imgs = t["images"].to_pylist()
    assert [i["image_id"] for i in imgs] == image_ids
    for i in imgs:
        c = coco.imgs[i["image_id"]]
        assert (i["file_name"], i["width"], i["height"]) == (c["file_name"], c["width"],
                                                             c["height"])
        assert i["bytes"] == os.path.getsize(demo.images_dir / i["file_name"])
        assert len(i["content_hash"]) == 32

    # objects: every annotation of those images (crowd included), masks pixel-equal annToMask
    want_anns = sorted(coco.getAnnIds(imgIds=image_ids, iscrowd=None))
    objs = t["objects"].to_pylist()
    assert sorted(o["ann_id"] for o in objs) == want_anns
    kinds = set()
    for o in objs:
        ann = coco.anns[o["ann_id"]]
        segm = ann["segmentation"]
        kinds.add("polygon" if isinstance(segm, list)
                  else "rle-list" if isinstance(segm["counts"], list) else "rle-str")
        assert (o["image_id"], o["category_id"], o["iscrowd"]) == (
            ann["image_id"], ann["category_id"], bool(ann["iscrowd"]))
        assert o["bbox"] == pytest.approx(ann["bbox"]) and o["area"] == pytest.approx(ann["area"])
        ours = mask_utils.decode({"size": o["rle"]["size"], "counts": o["rle"]["counts"]})
        np.testing.assert_array_equal(ours, coco.annToMask(ann))
    assert "polygon" in kinds and "rle-list" in kinds  # both mask encodings were exercised

    cats = {c["category_id"]: c["name"] for c in t["categories"].to_pylist()}
    assert cats == {c["id"]: c["name"] for c in coco.cats.values()}
    assert t["errors"].num_rows == 0


def test_grefcoco_multi_and_no_target(demo, work):
    t = tables(ingest(demo, work, "grefcoco"))
    refs = t["refs"].to_pylist()
    assert any(len(r["ann_ids"]) > 1 for r in refs)
    no_target = [r for r in refs if not r["ann_ids"]]
    assert no_target and all(r["category_id"] == -1 for r in no_target)


def test_column_types_match_contract(demo, work):
    t = tables(ingest(demo, work, "refcoco"))
    s = {name: str(tb.schema) for name, tb in t.items()}
    assert "image_id: int64" in s["images"] and "width: int32" in s["images"]
    assert "bytes: int64" in s["images"] and "content_hash: string" in s["images"]
    assert "category_id: int32" in s["objects"] and "iscrowd: bool" in s["objects"]
    assert "bbox: list<element: double>" in s["objects"].replace("item", "element")
    assert "size: list<element: int32>" in s["objects"].replace("item", "element")
    assert "ann_ids: list<element: int64>" in s["refs"].replace("item", "element")
    assert "tokens: list<element: string>" in s["sentences"].replace("item", "element")
    assert set(t["errors"].column_names) == {"stage", "item_id", "path", "error"}


def test_cached_rerun_reads_no_image_and_does_no_work(demo, work, monkeypatch):
    pipe = ingest(demo, work, "refcoco")
    manifest = pipe.artifact_dir("ingest") / "_manifest.json"
    stamp = manifest.stat().st_mtime_ns

    def no_reading(path):
        raise AssertionError(f"re-read {path}")

    monkeypatch.setattr("pipeline.filehash.hash_file", no_reading)
    monkeypatch.setattr("stages.ingest._ingest_shard", no_reading)
    pipe2 = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                          progress=False)
    plan = pipe2.run("ingest")
    assert [p.state for p in plan] == ["cached"]
    assert manifest.stat().st_mtime_ns == stamp


def test_a_first_run_in_a_new_work_dir_reads_each_input_once(demo, tmp_path, monkeypatch):
    """The ingest key is computed before `run` makes the work dir (a memory-only hash cache),
    and the run's own cache then read every image and annotation file a second time."""
    import collections
    import sqlite3

    import pipeline.filehash as filehash

    monkeypatch.setattr(filehash, "_PROCESS_DIGESTS", {}, raising=False)  # a fresh process
    reads: collections.Counter[str] = collections.Counter()
    real = filehash.hash_file

    def counting(path):
        reads[str(path)] += 1
        return real(path)

    monkeypatch.setattr(filehash, "hash_file", counting)
    work = tmp_path / "new-work"
    pipe = ingest(demo, work, "refcoco")
    images = {p for p in reads if p.endswith(".jpg")}
    assert len(images) == len(tables(pipe)["images"])
    assert max(reads.values()) == 1, reads.most_common(3)
    with sqlite3.connect(work / ".cache" / "file_hashes.sqlite") as con:  # kept for the next
        stored = {row[0] for row in con.execute("SELECT path FROM hashes")}
    assert images <= stored


def test_key_follows_params_and_image_content(demo, work, tmp_path):
    base = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir)
    key = base.resolve("ingest").key
    assert open_pipeline("refcoco", work, sets=["ingest.images_per_shard=7"],
                         data_root=demo.refer_root, images=demo.images_dir
                         ).resolve("ingest").key != key
    assert open_pipeline("refcoco", work, sets=["ingest.strict=true", "ingest.threads=3"],
                         data_root=demo.refer_root, images=demo.images_dir
                         ).resolve("ingest").key == key
    # a changed image (same name, new bytes) changes the key, and so every downstream key
    images = tmp_path / "images"
    shutil.copytree(demo.images_dir, images)
    same = open_pipeline("refcoco", work, data_root=demo.refer_root, images=images)
    assert same.resolve("ingest").key == key  # content, not path, is hashed
    first = sorted(images.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    changed = open_pipeline("refcoco", work, data_root=demo.refer_root, images=images)
    assert changed.resolve("ingest").key != key


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_sigkill_mid_ingest_resumes_byte_identical(demo, tmp_path):
    common = ["--dataset", "refcoco", "--data-root", str(demo.refer_root), "--images",
              str(demo.images_dir), "--set", "ingest.images_per_shard=6"]
    clean = run_cli("run", "--stage", "ingest", "--work-dir", str(tmp_path / "a"), *common)
    assert clean.returncode == 0, clean.stderr
    killed = run_cli("run", "--stage", "ingest", "--work-dir", str(tmp_path / "b"), *common,
                     env={"NEMO_PIPE_TEST_KILL_AFTER_SHARDS": "2"})
    assert killed.returncode == -9, killed.stderr
    tmp_dirs = list((tmp_path / "b" / "refcoco" / "ingest").glob(".tmp-*"))
    assert len(tmp_dirs) == 1 and len(list((tmp_dirs[0] / "_shards").iterdir())) == 2
    resumed = run_cli("run", "--stage", "ingest", "--work-dir", str(tmp_path / "b"), *common)
    assert resumed.returncode == 0, resumed.stderr

    def artifact(root):
        (d,) = [p for p in (root / "refcoco" / "ingest").iterdir() if not p.name.startswith(".")]
        return d

    a, b = artifact(tmp_path / "a"), artifact(tmp_path / "b")
    assert a.name == b.name
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.parquet"))
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*.parquet"))
    assert len([f for f in files if f.startswith("images/")]) > 3
    for f in files:
        assert sha256_file(a / f) == sha256_file(b / f), f
    stats = json.loads((b / "_manifest.json").read_text())["stats"]
    assert stats["shards_resumed"] == 2


BROKEN = {
    "missing_refs": ("refs(unc).p", "refs file not found"),
    "missing_instances": ("instances.json", "instances file not found"),
    "bad_pickle": ("refs(unc).p", "cannot be read as a REFER refs pickle"),
    "bad_json": ("instances.json", "not valid JSON"),
    "dangling_ann": ("refs(unc).p", "points at annotation"),
    "dangling_image": ("refs(unc).p", "points at image"),
    "unknown_split": ("refs(unc).p", "has split 'training'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_input_clear_error_and_nothing_published(demo, work, case):
    file_name, phrase = BROKEN[case]
    root = demo.broken_dir / case
    with pytest.raises(InputError) as err:
        ingest(demo, work, "refcoco", data_root=root)
    msg = str(err.value)
    assert phrase in msg and str(root / "refcoco" / file_name) in msg
    stage_dir = work / "refcoco" / "ingest"
    assert not stage_dir.exists() or not [p for p in stage_dir.iterdir()
                                          if not p.name.endswith(".lock")]


def test_bad_input_cli_prints_error_not_traceback(demo, work):
    res = run_cli("run", "--stage", "ingest", "--dataset", "refcoco", "--work-dir", str(work),
                  "--data-root", str(demo.broken_dir / "bad_pickle"), "--images",
                  str(demo.images_dir))
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_missing_and_corrupt_images_recorded_or_fatal(demo, work):
    root = demo.broken_dir / "images_missing_and_corrupt"
    images = root / "images" / "train2014"
    pipe = ingest(demo, work, "refcoco", data_root=root, images=images)
    t = tables(pipe)
    errors = t["errors"].to_pylist()
    assert len(errors) == 2
    assert {e["error"].split(":")[0] for e in errors} == {"missing file", "undecodable"}
    bad = {e["item_id"] for e in errors}
    assert bad.isdisjoint(t["images"].column("image_id").to_pylist())
    assert bad.isdisjoint(t["refs"].column("image_id").to_pylist())
    assert bad.isdisjoint(t["objects"].column("image_id").to_pylist())
    kept_refs = set(t["refs"].column("ref_id").to_pylist())
    assert set(t["sentences"].column("ref_id").to_pylist()) <= kept_refs
    raw = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    assert kept_refs == {r["ref_id"] for r in raw if r["image_id"] not in bad}

    strict_work = work.parent / "strict"
    with pytest.raises(InputError, match="2 of .* images are missing, unreadable or undecodable"):
        ingest(demo, strict_work, "refcoco", "ingest.strict=true", data_root=root, images=images)
    stage_dir = strict_work / "refcoco" / "ingest"
    assert not [p for p in stage_dir.iterdir() if not p.name.endswith(".lock")]


def test_demo_bad_geometry_recorded_and_refs_dropped(demo, work):
    """broken/bad_geometry: annotations whose geometry breaks an independent rule (pycocotools'
    input contract) are errors rows and the refs pointing at them are gone."""
    root = demo.broken_dir / "bad_geometry"
    inst = json.loads((root / "refcoco" / "instances.json").read_text())

    def bad(a):
        segm, box = a["segmentation"], a["bbox"]
        polys_bad = isinstance(segm, list) and (
            not segm or any(len(p) < 6 or len(p) % 2 for p in segm))
        return polys_bad or len(box) != 4 or box[2] <= 0 or box[3] <= 0

    bad_ids = {a["id"] for a in inst["annotations"] if bad(a)}
    t = tables(ingest(demo, work, "refcoco", data_root=root))
    assert set(t["errors"].column("item_id").to_pylist()) == bad_ids and len(bad_ids) == 5
    assert all(e.startswith("annotation ") for e in t["errors"].column("error").to_pylist())
    raw = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    assert sorted(t["refs"].column("ref_id").to_pylist()) == sorted(
        r["ref_id"] for r in raw if r["ann_id"] not in bad_ids)
    assert bad_ids.isdisjoint(t["objects"].column("ann_id").to_pylist())
    with pytest.raises(InputError, match="annotation"):
        ingest(demo, work.parent / "strict", "refcoco", "ingest.strict=true", data_root=root)


def test_unknown_dataset_and_missing_data_root(demo, work):
    with pytest.raises(InputError, match="unknown dataset 'refcocoo'"):
        open_pipeline("refcocoo", work, data_root=demo.refer_root).resolve("ingest")
    with pytest.raises(InputError, match="no data root"):
        open_pipeline("refcoco", work).resolve("ingest")


def test_api_load_returns_the_published_table(demo, work):
    from pipeline.api import load, remember_locations
    from pipeline.errors import NemoError, NotPublished

    with pytest.raises(NotPublished, match="not built yet"):
        pipe = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir)
        remember_locations(work, "refcoco", pipe.env.locations)
        load("ingest", "refcoco", "refs", work_dir=work)
    pipe = ingest(demo, work, "refcoco")
    refs = load("ingest", "refcoco", "refs", work_dir=work)
    want = pq.read_table(pipe.artifact_dir("ingest") / "refs")
    assert refs.equals(want.replace_schema_metadata(None))
    with pytest.raises(NemoError, match="several tables"):
        load("ingest", "refcoco", work_dir=work)
    with pytest.raises(NemoError, match="no table 'nope'"):
        load("ingest", "refcoco", "nope", work_dir=work)


def test_published_count_mismatch_warns_only_at_full_size(caplog):
    from stages.ingest import _compare_expected

    manifest = load_data_manifest("refcoco")
    tiny = {"train": {"refs": 10, "images": 4, "sentences": 20}}
    with caplog.at_level("WARNING"):
        diffs = _compare_expected(manifest, tiny)
    assert "train.refs: 10 (published 42404)" in diffs and not caplog.records
    big = {s: {"refs": c.refs, "images": c.images, "sentences": c.sentences}
           for s, c in manifest.expected.items()}
    assert _compare_expected(manifest, big) == []
    big["val"]["refs"] -= 1
    with caplog.at_level("WARNING"):
        diffs = _compare_expected(manifest, big)
    assert diffs == ["val.refs: 3810 (published 3811)"]
    assert "differs from the published statistics" in caplog.text
