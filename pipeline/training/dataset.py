"""Training-side reader of a ``shards`` artifact: a thin PyTorch ``Dataset`` with NeMo mosaics.

The ``shards`` stage writes everything a training loop needs per sentence (mask RLE, ranked mosaic
negative candidates, allowed quadrants, ranked hard-negative texts) so that this reader does no
retrieval at all: it only decodes a few JPEGs and one RLE per sample. It is kept *thin* on
purpose: importing it pulls in torch, numpy, pyarrow, pillow and pycocotools only (plus the
stdlib-only :mod:`pipeline.io`), never open_clip / faiss / transformers / dask / polars / typer,
so a training environment does not need the preprocessing stack.

Layout read: see :mod:`pipeline.training.schema` (shards schema "1" to "4"; "4" adds the hard
negatives' source ids and the multi-view expressions, which older files lack and read as empty;
the thumbnails, small JPEG copies of the training images from which mosaic cells are
filled, are their own artifact since "3", found through the shards manifest). What is checked
before anything is read: :mod:`pipeline.training.artifact`.

Sample dict (``NemoDataset[i]``)::

    image               PIL.Image (RGB, W x H of the positive image), or what `transform` returns
    mask                np.uint8 H x W in {0, 1} (union of the targets; zeros for no-target)
    sentence            str: the row's sentence, or with `expressions` one of its referent's
                        multi-view expressions (train split)
    hard_negatives      list[str]: `n_hard_negatives` drawn from the row's pool (train split,
                        from `hard_negatives_start_epoch` on), in pool (rank) order
    hard_negative_kinds list[str]: their provenance kinds, aligned with hard_negatives
    hard_negative_sources list[int]: their source sentence ids, aligned (-1: none recorded)
    meta                {sent_id, ref_id, image_id, split, index, epoch, is_mosaic, quadrant,
                         source_image_ids, no_target, mosaic_kind, grid, cells, fallback,
                         fallback_cells, expression, expression_fallback}

A mosaic's ``quadrant`` is the positive's cell (row-major, 0..3 on 2x2, 0..8 on 3x3),
``source_image_ids`` the image of each cell, ``cells`` their ``[x0, y0, w, h]`` boxes (None when
single), ``mosaic_kind`` one / random / retrieval, ``grid`` 1 (single), 2 or 3, ``fallback`` what
decided a sample short of candidates (None, "single", "replace" or "pool") and
``fallback_cells`` how many cells it filled; ``expression`` is "original" or the view name of
the sentence shown, ``expression_fallback`` True when views were asked but the row has none.

Which mosaic, which images, which cell: :mod:`pipeline.training.sampling` (it also documents each
option against the official NeMo loader); geometry: :mod:`pipeline.training.mosaic`. Determinism:
every random draw of sample
``index`` at epoch ``e`` comes from ``numpy.random.default_rng([seed, e, index])`` (the mosaic)
or ``default_rng([seed, e, index, stream])`` (the sentence, the hard negatives) and nothing
else (:mod:`pipeline.training.sampling`), so a sample does not depend on the number of DataLoader
workers, on the order of access, or on what was read before.

Epochs and DataLoader workers: :meth:`NemoDataset.set_epoch` writes the epoch into a one-element
tensor in shared memory. Non-persistent workers get a fresh copy of the dataset every epoch, and
persistent workers (fork or spawn) read the shared tensor, so calling ``set_epoch(e)`` before
iterating the loader for epoch ``e`` is enough in both cases (don't call it mid-epoch). An
alternative that needs no shared state is a sampler-driven epoch: index the dataset with
``(epoch, index)`` tuples, e.g. from a sampler that yields them; the tuple's epoch wins.
"""

from __future__ import annotations

import io
import operator
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.training.artifact import RowGroups, ShardsArtifact
from pipeline.training.mosaic import CELL_FITS, CELL_GEOMETRIES, SizeFit, cell_fit_of, compose_cells
from pipeline.training.mosaic_candidates import EXCLUDED, FROM_POOL
from pipeline.training.sampling import (
    EXPRESSIONS,
    HARD_NEGATIVE_STREAM,
    ITEMS,
    REF_SENTENCE_STREAM,
    SENTENCE_STREAM,
    SamplerOptions,
    curriculum_starts,
    draw_expression,
    draw_hard_negatives,
    draw_layout,
    draw_mosaic_u,
    expression_quadrants,
    plan_sample,
    sample_rng,
    single,
    stream_rng,
)
from pipeline.training.schema import (
    COLUMN_EMPTY,
    IMAGES_TABLE,
    NO_SOURCE_ID,
    ORIGINAL_EXPRESSION,
    SHARDS_SCHEMA_VERSIONS,
    TRAIN_SPLIT,
    WITH_VIEWS_FIELD,
)

__all__ = ["SCHEMA_VERSIONS", "NemoDataset", "collate_fn", "decode_rle"]

SCHEMA_VERSIONS = SHARDS_SCHEMA_VERSIONS
"""Shards schema versions this reader understands (manifest and every Parquet file)."""

# Only the columns a sample needs are decoded; the others (category_id, ann_ids, k_shortfall,
# positional_words, hn_scores) stay on disk, and so do the views unless `expressions` asks.
READ_COLUMNS = (
    "sent_id", "ref_id", "image_id", "split", "sent", "no_target", "mask_rle",
    "neg_image_ids", "allowed_quadrants", "hn_texts", "hn_kinds", "hn_source_ids", FROM_POOL,
    EXCLUDED, "raw",
)
VIEW_COLUMNS = ("view_names", "view_texts", "view_allowed_quadrants")

Transform = Callable[[Any, Any], tuple[Any, Any]]
TARGET_TOO_SMALL = "target_too_small"
"""`meta["fallback"]` of a mosaic shown single because its target fell through its cell."""


class _ProcessLocal:
    """Open Parquet files, the row-group LRU cache and open thumbnail packs of ONE process.

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
            losses; drawn afresh per (seed, epoch, index) without replacement from the row's
            pool (``hn_texts``: up to ``shards.hard_negative_pool`` ranked negatives), returned
            in rank order with their kinds and source ids; a pool of N or fewer is returned
            whole. Train split only.
        positional_constraint: put the positive only in the row's ``allowed_quadrants`` (so
            "the man on the left" stays on the left of the mosaic; on 3x3 left is column 0,
            right column 2, top row 0, bottom row 2).
        curriculum_start_epoch: shorthand that sets both starts below (a start given as well
            must equal it).
        seed: with the epoch and the index, the only source of randomness.
        transform: ``transform(image, mask) -> (image, mask)``, applied last.
        cell_fit: "stretch" (default, the paper's code) or "letterbox".
        thumbnails: fill mosaic cells from the thumbnails the shards were built with (several
            times cheaper than decoding the originals); None (default) uses them when the
            shards have them, True requires them, False always decodes the originals (at
            reduced size).
        thumbnails_dir: where the thumbnails artifact is, when it is not at the place the shards'
            manifest records (``../../thumbnails/<key>`` from the shards dir, as in the work
            dir); it must still be that very artifact (same key and files).
        mosaic_start_epoch: epochs before it show no mosaic (unless `random_before_start`).
        hard_negatives_start_epoch: epochs before it return no hard negatives.
        mosaic: "retrieval" (default: the row's tau-filtered candidates), "random" (uniform from
            the training pool) or "mixed" (per sample one of single / random / retrieval with
            1 - (random_prob + retrieval_prob), random_prob, retrieval_prob).
        random_prob, retrieval_prob: the probabilities of mosaic="mixed" (required there, refused
            elsewhere: gamma is the mosaic probability of the two other modes).
        random_before_start: before `mosaic_start_epoch`, random mosaics with probability gamma
            (the official loader's `aug_prob` before its `retrieval_epoch`).
        grid: 2 (3 negatives), 3 (8 negatives) or "mixed" (2 or 3 with one half each, the
            official `mix_grid`).
        cell_geometry: "positive" (the mosaic has the positive's size) or "square" (an
            `input_size` square, every cell about input_size / grid, as the official loader).
        input_size: the square side of cell_geometry="square" (default 416).
        cross_point: "center" (default), "shifted" (cuts moved by up to half a cell, the
            official `move_crs_pnt`) or "random" (cuts anywhere, the official `rand_crs`).
        fallback: when fewer candidates survive tau than the grid needs: "single" (default),
            "replace" (repeat survivors) or "pool" (fill from the training pool, ignoring tau).
        replace: draw a mosaic's retrieval negatives with replacement (the official loader does
            when its top_k >= 20); default False: distinct negatives.
        expressions: the sentence of a train sample: "original" (default, the row's own),
            "views" (one of its referent's multi-view expressions, uniformly) or "both"
            (uniformly among the row's own and the views); drawn per (seed, epoch, index),
            from every epoch on (no curriculum), and named in ``meta["expression"]``. Needs
            shards built with ``shards.with_views=true``. A row without views shows its own
            sentence with ``meta["expression_fallback"]`` True; ``rows_without_views`` counts
            them. Evaluation splits always show the original.
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
        curriculum_start_epoch: int | None = None,
        seed: int = 0,
        transform: Transform | None = None,
        cell_fit: str = "stretch",
        thumbnails: bool | None = None,
        thumbnails_dir: str | os.PathLike[str] | None = None,
        *,
        mosaic_start_epoch: int | None = None,
        hard_negatives_start_epoch: int | None = None,
        mosaic: str = "retrieval",
        random_prob: float | None = None,
        retrieval_prob: float | None = None,
        random_before_start: bool = False,
        grid: int | str = 2,
        cell_geometry: str = "positive",
        input_size: int = 416,
        cross_point: str = "center",
        fallback: str = "single",
        replace: bool = False,
        expressions: str = ORIGINAL_EXPRESSION,
        items: str = "sentence",
    ) -> None:
        if int(n_hard_negatives) < 0:
            raise ValueError(f"n_hard_negatives must be >= 0, got {n_hard_negatives!r}")
        mosaic_start, hn_start = curriculum_starts(curriculum_start_epoch, mosaic_start_epoch,
                                                   hard_negatives_start_epoch)
        self._sampler = SamplerOptions(
            gamma=float(gamma), mosaic=mosaic, random_prob=random_prob,
            retrieval_prob=retrieval_prob, random_before_start=bool(random_before_start),
            mosaic_start_epoch=mosaic_start, grid=grid, cross_point=cross_point,
            fallback=fallback, replace=bool(replace),
            positional_constraint=bool(positional_constraint))
        if cell_geometry not in CELL_GEOMETRIES:
            raise ValueError(f"cell_geometry must be one of {CELL_GEOMETRIES}, got "
                             f"{cell_geometry!r}")
        if type(input_size) is not int or input_size < 8:
            raise ValueError(f"input_size must be an integer >= 8, got {input_size!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed!r}")
        if cell_fit not in CELL_FITS:
            raise ValueError(f"cell_fit must be one of {CELL_FITS}, got {cell_fit!r}")
        if transform is not None and not callable(transform):
            raise TypeError("transform must be callable as transform(image, mask)")
        if expressions not in EXPRESSIONS:
            raise ValueError(f"expressions must be one of {EXPRESSIONS}, got {expressions!r}")
        if items not in ITEMS:
            raise ValueError(f"items must be one of {ITEMS}, got {items!r}")

        self.shards_dir = Path(shards_dir)
        self.split = str(split)
        self.images_dir = Path(images_dir)
        self.gamma = float(gamma)
        self.n_hard_negatives = int(n_hard_negatives)
        self.positional_constraint = bool(positional_constraint)
        self.mosaic_start_epoch = mosaic_start
        self.hard_negatives_start_epoch = hn_start
        self.seed = int(seed)
        self.transform = transform
        self.cell_fit = cell_fit
        self.cell_geometry = cell_geometry
        self.input_size = input_size
        self.expressions = expressions
        self.items = items

        self._artifact = artifact = ShardsArtifact(self.shards_dir)
        split_files = artifact.split_files(self.split)
        self._files = [str(p) for p in split_files]
        views = self.split == TRAIN_SPLIT and expressions != ORIGINAL_EXPRESSION
        self._columns = READ_COLUMNS + (VIEW_COLUMNS if views else ())
        self._groups = RowGroups.of(split_files, self._columns)
        #: items="ref": each referent's rows (ascending sent_id) as offsets into `_ref_rows`
        self._ref_offsets, self._ref_rows = (_rows_by_ref(split_files) if items == "ref"
                                             else (None, None))
        #: Rows of the split without a view, which show their own sentence (None: not asked).
        self.rows_without_views = (_rows_without_views(artifact, split_files, expressions)
                                   if views else None)
        self._images = artifact.images()
        self._thumbs = artifact.thumbnails(thumbnails, thumbnails_dir)
        self._pool = artifact.pool()  # the mosaic pool (schema >= 4) ...
        if self._pool is None and self.split == TRAIN_SPLIT:  # ... or the training rows' images
            self._pool = np.unique(np.concatenate(
                [pq.read_table(f, columns=["image_id"]).column("image_id").to_numpy()
                 for f in self._files]).astype(np.int64))
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"images directory {self.images_dir} does not exist (the `file_name` column of "
                f"{self.shards_dir / IMAGES_TABLE} is relative to it; pass the --images dir used "
                "for the pipeline run)")
        # Shared memory, so set_epoch reaches persistent DataLoader workers too (see module doc).
        self._epoch_cell = torch.zeros((), dtype=torch.int64).share_memory_()
        self._local: _ProcessLocal | None = None

    @property
    def dataset_name(self) -> str | None:
        """The dataset the shards were built from (their manifest's `dataset`)."""
        name = self._artifact.manifest.get("dataset")
        return str(name) if name else None

    @property
    def uses_thumbnails(self) -> bool:
        return self._thumbs is not None

    def available_splits(self) -> list[str]:
        """Split directories of the artifact that hold at least one part file."""
        return self._artifact.available_splits()

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

    @property
    def sampler(self) -> SamplerOptions:
        """The mosaic options (checked), as :mod:`pipeline.training.sampling` reads them."""
        return self._sampler

    @property
    def pool(self) -> np.ndarray | None:
        """The image ids random mosaics draw from (training images; None off the train split
        of an artifact older than schema 4)."""
        return self._pool

    def augmenting(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` reached the mosaic curriculum (train split, `mosaic_start_epoch`)."""
        epoch = self.epoch if epoch is None else epoch
        return self.split == TRAIN_SPLIT and epoch >= self.mosaic_start_epoch

    def hard_negatives_on(self, epoch: int | None = None) -> bool:
        """Whether samples of ``epoch`` get hard negatives (train split, curriculum reached)."""
        epoch = self.epoch if epoch is None else epoch
        return self.split == TRAIN_SPLIT and epoch >= self.hard_negatives_start_epoch

    # ---------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        if self._ref_offsets is not None:
            return len(self._ref_offsets) - 1
        return self._groups.length

    def item_rows(self, index: int) -> list[int]:
        """The row indices item ``index`` may show: itself per sentence, the referent's rows
        (ascending sent_id) with ``items="ref"``."""
        index = self._normalize_index(index)
        if self._ref_offsets is None:
            return [index]
        lo, hi = self._ref_offsets[index], self._ref_offsets[index + 1]
        return [int(r) for r in self._ref_rows[lo:hi]]

    def _row_index(self, index: int, epoch: int) -> int:
        """The row item ``index`` shows at ``epoch``: with ``items="ref"`` a training item draws
        one of its referent's sentences (its own stream), an evaluation item shows the first,
        as CRIS validates (`sents[0]`)."""
        rows = self.item_rows(index)
        if len(rows) == 1 or self.split != TRAIN_SPLIT:
            return rows[0]
        pick = stream_rng(self.seed, epoch, index, REF_SENTENCE_STREAM).integers(len(rows))
        return rows[int(pick)]

    def __repr__(self) -> str:
        return (f"NemoDataset({str(self.shards_dir)!r}, split={self.split!r}, len={len(self)}, "
                f"gamma={self.gamma}, n_hard_negatives={self.n_hard_negatives}, "
                f"positional_constraint={self.positional_constraint}, "
                f"mosaic_start_epoch={self.mosaic_start_epoch}, "
                f"hard_negatives_start_epoch={self.hard_negatives_start_epoch}, "
                f"mosaic={self._sampler.mosaic!r}, grid={self._sampler.grid!r}, "
                f"cell_geometry={self.cell_geometry!r}, seed={self.seed}, "
                f"cell_fit={self.cell_fit!r}, expressions={self.expressions!r}, "
                f"epoch={self.epoch})")

    def image_path(self, image_id: int) -> Path:
        try:
            return self.images_dir / self._images[int(image_id)]
        except KeyError:
            raise KeyError(
                f"image_id {image_id} is referenced by {self.shards_dir / self.split} but missing "
                f"from {self.shards_dir / IMAGES_TABLE}; the artifact is inconsistent: re-run "
                "`nemo-pipe run --stage shards --force`") from None

    def row(self, index: int) -> dict[str, Any]:
        """The Parquet row of sample ``index`` (needed columns only), via the row-group cache;
        with ``items="ref"`` the row of the referent's first sentence."""
        return self._row_at(self.item_rows(index)[0])

    def _row_at(self, index: int) -> dict[str, Any]:
        """Row ``index`` of the split's files (0 <= index < rows)."""
        file, group, offset = self._groups.locate(index)
        key = (file, group)
        local = self._process_local()
        table = local.groups.get(key)
        if table is None:
            pf = local.files.get(file)
            if pf is None:
                pf = local.files[file] = pq.ParquetFile(self._files[file])
            present = set(pf.schema_arrow.names)
            table = pf.read_row_group(group, columns=[c for c in self._columns if c in present])
            local.groups[key] = table
            while len(local.groups) > max(1, self.row_group_cache_size):
                local.groups.popitem(last=False)
        else:
            local.groups.move_to_end(key)
        row = table.slice(offset, 1).to_pylist()[0]
        for c in self._columns:  # columns newer than the file's schema version: empty
            row.setdefault(c, COLUMN_EMPTY.get(c))
        return row

    def _normalize_index(self, index: int) -> int:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        return i

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(index, tuple):  # sampler-driven epoch: (epoch, index)
            epoch, index = (operator.index(v) for v in index)
            if epoch < 0:
                raise ValueError(f"epoch must be >= 0, got {epoch}")
        else:
            epoch = self.epoch
        index = self._normalize_index(index)
        row = self._row_at(self._row_index(index, epoch))
        rng = sample_rng(self.seed, epoch, index)
        u = draw_mosaic_u(rng)
        image_id = int(row["image_id"])
        # the text first (its own stream: no other draw moves), so that the positive's cell
        # follows the positional words of the text shown, a view's or the row's own
        expressions = self.expressions if self.split == TRAIN_SPLIT else ORIGINAL_EXPRESSION
        sentence, expression, fell_back = draw_expression(
            row["sent"], row.get("view_names"), row.get("view_texts"), expressions,
            stream_rng(self.seed, epoch, index, SENTENCE_STREAM))
        quadrants = expression_quadrants(row, expression)
        plan = plan_sample(rng, u, self._sampler, epoch, self.split == TRAIN_SPLIT, row,
                           self._pool, quadrants)

        mask = decode_rle(row["mask_rle"])
        height, width = mask.shape
        canvas = ((width, height) if self.cell_geometry == "positive"
                  else (self.input_size, self.input_size))
        boxes = (draw_layout(rng, plan.grid, canvas, self._sampler.cross_point)
                 if plan.is_mosaic else None)
        if plan.is_mosaic and boxes is None:  # a positive narrower than the grid: a cell
            plan = single(image_id)  # would be empty, so the sample stays single
        # in a mosaic the positive is shown in one cell: decode it at reduced size too
        fit = None if boxes is None else cell_fit_of(boxes[plan.cell], self.cell_fit)
        positive, size = self._load_rgb(image_id, fit)
        if size != (width, height):
            raise ValueError(
                f"sent_id {row['sent_id']}: mask is {width}x{height} but image "
                f"{self.image_path(image_id)} is {size[0]}x{size[1]}; the "
                "shards and the images dir do not match")

        image = positive
        if boxes is not None:
            image, cells_mask = compose_cells(positive, mask, plan.cell, plan.sources, boxes,
                                              canvas, self.cell_fit, self._load_rgb)
            if mask.any() and not cells_mask.any():
                # a cell too thin for the target (shifted or random cuts): a mosaic whose target
                # vanished would say "here is the referent" with an empty mask. Shown single.
                plan, boxes = single(image_id, TARGET_TOO_SMALL), None
                image, _ = self._load_rgb(image_id)
            else:
                mask = cells_mask

        hard, kinds, hard_sources = draw_hard_negatives(
            row["hn_texts"], row["hn_kinds"], row["hn_source_ids"],
            self.n_hard_negatives if self.hard_negatives_on(epoch) else 0,
            stream_rng(self.seed, epoch, index, HARD_NEGATIVE_STREAM))

        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {
            "image": image,
            "mask": mask,
            "sentence": sentence,
            # as written: REFER's `raw` of the row's own sentence (older shards: `sent`), a view
            # as generated; what LAVT and ReLA tokenize
            "raw_sentence": (row.get("raw") or sentence) if expression == ORIGINAL_EXPRESSION
            else sentence,
            "hard_negatives": hard,
            "hard_negative_kinds": kinds,
            "hard_negative_sources": hard_sources,
            "meta": {
                "sent_id": int(row["sent_id"]),
                "ref_id": int(row["ref_id"]),
                "image_id": image_id,
                "split": row["split"],
                "index": index,
                "epoch": epoch,
                "is_mosaic": plan.is_mosaic,
                "quadrant": plan.cell,
                "source_image_ids": plan.sources,
                "no_target": bool(row["no_target"]),
                "mosaic_kind": plan.kind,
                "grid": plan.grid,
                "cells": None if boxes is None else [list(b) for b in boxes],
                "fallback": plan.fallback,
                "fallback_cells": plan.fallback_cells,
                "expression": expression,
                "expression_fallback": fell_back,
                "allowed_quadrants": quadrants,
            },
        }

    # ---------------------------------------------------------------------------------- images
    def _thumbnail(self, image_id: int) -> tuple[bytes, tuple[int, int]] | None:
        """(JPEG bytes, original size) of an image's thumbnail, or None if it has none."""
        found = self._thumbs.find(image_id) if self._thumbs is not None else None
        if found is None:
            return None
        pack, offset, length, size = found
        local = self._process_local()
        fd = local.packs.get(pack)
        if fd is None:
            fd = local.packs[pack] = os.open(self._thumbs.paths[pack], os.O_RDONLY)
        return os.pread(fd, length, offset), size

    def _load_rgb(self, image_id: int, fit: SizeFit | None = None
                  ) -> tuple[Image.Image, tuple[int, int]]:
        """Decode an image as RGB; return it and its full (header) size.

        With ``fit`` (header size -> target size) the image is shown in a mosaic cell: it comes
        from its thumbnail when the artifact has one, and libjpeg downscales by 1/2, 1/4 or 1/8
        while decoding (``Image.draft``), never below the target; a cell larger than the
        thumbnail is decoded from the original. A positive shown alone is decoded at full size.
        """
        thumb = self._thumbnail(image_id) if fit is not None else None
        if thumb is not None:
            data, size = thumb  # the original's size: the fit is computed from it
            assert fit is not None
            target = fit(size)
            small = Image.open(io.BytesIO(data))  # reads the header only
            if small.width >= target[0] and small.height >= target[1]:
                return _decode_rgb(small, target), size
            # a cell larger than the thumbnail (shifted or random cuts, a large input_size):
            # decoded from the original, never an enlarged thumbnail
        path = self.image_path(image_id)
        try:
            with open(path, "rb") as f:
                im = Image.open(f)
                size = im.size
                return _decode_rgb(im, fit(size) if fit is not None else None), size
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {path} (image_id {image_id}) not found; is images_dir right?") from None


def _rows_by_ref(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, rows): the row indices of each referent of the split, ascending sent_id, the
    referents in order of their first row."""
    empty = [np.zeros(0, np.int64)]
    ids = [pq.read_table(f, columns=["ref_id", "sent_id"]) for f in files]
    ref = np.concatenate([t.column("ref_id").to_numpy() for t in ids] or empty)
    sent = np.concatenate([t.column("sent_id").to_numpy() for t in ids] or empty)
    _, first, inverse = np.unique(ref, return_index=True, return_inverse=True)
    order = np.lexsort((sent, first[inverse]))  # by the referent's first row, then sent_id
    grouped = ref[order]
    new_ref = np.ones(len(order), bool)
    new_ref[1:] = grouped[1:] != grouped[:-1]
    return np.r_[np.flatnonzero(new_ref), len(order)].astype(np.int64), order.astype(np.int64)


def _rows_without_views(artifact: ShardsArtifact, files: list[Path], expressions: str) -> int:
    """Rows of `files` whose referent has no view (after checking that the shards were built
    with views at all: otherwise every row would silently fall back to its own sentence)."""
    import pyarrow.compute as pc

    if not artifact.manifest.get(WITH_VIEWS_FIELD):
        raise ValueError(
            f"expressions={expressions!r} needs shards built with multi-view expressions, but "
            f"{artifact.dir} was built without them (shards.with_views is off, or the shards "
            "predate schema 4): rebuild them with `nemo-pipe run --stage shards --set "
            "shards.with_views=true` (it runs the multiview stage), or pass "
            "expressions='original'")
    missing = 0
    for path in files:
        column = pq.read_table(path, columns=["view_texts"]).column("view_texts")
        missing += int(pc.sum(pc.equal(pc.list_value_length(column), 0)).as_py() or 0)
    return missing


def _decode_rgb(source: Image.Image | io.BytesIO, draft: tuple[int, int] | None) -> Image.Image:
    """Decode an opened image (or JPEG bytes) as RGB, at reduced size when `draft` is given."""
    im = source if isinstance(source, Image.Image) else Image.open(source)
    if draft is not None:
        im.draft("RGB", draft)
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples for a training step.

    Images / masks are stacked when they are tensors of one shape (after a `transform`), and
    kept as lists otherwise (PIL images, arrays, ragged sizes). Hard negatives are padded with
    "" to N = the largest count in the batch, with ``hard_negative_mask`` (bool, B x N) marking
    real entries, so a C3*-style loss can score N negatives per image and mask the padding;
    their kinds are padded with "" and their source ids with -1.
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
    texts, kinds, sources = [], [], []
    for i, s in enumerate(batch):
        hard = list(s["hard_negatives"])
        kind = list(s.get("hard_negative_kinds", []))[: len(hard)]
        source = list(s.get("hard_negative_sources", []))[: len(hard)]
        valid[i, : len(hard)] = True
        texts.append(hard + [""] * (n - len(hard)))
        kinds.append(kind + [""] * (n - len(kind)))
        sources.append(source + [NO_SOURCE_ID] * (n - len(source)))
    return {
        "image": stack([s["image"] for s in batch]),
        "mask": stack([s["mask"] for s in batch]),
        "sentence": [s["sentence"] for s in batch],
        "raw_sentence": [s.get("raw_sentence", s["sentence"]) for s in batch],
        "hard_negatives": texts,
        "hard_negative_kinds": kinds,
        "hard_negative_sources": sources,
        "hard_negative_mask": valid,
        "meta": [s["meta"] for s in batch],
    }
