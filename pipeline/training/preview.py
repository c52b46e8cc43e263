"""A contact sheet of what training gets: mosaics with the target mask overlaid, captions.

The sheet has one labelled band per sampler setting (:data:`BANDS`: retrieval 2x2, random 2x2,
retrieval 3x3, square cells with a shifted cross point, the official mixed mode), each showing
the same samples (spread evenly over the split) drawn as `NemoDataset` draws them with that
setting and mosaics always on (gamma = 1, or the mixed mode's probabilities). In each cell the
target mask is tinted cyan and outlined green, the positive's cell is framed yellow, and below
it are the kind of sample, the sentence and its first hard negatives with their kinds. A user
looks at it before spending GPU hours: a wrong mask, a too-easy negative, a contradicted
positional word or a random mosaic that shows an evaluation image shows at once.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.io import output_file
from pipeline.training.dataset import NemoDataset

THUMB_W = 320
CAPTION_LINES = 6
LINE_H = 13
LABEL_H = 22
COLS = 4

BANDS: dict[str, tuple[str, dict[str, Any]]] = {
    "retrieval": ("retrieval mosaics, 2x2 (mosaic='retrieval')", {"mosaic": "retrieval"}),
    "random": ("random mosaics, 2x2 (mosaic='random': the training pool, never the own image)",
               {"mosaic": "random"}),
    "3x3": ("retrieval mosaics, 3x3 (grid=3: 8 negatives)", {"grid": 3}),
    "square": ("square cells at 416, shifted cross point (cell_geometry='square', "
               "cross_point='shifted')", {"cell_geometry": "square", "cross_point": "shifted"}),
    "mixed": ("single / random / retrieval = 0.2 / 0.3 / 0.5, grid 2 or 3 "
              "(mosaic='mixed', grid='mixed')",
              {"mosaic": "mixed", "random_prob": 0.3, "retrieval_prob": 0.5, "grid": "mixed"}),
}
"""Band name -> (label, NemoDataset options). Every band but "mixed" has gamma = 1."""
DEFAULT_BANDS = ("retrieval", "random", "3x3", "square")


def _overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """Target tinted cyan with a bright green outline: visible on any object colour."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    m = mask.astype(bool)
    tint = np.array([0, 255, 255], np.float32)
    out = np.where(m[..., None], rgb * 0.5 + tint * 0.5, rgb)
    inner = m.copy()
    for axis in (0, 1):
        for shift in (1, -1, 2, -2):
            inner &= np.roll(m, shift, axis=axis)
    out[m & ~inner] = (0, 255, 0)
    return Image.fromarray(out.astype(np.uint8))


def _kind(meta: dict[str, Any]) -> str:
    """What the sample is: "retrieval 3x3 c4", "single", "single (fallback single)", ..."""
    if meta["is_mosaic"]:
        g = meta["grid"]
        head = f"{meta['mosaic_kind']} {g}x{g} c{meta['quadrant']}"
        if meta["fallback"]:
            head += f" +{meta['fallback_cells']} {meta['fallback']}"
        return head
    return "single" + (f" (fallback {meta['fallback']})" if meta["fallback"] else "")


def _caption(sample: dict[str, Any]) -> list[str]:
    meta = sample["meta"]
    lines = [f"#{meta['sent_id']} {_kind(meta)}", *textwrap.wrap("+ " + sample["sentence"], 52)[:2]]
    for text, kind in zip(sample["hard_negatives"], sample["hard_negative_kinds"], strict=False):
        lines.extend(textwrap.wrap(f"- [{kind}] {text}", 52)[:1])
    return lines[:CAPTION_LINES]


def _cell(sample: dict[str, Any], box_h: int) -> Image.Image:
    """One sample: overlay, the positive's cell framed, scaled to fit THUMB_W x box_h."""
    image = _overlay(sample["image"], sample["mask"])
    w, h = image.size
    meta = sample["meta"]
    if meta["is_mosaic"]:
        x0, y0, cw, ch = meta["cells"][meta["quadrant"]]
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1],
                                        outline=(255, 220, 0), width=max(2, w // 150))
    scale = min(THUMB_W / w, box_h / h)
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))),
                        Image.Resampling.BILINEAR)


def render_preview(shards_dir: Path, images_dir: Path, out: Path, split: str = "train",
                   n: int = 16, seed: int = 0, n_hard_negatives: int = 3,
                   positional_constraint: bool = True,
                   bands: Sequence[str] = DEFAULT_BANDS) -> Path:
    """Draw about `n` samples, shared out over the `bands` (names of :data:`BANDS`), into one
    PNG; returns its path. Each band shows the same indices, spread evenly over the split."""
    out = Path(out)
    unknown = [b for b in bands if b not in BANDS]
    if unknown or not bands:
        raise ValueError(f"unknown preview band(s) {unknown or '(none given)'}; choose from "
                         f"{', '.join(BANDS)}")
    datasets = [NemoDataset(shards_dir, split, images_dir, n_hard_negatives=n_hard_negatives,
                            positional_constraint=positional_constraint, seed=seed,
                            **{"gamma": 1.0, **BANDS[b][1]}) for b in bands]
    total = len(datasets[0])
    if total == 0:
        raise ValueError(f"split {split!r} of {shards_dir} has no rows to preview")
    per = min(total, max(1, math.ceil(n / len(bands))))
    indices = np.linspace(0, total - 1, num=per).round().astype(int).tolist()
    rows = math.ceil(per / COLS)
    box_h = int(THUMB_W * 0.75)
    cell_h = box_h + CAPTION_LINES * LINE_H + 8
    band_h = LABEL_H + rows * cell_h
    sheet = Image.new("RGB", (COLS * THUMB_W, len(bands) * band_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for b, (name, ds) in enumerate(zip(bands, datasets, strict=True)):
        top = b * band_h
        draw.rectangle([0, top, COLS * THUMB_W - 1, top + LABEL_H - 3], fill=(40, 40, 60))
        draw.text((6, top + 5), f"{name}: {BANDS[name][0]}", fill=(255, 255, 255), font=font)
        for k, index in enumerate(indices):
            sample = ds[index]
            thumb = _cell(sample, box_h)
            ox, oy = (k % COLS) * THUMB_W, top + LABEL_H + (k // COLS) * cell_h
            sheet.paste(thumb, (ox, oy))
            for j, line in enumerate(_caption(sample)):
                draw.text((ox + 3, oy + thumb.height + 3 + j * LINE_H), line, fill=(0, 0, 0),
                          font=font)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"{out}: {out.suffix or 'no extension'} is not an image format PIL "
                         "writes; name the preview .png or .jpg")
    with output_file(out, "preview", "OUT path") as tmp:
        sheet.save(tmp, format=fmt)
    return out
