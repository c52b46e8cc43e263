"""Thumbnails in the shards artifact, against the raw REFER files and PIL."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.api import open_pipeline
from pipeline.dataset import NemoDataset
from pipeline.verify import verify_artifact
from stages.datasets import load_data_manifest
from stages.thumbnails import thumbnail_size


def pipe_for(demo, work, *sets, dataset="refcoco"):
    return open_pipeline(dataset, work, data_root=demo.refer_root, images=demo.images_dir,
                         sets=["embed.model=tiny", "embed.pretrained=null", *sets],
                         progress=False)


@pytest.mark.parametrize("size,longest,want", [
    ((640, 480), 320, (320, 240)),
    ((101, 77), 320, (101, 77)),  # never upscaled
    ((101, 77), 50, (50, 38)),  # 77 * 50 / 101 = 38.1
    ((500, 333), 320, (320, 213)),  # 333 * 0.64 = 213.1
    ((3, 1000), 320, (1, 320)),  # 3 * 0.32 = 0.96 rounds to 1
    ((640, 427), 320, (320, 214)),  # 213.5 rounds half up
])
def test_thumbnail_size_by_hand(size, longest, want):
    assert thumbnail_size(*size, longest) == want


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_thumbnails_cover_training_images_and_look_like_them(demo, work):
    pipe = pipe_for(demo, work, "shards.thumbnail_size=48", "shards.images_per_pack=7")
    pipe.run("shards")
    d = pipe.artifact_dir("shards")
    m = load_data_manifest("refcoco")
    raw = pickle.loads((demo.refer_root / m.dir / m.refs_file).read_bytes())
    instances = json.loads((demo.refer_root / m.dir / m.instances_file).read_text())
    train_images = {r["image_id"] for r in raw if r["split"] == "train"}
    files = {im["id"]: im["file_name"] for im in instances["images"]}

    index = pq.read_table(d / "thumbnails").to_pylist()
    assert sorted(r["image_id"] for r in index) == sorted(train_images)
    assert len({r["pack"] for r in index}) == -(-len(train_images) // 7)
    scores = []
    for r in index:
        blob = (d / "thumbnail_packs" / r["pack"]).read_bytes()
        data = blob[r["offset"]:r["offset"] + r["length"]]
        assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"  # one whole JPEG
        thumb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        original = Image.open(demo.images_dir / files[r["image_id"]]).convert("RGB")
        assert (r["src_width"], r["src_height"]) == original.size
        size = thumbnail_size(*original.size, 48)
        assert (r["width"], r["height"]) == size and thumb.shape == (size[1], size[0], 3)
        reference = np.asarray(original.resize(size, Image.Resampling.LANCZOS))
        scores.append(psnr(thumb, reference))
    # draft + Lanczos + JPEG against Lanczos alone, on noisy 48-pixel images: 23-34 dB
    assert min(scores) > 20 and np.mean(scores) > 25
    # the manifest checksums the packs: a flipped byte is named by verify
    pack = d / "thumbnail_packs" / index[0]["pack"]
    raw_bytes = bytearray(pack.read_bytes())
    raw_bytes[100] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(raw_bytes))
    problems = verify_artifact(d)
    assert any(index[0]["pack"] in str(p) for p in problems)


def test_reader_uses_stage_thumbnails_and_off_switch(demo, work):
    pipe = pipe_for(demo, work)
    pipe.run("shards")
    d = pipe.artifact_dir("shards")
    ds = NemoDataset(d, "train", demo.images_dir, gamma=1.0)
    assert ds.uses_thumbnails
    mosaics = [ds[i] for i in range(min(len(ds), 12))]
    assert any(s["meta"]["is_mosaic"] for s in mosaics)
    for s in mosaics:  # same geometry as the originals: the mosaic keeps the positive's size
        w, h = s["image"].size
        assert s["mask"].shape == (h, w)
    off = pipe_for(demo, work, "shards.thumbnails=false")
    off.run("shards")
    assert not (off.artifact_dir("shards") / "thumbnails").exists()
    assert not (off.artifact_dir("shards") / "thumbnail_packs").exists()
    assert not NemoDataset(off.artifact_dir("shards"), "train", demo.images_dir).uses_thumbnails
