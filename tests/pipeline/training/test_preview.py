"""NemoDataset and the preview over real shards built from the demo data."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from pipeline.api import open_pipeline
from pipeline.cli import app
from pipeline.training.dataset import NemoDataset, collate_fn

SETS = ["embed.model=tiny", "embed.pretrained=null", "multiview.backend=template"]


def test_dataset_over_pipeline_shards_and_preview(demo, work, tmp_path):
    pipe = open_pipeline("refcoco", work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=SETS, progress=False)
    pipe.run("shards")
    shards = pipe.artifact_dir("shards")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(demo.refer_root / "refcoco" / "instances.json"))

    plain = NemoDataset(shards, "train", demo.images_dir, gamma=0.0)
    for i in range(0, len(plain), 7):
        s = plain[i]
        (ann_id,) = _ann_ids(shards, s["meta"]["sent_id"])  # refcoco: one target
        np.testing.assert_array_equal(s["mask"], coco.annToMask(coco.anns[ann_id]))
        img = coco.imgs[s["meta"]["image_id"]]
        assert s["image"].size == (img["width"], img["height"])
        assert not s["meta"]["is_mosaic"]

    mosaic = NemoDataset(shards, "train", demo.images_dir, gamma=1.0, n_hard_negatives=2)
    batch = collate_fn([mosaic[i] for i in range(4)])
    assert all(m["is_mosaic"] for m in batch["meta"])
    assert batch["hard_negative_mask"].shape[0] == 4

    out = tmp_path / "sheet.png"
    res = CliRunner().invoke(app, ["preview", str(out), "--dataset", "refcoco", "--n", "8",
                                   "--work-dir", str(work), "--data-root", str(demo.refer_root),
                                   "--images", str(demo.images_dir),
                                   *[x for s in SETS for x in ("--set", s)]])
    assert res.exit_code == 0, res.output
    with Image.open(out) as sheet:
        assert sheet.size[0] == 4 * 320 and sheet.size[1] > 4 * 240  # 4 bands of 2 samples

    bands = tmp_path / "bands.png"
    res = CliRunner().invoke(app, ["preview", str(bands), "--dataset", "refcoco", "--n", "4",
                                   "--bands", "3x3,mixed", "--work-dir", str(work),
                                   "--data-root", str(demo.refer_root),
                                   "--images", str(demo.images_dir),
                                   *[x for s in SETS for x in ("--set", s)]])
    assert res.exit_code == 0, res.output
    bad = CliRunner().invoke(app, ["preview", str(tmp_path / "x.png"), "--dataset", "refcoco",
                                   "--bands", "diagonal", "--work-dir", str(work),
                                   "--data-root", str(demo.refer_root),
                                   "--images", str(demo.images_dir),
                                   *[x for s in SETS for x in ("--set", s)]])
    assert bad.exit_code == 2 and "diagonal" in bad.output
    (tmp_path / "file").write_text("x")
    for out, words in ((tmp_path / "file" / "p.png", "cannot write the preview"),
                       (tmp_path / "p.xyz", "not an image format PIL writes")):
        blocked = CliRunner().invoke(app, ["preview", str(out), "--dataset", "refcoco",
                                           "--n", "4", "--work-dir", str(work),
                                           "--data-root", str(demo.refer_root),
                                           "--images", str(demo.images_dir),
                                           *[x for s in SETS for x in ("--set", s)]])
        assert blocked.exit_code == 2 and words in blocked.output, blocked.output
    assert not list(tmp_path.glob(".*.tmp"))


def _ann_ids(shards, sent_id):
    import pyarrow.parquet as pq

    rows = pq.read_table(shards / "train", filters=[("sent_id", "=", sent_id)]).to_pylist()
    return set(rows[0]["ann_ids"])


def test_preview_refuses_unbuilt_shards(demo, work, tmp_path):
    res = CliRunner().invoke(app, ["preview", str(tmp_path / "x.png"), "--dataset", "refcoco",
                                   "--work-dir", str(work), "--data-root", str(demo.refer_root),
                                   "--images", str(demo.images_dir)])
    # unbuilt is exit 1, as for path, status --stage and export-refer (2 is bad input)
    assert res.exit_code == 1 and "not built" in res.output
