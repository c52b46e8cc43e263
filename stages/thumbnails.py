"""Small JPEG copies of the training images, packed for random access by the training reader.

A NeMo mosaic shows four images in cells of half width and height. Decoding four full COCO
JPEGs per sample makes a mosaic cost about four single samples: JPEG draft mode scales the
inverse DCT but not the entropy decoding, which dominates for photos. A copy at half the COCO
size (longest side 320 by default) decodes several times faster and loses nothing a cell shows.

Layout inside the shards artifact, one pair per shard of images:

    thumbnails/part-NNNNN.parquet       image_id, pack, offset, length, width, height (of
                                        the thumbnail), src_width, src_height (of the original)
    thumbnail_packs/part-NNNNN.jpgs     the thumbnails' JPEG files, concatenated

A reader seeks to `offset` in `thumbnail_packs/<pack>` and decodes `length` bytes: one read per
image, no per-image files, and the manifest checksums every pack like any other artifact file.
The packs have their own directory so that `thumbnails/` reads as a plain Parquet dataset.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

TABLE = "thumbnails"
PACKS_DIR = "thumbnail_packs"
PACK_SUFFIX = ".jpgs"


def thumbnail_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """The size of a thumbnail whose longest side is at most `longest` (never upscaled);
    sides are rounded half up and at least 1."""
    scale = min(1.0, longest / max(width, height))
    return (max(1, math.floor(width * scale + 0.5)), max(1, math.floor(height * scale + 0.5)))


def make_thumbnail(path: Path, longest: int, quality: int) -> tuple[bytes, tuple[int, int],
                                                                   tuple[int, int]]:
    """(JPEG bytes, thumbnail size, original size) of the image at `path`, in RGB."""
    from PIL import Image

    with Image.open(path) as im:
        src = im.size
        size = thumbnail_size(*src, longest)
        im.draft("RGB", size)  # libjpeg downscales while decoding, never below `size`
        rgb = im.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), size, src


def write_pack(staging: Path, part: str, items: list[tuple[int, str]], longest: int,
               quality: int) -> tuple[Any, list[tuple[int, str, str]]]:
    """Write `<part>.jpgs` under `staging/thumbnail_packs` for (image_id, path) `items`; return the
    index table and the images that could not be decoded (id, path, error)."""
    import pyarrow as pa

    pack_name = part + PACK_SUFFIX
    pack = staging / PACKS_DIR / pack_name
    pack.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list[Any]] = {c: [] for c in (
        "image_id", "pack", "offset", "length", "width", "height", "src_width", "src_height")}
    failed: list[tuple[int, str, str]] = []
    offset = 0
    with open(pack, "wb") as f:
        for image_id, path in items:
            try:
                data, size, src = make_thumbnail(Path(path), longest, quality)
            except OSError as exc:  # missing or undecodable: the reader uses the original
                failed.append((image_id, path, str(exc)))
                continue
            f.write(data)
            for col, value in (("image_id", image_id), ("pack", pack_name), ("offset", offset),
                               ("length", len(data)), ("width", size[0]), ("height", size[1]),
                               ("src_width", src[0]), ("src_height", src[1])):
                cols[col].append(value)
            offset += len(data)
    types = {"image_id": pa.int64(), "pack": pa.string(), "offset": pa.int64(),
             "length": pa.int32(), "width": pa.int32(), "height": pa.int32(),
             "src_width": pa.int32(), "src_height": pa.int32()}
    return pa.table({c: pa.array(v, types[c]) for c, v in cols.items()}), failed
