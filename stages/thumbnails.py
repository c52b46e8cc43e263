"""thumbnails: small JPEG copies of the training images, packed for random access by the reader.

A NeMo mosaic shows four images in cells of half width and height. Decoding four full COCO
JPEGs per sample makes a mosaic cost about four single samples: JPEG draft mode scales the
inverse DCT but not the entropy decoding, which dominates for photos. A copy at half the COCO
size (longest side 320 by default) decodes several times faster and loses nothing a cell shows.

A stage of its own (input: ingest), so that a tau or K sweep, which reruns `mosaic_tables` and
`shards`, never re-encodes a thumbnail: `shards` (with `shards.thumbnails`, the default) takes
this artifact as an upstream and records it in its manifest (key, relative location, every
file's size and sha256: `pipeline.training.schema.ThumbnailsRef`), and the reader finds the packs
through that record. Layout (declared in `pipeline.training.schema`), one pair per shard:

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

from pydantic import Field

from pipeline.io import part_name
from pipeline.stage import INT_MAX, Count, Params, ShardTask, ShardWriter, Stage, StageContext
from pipeline.training.schema import (
    PACK_SUFFIX,
    THUMBNAIL_COLUMNS,
    THUMBNAIL_PACKS,
    THUMBNAILS_SCHEMA_VERSION,
    THUMBNAILS_STAGE,
    THUMBNAILS_TABLE,
    thumbnails_schema,
)
from stages.ingest import data_locations
from stages.refer.manifests import load_data_manifest


class ThumbnailsParams(Params):
    size: int = Field(320, ge=16, le=INT_MAX, description="longest side of a thumbnail (pixels)")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of thumbnails")
    images_per_pack: Count = Field(2048, description="thumbnails per pack file (shard)")


class Thumbnails(Stage[ThumbnailsParams]):
    """Small JPEG copies of the training images, in packs, for the reader's mosaic cells."""

    name = THUMBNAILS_STAGE
    version = THUMBNAILS_SCHEMA_VERSION
    inputs = ("ingest",)
    tables = (THUMBNAILS_TABLE,)
    libraries = ("pyarrow", "pillow")
    # These keys were shards' until the thumbnails got a stage of their own; still accepted (with
    # a deprecation warning) as aliases of this section's keys.
    renamed_keys = {"shards.thumbnail_size": "thumbnails.size",
                    "shards.thumbnail_quality": "thumbnails.quality",
                    "shards.images_per_pack": "thumbnails.images_per_pack"}

    def run(self, ctx: StageContext[ThumbnailsParams]) -> None:
        import pyarrow.compute as pc

        p = ctx.params
        manifest = load_data_manifest(ctx.env.dataset)
        _, images_dir = data_locations(ctx.env, manifest)
        # the training split's images: every mosaic cell shows one
        refs = ctx.read_table("ingest", "refs").select(["image_id", "split"])
        train = set(refs.filter(pc.equal(refs.column("split"), manifest.train_split))
                    .column("image_id").to_pylist())
        images = ctx.read_table("ingest", "images").select(["image_id", "file_name"])
        items = sorted((i, str(images_dir / f)) for i, f in zip(
            images.column("image_id").to_pylist(), images.column("file_name").to_pylist(),
            strict=True) if i in train)
        tasks = [ShardTask(n, {"items": items[s:s + p.images_per_pack]})
                 for n, s in enumerate(range(0, len(items), p.images_per_pack))]
        stats = ctx.run_shards(_thumbnails_shard, tasks, desc="encode")
        ctx.record(thumbnails=sum(s["thumbnails"] for s in stats),
                   thumbnail_failures=[f for s in stats for f in s["failed"]][:20],
                   thumbnail_bytes=sum(s["bytes"] for s in stats))


def _thumbnails_shard(payload: dict[str, Any],
                      writer: ShardWriter[ThumbnailsParams]) -> dict[str, Any]:
    p = writer.params
    index, failed = write_pack(writer.staging, Path(part_name(writer.index)).stem,
                               [tuple(i) for i in payload["items"]], p.size, p.quality)
    writer.write_table(THUMBNAILS_TABLE, index)
    return {"thumbnails": index.num_rows, "failed": failed,
            "bytes": int(sum(index.column("length").to_pylist()))}


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
    pack = staging / THUMBNAIL_PACKS / pack_name
    pack.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list[Any]] = {c: [] for c in THUMBNAIL_COLUMNS}
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
    return pa.Table.from_pydict(cols, schema=thumbnails_schema()), failed
