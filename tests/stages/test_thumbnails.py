"""The thumbnails stage, against the raw REFER files and PIL; how shards and the reader find it."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.api import open_pipeline
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.registry import load_registry
from pipeline.training.dataset import NemoDataset
from pipeline.verify import mark_corrupt, verify_artifact
from stages.refer.manifests import load_data_manifest
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
    pipe = pipe_for(demo, work, "thumbnails.size=48", "thumbnails.images_per_pack=7")
    pipe.run("thumbnails")
    d = pipe.artifact_dir("thumbnails")
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


def test_shards_reference_the_thumbnails_and_the_reader_finds_them(demo, work):
    pipe = pipe_for(demo, work)
    pipe.run("shards")
    shards, thumbs = pipe.artifact_dir("shards"), pipe.artifact_dir("thumbnails")
    # nothing of the thumbnails inside the shards: the manifest names them
    assert not (shards / "thumbnails").exists() and not (shards / "thumbnail_packs").exists()
    m = json.loads((shards / "_manifest.json").read_text())
    tm = json.loads((thumbs / "_manifest.json").read_text())
    ref = m["thumbnails"]
    assert ref["key"] == thumbs.name == m["upstream"]["thumbnails"]
    assert (shards / ref["path"]).resolve() == thumbs.resolve()
    assert ref["files"] == {k: {"bytes": v["bytes"], "sha256": v["sha256"]}
                            for k, v in tm["files"].items()}
    ds = NemoDataset(shards, "train", demo.images_dir, gamma=1.0)
    assert ds.uses_thumbnails
    mosaics = [ds[i] for i in range(min(len(ds), 12))]
    assert any(s["meta"]["is_mosaic"] for s in mosaics)
    for s in mosaics:  # same geometry as the originals: the mosaic keeps the positive's size
        w, h = s["image"].size
        assert s["mask"].shape == (h, w)

    off = pipe_for(demo, work, "shards.thumbnails=false")
    off.run("shards")
    assert "thumbnails" not in off.resolve("shards").upstream
    assert "thumbnails" not in json.loads(
        (off.artifact_dir("shards") / "_manifest.json").read_text())
    assert not NemoDataset(off.artifact_dir("shards"), "train", demo.images_dir).uses_thumbnails
    with pytest.raises(FileNotFoundError, match="thumbnails"):
        NemoDataset(off.artifact_dir("shards"), "train", demo.images_dir, thumbnails=True)


def test_a_k_sweep_reuses_the_thumbnails(demo, work):
    """Changing K reruns mosaic_tables and shards; the thumbnails are neither re-encoded nor
    republished (same key, same directory, untouched files), and the new shards point at them."""
    first = pipe_for(demo, work)
    first.run("shards")
    thumbs = first.artifact_dir("thumbnails")
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [thumbs, *thumbs.rglob("*")]}

    sweep = pipe_for(demo, work, "mosaic_tables.k=5")
    plan = {i.name: i.state for i in sweep.run("shards")}
    assert plan["thumbnails"] == "cached"
    assert plan["mosaic_tables"] == "stale" and plan["shards"] == "stale"
    assert sweep.artifact_dir("thumbnails") == thumbs
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in [thumbs, *thumbs.rglob("*")]} == before
    assert sweep.artifact_dir("shards") != first.artifact_dir("shards")
    m = json.loads((sweep.artifact_dir("shards") / "_manifest.json").read_text())
    assert m["thumbnails"]["key"] == thumbs.name
    assert m["upstream_artifacts"]["mosaic_tables"]["params"]["k"] == 5
    assert NemoDataset(sweep.artifact_dir("shards"), "train", demo.images_dir).uses_thumbnails


def test_a_corrupt_pack_is_caught(demo, work, tmp_path):
    pipe = pipe_for(demo, work)
    pipe.run("shards")
    shards, thumbs = pipe.artifact_dir("shards"), pipe.artifact_dir("thumbnails")
    pack = sorted((thumbs / "thumbnail_packs").iterdir())[0]
    original = pack.read_bytes()

    # a flipped byte: verify names the pack; once marked, the reader refuses the shards
    flipped = bytearray(original)
    flipped[100] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(flipped))
    problems = verify_artifact(thumbs)
    assert [p.file for p in problems] == [f"thumbnail_packs/{pack.name}"]
    mark_corrupt(thumbs, problems, by="test")
    with pytest.raises(ValueError, match=f"thumbnail_packs/{pack.name}.*thumbnails artifact"):
        NemoDataset(shards, "train", demo.images_dir)
    # the next run rebuilds the thumbnails (same key, same bytes): the shards are good again
    plan = {i.name: i.state for i in pipe.run("shards")}
    assert plan["thumbnails"] == "corrupt" and plan["shards"] == "cached"
    assert pack.read_bytes() == original
    assert NemoDataset(shards, "train", demo.images_dir).uses_thumbnails

    # a cut pack: the reader's own size check finds it without any verify
    pack.chmod(0o644)
    pack.write_bytes(original[:-10])
    with pytest.raises(ValueError, match=f"thumbnail_packs/{pack.name}"):
        NemoDataset(shards, "train", demo.images_dir)
    assert not NemoDataset(shards, "train", demo.images_dir, thumbnails=False).uses_thumbnails
    pack.write_bytes(original)

    # a flipped byte the shards stage reads: it re-hashes the packs, so the rebuild heals it
    pack.write_bytes(bytes(flipped))
    healed = pipe_for(demo, work, "shards.rows_per_group=8")
    healed.run("shards")
    assert pack.read_bytes() == original


def test_reader_finds_moved_thumbnails_only_when_told(demo, work, tmp_path):
    pipe = pipe_for(demo, work)
    pipe.run("shards")
    shards, thumbs = pipe.artifact_dir("shards"), pipe.artifact_dir("thumbnails")
    # a trainer copies the dataset dir as a whole: the relative reference still holds
    copy = tmp_path / "copy"
    shutil.copytree(work / "refcoco", copy)
    moved = copy / "shards" / shards.name
    assert NemoDataset(moved, "train", demo.images_dir).uses_thumbnails
    # the shards alone: a clear error, or thumbnails_dir= / thumbnails=False
    alone = tmp_path / "alone" / "shards"
    shutil.copytree(shards, alone)
    with pytest.raises(FileNotFoundError, match=f"thumbnails artifact {thumbs.name}"):
        NemoDataset(alone, "train", demo.images_dir)
    assert NemoDataset(alone, "train", demo.images_dir, thumbnails_dir=thumbs).uses_thumbnails
    assert not NemoDataset(alone, "train", demo.images_dir, thumbnails=False).uses_thumbnails
    # another thumbnails artifact (other params, other key) is refused
    other = pipe_for(demo, work, "thumbnails.quality=50")
    other.run("thumbnails")
    with pytest.raises(ValueError, match="not that artifact"):
        NemoDataset(alone, "train", demo.images_dir, thumbnails_dir=other.artifact_dir(
            "thumbnails"))
    # the same key with other bytes is refused too
    fake = tmp_path / "fake"
    shutil.copytree(thumbs, fake)
    manifest = json.loads((fake / "_manifest.json").read_text())
    rel = next(r for r in manifest["files"] if r.endswith(".jpgs"))
    manifest["files"][rel]["sha256"] = "0" * 64
    os.chmod(fake / "_manifest.json", 0o644)
    (fake / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the file the shards"):
        NemoDataset(alone, "train", demo.images_dir, thumbnails_dir=fake)


# -- the old shards.* keys ------------------------------------------------------------------
REGISTRY = load_registry()


@pytest.mark.parametrize("old,new,value", [
    ("shards.thumbnail_size", "thumbnails.size", 64),
    ("shards.thumbnail_quality", "thumbnails.quality", 75),
    ("shards.images_per_pack", "thumbnails.images_per_pack", 9),
])
def test_old_shards_keys_still_work_with_a_warning(old, new, value, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        config = load_config(REGISTRY, sets=[f"{old}={value}"])
    section, name = new.split(".")
    assert getattr(config.params_for(section), name) == value
    assert f"{old} is deprecated, use {new}" in caplog.text
    # the same in a YAML file, and the same artifact key as the new name
    path = tmp_path / "c.yaml"
    path.write_text(f"{old.split('.')[0]}:\n  {old.split('.')[1]}: {value}\n")
    assert load_config(REGISTRY, config_file=path).as_dict() == config.as_dict()
    assert config.as_dict() == load_config(REGISTRY, sets=[f"{new}={value}"]).as_dict()
    # both names, different values: which one is meant is not guessed
    with pytest.raises(ConfigError, match=f"{old} and {new} are both set"):
        load_config(REGISTRY, sets=[f"{old}={value}", f"{new}={value + 1}"])
    load_config(REGISTRY, sets=[f"{old}={value}", f"{new}={value}"])  # the same: fine


def test_cells_larger_than_a_thumbnail_come_from_the_original(demo, work):
    """A cell larger than the 320-px thumbnail (a large input_size, shifted or random cuts)
    was filled by enlarging the thumbnail: a blur the user never asked for. Such cells are
    decoded from the original, exactly as without thumbnails; smaller cells keep using them."""
    pipe = pipe_for(demo, work)
    pipe.run("shards")
    shards = pipe.artifact_dir("shards")

    def samples(input_size, thumbnails):
        ds = NemoDataset(shards, "train", demo.images_dir, gamma=1.0, thumbnails=thumbnails,
                         cell_geometry="square", input_size=input_size)
        return [ds[i] for i in range(min(len(ds), 10))]

    big_thumbs, big_plain = samples(1400, None), samples(1400, False)  # 700-px cells
    assert any(s["meta"]["is_mosaic"] for s in big_thumbs)
    for a, b in zip(big_thumbs, big_plain, strict=True):
        assert a["meta"]["source_image_ids"] == b["meta"]["source_image_ids"]
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    small_thumbs, small_plain = samples(416, None), samples(416, False)  # 208-px cells
    assert any(not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
               for a, b in zip(small_thumbs, small_plain, strict=True) if a["meta"]["is_mosaic"])
