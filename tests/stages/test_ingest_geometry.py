"""Bad geometry at ingest, against a hand-made REFER dataset and pycocotools' annToMask.

The oracle is the dataset itself (tests/handmade_refer.py says which annotation is bad and
why, and which refs point at it) and pycocotools for every mask that is kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from handmade_refer import BAD, write_handmade
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.api import open_pipeline
from pipeline.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TABLES = ["images", "objects", "refs", "sentences", "categories", "errors"]
BASE = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template"]


def ingest(made, work, *sets):
    pipe = open_pipeline("refcoco", work, sets=sets, data_root=made.root,
                         images=made.images_dir, progress=False)
    pipe.run("ingest")
    d = pipe.artifact_dir("ingest")
    return {t: pq.read_table(d / t) for t in TABLES}, json.loads(
        (d / "_manifest.json").read_text())


def nothing_published(work) -> bool:
    stage_dir = work / "refcoco" / "ingest"
    return not stage_dir.exists() or not [p for p in stage_dir.iterdir()
                                          if not p.name.endswith(".lock")]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ})


def test_bad_geometry_recorded_refs_dropped_masks_equal_anntomask(tmp_path):
    made = write_handmade(tmp_path / "data")
    t, manifest = ingest(made, tmp_path / "work")

    # one errors row per bad annotation, naming it, its file and the reason
    errors = {e["item_id"]: e for e in t["errors"].to_pylist()}
    want_bad = {**{a: BAD[name][1] for name, a in made.bad_ann.items()},
                made.context_bad_ann: "odd number of coordinates (5)"}
    assert set(errors) == set(want_bad)
    for ann_id, phrase in want_bad.items():
        e = errors[ann_id]
        assert e["stage"] == "ingest" and e["path"] == str(made.instances_path)
        assert e["error"].startswith(f"annotation {ann_id}: ") and phrase in e["error"], e
    assert "refs that point at it are dropped" in errors[made.bad_ann["odd_polygon"]]["error"]
    assert "no ref points at it" in errors[made.context_bad_ann]["error"]

    # refs: exactly those whose targets are all good; their sentences and no others
    kept = [r for r in made.refs if r["ref_id"] not in made.dropped_refs]
    assert sorted(t["refs"].column("ref_id").to_pylist()) == sorted(r["ref_id"] for r in kept)
    assert sorted(t["sentences"].column("sent_id").to_pylist()) == sorted(
        s["sent_id"] for r in kept for s in r["sentences"])
    dropped_sents = sum(len(r["sentences"]) for r in made.refs
                        if r["ref_id"] in made.dropped_refs)

    # objects: every good annotation, none of the bad; masks pixel-equal annToMask
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(made.instances_path))
    good = sorted(a for a in coco.anns if a not in want_bad)
    objs = {o["ann_id"]: o for o in t["objects"].to_pylist()}
    assert sorted(objs) == good
    for a in good:
        ours = mask_utils.decode({"size": objs[a]["rle"]["size"],
                                  "counts": objs[a]["rle"]["counts"]})
        np.testing.assert_array_equal(ours, coco.annToMask(coco.anns[a]))
        assert objs[a]["bbox"] == pytest.approx(coco.anns[a]["bbox"])
    # every referenced image stays (an image is not bad because one annotation is)
    assert t["images"].column("image_id").to_pylist() == [11, 12, 13, 14]

    stats = manifest["stats"]
    assert stats["bad_annotations"] == len(want_bad)
    assert stats["bad_referenced_annotations"] == len(made.bad_ann)
    assert stats["dropped_refs"] == len(made.dropped_refs)
    assert stats["dropped_refs_by_reason"] == {"bad_annotation": len(made.dropped_refs)}
    assert stats["dropped_sentences"] == dropped_sents
    assert stats["dropped_sentences_by_reason"] == {"bad_annotation": dropped_sents}
    assert stats["repeated_targets"] == 0
    assert manifest["version"] == "3"


@pytest.mark.parametrize("kind", sorted(BAD))
def test_strict_names_file_and_annotation(tmp_path, kind):
    made = write_handmade(tmp_path / "data", bad=[kind], context_bad=False)
    work = tmp_path / "work"
    with pytest.raises(InputError) as err:
        ingest(made, work, "ingest.strict=true")
    msg = str(err.value)
    ann_id = made.bad_ann[kind]
    assert msg.startswith(f"{made.instances_path}: 1 annotation(s)")
    assert f"annotation {ann_id}: " in msg and BAD[kind][1] in msg and "ingest.strict" in msg
    assert nothing_published(work)


def test_strict_cli_exit_2_no_traceback(tmp_path):
    made = write_handmade(tmp_path / "data")
    work = tmp_path / "work"
    res = run_cli("run", "--stage", "ingest", "--dataset", "refcoco", "--work-dir", str(work),
                  "--data-root", str(made.root), "--images", str(made.images_dir),
                  "--set", "ingest.strict=true")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    first = min(made.bad_ann.values())
    assert str(made.instances_path) in res.stderr and f"annotation {first}:" in res.stderr
    assert nothing_published(work)


def test_strict_tolerates_a_bad_annotation_no_ref_uses(tmp_path):
    """Nothing is trained on it, so strict mode records it instead of failing."""
    made = write_handmade(tmp_path / "data", bad=[], context_bad=True)
    t, manifest = ingest(made, tmp_path / "work", "ingest.strict=true")
    assert t["errors"].column("item_id").to_pylist() == [made.context_bad_ann]
    assert manifest["stats"]["dropped_refs"] == 0
    assert sorted(t["refs"].column("ref_id").to_pylist()) == [r["ref_id"] for r in made.refs]


def test_downstream_stages_finish_on_bad_geometry(demo, tmp_path):
    """The demo data with bad geometry on referenced (train and val) and context annotations:
    every later stage runs, and nothing published mentions a dropped ref."""
    import shutil

    root = tmp_path / "refer"
    shutil.copytree(demo.refer_root / "refcoco", root / "refcoco")
    inst_path = root / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    refs = pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    anns = {a["id"]: a for a in inst["annotations"]}
    by_split: dict[str, list[int]] = {}
    for r in refs:
        by_split.setdefault(r["split"], []).append(r["ann_id"])
    targets = set(by_split["train"][:4] + by_split["val"][:1])
    picked = by_split["train"][:4] + by_split["val"][:1]
    changes = [{"segmentation": [[1, 1, 5, 1, 5, 5, 1]]}, {"bbox": [1, 1, 5]},
               {"bbox": [1, 1, -5, 5]}, {"segmentation": [[]]},
               {"segmentation": {"size": [1, 1], "counts": [1]}}]
    for a, change in zip(picked, changes, strict=True):
        anns[a].update(change)
    context = next(a for a in anns.values() if a["id"] not in {r["ann_id"] for r in refs})
    context["bbox"] = [0, 0, 0, 0]
    inst_path.write_text(json.dumps(inst))
    dropped = {r["ref_id"] for r in refs if r["ann_id"] in targets}

    pipe = open_pipeline("refcoco", tmp_path / "work", data_root=root, images=demo.images_dir,
                         sets=[*BASE, "shards.with_hard_negatives=true"], progress=False)
    pipe.run("shards")
    errors = pq.read_table(pipe.artifact_dir("ingest") / "errors").column("item_id")
    assert sorted(errors.to_pylist()) == sorted([*targets, context["id"]])
    shards = pipe.artifact_dir("shards")
    seen = set()
    for split in ("train", "val", "testA", "testB"):
        seen |= set(pq.read_table(shards / split).column("ref_id").to_pylist())
    assert seen == {r["ref_id"] for r in refs} - dropped
    hn = pq.read_table(pipe.artifact_dir("hard_negatives") / "hard_negatives")
    assert hn.num_rows > 0
