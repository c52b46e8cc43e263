"""Mosaic geometry and composition: where each image goes, at what size, and the mask.

Cells are numbered row-major: on a 2x2 grid 0 top-left, 1 top-right, 2 bottom-left, 3
bottom-right (the quadrants); on a 3x3 grid 0..2 the top row, 3..5 the middle, 6..8 the bottom.

The canvas (``cell_geometry``): "positive" keeps the positive's size W x H (the paper's code at
the image's own size); "square" is ``input_size`` x ``input_size``, every cell a square of about
``input_size / grid`` (the official NeMo loader, which resizes each cell with ``A.Resize``).

The cuts: a canvas side of ``size`` pixels is cut into ``grid`` spans at ``cuts = [0, x_1, ...,
x_{grid-1}, size]``; cell (r, c) spans ``[xs[c], xs[c+1])`` x ``[ys[r], ys[r+1])``.

- "center" (default): ``x_i = (i * size) // grid``. 2x2: left cells ``W // 2`` wide, right ``W -
  W // 2``, top ``H // 2`` high, bottom ``H - H // 2``; 3x3 at 416: 138, 139, 139 (the official
  loader makes every cell ``416 // 3 = 138`` and its 414-pixel mosaic is then scaled by 416/414 in
  its letterbox warp; here the cells tile the canvas exactly).
- "shifted" (the official ``move_crs_pnt`` with ``rand_crs=False``): each cut moves uniformly
  within half a cell of its centred place, ``x_i`` in the integers of ``[(2i-1) size / (2 grid),
  (2i+1) size / (2 grid))`` (:func:`shifted_range`); on 2x2 the cross point is in ``[size/4,
  3 size/4)``, the official ``randint(quarter, size + 1 - quarter)`` being ``[size/4, 3 size/4]``.
  The ranges of neighbouring cuts do not overlap, so no cell is empty (given ``size >= grid``).
- "random" (the official ``rand_crs=True``): the ``grid - 1`` cuts are distinct integers drawn
  uniformly from ``1 .. size - 1``, sorted; every cell is at least one pixel.

What the official code does with a moved cross point (``dataloader.py``, ``move_crs_pnt``): it
draws ``crs_x, crs_y`` but makes EVERY cell ``crs_y x crs_x`` (not the complementary sizes of a
cross), fills a cell whose end would pass the canvas with zeros (image and mask, so the positive
may land in a black cell and lose its target), draws ``rand_crs`` from ``[0, size]`` (a zero-size
cell is possible), and the branch never defines ``denum`` (the grid side), so as written it
raises NameError. Here the cross point splits the canvas into cells of unequal sizes that tile
it, and the positive's cell always shows the positive.

``cell_fit="stretch"`` resizes every image to exactly its cell (as the paper's code and the
official ``A.Resize`` do); ``"letterbox"`` keeps the aspect ratio, centres the image in its cell
and pads with 0 (the positive's mask is letterboxed identically). Images are resized with PIL
BILINEAR (the official loader: cv2 INTER_LINEAR via albumentations), the positive's mask with
NEAREST; the negatives' cells of the mask are all 0 (they are negatives). Which images and which
cell is :mod:`pipeline.training.sampling`'s business.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

CELL_FITS = ("stretch", "letterbox")
CELL_GEOMETRIES = ("positive", "square")
CROSS_POINTS = ("center", "shifted", "random")

Box = tuple[int, int, int, int]
"""``(x0, y0, cell_w, cell_h)`` of one cell."""

SizeFit = Callable[[tuple[int, int]], tuple[int, int]]
"""Image (header) size -> the size it takes in a cell: the target of a reduced decode."""
CellLoader = Callable[[int, SizeFit], tuple[Image.Image, tuple[int, int]]]
"""(image_id, fit) -> (RGB image decoded at about the fit's size, the image's full size)."""


def even_cuts(size: int, grid: int) -> list[int]:
    """The centred cuts ``[(i * size) // grid for i in 0..grid]`` of a canvas side."""
    return [(i * size) // grid for i in range(grid + 1)]


def shifted_range(size: int, grid: int, i: int) -> tuple[int, int]:
    """``[lo, hi)``: the integers cut ``i`` (1 <= i < grid) may take with ``cross_point=
    "shifted"``, i.e. ``[ceil((2i-1) size / 2grid), ceil((2i+1) size / 2grid))``."""
    return -((1 - 2 * i) * size // (2 * grid)), -((-1 - 2 * i) * size // (2 * grid))


def grid_boxes(xs: list[int], ys: list[int]) -> list[Box]:
    """The cells of cuts ``xs`` (columns) and ``ys`` (rows), row-major."""
    return [(xs[c], ys[r], xs[c + 1] - xs[c], ys[r + 1] - ys[r])
            for r in range(len(ys) - 1) for c in range(len(xs) - 1)]


def cell_boxes(width: int, height: int, grid: int = 2) -> list[Box]:
    """``(x0, y0, cell_w, cell_h)`` of the cells of a centred ``grid`` x ``grid`` mosaic.

    Odd sizes give the extra pixels to the right columns / bottom rows, so the cells tile the
    output exactly and the output keeps the canvas size.
    """
    return grid_boxes(even_cuts(width, grid), even_cuts(height, grid))


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


def cell_fit_of(box: tuple[int, int, int, int], cell_fit: str) -> SizeFit:
    """Image (header) size -> the size it takes in cell `box`: the draft target."""
    cw, ch = box[2:]
    return lambda size: fit_box(size[0], size[1], cw, ch, cell_fit)[:2]


def resized(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """`image` at `size`; a draft decode often lands exactly on the cell, then nothing to do."""
    return image if image.size == size else image.resize(size, resample)


def compose(positive: Image.Image, mask: np.ndarray, quadrant: int, sources: list[int],
            cell_fit: str, load: CellLoader) -> tuple[Image.Image, np.ndarray]:
    """The centred 2x2 mosaic at the positive's size (see :func:`compose_cells`)."""
    height, width = mask.shape
    return compose_cells(positive, mask, quadrant, sources, cell_boxes(width, height),
                         (width, height), cell_fit, load)


def compose_cells(positive: Image.Image, mask: np.ndarray, cell: int, sources: list[int],
                  boxes: list[Box], canvas: tuple[int, int], cell_fit: str,
                  load: CellLoader) -> tuple[Image.Image, np.ndarray]:
    """The mosaic image (``canvas`` = W x H) and its mask: the positive's mask in its cell, zeros
    elsewhere.

    `boxes` tile the canvas (:func:`grid_boxes`); `sources` holds the image id shown in each
    cell, `cell` is the positive's. Every image but the positive (whose full-size `mask` gives
    its size) is decoded through `load` at about its cell's size.
    """
    height, width = mask.shape
    out = Image.new("RGB", canvas)
    out_mask = np.zeros((canvas[1], canvas[0]), dtype=np.uint8)
    bilinear, nearest = Image.Resampling.BILINEAR, Image.Resampling.NEAREST
    for q, box in enumerate(boxes):
        x0, y0, cw, ch = box
        if q == cell:
            nw, nh, ox, oy = fit_box(width, height, cw, ch, cell_fit)
            out.paste(resized(positive, (nw, nh), bilinear), (x0 + ox, y0 + oy))
            small = Image.fromarray(mask).resize((nw, nh), nearest)
            out_mask[y0 + oy:y0 + oy + nh, x0 + ox:x0 + ox + nw] = np.asarray(small)
            continue
        neg, size = load(sources[q], cell_fit_of(box, cell_fit))
        nw, nh, ox, oy = fit_box(size[0], size[1], cw, ch, cell_fit)
        out.paste(resized(neg, (nw, nh), bilinear), (x0 + ox, y0 + oy))
    return out, out_mask
