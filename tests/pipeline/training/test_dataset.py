"""pipeline.dataset.NemoDataset against independent computations on hand-built shard fixtures.

The fixtures are written here with pyarrow from the shards schema itself (not with the reader's
helpers), the images are real JPEGs made with PIL, and the masks are pycocotools RLEs; expected
mosaics are computed with PIL/numpy from cell offsets worked out by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.training.dataset import SCHEMA_VERSIONS, NemoDataset, collate_fn

ROOT = Path(__file__).resolve().parents[3]
VERSION_KEY = b"nemo_pipe.schema_version"

SPLIT_SCHEMA = pa.schema([
    ("sent_id", pa.int64()), ("ref_id", pa.int64()), ("image_id", pa.int64()),
    ("split", pa.string()), ("sent", pa.string()), ("category_id", pa.int32()),
    ("ann_ids", pa.list_(pa.int64())), ("no_target", pa.bool_()),
    ("mask_rle", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    ("neg_image_ids", pa.list_(pa.int64())), ("k_shortfall", pa.int32()),
    ("positional_words", pa.list_(pa.string())), ("allowed_quadrants", pa.list_(pa.int8())),
    ("hn_texts", pa.list_(pa.string())), ("hn_kinds", pa.list_(pa.string())),
    ("hn_scores", pa.list_(pa.float32())),
])
IMAGES_SCHEMA = pa.schema([("image_id", pa.int64()), ("file_name", pa.string()),
                          ("width", pa.int32()), ("height", pa.int32())])

# Hand-computed cells of a 101 x 77 mosaic: left 101 // 2 = 50 wide, right 51; top 77 // 2 = 38
# high, bottom 39.  (x0, y0, w, h) for quadrants 0..3.
CELLS_101x77 = {0: (0, 0, 50, 38), 1: (50, 0, 51, 38), 2: (0, 38, 50, 39), 3: (50, 38, 51, 39)}
POSITIVE_SIZES = {1: (101, 77), 2: (64, 48), 3: (48, 64), 4: (33, 21)}
POOL = list(range(5, 17))


# ------------------------------------------------------------------------------------ fixtures
def encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


def object_mask(w: int, h: int, k: int) -> np.ndarray:
    """An asymmetric blob whose place depends on k (so two of them differ)."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 6 + k % 3: h // 2 + k % 4, w // 8 + k % 5: w // 3 + 2 * (k % 3)] = 1
    yy, xx = np.mgrid[:h, :w]
    m[(xx - (0.7 - 0.1 * (k % 3)) * w) ** 2 + ((yy - 0.65 * h) * 1.5) ** 2 < (0.12 * w) ** 2] = 1
    return m


def write_jpeg(path: Path, w: int, h: int, seed: int, solid: tuple | None = None) -> None:
    if solid is not None:
        Image.new("RGB", (w, h), solid).save(path, quality=95)
        return
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    arr = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)),
                    np.full((h, w), 40 + 13 * seed % 200)], axis=-1).astype(np.int16)
    arr += rng.integers(-30, 30, size=arr.shape, dtype=np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_table(table: pa.Table, path: Path, version: str | None, row_group_rows: int) -> None:
    meta = {} if version is None else {VERSION_KEY: version.encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=row_group_rows)


def make_row(sent_id: int, image_id: int, split: str, mask: np.ndarray, **kw) -> dict:
    neg, hn = kw.get("neg", []), kw.get("hn", [])
    return {
        "sent_id": sent_id, "ref_id": sent_id // 2, "image_id": image_id, "split": split,
        "sent": f"sentence {sent_id}", "category_id": kw.get("category_id", 1),
        "ann_ids": kw.get("ann_ids", [sent_id * 10]), "no_target": kw.get("no_target", False),
        "mask_rle": encode(mask), "neg_image_ids": neg, "k_shortfall": max(0, 6 - len(neg)),
        "positional_words": kw.get("words", []), "allowed_quadrants": kw.get("quads", [0, 1, 2, 3]),
        "hn_texts": hn,
        "hn_kinds": [("same_image", "similar_text", "augment")[j % 3] for j in range(len(hn))],
        "hn_scores": [float("nan") if j % 2 else 0.5 - 0.1 * j for j in range(len(hn))],
    }


@dataclass
class Shards:
    root: Path
    images: Path
    rows: dict[str, list[dict]] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # sent_id -> expected mask
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)

    def ds(self, split: str = "train", **kw) -> NemoDataset:
        return NemoDataset(self.root, split, self.images, **kw)

    def row(self, split: str, sent_id: int) -> dict:
        return next(r for r in self.rows[split] if r["sent_id"] == sent_id)


def write_shards(root: Path, images_dir: Path, rows: dict[str, list[dict]],
                 sizes: dict[int, tuple[int, int]], files_per_split: int = 1,
                 row_group_rows: int = 8, manifest_version: str = "1",
                 parquet_version: str | None = "1") -> None:
    root.mkdir(parents=True, exist_ok=True)
    ids = sorted(sizes)
    images = pa.table({"image_id": ids, "file_name": [f"img_{i:04d}.jpg" for i in ids],
                       "width": [sizes[i][0] for i in ids], "height": [sizes[i][1] for i in ids]},
                      schema=IMAGES_SCHEMA)
    write_table(images, root / "images" / "part-00000.parquet", parquet_version, 256)
    for split, split_rows in rows.items():
        split_rows = sorted(split_rows, key=lambda r: r["sent_id"])
        per = math.ceil(len(split_rows) / files_per_split)
        for f in range(files_per_split):
            chunk = split_rows[f * per:(f + 1) * per]
            table = pa.Table.from_pylist(chunk, schema=SPLIT_SCHEMA)
            write_table(table, root / split / f"part-{f:05d}.parquet", parquet_version,
                        row_group_rows)
    seal(root, manifest_version)


def seal(root: Path, manifest_version: str = "1") -> None:
    """Publish a hand-built shards dir as the engine does: a manifest listing every file with
    its size and sha256, then `_SUCCESS`."""
    files = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size,
                                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(root.rglob("*"))
             if p.is_file() and not p.name.startswith("_")}
    (root / "_manifest.json").write_text(json.dumps(
        {"stage": "shards", "schema_version": manifest_version, "key": "test", "files": files}))
    (root / "_SUCCESS").write_text("")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    """64 train rows (2 files, row groups of 8), 8 val rows with candidates, 3 testA rows."""
    base = tmp_path_factory.mktemp("shards")
    images = base / "images"
    images.mkdir()
    sizes = dict(POSITIVE_SIZES)
    for k, i in enumerate(POOL):
        sizes[i] = (30 + 7 * k, 20 + 5 * (k % 4))
    for i, (w, h) in sizes.items():
        write_jpeg(images / f"img_{i:04d}.jpg", w, h, seed=i)
    out = Shards(base / "shards", images, sizes=sizes)
    rng = np.random.default_rng(123)
    train = []
    for i in range(64):
        sid, img = 1000 + i, 1 + i % 4
        w, h = sizes[img]
        kw: dict = {"neg": [int(v) for v in rng.choice(POOL, size=6, replace=False)],
                    "hn": [f"hard {i}.{j}" for j in range(i % 5)]}
        if i % 16 == 5:
            kw["neg"] = kw["neg"][:2]
        if i == 7:
            kw["neg"] = [img, 5, 5, 6]  # malformed: positive and a repeat -> 2 usable
        if i == 9:
            kw["neg"] = [img, 5, 6, 7, 5]  # malformed: usable {5, 6, 7}
        if i % 8 == 3:
            kw.update(words=["left"], quads=[0, 2])
        if i % 8 == 6:
            kw.update(words=["bottom", "right"], quads=[3])
        if i % 10 == 4:
            mask = np.zeros((h, w), np.uint8)
            kw.update(no_target=True, category_id=-1, ann_ids=[])
            row = make_row(sid, img, "train", mask, **kw)
        elif i % 10 == 8:
            m1, m2 = object_mask(w, h, i), object_mask(w, h, i + 7)
            mask = m1 | m2
            row = make_row(sid, img, "train", mask, ann_ids=[1, 2], **kw)
            # the union RLE the way the shards stage builds it: merge of the two targets' RLEs
            merged = mask_utils.merge([mask_utils.encode(np.asfortranarray(m1)),
                                       mask_utils.encode(np.asfortranarray(m2))], intersect=False)
            row["mask_rle"] = {"size": [int(v) for v in merged["size"]],
                               "counts": merged["counts"].decode("ascii")}
        else:
            mask = object_mask(w, h, i)
            row = make_row(sid, img, "train", mask, **kw)
        out.masks[sid] = mask
        train.append(row)
    val = []
    for i in range(8):
        img = 1 + i % 4
        mask = object_mask(*sizes[img], i)
        val.append(make_row(5000 + i, img, "val", mask, neg=[5, 6, 7, 8], hn=["x", "y"]))
        out.masks[5000 + i] = mask
    test_a = [make_row(7000 + i, 1, "testA", object_mask(101, 77, i)) for i in range(3)]
    out.rows = {"train": train, "val": val, "testA": test_a}
    write_shards(out.root, images, out.rows, sizes, files_per_split=2)
    return out


def cells_for(w: int, h: int) -> dict[int, tuple[int, int, int, int]]:
    lw, th = w // 2, h // 2
    return {0: (0, 0, lw, th), 1: (lw, 0, w - lw, th), 2: (0, th, lw, h - th),
            3: (lw, th, w - lw, h - th)}


def pil_rgb(path: Path, draft: tuple[int, int] | None = None) -> Image.Image:
    im = Image.open(path)
    if draft is not None:
        im.draft("RGB", draft)
    return im.convert("RGB")


def sample_key(s: dict) -> tuple:
    return (s["image"].tobytes(), s["image"].size, s["mask"].tobytes(), s["mask"].shape,
            s["sentence"], tuple(s["hard_negatives"]), json.dumps(s["meta"], sort_keys=True))


# ------------------------------------------------------------------------------- geometry
def test_cells_of_101x77_by_hand():
    assert cells_for(101, 77) == CELLS_101x77


def test_stretch_mosaic_mask_and_pixels_land_in_positive_cell(shards):
    ds = shards.ds(gamma=1.0)
    index = 0  # sent 1000: image 1 (101 x 77), 6 candidates, unconstrained
    assert ds.row(index)["image_id"] == 1
    pos_path = shards.images / "img_0001.jpg"
    rle = shards.row("train", 1000)["mask_rle"]
    seen = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        s = ds[index]
        meta = s["meta"]
        assert meta["is_mosaic"] and s["image"].size == (101, 77) and s["mask"].shape == (77, 101)
        q = meta["quadrant"]
        seen.add(q)
        x0, y0, cw, ch = CELLS_101x77[q]
        expected = np.zeros((77, 101), np.uint8)
        expected[y0:y0 + ch, x0:x0 + cw] = np.asarray(
            Image.fromarray(decode(rle)).resize((cw, ch), Image.Resampling.NEAREST))
        assert s["mask"].dtype == np.uint8
        np.testing.assert_array_equal(s["mask"], expected)
        img = np.asarray(s["image"])
        # the positive is decoded at reduced size too (JPEG draft never below the cell)
        want = np.asarray(pil_rgb(pos_path, (cw, ch)).resize((cw, ch), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(img[y0:y0 + ch, x0:x0 + cw], want)
        for nq in set(range(4)) - {q}:
            nx, ny, nw, nh = CELLS_101x77[nq]
            neg = shards.images / f"img_{meta['source_image_ids'][nq]:04d}.jpg"
            want = np.asarray(pil_rgb(neg, (nw, nh)).resize((nw, nh), Image.Resampling.BILINEAR))
            np.testing.assert_array_equal(img[ny:ny + nh, nx:nx + nw], want)
        if len(seen) == 4 and epoch >= 8:
            break
    assert seen == {0, 1, 2, 3}


def test_single_image_sample_is_the_positive_and_its_mask(shards):
    ds = shards.ds(gamma=0.0)
    for i in (0, 1, 2, 3, 8):
        s = ds[i]
        meta = s["meta"]
        assert not meta["is_mosaic"] and meta["quadrant"] is None
        assert meta["source_image_ids"] == [meta["image_id"]]
        path = shards.images / f"img_{meta['image_id']:04d}.jpg"
        np.testing.assert_array_equal(np.asarray(s["image"]), np.asarray(pil_rgb(path)))
        np.testing.assert_array_equal(s["mask"], shards.masks[meta["sent_id"]])
        assert s["sentence"] == f"sentence {meta['sent_id']}"


def test_letterbox_geometry_by_hand(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    sizes = {1: (101, 77), 20: (60, 20), 21: (60, 20), 22: (60, 20)}
    write_jpeg(images / "img_0001.jpg", 101, 77, seed=1)
    for i, color in zip((20, 21, 22), [(220, 40, 40), (40, 220, 40), (40, 40, 220)], strict=True):
        write_jpeg(images / f"img_{i:04d}.jpg", 60, 20, seed=i, solid=color)
    mask = object_mask(101, 77, 3)
    rows = {"train": [make_row(1, 1, "train", mask, neg=[20, 21, 22])]}
    write_shards(tmp_path / "shards", images, rows, sizes)
    ds = NemoDataset(tmp_path / "shards", "train", images, gamma=1.0, cell_fit="letterbox")
    # Positive 101 x 77 fitted into each cell, scale = min(cw / 101, ch / 77), rounded:
    #  q0 50x38: s = 38/77 -> 49.84 -> 50 x 38, no pad
    #  q1 51x38: s = 38/77 -> 50 x 38, pad one column on the right (x = 100)
    #  q2 50x39: s = 50/101 -> 77 * 50/101 = 38.12 -> 50 x 38, pad one row at the bottom (y = 76)
    #  q3 51x39: s = 51/101 -> 77 * 51/101 = 38.88 -> 51 x 39, no pad
    positive_fit = {0: (50, 38, 0, 0), 1: (50, 38, 0, 0), 2: (50, 38, 0, 0), 3: (51, 39, 0, 0)}
    # Negative 60 x 20 (3:1): width-bound; 50-wide cells: s = 5/6 -> 50 x 16.67 -> 50 x 17;
    # 51-wide cells: s = 0.85 -> 51 x 17; vertical offset (ch - 17) // 2 = 10 (ch 38) / 11 (39).
    negative_fit = {0: (50, 17, 0, 10), 1: (51, 17, 0, 10), 2: (50, 17, 0, 11),
                    3: (51, 17, 0, 11)}
    seen = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        s = ds[0]
        q = s["meta"]["quadrant"]
        seen.add(q)
        img, m = np.asarray(s["image"]).astype(int), s["mask"]
        x0, y0, cw, ch = CELLS_101x77[q]
        nw, nh, ox, oy = positive_fit[q]
        expected = np.zeros((77, 101), np.uint8)
        expected[y0 + oy:y0 + oy + nh, x0 + ox:x0 + ox + nw] = np.asarray(
            Image.fromarray(mask).resize((nw, nh), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(m, expected)
        want = np.asarray(pil_rgb(images / "img_0001.jpg", (nw, nh)).resize(
            (nw, nh), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(img[y0 + oy:y0 + oy + nh, x0 + ox:x0 + ox + nw], want)
        pad = np.ones((ch, cw), bool)
        pad[oy:oy + nh, ox:ox + nw] = False
        assert (img[y0:y0 + ch, x0:x0 + cw][pad] == 0).all()
        for nq in set(range(4)) - {q}:
            x0, y0, cw, ch = CELLS_101x77[nq]
            nw, nh, ox, oy = negative_fit[nq]
            cell = img[y0:y0 + ch, x0:x0 + cw]
            content = np.zeros((ch, cw), bool)
            content[oy:oy + nh, ox:ox + nw] = True
            assert (cell[content].max(axis=-1) > 150).all()  # solid colour, bright channel
            assert (cell[~content] == 0).all()  # letterbox padding is exactly 0
            assert (m[y0:y0 + ch, x0:x0 + cw] == 0).all()
        if len(seen) == 4:
            break
    assert seen == {0, 1, 2, 3}


# ------------------------------------------------------------------------------- sampling
# -------------------------------------------------------------------------------- thumbnails
THUMB_SCHEMA = pa.schema([("image_id", pa.int64()), ("pack", pa.string()),
                          ("offset", pa.int64()), ("length", pa.int32()),
                          ("width", pa.int32()), ("height", pa.int32()),
                          ("src_width", pa.int32()), ("src_height", pa.int32())])


@pytest.fixture(scope="module")
def thumbed(shards, tmp_path_factory) -> tuple[Shards, dict[int, bytes]]:
    """The shards fixture plus thumbnails (half size, 2 packs) of every image but image 6."""
    import shutil

    root = tmp_path_factory.mktemp("thumbed") / "shards"
    shutil.copytree(shards.root, root)
    thumbs: dict[int, bytes] = {}
    rows = []
    ids = [i for i in sorted(shards.sizes) if i != 6]
    for n, pack_ids in enumerate((ids[::2], ids[1::2])):
        pack = f"part-{n:05d}.jpgs"
        blob = bytearray()
        for i in pack_ids:
            w, h = shards.sizes[i]
            im = Image.open(shards.images / f"img_{i:04d}.jpg").convert("RGB")
            im = im.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            thumbs[i] = buf.getvalue()
            rows.append({"image_id": i, "pack": pack, "offset": len(blob),
                         "length": len(thumbs[i]), "width": im.size[0], "height": im.size[1],
                         "src_width": w, "src_height": h})
            blob += thumbs[i]
        (root / "thumbnail_packs").mkdir(exist_ok=True)
        (root / "thumbnail_packs" / pack).write_bytes(bytes(blob))
        write_table(pa.Table.from_pylist([r for r in rows if r["pack"] == pack],
                                         schema=THUMB_SCHEMA),
                    root / "thumbnails" / f"part-{n:05d}.parquet", "1", 256)
    seal(root)
    return Shards(root, shards.images, shards.rows, shards.masks, shards.sizes), thumbs


def test_mosaic_cells_come_from_thumbnails(thumbed):
    sh, thumbs = thumbed
    ds = sh.ds(gamma=1.0)
    assert ds.uses_thumbnails
    seen_fallback = seen_thumb = False
    for index in range(0, 64, 3):
        s = ds[index]
        if not s["meta"]["is_mosaic"]:
            continue
        img = np.asarray(s["image"])
        w, h = sh.sizes[s["meta"]["image_id"]]
        for q, (x0, y0, cw, ch) in cells_for(w, h).items():
            source = s["meta"]["source_image_ids"][q]
            thumb = None if source == 6 else Image.open(io.BytesIO(thumbs[source]))
            if thumb is None or thumb.width < cw or thumb.height < ch:
                # no thumbnail, or one smaller than the cell: the original at reduced size
                seen_fallback |= source == 6
                im = pil_rgb(sh.images / f"img_{source:04d}.jpg", (cw, ch))
            else:
                seen_thumb = True
                im = thumb
                im.draft("RGB", (cw, ch))
                im = im.convert("RGB")
            want = np.asarray(im.resize((cw, ch), Image.Resampling.BILINEAR))
            np.testing.assert_array_equal(img[y0:y0 + ch, x0:x0 + cw], want)
        # the mask still comes from the full-size RLE, into the positive's cell
        x0, y0, cw, ch = cells_for(w, h)[s["meta"]["quadrant"]]
        expected = np.zeros((h, w), np.uint8)
        expected[y0:y0 + ch, x0:x0 + cw] = np.asarray(Image.fromarray(
            sh.masks[s["meta"]["sent_id"]]).resize((cw, ch), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(s["mask"], expected)
    assert seen_fallback and seen_thumb


def test_thumbnails_off_or_required(thumbed, shards):
    sh, _ = thumbed
    off = sh.ds(gamma=1.0, thumbnails=False)
    assert not off.uses_thumbnails
    plain = shards.ds(gamma=1.0)
    for index in (0, 1, 2):  # without thumbnails: the same samples as an artifact without them
        assert sample_key(off[index]) == sample_key(plain[index])
    single = sh.ds(gamma=0.0)  # single images never use thumbnails
    np.testing.assert_array_equal(np.asarray(single[0]["image"]),
                                  np.asarray(pil_rgb(sh.images / "img_0001.jpg")))
    with pytest.raises(FileNotFoundError, match="thumbnails"):
        shards.ds(thumbnails=True)


def test_thumbnail_pack_missing_is_an_error(thumbed, tmp_path):
    import shutil

    sh, _ = thumbed
    root = tmp_path / "shards"
    shutil.copytree(sh.root, root)
    (root / "thumbnail_packs" / "part-00001.jpgs").unlink()
    with pytest.raises(ValueError, match="thumbnail_packs/part-00001.jpgs: missing"):
        NemoDataset(root, "train", sh.images)


def test_negatives_distinct_never_the_positive_and_in_quadrant_order(shards):
    ds = shards.ds(gamma=1.0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            row = shards.rows["train"][i]
            meta = ds[i]["meta"]
            usable = {c for c in row["neg_image_ids"] if c != row["image_id"]}
            assert meta["is_mosaic"] == (len(usable) >= 3), (i, row["neg_image_ids"])
            if not meta["is_mosaic"]:
                continue
            src = meta["source_image_ids"]
            q = meta["quadrant"]
            assert len(src) == 4 and src[q] == row["image_id"] == meta["image_id"]
            negs = [s for j, s in enumerate(src) if j != q]
            assert len(set(negs)) == 3 and row["image_id"] not in negs
            assert set(negs) <= usable
            if i == 9:
                assert set(negs) == {5, 6, 7}


def test_positional_constraint_holds_and_unconstrained_uses_all_quadrants(shards):
    constrained = shards.ds(gamma=1.0, positional_constraint=True)
    free = shards.ds(gamma=1.0)
    left_rows = [i for i, r in enumerate(shards.rows["train"]) if r["allowed_quadrants"] == [0, 2]]
    corner_rows = [i for i, r in enumerate(shards.rows["train"]) if r["allowed_quadrants"] == [3]]
    assert left_rows and corner_rows
    got_c, got_f = set(), set()
    for epoch in range(12):
        constrained.set_epoch(epoch)
        free.set_epoch(epoch)
        for i in left_rows:
            q = constrained[i]["meta"]["quadrant"]
            assert q in (0, 2)
            got_c.add(q)
            got_f.add(free[i]["meta"]["quadrant"])
        for i in corner_rows:
            assert constrained[i]["meta"]["quadrant"] == 3
    assert got_c == {0, 2}
    assert got_f == {0, 1, 2, 3}


def test_gamma_zero_one_and_eval_split(shards):
    eligible = [i for i, r in enumerate(shards.rows["train"])
                if len({c for c in r["neg_image_ids"] if c != r["image_id"]}) >= 3]
    never = shards.ds(gamma=0.0)
    always = shards.ds(gamma=1.0)
    for epoch in (0, 1):
        never.set_epoch(epoch)
        always.set_epoch(epoch)
        assert not any(never[i]["meta"]["is_mosaic"] for i in range(len(never)))
        assert all(always[i]["meta"]["is_mosaic"] for i in eligible)
    val = shards.ds("val", gamma=1.0, n_hard_negatives=2)
    for epoch in (0, 5):
        val.set_epoch(epoch)
        for i in range(len(val)):
            s = val[i]
            assert not s["meta"]["is_mosaic"] and s["hard_negatives"] == []
            np.testing.assert_array_equal(s["mask"], shards.masks[s["meta"]["sent_id"]])


def test_mosaic_frequency_follows_gamma(shards):
    gamma = 0.6
    ds = shards.ds(gamma=gamma)
    eligible = [i for i, r in enumerate(shards.rows["train"])
                if len({c for c in r["neg_image_ids"] if c != r["image_id"]}) >= 3]
    n = hits = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in eligible:
            hits += ds[i]["meta"]["is_mosaic"]
            n += 1
    sd = math.sqrt(n * gamma * (1 - gamma))
    assert abs(hits - n * gamma) < 4 * sd, (hits, n)


def test_curriculum_gates_mosaics_and_hard_negatives(shards):
    ds = shards.ds(gamma=1.0, n_hard_negatives=3, curriculum_start_epoch=2)
    rows = shards.rows["train"]
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            assert not s["meta"]["is_mosaic"] and s["hard_negatives"] == []
            assert s["hard_negative_kinds"] == [] and s["meta"]["epoch"] == epoch
    for epoch in (2, 3):
        ds.set_epoch(epoch)
        mosaics = 0
        for i in range(len(ds)):
            s = ds[i]
            mosaics += s["meta"]["is_mosaic"]
            pool = list(zip(rows[i]["hn_texts"], rows[i]["hn_kinds"], strict=True))
            drawn = list(zip(s["hard_negatives"], s["hard_negative_kinds"], strict=True))
            assert len(drawn) == min(3, len(pool)) and set(drawn) <= set(pool)
        assert mosaics > len(ds) // 2
    none = shards.ds(gamma=1.0, n_hard_negatives=0)
    assert all(none[i]["hard_negatives"] == [] for i in range(8))


def test_grefcoco_multi_target_union_and_no_target(shards):
    ds = shards.ds(gamma=0.0)
    multi = [i for i, r in enumerate(shards.rows["train"]) if len(r["ann_ids"]) == 2]
    empty = [i for i, r in enumerate(shards.rows["train"]) if r["no_target"]]
    assert multi and empty
    for i in multi:
        s = ds[i]
        w, h = shards.sizes[s["meta"]["image_id"]]
        k = 1000 + i
        union = object_mask(w, h, i) | object_mask(w, h, i + 7)
        np.testing.assert_array_equal(s["mask"], union)
        assert union.sum() > object_mask(w, h, i).sum()  # the second target really adds pixels
        assert not s["meta"]["no_target"] and s["meta"]["sent_id"] == k
    mosaic = shards.ds(gamma=1.0)
    for i in empty:
        for d in (ds, mosaic):
            s = d[i]
            assert s["meta"]["no_target"] and s["mask"].sum() == 0
            assert s["mask"].shape == (s["image"].size[1], s["image"].size[0])


# ---------------------------------------------------------------------------- determinism
def _loader_samples(ds, workers: int, context: str | None = None, indices=None) -> list[tuple]:
    subset = ds if indices is None else torch.utils.data.Subset(ds, indices)
    loader = torch.utils.data.DataLoader(
        subset, batch_size=5, shuffle=False, num_workers=workers, collate_fn=collate_fn,
        multiprocessing_context=context if workers else None)
    out = []
    for batch in loader:
        for j in range(len(batch["sentence"])):
            out.append(sample_key({"image": batch["image"][j], "mask": batch["mask"][j],
                                   "sentence": batch["sentence"][j],
                                   "hard_negatives": [t for t, ok in zip(
                                       batch["hard_negatives"][j],
                                       batch["hard_negative_mask"][j].tolist(), strict=True)
                                       if ok],
                                   "meta": batch["meta"][j]}))
    return out


def test_same_seed_same_samples_across_worker_counts_and_reruns(shards):
    kw = dict(gamma=0.6, n_hard_negatives=2, positional_constraint=True, seed=7)
    a, b = shards.ds(**kw), shards.ds(**kw)
    a.set_epoch(1)
    b.set_epoch(1)
    direct = [sample_key(a[i]) for i in range(len(a))]
    assert _loader_samples(a, 0) == direct
    assert _loader_samples(b, 2) == direct  # fork workers
    assert [sample_key(b[i]) for i in reversed(range(len(b)))] == direct[::-1]
    spawned = _loader_samples(b, 2, "spawn", indices=list(range(12)))
    assert spawned == direct[:12]
    other_seed = shards.ds(**{**kw, "seed": 8})
    other_seed.set_epoch(1)
    assert [sample_key(other_seed[i]) for i in range(len(a))] != direct


def test_thumbnail_samples_same_across_worker_counts(thumbed):
    sh, _ = thumbed
    ds = sh.ds(gamma=1.0, seed=3)
    direct = [sample_key(ds[i]) for i in range(len(ds))]
    assert _loader_samples(ds, 2) == direct  # fork workers open their own pack files
    assert _loader_samples(sh.ds(gamma=1.0, seed=3), 2, "spawn", indices=list(range(8))) == \
        direct[:8]


def test_epoch_changes_draws_and_reaches_workers(shards):
    ds = shards.ds(gamma=0.6, seed=3)
    metas = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        metas[epoch] = [json.dumps(ds[i]["meta"]) for i in range(len(ds))]
    differ = sum(x != y for x, y in zip(metas[0], metas[1], strict=True))
    assert differ > len(ds) // 2
    # (epoch, index) keys: a sampler-driven epoch gives the same samples as set_epoch
    ds.set_epoch(0)
    assert [json.dumps(ds[(1, i)]["meta"]) for i in range(len(ds))] == metas[1]
    # re-pickled (non-persistent) and persistent workers both follow set_epoch
    for persistent in (False, True):
        loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2,
                                             collate_fn=collate_fn, persistent_workers=persistent)
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            got = [json.dumps(m) for batch in loader for m in batch["meta"]]
            assert got == metas[epoch]


def test_random_access_across_files_and_row_groups(shards):
    ds = shards.ds(gamma=0.0)
    want = [r["sent_id"] for r in shards.rows["train"]]
    assert len(ds) == 64
    order = list(range(64))
    np.random.default_rng(0).shuffle(order)
    for i in order + [-1, -64]:
        assert ds.row(i)["sent_id"] == want[i]
    assert len(ds._process_local().groups) <= ds.row_group_cache_size
    with pytest.raises(IndexError):
        ds[64]
    clone = pickle.loads(pickle.dumps(ds))  # no open handles in the pickle
    assert sample_key(clone[5]) == sample_key(ds[5])


# ---------------------------------------------------------------------------------- collate
def _tensor_transform(image, mask):
    image = image.resize((16, 12), Image.Resampling.BILINEAR)
    mask = Image.fromarray(mask).resize((16, 12), Image.Resampling.NEAREST)
    return (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
            torch.from_numpy(np.asarray(mask).copy()))


def test_collate_shapes_padding_and_validity(shards):
    ds = shards.ds(gamma=1.0, n_hard_negatives=3, transform=_tensor_transform)
    idx = [0, 1, 2, 3, 4, 5]  # hn counts 0, 1, 2, 3, 4 -> capped at 3, 0
    batch = collate_fn([ds[i] for i in idx])
    assert batch["image"].shape == (6, 3, 12, 16) and batch["image"].dtype == torch.uint8
    assert batch["mask"].shape == (6, 12, 16)
    assert batch["sentence"] == [f"sentence {1000 + i}" for i in idx]
    assert batch["hard_negative_mask"].dtype == torch.bool
    assert batch["hard_negative_mask"].tolist() == [
        [False] * 3, [True, False, False], [True, True, False], [True] * 3, [True] * 3, [False] * 3]
    assert batch["hard_negatives"][2] == ["hard 2.0", "hard 2.1", ""]
    assert batch["hard_negative_kinds"][1] == ["same_image", "", ""]
    assert [m["sent_id"] for m in batch["meta"]] == [1000 + i for i in idx]
    plain = collate_fn([shards.ds(gamma=0.0)[i] for i in (0, 1)])  # PIL, different sizes
    assert isinstance(plain["image"], list) and isinstance(plain["mask"], list)
    assert plain["hard_negative_mask"].shape == (2, 0) and plain["hard_negatives"] == [[], []]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.text(min_size=1, max_size=5), max_size=4), min_size=1, max_size=6))
def test_collate_pads_any_hard_negative_counts(counts):
    batch = [{"image": torch.zeros(2, 2), "mask": torch.zeros(2, 2), "sentence": "s",
              "hard_negatives": hn, "hard_negative_kinds": ["k"] * len(hn), "meta": {}}
             for hn in counts]
    out = collate_fn(batch)
    n = max(len(hn) for hn in counts)
    assert out["hard_negative_mask"].shape == (len(counts), n)
    assert out["image"].shape == (len(counts), 2, 2)
    for hn, padded, valid in zip(counts, out["hard_negatives"],
                                 out["hard_negative_mask"].tolist(), strict=True):
        assert len(padded) == n and padded[:len(hn)] == hn and set(padded[len(hn):]) <= {""}
        assert valid == [True] * len(hn) + [False] * (n - len(hn))


# ------------------------------------------------------------------------------------ errors
def _tiny(tmp_path: Path, **kw) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    write_jpeg(images / "img_0001.jpg", 20, 10, seed=1)
    rows = {"train": [make_row(1, 1, "train", np.zeros((10, 20), np.uint8))],
            "val": [make_row(2, 1, "val", np.zeros((10, 20), np.uint8))]}
    write_shards(tmp_path / "shards", images, rows, {1: (20, 10)}, **kw)
    return tmp_path / "shards", images


def test_unknown_manifest_schema_version_is_refused(tmp_path):
    root, images = _tiny(tmp_path, manifest_version="9")
    with pytest.raises(ValueError) as err:
        NemoDataset(root, "train", images)
    msg = str(err.value)
    assert "'9'" in msg and "'1'" in msg and "nemo-pipe run --stage shards" in msg
    assert "upgrade nemo-pipe" in msg and "_manifest.json" in msg


@pytest.mark.parametrize("version", ["9", None])
def test_unknown_parquet_schema_version_is_refused(tmp_path, version):
    root, images = _tiny(tmp_path, parquet_version=version)
    with pytest.raises(ValueError, match=r"nemo-pipe run --stage shards") as err:
        NemoDataset(root, "train", images)
    assert repr(version) in str(err.value) and "part-00000.parquet" in str(err.value)
    assert all(repr(v) in str(err.value) for v in SCHEMA_VERSIONS)


def test_missing_split_dir_and_success_marker(tmp_path):
    root, images = _tiny(tmp_path)
    with pytest.raises(ValueError, match=r"'testB'.*splits present: train, val"):
        NemoDataset(root, "testB", images)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NemoDataset(tmp_path / "nowhere", "train", images)
    with pytest.raises(FileNotFoundError, match="images directory"):
        NemoDataset(root, "train", tmp_path / "no_images")
    (root / "_SUCCESS").unlink()
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        NemoDataset(root, "train", images)
    (root / "_SUCCESS").write_text("")
    (root / "_manifest.json").write_text(json.dumps({"stage": "ingest", "schema_version": "1"}))
    with pytest.raises(ValueError, match="not a 'shards'"):
        NemoDataset(root, "train", images)


def test_bad_arguments(tmp_path):
    root, images = _tiny(tmp_path)
    for kw in ({"gamma": 1.5}, {"n_hard_negatives": -1}, {"cell_fit": "crop"}, {"seed": -1}):
        with pytest.raises(ValueError):
            NemoDataset(root, "train", images, **kw)
    with pytest.raises(ValueError):
        NemoDataset(root, "train", images).set_epoch(-1)


# ------------------------------------------------------------------------------------- thin
def test_import_is_thin():
    code = (
        "import sys, pipeline.dataset\n"
        "heavy = ['open_clip', 'faiss', 'transformers', 'dask', 'polars', 'typer']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(('pipeline', 'stages')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == ""
    loaded = set(out[1].split(","))
    # the reader and its own modules, the stdlib-only io helpers, and nothing of the stages
    assert loaded <= {"pipeline", "pipeline.dataset", "pipeline.io", "pipeline.training",
                      "pipeline.training.artifact", "pipeline.training.dataset",
                      "pipeline.training.mosaic", "pipeline.training.mosaic_candidates",
                      "pipeline.training.sampling",
                      "pipeline.training.schema"}, loaded
    assert "pipeline.training.dataset" in loaded
