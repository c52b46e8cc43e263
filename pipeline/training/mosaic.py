"""Mosaic geometry and composition: where each image goes, at what size, and the mask.

Quadrants 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right. The output has the positive's
size W x H; left cells are ``W // 2`` wide, right cells ``W - W // 2``; top cells ``H // 2`` high,
bottom cells ``H - H // 2``. ``cell_fit="stretch"`` resizes every image to exactly its cell (as
the paper's code does); ``"letterbox"`` keeps the aspect ratio, centres the image in its cell and
pads with 0 (the positive's mask is letterboxed identically). The positive's mask goes into its
cell with NEAREST; the negatives' cells are all 0 (they are negatives). Which images and which
quadrant is :mod:`pipeline.training.sampling`'s business.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

CELL_FITS = ("stretch", "letterbox")

SizeFit = Callable[[tuple[int, int]], tuple[int, int]]
"""Image (header) size -> the size it takes in a cell: the target of a reduced decode."""
CellLoader = Callable[[int, SizeFit], tuple[Image.Image, tuple[int, int]]]
"""(image_id, fit) -> (RGB image decoded at about the fit's size, the image's full size)."""


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


def cell_fit_of(box: tuple[int, int, int, int], cell_fit: str) -> SizeFit:
    """Image (header) size -> the size it takes in cell `box`: the draft target."""
    cw, ch = box[2:]
    return lambda size: fit_box(size[0], size[1], cw, ch, cell_fit)[:2]


def resized(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """`image` at `size`; a draft decode often lands exactly on the cell, then nothing to do."""
    return image if image.size == size else image.resize(size, resample)


def compose(positive: Image.Image, mask: np.ndarray, quadrant: int, sources: list[int],
            cell_fit: str, load: CellLoader) -> tuple[Image.Image, np.ndarray]:
    """The 2x2 mosaic image and its mask (positive's mask in its cell, zeros elsewhere).

    `sources` holds the image id shown in each quadrant; every one but the positive's is
    decoded through `load` at about its cell's size.
    """
    height, width = mask.shape
    canvas = Image.new("RGB", (width, height))
    out_mask = np.zeros((height, width), dtype=np.uint8)
    bilinear, nearest = Image.Resampling.BILINEAR, Image.Resampling.NEAREST
    for q, box in enumerate(cell_boxes(width, height)):
        x0, y0, cw, ch = box
        if q == quadrant:
            nw, nh, ox, oy = fit_box(width, height, cw, ch, cell_fit)
            canvas.paste(resized(positive, (nw, nh), bilinear), (x0 + ox, y0 + oy))
            cell = Image.fromarray(mask).resize((nw, nh), nearest)
            out_mask[y0 + oy:y0 + oy + nh, x0 + ox:x0 + ox + nw] = np.asarray(cell)
            continue
        neg, size = load(sources[q], cell_fit_of(box, cell_fit))
        nw, nh, ox, oy = fit_box(size[0], size[1], cw, ch, cell_fit)
        canvas.paste(resized(neg, (nw, nh), bilinear), (x0 + ox, y0 + oy))
    return canvas, out_mask
