"""A contact sheet of what training gets: mosaics with the target mask overlaid, captions.

Each cell shows one `NemoDataset` sample (mosaic drawn with gamma=1 where the sample has
negatives), the target mask tinted cyan and outlined green, the positive's quadrant outlined
yellow, and below it
the sentence and its first hard negatives with their kinds. A user looks at it before spending
GPU hours: a wrong mask, a too-easy negative or a contradicted positional word shows at once.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.training.dataset import NemoDataset
from pipeline.training.mosaic import cell_boxes

THUMB_W = 320
CAPTION_LINES = 6
LINE_H = 13


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


def _caption(sample: dict) -> list[str]:
    meta = sample["meta"]
    head = f"#{meta['sent_id']} " + ("mosaic q" + str(meta["quadrant"]) if meta["is_mosaic"]
                                     else "single")
    lines = [head, *textwrap.wrap("+ " + sample["sentence"], 52)[:2]]
    for text, kind in zip(sample["hard_negatives"], sample["hard_negative_kinds"], strict=False):
        lines.extend(textwrap.wrap(f"- [{kind}] {text}", 52)[:1])
    return lines[:CAPTION_LINES]


def render_preview(shards_dir: Path, images_dir: Path, out: Path, split: str = "train",
                   n: int = 16, seed: int = 0, n_hard_negatives: int = 3,
                   positional_constraint: bool = True) -> Path:
    """Draw `n` samples (spread evenly over the split) into one PNG; returns its path."""
    ds = NemoDataset(shards_dir, split, images_dir, gamma=1.0, n_hard_negatives=n_hard_negatives,
                     positional_constraint=positional_constraint, seed=seed)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {shards_dir} has no rows to preview")
    indices = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int).tolist()
    cols = 4 if len(indices) >= 4 else len(indices)
    rows = (len(indices) + cols - 1) // cols
    cell_h = int(THUMB_W * 0.75) + CAPTION_LINES * LINE_H + 8
    sheet = Image.new("RGB", (cols * THUMB_W, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, index in enumerate(indices):
        sample = ds[index]
        image = _overlay(sample["image"], sample["mask"])
        w, h = image.size
        if sample["meta"]["is_mosaic"]:
            x0, y0, cw, ch = cell_boxes(w, h)[sample["meta"]["quadrant"]]
            ImageDraw.Draw(image).rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1],
                                            outline=(255, 220, 0),
                                            width=max(2, w // 150))
        scale = min(THUMB_W / w, (cell_h - CAPTION_LINES * LINE_H - 8) / h)
        thumb = image.resize((max(1, int(w * scale)), max(1, int(h * scale))),
                             Image.Resampling.BILINEAR)
        ox, oy = (k % cols) * THUMB_W, (k // cols) * cell_h
        sheet.paste(thumb, (ox, oy))
        for j, line in enumerate(_caption(sample)):
            draw.text((ox + 3, oy + thumb.height + 3 + j * LINE_H), line, fill=(0, 0, 0),
                      font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
