"""Opening a `shards` artifact for reading: what is checked before a trainer trusts it, and where
its splits, images and thumbnails are.

Everything here runs once, when a :class:`~pipeline.training.dataset.NemoDataset` is built: the
artifact is complete (`_SUCCESS`), a shards artifact of a schema version this reader knows, not
marked corrupt and with every listed file there at its listed size; every Parquet file carries a
known schema version and the columns the reader needs. The thumbnails (schema 3) live in their
own artifact, found through the manifest's reference (:class:`~pipeline.training.schema.
ThumbnailsRef`) and checked the same way, plus that they are the very files the shards were built
with. Per-sample reads (row groups, pack bytes) are the dataset's business.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.io import MANIFEST, SCHEMA_VERSION_KEY, SUCCESS, read_json, table_files
from pipeline.training.schema import (
    IMAGES_TABLE,
    POOL_TABLE,
    SCHEMA_VERSION_FIELD,
    SHARDS_SCHEMA_VERSIONS,
    SHARDS_STAGE,
    THUMBNAIL_PACKS,
    THUMBNAILS_SCHEMA_VERSIONS,
    THUMBNAILS_STAGE,
    THUMBNAILS_TABLE,
    ThumbnailsRef,
    added_after,
)

REBUILD = "`nemo-pipe run --stage shards`"
THUMBNAIL_READ_COLUMNS = ("image_id", "pack", "offset", "length", "src_width", "src_height")
IMAGE_READ_COLUMNS = ("image_id", "file_name")
NOT_SPLITS = (IMAGES_TABLE, POOL_TABLE, THUMBNAILS_TABLE)  # table dirs that are not splits


def version_help(found: object, where: str, known: Collection[str] = SHARDS_SCHEMA_VERSIONS,
                 stage: str = SHARDS_STAGE) -> str:
    versions = ", ".join(repr(v) for v in sorted(known))
    return (
        f"{where}: {stage} schema version {found!r} is not supported by this reader "
        f"(pipeline.training knows {versions}). Re-export the {stage} with this nemo-pipe "
        f"(`nemo-pipe run --stage {stage}`), or upgrade nemo-pipe to a version whose reader "
        f"knows schema version {found!r}."
    )


def parquet_version(pf: pq.ParquetFile) -> str | None:
    value = (pf.schema_arrow.metadata or {}).get(SCHEMA_VERSION_KEY)
    return value.decode() if value is not None else None


def open_checked(path: Path, columns: Sequence[str],
                 versions: Collection[str] = SHARDS_SCHEMA_VERSIONS,
                 stage: str = SHARDS_STAGE) -> pq.ParquetFile:
    """A Parquet file of a known schema version that has `columns` (else ValueError); a shards
    column newer than the file's version (`schema.added_after`) may be absent."""
    pf = pq.ParquetFile(path)
    version = parquet_version(pf)
    if version not in versions:
        raise ValueError(version_help(version, str(path), versions, stage))
    missing = [c for c in columns if c not in pf.schema_arrow.names
               and not (stage == SHARDS_STAGE and added_after(c, version))]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing} of {stage} schema version {version!r}: the "
            f"artifact is damaged; re-run `nemo-pipe run --stage {stage} --force`")
    return pf


def _damaged(problems: list[Any], stage: str) -> ValueError:
    return ValueError(
        f"{problems[0]}: the {stage} artifact is damaged and must not be trained on; rebuild it "
        f"with `nemo-pipe run --stage {stage}` (`nemo-pipe verify` lists every problem)")


def check_shards_dir(d: Path) -> dict[str, Any]:
    """The manifest of a complete, undamaged shards artifact of a known schema version."""
    if not d.is_dir():
        raise FileNotFoundError(
            f"shards directory {d} does not exist; build it with {REBUILD} and pass the "
            "directory `nemo-pipe path --stage shards` prints")
    if not (d / SUCCESS).is_file():
        raise FileNotFoundError(
            f"{d} has no {SUCCESS} marker: the shards stage did not finish (or this is not an "
            f"artifact directory); re-run {REBUILD}")
    if not (d / MANIFEST).is_file():
        raise FileNotFoundError(f"{d} has no {MANIFEST}; re-run {REBUILD}")
    try:
        manifest = read_json(d / MANIFEST)
    except ValueError:
        raise ValueError(f"{d / MANIFEST} is not valid JSON: the artifact is damaged; "
                         f"rebuild it with {REBUILD}") from None
    stage = manifest.get("stage") if isinstance(manifest, dict) else None
    if stage != SHARDS_STAGE:
        raise ValueError(
            f"{d} is a {stage!r} artifact, not a 'shards' one; pass the directory printed by "
            "`nemo-pipe path --stage shards`")
    version = manifest.get(SCHEMA_VERSION_FIELD)
    if not isinstance(version, str) or version not in SHARDS_SCHEMA_VERSIONS:
        raise ValueError(version_help(version, str(d / MANIFEST)))
    from pipeline.verify import quick_check

    problems = quick_check(d, identity=False)  # marked corrupt, missing/extra/cut files
    if problems:
        raise _damaged(problems, SHARDS_STAGE)
    return manifest


def check_thumbnails_dir(d: Path, ref: ThumbnailsRef, shards_dir: Path) -> None:
    """`d` is the thumbnails artifact `ref` names, complete and undamaged, holding the very files
    (size and sha256, as its manifest lists them) the shards were built with."""
    where = (f"{shards_dir} was built with thumbnails artifact {ref.key}, expected at {d}")
    if not (d / SUCCESS).is_file() or not (d / MANIFEST).is_file():
        state = "not there" if not d.is_dir() else "not a finished artifact"
        raise FileNotFoundError(
            f"{where}, which is {state}. Keep the dataset's `shards/` and `thumbnails/` "
            "directories side by side as the work dir has them (or build it: `nemo-pipe run "
            "--stage thumbnails` with the shards' config), pass thumbnails_dir= where you put "
            "it, or thumbnails=False to decode the original images")
    try:
        manifest = read_json(d / MANIFEST)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("stage") != THUMBNAILS_STAGE \
            or manifest.get("key") != ref.key:
        found = manifest.get("key") if isinstance(manifest, dict) else "unreadable"
        raise ValueError(f"{where}; {d / MANIFEST} is not that artifact's (key {found!r}): pass "
                         "the thumbnails directory the shards' manifest names")
    from pipeline.verify import quick_check

    problems = quick_check(d, identity=False)
    if problems:
        raise _damaged(problems, THUMBNAILS_STAGE)
    listed = manifest.get("files") or {}
    for rel, want in sorted(ref.files.items()):
        have = listed.get(rel) or {}
        if (have.get("bytes"), have.get("sha256")) != (want["bytes"], want["sha256"]):
            raise ValueError(
                f"{d / rel}: not the file the shards {shards_dir} were built with (size or "
                f"sha256 differs from the shards' manifest); rebuild them with {REBUILD}")


@dataclass(frozen=True)
class RowGroups:
    """Every non-empty row group of a split, as flat arrays searched per sample."""

    starts: np.ndarray  # first sample index of each group
    file: np.ndarray  # index into the split's files
    group: np.ndarray  # row group within that file
    length: int

    @classmethod
    def of(cls, files: Sequence[Path], columns: Sequence[str]) -> RowGroups:
        starts, file_ix, group_ix = [], [], []
        total = 0
        for f, path in enumerate(files):
            pf = open_checked(path, columns)
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    starts.append(total)
                    file_ix.append(f)
                    group_ix.append(g)
                    total += n
            pf.close()
        return cls(np.asarray(starts, dtype=np.int64), np.asarray(file_ix, dtype=np.int32),
                   np.asarray(group_ix, dtype=np.int32), total)

    def locate(self, index: int) -> tuple[int, int, int]:
        """(file, row group, row within the group) of sample `index` (0 <= index < length)."""
        g = int(np.searchsorted(self.starts, index, side="right")) - 1
        return int(self.file[g]), int(self.group[g]), index - int(self.starts[g])


@dataclass(frozen=True)
class ThumbnailIndex:
    """Sorted image ids and where each one's thumbnail is (pack path, offset, length)."""

    paths: list[str]
    ids: np.ndarray
    pack: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    size: np.ndarray  # (n, 2): the ORIGINAL's width, height (fits are computed from them)

    def find(self, image_id: int) -> tuple[int, int, int, tuple[int, int]] | None:
        """(pack, offset, length, original size) of an image's thumbnail, or None."""
        i = int(np.searchsorted(self.ids, image_id))
        if i == len(self.ids) or self.ids[i] != image_id:
            return None
        return (int(self.pack[i]), int(self.offset[i]), int(self.length[i]),
                (int(self.size[i, 0]), int(self.size[i, 1])))


def read_thumbnail_index(root: Path, versions: Collection[str], stage: str) -> ThumbnailIndex:
    """The index of `root/thumbnails/` over the packs in `root/thumbnail_packs/`."""
    parts = []
    for path in table_files(root / THUMBNAILS_TABLE):
        pf = open_checked(path, THUMBNAIL_READ_COLUMNS, versions, stage)
        parts.append(pf.read(columns=list(THUMBNAIL_READ_COLUMNS)))
        pf.close()
    cols = {c: [v for t in parts for v in t.column(c).to_pylist()]
            for c in THUMBNAIL_READ_COLUMNS}
    packs = sorted(set(cols["pack"]))
    pack_dir = root / THUMBNAIL_PACKS
    missing = [p for p in packs if not (pack_dir / p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{pack_dir} lacks pack file(s) {missing}: the artifact is damaged; re-run "
            f"`nemo-pipe run --stage {stage} --force`")
    ids = np.asarray(cols["image_id"], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    pack_of = {p: i for i, p in enumerate(packs)}
    return ThumbnailIndex(
        paths=[str(pack_dir / p) for p in packs],
        ids=ids[order],
        pack=np.asarray([pack_of[p] for p in cols["pack"]], np.int32)[order],
        offset=np.asarray(cols["offset"], np.int64)[order],
        length=np.asarray(cols["length"], np.int64)[order],
        size=np.stack([np.asarray(cols["src_width"], np.int64),
                       np.asarray(cols["src_height"], np.int64)], 1)[order],
    )


class ShardsArtifact:
    """A checked shards artifact directory: its manifest, splits, images and thumbnails."""

    def __init__(self, shards_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(shards_dir)
        self.manifest = check_shards_dir(self.dir)

    @property
    def schema_version(self) -> str:
        return str(self.manifest[SCHEMA_VERSION_FIELD])

    def available_splits(self) -> list[str]:
        """Split directories of the artifact that hold at least one part file."""
        return sorted(p.name for p in self.dir.iterdir()
                      if p.is_dir() and p.name not in NOT_SPLITS and table_files(p))

    def split_files(self, split: str) -> list[Path]:
        files = table_files(self.dir / split) if split not in NOT_SPLITS else []
        if not files:
            raise ValueError(
                f"split {split!r} is not in {self.dir} (no {split}/part-*.parquet); splits "
                f"present: {', '.join(self.available_splits()) or 'none'}")
        return files

    def images(self) -> dict[int, str]:
        """image_id -> file name (relative to the images dir) of every image rows refer to."""
        files = table_files(self.dir / IMAGES_TABLE)
        if not files:
            raise FileNotFoundError(
                f"{self.dir / IMAGES_TABLE} has no part files; the artifact is damaged: "
                f"re-run `nemo-pipe run --stage shards --force`")
        images: dict[int, str] = {}
        for path in files:
            pf = open_checked(path, IMAGE_READ_COLUMNS)
            t = pf.read(columns=list(IMAGE_READ_COLUMNS))
            pf.close()
            images.update(zip(t.column("image_id").to_pylist(),
                              t.column("file_name").to_pylist(), strict=True))
        return images

    def pool(self) -> np.ndarray | None:
        """The mosaic pool's image ids (int64, ascending) from the `pool` table (schema >= 4),
        or None when the artifact has none (older schema: the reader derives it)."""
        files = table_files(self.dir / POOL_TABLE)
        if not files:
            return None
        parts = []
        for path in files:
            pf = open_checked(path, ("image_id",))
            parts.append(pf.read(columns=["image_id"]).column("image_id").to_numpy())
            pf.close()
        return np.unique(np.concatenate(parts).astype(np.int64))

    def thumbnails_ref(self) -> ThumbnailsRef | None:
        try:
            return ThumbnailsRef.from_manifest(self.manifest)
        except ValueError as exc:
            raise ValueError(f"{self.dir / MANIFEST}: {exc}: the artifact is damaged; rebuild "
                             f"it with {REBUILD}") from None

    def thumbnails(self, wanted: bool | None,
                   thumbnails_dir: str | os.PathLike[str] | None = None
                   ) -> ThumbnailIndex | None:
        """The thumbnail index to fill mosaic cells from; None when not used.

        `wanted`: None uses the thumbnails when the shards were built with them, True requires
        them, False never looks. Schema 3 shards name their thumbnails artifact in the manifest
        (found at its recorded relative path, or at `thumbnails_dir`); schema 1 and 2 shards
        hold them inside.
        """
        if wanted is False:
            return None
        ref = self.thumbnails_ref()
        if ref is not None:
            root = Path(thumbnails_dir) if thumbnails_dir is not None else self.dir / ref.path
            check_thumbnails_dir(root, ref, self.dir)
            return read_thumbnail_index(root, THUMBNAILS_SCHEMA_VERSIONS, THUMBNAILS_STAGE)
        if table_files(self.dir / THUMBNAILS_TABLE):  # schema 1 / 2: inside the shards dir
            return read_thumbnail_index(self.dir, SHARDS_SCHEMA_VERSIONS, SHARDS_STAGE)
        if wanted:
            raise FileNotFoundError(
                f"thumbnails=True but {self.dir} was built without thumbnails: build the shards "
                "with `--set shards.thumbnails=true`, or pass thumbnails=None / False")
        return None
