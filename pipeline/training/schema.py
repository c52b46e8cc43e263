"""The layout of a `shards` artifact and of the `thumbnails` artifact it references.

ONE declaration of table names, column names and types, schema versions and the manifest fields,
imported by the stages that write them (`stages/shards.py`, `stages/thumbnails.py`) and by the
reader that reads them (`pipeline.training.dataset`), so the two cannot drift apart. Stdlib only at
import (pyarrow is imported by the functions that build Arrow schemas): the reader stays thin and
the stage modules stay cheap to import.

Shards (one directory per table, `part-*.parquet`, every file's schema version in its metadata)::

    <shards>/_manifest.json          {"stage": "shards", "schema_version": "4",
                                      "upstream_artifacts": {...}, "thumbnails": {reference},
                                      "with_views": bool}
    <shards>/images/                 image_id, file_name, width, height
    <shards>/pool/                   image_id (ascending): the mosaic pool (schema >= 4)
    <shards>/<split>/                one row per sentence (ROW_SCHEMA), sorted by sent_id

Thumbnails (their own artifact since shards schema 3; inside the shards dir before)::

    <thumbnails>/thumbnails/part-NNNNN.parquet   image_id -> pack, offset, length, width, height
                                                 (of the thumbnail), src_width, src_height
    <thumbnails>/thumbnail_packs/part-NNNNN.jpgs the thumbnails' JPEG files, concatenated

The shards manifest's `thumbnails` field (:class:`ThumbnailsRef`) names the thumbnails artifact the
shards were built with: its key, its directory relative to the shards directory, and the size and
sha256 of each of its files, so a reader given only the shards directory finds the packs and can
tell that they are the ones the shards were built against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.training.mosaic_candidates import EXCLUDED, FROM_POOL

if TYPE_CHECKING:
    import pyarrow as pa

# -- shards ------------------------------------------------------------------------------------
SHARDS_STAGE = "shards"
SHARDS_SCHEMA_VERSION = "6"
"""Written by the shards stage (its stage version, in the manifest and every Parquet file).
1: first layout. 2: same columns; training rows' same-image negatives follow the split and
positive rules, evaluation rows have none. 3: same columns; the thumbnails are their own
artifact, referenced by the manifest's `thumbnails` field instead of stored inside. 4 (additive):
the rows carry mosaic_tables' `neg_from_pool` and `excluded_image_ids` (k=all rows stored as
exclusions) and the artifact holds the mosaic pool (`pool/`), which random mosaics draw from;
`hn_source_ids` (the hard negatives' source sentence ids, aligned with `hn_texts`), `view_names`
and `view_texts` (the referent's multi-view expressions, training rows with `shards.with_views`),
and the manifest's `with_views`; the hard-negative lists hold at most `shards.hard_negative_pool`
entries. 5 (additive): `view_allowed_quadrants`, each view's own allowed quadrants (aligned
with `view_texts`), so a sample showing a view places the positive by that view's positional
words, not by its original sentence's; `raw`, the sentence as written (REFER's `raw`, which LAVT
and ReLA tokenize). 6: same columns; `positional_words`, `allowed_quadrants` (from
mosaic_tables 4) and `view_allowed_quadrants` follow the mended positional parser: a negated
word counts as its opposite, each axis is settled on its own, relational / gaze / body-part
words give way to a real position (`stages.text.positional`). The reader reads every version;
what an older one lacks it fills with its empty value (`COLUMN_SINCE`, `COLUMN_EMPTY`)."""
SHARDS_SCHEMA_VERSIONS = frozenset({"1", "2", "3", "4", "5", "6"})
"""Shards schema versions the reader understands (manifest and every Parquet file)."""

SCHEMA_VERSION_FIELD = "schema_version"
UPSTREAM_ARTIFACTS_FIELD = "upstream_artifacts"
THUMBNAILS_FIELD = "thumbnails"  # the manifest field holding the ThumbnailsRef (schema >= 3)
WITH_VIEWS_FIELD = "with_views"  # manifest (schema >= 4): the rows carry multi-view expressions

IMAGES_TABLE = "images"
IMAGE_COLUMNS = ("image_id", "file_name", "width", "height")
POOL_TABLE = "pool"
"""The mosaic pool (schema >= 4): mosaic_tables' `pool.parquet` carried over, one column
`image_id`, ascending: the training-split images with an image embedding. Random mosaics draw
from it; k=all rows stored as exclusions are read against it. Before schema 4 the reader takes
the distinct image ids of the training split's rows instead (the same images, embedding aside)."""
POOL_COLUMNS = ("image_id",)
SPLIT_TABLES = ("train", "val", "test", "testA", "testB")
TRAIN_SPLIT = "train"
ALL_QUADRANTS = (0, 1, 2, 3)  # quadrant order: top-left, top-right, bottom-left, bottom-right

ROW_COLUMNS = (
    "sent_id", "ref_id", "image_id", "split", "sent", "category_id", "ann_ids", "no_target",
    "mask_rle", "neg_image_ids", "k_shortfall", "positional_words", "allowed_quadrants",
    "hn_texts", "hn_kinds", "hn_scores", "hn_source_ids", "view_names", "view_texts",
    FROM_POOL, EXCLUDED, "view_allowed_quadrants", "raw",
)
"""The columns of a split table, in file order."""
COLUMN_SINCE = {"hn_source_ids": "4", "view_names": "4", "view_texts": "4", FROM_POOL: "4",
                EXCLUDED: "4", "view_allowed_quadrants": "5", "raw": "5"}
"""Columns added after schema version 1, with the version that added them: a file of an older
version lacks them, and a reader fills them with their empty value (see :func:`added_after`)."""

COLUMN_EMPTY: dict[str, object] = {"hn_source_ids": [], "view_names": [], "view_texts": [],
                                   FROM_POOL: False, EXCLUDED: None,
                                   "view_allowed_quadrants": [], "raw": None}
"""The value a reader gives a column its file lacks: no views, no source ids, and a listed
mosaic row (`neg_image_ids` holds its candidates, as every row before `k=all` did); views
without their own quadrants (schema 4) place the positive in any cell."""

NO_SOURCE_ID = -1
"""`hn_source_ids` entry of a negative without a source sentence (schema < 4 rows read back)."""

ORIGINAL_EXPRESSION = "original"
"""What a sample's `meta["expression"]` says when its sentence is the row's own `sent`."""


def added_after(column: str, version: str) -> bool:
    """Whether `column` of a split table is newer than schema `version` (a file of that version
    lacks it, and a reader fills in its empty value)."""
    since = COLUMN_SINCE.get(column)
    return since is not None and int(version) < int(since)


def row_schema() -> pa.Schema:
    """The Arrow schema of a split table (ROW_COLUMNS with their types)."""
    import pyarrow as pa

    rle = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    types = {"sent_id": pa.int64(), "ref_id": pa.int64(), "image_id": pa.int64(),
             "split": pa.string(), "sent": pa.string(), "category_id": pa.int32(),
             "ann_ids": pa.list_(pa.int64()), "no_target": pa.bool_(), "mask_rle": rle,
             "neg_image_ids": pa.list_(pa.int64()), "k_shortfall": pa.int32(),
             "positional_words": pa.list_(pa.string()),
             "allowed_quadrants": pa.list_(pa.int8()), "hn_texts": pa.list_(pa.string()),
             "hn_kinds": pa.list_(pa.string()), "hn_scores": pa.list_(pa.float32()),
             "hn_source_ids": pa.list_(pa.int64()), "view_names": pa.list_(pa.string()),
             "view_texts": pa.list_(pa.string()),
             FROM_POOL: pa.bool_(), EXCLUDED: pa.list_(pa.int64()),
             "view_allowed_quadrants": pa.list_(pa.list_(pa.int8())), "raw": pa.string()}
    return pa.schema([(c, types[c]) for c in ROW_COLUMNS])


def pool_schema() -> pa.Schema:
    """The Arrow schema of the pool table."""
    import pyarrow as pa

    return pa.schema([("image_id", pa.int64())])


# -- thumbnails --------------------------------------------------------------------------------
THUMBNAILS_STAGE = "thumbnails"
THUMBNAILS_SCHEMA_VERSION = "1"
"""Written by the thumbnails stage (its stage version, in every index file)."""
THUMBNAILS_SCHEMA_VERSIONS = frozenset({"1"})
THUMBNAILS_TABLE = "thumbnails"
THUMBNAIL_PACKS = "thumbnail_packs"  # a directory of its own: `thumbnails/` stays plain Parquet
PACK_SUFFIX = ".jpgs"
THUMBNAIL_COLUMNS = ("image_id", "pack", "offset", "length", "width", "height", "src_width",
                     "src_height")


def thumbnails_schema() -> pa.Schema:
    """The Arrow schema of the thumbnails index (THUMBNAIL_COLUMNS with their types)."""
    import pyarrow as pa

    types = {"image_id": pa.int64(), "pack": pa.string(), "offset": pa.int64(),
             "length": pa.int32(), "width": pa.int32(), "height": pa.int32(),
             "src_width": pa.int32(), "src_height": pa.int32()}
    return pa.schema([(c, types[c]) for c in THUMBNAIL_COLUMNS])


@dataclass(frozen=True)
class ThumbnailsRef:
    """What a shards manifest says about the thumbnails artifact it was built with.

    `path` is the thumbnails artifact's directory relative to the shards directory (in the work
    dir `../../thumbnails/<key>`, so a copy of the whole dataset directory keeps working);
    `files` maps each of its files to its `bytes` and `sha256`, as its own manifest lists them.
    """

    key: str
    version: str
    path: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"stage": THUMBNAILS_STAGE, "key": self.key, "version": self.version,
                "path": self.path, "files": self.files}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ThumbnailsRef | None:
        """The reference in a shards manifest; None when it has none (no thumbnails, or a
        schema 1/2 artifact that holds them inside). Raises ValueError when it is malformed."""
        ref = manifest.get(THUMBNAILS_FIELD)
        if ref is None:
            return None
        ok = (isinstance(ref, dict) and ref.get("stage") == THUMBNAILS_STAGE
              and all(isinstance(ref.get(k), str) for k in ("key", "version", "path"))
              and isinstance(ref.get("files"), dict)
              and all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                      and isinstance(v.get("bytes"), int) for v in ref["files"].values()))
        if not ok:
            raise ValueError(f"the manifest's {THUMBNAILS_FIELD!r} field is malformed")
        return cls(ref["key"], ref["version"], ref["path"],
                   {k: {"bytes": v["bytes"], "sha256": v["sha256"]}
                    for k, v in ref["files"].items()})
