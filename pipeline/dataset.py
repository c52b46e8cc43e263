"""Training-side reader of a ``shards`` artifact: a thin PyTorch ``Dataset`` with NeMo mosaics.

The ``shards`` stage writes everything a training loop needs per sentence (mask RLE, ranked mosaic
negative candidates, allowed quadrants, ranked hard-negative texts) so that this reader does no
retrieval at all: it only decodes a few JPEGs and one RLE per sample. It is kept *thin* on
purpose: importing it pulls in torch, numpy, pyarrow, pillow and pycocotools only (plus the
stdlib-only :mod:`pipeline.io`), never open_clip / faiss / transformers / dask / polars / typer,
so a training environment does not need the preprocessing stack.

Layout read (``schema_version`` "1" or "2": the same columns; in "2" the training rows' same-image
negatives follow the split and positive rules and evaluation rows have none)::

    <shards_dir>/_manifest.json        {"stage": "shards", "schema_version": "2", ...}
    <shards_dir>/_SUCCESS
    <shards_dir>/images/part-*.parquet image_id, file_name, width, height
    <shards_dir>/<split>/part-*.parquet one row per sentence (sorted by sent_id)
    <shards_dir>/thumbnails/part-*.parquet  image_id -> pack, offset, length (optional) of
    <shards_dir>/thumbnail_packs/*.jpgs     small JPEG copies of the training images, from
                                       which mosaic cells are filled

Sample dict (``NemoDataset[i]``)::

    image               PIL.Image (RGB, W x H of the positive image), or what `transform` returns
    mask                np.uint8 H x W in {0, 1} (union of the targets; zeros for no-target)
    sentence            str
    hard_negatives      list[str]: first `n_hard_negatives` of hn_texts (train split, curriculum on)
    hard_negative_kinds list[str]: their provenance kinds, aligned with hard_negatives
    meta                {sent_id, ref_id, image_id, split, index, epoch, is_mosaic, quadrant,
                         source_image_ids, no_target}

Mosaic geometry (quadrants 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right): the output
has the positive's size W x H; left cells are ``W // 2`` wide, right cells ``W - W // 2``; top
cells ``H // 2`` high, bottom cells ``H - H // 2``. ``cell_fit="stretch"`` resizes every image to
exactly its cell (as the paper's code does); ``"letterbox"`` keeps the aspect ratio, centres the
image in its cell and pads with 0 (the positive's mask is letterboxed identically). The positive's
mask goes into its cell with NEAREST; the negatives' cells are all 0 (they are negatives).

Determinism: every random draw of sample ``index`` at epoch ``e`` comes from
``numpy.random.default_rng([seed, e, index])`` and nothing else, so a sample does not depend on
the number of DataLoader workers, on the order of access, or on what was read before.

Epochs and DataLoader workers: :meth:`NemoDataset.set_epoch` writes the epoch into a one-element
tensor in shared memory. Non-persistent workers get a fresh copy of the dataset every epoch, and
persistent workers (fork or spawn) read the shared tensor, so calling ``set_epoch(e)`` before
iterating the loader for epoch ``e`` is enough in both cases (don't call it mid-epoch). An
alternative that needs no shared state is a sampler-driven epoch: index the dataset with
``(epoch, index)`` tuples, e.g. from a sampler that yields them; the tuple's epoch wins.
"""

from __future__ import annotations

import io
import math
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.io import MANIFEST, SCHEMA_VERSION_KEY, SUCCESS, read_json, table_files

__all__ = ["SCHEMA_VERSIONS", "NemoDataset", "collate_fn"]

SCHEMA_VERSIONS = {"1", "2"}
"""Shards schema versions this reader understands (manifest and every Parquet file)."""

TRAIN_SPLIT = "train"
IMAGES_TABLE = "images"
CELL_FITS = ("stretch", "letterbox")
MOSAIC_NEGATIVES = 3

# Only the columns a sample needs are decoded; the others (category_id, ann_ids, k_shortfall,
# positional_words, hn_scores) stay on disk.
ROW_COLUMNS = (
    "sent_id", "ref_id", "image_id", "split", "sent", "no_target", "mask_rle",
    "neg_image_ids", "allowed_quadrants", "hn_texts", "hn_kinds",
)
IMAGE_COLUMNS = ("image_id", "file_name")
THUMBNAILS_TABLE = "thumbnails"
THUMBNAIL_PACKS = "thumbnail_packs"
THUMBNAIL_COLUMNS = ("image_id", "pack", "offset", "length", "src_width", "src_height")

Transform = Callable[[Any, Any], tuple[Any, Any]]


class _ProcessLocal:
    """Open Parquet files and the row-group LRU cache of ONE process.

    Never pickled and rebuilt when the pid changes: a forked worker must not share the parent's
    file objects, and a spawned worker must not receive (unpicklable) handles.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.files: dict[int, pq.ParquetFile] = {}
        self.groups: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self.packs: dict[int, int] = {}  # thumbnail pack index -> open file descriptor

    def __del__(self) -> None:
        if self.pid == os.getpid():
            for fd in self.packs.values():
                os.close(fd)


def _version_help(found: object, where: str) -> str:
    known = ", ".join(repr(v) for v in sorted(SCHEMA_VERSIONS))
    return (
        f"{where}: shards schema version {found!r} is not supported by this reader "
        f"(pipeline.dataset knows {known}). Re-export the shards with this nemo-pipe "
        "(`nemo-pipe run --stage shards`), or upgrade nemo-pipe to a version whose reader "
        f"knows schema version {found!r}."
    )


def _parquet_version(pf: pq.ParquetFile) -> str | None:
    value = (pf.schema_arrow.metadata or {}).get(SCHEMA_VERSION_KEY)
    return value.decode() if value is not None else None


def cell_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, cell_w, cell_h)`` of quadrants 0..3 of a ``width`` x ``height`` mosaic.

    Odd sizes give the extra pixel to the right column / bottom row, so the four cells tile the
    output exactly and the output keeps the positive image's size.
    """
    lw, th = width // 2, height // 2
    rw, bh = width - lw, height - th
    return [(0, 0, lw, th), (lw, 0, rw, th), (0, th, lw, bh), (lw, th, rw, bh)]


def fit_box(w: int, h: int, cell_w: int, cell_h: int, cell_fit: str) -> tuple[int, int, int, int]:
    """``(new_w, new_h, off_x, off_y)`` of a ``w`` x ``h`` image inside a cell.

    "stretch" fills the cell; "letterbox" scales by ``min(cell_w / w, cell_h / h)``, rounds half
    up, and centres (the odd pixel of padding goes right / bottom).
    """
    if cell_fit == "stretch":
        return cell_w, cell_h, 0, 0
    scale = min(cell_w / w, cell_h / h)
    new_w = min(cell_w, max(1, math.floor(w * scale + 0.5)))
    new_h = min(cell_h, max(1, math.floor(h * scale + 0.5)))
    return new_w, new_h, (cell_w - new_w) // 2, (cell_h - new_h) // 2


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """The uint8 {0, 1} H x W (C-contiguous) mask of a compressed COCO RLE row."""
    counts = rle["counts"]
    obj = {"size": [int(v) for v in rle["size"]],
           "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return np.ascontiguousarray(mask_utils.decode(obj), dtype=np.uint8)


class NemoDataset(torch.utils.data.Dataset):
    """One split of a ``shards`` artifact as a map-style dataset (one item per sentence).

    Args:
        shards_dir: the ``shards`` artifact directory (``nemo-pipe path --stage shards``).
        split: ``train``, ``val``, ``test``, ``testA``, ``testB`` (whatever the artifact has).
        images_dir: directory the ``file_name`` column is relative to.
        gamma: NeMo augmentation ratio: probability that a train sample becomes a mosaic (the
            paper's best is 0.5-0.6). Eval splits never augment.
        n_hard_negatives: hard-negative texts returned per sample (0: none), for C3*-style
            losses; taken best first from the row's ranked ``hn_texts``. Train split only.
        positional_constraint: put the positive only in the row's ``allowed_quadrants`` (so
            "the man on the left" stays on the left of the mosaic).
        curriculum_start_epoch: epochs before it train without any augmentation (no mosaic, no
            hard negatives), as the hard-negative curriculum prescribes.
        seed: with the epoch and the index, the only source of randomness.
        transform: ``transform(image, mask) -> (image, mask)``, applied last.
        cell_fit: "stretch" (default, the paper's code) or "letterbox".
        thumbnails: fill mosaic cells from the artifact's thumbnails (several times cheaper
            than decoding the originals); None (default) uses them when the artifact has them,
            True requires them, False always decodes the originals (at reduced size).
    """

    #: Row groups (256 rows each in a real artifact) cached per process; random access over a
    #: shuffled split mostly misses, so a small cache only serves neighbouring indices.
    row_group_cache_size: int = 8

    def __init__(
        self,
        shards_dir: str | os.PathLike[str],
        split: str,
        images_dir: str | os.PathLike[str],
        gamma: float = 0.6,
        n_hard_negatives: int = 0,
        positional_constraint: bool = False,
        curriculum_start_epoch: int = 0,
        seed: int = 0,
        transform: Transform | None = None,
        cell_fit: str = "stretch",
        thumbnails: bool | None = None,
    ) -> None:
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if int(n_hard_negatives) < 0:
            raise ValueError(f"n_hard_negatives must be >= 0, got {n_hard_negatives!r}")
        if int(curriculum_start_epoch) < 0:
            raise ValueError(f"curriculum_start_epoch must be >= 0, got {curriculum_start_epoch!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed!r}")
        if cell_fit not in CELL_FITS:
            raise ValueError(f"cell_fit must be one of {CELL_FITS}, got {cell_fit!r}")
        if transform is not None and not callable(transform):
            raise TypeError("transform must be callable as transform(image, mask)")

        self.shards_dir = Path(shards_dir)
        self.split = str(split)
        self.images_dir = Path(images_dir)
        self.gamma = float(gamma)
        self.n_hard_negatives = int(n_hard_negatives)
        self.positional_constraint = bool(positional_constraint)
        self.curriculum_start_epoch = int(curriculum_start_epoch)
        self.seed = int(seed)
        self.transform = transform
        self.cell_fit = cell_fit

        self._check_artifact()
        split_files = self._split_files()
        self._files = [str(p) for p in split_files]
        self._index_row_groups(split_files)
        self._images = self._load_images()
        self._thumbs = self._load_thumbnail_index(thumbnails)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"images directory {self.images_dir} does not exist (the `file_name` column of "
                f"{self.shards_dir / IMAGES_TABLE} is relative to it; pass the --images dir used "
                "for the pipeline run)")
        # Shared memory, so set_epoch reaches persistent DataLoader workers too (see module doc).
        self._epoch_cell = torch.zeros((), dtype=torch.int64).share_memory_()
        self._local: _ProcessLocal | None = None

    # ----------------------------------------------------------------------------- validation
    def _check_artifact(self) -> None:
        d = self.shards_dir
        if not d.is_dir():
            raise FileNotFoundError(
                f"shards directory {d} does not exist; build it with `nemo-pipe run --stage "
                "shards` and pass the directory `nemo-pipe path --stage shards` prints")
        if not (d / SUCCESS).is_file():
            raise FileNotFoundError(
                f"{d} has no {SUCCESS} marker: the shards stage did not finish (or this is not an "
                "artifact directory); re-run `nemo-pipe run --stage shards`")
        if not (d / MANIFEST).is_file():
            raise FileNotFoundError(f"{d} has no {MANIFEST}; re-run `nemo-pipe run --stage shards`")
        try:
            manifest = read_json(d / MANIFEST)
        except ValueError:
            raise ValueError(f"{d / MANIFEST} is not valid JSON: the artifact is damaged; "
                             "rebuild it with `nemo-pipe run --stage shards`") from None
        stage = manifest.get("stage") if isinstance(manifest, dict) else None
        if stage != "shards":
            raise ValueError(
                f"{d} is a {stage!r} artifact, not a 'shards' one; pass the directory printed by "
                "`nemo-pipe path --stage shards`")
        version = manifest.get("schema_version")
        if not isinstance(version, str) or version not in SCHEMA_VERSIONS:
            raise ValueError(_version_help(version, str(d / MANIFEST)))
        from pipeline.verify import quick_check

        problems = quick_check(d, identity=False)  # marked corrupt, missing/extra/cut files
        if problems:
            raise ValueError(
                f"{problems[0]}: the shards artifact is damaged and must not be trained on; "
                "rebuild it with `nemo-pipe run --stage shards` (`nemo-pipe verify` lists every "
                "problem)")

    def available_splits(self) -> list[str]:
        """Split directories of the artifact that hold at least one part file."""
        return sorted(p.name for p in self.shards_dir.iterdir()
                      if p.is_dir() and p.name != IMAGES_TABLE and table_files(p))

    def _split_files(self) -> list[Path]:
        files = table_files(self.shards_dir / self.split) if self.split != IMAGES_TABLE else []
        if not files:
            raise ValueError(
                f"split {self.split!r} is not in {self.shards_dir} (no {self.split}/part-*.parquet)"
                f"; splits present: {', '.join(self.available_splits()) or 'none'}")
        return files

    @staticmethod
    def _open_checked(path: Path, columns: Sequence[str]) -> pq.ParquetFile:
        pf = pq.ParquetFile(path)
        version = _parquet_version(pf)
        if version not in SCHEMA_VERSIONS:
            raise ValueError(_version_help(version, str(path)))
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {missing} of shards schema version {version!r}: the "
                "artifact is damaged; re-run `nemo-pipe run --stage shards --force`")
        return pf

    def _index_row_groups(self, files: list[Path]) -> None:
        """Row count of every non-empty row group, as flat arrays searched per ``__getitem__``."""
        starts, file_ix, group_ix = [], [], []
        total = 0
        for f, path in enumerate(files):
            pf = self._open_checked(path, ROW_COLUMNS)
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    starts.append(total)
                    file_ix.append(f)
                    group_ix.append(g)
                    total += n
            pf.close()
        self._starts = np.asarray(starts, dtype=np.int64)
        self._group_file = np.asarray(file_ix, dtype=np.int32)
        self._group_index = np.asarray(group_ix, dtype=np.int32)
        self._len = total

    def _load_images(self) -> dict[int, str]:
        files = table_files(self.shards_dir / IMAGES_TABLE)
        if not files:
            raise FileNotFoundError(
                f"{self.shards_dir / IMAGES_TABLE} has no part files; the artifact is damaged: "
                "re-run `nemo-pipe run --stage shards --force`")
        images: dict[int, str] = {}
        for path in files:
            pf = self._open_checked(path, IMAGE_COLUMNS)
            t = pf.read(columns=list(IMAGE_COLUMNS))
            pf.close()
            images.update(zip(t.column("image_id").to_pylist(),
                              t.column("file_name").to_pylist(), strict=True))
        return images

    def _load_thumbnail_index(self, wanted: bool | None) -> dict[str, Any] | None:
        """Sorted image ids and where each thumbnail is; None when not used."""
        table_dir = self.shards_dir / THUMBNAILS_TABLE
        files = table_files(table_dir) if table_dir.is_dir() else []
        if wanted is False or (wanted is None and not files):
            return None
        if not files:
            raise FileNotFoundError(
                f"thumbnails=True but {table_dir} has no part files: build the shards with "
                "`--set shards.thumbnails=true`, or pass thumbnails=None / False")
        parts = []
        for path in files:
            pf = self._open_checked(path, THUMBNAIL_COLUMNS)
            parts.append(pf.read(columns=list(THUMBNAIL_COLUMNS)))
            pf.close()
        cols = {c: [v for t in parts for v in t.column(c).to_pylist()] for c in THUMBNAIL_COLUMNS}
        packs = sorted(set(cols["pack"]))
        pack_dir = self.shards_dir / THUMBNAIL_PACKS
        missing = [p for p in packs if not (pack_dir / p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{pack_dir} lacks pack file(s) {missing}: the artifact is damaged; re-run "
                "`nemo-pipe run --stage shards --force`")
        ids = np.asarray(cols["image_id"], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        pack_of = {p: i for i, p in enumerate(packs)}
        return {
            "paths": [str(pack_dir / p) for p in packs],
            "ids": ids[order],
            "pack": np.asarray([pack_of[p] for p in cols["pack"]], np.int32)[order],
            "offset": np.asarray(cols["offset"], np.int64)[order],
            "length": np.asarray(cols["length"], np.int64)[order],
            "size": np.stack([np.asarray(cols["src_width"], np.int64),
                              np.asarray(cols["src_height"], np.int64)], 1)[order],
        }

    @property
    def uses_thumbnails(self) -> bool:
        return self._thumbs is not None

    def _thumbnail(self, image_id: int) -> tuple[bytes, tuple[int, int]] | None:
        """(JPEG bytes, original size) of an image's thumbnail, or None if it has none."""
        t = self._thumbs
        if t is None:
            return None
        i = int(np.searchsorted(t["ids"], image_id))
        if i == len(t["ids"]) or t["ids"][i] != image_id:
            return None
        local = self._process_local()
        pack = int(t["pack"][i])
        fd = local.packs.get(pack)
        if fd is None:
            fd = local.packs[pack] = os.open(t["paths"][pack], os.O_RDONLY)
        data = os.pread(fd, int(t["length"][i]), int(t["offset"][i]))
        return data, (int(t["size"][i, 0]), int(t["size"][i, 1]))

    # --------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        # Open files and cached row groups stay in the process that made them.
        state = self.__dict__.copy()
        state["_local"] = None
        return state

    def _process_local(self) -> _ProcessLocal:
        local = self._local
        if local is None or local.pid != os.getpid():
            local = self._local = _ProcessLocal()
        return local

    # ------------------------------------------------------------------------------ epoch API
    @property
    def epoch(self) -> int:
        return int(self._epoch_cell.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random draws and the curriculum stage; call before each epoch."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch_cell.fill_(epoch)

    def augmenting(self, epoch: int | None = None) -> bool:
        """Whether samples of ``epoch`` may be augmented (train split, curriculum reached)."""
        epoch = self.epoch if epoch is None else epoch
        return self.split == TRAIN_SPLIT and epoch >= self.curriculum_start_epoch

    # ---------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (f"NemoDataset({str(self.shards_dir)!r}, split={self.split!r}, len={self._len}, "
                f"gamma={self.gamma}, n_hard_negatives={self.n_hard_negatives}, "
                f"positional_constraint={self.positional_constraint}, "
                f"curriculum_start_epoch={self.curriculum_start_epoch}, seed={self.seed}, "
                f"cell_fit={self.cell_fit!r}, epoch={self.epoch})")

    def image_path(self, image_id: int) -> Path:
        try:
            return self.images_dir / self._images[int(image_id)]
        except KeyError:
            raise KeyError(
                f"image_id {image_id} is referenced by {self.shards_dir / self.split} but missing "
                f"from {self.shards_dir / IMAGES_TABLE}; the artifact is inconsistent: re-run "
                "`nemo-pipe run --stage shards --force`") from None

    def row(self, index: int) -> dict[str, Any]:
        """The Parquet row of sample ``index`` (needed columns only), via the row-group cache."""
        index = self._normalize_index(index)
        g = int(np.searchsorted(self._starts, index, side="right")) - 1
        key = (int(self._group_file[g]), int(self._group_index[g]))
        local = self._process_local()
        table = local.groups.get(key)
        if table is None:
            pf = local.files.get(key[0])
            if pf is None:
                pf = local.files[key[0]] = pq.ParquetFile(self._files[key[0]])
            table = pf.read_row_group(key[1], columns=list(ROW_COLUMNS))
            local.groups[key] = table
            while len(local.groups) > max(1, self.row_group_cache_size):
                local.groups.popitem(last=False)
        else:
            local.groups.move_to_end(key)
        return table.slice(index - int(self._starts[g]), 1).to_pylist()[0]

    def _normalize_index(self, index: int) -> int:
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for {self._len} samples")
        return i

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(index, tuple):  # sampler-driven epoch: (epoch, index)
            epoch, index = (operator.index(v) for v in index)
            if epoch < 0:
                raise ValueError(f"epoch must be >= 0, got {epoch}")
        else:
            epoch = self.epoch
        index = self._normalize_index(index)
        row = self.row(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        augment = self.augmenting(epoch)
        # Drawn for every sample (not only eligible ones) so that, for a fixed (seed, epoch,
        # index), raising gamma only ever turns single images into mosaics.
        u = float(rng.random())

        image_id = int(row["image_id"])
        plan = None
        if augment and u < self.gamma:
            plan = self._plan_mosaic(row, rng)

        mask = decode_rle(row["mask_rle"])
        height, width = mask.shape
        if plan is not None and min(width, height) < 2:
            plan = None  # a 1-pixel-wide or -high positive has an empty cell: keep it single
        # in a mosaic the positive is shown in one cell: decode it at reduced size too
        fit = None if plan is None else self._cell_fit(cell_boxes(width, height)[plan[0]])
        positive, size = self._load_rgb(image_id, fit)
        if size != (width, height):
            raise ValueError(
                f"sent_id {row['sent_id']}: mask is {width}x{height} but image "
                f"{self.image_path(image_id)} is {size[0]}x{size[1]}; the "
                "shards and the images dir do not match")

        if plan is None:
            image, quadrant, sources = positive, None, [image_id]
        else:
            quadrant, sources = plan
            image, mask = self._compose(positive, mask, quadrant, sources)

        if augment and self.n_hard_negatives:
            hard = list(row["hn_texts"] or [])[: self.n_hard_negatives]
            kinds = list(row["hn_kinds"] or [])[: len(hard)]
        else:
            hard, kinds = [], []

        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {
            "image": image,
            "mask": mask,
            "sentence": row["sent"],
            "hard_negatives": hard,
            "hard_negative_kinds": kinds,
            "meta": {
                "sent_id": int(row["sent_id"]),
                "ref_id": int(row["ref_id"]),
                "image_id": image_id,
                "split": row["split"],
                "index": index,
                "epoch": epoch,
                "is_mosaic": plan is not None,
                "quadrant": quadrant,
                "source_image_ids": sources,
                "no_target": bool(row["no_target"]),
            },
        }

    # ---------------------------------------------------------------------------------- mosaic
    def _plan_mosaic(self, row: dict[str, Any], rng: np.random.Generator
                     ) -> tuple[int, list[int]] | None:
        """``(quadrant, image ids in quadrant order)``, or None when the row cannot mosaic.

        Candidates keep their rank order; the positive's own image and repeats are dropped
        defensively so a malformed row can never show the positive twice or a negative twice.
        """
        image_id = int(row["image_id"])
        seen = {image_id}
        candidates = []
        for c in row["neg_image_ids"] or []:
            c = int(c)
            if c not in seen:
                seen.add(c)
                candidates.append(c)
        if len(candidates) < MOSAIC_NEGATIVES:
            return None
        quadrants = list(range(4))
        if self.positional_constraint:
            allowed = sorted({int(q) for q in row["allowed_quadrants"] or []} & set(quadrants))
            quadrants = allowed or quadrants  # empty: unconstrained (stages.text.positional)
        # choice without replacement returns the picks in uniformly random order, which is the
        # random placement of the negatives into the remaining quadrants.
        picks = rng.choice(len(candidates), size=MOSAIC_NEGATIVES, replace=False)
        quadrant = quadrants[int(rng.integers(len(quadrants)))]
        negatives = iter(candidates[int(i)] for i in picks)
        sources = [image_id if q == quadrant else next(negatives) for q in range(4)]
        return quadrant, sources

    def _load_rgb(self, image_id: int,
                  fit: Callable[[tuple[int, int]], tuple[int, int]] | None = None
                  ) -> tuple[Image.Image, tuple[int, int]]:
        """Decode an image as RGB; return it and its full (header) size.

        With ``fit`` (header size -> target size) the image is shown in a mosaic cell: it comes
        from its thumbnail when the artifact has one, and libjpeg downscales by 1/2, 1/4 or 1/8
        while decoding (``Image.draft``), never below the target. A positive shown alone is
        decoded at full size.
        """
        thumb = self._thumbnail(image_id) if fit is not None else None
        if thumb is not None:
            data, size = thumb  # the original's size: the fit is computed from it
            return _decode_rgb(io.BytesIO(data), fit(size)), size
        path = self.image_path(image_id)
        try:
            with open(path, "rb") as f:
                im = Image.open(f)
                size = im.size
                return _decode_rgb(im, fit(size) if fit is not None else None), size
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {path} (image_id {image_id}) not found; is images_dir right?") from None

    def _compose(self, positive: Image.Image, mask: np.ndarray, quadrant: int,
                 sources: list[int]) -> tuple[Image.Image, np.ndarray]:
        """The 2x2 mosaic image and its mask (positive's mask in its cell, zeros elsewhere)."""
        height, width = mask.shape
        canvas = Image.new("RGB", (width, height))
        out_mask = np.zeros((height, width), dtype=np.uint8)
        bilinear, nearest = Image.Resampling.BILINEAR, Image.Resampling.NEAREST
        for q, box in enumerate(cell_boxes(width, height)):
            x0, y0, cw, ch = box
            if q == quadrant:
                nw, nh, ox, oy = fit_box(width, height, cw, ch, self.cell_fit)
                canvas.paste(_resized(positive, (nw, nh), bilinear), (x0 + ox, y0 + oy))
                cell = Image.fromarray(mask).resize((nw, nh), nearest)
                out_mask[y0 + oy:y0 + oy + nh, x0 + ox:x0 + ox + nw] = np.asarray(cell)
                continue
            neg, size = self._load_rgb(sources[q], self._cell_fit(box))
            nw, nh, ox, oy = fit_box(size[0], size[1], cw, ch, self.cell_fit)
            canvas.paste(_resized(neg, (nw, nh), bilinear), (x0 + ox, y0 + oy))
        return canvas, out_mask

    def _cell_fit(self, box: tuple[int, int, int, int]
                  ) -> Callable[[tuple[int, int]], tuple[int, int]]:
        """Image (header) size -> the size it takes in cell `box`: the draft target."""
        cw, ch = box[2:]
        return lambda size: fit_box(size[0], size[1], cw, ch, self.cell_fit)[:2]


def _decode_rgb(source: Image.Image | io.BytesIO, draft: tuple[int, int] | None) -> Image.Image:
    """Decode an opened image (or JPEG bytes) as RGB, at reduced size when `draft` is given."""
    im = source if isinstance(source, Image.Image) else Image.open(source)
    if draft is not None:
        im.draft("RGB", draft)
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


def _resized(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """`image` at `size`; a draft decode often lands exactly on the cell, then nothing to do."""
    return image if image.size == size else image.resize(size, resample)


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples for a training step.

    Images / masks are stacked when they are tensors of one shape (after a `transform`), and
    kept as lists otherwise (PIL images, arrays, ragged sizes). Hard negatives are padded with
    "" to N = the largest count in the batch, with ``hard_negative_mask`` (bool, B x N) marking
    real entries, so a C3*-style loss can score N negatives per image and mask the padding.
    """
    if not batch:
        raise ValueError("collate_fn got an empty batch")

    def stack(values: list[Any]) -> Any:
        if all(isinstance(v, torch.Tensor) for v in values) and len(
                {tuple(v.shape) for v in values}) == 1:
            return torch.stack(values)
        return values

    n = max(len(s["hard_negatives"]) for s in batch)
    valid = torch.zeros((len(batch), n), dtype=torch.bool)
    texts, kinds = [], []
    for i, s in enumerate(batch):
        hard = list(s["hard_negatives"])
        kind = list(s.get("hard_negative_kinds", []))[: len(hard)]
        valid[i, : len(hard)] = True
        texts.append(hard + [""] * (n - len(hard)))
        kinds.append(kind + [""] * (n - len(kind)))
    return {
        "image": stack([s["image"] for s in batch]),
        "mask": stack([s["mask"] for s in batch]),
        "sentence": [s["sentence"] for s in batch],
        "hard_negatives": texts,
        "hard_negative_kinds": kinds,
        "hard_negative_mask": valid,
        "meta": [s["meta"] for s in batch],
    }
